"""The Qwen-VL vision towers' one-call-per-layer attention (backends/attention.py) computes what transformers'
per-segment SDPA calls compute, is applied only to the vision tower, and only when the user chose no kernel."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from haystack import Document
from haystack.utils import ComponentDevice

from haystack_integrations.common.multimodal_rag.backends import attention
from haystack_integrations.common.multimodal_rag.backends.attention import (
    VARLEN_ATTENTION,
    switch_vision_attention,
    varlen_attention,
)
from haystack_integrations.components.embedders.colpali import ColPaliDocumentEmbedder
from haystack_integrations.components.rankers.vlm import VisionLanguageRanker
from haystack_integrations.document_stores.multivector import InMemoryMultiVectorStore
from haystack_integrations.testing.multimodal_rag.tiny_models import build_tiny_qwen2_vl
from tests.helpers import make_image

#: Models loaded on CUDA are switched at load time; these tests switch a CPU model by hand to compare both paths.
CPU = ComponentDevice.from_str("cpu")


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], scale: float) -> torch.Tensor:
    """transformers' SDPA path: one attention call per segment, concatenated; `(1, total, heads, dim)`."""
    outs = []
    for qs, ks, vs in zip(*(torch.split(t, lengths, dim=2) for t in (q, k, v)), strict=True):
        out = torch.nn.functional.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), scale=scale)
        outs.append(out.transpose(1, 2))
    return torch.cat(outs, dim=1)


def _packed(lengths: list[int], *, heads: int = 4, dim: int = 16, dtype: torch.dtype, device: str, seed: int):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(1, heads, total, dim, generator=generator).to(device, dtype) for _ in range(3))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)
    return q, k, v, cu


@pytest.mark.parametrize(
    "lengths",
    [[64, 64, 64, 64], [5, 64, 64, 17, 1, 30], [1], [200], [3, 1, 1, 2]],
    ids=["equal-windows", "ragged", "one-token", "one-segment", "tiny-segments"],
)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_matches_per_segment_sdpa_on_cpu(lengths: list[int], dtype: torch.dtype, tolerance: float) -> None:
    q, k, v, cu = _packed(lengths, dtype=dtype, device="cpu", seed=len(lengths))
    out, weights = varlen_attention(
        torch.nn.Module(), q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths)
    )
    assert weights is None
    assert out.shape == (1, sum(lengths), 4, 16)
    assert out.dtype == dtype
    expected = _reference(q, k, v, lengths, 0.25)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


