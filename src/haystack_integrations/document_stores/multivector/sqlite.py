from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from haystack import default_from_dict, default_to_dict

from haystack_integrations.common.multimodal_rag.errors import MultiVectorStoreError
from haystack_integrations.common.multimodal_rag.numerics.maxsim import maxsim_by_id, maxsim_chunks
from haystack_integrations.common.multimodal_rag.validation import check_positive_int
from haystack_integrations.document_stores.multivector.protocol import (
    as_multivector,
    as_query,
    check_dtype,
    check_ids,
    check_model_binding,
    check_pool_factor_binding,
    is_content_fingerprint,
    model_binding_updates,
)

_FORMAT = "multimodal-rag-haystack/multivectors"
_VERSION = "1"
# Large pages keep a ~260 KB blob in few overflow pages; must be set before the file's first table.
_PAGE_SIZE = 65536
_MMAP_SIZE = 1 << 30
_MAX_VARS = 900  # stay under SQLite's bound-parameter limit in IN (...) lists
_SCORE_CHUNK = 32  # pages fetched while the MaxSim workers score the previous chunk
# Process-wide serials for `revision`: each connection opened, each change made through an instance.
_CONNECTION_SERIALS = itertools.count(1)
_CHANGE_SERIALS = itertools.count(1)


class SQLiteMultiVectorStore:
    """
    A persistent, embedded multi-vector store in one SQLite file: each page's vectors are one blob.

    Made for the embedded set-up: it survives restarts, and fetching 100 pages of 1030x128 float16 vectors
    takes milliseconds (Qdrant's local mode takes seconds for the same fetch), so `ColPaliRanker` can
    score them with its fast kernel. SQLite is in Python's standard library: no server, no extra install.

    - Write-ahead log: readers never block each other or the writer; many threads and processes may use
      the file at once (one connection per thread, opened on demand). There is no folder lock.
    - Each `write` call is one transaction: all of it lands or none of it. A process killed in the middle
      of a write leaves the file readable with every earlier write intact.
    - The file records `dim`, `dtype` and (once known) the embedding `model`: its id and its content
      fingerprint (`model_fingerprint`: config and weights). Opening it with another dim or dtype, writing
      vectors of another width, or using it from a component with another checkpoint is an error, so an index
      never mixes embeddings of two models; the same checkpoint moved, copied or loaded by Hub id is accepted.
      (Files written before fingerprints were recorded compare model ids until a component binds them.)
    - A file that is not such a store (or is corrupt) is an error that names the file.

    ### Usage example
    ```python
    from haystack_integrations.document_stores.multivector import SQLiteMultiVectorStore

    store = SQLiteMultiVectorStore("index/multivectors.sqlite")
    store.write({"doc-1": page_vectors})      # (n_vectors, 128) array
    vectors = store.get(["doc-1"])["doc-1"]   # float16 array, read straight from the blob
    ```
    """

    def __init__(
        self,
        path: str,
        *,
        dim: int = 128,
        dtype: str = "float16",
        model: str | None = None,
        read_only: bool = False,
    ) -> None:
        """
        Configure the store; the file is opened (or created) by `warm_up()` or the first use.

        :param path: The SQLite file; its folder is created if needed.
        :param dim: Width of the vectors.
        :param dtype: Storage type: `"float16"` or `"float32"`.
        :param model: Embedding model id; recorded at creation, checked against an existing file (by content
            when the file recorded a fingerprint and the ids differ).
        :param read_only: Open without write access (the file must exist).
        :raises ValueError: On invalid parameters.
        :raises MultiVectorStoreError: When `path` is empty or an in-memory database (`":memory:"`: every thread
            would get its own), or (at `warm_up`) the file is not a store of ours, is corrupt, or was created with
            another dim, dtype or model.
        """
        check_positive_int("dim", dim)
        self._np_dtype = check_dtype(dtype)
        if not str(path).strip():
            msg = f"SQLiteMultiVectorStore needs a file path, got an empty path {path!r}"
            raise MultiVectorStoreError(msg)
        if str(path).strip() == ":memory:" or str(path).startswith("file::memory:"):
            # SQLite gives every connection (here: every thread) its own in-memory database: vectors written in one
            # thread would be missing in another and lost on close. Use InMemoryMultiVectorStore instead.
            msg = (
                f"SQLiteMultiVectorStore needs a file path, got {path!r}; "
                "for vectors in memory use InMemoryMultiVectorStore"
            )
            raise MultiVectorStoreError(msg)
        self.path = str(path)
        self.dim = dim
        self.dtype = dtype
        self.model = model
        self.read_only = read_only
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._stored_model: str | None = None
        self._stored_fingerprint: str | None = None
        self._stored_pool_factor: int | None = None
        self._initialised = False
        self._init_lock = threading.Lock()
        self._changes = 0  # a fresh serial after each write or delete through this instance (see `revision`)
        # No file is touched here: the file is opened, checked (or created) by `warm_up()` or the first use, so
        # loading a pipeline from YAML reads and creates nothing. Components bind the store in their warm_up, so
        # a mismatched file still fails before any model runs.

    def warm_up(self) -> None:
        """
        Open and check the file now (create it unless `read_only`); idempotent. Every other method does this on
        first use.

        :raises MultiVectorStoreError: When the file is not a store of ours, is corrupt, or was created with
            another dim, dtype or model.
        """
        self._ensure_initialised()

    # --- connections -------------------------------------------------------------------------------

    def _describe(self) -> str:
        return f"SQLiteMultiVectorStore file '{self.path}'"

    def _open(self) -> sqlite3.Connection:
        try:
            if self.read_only:
                uri = Path(self.path).resolve().as_uri() + "?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None, check_same_thread=True)
            else:
                conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=True)
            conn.execute(f"PRAGMA mmap_size={_MMAP_SIZE}")
            conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error as e:
            msg = f"{self._describe()} cannot be opened: {e}"
            raise MultiVectorStoreError(msg) from e
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    def _raw_conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
            self._local.serial = next(_CONNECTION_SERIALS)
        return conn

    def _conn(self) -> sqlite3.Connection:
        if not self._initialised:
            self._ensure_initialised()
        return self._raw_conn()

    def _ensure_initialised(self) -> None:
        with self._init_lock:
            if not self._initialised:
                self._initialise()
                self._initialised = True

    def close(self) -> None:
        """Close every connection this instance opened (they reopen on the next use)."""
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            # A connection created in another thread cannot be closed here; it closes when that thread ends.
            with contextlib.suppress(sqlite3.ProgrammingError):
                conn.close()
        self._local = threading.local()
        self._initialised = False

    # --- creation and validation ------------------------------------------------------------------

    def _initialise(self) -> None:
        file = Path(self.path)
        exists = file.exists() and file.stat().st_size > 0
        if not exists:
            if self.read_only:
                msg = f"{self._describe()} does not exist (read_only=True cannot create it)"
                raise MultiVectorStoreError(msg)
            file.parent.mkdir(parents=True, exist_ok=True)
        conn = self._raw_conn()
        try:
            if not exists:
                self._create(conn)
            self._validate(conn)
        except sqlite3.DatabaseError as e:
            self.close()
            msg = f"{self._describe()} is not a multi-vector store of this package, or it is corrupt: {e}"
            raise MultiVectorStoreError(msg) from e
        except MultiVectorStoreError:
            self.close()
            raise

    def _create(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA page_size={_PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS mv_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS mv_vectors (id TEXT PRIMARY KEY, n INTEGER NOT NULL, data BLOB NOT NULL)"
            )
            meta = {"format": _FORMAT, "version": _VERSION, "dim": str(self.dim), "dtype": self.dtype}
            if self.model is not None:
                meta["model"] = self.model
            conn.executemany("INSERT OR IGNORE INTO mv_meta (key, value) VALUES (?, ?)", list(meta.items()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _validate(self, conn: sqlite3.Connection) -> None:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "mv_meta" not in tables or "mv_vectors" not in tables:
            msg = f"{self._describe()} is an SQLite database but not a multi-vector store of this package"
            raise MultiVectorStoreError(msg)
        meta = dict(conn.execute("SELECT key, value FROM mv_meta").fetchall())
        if meta.get("format") != _FORMAT:
            msg = f"{self._describe()} is an SQLite database but not a multi-vector store of this package"
            raise MultiVectorStoreError(msg)
        if meta.get("version") != _VERSION:
            msg = f"{self._describe()} has format version {meta.get('version')}, this package reads {_VERSION}"
            raise MultiVectorStoreError(msg)
        if int(meta["dim"]) != self.dim:
            msg = f"{self._describe()} was created with dim {meta['dim']}, but was opened with dim={self.dim}"
            raise MultiVectorStoreError(msg)
        if meta["dtype"] != self.dtype:
            msg = f"{self._describe()} was created with dtype {meta['dtype']}, but was opened with dtype={self.dtype!r}"
            raise MultiVectorStoreError(msg)
        self._stored_model = meta.get("model")
        self._stored_fingerprint = meta.get("model_fingerprint")
        self._stored_pool_factor = int(meta["pool_factor"]) if "pool_factor" in meta else None
        fingerprint = None
        if (
            self.model is not None
            and self._stored_model not in (None, self.model)
            and is_content_fingerprint(self._stored_fingerprint)
        ):
            # Another id or path than recorded: the same checkpoint moved or copied is still the same model.
            from haystack_integrations.common.multimodal_rag.backends.loading import checkpoint_fingerprint

            fingerprint = checkpoint_fingerprint(self.model)
        check_model_binding(
            self._describe(),
            self._stored_model,
            self.model,
            stored_fingerprint=self._stored_fingerprint,
            fingerprint=fingerprint,
        )
        if self.model is not None and self._stored_model is None and not self.read_only:
            self._record_model(conn, self.model, None)

    def _record_meta(self, conn: sqlite3.Connection, key: str, value: str) -> str:
        """Insert `key` unless another process recorded it first; returns the value the file holds."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT value FROM mv_meta WHERE key=?", (key,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO mv_meta (key, value) VALUES (?, ?)", (key, value))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return value if row is None else str(row[0])

    def _record_model(self, conn: sqlite3.Connection, model: str | None, fingerprint: str | None) -> None:
        # Another process may have recorded either first: what the file holds is checked again.
        stored_model = self._stored_model if model is None else self._record_meta(conn, "model", model)
        stored_fingerprint = (
            self._stored_fingerprint
            if fingerprint is None
            else self._record_meta(conn, "model_fingerprint", fingerprint)
        )
        check_model_binding(
            self._describe(),
            stored_model,
            model if model is not None else stored_model,
            stored_fingerprint=stored_fingerprint,
            fingerprint=fingerprint,
        )
        self._stored_model = stored_model
        self._stored_fingerprint = stored_fingerprint

    def bind_model(self, model: str, *, fingerprint: str | None = None) -> None:
        """
        Record the embedding model in the file, or refuse a different one.

        A file that recorded only a model id (written before fingerprints were recorded) is upgraded: the
        fingerprint is added on the first bind whose model id matches.

        :param model: Model id of the component writing or reading.
        :param fingerprint: `checkpoint_fingerprint` of that model: what is compared when the file recorded one
            too (so the same checkpoint under another path or id is accepted); `None`: the ids are compared.
        :raises MultiVectorStoreError: When the file holds vectors of another model.
        """
        self._ensure_initialised()
        record_model, record_fingerprint = model_binding_updates(
            self._describe(), self._stored_model, self._stored_fingerprint, model, fingerprint
        )
        if (record_model is not None or record_fingerprint is not None) and not self.read_only:
            self._record_model(self._conn(), record_model, record_fingerprint)

    def bind_pool_factor(self, pool_factor: int) -> None:
        """
        Record in the file the pooling factor the pages are made with, or refuse a different one.

        :param pool_factor: The factor of the component writing pages (1: no pooling).
        :raises MultiVectorStoreError: When the file holds pages pooled with another factor.
        """
        self._ensure_initialised()
        check_pool_factor_binding(self._describe(), self._stored_pool_factor, pool_factor)
        if self._stored_pool_factor is None and not self.read_only:
            stored = int(self._record_meta(self._conn(), "pool_factor", str(pool_factor)))
            check_pool_factor_binding(self._describe(), stored, pool_factor)
            self._stored_pool_factor = stored

    @property
    def pool_factor(self) -> int | None:
        """Pooling factor recorded in the file (1: none), `None` until a document embedder records it."""
        self._ensure_initialised()
        return self._stored_pool_factor

    @property
    def stored_model(self) -> str | None:
        """The model id recorded in the file, if any."""
        self._ensure_initialised()
        return self._stored_model

    @property
    def stored_model_fingerprint(self) -> str | None:
        """The model's content fingerprint recorded in the file, if any (`checkpoint_fingerprint`)."""
        self._ensure_initialised()
        return self._stored_fingerprint

    # --- serialization ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize the store's settings (the data stays in the file).

        :returns: The dictionary.
        """
        return default_to_dict(
            self, path=self.path, dim=self.dim, dtype=self.dtype, model=self.model, read_only=self.read_only
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SQLiteMultiVectorStore:
        """
        Deserialize (and open) a store.

        :param data: The dictionary from `to_dict`.
        :returns: The store.
        """
        return default_from_dict(cls, data)

    # --- data -----------------------------------------------------------------------------------------

    def write(self, vectors_by_id: Mapping[str, Any]) -> int:
        """
        Upsert one multi-vector per document id, in one transaction (writing an id again replaces it).

        :param vectors_by_id: `{document_id: (n_vectors, dim) array | tensor | list of lists}`.
        :returns: Number of multi-vectors written.
        :raises MultiVectorStoreError: On a bad shape, the wrong width, NaN/inf, or a read-only store.
        """
        if self.read_only:
            msg = f"{self._describe()} was opened read_only; it cannot be written"
            raise MultiVectorStoreError(msg)
        ids = check_ids(vectors_by_id.keys())
        rows = []
        for doc_id in ids:
            array = as_multivector(vectors_by_id[doc_id], dtype=self._np_dtype, dim=self.dim, doc_id=doc_id)
            rows.append((doc_id, int(array.shape[0]), array.tobytes()))
        if not rows:
            return 0
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT OR REPLACE INTO mv_vectors (id, n, data) VALUES (?, ?, ?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            self._changes = next(_CHANGE_SERIALS)
        # Move the committed pages into the main file now, so readers get them through mmap rather than
        # from the write-ahead log; PASSIVE never waits for readers.
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return len(rows)

    def get(self, ids: Iterable[str]) -> dict[str, np.ndarray]:
        """
        Fetch multi-vectors, with one copy: each blob is read straight from SQLite's memory-mapped pages into
        the bytes that back the returned array (SQLite's incremental blob I/O; a `SELECT data` would copy it
        twice, once into SQLite's row buffer and once into Python bytes).

        :param ids: Document ids.
        :returns: `{document_id: (n_vectors, dim) array}` (read-only) for the ids that have vectors, in the
            order asked.
        :raises MultiVectorStoreError: When a stored blob does not match its recorded shape (corruption).
        """
        ids = check_ids(ids)
        found: dict[str, np.ndarray] = {}
        conn = self._conn()
        unique = list(dict.fromkeys(ids))
        # One prepared point query per id is faster here than a large IN (...) list.
        for doc_id in unique:
            row = conn.execute("SELECT rowid, n FROM mv_vectors WHERE id = ?", (doc_id,)).fetchone()
            if row is None:
                continue
            rowid, n = row
            try:
                with conn.blobopen("mv_vectors", "data", rowid, readonly=True) as blob:
                    data = blob.read()
            except sqlite3.OperationalError:  # deleted by another connection between the two statements
                continue
            array = np.frombuffer(data, dtype=self._np_dtype)
            if array.size != n * self.dim:
                msg = (
                    f"{self._describe()}: the blob of document '{doc_id}' has {array.size} values, "
                    f"expected {n} x {self.dim} (the file is corrupt)"
                )
                raise MultiVectorStoreError(msg)
            found[doc_id] = array.reshape(n, self.dim)
        return found

    def score(self, query_vectors: Any, ids: Iterable[str], *, device: str | None = None) -> dict[str, float]:
        """
        Raw MaxSim of a query against the stored pages of `ids` (the package's MaxSim kernel).

        :param query_vectors: `(n_query_tokens, dim)` array, tensor or list of lists.
        :param ids: Document ids.
        :param device: `None` (the CPU kernel) or a torch device to score on, e.g. the ranker model's GPU.
        :returns: `{document_id: MaxSim}` for the ids that have vectors. A page holding NaN (which `write`
            refuses; only corruption gets it there) scores NaN.
        :raises MultiVectorStoreError: When the query is not 2-D, not finite, or of another width, or a blob
            is corrupt.
        """
        query = as_query(query_vectors, dim=self.dim, store_name=self._describe())
        if device is not None and not str(device).startswith("cpu"):
            return maxsim_by_id(query, self.get(ids), device=device)
        unique = list(dict.fromkeys(check_ids(ids)))
        found: list[str] = []

        def fetched() -> Iterator[list[np.ndarray]]:
            # The CPU kernel scores chunk i while this thread fetches chunk i + 1.
            for start in range(0, len(unique), _SCORE_CHUNK):
                vectors = self.get(unique[start : start + _SCORE_CHUNK])
                found.extend(vectors)
                yield list(vectors.values())

        scores = maxsim_chunks(query, fetched())
        return dict(zip(found, scores.tolist(), strict=True))

    def delete(self, ids: Iterable[str]) -> None:
        """
        Remove multi-vectors (unknown ids are ignored), in one transaction.

        :param ids: Document ids.
        :raises MultiVectorStoreError: On a read-only store.
        """
        if self.read_only:
            msg = f"{self._describe()} was opened read_only; it cannot be written"
            raise MultiVectorStoreError(msg)
        ids = check_ids(ids)
        if not ids:
            return
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for start in range(0, len(ids), _MAX_VARS):
                chunk = ids[start : start + _MAX_VARS]
                conn.execute(
                    f"DELETE FROM mv_vectors WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            self._changes = next(_CHANGE_SERIALS)

    def count(self) -> int:
        """Number of stored multi-vectors."""
        return int(self._conn().execute("SELECT COUNT(*) FROM mv_vectors").fetchone()[0])

    def revision(self) -> tuple[int, int, int]:
        """
        A value that changes whenever the stored vectors may have changed, as seen from the calling thread: a
        commit by any other connection (another thread, instance or process: SQLite's `PRAGMA data_version`),
        or a write or delete through this instance. Caches of fetched pages (`ColPaliRanker`'s device cache)
        compare it, always from the same thread, to know they are current. One small query (~10 us).

        :returns: An opaque, comparable value.
        """
        conn = self._conn()
        version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        return (self._local.serial, version, self._changes)

    def info(self) -> dict[str, Any]:
        """
        What the file records: format, version, dim, dtype, model, model_fingerprint, and the vector count.

        :returns: The metadata.
        """
        meta = dict(self._conn().execute("SELECT key, value FROM mv_meta").fetchall())
        return {**meta, "count": self.count(), "size_bytes": os.path.getsize(self.path)}

    def __repr__(self) -> str:
        return f"SQLiteMultiVectorStore({self.path!r}, dim={self.dim}, dtype={self.dtype!r})"
