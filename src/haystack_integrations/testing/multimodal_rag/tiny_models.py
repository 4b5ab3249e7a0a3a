"""Tiny random-weight checkpoints built locally, for tests, benchmarks and the offline quickstart.

Nothing here touches the network: each builder trains a tokenizer on a few sentences, makes a small
config, initialises the weights at random (seeded) and writes a complete checkpoint with
`save_pretrained`, which the components then load through their real loading code, by path.
The models' outputs are meaningless; their shapes, processors and code paths are the real ones.

This module needs `tokenizers` and `sentencepiece` (both installed with the package).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

#: Sentences the tiny tokenizers are trained on.
SENTENCES: tuple[str, ...] = (
    "a photo of a cat sitting on a red sofa",
    "a bar chart of quarterly revenue by region",
    "the quick brown fox jumps over the lazy dog",
    "invoice total amount due in thirty days",
    "a diagram of the system architecture with three services",
    "what is shown in the figure on page two?",
    "Describe the image.",
    "Query: which slide shows the sales forecast",
    "yes no maybe relevant irrelevant answer question context",
    "Answer yes or no.",
    "yes",
    "no",
    "no, not relevant.",
    "yes, relevant.",
    "The blue and gold Byzantine mosaic shows a devotional scene.",
    "Answer the question using the numbered sources and cite them like [1].",
    "0 1 2 3 4 5 6 7 8 9 % $ , . : ; ! ? ( ) [ ] - / ' \"",
)

QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# A minimal Qwen2-VL style chat template: text parts inline, one vision block per image part.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Special-token ids of the SentencePiece tokenizer trained by `_train_sentencepiece`.
_SPM_TOKEN_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}

#: The size of every tiny transformer tower (text or vision) that has no reason to differ: 2 layers of width 32.
TINY_TOWER: dict[str, int] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}


def _corpus(repeat: int = 8) -> list[str]:
    return list(SENTENCES) * repeat


def _train_sentencepiece(path: Path, vocab_size: int = 96) -> Path:
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path.mkdir(parents=True, exist_ok=True)
    model_file = path / "spiece.model"
    model_file.write_bytes(buffer.getvalue())
    return model_file


def _train_bpe(
    special_tokens: list[str], vocab_size: int = 320, *, byte_level: bool = True, end_of_word_suffix: str | None = None
) -> tuple[dict[str, int], Any]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    suffix_kwargs: dict[str, Any] = {"end_of_word_suffix": end_of_word_suffix} if end_of_word_suffix else {}
    bpe = Tokenizer(models.BPE(**suffix_kwargs))
    if byte_level:
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        bpe.pre_tokenizer = pre_tokenizers.Whitespace()
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=alphabet,
        # The trainer's progress display prints bare newlines when stdout is not a terminal.
        show_progress=False,
        **suffix_kwargs,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    data = json.loads(bpe.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    # transformers' BPE tokenizers take merges as (left, right) pairs.
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    return vocab, merges


#: Text length of the SigLIP family's released checkpoints (`"model_max_length": 64`, text config
#: `max_position_embeddings: 64`, e.g. google/siglip-so400m-patch14-384).
SIGLIP_TEXT_LENGTH = 64
#: CLIP's text length (openai/clip-vit-base-patch32 tokenizer_config `"model_max_length": 77`).
CLIP_TEXT_LENGTH = 77


def _siglip_tokenizer(spiece: Path) -> Any:
    """A SigLIP v1 tokenizer configured like the released checkpoints' tokenizer_config.json.

    google/siglip-so400m-patch14-384 (commit 7067f6db) declares `"model_max_length": 64`, `"do_lower_case": true`,
    `"pad_token": "</s>"`, `"model_input_names": ["input_ids"]` (no attention mask) and no `padding_side` (right).
    """
    from transformers import SiglipTokenizer

    return SiglipTokenizer(
        vocab_file=str(spiece),
        model_max_length=SIGLIP_TEXT_LENGTH,
        do_lower_case=True,
        model_input_names=["input_ids"],
        padding_side="right",
    )


def build_tiny_siglip(path: str | Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """
    Write a tiny random SigLIP dual encoder (SentencePiece tokenizer) to `path`.

    The tokenizer mirrors the real checkpoints' config: `input_ids` only, right padding, 64 tokens.

    :param path: Output directory.
    :param image_size: Input resolution of the vision tower.
    :param seed: Random seed of the weights.
    :returns: The directory.
    """
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    out = Path(path)
    spiece = _train_sentencepiece(out)
    tokenizer = _siglip_tokenizer(spiece)
    config = SiglipConfig(
        text_config={
            "vocab_size": len(tokenizer),
            **TINY_TOWER,
            "max_position_embeddings": SIGLIP_TEXT_LENGTH,
            **_SPM_TOKEN_IDS,
        },
        vision_config={
            **TINY_TOWER,
            "image_size": image_size,
            "patch_size": 8,
        },
    )
    torch.manual_seed(seed)
    SiglipModel(config).save_pretrained(out)
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def build_siglip_base_random(path: str | Path, *, seed: int = 0) -> Path:
    """
    Write a SigLIP-base-sized (default `SiglipConfig()` dimensions) random-init dual encoder to `path`.

    Used by the throughput benchmark: real compute cost, no download.

    :param path: Output directory.
    :param seed: Random seed.
    :returns: The directory.
    """
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    out = Path(path)
    spiece = _train_sentencepiece(out)
    tokenizer = _siglip_tokenizer(spiece)
    config = SiglipConfig(text_config=_SPM_TOKEN_IDS)
    torch.manual_seed(seed)
    SiglipModel(config).save_pretrained(out)
    size = SiglipConfig().vision_config.image_size  # type: ignore[union-attr]
    image_processor = SiglipImageProcessor(size={"height": size, "width": size})
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def build_tiny_clip(path: str | Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """
    Write a tiny random CLIP dual encoder (BPE tokenizer) to `path`.

    :param path: Output directory.
    :param image_size: Input resolution of the vision tower.
    :param seed: Random seed of the weights.
    :returns: The directory.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    # CLIP's BPE is byte-level and marks word ends with "</w>".
    vocab, merges = _train_bpe(specials, end_of_word_suffix="</w>")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_TEXT_LENGTH)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            **TINY_TOWER,
            "max_position_embeddings": CLIP_TEXT_LENGTH,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            **TINY_TOWER,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=24,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


