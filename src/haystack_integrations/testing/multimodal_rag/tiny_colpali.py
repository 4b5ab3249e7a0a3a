"""Tiny random-weight ColPali-family checkpoints, one per colpali-engine architecture, built locally for tests.

Each builder writes a complete folder with `save_pretrained` (weights, `config.json` naming the colpali-engine
class in `architectures`, the processor and tokenizer files), so the components load it through their real
loading code, by path. The configs keep the real checkpoints' layout (the same `model_type`, sub-config types,
special tokens, prompt tokens and padding side); only the sizes are tiny. Nothing here touches the network.

Families (colpali-engine 0.3.18, `colpali_engine/models/__init__.py`):

| builder                       | colpali-engine class | transformers `model_type` | real checkpoint it mirrors |
|-------------------------------|----------------------|---------------------------|----------------------------|
| `build_tiny_colpali`          | `ColPali`            | `paligemma`               | vidore/colpali-v1.3 (base) |
| `build_tiny_colqwen("2")`     | `ColQwen2`           | `qwen2_vl`                | vidore/colqwen2-v1.0       |
| `build_tiny_colqwen("2.5")`   | `ColQwen2_5`         | `qwen2_5_vl`              | vidore/colqwen2.5-v0.2     |
| `build_tiny_colqwen("3")`     | `ColQwen3`           | `qwen3_vl`                | ColQwen3 checkpoints       |
| `build_tiny_colqwen3_5`       | `ColQwen3_5`         | `qwen3_5`                 | athrael-soju/colqwen3.5-4.5B-v3 |
| `build_tiny_colgemma3`        | `ColGemma3`          | `gemma3`                  | Cognitive-Lab/ColNetraEmbed |
| `build_tiny_colidefics3`      | `ColIdefics3`        | `idefics3`                | vidore/colSmol-256M        |
| `build_tiny_colmodernvbert`   | `ColModernVBert`     | `modernvbert`             | ModernVBERT/colmodernvbert |
| `build_tiny_colpali_adapter`  | (PEFT LoRA adapter)  | base's                    | colqwen2.5-v0.2, colpali-v1.3 |
| `build_tiny_colqwen2_5_omni`  | `ColQwen2_5Omni`     | `qwen2_5_omni_thinker`    | colqwen-omni-v0.1 (broken) |
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from haystack_integrations.testing.multimodal_rag.tiny_models import (
    TINY_TOWER,
    _corpus,
    _qwen_vision_token_ids,
    _train_bpe,
    build_tiny_qwen2_vl,
)

#: The families a tiny checkpoint can be built for, by colpali-engine class name.
FAMILIES: tuple[str, ...] = (
    "ColPali",
    "ColQwen2",
    "ColQwen2_5",
    "ColQwen3",
    "ColQwen3_5",
    "ColGemma3",
    "ColIdefics3",
    "ColModernVBert",
)

#: colpali-engine classes that cannot be built or loaded with the installed colpali-engine and transformers, with
#: the upstream error. `ColQwen2_5Omni` (colpali-engine 0.3.18, transformers 5.23): its `spatial_merge_size` setter
#: writes `self.visual.config`, but transformers' `Qwen2_5OmniThinkerForConditionalGeneration.__init__` assigns
#: `spatial_merge_size` while the vision tower lives at `self.model.visual` (there is no `self.visual`), so even
#: `ColQwen2_5Omni(config)` raises; with that patched, `__init__` next reads `self.model.config.hidden_size`, which
#: the thinker config keeps in `text_config` only.
BROKEN_FAMILIES: dict[str, str] = {"ColQwen2_5Omni": "'ColQwen2_5Omni' object has no attribute 'visual'"}


def _gemma_tokenizer(*, padding_side: str = "right", **kwargs: Any) -> Any:
    """A tiny Gemma tokenizer laid out like PaliGemma's: `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, "▁" spaces."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # The same normalizer / pre-tokenizer as transformers' GemmaTokenizer, so the trained merges apply.
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, initial_alphabet=["\n", "▁"])
    bpe.train_from_iterator(_corpus(), trainer)
    data = json.loads(bpe.to_str())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    # PaliGemma's tokenizer pads on the right (transformers' GemmaTokenizer class default is "left");
    # colpali-engine's training collator forces "right" for ColPali (CE/collators/visual_retriever_collator.py:49-51).
    return GemmaTokenizer(
        vocab=data["model"]["vocab"],
        merges=merges,  # type: ignore[arg-type]
        padding_side=padding_side,
        **kwargs,
    )


