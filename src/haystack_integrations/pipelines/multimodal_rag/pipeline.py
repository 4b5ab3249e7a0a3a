"""A Haystack `Pipeline` that checks its stores when it warms up, before any model runs.

Without these checks a wrong `embedding_dim`, or an embedded Qdrant folder held by another process, surfaced
only at the `DocumentWriter`, after every document had been embedded (and the multi-vectors written); a
query pipeline pointed at a mistyped `base_dir` answered from an empty index and created files there.
Haystack warms components up one by one and neither the writer nor the retriever has a `warm_up`, so no
component can check this on its own: the pipeline does, in `warm_up` (which `run` calls):

1. before any model loads: a read-only pipeline (no writer) whose embedded Qdrant folder does not exist is
   refused, creating nothing; a folder another process holds is refused with the way out; an existing
   collection whose vector size differs from the configured `embedding_dim` is refused when it holds
   documents (with how to recover);
2. the dense embedders warm up first, and each one's output size is compared with the `embedding_dim` of
   every Qdrant document store downstream of it (before the other models load);
3. the other components warm up; an empty collection left with the wrong size by an earlier run is
   recreated (with a warning), and the embedded stores are opened, so nothing has run yet when any of
   this fails.

`load_pipeline` returns this class; `MultimodalRAGPipeline.loads(...)` works like `Pipeline.loads`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
from haystack import Pipeline, logging
from haystack.components.writers import DocumentWriter

from haystack_integrations.common.multimodal_rag.backends.dense import DenseEncoder
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec
from haystack_integrations.common.multimodal_rag.errors import PipelineLoadError
from haystack_integrations.components.embedders.colpali import ColPaliDocumentEmbedder
from haystack_integrations.components.embedders.multimodal import (
    MultimodalDocumentEmbedder,
    MultimodalImageEmbedder,
    MultimodalTextEmbedder,
)
from haystack_integrations.document_stores.multivector.qdrant_sharing import (
    acquire_local_client,
    release_local_client,
    share_embedded_qdrant_document_stores,
)
from haystack_integrations.document_stores.qdrant import QdrantDocumentStore

logger = logging.getLogger(__name__)

_DENSE_CLASSES = (MultimodalDocumentEmbedder, MultimodalTextEmbedder, MultimodalImageEmbedder)


@dataclass
class _Folder:
    """An embedded Qdrant folder and what this pipeline does with it."""

    path: Path
    stores: list[tuple[str, QdrantDocumentStore]] = field(default_factory=list)  # (component name, store)
    written: bool = False


def _is_embedded(store: QdrantDocumentStore) -> bool:
    return bool(store.path) and not (store.url or store.host or store.location)


def _document_store(instance: Any) -> Any:
    # DocumentWriter keeps its store as `document_store`; qdrant-haystack's retrievers as `_document_store` (no
    # public accessor in qdrant-haystack 13; pinned by test_pipelines' missing-index and warm-up tests).
    store = getattr(instance, "document_store", None)
    return store if store is not None else getattr(instance, "_document_store", None)


def _is_writer(instance: Any) -> bool:
    return isinstance(instance, DocumentWriter) or type(instance).__name__.endswith("Writer")


def dense_output_dim(encoder: DenseEncoder) -> int | None:
    """
    The size of a loaded dual encoder's embeddings, read from its config (no forward pass).

    CLIP projects both towers to `projection_dim` (transformers `clip/modeling_clip.py`: `text_projection =
    nn.Linear(..., config.projection_dim)`); SigLIP and SigLIP 2 end the text tower with `head =
    nn.Linear(embed_dim, config.projection_size)` (`siglip/modeling_siglip.py`), `projection_size` defaulting to
    the text `hidden_size`.

    :param encoder: The loaded encoder.
    :returns: The embedding size, or `None` for an architecture that states neither.
    """
    config = getattr(encoder.model, "config", None)
    projection_dim = getattr(config, "projection_dim", None)
    if isinstance(projection_dim, int):
        return projection_dim
    text_config = getattr(config, "text_config", None)
    for name in ("projection_size", "hidden_size"):
        value = getattr(text_config, name, None)
        if isinstance(value, int):
            return value
    return None


class MultimodalRAGPipeline(Pipeline):
    """
    A `Pipeline` whose `warm_up` checks the document stores before any model runs (see the module docstring).

    Everything else is Haystack's `Pipeline`: it serializes to the same YAML (`dumps`), and `Pipeline.loads`
    of that YAML gives a plain pipeline without the checks.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """
        Create the pipeline; takes `Pipeline`'s arguments.

        :param args: Positional arguments of `Pipeline`.
        :param kwargs: Keyword arguments of `Pipeline`.
        """
        super().__init__(*args, **kwargs)
        self._stores_checked = False
        self._check_lock = threading.Lock()

    # ----------------------------------------------------------------------------------------- discovery
    def _instances(self) -> list[tuple[str, Any]]:
        return [(name, self.graph.nodes[name]["instance"]) for name in self.graph.nodes]

    def embedded_qdrant_folders(self) -> list[_Folder]:
        """
        The embedded Qdrant folders of the pipeline's document stores, and whether a writer writes to each.

        :returns: One entry per folder.
        """
        folders: dict[Path, _Folder] = {}
        for name, instance in self._instances():
            store = _document_store(instance)
            if not isinstance(store, QdrantDocumentStore) or not _is_embedded(store):
                continue
            path = Path(str(store.path)).expanduser().resolve()
            folder = folders.setdefault(path, _Folder(path))
            folder.stores.append((name, store))
            folder.written = folder.written or _is_writer(instance)
        return list(folders.values())

    def missing_indexes(self) -> list[Path]:
        """
        Embedded Qdrant folders that this pipeline only reads (no writer) and that do not exist.

        :returns: The missing folders (a query pipeline with one would answer from nothing).
        """
        return [f.path for f in self.embedded_qdrant_folders() if not f.written and not f.path.exists()]

    def missing_multivector_files(self) -> list[Path]:
        """
        Local multi-vector store files that this pipeline only reads and that do not exist.

        :returns: The missing files (the ranker then encodes pages at query time).
        """
        read: dict[Path, bool] = {}
        for _, instance in self._instances():
            store = getattr(instance, "multivector_store", None)
            path = getattr(store, "path", None)
            if not isinstance(path, str) or getattr(store, "url", None):
                continue
            resolved = Path(path).expanduser().resolve()
            read[resolved] = read.get(resolved, False) or isinstance(instance, ColPaliDocumentEmbedder)
        return [path for path, written in read.items() if not written and not path.exists()]

    # ------------------------------------------------------------------------------------------- warm-up
    def warm_up(self) -> None:
        """
        Check the stores, warm the dense embedders up and check their vector size, then warm up the rest.

        The checks run once (the first call that passes them); later calls are `Pipeline.warm_up`.

        :raises PipelineLoadError: On a missing index in a query pipeline, a Qdrant folder held by another
            process, or a vector size that does not match the store.
        :raises ModelLoadError: When a component's model cannot be loaded.
        """
        if self._stores_checked:
            super().warm_up()
            return
        with self._check_lock:
            if self._stores_checked:
                super().warm_up()
                return
            held, recreate = self._check_before_models()
            try:
                self._check_dense_dims()
                # Before the components warm up: a dense embedder's index guard opens its store (and so creates
                # the collection), which must not happen with a wrong size, nor before an empty one is recreated.
                self._recreate(recreate)
                super().warm_up()
                self._open_stores()
            finally:
                for path in held:
                    release_local_client(path)
            self._stores_checked = True

    async def warm_up_async(self) -> None:
        """
        Like `warm_up`, with each component's `warm_up_async` where it has one.

        :raises PipelineLoadError: See `warm_up`.
        """
        if self._stores_checked:
            await super().warm_up_async()
            return
        held, recreate = self._check_before_models()
        try:
            self._check_dense_dims()
            self._recreate(recreate)
            await super().warm_up_async()
            self._open_stores()
        finally:
            for path in held:
                release_local_client(path)
        self._stores_checked = True

    def _check_before_models(self) -> tuple[list[Path], list[_Folder]]:
        """Returns the folders whose client is held (release them) and the empty collections to recreate."""
        missing = self.missing_indexes()
        if missing:
            msg = (
                f"no index at {', '.join(str(p) for p in missing)}: this pipeline only reads it, so it would "
                "answer from nothing. Run the indexing pipeline first, or check base_dir. Nothing was created."
            )
            raise PipelineLoadError(msg)
        shared = share_embedded_qdrant_document_stores()
        held: list[Path] = []
        recreate: list[_Folder] = []
        try:
            for folder in self.embedded_qdrant_folders():
                if not folder.path.exists():
                    continue
                client = self._open(folder.path)
                held.append(folder.path)
                if self._inspect(folder, client):
                    recreate.append(folder)
        except BaseException:
            for path in held:
                release_local_client(path)
            raise
        if not shared:
            # Without the sharing, a second client in this process could not open the folder: let go now.
            for path in held:
                release_local_client(path)
            held = []
        return held, recreate

    @staticmethod
    def _open(path: Path) -> Any:
        try:
            return acquire_local_client(path)
        except RuntimeError as e:
            if "already accessed" not in str(e):
                raise
            msg = (
                f"the embedded Qdrant folder {path} is open in another process (Qdrant's local mode allows one "
                "process per folder): stop the other pipeline first, or use a Qdrant server for concurrent "
                "access (load_pipeline(..., qdrant_url=...) or QDRANT_URL)."
            )
            raise PipelineLoadError(msg) from e

    @staticmethod
    def _inspect(folder: _Folder, client: Any) -> bool:
        """Check each store's collection in an open folder; True when an empty one has the wrong size."""
        recreate = False
        for name, store in folder.stores:
            if not client.collection_exists(store.index):
                if not folder.written:
                    logger.warning(
                        "The index {path} has no collection '{index}' (read by '{component}'): queries will find "
                        "nothing. Run the indexing pipeline first, or check base_dir.",
                        path=str(folder.path),
                        index=store.index,
                        component=name,
                    )
                continue
            vectors = client.get_collection(store.index).config.params.vectors
            size = getattr(vectors, "size", None)
            count = client.count(store.index, exact=True).count
            if count == 0 and not folder.written:
                logger.warning(
                    "The index {path} (collection '{index}') holds no documents: queries will find nothing. "
                    "Run the indexing pipeline first, or check base_dir.",
                    path=str(folder.path),
                    index=store.index,
                )
            if size is None or size == store.embedding_dim:
                continue
            if count > 0:
                msg = (
                    f"collection '{store.index}' in {folder.path} holds {count} documents with {size}-d vectors, "
                    f"but '{name}' is configured with embedding_dim={store.embedding_dim}. If the dense model is "
                    f"the one that built this index, pass embedding_dim={size}; if the model changed, index into "
                    f"a new base_dir, or delete {folder.path} and index again."
                )
                raise PipelineLoadError(msg)
            recreate = True
        return recreate

    def _check_dense_dims(self) -> None:
        """
        Load the dense embedders' models first and compare their output size with the stores downstream.

        Only the models are loaded here (what `warm_up` loads, cached); the components warm up later, so the
        index-model guard of one given a `document_store` opens that store after its size was checked.
        """
        for name, instance in self._instances():
            if not isinstance(instance, _DENSE_CLASSES):
                continue
            dim = dense_output_dim(DenseEncoder.get(LoadSpec.of(instance)))
            if dim is None:
                continue
            for downstream in nx.descendants(self.graph, name):
                store = _document_store(self.graph.nodes[downstream]["instance"])
                if isinstance(store, QdrantDocumentStore) and store.embedding_dim != dim:
                    msg = (
                        f"'{name}' ({instance.model}) makes {dim}-d vectors, but the Qdrant document store of "
                        f"'{downstream}' is configured with embedding_dim={store.embedding_dim}: pass "
                        f"embedding_dim={dim} to load_pipeline (or set it in the YAML). Nothing was embedded "
                        "or written."
                    )
                    raise PipelineLoadError(msg)

    def _recreate(self, recreate: list[_Folder]) -> None:
        for folder in recreate:
            self._recreate_empty_collections(folder)

    def _open_stores(self) -> None:
        for folder in self.embedded_qdrant_folders():
            for _, store in folder.stores:
                # Opens the (shared) client now, so a writer's folder is created and checked before the run.
                store.count_documents()

    @staticmethod
    def _recreate_empty_collections(folder: _Folder) -> None:
        client = acquire_local_client(folder.path)
        try:
            for _, store in folder.stores:
                if not client.collection_exists(store.index):
                    continue
                vectors = client.get_collection(store.index).config.params.vectors
                size = getattr(vectors, "size", None)
                if size in (None, store.embedding_dim) or client.count(store.index, exact=True).count:
                    continue
                logger.warning(
                    "Collection '{index}' in {path} was empty with {size}-d vectors (left by an earlier run with "
                    "another embedding_dim): recreating it with {dim}-d vectors.",
                    index=store.index,
                    path=str(folder.path),
                    size=size,
                    dim=store.embedding_dim,
                )
                client.delete_collection(store.index)
        finally:
            release_local_client(folder.path)

    # --------------------------------------------------------------------------------------------- close
    def close(self) -> None:
        """
        Close every component (Haystack's `Pipeline.close`), then every document and multi-vector store.

        Stores are closed once each; embedded Qdrant folders are released for other processes.
        """
        super().close()
        seen: set[int] = set()
        for _, instance in self._instances():
            for store in (_document_store(instance), getattr(instance, "multivector_store", None)):
                if store is None or id(store) in seen or not hasattr(store, "close"):
                    continue
                seen.add(id(store))
                store.close()
