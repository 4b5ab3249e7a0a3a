"""One embedded (local-mode) Qdrant client per folder per process.

Qdrant's local mode locks its folder: a second `QdrantClient(path=...)` on the same folder in the same
process fails with "Storage folder ... is already accessed by another instance of Qdrant client". A
pipeline loaded from YAML creates one `QdrantDocumentStore` per component that references it (writer,
retriever, ...), and our `QdrantMultiVectorStore` may point at the same folder, so several clients
would open it.

This module keeps a reference-counted client per resolved folder. `QdrantMultiVectorStore` takes its
client from here, and `share_embedded_qdrant_document_stores()` makes every `QdrantDocumentStore` with a
`path` do the same. Nothing happens on import: `load_pipeline` and the first connection of a
`QdrantMultiVectorStore` turn the sharing on; a hand-built pipeline calls it once before building its
stores. Stores with a `url`, `host` or
`location` (server, cluster, ":memory:") are not affected. Set `MULTIMODAL_RAG_SHARE_EMBEDDED_QDRANT=0`
to turn the document-store sharing off.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

_LOCK = threading.RLock()
_CLIENTS: dict[str, tuple[Any, int]] = {}
_PATCHED = False
_SHARED_ATTR = "_multimodal_rag_shared_path"

ENV_SWITCH = "MULTIMODAL_RAG_SHARE_EMBEDDED_QDRANT"


def folder_key(path: str | os.PathLike[str]) -> str:
    """
    The registry key of a local Qdrant folder.

    :param path: The folder, as configured.
    :returns: Its absolute, resolved path.
    """
    return str(Path(path).expanduser().resolve())


def acquire_local_client(path: str | os.PathLike[str]) -> Any:
    """
    Get the process's client for a local Qdrant folder, opening it on first use.

    Every call must be matched by `release_local_client(path)`.

    :param path: The folder.
    :returns: A `qdrant_client.QdrantClient` in local mode.
    """
    import qdrant_client

    share_embedded_qdrant_document_stores()
    key = folder_key(path)
    with _LOCK:
        entry = _CLIENTS.get(key)
        if entry is None:
            Path(key).mkdir(parents=True, exist_ok=True)
            client = qdrant_client.QdrantClient(path=key)
            _CLIENTS[key] = (client, 1)
            return client
        client, refs = entry
        _CLIENTS[key] = (client, refs + 1)
        return client


def release_local_client(path: str | os.PathLike[str]) -> None:
    """
    Drop one reference to a folder's client; the last one closes it (releasing the folder lock).

    :param path: The folder given to `acquire_local_client`.
    """
    key = folder_key(path)
    with _LOCK:
        entry = _CLIENTS.get(key)
        if entry is None:
            return
        client, refs = entry
        if refs > 1:
            _CLIENTS[key] = (client, refs - 1)
            return
        del _CLIENTS[key]
    client.close()


def _is_embedded_folder(store: Any) -> bool:
    return bool(getattr(store, "path", None)) and not any(
        getattr(store, name, None) for name in ("url", "host", "location")
    )


def share_embedded_qdrant_document_stores() -> bool:
    """
    Make `QdrantDocumentStore` instances with a `path` share this module's client for that folder.

    Idempotent. Wraps the store's client initialisation and `close()`; relies on the private
    `_initialize_client`/`_set_up_collection` of qdrant-haystack 13 (pinned by this package's tests).

    :returns: True when the sharing is active.
    """
    global _PATCHED
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no"):
        return False
    with _LOCK:
        if _PATCHED:
            return True
        try:
            from haystack_integrations.document_stores.qdrant import QdrantDocumentStore
        except ImportError:  # qdrant-haystack not installed: nothing to share
            return False
        original_init = QdrantDocumentStore._initialize_client
        original_close = QdrantDocumentStore.close

        def _initialize_client(self: Any) -> None:
            if self._client is not None or not _is_embedded_folder(self):
                original_init(self)
                return
            client = acquire_local_client(self.path)
            self._client = client
            setattr(self, _SHARED_ATTR, self.path)
            try:
                self._set_up_collection(
                    self.index,
                    self.embedding_dim,
                    self.recreate_index,
                    self.similarity,
                    self.use_sparse_embeddings,
                    self.sparse_idf,
                    self.on_disk,
                    self.payload_fields_to_index,
                )
            except BaseException:
                self._client = None
                delattr(self, _SHARED_ATTR)
                release_local_client(self.path)
                raise

        def close(self: Any) -> None:
            shared_path = getattr(self, _SHARED_ATTR, None)
            if shared_path is None or self._client is None:
                original_close(self)
                return
            self._client = None
            delattr(self, _SHARED_ATTR)
            release_local_client(shared_path)

        QdrantDocumentStore._initialize_client = _initialize_client  # type: ignore[method-assign]
        QdrantDocumentStore.close = close  # type: ignore[method-assign]
        _PATCHED = True
        return True