def build_tiny_colpali(path: str | Path, *, image_size: int = 28, seed: int = 0) -> Path:
    """
    Write a tiny random ColPali (PaliGemma: SigLIP vision tower + Gemma decoder with a tied lm_head) to `path`.

    Like the real `vidore/colpali-v1.3` base, the saved weights have no `lm_head` key (it is tied to the input
    embeddings), which is what leaves it on the meta device when colpali-engine 0.3.18 loads it under
    transformers 5 (see `backends/colpali.py`).

    :param path: Output directory.
    :param image_size: SigLIP input resolution (patch size 14, so `(image_size / 14) ** 2` image tokens).
    :param seed: Random seed of the weights.
    :returns: The directory.
    """
    from colpali_engine.models import ColPali, ColPaliProcessor
    from transformers import PaliGemmaConfig, SiglipImageProcessor

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _gemma_tokenizer()
    patch = 14
    image_seq_length = (image_size // patch) ** 2
    # Real PaliGemma-448: SigLIP resize to 448x448, rescale 1/255, mean = std = 0.5, image_seq_length 1024.
    image_processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        image_seq_length=image_seq_length,
    )
    processor = ColPaliProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds the <image> token
    vocab_size = len(tokenizer)
    config = PaliGemmaConfig(
        text_config={
            "model_type": "gemma",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "vocab_size": vocab_size,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch,
            "projection_dim": 64,
        },
        projection_dim=64,
        image_token_index=processor.image_token_id,
        vocab_size=vocab_size,
    )
    torch.manual_seed(seed)
    ColPali(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


#: Gemma 3's chat template (google/gemma-3-4b-it chat_template, without its system-turn handling): a BOS, then per
#: message `<start_of_turn>{role}\n`, the text parts trimmed and `<start_of_image>` for each image part, then
#: `<end_of_turn>\n`. ColGemmaProcessor3 formats both pages and queries with it.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _gemma3_tokenizer() -> Any:
    """
    A tiny Gemma 3 tokenizer: PaliGemma's layout plus Gemma 3's turn and image tokens.

    Gemma 3 declares its image tokens as named special tokens (tokenizer_config.json `extra_special_tokens`:
    `boi_token` "<start_of_image>", `eoi_token` "<end_of_image>", `image_token` "<image_soft_token>"), which
    transformers' Gemma3Processor reads (`tokenizer.boi_token`, ...); "<start_of_turn>" / "<end_of_turn>" are special
    added tokens, so the chat template's markers stay single tokens.
    """
    tokenizer = _gemma_tokenizer(
        padding_side="left",  # what ColGemmaProcessor3 sets (processing_colgemma.py)
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tokenizer


def build_tiny_colgemma3(path: str | Path, *, image_size: int = 56, seed: int = 0) -> Path:
    """
    Write a tiny random ColGemma3 (Gemma 3: SigLIP vision tower average-pooled to a fixed token grid + Gemma 3 text).

    Mirrors Cognitive-Lab/ColNetraEmbed (google/gemma-3-4b-it based, the checkpoint colpali-engine names for this
    class in commit 8b6700f, "Add BiGemma3 and ColGemma3 models (#362)"): `model_type` `gemma3`, sliding-window and
    full-attention layers (here one of each; Gemma 3 has five sliding per full one), the Gemma 3 special tokens and
    chat template, and a fixed number of image tokens per page (`mm_tokens_per_image`; 256 for the 896 px SigLIP of
    the real model, 4 here). ColGemma3 projects to 128 dimensions (modeling_colgemma.py: `self.dim = 128`).

    :param path: Output directory.
    :param image_size: SigLIP input resolution (patch 14; the patches are average-pooled to a 2x2 grid).
    :param seed: Random seed of the weights.
    :returns: The directory.
    """
    from colpali_engine.models import ColGemma3, ColGemmaProcessor3
    from transformers import Gemma3Config, Gemma3ImageProcessor

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _gemma3_tokenizer()
    patch, mm_tokens = 14, 4
    config = Gemma3Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 16,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "max_position_embeddings": 2048,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch,
            "vision_use_head": False,
        },
        mm_tokens_per_image=mm_tokens,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    )
    torch.manual_seed(seed)
    ColGemma3(config).save_pretrained(out)
    # google/gemma-3-4b-it preprocessor_config.json: Gemma3ImageProcessor, 896x896, bilinear, mean = std = 0.5,
    # no pan-and-scan; `image_seq_length` 256 = mm_tokens_per_image.
    image_processor = Gemma3ImageProcessor(
        size={"height": image_size, "width": image_size}, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    ColGemmaProcessor3(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=mm_tokens,
    ).save_pretrained(out)
    return out


def _qwen_bpe_tokenizer(tokenizer_cls: Any) -> Any:
    """A tiny byte-level BPE tokenizer of `tokenizer_cls` with Qwen's special tokens."""
    from haystack_integrations.testing.multimodal_rag.tiny_models import QWEN_SPECIAL_TOKENS

    vocab, merges = _train_bpe(list(QWEN_SPECIAL_TOKENS), vocab_size=400)
    tokenizer = tokenizer_cls(vocab=vocab, merges=merges, model_max_length=1024)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    return tokenizer


def _qwen3_tokenizer() -> Any:
    from transformers import Qwen2Tokenizer

    return _qwen_bpe_tokenizer(Qwen2Tokenizer)


def build_tiny_colqwen3(path: str | Path, *, seed: int = 0) -> Path:
    """
    Write a tiny random ColQwen3 (Qwen3-VL backbone, 320-d projection) to `path`.

    :param path: Output directory.
    :param seed: Random seed of the weights.
    :returns: The directory.
    """
    from colpali_engine.models import ColQwen3, ColQwen3Processor
    from transformers import Qwen3VLConfig

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen3_tokenizer()
    hidden = 32
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 2048,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=_qwen3_vision_config(out_hidden_size=hidden, depth=2, deepstack_visual_indexes=[1]),
        **_qwen_vision_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    ColQwen3(config).save_pretrained(out)
    # Qwen3-VL: patch 16, merge 2 -> 32-pixel factor (transformers' image_processing_auto maps qwen3_vl to the
    # Qwen2-VL image processor).
    _save_qwen3_vl_processor(ColQwen3Processor, tokenizer, out)
    return out


def _qwen3_vision_config(*, out_hidden_size: int, depth: int, **extra: Any) -> dict[str, Any]:
    """A tiny Qwen3-VL style vision tower (patch 16, merge 2, temporal patch 2), as Qwen3-VL and Qwen3.5 use."""
    return {
        "depth": depth,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": out_hidden_size,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,
        **extra,
    }


def _save_qwen3_vl_processor(processor_cls: Any, tokenizer: Any, out: Path) -> None:
    """A Qwen3-VL style processor (patch 16, merge 2, mean = std = 0.5) with tiny pixel budgets, saved to `out`."""
    from transformers import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        merge_size=2,
        min_pixels=32 * 32 * 4,
        max_pixels=32 * 32 * 16,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor_cls(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor()
    ).save_pretrained(out)


def _qwen3_5_tokenizer() -> Any:
    # transformers 5 loads every `qwen3_5` checkpoint's tokenizer as `Qwen3_5Tokenizer`, whatever class its
    # tokenizer_config.json names (TF/models/auto/tokenization_auto.py: `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`),
    # so the tiny checkpoint uses that class too: byte-level BPE, "<|endoftext|>" as pad / eos / unk.
    from transformers.models.qwen3_5 import Qwen3_5Tokenizer

    return _qwen_bpe_tokenizer(Qwen3_5Tokenizer)


def build_tiny_colqwen3_5(path: str | Path, *, seed: int = 0) -> Path:
    """
    Write a tiny random ColQwen3.5 (Qwen3.5 backbone: Gated DeltaNet + full-attention layers, 320-d projection).

    Mirrors athrael-soju/colqwen3.5-4.5B-v3, the checkpoint colpali-engine names for this class (commit 9be8f19,
    "Add ColQwen3.5 and BiQwen3.5 model support (#400)"): `model_type` `qwen3_5`, a text stack that alternates
    linear-attention (Gated DeltaNet) and full-attention layers (here one of each; Qwen3.5-4B has three linear layers
    per full one), the Qwen3-VL style vision tower (patch 16, merge 2) and `dim: 320` in config.json, which
    `ColQwen3_5` reads (`getattr(config, "dim", 128)`; the model card: "Projection head is 320-dim (trained)").

    :param path: Output directory.
    :param seed: Random seed of the weights.
    :returns: The directory.
    """
    from colpali_engine.models import ColQwen3_5, ColQwen3_5Processor
    from transformers import Qwen3_5Config

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen3_5_tokenizer()
    hidden = 32
    config = Qwen3_5Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": 2,
            "layer_types": ["linear_attention", "full_attention"],
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 2,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "max_position_embeddings": 2048,
            # Qwen3.5: interleaved M-RoPE on a quarter of each head (partial_rotary_factor 0.25): 2 frequency pairs
            # for head_dim 16, split over (t, h, w).
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.25,
                "mrope_section": [1, 1, 0],
                "mrope_interleaved": True,
            },
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=_qwen3_vision_config(out_hidden_size=hidden, depth=1),
        **_qwen_vision_token_ids(tokenizer),
        dim=320,  # type: ignore[call-arg]  # no Qwen3_5Config field: an extra key, as in the real config.json
    )
    torch.manual_seed(seed)
    ColQwen3_5(config).save_pretrained(out)
    # Qwen3.5's preprocessor (Qwen/Qwen3.5-*: Qwen3VLProcessor, patch 16, merge 2, mean = std = 0.5); tiny pixel
    # budgets keep the tests fast. colpali-engine's training script passes `max_num_visual_tokens=768`
    # (scripts/configs/qwen3_5/train_colqwen3_5_model.py) and its trainer saves that processor with the checkpoint
    # (ColModelTraining.save), so a trained checkpoint's own preprocessor config carries its budget.
    _save_qwen3_vl_processor(ColQwen3_5Processor, tokenizer, out)
    return out


