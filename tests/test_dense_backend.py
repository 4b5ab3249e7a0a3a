"""The dense (CLIP-family) backend: text inputs as each family was trained, token counts, default dtype."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from haystack_integrations.common.multimodal_rag.backends import acceleration, dense
from haystack_integrations.common.multimodal_rag.backends.acceleration import choose_default_dtype
from haystack_integrations.common.multimodal_rag.backends.dense import DenseEncoder
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec
from haystack_integrations.testing.multimodal_rag.tiny_models import build_tiny_siglip2_fixres

TEXT = "A Bar Chart of Quarterly Revenue by Region"


def _encoder(model: str, **model_kwargs) -> DenseEncoder:
    return DenseEncoder.get(
        LoadSpec(
            model=model,
            component="test",
            device="cpu",
            token=None,
            local_files_only=True,
            model_kwargs=model_kwargs or None,
        )
    )


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_siglip_text_inputs_equal_the_trained_recipe(family: str, request: pytest.FixtureRequest) -> None:
    # Reference recipe (transformers modeling_siglip.py:507/691/770; docs model_doc/siglip2.md; Siglip2Processor
    # text defaults): tokenizer(text, padding="max_length", max_length=64) with the checkpoint's tokenizer, which
    # (like the released ones) returns input_ids only and pads right.
    path = request.getfixturevalue(f"tiny_{family}")
    reference = AutoTokenizer.from_pretrained(path)(TEXT, padding="max_length", max_length=64, return_tensors="pt")
    assert list(reference.keys()) == ["input_ids"]

    ours = _encoder(path).text_inputs([TEXT])
    assert list(ours) == ["input_ids"]  # no attention mask
    assert ours["input_ids"].shape == (1, 64)
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    # Right padding: the text comes first, the pad token fills the end (the pooled last position is a pad).
    ids = ours["input_ids"][0].tolist()
    pad = AutoTokenizer.from_pretrained(path).pad_token_id
    assert ids[-1] == pad
    assert ids[0] != pad


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_siglip_embedding_equals_the_reference_forward_pass_without_mask(
    family: str, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(f"tiny_{family}")
    model = AutoModel.from_pretrained(path).eval()
    ids = AutoTokenizer.from_pretrained(path)(
        TEXT, padding="max_length", max_length=64, return_attention_mask=True, return_tensors="pt"
    )
    assert 0 < int(ids["attention_mask"].sum()) < 64
    with torch.inference_mode():
        reference = model.get_text_features(input_ids=ids["input_ids"]).pooler_output
        masked = model.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).pooler_output
    reference = torch.nn.functional.normalize(reference, dim=-1).numpy()[0]
    ours = _encoder(path).embed_texts([TEXT], normalize=True)[0]
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    # A mask changes the embedding, so the comparison above would catch one being passed.
    assert not np.allclose(torch.nn.functional.normalize(masked, dim=-1).numpy()[0], reference, atol=1e-4)


def test_siglip2_pads_right_without_mask_even_when_the_tokenizer_config_says_left(
    tiny_siglip2: str, tmp_path: Path
) -> None:
    # Siglip2Tokenizer's class default is left padding with a mask (tokenization_siglip2.py:37-38): a checkpoint
    # whose tokenizer_config does not override it must still be fed as SigLIP 2 was trained.
    copy = Path(shutil.copytree(tiny_siglip2, tmp_path / "siglip2_left"))
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["padding_side"] = "left"
    config.pop("model_input_names", None)
    config_path.write_text(json.dumps(config))
    left = AutoTokenizer.from_pretrained(copy)(TEXT, padding="max_length", max_length=64)
    assert "attention_mask" in left
    assert left["input_ids"][0] == AutoTokenizer.from_pretrained(copy).pad_token_id  # really left-padded

    ours = _encoder(str(copy)).text_inputs([TEXT])
    expected = AutoTokenizer.from_pretrained(tiny_siglip2)(TEXT, padding="max_length", max_length=64)
    assert list(ours) == ["input_ids"]
    assert ours["input_ids"][0].tolist() == expected["input_ids"]


def test_siglip2_text_is_lowercased_and_siglip_v1_tokenizer_lowercases_itself(
    tiny_siglip: str, tiny_siglip2: str
) -> None:
    v2 = _encoder(tiny_siglip2)
    assert v2.lowercase  # SigLIP 2 was trained on lowercased text (docs/source/en/model_doc/siglip2.md)
    assert torch.equal(v2.text_inputs([TEXT])["input_ids"], v2.text_inputs([TEXT.lower()])["input_ids"])
    v1 = _encoder(tiny_siglip)
    assert not v1.lowercase  # SiglipTokenizer(do_lower_case=True) canonicalizes itself
    assert torch.equal(v1.text_inputs([TEXT])["input_ids"], v1.text_inputs([TEXT.lower()])["input_ids"])


def test_clip_keeps_its_attention_mask_and_77_tokens(tiny_clip: str) -> None:
    encoder = _encoder(tiny_clip)
    inputs = encoder.text_inputs([TEXT])
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert inputs["input_ids"].shape == (1, 77)
    reference = AutoTokenizer.from_pretrained(tiny_clip)(TEXT, padding="max_length", max_length=77, truncation=True)
    assert inputs["input_ids"][0].tolist() == reference["input_ids"]
    assert inputs["attention_mask"][0].tolist() == reference["attention_mask"]
    assert not encoder.lowercase


@pytest.mark.parametrize("family", ["siglip", "siglip2", "clip"])
def test_token_counts_are_taken_before_truncation(family: str, request: pytest.FixtureRequest) -> None:
    encoder = _encoder(request.getfixturevalue(f"tiny_{family}"))
    long_text = " ".join(["revenue grew in the third quarter"] * 40)
    short, long = encoder.token_counts(["a cat", long_text])
    assert short <= 8
    assert long > encoder.max_length
    assert encoder.text_inputs([long_text])["input_ids"].shape[1] == encoder.max_length


@pytest.mark.parametrize(
    ("device", "recorded", "cuda_bf16", "cpu_bf16", "expected"),
    [
        ("cuda:0", None, True, False, "bfloat16"),
        ("cuda:0", "float32", True, False, "bfloat16"),
        ("cuda:0", "float16", True, False, "float16"),
        ("cuda:0", "bfloat16", False, False, "float32"),
        ("cpu", None, False, True, "float32"),
        ("cpu", "bfloat16", False, False, "float32"),
        ("cpu", "bfloat16", False, True, "bfloat16"),
        ("cpu", "float16", False, True, "float32"),
        ("mps", "bfloat16", False, True, "float32"),
    ],
)
def test_default_dtype_rule(device: str, recorded: str | None, cuda_bf16: bool, cpu_bf16: bool, expected: str) -> None:
    assert choose_default_dtype(device, recorded, cuda_bf16=cuda_bf16, cpu_bf16=cpu_bf16) == expected


def _bf16_checkpoint(source: str, target: Path) -> str:
    copy = Path(shutil.copytree(source, target))
    config = json.loads((copy / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (copy / "config.json").write_text(json.dumps(config))
    return str(copy)


def test_a_bf16_checkpoint_loads_in_float32_on_a_cpu_without_native_bf16(
    tiny_siglip: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(acceleration, "cpu_has_native_bf16", lambda: False)
    path = _bf16_checkpoint(tiny_siglip, tmp_path / "bf16_no_native")
    assert AutoModel.from_pretrained(path).dtype == torch.bfloat16  # what transformers' dtype="auto" would do
    assert _encoder(path).dtype == torch.float32


def test_a_bf16_checkpoint_stays_bf16_on_a_cpu_with_native_bf16(
    tiny_siglip: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(acceleration, "cpu_has_native_bf16", lambda: True)
    path = _bf16_checkpoint(tiny_siglip, tmp_path / "bf16_native")
    assert _encoder(path).dtype == torch.bfloat16


def test_an_explicit_dtype_wins_and_emulated_bf16_is_warned_about(
    tiny_siglip: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(acceleration, "cpu_has_native_bf16", lambda: False)
    path = str(shutil.copytree(tiny_siglip, tmp_path / "explicit"))
    with caplog.at_level(logging.WARNING):
        encoder = _encoder(path, dtype="bfloat16")
    assert encoder.dtype == torch.bfloat16
    assert "SLOWER than float32" in caplog.text


def test_cpu_bf16_detection_reads_the_cpu_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    expected = any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))
    if "aarch64" in flags or not flags:
        pytest.skip("x86 Linux only")
    assert acceleration.cpu_has_native_bf16() is expected


@pytest.fixture(scope="module")
def tiny_siglip2_fixres(tmp_path_factory: pytest.TempPathFactory) -> str:
    """SigLIP architecture with a Gemma tokenizer at its class defaults (left padding, mask, no lowercasing)."""
    return str(build_tiny_siglip2_fixres(tmp_path_factory.mktemp("fixres") / "siglip2_fixres"))


def test_siglip2_fixres_with_a_gemma_tokenizer_gets_the_siglip2_recipe(tiny_siglip2_fixres: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_siglip2_fixres)
    assert type(tokenizer).__name__ == "GemmaTokenizer"
    assert tokenizer.padding_side == "left"
    encoder = _encoder(tiny_siglip2_fixres)
    assert encoder.family == "siglip"
    assert encoder.lowercase  # a Gemma tokenizer does not lowercase; SigLIP 2 was trained on lowercased text
    # The recipe: lowercased text, padding="max_length", max_length=64, right side, input_ids only.
    expected = tokenizer(
        TEXT.lower(), padding="max_length", max_length=64, padding_side="right", return_attention_mask=False
    )
    ours = encoder.text_inputs([TEXT])
    assert list(ours) == ["input_ids"]
    assert ours["input_ids"][0].tolist() == expected["input_ids"]
    assert ours["input_ids"][0, -1].item() == tokenizer.pad_token_id
    assert ours["input_ids"][0].tolist() != tokenizer(TEXT, padding="max_length", max_length=64)["input_ids"]


@pytest.mark.parametrize("family", ["siglip", "siglip2", "clip"])
def test_image_inputs_are_the_processors_own_on_the_host(family: str, request: pytest.FixtureRequest) -> None:
    from PIL import Image

    path = request.getfixturevalue(f"tiny_{family}")
    encoder = _encoder(path)
    images = [Image.new("RGB", (64 + 16 * i, 48), (40 * i, 120, 200)) for i in range(3)]
    ours = encoder.image_inputs(images)
    reference = encoder.image_processor(images=images, return_tensors="pt")
    assert set(ours) == set(reference)
    for key, value in reference.items():
        assert torch.equal(ours[key], value)
    np.testing.assert_allclose(
        encoder.embed_image_inputs(ours, normalize=True), encoder.embed_images(images, normalize=True), atol=1e-6
    )


@pytest.mark.parametrize("staging_bytes", [dense.STAGING_BYTES, 64 * 48 * 3 * 2])  # 2nd: blocks of 2 (64x48) images
@pytest.mark.parametrize("family", ["siglip", "siglip2", "clip"])
def test_batched_uint8_pixels_give_the_processors_own_pixel_values(
    family: str, staging_bytes: int, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the GPU path hands the torchvision processor instead of PIL images: the processor's outputs must be
    # equal, bit for bit, to those it computes from the PIL images (same device, so no rounding may differ).
    from PIL import Image

    monkeypatch.setattr(dense, "STAGING_BYTES", staging_bytes)
    encoder = _encoder(request.getfixturevalue(f"tiny_{family}"))
    assert encoder.image_processor.backend == "torchvision"
    rng = np.random.default_rng(3)
    sizes = [(64, 48), (48, 64), (64, 48), (1, 40), (40, 1), (3, 3), (4, 1), (3, 200), (64, 48)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    pixels = dense.uint8_pixels(images, "cpu")
    assert pixels is not None
    for image, tensor in zip(images, pixels, strict=True):
        assert tensor.dtype == torch.uint8
        assert tensor.shape == (3, image.height, image.width)
        assert torch.equal(tensor, torch.from_numpy(np.array(image)).permute(2, 0, 1))
    ours = encoder.image_processor(images=pixels, return_tensors="pt", input_data_format="channels_first")
    reference = encoder.image_processor(images=images, return_tensors="pt")
    assert set(ours) == set(reference)
    for key, value in reference.items():
        assert torch.equal(ours[key], value), key


def test_uint8_pixels_leave_images_that_are_not_plain_rgb_to_the_processor() -> None:
    from PIL import Image

    rgb = Image.new("RGB", (8, 6), (10, 20, 30))
    keyed = Image.new("RGB", (8, 6), (10, 20, 30))
    keyed.info["transparency"] = (10, 20, 30)  # the processor composites this onto white itself
    assert dense.uint8_pixels([rgb, Image.new("RGBA", (8, 6))], "cpu") is None
    assert dense.uint8_pixels([rgb, Image.new("L", (8, 6))], "cpu") is None
    assert dense.uint8_pixels([keyed], "cpu") is None
    assert dense.uint8_pixels([], "cpu") is None
    assert dense.uint8_pixels([rgb], "cpu") is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU preprocessing runs on CUDA only")
@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_on_cuda_the_torchvision_processor_runs_on_the_gpu_with_the_hosts_result(
    family: str, request: pytest.FixtureRequest
) -> None:
    from PIL import Image

    path = request.getfixturevalue(f"tiny_{family}")
    encoder = DenseEncoder.get(
        LoadSpec(model=path, component="test", device="cuda:0", token=None, local_files_only=True, model_kwargs=None)
    )
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(3)]
    on_gpu = encoder.image_inputs(images)
    torch.cuda.synchronize()  # prepared on a side stream
    on_host = encoder.image_processor(images=images, return_tensors="pt")
    assert on_gpu["pixel_values"].is_cuda
    # The same torchvision operations, on another device: the GPU's antialiased bicubic resize of uint8 pixels rounds
    # differently from the host's uint8 kernel. Measured on an H100 (2026-11-23): up to 3 grey levels apart on ~15% of
    # the values (0.0235 after SigLIP's [-1, 1] normalisation, where one level is 2/255).
    level = 2 / 255
    for key, value in on_host.items():
        difference = (on_gpu[key].cpu().float() - value.float()).abs()
        assert float(difference.max()) <= 4 * level
        assert float(difference.mean()) <= level


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU preprocessing runs on CUDA only")
def test_on_cuda_staged_pixels_give_what_the_processor_computes_on_the_gpu_from_pil_images(tiny_siglip: str) -> None:
    # Same device, same operations: the one batched, page-locked copy changes where the pixels come from, not a value.
    from PIL import Image

    encoder = DenseEncoder.get(
        LoadSpec(
            model=tiny_siglip, component="test", device="cuda:0", token=None, local_files_only=True, model_kwargs=None
        )
    )
    rng = np.random.default_rng(2)
    sizes = [(64, 48), (48, 64), (64, 48), (1, 40), (3, 3)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    ours = encoder.image_inputs(images)
    torch.cuda.synchronize()  # prepared on a side stream
    reference = encoder.image_processor(images=images, return_tensors="pt", device="cuda:0")
    for key, value in reference.items():
        assert ours[key].is_cuda
        assert torch.equal(ours[key], value), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU preprocessing runs on CUDA only")
def test_on_cuda_embeddings_from_side_stream_preprocessing_match_host_preprocessing(tiny_siglip: str) -> None:
    from PIL import Image

    spec = LoadSpec(
        model=tiny_siglip, component="test", device="cuda:0", token=None, local_files_only=True, model_kwargs=None
    )
    encoder = DenseEncoder.get(spec)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(8)]
    for _ in range(3):  # repeated: a missing wait on the side stream would show as a changing result
        fast = encoder.embed_image_inputs(encoder.image_inputs(images), normalize=True)
        host = dict(encoder.image_processor(images=images, return_tensors="pt"))
        reference = encoder.embed_image_inputs(host, normalize=True)
        assert np.isfinite(fast).all()
        np.testing.assert_allclose(fast, reference, atol=5e-2)
