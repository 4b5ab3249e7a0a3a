"""
Loaders of evaluation datasets: BEIR-style folders, locally exported ViDoRe datasets, caption-as-query.

BEIR-style folder (what `load_beir_dataset` reads)::

    my_dataset/
      corpus.jsonl      {"_id": "d1", "text": "Revenue grew 8% in Q3."}
                        {"_id": "d2", "path": "images/chart.png", "caption": "revenue by quarter"}
                        {"_id": "d3", "path": "reports/annual.pdf", "page_number": 4, "modality": "page"}
      queries.jsonl     {"_id": "q1", "text": "Which quarter had the highest revenue?"}
                        {"_id": "q2", "image": "queries/photo.jpg"}          (query-by-image)
      qrels/test.tsv    query-id<TAB>corpus-id<TAB>score   (header line, then graded relevance, e.g. 0/1/2)

Corpus lines: `_id` and either `text` (BEIR's optional `title` is prepended) or `path` (alias `image`,
`file_path`) of an image or PDF, relative to the folder; `page_number` (1-based) for a PDF page; optional
`modality` (`text`/`image`/`page`, checked against the source); every other key (e.g. `caption`) goes to the
document's meta, as does a `meta` object.

Locally exported ViDoRe v1 dataset (what `load_vidore_dataset` reads): a folder with `vidore.jsonl`, one line per
row of the Hugging Face dataset, with the columns `query`, `image` (path of the row's image, saved next to it)
and `image_filename`, plus any other scalar columns (`page`, `source`, ...). Export one (on a machine with
network access) with::

    import json, pathlib
    from datasets import load_dataset

    ds = load_dataset("vidore/docvqa_test_subsampled", split="test")
    out = pathlib.Path("data/docvqa_test_subsampled")
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "vidore.jsonl", "w", encoding="utf-8") as f:
        for i, row in enumerate(ds):
            image = f"images/{i:05d}.png"
            row.pop("image").save(out / image)
            scalars = {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool, type(None)))}
            f.write(json.dumps({**scalars, "image": image}) + "\\n")

The rows become the corpus and queries the way vidore-benchmark's `ViDoReEvaluatorQA` builds them
(illuin-tech/vidore-benchmark e0885ea, `vidore_evaluators/vidore_evaluator_qa.py`): one document per distinct
`image_filename`, queries deduplicated and `None` queries dropped (`utils/data_utils.py`,
`deduplicate_dataset_rows`), and each query's relevant document is the `image_filename` of its (last) row,
relevance 1.

Caption-as-query (`caption_queries`, `load_synthetic_dataset`): where no labels exist, every image or page
document with a caption or alt text in its meta becomes the relevant document (relevance 1) of a query whose
text is that caption; documents sharing one caption are all relevant to that one query.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from haystack import Document, logging

from haystack_integrations.common.multimodal_rag.errors import MediaError
from haystack_integrations.common.multimodal_rag.inputs.media import (
    MODALITY_META_KEY,
    PAGE_NUMBER_META_KEY,
    pdf_page_count,
    resolve_path,
)
from haystack_integrations.evaluation.multimodal_rag.dataset import (
    FILE_PATH_META_KEY,
    CorpusEntry,
    QueryEntry,
    RetrievalDataset,
)

logger = logging.getLogger(__name__)

#: Meta keys read as captions by `caption_queries`, first present wins.
CAPTION_META_KEYS = ("caption", "alt_text", "alt")
VIDORE_FILE = "vidore.jsonl"
_PATH_KEYS = ("path", "image", FILE_PATH_META_KEY)
_CORPUS_KEYS = {"_id", "text", "title", "page_number", "modality", "meta", *_PATH_KEYS}


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                msg = f"{path}:{line_no}: not a JSON line ({e})"
                raise ValueError(msg) from e
            if not isinstance(row, dict):
                msg = f"{path}:{line_no}: expected a JSON object"
                raise ValueError(msg)
            yield line_no, row


def _check_file(root: Path, path: str, where: str) -> None:
    try:
        resolved = resolve_path(path, root)
    except MediaError as e:
        msg = f"{where}: {e}"
        raise ValueError(msg) from e
    if not resolved.is_file():
        msg = f"{where}: file '{path}' does not exist in {root}"
        raise ValueError(msg)


def _check_page(root: Path, entry: CorpusEntry, where: str) -> None:
    if entry.path is None or entry.page_number is None:
        return
    pages = pdf_page_count(resolve_path(entry.path, root))
    if entry.page_number > pages:
        msg = f"{where}: page_number {entry.page_number} but '{entry.path}' has {pages} page(s)"
        raise ValueError(msg)


def _corpus_entry(row: dict[str, Any], root: Path, where: str) -> CorpusEntry:
    doc_id = row.get("_id")
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    paths = [row[k] for k in _PATH_KEYS if row.get(k) is not None]
    if len(paths) > 1:
        msg = f"{where}: give one of {_PATH_KEYS}, not several"
        raise ValueError(msg)
    text = row.get("text")
    title = row.get("title")
    if isinstance(text, str) and isinstance(title, str) and title.strip():
        text = f"{title}\n{text}"
    meta = dict(row.get("meta") or {})
    meta.update({k: v for k, v in row.items() if k not in _CORPUS_KEYS})
    try:
        entry = CorpusEntry.create(
            doc_id,  # type: ignore[arg-type]
            text=text,
            path=str(paths[0]) if paths else None,
            page_number=row.get("page_number"),
            modality=row.get("modality"),
            meta=meta,
        )
    except ValueError as e:
        msg = f"{where}: {e}"
        raise ValueError(msg) from e
    if entry.path is not None:
        _check_file(root, entry.path, where)
        _check_page(root, entry, where)
    return entry


def read_corpus(path: str | Path, *, root: str | Path | None = None) -> list[CorpusEntry]:
    """
    Read a BEIR-style `corpus.jsonl` (see the module docstring for the fields).

    :param path: The JSON-lines file.
    :param root: Folder paths are relative to; defaults to the file's folder.
    :returns: The entries, in file order.
    :raises ValueError: On a malformed line, a missing file, a PDF page out of range.
    """
    file = Path(path)
    base = Path(root) if root is not None else file.parent
    return [_corpus_entry(row, base, f"{file}:{line_no}") for line_no, row in _read_jsonl(file)]


def _read_queries(path: Path, root: Path) -> list[QueryEntry]:
    queries = []
    for line_no, row in _read_jsonl(path):
        where = f"{path}:{line_no}"
        query_id = row.get("_id")
        if isinstance(query_id, int) and not isinstance(query_id, bool):
            query_id = str(query_id)
        try:
            query = QueryEntry(id=query_id, text=row.get("text"), image=row.get("image"))  # type: ignore[arg-type]
        except ValueError as e:
            msg = f"{where}: {e}"
            raise ValueError(msg) from e
        if query.image is not None:
            _check_file(root, query.image, where)
        queries.append(query)
    return queries


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """
    Read a BEIR qrels file: tab-separated `query-id corpus-id score` with a header line.

    :param path: The TSV file.
    :returns: `{query_id: {doc_id: relevance}}`.
    :raises ValueError: On a malformed line or a non-integer score.
    """
    file = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    with file.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        for line_no, fields in enumerate(reader, start=1):
            if not fields or not "".join(fields).strip():
                continue
            if line_no == 1 and fields[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue
            if len(fields) != 3:
                msg = f"{file}:{line_no}: expected 3 tab-separated fields (query-id, corpus-id, score)"
                raise ValueError(msg)
            query_id, doc_id, score = (field.strip() for field in fields)
            try:
                relevance = int(float(score))
            except ValueError as e:
                msg = f"{file}:{line_no}: score {score!r} is not a number"
                raise ValueError(msg) from e
            if relevance != float(score):
                msg = f"{file}:{line_no}: score {score!r} is not an integer relevance grade"
                raise ValueError(msg)
            qrels.setdefault(query_id, {})[doc_id] = relevance
    return qrels


def load_beir_dataset(path: str | Path, *, split: str = "test") -> RetrievalDataset:
    """
    Load a BEIR-style folder: `corpus.jsonl`, `queries.jsonl` and `qrels/<split>.tsv`.

    Only the queries that have qrels in the split are kept.

    :param path: The dataset folder.
    :param split: Name of the qrels file in `qrels/`.
    :returns: The dataset, with `root` = the folder.
    :raises FileNotFoundError: When one of the three files is missing.
    :raises ValueError: On malformed content (the message names the file and line).
    """
    root = Path(path).expanduser().resolve()
    files = [root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / f"{split}.tsv"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        msg = f"BEIR-style dataset '{root}' lacks {', '.join(missing)}"
        raise FileNotFoundError(msg)
    corpus = read_corpus(files[0], root=root)
    qrels = read_qrels(files[2])
    queries = [q for q in _read_queries(files[1], root) if q.id in qrels]
    return RetrievalDataset(name=root.name, root=root, corpus=corpus, queries=queries, qrels=qrels)


def _vidore_doc_id(filename: str) -> str:
    return re.sub(r"\s+", "_", filename.strip())


def load_vidore_dataset(path: str | Path) -> RetrievalDataset:
    """
    Load a ViDoRe v1 (QA-format) dataset exported locally as `vidore.jsonl` + image files (see the module docstring
    for the export recipe and for how rows become corpus, queries and qrels, following vidore-benchmark).

    Document ids are the `image_filename`s (whitespace replaced by `_`); query ids are `q0`, `q1`, ... in order of
    first appearance; `page` and the other scalar columns go to the documents' meta.

    :param path: The folder holding `vidore.jsonl`.
    :returns: The dataset, with `root` = the folder.
    :raises FileNotFoundError: When `vidore.jsonl` is missing.
    :raises ValueError: On a row without `image` or `image_filename`, or a missing image file.
    """
    root = Path(path).expanduser().resolve()
    file = root / VIDORE_FILE
    if not file.is_file():
        msg = f"'{root}' has no {VIDORE_FILE} (export the dataset as the module docstring shows)"
        raise FileNotFoundError(msg)
    corpus: dict[str, CorpusEntry] = {}
    query_ids: dict[str, str] = {}
    relevant: dict[str, str] = {}
    for line_no, row in _read_jsonl(file):
        where = f"{file}:{line_no}"
        image, filename = row.get("image"), row.get("image_filename")
        if not isinstance(image, str) or not isinstance(filename, str) or not filename.strip():
            msg = f"{where}: a ViDoRe row needs 'image' (a file path) and 'image_filename'"
            raise ValueError(msg)
        doc_id = _vidore_doc_id(filename)
        if doc_id not in corpus:
            meta = {k: v for k, v in row.items() if k not in ("query", "image", "answer")}
            try:
                corpus[doc_id] = CorpusEntry.create(doc_id, path=image, modality="image", meta=meta)
            except ValueError as e:
                msg = f"{where}: {e}"
                raise ValueError(msg) from e
            _check_file(root, image, where)
        query = row.get("query")
        if isinstance(query, str) and query.strip():
            query_ids.setdefault(query, f"q{len(query_ids)}")
            # vidore-benchmark maps a query to the image_filename of its LAST row (a dict comprehension).
            relevant[query] = doc_id
    queries = [QueryEntry(id=qid, text=text) for text, qid in query_ids.items()]
    qrels = {query_ids[text]: {doc_id: 1} for text, doc_id in relevant.items()}
    return RetrievalDataset(name=root.name, root=root, corpus=list(corpus.values()), queries=queries, qrels=qrels)


def caption_queries(
    corpus: Sequence[CorpusEntry], *, caption_keys: Sequence[str] = CAPTION_META_KEYS
) -> tuple[list[QueryEntry], dict[str, dict[str, int]]]:
    """
    Build caption-as-query labels: each image or page document with a caption or alt text in its meta is the
    relevant document (relevance 1) of a query whose text is the caption.

    Documents with the same caption (after trimming) share one query, each of them relevant. Text documents are
    not used (their caption would be their content). Query ids are `cap0`, `cap1`, ... in corpus order.

    :param corpus: The corpus.
    :param caption_keys: Meta keys holding the caption, first present and non-empty wins.
    :returns: `(queries, qrels)`.
    :raises ValueError: When no image or page document has a caption.
    """
    by_caption: dict[str, dict[str, int]] = {}
    for entry in corpus:
        if entry.modality == "text":
            continue
        caption = next(
            (
                str(entry.meta[k]).strip()
                for k in caption_keys
                if isinstance(entry.meta.get(k), str) and entry.meta[k].strip()
            ),
            None,
        )
        if caption is not None:
            by_caption.setdefault(caption, {})[entry.id] = 1
    if not by_caption:
        msg = f"no image or page document has a caption in meta {list(caption_keys)}: cannot build caption queries"
        raise ValueError(msg)
    queries = [QueryEntry(id=f"cap{i}", text=caption) for i, caption in enumerate(by_caption)]
    qrels = {f"cap{i}": rels for i, rels in enumerate(by_caption.values())}
    return queries, qrels


def corpus_from_documents(documents: Sequence[Document]) -> list[CorpusEntry]:
    """
    Turn Haystack Documents (e.g. a converter's output, with captions added to their meta) into corpus entries.

    :param documents: Documents with text content, or a `file_path` in meta (and `page_number` for PDF pages).
    :returns: One entry per document, keeping its id and meta.
    :raises ValueError: On a document without text or file path.
    """
    entries = []
    for doc in documents:
        meta = {
            k: v for k, v in doc.meta.items() if k not in (FILE_PATH_META_KEY, PAGE_NUMBER_META_KEY, MODALITY_META_KEY)
        }
        path = doc.meta.get(FILE_PATH_META_KEY)
        entries.append(
            CorpusEntry.create(
                doc.id,
                text=doc.content if path is None else None,
                path=str(path) if path is not None else None,
                page_number=doc.meta.get(PAGE_NUMBER_META_KEY),
                modality=doc.meta.get(MODALITY_META_KEY),
                meta=meta,
            )
        )
    return entries


def load_synthetic_dataset(path: str | Path, *, caption_keys: Sequence[str] = CAPTION_META_KEYS) -> RetrievalDataset:
    """
    Load a folder's `corpus.jsonl` and label it with caption-as-query (`caption_queries`).

    :param path: The folder holding `corpus.jsonl`.
    :param caption_keys: Meta keys holding captions.
    :returns: The dataset, with `root` = the folder.
    :raises FileNotFoundError: When `corpus.jsonl` is missing.
    :raises ValueError: When no image or page document has a caption.
    """
    root = Path(path).expanduser().resolve()
    corpus = read_corpus(root / "corpus.jsonl", root=root)
    queries, qrels = caption_queries(corpus, caption_keys=caption_keys)
    return RetrievalDataset(name=f"{root.name}-captions", root=root, corpus=corpus, queries=queries, qrels=qrels)


DatasetFormat = Literal["auto", "beir", "vidore", "synthetic"]


def load_dataset(path: str | Path, *, format: DatasetFormat = "auto", split: str = "test") -> RetrievalDataset:
    """
    Load an evaluation dataset folder in any of the supported layouts.

    `"auto"` picks `vidore` when the folder has `vidore.jsonl`, `beir` when it has `queries.jsonl` and
    `qrels/<split>.tsv`, and `synthetic` (caption-as-query) when it has only `corpus.jsonl`.

    :param path: The dataset folder.
    :param format: `"auto"`, `"beir"`, `"vidore"` or `"synthetic"`.
    :param split: The qrels split of a BEIR-style folder.
    :returns: The dataset.
    :raises FileNotFoundError: When the folder matches no layout.
    :raises ValueError: On an unknown format or malformed content.
    """
    root = Path(path).expanduser()
    if format == "auto":
        if (root / VIDORE_FILE).is_file():
            format = "vidore"
        elif (root / "queries.jsonl").is_file() and (root / "qrels" / f"{split}.tsv").is_file():
            format = "beir"
        elif (root / "corpus.jsonl").is_file():
            format = "synthetic"
        else:
            msg = (
                f"'{root}' is not a dataset folder: expected {VIDORE_FILE} (ViDoRe export), or corpus.jsonl with "
                f"queries.jsonl and qrels/{split}.tsv (BEIR-style), or corpus.jsonl with captions (synthetic)"
            )
            raise FileNotFoundError(msg)
    if format == "beir":
        return load_beir_dataset(root, split=split)
    if format == "vidore":
        return load_vidore_dataset(root)
    if format == "synthetic":
        return load_synthetic_dataset(root)
    msg = f"format must be 'auto', 'beir', 'vidore' or 'synthetic', got {format!r}"
    raise ValueError(msg)