#: Qwen2.5-Omni's special tokens (Qwen/Qwen2.5-Omni-3B tokenizer_config.json): the processor reads each as a named
#: tokenizer attribute (`tokenizer.image_token`, `tokenizer.vision_bos_token`, ...).
_OMNI_NAMED_TOKENS: dict[str, str] = {
    "audio_token": "<|AUDIO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
}

# Qwen2.5-Omni's chat template, reduced to the parts ColQwen2_5OmniProcessor uses (a system turn, then a user turn of
# text and image / audio / video parts, each media part as `bos + placeholder + eos`).
_OMNI_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_colqwen2_5_omni_processor(path: str | Path) -> tuple[Path, Any]:
    """
    Write a tiny ColQwen2.5-Omni processor (Qwen2.5-Omni tokenizer, image / video / audio processors) to `path`.

    :param path: Output directory.
    :returns: The directory and the tokenizer (for the model config's token ids).
    """
    from colpali_engine.models import ColQwen2_5OmniProcessor
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, WhisperFeatureExtractor

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    turn = ["<|im_start|>", "<|im_end|>"]
    vocab, merges = _train_bpe(["<|endoftext|>", *turn, *_OMNI_NAMED_TOKENS.values()], vocab_size=400)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=2048,
        chat_template=_OMNI_CHAT_TEMPLATE,  # ColQwen2_5OmniProcessor takes the tokenizer's template
        extra_special_tokens=_OMNI_NAMED_TOKENS,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": turn})
    ColQwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16),
        video_processor=Qwen2VLVideoProcessor(),
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tokenizer,
        chat_template=_OMNI_CHAT_TEMPLATE,
    ).save_pretrained(out)
    return out, tokenizer