#: The special tokens of the Gemma-style tokenizers of the SigLIP 2 builders.
_GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")


def _siglip_text_config(tokenizer: Any) -> dict[str, Any]:
    """The text tower of the SigLIP / SigLIP 2 builders: tiny, 64 positions, the tokenizer's special ids."""
    return {
        "vocab_size": len(tokenizer),
        **TINY_TOWER,
        "max_position_embeddings": SIGLIP_TEXT_LENGTH,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def build_tiny_siglip2(path: str | Path, *, seed: int = 0) -> Path:
    """
    Write a tiny random SigLIP 2 (NaFlex, variable resolution) dual encoder to `path`.

    The tokenizer lowercases (as `Siglip2Tokenizer` does), pads right to 64 tokens and returns `input_ids` only.

    :param path: Output directory.
    :param seed: Random seed of the weights.
    :returns: The directory.
    """
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model, Siglip2Processor, Siglip2Tokenizer

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _train_bpe(list(_GEMMA_SPECIALS), byte_level=False)
    # The Gemma-based SigLIP 2 tokenizer as SigLIP 2 was trained: right padding to 64 tokens, no attention
    # mask (transformers docs/source/en/model_doc/siglip2.md: "pass padding="max_length" and max_length=64 as
    # that's how the model was trained"; Siglip2Processor text defaults padding="max_length", max_length=64).
    # Siglip2Tokenizer pads LEFT by class default (tokenization_siglip2.py:37), hence the explicit side.
    tokenizer = Siglip2Tokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=SIGLIP_TEXT_LENGTH,
        padding_side="right",
        model_input_names=["input_ids"],
    )
    config = Siglip2Config(
        text_config=_siglip_text_config(tokenizer),
        vision_config={
            **TINY_TOWER,
            "patch_size": 8,
            "num_patches": 16,
        },
    )
    torch.manual_seed(seed)
    Siglip2Model(config).save_pretrained(out)
    image_processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
    Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def build_tiny_siglip2_fixres(path: str | Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """
    Write a tiny random SigLIP 2 FixRes-style dual encoder to `path`: SigLIP architecture, Gemma tokenizer.

    Released FixRes SigLIP 2 checkpoints (e.g. google/siglip2-base-patch16-224) have `"model_type": "siglip"`, a
    256k-token Gemma tokenizer and `SiglipProcessor` (mirror of google/siglip2-base-patch16-512 config; research notes
    /tmp/research/vlm_siglip.md item 4). Their exact tokenizer_config values (padding side, input names) could not be
    read offline, so the tokenizer keeps `GemmaTokenizer`'s class defaults (left padding, attention mask, no
    lowercasing): the case where the embedders must impose SigLIP 2's recipe themselves (right padding to 64, no mask,
    lowercased text).

    :param path: Output directory.
    :param image_size: Input resolution of the vision tower.
    :param seed: Random seed of the weights.
    :returns: The directory.
    """
    from transformers import GemmaTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _train_bpe(list(_GEMMA_SPECIALS), byte_level=False)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=SIGLIP_TEXT_LENGTH)
    config = SiglipConfig(
        text_config=_siglip_text_config(tokenizer),
        vision_config={
            **TINY_TOWER,
            "image_size": image_size,
            "patch_size": 8,
        },
    )
    torch.manual_seed(seed)
    SiglipModel(config).save_pretrained(out)
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size}, resample=2)
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def _qwen_tokenizer(model_max_length: int = 1024) -> Any:
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe(list(QWEN_SPECIAL_TOKENS), vocab_size=400)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    return tokenizer


