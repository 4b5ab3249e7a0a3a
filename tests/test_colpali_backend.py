from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from haystack_integrations.common.multimodal_rag.backends.colpali import (
    QUERY_AUGMENTATION_TOKENS,
    LateInteractionEncoder,
    _ward_labels,
    detect_family,
    family_from_config,
    pool_multivectors,
    pool_tensors,
)
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec
from haystack_integrations.common.multimodal_rag.errors import (
    ModelLoadError,
)
from haystack_integrations.components.embedders.colpali import ColPaliDocumentEmbedder, ColPaliTextEmbedder
from haystack_integrations.components.rankers.colpali import ColPaliRanker
from haystack_integrations.document_stores.multivector import InMemoryMultiVectorStore
from haystack_integrations.testing.multimodal_rag.reference import maxsim_reference
from haystack_integrations.testing.multimodal_rag.tiny_colpali import FAMILIES
from tests.colpali_fixtures import page_docs as _page_docs


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"architectures": ["ColQwen2_5"], "model_type": "qwen2_5_vl"}, "ColQwen2_5"),
        ({"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl"}, "ColQwen2"),
        ({"architectures": ["ColPali"], "model_type": "paligemma"}, "ColPali"),
        ({"model_type": "idefics3"}, "ColIdefics3"),
        ({"architectures": ["MyRenamedRetriever"], "model_type": "qwen2_5_vl"}, "ColQwen2_5"),
    ],
)
def test_family_comes_from_the_config_not_the_name(config: dict, expected: str) -> None:
    assert family_from_config(config, model="org/anything").model_class == expected


def test_unsupported_config_names_the_supported_families() -> None:
    with pytest.raises(ModelLoadError, match=r"not a ColPali-family checkpoint.*ColQwen2_5 \(qwen2_5_vl\)"):
        family_from_config({"architectures": ["BertModel"], "model_type": "bert"}, model="bert-base")