def build_tiny_colqwen2_5_omni(path: str | Path, *, seed: int = 0) -> Path:
    """
    Write a tiny random ColQwen2.5-Omni (the Qwen2.5-Omni thinker: Qwen2.5-VL vision tower, Whisper-style audio
    encoder, Qwen2 text model) to `path`, laid out like vidore/colqwen-omni-v0.1.

    Raises with colpali-engine 0.3.18 under transformers 5.23 (see `BROKEN_FAMILIES`): the processor files are
    written first, the model cannot be instantiated.

    :param path: Output directory.
    :param seed: Random seed of the weights.
    :returns: The directory.
    """
    from colpali_engine.models import ColQwen2_5Omni
    from transformers.models.qwen2_5_omni import Qwen2_5OmniThinkerConfig

    out, tokenizer = build_tiny_colqwen2_5_omni_processor(path)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in _OMNI_NAMED_TOKENS.items()}
    config = Qwen2_5OmniThinkerConfig(
        text_config={
            "vocab_size": len(tokenizer),
            **TINY_TOWER,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "pad_token_id": tokenizer.pad_token_id,
        },
        # Qwen2.5-Omni's vision tower is Qwen2.5-VL's (windowed blocks plus full-attention blocks).
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": TINY_TOWER["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        audio_config={
            "num_mel_bins": 128,
            "encoder_layers": 1,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "d_model": 32,
            "output_dim": TINY_TOWER["hidden_size"],
        },
        audio_token_index=ids["audio_token"],
        image_token_index=ids["image_token"],
        video_token_index=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"],
        # Read by the thinker's rope index (config.vision_start_token_id) but no field of the thinker config: the real
        # checkpoints' thinker_config carries them as extra keys.
        vision_start_token_id=ids["vision_bos_token"],  # type: ignore[call-arg]
        vision_end_token_id=ids["vision_eos_token"],
    )
    torch.manual_seed(seed)
    ColQwen2_5Omni(config).save_pretrained(out)
    return out


