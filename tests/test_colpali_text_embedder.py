from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from haystack import Document

from haystack_integrations.common.multimodal_rag.backends.colpali import (
    DEFAULT_MAX_QUERY_TOKENS,
    QUERY_AUGMENTATION_TOKENS,
    LateInteractionEncoder,
)
from haystack_integrations.common.multimodal_rag.backends.loading import LoadSpec
from haystack_integrations.components.embedders.colpali import ColPaliTextEmbedder
from haystack_integrations.components.rankers.colpali import ColPaliRanker

QUERIES = ["which slide shows the sales forecast", "invoice total"]  # two lengths: the batch is padded


def _encoder(model: str) -> LateInteractionEncoder:
    return LateInteractionEncoder.get(
        LoadSpec(model=model, component="t", device="cpu", token=None, local_files_only=True, model_kwargs=None)
    )


def _reference_query_inputs(encoder: LateInteractionEncoder, queries: list[str], prefix: str) -> dict:
    """
    The query ids of the TRAINING-era recipe, built from the tokenizer alone (not through our code):
    `prefix + query + augmentation_token * 10`, padded to the longest query.

    - ColPali (colpali-engine v0.3.11-v0.3.12 `ColPaliProcessor.process_texts` + `BaseVisualRetrieverProcessor.
      process_queries`): `bos + prefix + query + "<pad>" * 10`, padded on the RIGHT (the training collator forces
      right padding for PaliGemma: colpali_engine/collators/visual_retriever_collator.py:49-51).
    - ColQwen2 / 2.5 (v0.3.4-v0.3.10 `ColQwen2Processor.process_queries`): `prefix + query + "<|endoftext|>" * 10`
      through the processor's tokenizer, padded on the LEFT (the processor sets `padding_side = "left"`).
    - ColIdefics3 (v0.3.6-v0.3.12): `prefix + query + "<end_of_utterance>" * 10`, LEFT padding (the trailing "\\n"
      of v0.3.6-v0.3.10 was dropped in v0.3.11).
    """
    tokenizer = encoder.processor.tokenizer
    family = encoder.family.model_class
    augmentation = {"ColPali": tokenizer.pad_token, "ColIdefics3": "<end_of_utterance>"}.get(family, "<|endoftext|>")
    bos = tokenizer.bos_token if family == "ColPali" else ""
    texts = [bos + prefix + q + augmentation * QUERY_AUGMENTATION_TOKENS for q in queries]
    side = "right" if family == "ColPali" else "left"
    return tokenizer(texts, padding="longest", padding_side=side, return_tensors="pt", return_token_type_ids=False)


@pytest.mark.parametrize(
    ("family", "trained_prefix"),
    [("ColPali", "Query: "), ("ColQwen2", "Query: "), ("ColQwen2_5", "Query: "), ("ColIdefics3", "Query: ")],
)
def test_query_inputs_equal_the_training_recipe(
    family: str, trained_prefix: str, tiny_colpali_family: Callable[[str], str]
) -> None:
    encoder = _encoder(tiny_colpali_family(family))
    assert encoder.default_query_prefix == trained_prefix
    ours = encoder.query_inputs(QUERIES)
    reference = _reference_query_inputs(encoder, QUERIES, trained_prefix)
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    assert torch.equal(ours["attention_mask"], reference["attention_mask"])
    padded_row = ours["attention_mask"][1]
    assert int(padded_row.sum()) < padded_row.numel()  # the short query really is padded
    first_real = 0 if family == "ColPali" else int(torch.nonzero(padded_row)[0])
    assert (first_real == 0) == (family == "ColPali")  # ColPali pads right, the others left


@pytest.mark.parametrize("family", ["ColQwen3", "ColQwen3_5", "ColModernVBert"])
def test_families_trained_after_colpali_engine_0_3_13_get_no_prefix(
    family: str, tiny_colpali_family: Callable[[str], str]
) -> None:
    encoder = _encoder(tiny_colpali_family(family))
    assert encoder.default_query_prefix == ""
    assert torch.equal(
        encoder.query_inputs(QUERIES)["input_ids"], encoder.processor.process_queries(texts=QUERIES)["input_ids"]
    )


def test_colgemma3_queries_follow_colpali_engines_training_collator(tiny_colpali_family: Callable[[str], str]) -> None:
    # colpali-engine's training collator (visual_retriever_collator.py:82-85) and mteb's ColGemma3Wrapper build
    # `query_prefix ("") + q + "<eos>" * 10` and hand it to the processor, which wraps it in the Gemma 3 chat turn
    # after its own "Query: " (processing_colgemma.py `process_texts`); so ours is "" plus the 10 tokens.
    encoder = _encoder(tiny_colpali_family("ColGemma3"))
    assert encoder.default_query_prefix == "" == encoder.processor.query_prefix
    ours = encoder.query_inputs(QUERIES)
    tokens = encoder.processor.query_augmentation_token * 10
    reference = encoder.processor.process_queries([encoder.processor.query_prefix + q + tokens for q in QUERIES])
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    assert torch.equal(ours["attention_mask"], reference["attention_mask"])
    text = encoder.processor.tokenizer.decode(ours["input_ids"][1], skip_special_tokens=False)
    assert "<start_of_turn>user\nQuery: invoice total" + "<eos>" * 10 + "<end_of_turn>" in text
    assert int(ours["attention_mask"][1, 0]) == 0  # padded on the left, as the processor sets


