from __future__ import annotations

import asyncio
import base64
import copy
import logging
from pathlib import Path

import numpy as np
import pytest
from haystack import Document, Pipeline
from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
from haystack.dataclasses import ByteStream, ImageContent
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.utils import ComponentDevice, Secret
from PIL import Image

from haystack_integrations.common.multimodal_rag.backends.loading import checkpoint_fingerprint
from haystack_integrations.common.multimodal_rag.errors import DocumentProcessingError, MediaError, ModelLoadError
from haystack_integrations.common.multimodal_rag.inputs import planning
from haystack_integrations.components.embedders.multimodal import (
    MultimodalDocumentEmbedder,
    MultimodalImageEmbedder,
    MultimodalTextEmbedder,
)
from tests.helpers import (
    image_bytes,
    make_corrupt_image,
    make_image,
    make_pdf,
    make_truncated_image,
    make_truncated_pdf,
)


def _embedder(model: str, **kwargs) -> MultimodalDocumentEmbedder:
    kwargs.setdefault("progress_bar", False)
    return MultimodalDocumentEmbedder(model, **kwargs)


def test_each_modality_gets_its_tower_and_meta(dual_encoder: str, corpus_dir: Path) -> None:
    docs = [
        Document(content="a bar chart of quarterly revenue"),
        Document(meta={"file_path": str(corpus_dir / "red.png")}),
        Document(blob=ByteStream(image_bytes(), mime_type="image/png")),
        Document(meta={"file_path": str(corpus_dir / "report.pdf"), "page_number": 2}),
    ]
    out = _embedder(dual_encoder).run(docs)
    assert out["failed_documents"] == []
    got = out["documents"]
    assert [d.meta["modality"] for d in got] == ["text", "image", "image", "page"]
    assert [d.meta["embedding_source"]["type"] for d in got] == ["text", "image", "image", "page"]
    assert got[1].meta["embedding_source"]["file_path_meta_field"] == "file_path"
    assert got[2].meta["embedding_source"]["file_path_meta_field"] is None
    dims = {len(d.embedding) for d in got}
    assert len(dims) == 1
    for d in got:
        assert np.linalg.norm(d.embedding) == pytest.approx(1.0, abs=1e-5)
    # PDF pages differ in colour, so different pages give different vectors.
    page1 = _embedder(dual_encoder).run(
        [Document(meta={"file_path": str(corpus_dir / "report.pdf"), "page_number": 1})]
    )
    assert not np.allclose(page1["documents"][0].embedding, got[3].embedding)


def test_text_string_embedding_equals_text_document_embedding(dual_encoder: str) -> None:
    text = "which slide shows the sales forecast"
    doc_vec = _embedder(dual_encoder).run(
        [Document(content=text), Document(content="another, longer text in the batch")]
    )
    query_vec = MultimodalTextEmbedder(dual_encoder).run(text=text)["embedding"]
    np.testing.assert_allclose(query_vec, doc_vec["documents"][0].embedding, rtol=1e-5, atol=1e-6)


def test_mixed_batches_keep_input_order(tiny_siglip: str, corpus_dir: Path) -> None:
    docs = []
    for i in range(7):
        docs.append(Document(content=f"text number {i}"))
        docs.append(Document(meta={"file_path": str(corpus_dir / "report.pdf"), "page_number": 1 + i % 3, "n": i}))
    out = _embedder(tiny_siglip, batch_size=3).run(docs)
    assert [d.id for d in out["documents"]] == [d.id for d in docs]
    # Each output equals the embedding of the same document embedded alone.
    for i in (0, 3, 9):
        alone = _embedder(tiny_siglip).run([docs[i]])["documents"][0]
        np.testing.assert_allclose(out["documents"][i].embedding, alone.embedding, rtol=1e-4, atol=1e-5)


def test_input_documents_are_not_mutated(tiny_siglip: str, corpus_dir: Path) -> None:
    docs = [Document(content="hello"), Document(meta={"file_path": str(corpus_dir / "red.png")})]
    before = copy.deepcopy(docs)
    _embedder(tiny_siglip).run(docs)
    assert docs == before


