from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from haystack import Document
from PIL import Image

from haystack_integrations.common.multimodal_rag.errors import (
    DocumentProcessingError,
    MultiVectorStoreError,
)
from haystack_integrations.common.multimodal_rag.inputs.planning import iter_image_batches, plan_documents
from haystack_integrations.components.embedders.colpali import ColPaliDocumentEmbedder
from haystack_integrations.components.embedders.colpali.document_embedder import document_has_multivector_field
from haystack_integrations.components.rankers.colpali import ColPaliRanker
from haystack_integrations.document_stores.multivector import InMemoryMultiVectorStore
from haystack_integrations.testing.multimodal_rag.tiny_colpali import FAMILIES
from tests.colpali_fixtures import embed_pages as _embed_pages
from tests.colpali_fixtures import page_docs as _page_docs
from tests.helpers import make_corrupt_image, make_image, make_tiff


@pytest.mark.parametrize("model_fixture", ["tiny_colqwen2", "tiny_colqwen2_5"])
def test_document_embedder_writes_one_multivector_per_page(
    request: pytest.FixtureRequest, model_fixture: str, pages_dir: Path
) -> None:
    model = request.getfixturevalue(model_fixture)
    store = InMemoryMultiVectorStore()
    text = Document(content="plain text passes through")
    docs = [text, *_page_docs(pages_dir)]
    before = copy.deepcopy(docs)
    out = _embed_pages(model, docs, store, batch_size=3)
    assert docs == before
    assert out["failed_documents"] == []
    assert out["documents"][0] is text
    assert store.count() == len(docs) - 1
    stored = store.get([d.id for d in docs])
    for doc in out["documents"][1:]:
        array = stored[doc.id]
        assert array.dtype == np.float16
        assert array.shape == (doc.meta["multivector_count"], 128)
        np.testing.assert_allclose(np.linalg.norm(array.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert out["documents"][1].meta["modality"] == "image"
    assert out["documents"][-1].meta["modality"] == "page"


def test_document_embedder_bad_input_raises_before_writing_and_skip_returns_it(
    tiny_colqwen2: str, pages_dir: Path
) -> None:
    make_corrupt_image(pages_dir / "broken.png")
    docs = [*_page_docs(pages_dir)[:2], Document(id="broken", meta={"file_path": str(pages_dir / "broken.png")})]
    docs.append(Document(id="beyond", meta={"file_path": str(pages_dir / "deck.pdf"), "page_number": 9}))
    store = InMemoryMultiVectorStore()
    with pytest.raises(DocumentProcessingError) as info:
        _embed_pages(tiny_colqwen2, docs, store)
    assert "'broken'" in str(info.value)
    assert "'beyond'" in str(info.value)
    assert store.count() == 0

    out = _embed_pages(tiny_colqwen2, docs, store, on_error="skip")
    assert len(out["documents"]) + len(out["failed_documents"]) == len(docs)
    assert {d.id for d in out["failed_documents"]} == {"broken", "beyond"}
    assert store.count() == 2


def test_pool_factor_shrinks_the_stored_vectors(tiny_colqwen2: str, pages_dir: Path) -> None:
    docs = _page_docs(pages_dir)[:3]
    full, pooled = InMemoryMultiVectorStore(), InMemoryMultiVectorStore()
    counts = [d.meta["multivector_count"] for d in _embed_pages(tiny_colqwen2, docs, full)["documents"]]
    pooled_counts = [
        d.meta["multivector_count"] for d in _embed_pages(tiny_colqwen2, docs, pooled, pool_factor=2)["documents"]
    ]
    for n, m in zip(counts, pooled_counts, strict=True):
        assert m <= n // 2 + 1
        assert m >= 1
    assert sum(a.nbytes for a in pooled.get([d.id for d in docs]).values()) < sum(
        a.nbytes for a in full.get([d.id for d in docs]).values()
    )


def test_store_of_another_model_is_refused_naming_both(
    tiny_colqwen2: str, tiny_colqwen2_5: str, pages_dir: Path
) -> None:
    store = InMemoryMultiVectorStore()
    _embed_pages(tiny_colqwen2, _page_docs(pages_dir)[:1], store)
    with pytest.raises(MultiVectorStoreError) as info:
        _embed_pages(tiny_colqwen2_5, _page_docs(pages_dir)[1:2], store)
    assert tiny_colqwen2 in str(info.value)
    assert tiny_colqwen2_5 in str(info.value)
    with pytest.raises(MultiVectorStoreError):
        ColPaliRanker(tiny_colqwen2_5, multivector_store=store).warm_up()


def test_store_with_another_dim_is_refused(tiny_colqwen2: str) -> None:
    store = InMemoryMultiVectorStore()
    store.write({"x": np.ones((3, 64))})
    with pytest.raises(MultiVectorStoreError, match=r"dim 64.*produces dim 128"):
        ColPaliDocumentEmbedder(tiny_colqwen2, multivector_store=store).warm_up()


# --- Bad inputs: repeated ids, pages the processor refuses, all-or-nothing writes ----------------------------------


def test_duplicate_ids_raise_naming_them_and_nothing_is_written(tiny_colqwen2: str, pages_dir: Path) -> None:
    docs = _page_docs(pages_dir)[:3]
    twin = Document(id=docs[0].id, meta={"file_path": str(pages_dir / "page4.png")})
    store = InMemoryMultiVectorStore()
    with pytest.raises(DocumentProcessingError, match="duplicate document id") as info:
        _embed_pages(tiny_colqwen2, [*docs, twin], store)
    assert [doc_id for doc_id, _ in info.value.failures] == [docs[0].id]
    assert store.count() == 0


def test_duplicate_ids_with_skip_return_the_later_ones_as_failures(tiny_colqwen2: str, pages_dir: Path) -> None:
    docs = _page_docs(pages_dir)[:3]
    twin = Document(id=docs[1].id, meta={"file_path": str(pages_dir / "page4.png")})
    store = InMemoryMultiVectorStore()
    out = _embed_pages(tiny_colqwen2, [*docs, twin], store, on_error="skip")
    assert len(out["documents"]) + len(out["failed_documents"]) == 4
    [failed] = out["failed_documents"]
    assert failed.meta["file_path"] == str(pages_dir / "page4.png")  # the LATER one
    assert "duplicate document id" in failed.meta["embedding_error"]
    assert "position 1" in failed.meta["embedding_error"]
    assert store.count() == 3
    first = ColPaliDocumentEmbedder(tiny_colqwen2, multivector_store=InMemoryMultiVectorStore(), progress_bar=False)
    alone = first.run(docs[1:2])["documents"][0]
    assert store.get([docs[1].id])[docs[1].id].shape[0] == alone.meta["multivector_count"]


def _banner(pages_dir: Path) -> Document:
    make_image(pages_dir / "banner.png", size=(1600, 6), color="green")
    return Document(id="banner", meta={"file_path": str(pages_dir / "banner.png")})


def _loaded_aspect_ratio(doc: Document) -> float:
    """The aspect ratio of a document's image as the shared loader hands it to the model."""
    plan = plan_documents([doc], file_path_meta_field="file_path", root_path=None, probe_pixels=False)
    [(_, [image], _)] = list(iter_image_batches(plan, [0], 1))
    return max(image.size) / min(image.size)


def test_image_the_processor_refuses_is_a_named_failure_and_nothing_is_written(
    tiny_colqwen2: str, pages_dir: Path
) -> None:
    # Qwen2-VL's smart_resize refuses aspect ratios above 200 (image_processing_qwen2_vl.py:75-78); the
    # banner comes in the LAST batch, after two batches that would encode fine.
    banner = _banner(pages_dir)
    docs = [*_page_docs(pages_dir)[:4], banner]
    store = InMemoryMultiVectorStore()
    if _loaded_aspect_ratio(banner) < 200:  # the shared loader pads extreme aspect ratios: the page is kept
        assert _embed_pages(tiny_colqwen2, docs, store, batch_size=2)["failed_documents"] == []
        assert store.count() == 5
        return
    with pytest.raises(DocumentProcessingError) as info:
        _embed_pages(tiny_colqwen2, docs, store, batch_size=2)
    [(doc_id, reason)] = info.value.failures
    assert doc_id == "banner"
    assert "1600x6" in reason
    assert "aspect ratio" in reason
    assert store.count() == 0  # all or nothing


def test_image_the_processor_refuses_is_skipped_and_its_batch_mates_are_kept(
    tiny_colqwen2: str, pages_dir: Path
) -> None:
    banner = _banner(pages_dir)
    docs = [*_page_docs(pages_dir)[:3], banner]
    store = InMemoryMultiVectorStore()
    out = _embed_pages(tiny_colqwen2, docs, store, batch_size=4, on_error="skip")
    if _loaded_aspect_ratio(banner) < 200:  # padded by the shared loader: nothing to refuse
        assert out["failed_documents"] == []
        assert store.count() == 4
        return
    assert [d.id for d in out["failed_documents"]] == ["banner"]
    assert "aspect ratio" in out["failed_documents"][0].meta["embedding_error"]
    assert [d.id for d in out["documents"]] == [d.id for d in docs[:3]]
    assert store.count() == 3


def _refuse_wide_images(monkeypatch: pytest.MonkeyPatch, *, in_check: bool) -> None:
    """Make the processor refuse images wider than 20:1 (standing in for any refusal), optionally also `check_image`."""
    from haystack_integrations.common.multimodal_rag.backends.colpali import LateInteractionEncoder

    real = LateInteractionEncoder.process_images

    def refuse(image: Any) -> None:
        if image.width > 20 * image.height:
            msg = f"this processor refuses {image.width}x{image.height}"
            raise ValueError(msg)

    def process_images(self: LateInteractionEncoder, images: list) -> Any:
        for image in images:
            refuse(image)
        return real(self, images)

    monkeypatch.setattr(LateInteractionEncoder, "process_images", process_images)
    monkeypatch.setattr(
        LateInteractionEncoder,
        "check_image",
        (lambda self, image: refuse(image)) if in_check else (lambda self, image: None),
    )


@pytest.mark.parametrize("known_to_the_check", [True, False])
def test_a_refused_page_is_a_named_failure_and_its_batch_mates_are_kept(
    tiny_colqwen2: str, pages_dir: Path, monkeypatch: pytest.MonkeyPatch, known_to_the_check: bool
) -> None:
    # Independent of the shared loader: the refusal is simulated (a processor refusing for its own reasons);
    # unknown to `check_image`, the batch is split at encoding time to find the refused page.
    _refuse_wide_images(monkeypatch, in_check=known_to_the_check)
    make_image(pages_dir / "wide.png", size=(1000, 40), color="green")
    wide = Document(id="wide", meta={"file_path": str(pages_dir / "wide.png")})
    docs = [*_page_docs(pages_dir)[:2], wide, _page_docs(pages_dir)[2]]
    store = InMemoryMultiVectorStore()
    out = _embed_pages(tiny_colqwen2, docs, store, batch_size=4, on_error="skip")
    assert [d.id for d in out["failed_documents"]] == ["wide"]
    assert (
        "ColQwen2Processor refused the 1000x40 image of document 'wide'"
        in (out["failed_documents"][0].meta["embedding_error"])
    )
    assert store.count() == 3

    store = InMemoryMultiVectorStore()
    with pytest.raises(DocumentProcessingError, match="'wide'"):
        _embed_pages(tiny_colqwen2, [*_page_docs(pages_dir)[:2], wide], store, batch_size=2)
    if known_to_the_check:
        assert store.count() == 0  # checked before any model work: all or nothing


def test_check_image_refuses_exactly_what_each_processor_refuses(
    tiny_colpali_family: Callable[[str], str],
) -> None:
    from haystack_integrations.common.multimodal_rag.backends.colpali import LateInteractionEncoder
    from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec

    shapes = [(1600, 6), (6, 1600), (400, 2), (398, 2), (1, 1), (120, 90)]
    for family in FAMILIES:
        encoder = LateInteractionEncoder.get(
            LoadSpec(
                model=tiny_colpali_family(family),
                component="t",
                device="cpu",
                token=None,
                local_files_only=True,
                model_kwargs=None,
            )
        )
        for size in shapes:
            image = Image.new("RGB", size, "white")
            try:
                encoder.processor.process_images([image])
                refused = False
            except ValueError:
                refused = True
            if refused:
                with pytest.raises(ValueError, match="aspect ratio"):
                    encoder.check_image(image)
            else:
                encoder.check_image(image)
            assert refused == (family.startswith("ColQwen") and max(size) / min(size) > 200), (family, size)


# --- Options ---------------------------------------------------------------------------------------------------


def test_fill_multivector_embedding_needs_a_haystack_with_that_field(tiny_colqwen2: str) -> None:
    import haystack

    if document_has_multivector_field():
        embedder = ColPaliDocumentEmbedder(
            tiny_colqwen2, multivector_store=InMemoryMultiVectorStore(), fill_multivector_embedding=True
        )
        assert embedder.fill_multivector_embedding
        return
    with pytest.raises(ValueError, match=rf"multivector_embedding.*Haystack {haystack.__version__}"):
        ColPaliDocumentEmbedder(
            tiny_colqwen2, multivector_store=InMemoryMultiVectorStore(), fill_multivector_embedding=True
        )


@dataclasses.dataclass
class _DocumentWithMultivector(Document):
    """Haystack 3.5's `Document` shape (the installed Haystack may predate the field)."""

    multivector_embedding: list[list[float]] | None = None


def test_fill_multivector_embedding_sets_the_stored_vectors_on_the_documents(
    tiny_colqwen2: str, pages_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from haystack_integrations.components.embedders.colpali import document_embedder

    monkeypatch.setattr(document_embedder, "document_has_multivector_field", lambda: True)
    docs = [_DocumentWithMultivector(meta=d.meta) for d in _page_docs(pages_dir)[:2]]
    text = _DocumentWithMultivector(content="text stays as it is")
    store = InMemoryMultiVectorStore()
    out = _embed_pages(tiny_colqwen2, [text, *docs], store, fill_multivector_embedding=True)
    assert out["documents"][0] is text
    stored = store.get([d.id for d in docs])
    for doc in out["documents"][1:]:
        vectors = np.asarray(doc.multivector_embedding, dtype=np.float32)
        assert vectors.shape == (doc.meta["multivector_count"], 128)
        np.testing.assert_allclose(vectors, stored[doc.id].astype(np.float32), atol=1e-3)  # store keeps float16
    assert all(d.multivector_embedding is None for d in docs)  # inputs untouched


def test_to_dict_round_trip_keeps_the_new_options(tmp_path: Path) -> None:
    embedder = ColPaliDocumentEmbedder(
        "m",
        multivector_store=InMemoryMultiVectorStore(),
        processor_kwargs={"max_num_visual_tokens": 512},
        on_error="skip",
    )
    data = embedder.to_dict()
    assert data["init_parameters"]["processor_kwargs"] == {"max_num_visual_tokens": 512}
    assert data["init_parameters"]["fill_multivector_embedding"] is False
    restored = ColPaliDocumentEmbedder.from_dict(data)
    assert restored.processor_kwargs == {"max_num_visual_tokens": 512}
    assert restored.on_error == "skip"


def test_repeated_ids_and_unreadable_files_are_named_in_one_error_before_the_model_loads(pages_dir: Path) -> None:
    # The model path does not exist: the error about the documents must come first, without loading anything.
    docs = _page_docs(pages_dir)[:2]
    twin = Document(id=docs[0].id, meta={"file_path": str(pages_dir / "page4.png")})
    broken = Document(meta={"file_path": str(make_corrupt_image(pages_dir / "broken.png"))})
    store = InMemoryMultiVectorStore()
    embedder = ColPaliDocumentEmbedder(str(pages_dir / "no-such-model"), multivector_store=store, progress_bar=False)
    with pytest.raises(DocumentProcessingError, match="duplicate document id") as info:
        embedder.run([*docs, twin, broken])
    assert [doc_id for doc_id, _ in info.value.failures] == [twin.id, broken.id]
    assert store.count() == 0


def test_each_page_of_a_multi_page_tiff_scan_gets_its_own_vectors(tiny_colqwen2: str, tmp_path: Path) -> None:
    from haystack_integrations.components.converters.multimodal import MultimodalFileToDocument

    make_tiff(tmp_path / "scan.tif", colors=("red", "blue"), size=(112, 140))
    docs = MultimodalFileToDocument(root_path=str(tmp_path)).run(sources=["scan.tif"])["documents"]
    store = InMemoryMultiVectorStore()
    ColPaliDocumentEmbedder(tiny_colqwen2, multivector_store=store, root_path=str(tmp_path), progress_bar=False).run(
        docs
    )
    first, second = (store.get([d.id])[d.id] for d in docs)
    assert first.shape == second.shape
    assert not np.allclose(first, second)  # page 2 was read, not page 1 twice


def test_a_page_the_model_turns_into_nan_is_refused_by_the_store_naming_it_also_with_pooling(
    tiny_colqwen2: str, pages_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from haystack_integrations.common.multimodal_rag.backends.colpali import LateInteractionEncoder
    from haystack_integrations.common.multimodal_rag.errors import MultiVectorStoreError

    docs = _page_docs(pages_dir)[:2]
    embedder = ColPaliDocumentEmbedder(
        tiny_colqwen2, multivector_store=InMemoryMultiVectorStore(), pool_factor=2, progress_bar=False
    )
    embedder.warm_up()
    real_forward = LateInteractionEncoder._forward

    def broken_forward(self: LateInteractionEncoder, batch: Any) -> Any:
        pages = real_forward(self, batch)
        pages[1] = pages[1] * float("nan")
        return pages

    monkeypatch.setattr(LateInteractionEncoder, "_forward", broken_forward)
    with pytest.raises(MultiVectorStoreError, match=docs[1].id):
        embedder.run(docs)
