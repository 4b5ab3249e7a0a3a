from __future__ import annotations

from pathlib import Path
from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict, logging
from haystack.document_stores.types import DocumentStore

from haystack_integrations.common.multimodal_rag.errors import MediaError
from haystack_integrations.common.multimodal_rag.inputs.media import resolve_path
from haystack_integrations.document_stores.multivector.protocol import MultiVectorStore, with_store_from_dict

logger = logging.getLogger(__name__)


def _check_documents(name: str, documents: Any) -> None:
    # Checked before anything is deleted: a None in place of the run's documents must not read as "nothing
    # was produced" (that would prune everything under the sources).
    if not isinstance(documents, (list, tuple)):
        msg = f"StaleDocumentPruner: {name} must be a list of Documents, got a {type(documents).__name__}"
        raise TypeError(msg)
    for position, document in enumerate(documents):
        if not isinstance(document, Document):
            msg = f"StaleDocumentPruner: {name}[{position}] is {document!r}, not a Document"
            raise TypeError(msg)


@component
class StaleDocumentPruner:
    """
    Keeps an index in step with its folders: deletes the documents of files that are gone or changed.

    `DocumentWriter` only adds and overwrites, so re-indexing a folder after deleting a file leaves that file's
    documents (and their page multi-vectors) in the index, where they keep being retrieved. After an indexing run,
    this component deletes every stored document whose `file_path` lies inside the `sources` that were indexed
    (a file, or anything under a directory) but that the run did not produce. That covers:

    - files deleted (or moved away) since the last run;
    - pages past the end of a PDF that got shorter, and the old chunks of an edited text file (their ids changed);
    - NOT files that only failed to be read in this run: connect the embedders' `failed_documents` to
      `failed_documents` and the stored documents of those files are kept (a locked file or a flaky mount must not
      wipe good entries); a failed document whose `file_path` is a directory keeps everything under it. With the
      default `on_error="raise"` a failing run stops before this component.

    Documents outside the `sources` (other folders indexed into the same store) and documents without a usable
    `file_path` are never touched. Paths are compared after resolving them like the converter does (against
    `root_path`, symlinks resolved), so use the converter's `root_path` and `file_path_meta_field`. A symlink
    inside `root_path` that points outside it is refused as a source, and stored documents under it are never
    pruned: the converter with the same `root_path` refuses those files too (the path-traversal guard).

    Cost: the store is read once per run through `filter_documents` (every document that has a `file_path`,
    with its vectors, when the store cannot project): run it once per indexing run, not per query.

    ### Usage example
    ```python
    from haystack.components.writers import DocumentWriter
    from haystack_integrations.components.writers.multimodal import StaleDocumentPruner

    pipeline.add_component("writer", DocumentWriter(document_store=store))
    pruner = StaleDocumentPruner(document_store=store, multivector_store=mv_store, root_path="data")
    pipeline.add_component("pruner", pruner)
    pipeline.connect("colpali_embedder.documents", "writer.documents")
    pipeline.connect("colpali_embedder.documents", "pruner.documents")
    sources = ["charts", "reports"]
    pipeline.run({"converter": {"sources": sources}, "pruner": {"sources": sources}})
    ```
    """

    def __init__(
        self,
        document_store: DocumentStore,
        *,
        multivector_store: MultiVectorStore | None = None,
        root_path: str | None = None,
        file_path_meta_field: str = "file_path",
        dry_run: bool = False,
    ) -> None:
        """
        Create the pruner.

        :param document_store: The store the indexing pipeline writes Documents to.
        :param multivector_store: The store of page multi-vectors (the ColPali embedder's), pruned by the same ids.
        :param root_path: The converter's `root_path`: stored relative paths and `sources` are resolved in it.
        :param file_path_meta_field: Meta key holding the file path (the converter's).
        :param dry_run: Report what would be deleted without deleting anything.
        """
        self.document_store = document_store
        self.multivector_store = multivector_store
        self.root_path = root_path
        self.file_path_meta_field = file_path_meta_field
        self.dry_run = dry_run

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize this component to a dictionary.

        :returns: The dictionary.
        """
        return default_to_dict(
            self,
            document_store=self.document_store,
            multivector_store=self.multivector_store.to_dict() if self.multivector_store is not None else None,
            root_path=self.root_path,
            file_path_meta_field=self.file_path_meta_field,
            dry_run=self.dry_run,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StaleDocumentPruner:
        """
        Deserialize a component from a dictionary.

        :param data: The dictionary from `to_dict`.
        :returns: The component.
        """
        return default_from_dict(cls, with_store_from_dict(data))

    def _resolve(self, value: Any) -> Path | None:
        try:
            return resolve_path(value, self.root_path, meta_field=self.file_path_meta_field)
        except MediaError:
            return None

    @component.output_types(deleted_ids=list[str], deleted_files=list[str])
    def run(
        self, documents: list[Document], sources: list[str | Path], failed_documents: list[Document] | None = None
    ) -> dict[str, Any]:
        """
        Delete the stored documents under `sources` that are not among `documents`.

        :param documents: Every document the indexing run produced and wrote (connect the writer's input).
        :param sources: The files and directories that were indexed (the converter's `sources`).
        :param failed_documents: Documents that failed in this run (the embedders' `failed_documents` with
            `on_error="skip"`): the stored documents of their files (of every file under a directory) are kept,
            not pruned.
        :returns: A dictionary with:
            - `deleted_ids`: ids of the deleted documents (would-be-deleted with `dry_run`), sorted;
            - `deleted_files`: their distinct stored `file_path`s, sorted.
        :raises TypeError: When `sources` is not a list (a bare string would scope every one-character path), or
            `documents` / `failed_documents` is not a list of Documents (the message names the input and item).
        :raises ValueError: When a source cannot be resolved (malformed, or outside `root_path`).
        """
        if not isinstance(sources, (list, tuple)):
            msg = f"StaleDocumentPruner: sources must be a list of paths, got a {type(sources).__name__}"
            raise TypeError(msg)
        _check_documents("documents", documents)
        if failed_documents is not None:
            _check_documents("failed_documents", failed_documents)
        scopes: list[Path] = []
        for position, source in enumerate(sources):
            try:
                scopes.append(resolve_path(source, self.root_path, name=f"source {position}"))
            except MediaError as e:
                msg = f"StaleDocumentPruner: {e}"
                raise MediaError(msg) from e
        if not scopes:
            return {"deleted_ids": [], "deleted_files": []}

        produced = {doc.id for doc in documents}
        unreadable = set()
        for failed in failed_documents or []:
            value = failed.meta.get(self.file_path_meta_field)
            path = self._resolve(value) if value is not None else None
            if path is not None:
                unreadable.add(path)
        stale: dict[str, str] = {}
        for stored in self.document_store.filter_documents():
            value = stored.meta.get(self.file_path_meta_field)
            if value is None or stored.id in produced:
                continue
            path = self._resolve(value)
            if path is None or path in unreadable or not unreadable.isdisjoint(path.parents):
                continue
            if any(path == scope or path.is_relative_to(scope) for scope in scopes):
                stale[stored.id] = str(value)

        deleted_ids = sorted(stale)
        deleted_files = sorted(set(stale.values()))
        if deleted_ids and not self.dry_run:
            self.document_store.delete_documents(deleted_ids)
            if self.multivector_store is not None:
                self.multivector_store.delete(deleted_ids)
        if deleted_ids:
            logger.info(
                "StaleDocumentPruner {verb} {count} document(s) of {files} file(s) that are gone or changed",
                verb="would delete" if self.dry_run else "deleted",
                count=len(deleted_ids),
                files=len(deleted_files),
            )
        return {"deleted_ids": deleted_ids, "deleted_files": deleted_files}