def test_colqwen2_5_omni_queries_equal_its_processors_process_queries(tmp_path: Path) -> None:
    # The model cannot be built upstream (tiny_colpali.BROKEN_FAMILIES), but the query recipe can be checked on the
    # processor alone: "Query: " + query + 10 "<|endoftext|>", in the system + user conversation, padded left.
    from colpali_engine.models import ColQwen2_5OmniProcessor

    from haystack_integrations.common.multimodal_rag.backends.colpali import family_from_config
    from haystack_integrations.testing.multimodal_rag.tiny_colpali import build_tiny_colqwen2_5_omni_processor

    folder, _ = build_tiny_colqwen2_5_omni_processor(tmp_path / "omni")
    processor = ColQwen2_5OmniProcessor.from_pretrained(str(folder))
    family = family_from_config({"architectures": ["ColQwen2_5Omni"]}, model="omni")
    encoder = LateInteractionEncoder(object(), processor, device="cpu", model_id=str(folder), family=family)
    assert encoder.default_query_prefix == "Query: " == processor.query_prefix
    ours = encoder.query_inputs(QUERIES)
    reference = processor.process_queries(QUERIES)
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    assert torch.equal(ours["attention_mask"], reference["attention_mask"])
    assert int(ours["attention_mask"][1, 0]) == 0


def test_colpali_queries_are_right_padded_even_when_the_tokenizer_pads_left(
    tiny_colpali_family: Callable[[str], str],
) -> None:
    encoder = _encoder(tiny_colpali_family("ColPali"))
    tokenizer = encoder.processor.tokenizer
    tokenizer.padding_side = "left"  # e.g. transformers' GemmaTokenizer class default
    try:
        mask = encoder.query_inputs(QUERIES)["attention_mask"]
        assert tokenizer.padding_side == "left"  # the shared processor is not changed
    finally:
        tokenizer.padding_side = "right"
    assert int(mask[1, 0]) == 1
    assert int(mask[1, -1]) == 0


def test_text_embedder_encodes_prefix_query_and_augmentation_tokens(tiny_colpali_family: Callable[[str], str]) -> None:
    model = tiny_colpali_family("ColQwen2_5")
    encoder = _encoder(model)
    vectors = ColPaliTextEmbedder(model).run(text=QUERIES[0])["multivector_embedding"]
    assert all(isinstance(v, list) and len(v) == 128 for v in vectors)
    assert len(vectors) == int(_reference_query_inputs(encoder, QUERIES[:1], "Query: ")["attention_mask"].sum())
    with torch.inference_mode():
        batch = encoder.query_inputs(QUERIES[:1])
        expected = encoder.model(**batch)[0]
    np.testing.assert_allclose(vectors, expected.numpy(), atol=1e-5)


def test_query_prefix_none_empty_and_custom(tiny_colpali_family: Callable[[str], str]) -> None:
    model = tiny_colpali_family("ColQwen2")
    encoder = _encoder(model)
    text = "invoice total"
    for prefix, embedder in (
        ("Query: ", ColPaliTextEmbedder(model)),
        ("", ColPaliTextEmbedder(model, query_prefix="")),
        ("Question: ", ColPaliTextEmbedder(model, query_prefix="Question: ")),
    ):
        vectors = embedder.run(text=text)["multivector_embedding"]
        expected_ids = _reference_query_inputs(encoder, [text], prefix)["input_ids"]
        assert torch.equal(encoder.query_inputs([text], query_prefix=embedder.query_prefix)["input_ids"], expected_ids)
        assert len(vectors) == expected_ids.shape[1]
    plain = encoder.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ColPaliTextEmbedder(model).run(text=text)["multivector_embedding"]) > len(plain) + 10


def test_query_prefix_and_processor_kwargs_types_are_checked() -> None:
    with pytest.raises(TypeError, match="query_prefix"):
        ColPaliTextEmbedder("any", query_prefix=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="processor_kwargs must be a dict"):
        ColPaliTextEmbedder("any", processor_kwargs=[("max_num_visual_tokens", 768)])  # type: ignore[arg-type]


def test_long_query_is_truncated_with_a_warning_naming_the_limit(
    tiny_colpali_family: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_colpali_family("ColQwen2_5")
    long_query = "the quick brown fox jumps over the lazy dog " * 200
    with caplog.at_level(logging.WARNING):
        vectors = ColPaliTextEmbedder(model, query_prefix="").run(text=long_query)["multivector_embedding"]
    assert f"max_query_tokens={DEFAULT_MAX_QUERY_TOKENS}" in caplog.text
    assert len(vectors) <= DEFAULT_MAX_QUERY_TOKENS + QUERY_AUGMENTATION_TOKENS + 1
    assert len(vectors) >= DEFAULT_MAX_QUERY_TOKENS + QUERY_AUGMENTATION_TOKENS - 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ColPaliTextEmbedder(model).run(text="a short question")
    assert "max_query_tokens" not in caplog.text


def test_to_dict_round_trip_keeps_prefix_and_processor_kwargs() -> None:
    embedder = ColPaliTextEmbedder("m", query_prefix="", processor_kwargs={"max_num_visual_tokens": 512})
    data = embedder.to_dict()
    assert data["init_parameters"]["query_prefix"] == ""
    assert data["init_parameters"]["processor_kwargs"] == {"max_num_visual_tokens": 512}
    restored = ColPaliTextEmbedder.from_dict(data)
    assert restored.query_prefix == ""
    assert restored.processor_kwargs == {"max_num_visual_tokens": 512}
    assert ColPaliTextEmbedder.from_dict(ColPaliTextEmbedder("m").to_dict()).query_prefix is None


@pytest.mark.parametrize("bad", ["", "   \n"])
def test_empty_query_is_a_clear_error(tiny_colqwen2: str, bad: str) -> None:
    with pytest.raises(ValueError, match="empty query"):
        ColPaliTextEmbedder(tiny_colqwen2).run(text=bad)
    with pytest.raises(ValueError, match="empty query"):
        ColPaliRanker(tiny_colqwen2).run(query=bad, documents=[Document(content="x")])