def test_peft_adapter_checkpoint_is_followed_to_its_base(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    family = detect_family(str(adapter), token=None, local_files_only=True, component="Test")
    assert family.model_class == "ColQwen2_5"


@pytest.mark.parametrize("family", ["ColQwen2_5", "ColPali"])
def test_a_peft_adapter_checkpoint_loads_through_the_components_and_applies(
    family: str, tiny_colpali_family: Callable[[str], str], tmp_path: Path
) -> None:
    # vidore/colqwen2.5-v0.2 and vidore/colpali-v1.3 are both LoRA adapters on a base checkpoint.
    from haystack_integrations.testing.multimodal_rag.tiny_colpali import build_tiny_colpali_adapter

    base_model = tiny_colpali_family(family)
    adapter = build_tiny_colpali_adapter(tmp_path / "adapter", base_model)
    assert not (adapter / "config.json").exists()
    with_adapter = ColPaliTextEmbedder(str(adapter)).run(text="hello")["multivector_embedding"]
    base = ColPaliTextEmbedder(base_model).run(text="hello")["multivector_embedding"]
    assert np.asarray(with_adapter).shape == np.asarray(base).shape
    assert not np.allclose(with_adapter, base)
    encoder = LateInteractionEncoder.get(_spec(str(adapter)))
    assert encoder.family.model_class == family
    assert not [name for name, p in encoder.model.named_parameters() if p.is_meta]
    page = encoder.embed_images([Image.new("RGB", (50, 60), "red")])[0]
    assert page.shape[1] == 128


def test_a_dual_encoder_is_refused_as_colpali_model(tiny_siglip: str) -> None:
    with pytest.raises(ModelLoadError, match="not a ColPali-family checkpoint"):
        ColPaliTextEmbedder(tiny_siglip).warm_up()


def test_missing_model_fails_in_warm_up_with_advice(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"local directory path|local path"):
        ColPaliTextEmbedder("org/not-cached-colpali", local_files_only=True).warm_up()


# --- Family matrix: every colpali-engine family through OUR loading code -------------------------------------------


def _spec(model: str, **kwargs: Any) -> LoadSpec:
    return LoadSpec(
        model=model, component="test", device="cpu", token=None, local_files_only=True, model_kwargs=None, **kwargs
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_embeds_a_query_and_a_page_and_ranks(
    family: str, tiny_colpali_family: Callable[[str], str], pages_dir: Path
) -> None:
    model = tiny_colpali_family(family)
    encoder = LateInteractionEncoder.get(_spec(model))
    assert encoder.family.model_class == family
    assert not [name for name, p in encoder.model.named_parameters() if p.is_meta]

    store = InMemoryMultiVectorStore()
    docs = _page_docs(pages_dir)[:3]
    embedded = ColPaliDocumentEmbedder(model, multivector_store=store, progress_bar=False).run(docs)
    assert embedded["failed_documents"] == []
    pages = store.get([d.id for d in docs])
    for doc in embedded["documents"]:
        array = pages[doc.id].astype(np.float32)
        assert array.shape == (doc.meta["multivector_count"], encoder.dim)
        np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, atol=2e-3)

    query = "a bar chart of quarterly revenue"
    query_vectors = np.asarray(ColPaliTextEmbedder(model).run(text=query)["multivector_embedding"])
    assert query_vectors.shape[1] == encoder.dim
    assert query_vectors.shape[0] >= QUERY_AUGMENTATION_TOKENS + 1

    ranked = ColPaliRanker(model, multivector_store=store, top_k=3).run(query=query, documents=embedded["documents"])
    reference = dict(
        zip([d.id for d in docs], maxsim_reference(query_vectors, [pages[d.id] for d in docs]), strict=True)
    )
    assert [d.id for d in ranked["documents"]] == sorted(reference, key=lambda i: -reference[i])
    for doc in ranked["documents"]:
        assert doc.meta["late_interaction_score"] == pytest.approx(reference[doc.id], rel=1e-3)


def test_colqwen3_projects_to_320_dimensions(tiny_colpali_family: Callable[[str], str]) -> None:
    # colpali_engine/models/qwen3/colqwen3/modeling_colqwen3.py:48 (dim = 320); the stores take any width.
    assert LateInteractionEncoder.get(_spec(tiny_colpali_family("ColQwen3"))).dim == 320


# --- ColPali (PaliGemma): the tied lm_head -------------------------------------------------------------------------


def test_colpali_checkpoint_has_no_lm_head_and_colpali_engine_alone_leaves_it_on_meta(
    tiny_colpali_family: Callable[[str], str],
) -> None:
    from colpali_engine.models import ColPali
    from safetensors import safe_open

    model = tiny_colpali_family("ColPali")
    with safe_open(str(Path(model) / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert keys
    assert not [k for k in keys if "lm_head" in k]  # tied: not saved, as in vidore/colpali-v1.3
    plain = ColPali.from_pretrained(model)
    # The upstream bug our loader works around (colpali-engine 0.3.18 + transformers 5). If this starts failing,
    # upstream fixed it and `_retie_paligemma_lm_head` has become a no-op.
    assert plain.model.lm_head.weight.is_meta
    with pytest.raises(NotImplementedError, match="meta"):
        plain.to("cpu")


def test_colpali_loads_with_the_head_tied_to_the_embeddings(tiny_colpali_family: Callable[[str], str]) -> None:
    encoder = LateInteractionEncoder.get(_spec(tiny_colpali_family("ColPali")))
    inner = encoder.model.model
    assert inner.lm_head.weight is inner.get_input_embeddings().weight
    assert inner.lm_head.weight.device.type == "cpu"


def test_colpali_page_vectors_equal_the_full_forward_without_computing_all_logits(
    tiny_colpali_family: Callable[[str], str],
) -> None:
    encoder = LateInteractionEncoder.get(_spec(tiny_colpali_family("ColPali")))
    images = [Image.new("RGB", (60, 40), "red"), Image.new("RGB", (30, 70), "blue")]
    batch = encoder.process_images(images)
    calls: list[tuple[int, ...]] = []
    hook = encoder.model.model.lm_head.register_forward_hook(lambda _m, _i, out: calls.append(tuple(out.shape)))
    try:
        ours = encoder.embed_images(images)
        assert calls
        assert all(shape[1] == 1 for shape in calls)  # only the last position is projected
        with torch.inference_mode():
            full = encoder.model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        hook.remove()
    assert calls[-1][1] == batch["input_ids"].shape[1]  # the reference forward projected every position
    mask = batch["attention_mask"].bool()
    for i, vectors in enumerate(ours):
        np.testing.assert_allclose(vectors, full[i][mask[i]].float().numpy(), atol=1e-5)


# --- Visual-token budgets (processor_kwargs) ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ColQwen2", "ColQwen2_5"])
def test_colqwen2_defaults_to_the_trained_768_visual_token_budget(
    family: str, tiny_colpali_family: Callable[[str], str]
) -> None:
    encoder = LateInteractionEncoder.get(_spec(tiny_colpali_family(family)))
    # colpali-engine v0.3.4 processing_colqwen2.py:44-49 trained with max_pixels = 768 * 28 * 28
    assert encoder.processor.image_processor.max_pixels == 768 * 28 * 28
    assert encoder.processor.image_processor.size["longest_edge"] == 768 * 28 * 28


def test_explicit_processor_kwargs_replace_the_default_budget(tiny_colpali_family: Callable[[str], str]) -> None:
    model = tiny_colpali_family("ColQwen2_5")
    small = LateInteractionEncoder.get(_spec(model, processor_kwargs={"max_num_visual_tokens": 4}))
    default = LateInteractionEncoder.get(_spec(model))
    assert small.processor.image_processor.max_pixels == 4 * 28 * 28
    page = Image.new("RGB", (140, 112), "white")
    assert small.embed_images([page])[0].shape[0] < default.embed_images([page])[0].shape[0]


def test_empty_processor_kwargs_keep_the_checkpoints_own_processor_config(
    tiny_colpali_family: Callable[[str], str],
) -> None:
    from colpali_engine.models import ColQwen2_5_Processor

    model = tiny_colpali_family("ColQwen2_5")
    own = ColQwen2_5_Processor.from_pretrained(model).image_processor.size["longest_edge"]
    assert own != 768 * 28 * 28
    encoder = LateInteractionEncoder.get(_spec(model, processor_kwargs={}))
    assert encoder.processor.image_processor.size["longest_edge"] == own


def test_families_without_a_trained_budget_keep_their_processor_config(
    tiny_colpali_family: Callable[[str], str],
) -> None:
    for family in ("ColPali", "ColIdefics3", "ColQwen3", "ColModernVBert"):
        assert family_from_config({"architectures": [family]}, model="m").default_processor_kwargs is None


# --- Pooling ---------------------------------------------------------------------------------------------------------


def _partition(labels: np.ndarray) -> list[tuple[int, ...]]:
    return sorted(tuple(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels))


def test_pooling_keeps_colpali_engine_clusters_and_vectors_on_random_pages() -> None:
    from colpali_engine.compression.token_pooling import HierarchicalTokenPooler

    pooler = HierarchicalTokenPooler()
    generator = torch.Generator().manual_seed(0)
    for pool_factor, sizes in ((2, (40, 37)), (3, (120, 101, 64)), (4, (257,))):
        pages = [torch.nn.functional.normalize(torch.randn(n, 128, generator=generator), dim=-1) for n in sizes]
        ours = pool_tensors(pages, pool_factor)  # all pages of a batch at once, padded
        labels = _ward_labels(pages, [max(n // pool_factor, 1) for n in sizes])
        for page, pooled, our_labels in zip(pages, ours, labels, strict=True):
            reference, clusters = pooler._pool_single_embedding(page, pool_factor)
            reference_partition = sorted(tuple(ix[0].tolist()) for ix in clusters.values() if ix[0].numel())
            assert _partition(our_labels.numpy()) == reference_partition
            assert pooled.shape == reference.shape
            # Same vectors; only their order may differ (MaxSim does not depend on it).
            np.testing.assert_allclose(np.sort(pooled.numpy(), axis=0), np.sort(reference.numpy(), axis=0), atol=1e-6)
            query = torch.nn.functional.normalize(torch.randn(12, 128, generator=generator), dim=-1)
            assert maxsim_reference(query, [pooled])[0] == pytest.approx(maxsim_reference(query, [reference])[0])


def test_pool_multivectors_edge_cases() -> None:
    rng = np.random.default_rng(0)
    page = rng.standard_normal((9, 8)).astype(np.float32)
    page /= np.linalg.norm(page, axis=1, keepdims=True)
    assert np.array_equal(pool_multivectors([page], 1)[0], page)  # pool_factor 1: unchanged
    single = page[:1]
    assert np.array_equal(pool_multivectors([single], 3)[0], single)  # one vector: nothing to pool
    pooled = pool_multivectors([page, page[:4]], 3)
    assert [p.shape for p in pooled] == [(3, 8), (1, 8)]
    assert pooled[0].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(pooled[0], axis=1), 1.0, atol=1e-6)
    assert pool_multivectors([], 3) == []


def test_stored_pages_are_pooled_like_pool_multivectors(
    tiny_colpali_family: Callable[[str], str], pages_dir: Path
) -> None:
    encoder = LateInteractionEncoder.get(_spec(tiny_colpali_family("ColQwen2")))
    images = [Image.open(pages_dir / f"page{i}.png").convert("RGB") for i in range(3)]
    full = encoder.embed_images(images)
    pooled = encoder.embed_images(images, pool_factor=2)
    for f, p in zip(full, pooled, strict=True):
        np.testing.assert_allclose(p, pool_multivectors([f], 2)[0], atol=1e-5)
        assert p.shape[0] == max(f.shape[0] // 2, 1)


def test_the_accelerator_merge_loop_gives_the_same_clusters(monkeypatch: pytest.MonkeyPatch) -> None:
    # The torch loop (used on GPUs) run on CPU tensors, against the numpy loop used on the CPU.
    from haystack_integrations.common.multimodal_rag.backends import colpali as backend

    generator = torch.Generator().manual_seed(1)
    pages = [torch.nn.functional.normalize(torch.randn(n, 64, generator=generator), dim=-1) for n in (50, 61, 33)]
    clusters = [n // 3 for n in (50, 61, 33)]
    numpy_labels = _ward_labels(pages, clusters)
    monkeypatch.setattr(backend, "_NumpyOps", lambda: backend._TorchOps(torch.device("cpu")))
    torch_labels = _ward_labels(pages, clusters)
    for a, b in zip(numpy_labels, torch_labels, strict=True):
        assert torch.equal(a, b)


def _v0_3_4_smart_resize(width: int, height: int) -> tuple[int, int]:
    """colpali-engine v0.3.4 `ColQwen2Processor.smart_resize_helper` (the recipe colqwen2-v1.0 was trained with):
    factor 28, min_pixels 4*28*28, max_pixels 768*28*28, max_ratio 200; returns (height, width)."""
    import math

    factor, min_pixels, max_pixels = 28, 4 * 28 * 28, 768 * 28 * 28
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@pytest.mark.parametrize("family", ["ColQwen2", "ColQwen2_5"])
def test_page_inputs_equal_the_training_recipe(family: str, tiny_colpali_family: Callable[[str], str]) -> None:
    # Training recipe (colpali-engine v0.3.4 ColQwen2Processor.process_images): resize each page with the helper
    # above, then the Qwen2-VL processor with the prompt "<|im_start|>user\\n<|vision_start|><|image_pad|>
    # <|vision_end|>Describe the image.<|im_end|><|endoftext|>". Ours: the 0.3.18 processor with the default
    # processor_kwargs ({"max_num_visual_tokens": 768}) on the original page.
    encoder = LateInteractionEncoder.get(_spec(tiny_colpali_family(family)))
    processor = encoder.processor
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|><|endoftext|>"
    assert processor.visual_prompt_prefix == prompt
    sizes = [(1024, 1365), (1240, 1754), (800, 600), (100, 100), (56, 3000), (3000, 40)]
    noise = np.random.default_rng(0).integers(0, 256, (1365, 1024, 3), dtype=np.uint8)
    pages = [Image.fromarray(noise), *(Image.new("RGB", size, "white") for size in sizes[1:])]
    ours = encoder.process_images(pages)
    resized = [page.resize(_v0_3_4_smart_resize(*page.size)[::-1]) for page in pages]
    reference = processor(text=[prompt] * len(pages), images=resized, padding="longest", return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], reference["image_grid_thw"])
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    assert torch.equal(ours["attention_mask"], reference["attention_mask"])
    # Pixels: one bicubic resize by the image processor vs PIL's resize then none; measured max |diff| 0.015 (in
    # normalised units, range ~[-1.8, 2.1]) on this noise page.
    # (colpali-engine pads each page's patches to (B, max_patches, D); the plain processor concatenates them.)
    n_patches = int(ours["image_grid_thw"][0].prod())
    assert float((ours["pixel_values"][0, :n_patches] - reference["pixel_values"][:n_patches]).abs().max()) < 0.05
    image_tokens = (ours["input_ids"][0] == processor.image_token_id).sum()
    assert int(image_tokens) == 744  # 1024x1365 -> 672x868 -> 24x31 merged patches (<= 768)
