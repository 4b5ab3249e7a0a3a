"""The vision towers' fused elementwise kernels (`backends/fused_ops.py`): the formulas, the build check and its
fallbacks on any machine (the Triton build replaced by stand-ins), the real kernels on a CUDA device."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from haystack import Document
from haystack.utils import ComponentDevice

from haystack_integrations.common.multimodal_rag.backends import attention, fused_ops
from haystack_integrations.components.rankers.vlm import VisionLanguageRanker
from tests.helpers import make_image


@pytest.fixture(autouse=True)
def _fresh_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test builds (or fails to) from scratch, and leaves the process's kernels as it found them."""
    monkeypatch.setattr(fused_ops, "_FUSED", {})


def _qkv(dtype: torch.dtype, total: int = 131, heads: int = 3, dim: int = 32) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(5)
    qkv = (3 * torch.randn(total, 3, heads, dim, generator=generator)).to(dtype)
    angles = 25 * torch.randn(total, dim // 2, generator=generator).repeat(1, 2)
    return qkv, angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_rotary_formula_is_transformers_rotary(dtype: torch.dtype) -> None:
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    qkv, cos, sin = _qkv(dtype)
    q, k, _ = qkv.permute(1, 0, 2, 3).unbind(0)
    want_q, want_k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    got = fused_ops.rotary_math(qkv, cos, sin)
    assert torch.equal(got[0], want_q)
    assert torch.equal(got[1], want_k)
    assert got[0].is_contiguous()
    assert torch.equal(got, attention.rotate_query_and_key(qkv, cos, sin))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_quick_gelu_formula_is_transformers_quick_gelu(dtype: torch.dtype) -> None:
    from transformers.activations import QuickGELUActivation

    x = (4 * torch.randn(64, 50, generator=torch.Generator().manual_seed(2))).to(dtype)
    assert torch.equal(fused_ops.quick_gelu_math(x), QuickGELUActivation()(x))
    assert torch.equal(fused_ops.FusedQuickGELU()(x), QuickGELUActivation()(x))  # off CUDA: the same arithmetic


def _build_with(monkeypatch: pytest.MonkeyPatch, make: Callable[[Callable[..., Any]], Any]) -> list[str]:
    """Replace the Triton build by `make(eager function)`; returns the names built."""
    calls: list[str] = []

    def fake_build(name: str) -> Any:
        calls.append(name)
        return make(fused_ops._FUNCTIONS[name])

    monkeypatch.setattr(fused_ops, "_build", fake_build)
    return calls


def test_a_kernel_that_builds_and_agrees_is_used_and_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _build_with(monkeypatch, lambda fn: fn)  # a "kernel" that is the eager function itself
    first = fused_ops.fused("rotary", torch.device("cpu"), torch.bfloat16)
    again = fused_ops.fused("rotary", torch.device("cpu"), torch.bfloat16)
    assert first is fused_ops.rotary_math
    assert again is first
    assert calls == ["rotary"]
    assert fused_ops.fused("rotary", torch.device("cpu"), torch.float32) is fused_ops.rotary_math  # per dtype
    assert calls == ["rotary", "rotary"]


def test_a_kernel_that_differs_is_not_used(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls = _build_with(monkeypatch, lambda fn: lambda *args: fn(*args) * 1.02)
    assert fused_ops.fused("quick_gelu", torch.device("cpu"), torch.bfloat16) is None
    assert fused_ops.fused("quick_gelu", torch.device("cpu"), torch.bfloat16) is None
    assert calls == ["quick_gelu"]  # not retried
    assert "bit for bit" in caplog.text


def test_a_kernel_one_rounding_off_is_not_used_either(monkeypatch: pytest.MonkeyPatch) -> None:
    # The claim is transformers' results, not results close to them.
    def one_ulp_up(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return lambda *args: torch.nextafter(fn(*args), torch.tensor(float("inf"), dtype=torch.bfloat16))

    _build_with(monkeypatch, one_ulp_up)
    assert fused_ops.fused("quick_gelu", torch.device("cpu"), torch.bfloat16) is None


def test_a_kernel_wrong_only_at_the_models_width_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # The check runs at the widths it is given (prepare: the model's own), in both multiple-of-16 cases.
    seen: list[tuple[int, ...]] = []

    def wrong_at_80(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def kernel(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(qkv.shape))
            out = fn(qkv, cos, sin)
            return out + 1 if qkv.shape[-1] == 80 else out

        return kernel

    _build_with(monkeypatch, wrong_at_80)
    assert fused_ops.fused("rotary", torch.device("cpu"), torch.float32) is not None  # default widths: not caught
    monkeypatch.setattr(fused_ops, "_FUSED", {})
    assert fused_ops.fused("rotary", torch.device("cpu"), torch.float32, ((16, 80),)) is None
    assert (96, 3, 16, 80) in seen


def test_without_triton_the_eager_code_runs(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import builtins

    real_import = builtins.__import__

    def no_triton(module: str, *args: Any, **kwargs: Any) -> Any:
        if module == "triton" or module.startswith("triton."):
            raise ImportError("No module named 'triton'")
        return real_import(module, *args, **kwargs)

    from haystack_integrations.common.multimodal_rag import backends

    name = "haystack_integrations.common.multimodal_rag.backends._triton_kernels"
    monkeypatch.delitem(sys.modules, name, raising=False)  # imported by an earlier test (on a GPU machine)
    monkeypatch.delattr(backends, "_triton_kernels", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_triton)
    assert fused_ops.fused("rotary", torch.device("cpu"), torch.bfloat16) is None
    assert "could not be built" in caplog.text
    assert "No module named 'triton'" in caplog.text
    x = torch.randn(4, 8)
    assert torch.equal(fused_ops.FusedQuickGELU()(x), fused_ops.quick_gelu_math(x))


def test_the_kernels_are_left_to_the_eager_code_where_autograd_records() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert not fused_ops.usable(x)  # a CPU tensor
    with torch.no_grad():
        assert not fused_ops.usable(x)  # still a CPU tensor
    y = fused_ops.FusedQuickGELU()(x)
    y.sum().backward()  # the eager path keeps the graph
    assert x.grad is not None


def test_kernel_widths_are_the_models_own(tiny_instruct: str) -> None:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_instruct, attn_implementation="sdpa")
    assert fused_ops.kernel_widths(model, cuda_only=False) == {}  # not switched: nothing fused
    assert attention.switch_vision_attention(model)
    vision = model.config.vision_config
    heads, dim = vision.num_heads, vision.embed_dim // vision.num_heads
    cpu, dtype = torch.device("cpu"), next(model.parameters()).dtype
    assert fused_ops.kernel_widths(model, cuda_only=False) == {
        ("quick_gelu", cpu, dtype): {int(vision.embed_dim * vision.mlp_ratio)},
        ("rotary", cpu, dtype): {(heads, dim)},
    }
    assert fused_ops.kernel_widths(model) == {}  # on the CPU prepare() builds nothing

    built: list[tuple[Any, ...]] = []
    real = fused_ops.fused

    def spy(name: str, device: torch.device, dtype: torch.dtype, widths: tuple[Any, ...] = ()) -> Any:
        built.append((name, widths))
        return real(name, device, dtype, widths)

    widths_of = fused_ops.kernel_widths
    with pytest.MonkeyPatch.context() as patch:  # prepare() as on CUDA, with the eager code as "kernels"
        patch.setattr(fused_ops, "fused", spy)
        patch.setattr(fused_ops, "kernel_widths", lambda m: widths_of(m, cuda_only=False))
        patch.setattr(fused_ops, "_build", lambda name: fused_ops._FUNCTIONS[name])
        fused_ops.prepare(model)
    assert sorted(built) == [("quick_gelu", (int(vision.embed_dim * vision.mlp_ratio),)), ("rotary", ((heads, dim),))]


def test_switched_qwen2_vl_towers_get_the_fused_activation_and_score_as_before(
    tiny_instruct: str, tmp_path: Path
) -> None:
    docs = []
    for i, size in enumerate([(112, 84), (56, 140)]):
        make_image(tmp_path / f"c{i}.png", size=size, color=(70 * i, 90, 200 - 60 * i))
        docs.append(Document(id=f"c{i}", meta={"file_path": str(tmp_path / f"c{i}.png")}, score=0.5))
    ranker = VisionLanguageRanker(
        tiny_instruct, recipe="zero_shot_yes_no", batch_size=2, device=ComponentDevice.from_str("cpu")
    )
    want = {d.id: d.score for d in ranker.run(query="a red chart", documents=docs)["documents"]}
    model = ranker._vlm.model  # type: ignore[union-attr]
    mlps = [m for m in model.modules() if type(m).__name__ == "VisionMlp"]
    originals = [m.act for m in mlps]
    modules = attention._vision_attention_modules(model)
    try:
        assert attention.switch_vision_attention(model)
        assert mlps
        assert all(isinstance(m.act, fused_ops.FusedQuickGELU) for m in mlps)
        got = {d.id: d.score for d in ranker.run(query="a red chart", documents=docs)["documents"]}
    finally:  # the loaded model is shared with other tests
        for mlp, act in zip(mlps, originals, strict=True):
            mlp.act = act
        for module in modules:
            module.config._attn_implementation = "sdpa"
            module.__dict__.pop("forward", None)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-4)  # grouped vs per-image SDPA: float rounding


def test_other_activations_are_left_alone() -> None:
    from transformers.activations import QuickGELUActivation

    class VisionMlp(torch.nn.Module):  # Qwen2-VL's class name, another activation
        def __init__(self) -> None:
            super().__init__()
            self.act = torch.nn.SiLU()

    class Other(torch.nn.Module):  # QuickGELU outside a Qwen-VL vision MLP
        def __init__(self) -> None:
            super().__init__()
            self.act = QuickGELUActivation()

    model = torch.nn.Sequential(VisionMlp(), Other())
    assert fused_ops.fuse_activations(model) == 0


# --- the real compile, on a CUDA device -----------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_on_cuda_the_kernels_are_used_and_give_transformers_results_bit_for_bit(dtype: torch.dtype) -> None:
    from transformers.activations import QuickGELUActivation
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    rotary = fused_ops.fused("rotary", torch.device("cuda:0"), dtype)
    gelu = fused_ops.fused("quick_gelu", torch.device("cuda:0"), dtype)
    assert rotary is not None, "the rotary kernel was not built on this GPU (see the warning)"
    assert gelu is not None
    for total in (3000, 3001):  # a multiple of 16 and not (Triton specialises on it)
        qkv, cos, sin = (t.cuda() for t in _qkv(dtype, total=total, heads=16, dim=80))
        q, k, _ = qkv.permute(1, 0, 2, 3).unbind(0)
        assert torch.equal(rotary(qkv, cos, sin), torch.stack(apply_rotary_pos_emb_vision(q, k, cos, sin)))
        x = (4 * torch.randn(total, 640, device="cuda:0")).to(dtype)
        assert torch.equal(gelu(x), QuickGELUActivation()(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA only")
def test_on_cuda_a_loaded_qwen2_vl_ranker_uses_the_kernels_and_scores_like_transformers_path(
    tiny_instruct: str, tmp_path: Path
) -> None:
    docs = []
    for i, size in enumerate([(112, 84), (56, 140), (84, 84)]):
        make_image(tmp_path / f"c{i}.png", size=size, color=(70 * i, 90, 200 - 60 * i))
        docs.append(Document(id=f"c{i}", meta={"file_path": str(tmp_path / f"c{i}.png")}, score=0.5))
    scores = {}
    for name, kwargs in (("ours", {}), ("transformers", {"model_kwargs": {"attn_implementation": "sdpa"}})):
        ranker = VisionLanguageRanker(
            tiny_instruct,
            recipe="zero_shot_yes_no",
            batch_size=3,
            device=ComponentDevice.from_str("cuda:0"),
            **kwargs,  # type: ignore[arg-type]
        )
        ranker.warm_up()
        model = ranker._vlm.model  # type: ignore[union-attr]
        fused_acts = [m for m in model.modules() if isinstance(m, fused_ops.FusedQuickGELU)]
        assert bool(fused_acts) == (name == "ours")
        scores[name] = {d.id: d.score for d in ranker.run(query="a red chart", documents=docs)["documents"]}
    dtype = next(model.parameters()).dtype
    assert fused_ops._FUSED.get(f"rotary:cuda:0:{dtype}") is not None
    assert fused_ops._FUSED.get(f"quick_gelu:cuda:0:{dtype}") is not None
    for key, want in scores["transformers"].items():
        assert scores["ours"][key] == pytest.approx(want, abs=2e-2)  # varlen vs per-image attention, in bf16


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_a_kernel_for_a_model_on_another_gpu_than_the_current_one_runs_on_that_gpu() -> None:
    # Triton launches on the current device: the launchers make it the tensors' device.
    with torch.cuda.device(0):
        rotary = fused_ops.fused("rotary", torch.device("cuda:1"), torch.bfloat16, ((16, 80),))
        assert rotary is not None
        qkv, cos, sin = (t.to("cuda:1") for t in _qkv(torch.bfloat16, total=500, heads=16, dim=80))
        got = rotary(qkv, cos, sin)
        assert got.device == torch.device("cuda:1")
        assert torch.equal(got, fused_ops.rotary_math(qkv, cos, sin))


_INTERPRETED = """
import types

import torch
import triton.language as tl

from haystack_integrations.common.multimodal_rag.backends import _triton_kernels as kernels, fused_ops

# The interpreter has no libdevice: plain operations stand in (same arithmetic in float32, maybe with other
# rounding of exp); what is checked here is the kernels' indexing, masks, strides and layouts.
kernels.libdevice = types.SimpleNamespace(
    mul_rn=lambda a, b: a * b, add_rn=lambda a, b: a + b, div_rn=lambda a, b: a / b, exp=lambda t: tl.exp(t)
)
generator = torch.Generator().manual_seed(0)
for total, heads, dim, strided in [(97, 16, 80, False), (5, 3, 72, False), (0, 4, 80, False), (33, 12, 64, True)]:
    base = torch.randn(total, 3, heads, dim + (8 if strided else 0), generator=generator)
    qkv = base[..., :dim]  # strided: the last dimension is contiguous, the others are not
    angles = torch.randn(total, dim + (4 if strided else 0), generator=generator)[:, :dim]
    got = kernels.rotary(qkv, angles.cos(), angles.sin())
    want = fused_ops.rotary_math(qkv, angles.cos(), angles.sin())
    assert got.shape == want.shape == (2, total, heads, dim) and got.is_contiguous(), (got.shape, want.shape)
    assert torch.equal(got, want), (total, heads, dim, (got - want).abs().max())
permuted = torch.randn(3, 19, 7, 40, generator=generator).permute(1, 0, 2, 3)
angles = torch.randn(19, 40, generator=generator)
assert torch.equal(kernels.rotary(permuted, angles.cos(), angles.sin()),
                   fused_ops.rotary_math(permuted, angles.cos(), angles.sin()))
for x in [4 * torch.randn(3, 5120, generator=generator), 4 * torch.randn(4097, generator=generator),
          4 * torch.randn(2, 3, 4099, generator=generator), torch.randn(64, 50, generator=generator).t()]:
    got = kernels.quick_gelu(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, fused_ops.quick_gelu_math(x), rtol=1e-6, atol=1e-6)
print("ok")
"""


def test_the_triton_kernels_index_like_the_eager_code_in_tritons_interpreter(tmp_path: Path) -> None:
    # Runs on any machine with Triton (the interpreter executes kernels on CPU tensors); the bit-for-bit check of
    # the compiled kernels is the CUDA test above.
    pytest.importorskip("triton")
    import os
    import subprocess

    script = tmp_path / "interpreted.py"
    script.write_text(_INTERPRETED)
    result = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")