def _qwen_vl_processor(tokenizer: Any, *, version: str, min_pixels: int, max_pixels: int) -> Any:
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    processor_cls: Any = transformers.Qwen2_5_VLProcessor if version == "2.5" else transformers.Qwen2VLProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def _qwen_vision_token_ids(tokenizer: Any) -> dict[str, Any]:
    """The Qwen-VL configs' image / video placeholder and vision start / end token ids in `tokenizer`."""
    return {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }


def _qwen_vl_config(tokenizer: Any, *, version: str, hidden_size: int = 32, layers: int = 2) -> Any:
    token_ids = _qwen_vision_token_ids(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 2048,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if version == "2.5":
        from transformers import Qwen2_5_VLConfig

        # Like Qwen2.5-VL-3B (32 blocks, full attention in 7/15/23/31, windowed attention elsewhere): one windowed
        # block, then one full-attention block, so both attention layouts run.
        vision_config: dict[str, Any] = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
        return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **token_ids)
    from transformers import Qwen2VLConfig

    vision_config = {
        "depth": 1,
        "embed_dim": 32,
        "hidden_size": hidden_size,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(text_config=text_config, vision_config=vision_config, **token_ids)


def _finish_generation_config(out: Path, tokenizer: Any) -> None:
    from transformers import GenerationConfig

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    GenerationConfig(
        eos_token_id=[eos, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id, do_sample=False
    ).save_pretrained(out)


def build_tiny_qwen2_vl(
    path: str | Path,
    *,
    kind: str = "vlm",
    version: str = "2",
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 28 * 28 * 16,
    seed: int = 0,
) -> Path:
    """
    Write a tiny random Qwen2-VL / Qwen2.5-VL checkpoint to `path`.

    :param path: Output directory.
    :param kind: `"vlm"` for an image-text-to-text generator (`Qwen2VLForConditionalGeneration`),
        `"colpali"` for a late-interaction retriever saved as colpali-engine's `ColQwen2` / `ColQwen2_5`.
    :param version: `"2"` (Qwen2-VL) or `"2.5"` (Qwen2.5-VL).
    :param min_pixels: Image processor's minimum pixels (small keeps tests fast).
    :param max_pixels: Image processor's maximum pixels.
    :param seed: Random seed of the weights.
    :returns: The directory.
    """
    if kind not in ("vlm", "colpali"):
        msg = f"kind must be 'vlm' or 'colpali', got {kind!r}"
        raise ValueError(msg)
    if version not in ("2", "2.5"):
        msg = f"version must be '2' or '2.5', got {version!r}"
        raise ValueError(msg)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _qwen_tokenizer()
    config = _qwen_vl_config(tokenizer, version=version)
    torch.manual_seed(seed)
    model_cls: Any
    if kind == "colpali":
        import colpali_engine.models as col_models

        model_cls = col_models.ColQwen2_5 if version == "2.5" else col_models.ColQwen2
    else:
        import transformers

        model_cls = (
            transformers.Qwen2_5_VLForConditionalGeneration
            if version == "2.5"
            else transformers.Qwen2VLForConditionalGeneration
        )
    model = model_cls(config)
    model.save_pretrained(out)
    _qwen_vl_processor(tokenizer, version=version, min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(out)
    if kind == "vlm":
        _finish_generation_config(out, tokenizer)
    return out