def test_images_are_decoded_one_batch_at_a_time(
    tiny_siglip: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(10):
        make_image(tmp_path / f"img{i}.png", color="red" if i % 2 else "blue")
    docs = [Document(meta={"file_path": str(tmp_path / f"img{i}.png")}) for i in range(10)]
    seen_batches: list[int] = []
    real_load = planning.load_images

    def spy(sources, **kwargs):
        seen_batches.append(len(sources))
        return real_load(sources, **kwargs)

    monkeypatch.setattr(planning, "load_images", spy)
    out = _embedder(tiny_siglip, batch_size=4).run(docs)
    assert len(out["documents"]) == 10
    assert seen_batches == [4, 4, 2]


def _bad_documents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[Document, str]]:
    """Each bad input with a fragment of the reason it must be reported with."""
    root = tmp_path / "root"
    root.mkdir()
    make_image(tmp_path / "outside.png")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.docx").write_bytes(b"PK\x03\x04 not really a docx")
    make_corrupt_image(root / "corrupt.png")
    make_truncated_image(root / "truncated.png")
    make_truncated_pdf(root / "truncated.pdf")
    make_pdf(root / "three.pdf", pages=3)
    make_image(root / "big.png", size=(120, 120))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    return {
        "missing": (Document(id="missing", meta={"file_path": "nope.png"}), "does not exist"),
        "corrupt": (Document(id="corrupt", meta={"file_path": "corrupt.png"}), "corrupt"),
        "truncated_image": (Document(id="truncated_image", meta={"file_path": "truncated.png"}), "truncated"),
        "truncated_pdf": (Document(id="truncated_pdf", meta={"file_path": "truncated.pdf", "page_number": 1}), "PDF"),
        "page_beyond": (Document(id="page_beyond", meta={"file_path": "three.pdf", "page_number": 7}), "beyond"),
        "traversal": (Document(id="traversal", meta={"file_path": "../outside.png"}), "outside root_path"),
        "bomb": (Document(id="bomb", meta={"file_path": "big.png"}), "decompression-bomb"),
        "zero_bytes": (Document(id="zero_bytes", meta={"file_path": "empty.png"}), "zero bytes"),
        "mime": (Document(id="mime", meta={"file_path": "notes.docx"}), "unsupported MIME type"),
        "nothing": (Document(id="nothing", meta={"title": "no content"}), "neither text content nor an image"),
        "empty_blob": (Document(id="empty_blob", blob=ByteStream(b"", mime_type="image/png")), "zero bytes"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "corrupt",
        "truncated_image",
        "truncated_pdf",
        "page_beyond",
        "traversal",
        "bomb",
        "zero_bytes",
        "mime",
        "nothing",
        "empty_blob",
    ],
)
def test_bad_input_is_reported_with_its_document_id_in_both_modes(
    tiny_siglip: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    bad_doc, reason = _bad_documents(tmp_path, monkeypatch)[case]
    good = Document(content="a good text document")
    root = str(tmp_path / "root")

    with pytest.raises(DocumentProcessingError) as info:
        _embedder(tiny_siglip, root_path=root).run([good, bad_doc])
    assert f"'{bad_doc.id}'" in str(info.value)
    assert reason in str(info.value)
    assert info.value.failures[0][0] == bad_doc.id

    out = _embedder(tiny_siglip, root_path=root, on_error="skip").run([good, bad_doc])
    assert [d.id for d in out["documents"]] == [good.id]
    assert [d.id for d in out["failed_documents"]] == [bad_doc.id]
    assert reason in out["failed_documents"][0].meta["embedding_error"]
    assert out["failed_documents"][0].embedding is None


def test_one_error_names_every_failing_document_and_skip_loses_nothing(
    tiny_siglip: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = _bad_documents(tmp_path, monkeypatch)
    make_image(tmp_path / "root" / "fine.png", size=(40, 40))
    docs = [Document(content="first"), Document(meta={"file_path": "fine.png"})]
    docs += [doc for doc, _ in bad.values()]
    root = str(tmp_path / "root")

    with pytest.raises(DocumentProcessingError) as info:
        _embedder(tiny_siglip, root_path=root).run(docs)
    message = str(info.value)
    for doc, reason in bad.values():
        assert f"'{doc.id}'" in message
        assert reason in message
    assert len(info.value.failures) == len(bad)

    out = _embedder(tiny_siglip, root_path=root, on_error="skip", batch_size=2).run(docs)
    assert len(out["documents"]) + len(out["failed_documents"]) == len(docs)
    assert {d.id for d in out["failed_documents"]} == {doc.id for doc, _ in bad.values()}
    assert all(d.meta["embedding_error"] for d in out["failed_documents"])


def test_declared_unknown_modality_is_an_error(tiny_siglip: str) -> None:
    doc = Document(id="odd", content="x", meta={"modality": "video"})
    with pytest.raises(DocumentProcessingError, match="unknown modality 'video'"):
        _embedder(tiny_siglip).run([doc])


def test_text_document_pointing_at_a_text_file_is_text(tiny_siglip: str, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("some notes")
    doc = Document(content="some notes", meta={"file_path": str(tmp_path / "notes.txt")})
    out = _embedder(tiny_siglip).run([doc])
    assert out["documents"][0].meta["modality"] == "text"


def test_single_page_pdf_needs_no_page_number_but_multi_page_does(tiny_siglip: str, tmp_path: Path) -> None:
    make_pdf(tmp_path / "one.pdf", pages=1)
    make_pdf(tmp_path / "two.pdf", pages=2)
    out = _embedder(tiny_siglip, on_error="skip").run(
        [
            Document(id="one", meta={"file_path": str(tmp_path / "one.pdf")}),
            Document(id="two", meta={"file_path": str(tmp_path / "two.pdf")}),
        ]
    )
    assert [d.id for d in out["documents"]] == ["one"]
    assert "has 2 pages" in out["failed_documents"][0].meta["embedding_error"]


def test_image_embedder_accepts_path_bytes_and_image_content(tiny_siglip: str, corpus_dir: Path) -> None:
    path = corpus_dir / "red.png"
    as_doc = _embedder(tiny_siglip).run([Document(meta={"file_path": str(path)})])["documents"][0].embedding
    embedder = MultimodalImageEmbedder(tiny_siglip)
    from_path = embedder.run(image=str(path))["embedding"]
    from_bytes = embedder.run(image=ByteStream(path.read_bytes(), mime_type="image/png"))["embedding"]
    content = ImageContent(base64_image=base64.b64encode(path.read_bytes()).decode(), mime_type="image/png")
    from_content = embedder.run(image=content)["embedding"]
    for vec in (from_path, from_bytes, from_content):
        np.testing.assert_allclose(vec, as_doc, rtol=1e-5, atol=1e-6)


def test_image_embedder_reports_bad_images_clearly(tiny_siglip: str, tmp_path: Path) -> None:
    make_corrupt_image(tmp_path / "bad.png")
    embedder = MultimodalImageEmbedder(tiny_siglip, root_path=str(tmp_path))
    with pytest.raises(MediaError, match="corrupt"):
        embedder.run(image="bad.png")
    with pytest.raises(MediaError, match="outside root_path"):
        embedder.run(image="../../etc/passwd")
    with pytest.raises(TypeError, match="file path, a ByteStream or an ImageContent"):
        embedder.run(image=42)  # type: ignore[arg-type]


def test_image_embedder_given_a_text_query_points_to_the_text_embedder(tmp_path: Path) -> None:
    # Before: "file 'a chart of revenue' does not exist ...; it is a bare file name, as Haystack's converters store
    # by default (store_full_path=False): set root_path ...", which sends the user after the wrong fix.
    embedder = MultimodalImageEmbedder("/no/such/model", root_path=str(tmp_path))
    for text in ("a chart of revenue", "revenue"):
        with pytest.raises(MediaError, match="to embed a text query, use MultimodalTextEmbedder") as info:
            embedder.run(image=text)
        assert "root_path" not in str(info.value)  # the bare-file-name advice does not apply to a query text
    # A missing file named like one (also with spaces, as cameras and screenshots name them), or a path, keeps the
    # plain message.
    for path in ("chart.png", "IMG 0001.jpg", "Screenshot 2024-05-01 at 10.12.33.png", "scan 2.pdf", "photos/query"):
        with pytest.raises(MediaError, match=r"does not exist|outside root_path") as info:
            embedder.run(image=path)
        assert "MultimodalTextEmbedder" not in str(info.value)
    with pytest.raises(MediaError, match=r"outside root_path") as info:
        embedder.run(image="../../outside")
    assert "MultimodalTextEmbedder" not in str(info.value)


def test_text_embedder_rejects_empty_and_non_string_input(tiny_siglip: str) -> None:
    embedder = MultimodalTextEmbedder(tiny_siglip)
    with pytest.raises(ValueError, match="empty query"):
        embedder.run(text="   ")
    with pytest.raises(TypeError, match="expects the query as a string"):
        embedder.run(text=[Document(content="x")])  # type: ignore[arg-type]


def test_document_embedder_rejects_a_string() -> None:
    with pytest.raises(TypeError, match="list of Documents"):
        MultimodalDocumentEmbedder("unused").run("a string")  # type: ignore[arg-type]


def test_invalid_parameters_are_rejected_at_init() -> None:
    with pytest.raises(ValueError, match="on_error"):
        MultimodalDocumentEmbedder("m", on_error="ignore")
    with pytest.raises(ValueError, match="batch_size"):
        MultimodalDocumentEmbedder("m", batch_size=0)


def test_unloadable_model_fails_in_warm_up_with_model_name_and_fix(tmp_path: Path) -> None:
    embedder = MultimodalTextEmbedder(str(tmp_path / "no-such-model-dir"))
    with pytest.raises(ModelLoadError) as info:
        embedder.warm_up()
    assert "no-such-model-dir" in str(info.value)
    offline = MultimodalDocumentEmbedder("some-org/model-that-is-not-cached", local_files_only=True)
    with pytest.raises(ModelLoadError) as info:
        offline.warm_up()
    message = str(info.value)
    assert "some-org/model-that-is-not-cached" in message
    assert "local directory path" in message


def test_a_model_without_feature_methods_is_refused(tiny_vlm: str) -> None:
    with pytest.raises(ModelLoadError, match="get_text_features/get_image_features"):
        MultimodalTextEmbedder(tiny_vlm).warm_up()


def test_warm_up_is_idempotent_and_shares_the_encoder(tiny_siglip: str) -> None:
    a = MultimodalTextEmbedder(tiny_siglip)
    b = MultimodalDocumentEmbedder(tiny_siglip)
    a.warm_up()
    first = a._encoder
    a.warm_up()
    b.warm_up()
    assert a._encoder is first
    assert b._encoder is first


@pytest.mark.parametrize("cls", [MultimodalDocumentEmbedder, MultimodalTextEmbedder, MultimodalImageEmbedder])
def test_to_dict_from_dict_round_trips_every_parameter(cls: type) -> None:
    kwargs = {
        "device": ComponentDevice.from_str("cpu"),
        "token": Secret.from_env_var("MY_HF_TOKEN", strict=False),
        "normalize_embeddings": False,
        "local_files_only": True,
        "model_kwargs": {"dtype": "torch.float32"},
    }
    if cls is MultimodalDocumentEmbedder:
        kwargs |= {
            "file_path_meta_field": "path",
            "root_path": "/data",
            "batch_size": 3,
            "progress_bar": False,
            "on_error": "skip",
        }
    if cls is MultimodalImageEmbedder:
        kwargs |= {"root_path": "/data"}
    component = cls("org/some-model", **kwargs)
    data = component.to_dict()
    assert data["type"] == f"{cls.__module__}.{cls.__name__}"
    assert data["init_parameters"]["model"] == "org/some-model"
    restored = cls.from_dict(data)
    assert restored.to_dict() == data
    for name, value in kwargs.items():
        assert getattr(restored, name) == value


def test_pipeline_with_embedders_survives_dumps_and_loads(tiny_siglip: str, corpus_dir: Path) -> None:
    store = InMemoryDocumentStore(embedding_similarity_function="cosine")
    docs = _embedder(tiny_siglip).run(
        [Document(content="a red square"), Document(meta={"file_path": str(corpus_dir / "blue.jpg")})]
    )["documents"]
    store.write_documents(docs)

    pipe = Pipeline()
    pipe.add_component("embedder", MultimodalTextEmbedder(tiny_siglip))
    pipe.add_component("retriever", InMemoryEmbeddingRetriever(store, top_k=2))
    pipe.connect("embedder.embedding", "retriever.query_embedding")
    before = pipe.run({"embedder": {"text": "a red square"}})

    restored = Pipeline.loads(pipe.dumps())
    after = restored.run({"embedder": {"text": "a red square"}})
    assert [d.id for d in after["retriever"]["documents"]] == [d.id for d in before["retriever"]["documents"]]
    assert {d.meta["modality"] for d in after["retriever"]["documents"]} == {"text", "image"}

    indexing = Pipeline()
    indexing.add_component("embedder", _embedder(tiny_siglip, on_error="skip"))
    restored_indexing = Pipeline.loads(indexing.dumps())
    out = restored_indexing.run({"embedder": {"documents": [Document(content="hi"), Document(id="x", meta={})]}})
    assert len(out["embedder"]["documents"]) == 1
    assert [d.id for d in out["embedder"]["failed_documents"]] == ["x"]


def test_pipeline_run_async_runs_the_embedders_like_run(tiny_siglip: str, corpus_dir: Path) -> None:
    # No run_async of our own: Haystack's Pipeline.run_async runs sync components in a worker thread
    # (asyncio.to_thread), which keeps the tracing context.
    docs = [Document(content="async text"), Document(meta={"file_path": str(corpus_dir / "red.png")})]
    sync = _embedder(tiny_siglip).run(docs)
    pipe = Pipeline()
    pipe.add_component("embedder", _embedder(tiny_siglip))
    pipe.add_component("text", MultimodalTextEmbedder(tiny_siglip))
    pipe.add_component("image", MultimodalImageEmbedder(tiny_siglip))
    result = asyncio.run(
        pipe.run_async(
            {
                "embedder": {"documents": docs},
                "text": {"text": "hello"},
                "image": {"image": str(corpus_dir / "red.png")},
            }
        )
    )
    assert [d.embedding for d in result["embedder"]["documents"]] == [d.embedding for d in sync["documents"]]
    assert len(result["text"]["embedding"]) == len(sync["documents"][0].embedding)
    np.testing.assert_allclose(result["image"]["embedding"], sync["documents"][1].embedding, rtol=1e-5, atol=1e-6)


def test_progress_bar_can_be_silenced(tiny_siglip: str, capsys: pytest.CaptureFixture[str]) -> None:
    _embedder(tiny_siglip, progress_bar=False).run([Document(content="quiet")])
    assert "MultimodalDocumentEmbedder" not in capsys.readouterr().err
    _embedder(tiny_siglip, progress_bar=True).run([Document(content="loud")])
    assert "MultimodalDocumentEmbedder" in capsys.readouterr().err


def test_empty_input_returns_empty_outputs_without_loading(tmp_path: Path) -> None:
    embedder = MultimodalDocumentEmbedder(str(tmp_path / "never-loaded"))
    assert embedder.run([]) == {"documents": [], "failed_documents": []}
    assert embedder._encoder is None


def test_an_image_that_only_fails_when_decoded_joins_the_single_error(
    tiny_siglip: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A JPEG cut near its end passes Pillow's header and integrity check and fails only when decoded.
    data = image_bytes(size=(64, 64), color="green", fmt="JPEG")
    (tmp_path / "late.jpg").write_bytes(data[: int(len(data) * 0.9)])
    make_corrupt_image(tmp_path / "early.png")
    make_image(tmp_path / "fine.png")
    docs = [
        Document(id="fine", meta={"file_path": str(tmp_path / "fine.png")}),
        Document(id="late", meta={"file_path": str(tmp_path / "late.jpg")}),
        Document(id="early", meta={"file_path": str(tmp_path / "early.png")}),
    ]
    decodes: list[int] = []
    real_load = planning.load_images

    def spy(sources, **kwargs):
        decodes.append(len(sources))
        return real_load(sources, **kwargs)

    monkeypatch.setattr(planning, "load_images", spy)
    with pytest.raises(DocumentProcessingError) as info:
        _embedder(tiny_siglip, batch_size=1).run(docs)
    assert [doc_id for doc_id, _ in info.value.failures] == ["late", "early"]
    assert "truncated" in str(info.value)

    decodes.clear()
    out = _embedder(tiny_siglip, on_error="skip", batch_size=1).run(docs)
    assert [d.id for d in out["documents"]] == ["fine"]
    assert {d.id for d in out["failed_documents"]} == {"late", "early"}
    assert decodes == [1, 1]  # each readable-looking image decoded once, in its batch


def test_duplicate_ids_in_one_batch_are_named_or_returned_as_failures(tiny_siglip: str) -> None:
    docs = [
        Document(id="a", content="first text"),
        Document(id="b", content="second text"),
        Document(id="a", content="a different text with the same id"),
        Document(id="a", content="and a third"),
    ]
    with pytest.raises(DocumentProcessingError) as info:
        _embedder(tiny_siglip).run(docs)
    assert [doc_id for doc_id, _ in info.value.failures] == ["a", "a"]
    assert "duplicate document id" in str(info.value)
    assert "position 0" in str(info.value)

    out = _embedder(tiny_siglip, on_error="skip").run(docs)
    assert [d.content for d in out["documents"]] == ["first text", "second text"]
    assert [d.content for d in out["failed_documents"]] == ["a different text with the same id", "and a third"]
    assert all("duplicate document id" in d.meta["embedding_error"] for d in out["failed_documents"])
    assert len(out["documents"]) + len(out["failed_documents"]) == len(docs)


def test_truncated_texts_are_named_in_a_warning(tiny_siglip: str, caplog: pytest.LogCaptureFixture) -> None:
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    docs = [Document(id="short", content="a short note"), Document(id="long", content=long_text)]
    with caplog.at_level(logging.WARNING):
        out = _embedder(tiny_siglip).run(docs)
    assert len(out["documents"]) == 2
    assert "'long'" in caplog.text
    assert "'short'" not in caplog.text
    assert "truncated" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _embedder(tiny_siglip).run([Document(id="short", content="a short note")])
        MultimodalTextEmbedder(tiny_siglip).run(text="a short query")
    assert "truncated" not in caplog.text
    assert "tokens" not in caplog.text

    with caplog.at_level(logging.WARNING):
        MultimodalTextEmbedder(tiny_siglip).run(text=long_text)
    assert "only its beginning is embedded" in caplog.text


def test_every_embedded_document_records_its_model(tiny_siglip: str, corpus_dir: Path) -> None:
    docs = [Document(content="a text"), Document(meta={"file_path": str(corpus_dir / "red.png")})]
    out = _embedder(tiny_siglip, normalize_embeddings=False).run(docs)["documents"]
    fingerprint = checkpoint_fingerprint(tiny_siglip)
    assert fingerprint.startswith("sha256:")
    for doc in out:
        assert doc.meta["embedding_model"] == tiny_siglip
        assert doc.meta["embedding_model_fingerprint"] == fingerprint
        assert doc.meta["embedding_dimension"] == len(doc.embedding)
        assert doc.meta["embedding_normalized"] is False
