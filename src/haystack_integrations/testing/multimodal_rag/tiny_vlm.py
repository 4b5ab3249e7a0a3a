"""Tiny random-weight vision-language checkpoints laid out like real reranker/generator repositories.

Test support, not runtime code. Nothing here touches the network.

- `build_tiny_qwen2_vl_instruct`: a Qwen2-VL image-text-to-text checkpoint with the REAL Qwen2-VL-Instruct chat
  template (default system turn included) and a vocabulary in which the answer words of the reranker recipes
  (`True`/`False`, `yes`/`no`, `Yes`/`No`) are single tokens, like in the real Qwen2 vocabulary.
- `build_tiny_monoqwen_adapter`: a folder laid out like `lightonai/MonoQwen2-VL-v0.1`: `adapter_config.json`
  (LoRA on the language model's attention and MLP projections, `base_model_name_or_path` naming the base folder),
  `adapter_model.safetensors`, `config.json` and `generation_config.json`, and NO processor or tokenizer files
  (https://huggingface.co/lightonai/MonoQwen2-VL-v0.1/tree/4bbbdf20175a485cb31527bdaf27607ad05d7268), so the
  processor has to come from the base model, as in the model card's snippet.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from haystack_integrations.testing.multimodal_rag.tiny_models import (
    QWEN_SPECIAL_TOKENS,
    SENTENCES,
    _finish_generation_config,
    _qwen_vl_config,
)

# The chat template of Qwen/Qwen2-VL-2B-Instruct (its tokenizer_config.json / chat_template.json): a default
# system turn when the first message is not a system message, image parts as one vision block each, parts
# joined without separators.
QWEN2_VL_INSTRUCT_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Answer words that must be single tokens of the tiny vocabulary (they are in the real Qwen2 vocabulary:
#: True 2514, False 4049, yes 9693, no 2152, Yes 9454, No 2753).
ANSWER_WORDS: tuple[str, ...] = ("True", "False", "yes", "no", "Yes", "No")

_RERANKER_SENTENCES: tuple[str, ...] = (
    "Assert the relevance of the previous image document to the following query, answer True or False. "
    "The query is: which slide shows the sales forecast",
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".',
    "<Instruct>: Given a search query, retrieve relevant candidates that answer the query.",
    "You are a helpful assistant.",
)


def _reranker_tokenizer(model_max_length: int = 4096) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    # Each answer word on its own line start (as it follows "assistant\n"), often enough to be merged whole.
    corpus = [*SENTENCES, *_RERANKER_SENTENCES] * 8 + list(ANSWER_WORDS) * 40
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=list(QWEN_SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    data = json.loads(bpe.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges: Any = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    missing = [w for w in ANSWER_WORDS if w not in vocab]
    if missing:  # pragma: no cover - depends only on the fixed corpus above
        msg = f"tiny tokenizer did not learn {missing} as single tokens"
        raise RuntimeError(msg)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    return tokenizer


def build_tiny_qwen2_vl_instruct(
    path: str | Path,
    *,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 28 * 28 * 16,
    seed: int = 0,
) -> Path:
    """
    Write a tiny random Qwen2-VL-Instruct-style checkpoint (real chat template, reranker answer words) to `path`.

    :param path: Output directory.
    :param min_pixels: The image processor's `min_pixels` (`size["shortest_edge"]`).
    :param max_pixels: The image processor's `max_pixels` (`size["longest_edge"]`); the real checkpoint ships
        12845056 (16384 visual tokens), tests keep it small.
    :param seed: Random seed of the weights.
    :returns: The directory.
    """
    from transformers import (
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _reranker_tokenizer()
    config = _qwen_vl_config(tokenizer, version="2")
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(out)
    Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_VL_INSTRUCT_CHAT_TEMPLATE,
    ).save_pretrained(out)
    _finish_generation_config(out, tokenizer)
    return out


def build_tiny_monoqwen_adapter(path: str | Path, base: str | Path, *, seed: int = 1) -> Path:
    """
    Write a LoRA adapter on a tiny Qwen2-VL base, laid out like `lightonai/MonoQwen2-VL-v0.1` (no processor files).

    The real adapter_config.json: `peft_type` LORA, `r` 32, `lora_alpha` 32, target modules
    `o_proj, down_proj, gate_proj, k_proj, up_proj, v_proj, q_proj`, `base_model_name_or_path`
    `Qwen/Qwen2-VL-2B-Instruct` (https://huggingface.co/lightonai/MonoQwen2-VL-v0.1/blob/c8db55c525b8a55b8bfd568f55f26496175841d4/adapter_config.json).
    Here `r` is 4 and the base is the local folder `base`.

    :param path: Output directory.
    :param base: A checkpoint written by `build_tiny_qwen2_vl_instruct`.
    :param seed: Random seed of the adapter weights (non-zero, so the adapter changes the outputs).
    :returns: The directory.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    out = Path(path)
    base = Path(base)
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(base))
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        lora_dropout=0.0,
        bias="none",
        # The language model's projections only (the vision tower's modules are named qkv/proj/fc1/fc2).
        target_modules=["o_proj", "down_proj", "gate_proj", "k_proj", "up_proj", "v_proj", "q_proj"],
        init_lora_weights=False,
    )
    get_peft_model(model, config).save_pretrained(str(out))
    adapter_config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2), encoding="utf-8")
    # MonoQwen2-VL-v0.1 also ships the base's config.json and generation_config.json ("Add config qwen").
    for name in ("config.json", "generation_config.json"):
        shutil.copy(base / name, out / name)
    return out
