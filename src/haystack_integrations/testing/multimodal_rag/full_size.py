"""Random-weight checkpoints with the FULL shapes of the default models, for GPU throughput benchmarks.

Speed depends on shapes, not on trained values: these builders write checkpoints whose configs have the
published dimensions (layer counts, widths, heads, vocabulary, visual-token budgets) of

- `vidore/colqwen2.5-v0.2` (ColQwen2.5 on Qwen2.5-VL-3B: 36 x 2048 decoder, 16 heads / 2 KV heads,
  intermediate 11008, vocabulary 151936; vision 32 x 1280 blocks, intermediate 3420, window 112, full
  attention in blocks 7/15/23/31 — `Qwen/Qwen2.5-VL-3B-Instruct` config.json; 128-d projection),
- `Qwen/Qwen2-VL-2B-Instruct` (28 x 1536 decoder, 12 heads / 2 KV heads, intermediate 8960; vision 32 x 1280,
  16 heads, MLP ratio 4 — its config.json), the base of `lightonai/MonoQwen2-VL-v0.1`,
- `google/siglip-so400m-patch14-384` (27 x 1152 towers, 16 heads, intermediate 4304, 384 px, patch 14,
  text length 64, vocabulary 32000 — its config.json),

with small locally trained tokenizers (ids stay inside the real vocabulary size). Nothing is downloaded.
`scale="smoke"` keeps the widths but uses one layer per tower and a 1024-token vocabulary, so the whole
benchmark can be checked end to end on a CPU in minutes. Test support only: nothing at runtime imports this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from haystack_integrations.testing.multimodal_rag.tiny_models import (
    _finish_generation_config,
    _qwen_tokenizer,
    _qwen_vision_token_ids,
    _qwen_vl_processor,
    _train_sentencepiece,
)

Scale = Literal["full", "smoke"]

#: Qwen2-VL/2.5-VL image patches are 14 px, merged 2x2: one visual token per 28 x 28 pixels.
QWEN_PIXELS_PER_TOKEN = 28 * 28


def _layers(full: int, scale: Scale) -> int:
    return full if scale == "full" else 1


def _vocab(full: int, scale: Scale) -> int:
    return full if scale == "full" else 1024


def _build(model_cls: Any, config: Any, out: Path, device: str) -> None:
    # Initialise directly in bf16 on the target device: a 3B model is built in seconds on a GPU.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out)


def build_colqwen25_3b_shaped(
    path: str | Path, *, scale: Scale = "full", visual_tokens: int = 768, device: str = "cpu"
) -> Path:
    """
    Write a random ColQwen2.5 checkpoint with Qwen2.5-VL-3B shapes (`vidore/colqwen2.5-v0.2`'s base).

    :param path: Output directory (reused when it already holds a checkpoint).
    :param scale: `"full"` or `"smoke"` (one layer per tower, small vocabulary).
    :param visual_tokens: Page budget of the saved processor (ColQwen2.5 was trained with 768).
    :param device: Where to initialise the weights.
    :returns: The directory.
    """
    import colpali_engine.models as col_models
    from transformers import Qwen2_5_VLConfig

    out = Path(path)
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen_tokenizer(model_max_length=32768)
    text_config = {
        "vocab_size": _vocab(151936, scale),
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": _layers(36, scale),
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128000,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": True,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "depth": _layers(32, scale),
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31] if scale == "full" else [0],
    }
    config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **_qwen_vision_token_ids(tokenizer))
    _build(col_models.ColQwen2_5, config, out, device)
    _qwen_vl_processor(
        tokenizer, version="2.5", min_pixels=4 * QWEN_PIXELS_PER_TOKEN, max_pixels=visual_tokens * QWEN_PIXELS_PER_TOKEN
    ).save_pretrained(out)
    return out


def build_qwen2_vl_2b_shaped(
    path: str | Path, *, scale: Scale = "full", max_pixels: int = 1280 * QWEN_PIXELS_PER_TOKEN, device: str = "cpu"
) -> Path:
    """
    Write a random Qwen2-VL generator with Qwen2-VL-2B-Instruct shapes (MonoQwen2-VL's base).

    :param path: Output directory (reused when it already holds a checkpoint).
    :param scale: `"full"` or `"smoke"`.
    :param max_pixels: Pixel budget of the saved image processor.
    :param device: Where to initialise the weights.
    :returns: The directory.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    out = Path(path)
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen_tokenizer(model_max_length=32768)
    text_config = {
        "vocab_size": _vocab(151936, scale),
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": _layers(28, scale),
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": True,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }
    vision_config = {
        "depth": _layers(32, scale),
        "embed_dim": 1280,
        "hidden_size": 1536,
        "num_heads": 16,
        "mlp_ratio": 4,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(text_config=text_config, vision_config=vision_config, **_qwen_vision_token_ids(tokenizer))
    _build(Qwen2VLForConditionalGeneration, config, out, device)
    _qwen_vl_processor(
        tokenizer, version="2", min_pixels=4 * QWEN_PIXELS_PER_TOKEN, max_pixels=max_pixels
    ).save_pretrained(out)
    _finish_generation_config(out, tokenizer)
    return out


def build_siglip_so400m_shaped(path: str | Path, *, scale: Scale = "full", device: str = "cpu") -> Path:
    """
    Write a random SigLIP dual encoder with `google/siglip-so400m-patch14-384` shapes.

    :param path: Output directory (reused when it already holds a checkpoint).
    :param scale: `"full"` or `"smoke"`.
    :param device: Where to initialise the weights.
    :returns: The directory.
    """
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor, SiglipTokenizer

    out = Path(path)
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    spiece = _train_sentencepiece(out)
    tokenizer = SiglipTokenizer(vocab_file=str(spiece), model_max_length=64)
    tower = {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16}
    config = SiglipConfig(
        text_config={
            **tower,
            "num_hidden_layers": _layers(27, scale),
            "vocab_size": _vocab(32000, scale),
            "max_position_embeddings": 64,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 1,
        },
        vision_config={**tower, "num_hidden_layers": _layers(27, scale), "image_size": 384, "patch_size": 14},
    )
    _build(SiglipModel, config, out, device)
    processor = SiglipProcessor(
        image_processor=SiglipImageProcessor(size={"height": 384, "width": 384}), tokenizer=tokenizer
    )
    processor.save_pretrained(out)
    return out