def build_tiny_colqwen(path: str | Path, *, version: str = "2.5", seed: int = 0) -> Path:
    """
    Write a tiny random ColQwen2 / ColQwen2.5 / ColQwen3 checkpoint to `path`.

    :param path: Output directory.
    :param version: `"2"`, `"2.5"` or `"3"`.
    :param seed: Random seed of the weights.
    :returns: The directory.
    :raises ValueError: On an unknown version.
    """
    if version == "3":
        return build_tiny_colqwen3(path, seed=seed)
    if version not in ("2", "2.5"):
        msg = f"version must be '2', '2.5' or '3', got {version!r}"
        raise ValueError(msg)
    return build_tiny_qwen2_vl(path, kind="colpali", version=version, seed=seed)


# Idefics3 / SmolVLM special tokens (transformers' Idefics3Processor looks up all of them; 6x6 is its row/col grid).
_IDEFICS3_SPECIALS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|begin_of_text|>",
    "<end_of_utterance>",
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    *(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)),
)


def _idefics3_style_tokenizer() -> Any:
    from transformers import GPT2Tokenizer

    vocab, merges = _train_bpe(list(_IDEFICS3_SPECIALS[:1]), vocab_size=400)
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=2048)
    tokenizer.add_special_tokens(
        {"pad_token": "<|endoftext|>", "additional_special_tokens": list(_IDEFICS3_SPECIALS[1:])}
    )
    return tokenizer


def _idefics3_image_processor(tile: int) -> Any:
    from transformers import Idefics3ImageProcessor

    # SmolVLM / colSmol: longest_edge 2048, tiles of 512 (max_image_size), split into tiles + 1 global image
    # (TF/models/idefics3/image_processing_idefics3.py); here 2 x 2 tiles at most.
    return Idefics3ImageProcessor(
        size={"longest_edge": 2 * tile},
        max_image_size={"longest_edge": tile},
        do_image_splitting=True,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )


def build_tiny_colidefics3(path: str | Path, *, tile: int = 28, seed: int = 0) -> Path:
    """
    Write a tiny random ColIdefics3 (the ColSmol layout: Idefics3 with a Llama decoder) to `path`.

    :param path: Output directory.
    :param tile: Tile size of the image splitting (= the SigLIP input size; patch 14, pixel shuffle 2).
    :param seed: Random seed of the weights.
    :returns: The directory.
    """
    from colpali_engine.models import ColIdefics3, ColIdefics3Processor
    from transformers import Idefics3Config

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _idefics3_style_tokenizer()
    patch, scale = 14, 2
    image_seq_len = (tile // patch) ** 2 // scale**2
    config = Idefics3Config(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            **TINY_TOWER,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": tile,
            "patch_size": patch,
        },
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    ColIdefics3(config).save_pretrained(out)
    ColIdefics3Processor(
        image_processor=_idefics3_image_processor(tile), tokenizer=tokenizer, image_seq_len=image_seq_len
    ).save_pretrained(out)
    return out


def build_tiny_colmodernvbert(path: str | Path, *, tile: int = 28, seed: int = 0) -> Path:
    """
    Write a tiny random ColModernVBert (SigLIP vision + ModernBERT encoder, Idefics3-style processor) to `path`.

    :param path: Output directory.
    :param tile: Tile size of the image splitting (= the SigLIP input size; patch 14, pixel shuffle 2).
    :param seed: Random seed of the weights.
    :returns: The directory.
    """
    from colpali_engine.models import ColModernVBert, ColModernVBertProcessor
    from transformers import ModernVBertConfig

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _idefics3_style_tokenizer()
    patch, shuffle = 14, 2
    image_seq_len = (tile // patch) ** 2 // shuffle**2
    config = ModernVBertConfig(
        text_config={
            "model_type": "modernbert",
            "vocab_size": len(tokenizer),
            **TINY_TOWER,
            "max_position_embeddings": 2048,
            "global_attn_every_n_layers": 1,
            "local_attention": 16,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|begin_of_text|>"),
            "eos_token_id": tokenizer.pad_token_id,
            "cls_token_id": tokenizer.convert_tokens_to_ids("<|begin_of_text|>"),
            "sep_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": tile,
            "patch_size": patch,
        },
        pixel_shuffle_factor=shuffle,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    ColModernVBert(config).save_pretrained(out)
    ColModernVBertProcessor(
        image_processor=_idefics3_image_processor(tile), tokenizer=tokenizer, image_seq_len=image_seq_len
    ).save_pretrained(out)
    return out


def build_tiny_colpali_family(path: str | Path, family: str, *, seed: int = 0) -> Path:
    """
    Write a tiny checkpoint of one colpali-engine family.

    :param path: Output directory.
    :param family: One of `FAMILIES` (colpali-engine class names).
    :param seed: Random seed of the weights.
    :returns: The directory.
    :raises ValueError: On an unknown family.
    """
    if family == "ColPali":
        return build_tiny_colpali(path, seed=seed)
    if family == "ColQwen2":
        return build_tiny_colqwen(path, version="2", seed=seed)
    if family == "ColQwen2_5":
        return build_tiny_colqwen(path, version="2.5", seed=seed)
    if family == "ColQwen3":
        return build_tiny_colqwen(path, version="3", seed=seed)
    if family == "ColQwen3_5":
        return build_tiny_colqwen3_5(path, seed=seed)
    if family == "ColGemma3":
        return build_tiny_colgemma3(path, seed=seed)
    if family == "ColIdefics3":
        return build_tiny_colidefics3(path, seed=seed)
    if family == "ColModernVBert":
        return build_tiny_colmodernvbert(path, seed=seed)
    msg = f"unknown family {family!r}; expected one of {FAMILIES}"
    raise ValueError(msg)


def build_tiny_colpali_adapter(path: str | Path, base: str | Path, *, seed: int = 0) -> Path:
    """
    Write a PEFT LoRA adapter checkpoint on a tiny base, laid out like `vidore/colqwen2.5-v0.2` / `vidore/colpali-v1.3`.

    The folder holds `adapter_config.json` (naming `base` as `base_model_name_or_path`), the adapter weights
    and the processor files, but no `config.json`: loading it exercises the adapter-following path.

    :param path: Output directory.
    :param base: A checkpoint written by `build_tiny_colqwen` or `build_tiny_colpali`.
    :param seed: Random seed of the adapter weights (non-zero, so the adapter changes the outputs).
    :returns: The directory.
    """
    import colpali_engine.models as col_models
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    out = Path(path)
    base = Path(base)

    architecture = AutoConfig.from_pretrained(base).architectures[0]
    model = getattr(col_models, architecture).from_pretrained(str(base))
    torch.manual_seed(seed)
    # The target modules of vidore/colqwen2.5-v0.2's adapter_config.json.
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r"(.*(language_model).*(q_proj|v_proj).*$|.*(custom_text_proj).*$)",
        init_lora_weights=False,
    )
    get_peft_model(model, config).save_pretrained(str(out))
    for item in base.iterdir():
        if item.name not in ("config.json", "model.safetensors") and item.is_file():
            shutil.copy(item, out / item.name)
    return out