def test_segments_do_not_see_each_other() -> None:
    # Changing the keys/values of one segment must not move the output of another.
    q, k, v, cu = _packed([8, 8, 8], dtype=torch.float32, device="cpu", seed=3)
    before, _ = varlen_attention(torch.nn.Module(), q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 8:16] += 5.0
    v2[:, :, 8:16] -= 3.0
    after, _ = varlen_attention(torch.nn.Module(), q, k2, v2, None, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    torch.testing.assert_close(after[:, :8], before[:, :8])
    torch.testing.assert_close(after[:, 16:], before[:, 16:])
    assert not torch.allclose(after[:, 8:16], before[:, 8:16])


def test_without_boundaries_it_is_plain_sdpa() -> None:
    q, k, v, _ = _packed([12], dtype=torch.float32, device="cpu", seed=4)
    module = torch.nn.Module()
    module.is_causal = False  # as the vision attention modules declare
    out, _ = varlen_attention(module, q, k, v, None, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_flash_varlen_kernel_matches_reference(dtype: torch.dtype) -> None:
    lengths = [64] * 40 + [17, 5, 64, 1]
    q, k, v, cu = _packed(lengths, heads=16, dim=80, dtype=dtype, device="cuda", seed=5)
    out, _ = varlen_attention(
        torch.nn.Module(), q, k, v, None, scaling=80**-0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=64
    )
    assert not attention._TORCH_VARLEN_BROKEN, "PyTorch's flash varlen kernel failed and the fallback ran"
    torch.testing.assert_close(out.float(), _reference(q, k, v, lengths, 80**-0.5), atol=2e-2, rtol=2e-2)


# --- applied to real (tiny) Qwen-VL towers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def windowed_colqwen25(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Tiny ColQwen2.5 whose pages span several 56 px windows (incl. partial edge windows) of the vision tower."""
    folder = tmp_path_factory.mktemp("colqwen25_windows")
    return str(build_tiny_qwen2_vl(folder, kind="colpali", version="2.5", max_pixels=28 * 28 * 48))


def _pages(folder: Path) -> list[Document]:
    sizes = [(196, 252), (224, 140), (84, 308)]
    for i, size in enumerate(sizes):
        make_image(folder / f"p{i}.png", size=size, color=(30 * i, 200 - 40 * i, 90))
    return [Document(id=f"p{i}", meta={"file_path": str(folder / f"p{i}.png")}) for i in range(len(sizes))]


@contextmanager
def switched(model: torch.nn.Module) -> Iterator[None]:
    """The model's vision tower on `VARLEN_ATTENTION` (what loading on CUDA does), restored to SDPA afterwards:
    loaded models are shared by every component of the process, and other tests use the same checkpoints."""
    modules = attention._vision_attention_modules(model)
    configs = [m.config for m in modules]
    assert switch_vision_attention(model)
    try:
        yield
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"
        for module in modules:  # the lean forward, when the probe kept it
            module.__dict__.pop("forward", None)


def _embed(model: str, docs: list[Document], *, switch: bool) -> tuple[ColPaliDocumentEmbedder, dict]:
    store = InMemoryMultiVectorStore()
    embedder = ColPaliDocumentEmbedder(model, multivector_store=store, progress_bar=False, device=CPU)
    embedder.warm_up()
    hf_model = embedder._encoder.model  # type: ignore[union-attr]
    with switched(hf_model) if switch else nullcontext():
        assert hf_model.config.vision_config._attn_implementation == (VARLEN_ATTENTION if switch else "sdpa")
        assert hf_model.config.text_config._attn_implementation == "sdpa"  # the language model is never touched
        embedder.run(docs)
    return embedder, {d.id: store.get([d.id])[d.id] for d in docs}


def test_colqwen25_pages_embed_identically_with_one_call_per_layer(windowed_colqwen25: str, tmp_path: Path) -> None:
    docs = _pages(tmp_path)
    _, reference = _embed(windowed_colqwen25, docs, switch=False)
    _, fast = _embed(windowed_colqwen25, docs, switch=True)
    for doc in docs:
        assert fast[doc.id].shape == reference[doc.id].shape
        np.testing.assert_allclose(fast[doc.id].astype(np.float32), reference[doc.id].astype(np.float32), atol=2e-3)


def test_windows_really_are_several_segments(windowed_colqwen25: str, tmp_path: Path) -> None:
    # Guards the test above: the pages must cross several windows, or both paths would be one call per image.
    calls: list[int] = []
    original = attention._attend_segments

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(int(cu.numel()) - 1)
        return original(q, k, v, cu, *args)  # type: ignore[arg-type]

    embedder = ColPaliDocumentEmbedder(windowed_colqwen25, multivector_store=InMemoryMultiVectorStore(), device=CPU)
    embedder.warm_up()
    with switched(embedder._encoder.model), pytest.MonkeyPatch.context() as patch:  # type: ignore[union-attr]
        patch.setattr(attention, "_attend_segments", spy)
        embedder.run(_pages(tmp_path)[:1])
    assert calls, "the vision tower did not attend by segments"
    assert max(calls) > 1  # windowed blocks: several segments in one call
    assert min(calls) == 1  # the full-attention block: the whole page is one segment


def test_switched_only_on_cuda_and_only_when_the_user_chose_no_kernel(windowed_colqwen25: str) -> None:
    from colpali_engine.models import ColQwen2_5

    def vision(model: torch.nn.Module) -> str:
        return model.config.vision_config._attn_implementation  # type: ignore[no-any-return]

    model = ColQwen2_5.from_pretrained(windowed_colqwen25, attn_implementation="sdpa")
    assert attention.use_varlen_vision_attention(model, device="cpu", requested=None) is False
    assert attention.use_varlen_vision_attention(model, device="cuda:0", requested="sdpa") is False
    assert vision(model) == "sdpa"
    assert attention.use_varlen_vision_attention(model, device="cuda:0", requested=None) is True
    assert vision(model) == VARLEN_ATTENTION
    eager = ColQwen2_5.from_pretrained(windowed_colqwen25, attn_implementation="eager")
    assert attention.use_varlen_vision_attention(eager, device="cuda:0", requested=None) is False  # not SDPA


def test_vlm_ranker_scores_identically(tiny_instruct: str, tmp_path: Path) -> None:
    docs = []
    for i, size in enumerate([(112, 84), (56, 140), (84, 84)]):
        make_image(tmp_path / f"c{i}.png", size=size, color=(60 * i, 90, 200 - 50 * i))
        docs.append(Document(id=f"c{i}", meta={"file_path": str(tmp_path / f"c{i}.png")}, score=0.5))
    ranker = VisionLanguageRanker(tiny_instruct, recipe="zero_shot_yes_no", batch_size=3, device=CPU)
    want = {d.id: d.score for d in ranker.run(query="a red chart", documents=docs)["documents"]}
    with switched(ranker._vlm.model):  # type: ignore[union-attr]
        got = {d.id: d.score for d in ranker.run(query="a red chart", documents=docs)["documents"]}
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-4)


def test_other_architectures_are_left_alone() -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    model = SiglipVisionModel(
        SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    )
    assert attention.use_varlen_vision_attention(model, device="cuda:0", requested=None) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the switch is made on CUDA only")
def test_on_cuda_pages_embed_as_with_per_window_sdpa(windowed_colqwen25: str, tmp_path: Path) -> None:
    docs = _pages(tmp_path)
    results = {}
    for name, kwargs in (("varlen", {}), ("sdpa", {"model_kwargs": {"attn_implementation": "sdpa"}})):
        store = InMemoryMultiVectorStore()
        embedder = ColPaliDocumentEmbedder(
            windowed_colqwen25, multivector_store=store, device=ComponentDevice.from_str("cuda:0"), **kwargs
        )
        embedder.run(docs)
        vision = embedder._encoder.model.config.vision_config._attn_implementation  # type: ignore[union-attr]
        assert vision == (VARLEN_ATTENTION if name == "varlen" else "sdpa")
        results[name] = {d.id: store.get([d.id])[d.id].astype(np.float32) for d in docs}
    assert not attention._TORCH_VARLEN_BROKEN
    for doc in docs:
        np.testing.assert_allclose(results["varlen"][doc.id], results["sdpa"][doc.id], atol=3e-2)


# --- the lean forward: fused rotary, then one varlen call -----------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("equal_halves", [True, False])
def test_fused_rotary_is_transformers_rotary_bit_for_bit(family: str, dtype: torch.dtype, equal_halves: bool) -> None:
    import importlib

    reference = importlib.import_module(f"transformers.models.{family}.modeling_{family}").apply_rotary_pos_emb_vision
    generator = torch.Generator().manual_seed(1)
    qkv = (3 * torch.randn(257, 3, 4, 80, generator=generator)).to(dtype)
    angles = 40 * torch.randn(257, 40 if equal_halves else 80, generator=generator)
    if equal_halves:  # the towers' layout: cat(freqs, freqs)
        angles = angles.repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()
    q, k, _ = qkv.permute(1, 0, 2, 3).unbind(0)  # the strided views the towers pass
    want_q, want_k = reference(q, k, cos, sin)
    got = attention.rotate_query_and_key(qkv, cos, sin)
    assert got.dtype == dtype
    assert got[0].is_contiguous()
    assert got[1].is_contiguous()
    assert torch.equal(got[0], want_q)
    assert torch.equal(got[1], want_k)


def _rotary_calls(patch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = attention.rotate_query_and_key

    def counted(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        calls.append(qkv.shape[0])
        return original(qkv, cos, sin)

    patch.setattr(attention, "rotate_query_and_key", counted)
    return calls


def test_switched_colqwen25_pages_run_the_lean_forward(windowed_colqwen25: str, tmp_path: Path) -> None:
    # colpali-engine passes output_hidden_states down to the vision attention: the lean forward must still run.
    docs = _pages(tmp_path)
    _, reference = _embed(windowed_colqwen25, docs, switch=False)
    with pytest.MonkeyPatch.context() as patch:
        calls = _rotary_calls(patch)
        embedder, lean = _embed(windowed_colqwen25, docs, switch=True)
    layers = len(attention._vision_attention_modules(embedder._encoder.model))  # type: ignore[union-attr]
    assert len(calls) >= layers  # every layer of every forward (plus the probe)
    for doc in docs:
        np.testing.assert_allclose(lean[doc.id].astype(np.float32), reference[doc.id].astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_forward_is_the_modules_forward_bit_for_bit(windowed_colqwen25: str, dtype: torch.dtype) -> None:
    from colpali_engine.models import ColQwen2_5

    model = ColQwen2_5.from_pretrained(windowed_colqwen25, attn_implementation="sdpa", dtype=dtype)
    assert switch_vision_attention(model)
    modules = attention._vision_attention_modules(model)
    assert all("forward" in m.__dict__ for m in modules)  # the probe kept it
    module = modules[0]
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(90, module.qkv.in_features, generator=generator).to(dtype)  # type: ignore[union-attr]
    angles = torch.randn(90, module.qkv.in_features // module.num_heads // 2, generator=generator).repeat(1, 2)
    cu = torch.tensor([0, 16, 50, 90], dtype=torch.int32)
    with torch.inference_mode():
        own = type(module).forward(module, hidden, cu_seqlens=cu, position_embeddings=(angles.cos(), angles.sin()))
        lean = module(hidden, cu_seqlens=cu, position_embeddings=(angles.cos(), angles.sin()), max_seqlen=40)
    assert torch.equal(own, lean)


def test_a_lean_forward_that_differs_is_not_kept(windowed_colqwen25: str) -> None:
    from colpali_engine.models import ColQwen2_5

    original = attention.rotate_query_and_key

    def off_by_a_little(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return original(qkv, cos, sin) * 1.01

    model = ColQwen2_5.from_pretrained(windowed_colqwen25, attn_implementation="sdpa")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "rotate_query_and_key", off_by_a_little)
        assert switch_vision_attention(model)  # the varlen switch itself still happens
    assert not any("forward" in m.__dict__ for m in attention._vision_attention_modules(model))


def test_lean_forward_steps_aside_when_the_tower_is_switched_away(windowed_colqwen25: str, tmp_path: Path) -> None:
    # A user who sets another attention implementation after loading gets transformers' forward again.
    embedder = ColPaliDocumentEmbedder(windowed_colqwen25, multivector_store=InMemoryMultiVectorStore(), device=CPU)
    embedder.warm_up()
    model = embedder._encoder.model  # type: ignore[union-attr]
    with switched(model):
        for config in {id(m.config): m.config for m in attention._vision_attention_modules(model)}.values():
            config._attn_implementation = "sdpa"
        with pytest.MonkeyPatch.context() as patch:
            calls = _rotary_calls(patch)
            embedder.run(_pages(tmp_path)[:1])
    assert calls == []


def test_with_autograd_recording_the_lean_forward_steps_aside(windowed_colqwen25: str) -> None:
    from colpali_engine.models import ColQwen2_5

    model = ColQwen2_5.from_pretrained(windowed_colqwen25, attn_implementation="sdpa")
    assert switch_vision_attention(model)
    module = attention._vision_attention_modules(model)[0]
    assert "forward" in module.__dict__
    width = module.qkv.in_features  # type: ignore[union-attr]
    hidden = torch.randn(40, width, requires_grad=True)
    angles = torch.randn(40, width // module.num_heads // 2).repeat(1, 2)  # type: ignore[operator]
    cu = torch.tensor([0, 16, 40], dtype=torch.int32)
    out = module(hidden, cu_seqlens=cu, position_embeddings=(angles.cos(), angles.sin()))  # grad enabled
    out.sum().backward()
    assert hidden.grad is not None
    assert hidden.grad.abs().sum() > 0


def test_modules_that_already_have_an_instance_forward_keep_it(windowed_colqwen25: str) -> None:
    # e.g. accelerate's device-map hooks wrap `forward` on the instance: replacing it would drop them.
    from colpali_engine.models import ColQwen2_5

    model = ColQwen2_5.from_pretrained(windowed_colqwen25, attn_implementation="sdpa")
    modules = attention._vision_attention_modules(model)
    hooked = modules[0].forward
    modules[0].forward = hooked  # an instance attribute now
    assert switch_vision_attention(model)  # the varlen switch itself still happens
    assert modules[0].__dict__["forward"] is hooked
    assert not any("forward" in m.__dict__ for m in modules[1:])
