from __future__ import annotations

import copy
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from haystack import Document, Pipeline
from PIL import Image

from haystack_integrations.common.multimodal_rag.backends.vlm import VLMLoadSpec, resolve_processor_source
from haystack_integrations.common.multimodal_rag.errors import ModelLoadError
from haystack_integrations.common.multimodal_rag.inputs.media import load_document_image
from haystack_integrations.components.rankers.modality_calibration import ModalityScoreCalibrator
from haystack_integrations.components.rankers.vlm import VisionLanguageRanker
from tests.helpers import COLORS, make_image, make_pdf

# The rendered Qwen2-VL-Instruct chat template around MonoQwen's one user turn (image, then prompt), from the
# model card's `apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` with the base model's
# template (default system turn; parts joined without separators).
MONOQWEN_PROMPT = (
    "Assert the relevance of the previous image document to the following query, "
    "answer True or False. The query is: {query}"
)
MONOQWEN_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
)
# QwenLM/Qwen3-VL-Embedding examples/reranker_template.jinja @8ce3aab, with the image placeholder of the
# document inserted before its text (examples/reranker_vllm.ipynb).
QWEN3_TEXT = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    "<Instruct>: {instruction}<Query>:{query}\n<Document>:{document}<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture
def candidates(tmp_path: Path) -> list[Document]:
    docs = []
    for i, color in enumerate(COLORS[:5]):
        make_image(tmp_path / f"img{i}.png", size=(56 + 14 * i, 56), color=color)
        docs.append(Document(id=f"img{i}", meta={"file_path": str(tmp_path / f"img{i}.png")}, score=0.9 - i / 10))
    make_pdf(tmp_path / "deck.pdf", pages=2, size=(70, 90))
    docs.append(Document(id="page2", meta={"file_path": str(tmp_path / "deck.pdf"), "page_number": 2}, score=0.35))
    docs.append(Document(id="text-a", content="Quarterly revenue grew in Q3.", score=0.3))
    docs.append(Document(id="text-b", content="The cat sat on a red sofa.", score=0.2))
    return docs


def _spy_forward(ranker: VisionLanguageRanker, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    ranker.warm_up()
    calls: list[dict] = []
    model = ranker._vlm.model
    real = model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    return calls


def _reference_model(base: str, adapter: str | None = None):
    """The model as the MonoQwen card loads it (the card's note: `load_adapter` on the original Qwen2-VL model)."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(base)
    model = Qwen2VLForConditionalGeneration.from_pretrained(base)
    if adapter is not None:
        model.load_adapter(adapter)
    return processor, model.eval()


# --- recipe defaults and the MonoQwen2-VL checkpoint layout ----------------------------------------------------


def test_defaults_are_the_monoqwen_recipe_and_serialize() -> None:
    ranker = VisionLanguageRanker()
    data = ranker.to_dict()["init_parameters"]
    assert data["model"] == "lightonai/MonoQwen2-VL-v0.1"
    assert data["recipe"] == "monoqwen"
    assert data["processor"] is None
    assert data["top_k"] is None  # nothing is cut before the calibrator
    assert data["processor_kwargs"] is None
    assert ranker._answer_words == ("True", "False")
    with pytest.raises(ValueError, match="recipe must be one of"):
        VisionLanguageRanker(recipe="listwise")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="set `instruction` instead"):
        VisionLanguageRanker(recipe="qwen3_vl_reranker", prompt_template="{{ query }}")
    with pytest.raises(ValueError, match="used by recipe 'qwen3_vl_reranker' only"):
        VisionLanguageRanker(instruction="Find slides")
    with pytest.raises(ValueError, match="max_query_tokens must be a positive integer"):
        VisionLanguageRanker(max_query_tokens=0)


def test_monoqwen_adapter_without_processor_files_loads_its_base_processor(
    tiny_monoqwen: str, tiny_instruct: str, candidates: list[Document]
) -> None:
    folder = Path(tiny_monoqwen)
    assert (folder / "adapter_config.json").is_file()
    assert (folder / "config.json").is_file()  # like the real repo, which transformers alone mistakes for a full model
    assert not (folder / "model.safetensors").exists()
    assert not list(folder.glob("*processor*"))
    assert not list(folder.glob("tokenizer*"))

    ranker = VisionLanguageRanker(tiny_monoqwen, top_k=None)
    out = ranker.run(query="revenue by region", documents=candidates)["documents"]
    assert len(out) == len(candidates)
    assert all(0.0 <= d.score <= 1.0 for d in out)
    vocab = ranker._vlm.tokenizer.get_vocab()
    assert ranker._answer_ids == ([vocab["True"]], [vocab["False"]])

    # The same processor named explicitly gives the same scores; the adapter really changes the model.
    explicit = VisionLanguageRanker(tiny_monoqwen, processor=tiny_instruct).run(
        query="revenue by region", documents=candidates
    )["documents"]
    assert {d.id: d.score for d in explicit} == pytest.approx({d.id: d.score for d in out})
    base = VisionLanguageRanker(tiny_instruct).run(query="revenue by region", documents=candidates)["documents"]
    assert {d.id: d.score for d in base} != pytest.approx({d.id: d.score for d in out})

    with pytest.raises(ModelLoadError, match="no-such-processor"):
        VisionLanguageRanker(tiny_monoqwen, processor=str(folder.parent / "no-such-processor")).warm_up()


def test_processor_source_is_the_adapters_own_when_it_ships_one(
    tiny_monoqwen: str, tiny_instruct: str, tmp_path: Path
) -> None:
    def source(model: str, processor: str | None = None) -> str:
        spec = VLMLoadSpec(
            model=model,
            component="test",
            device="cpu",
            token=None,
            local_files_only=True,
            model_kwargs=None,
            processor=processor,
        )
        return resolve_processor_source(spec)

    assert source(tiny_monoqwen) == tiny_instruct  # no processor files: the adapter's base
    assert source(tiny_instruct) == tiny_instruct  # not an adapter: its own
    assert source(tiny_monoqwen, processor="elsewhere") == "elsewhere"  # explicit wins
    with_processor = shutil.copytree(tiny_monoqwen, tmp_path / "adapter_with_processor")
    for item in Path(tiny_instruct).iterdir():
        if "processor" in item.name or item.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(item, with_processor / item.name)
    assert source(str(with_processor)) == str(with_processor)  # like vidore/colqwen2.5-v0.2: ships its own


def test_monoqwen_inputs_and_score_equal_the_model_cards_recipe(
    tiny_monoqwen: str, tiny_instruct: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_image(tmp_path / "slide.png", size=(84, 56), color="blue")
    query = "which slide shows the sales forecast"
    ranker = VisionLanguageRanker(tiny_monoqwen, batch_size=1)
    calls = _spy_forward(ranker, monkeypatch)
    ours = ranker.run(query=query, documents=[Document(id="slide", meta={"file_path": str(path)})])["documents"][0]

    # The card, step by step (https://huggingface.co/lightonai/MonoQwen2-VL-v0.1, "Usage").
    processor, model = _reference_model(tiny_instruct, tiny_monoqwen)
    image = Image.open(path).convert("RGB")
    prompt = MONOQWEN_PROMPT.format(query=query)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == MONOQWEN_TEXT.format(prompt=prompt)
    inputs = processor(text=text, images=image, return_tensors="pt")
    with torch.no_grad():
        logits_for_last_token = model(**inputs).logits[:, -1, :]
    true_id = processor.tokenizer.convert_tokens_to_ids("True")
    false_id = processor.tokenizer.convert_tokens_to_ids("False")
    relevance = torch.softmax(logits_for_last_token[:, [true_id, false_id]], dim=-1)

    (fed,) = calls
    assert torch.equal(fed["input_ids"], inputs["input_ids"])
    assert torch.equal(fed["pixel_values"], inputs["pixel_values"])
    assert torch.equal(fed["image_grid_thw"], inputs["image_grid_thw"])
    assert ours.score == pytest.approx(relevance[0, 0].item(), abs=1e-5)


def test_monoqwen_text_candidate_takes_the_image_place(tiny_instruct: str) -> None:
    ranker = VisionLanguageRanker(tiny_instruct)
    ranker.warm_up()
    messages = ranker.messages_for("q", "Revenue grew.", is_image=False, meta={})
    text = ranker._vlm.prompt_text(messages)
    prompt = MONOQWEN_PROMPT.format(query="q")
    assert text == MONOQWEN_TEXT.format(prompt=prompt).replace(
        "<|vision_start|><|image_pad|><|vision_end|>", "Revenue grew.\n"
    )


def test_qwen3_vl_reranker_layout_and_score(
    tiny_instruct: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ranker = VisionLanguageRanker(tiny_instruct, recipe="qwen3_vl_reranker", batch_size=1)
    ranker.warm_up()
    instruction = "Given a search query, retrieve relevant candidates that answer the query."
    image_text = ranker._vlm.prompt_text(ranker.messages_for("red sofa", "", is_image=True, meta={}))
    assert image_text == QWEN3_TEXT.format(
        instruction=instruction, query="red sofa", document="<|vision_start|><|image_pad|><|vision_end|>"
    )
    text_text = ranker._vlm.prompt_text(ranker.messages_for("red sofa", "A cat.", is_image=False, meta={}))
    assert text_text == QWEN3_TEXT.format(instruction=instruction, query="red sofa", document="A cat.")
    custom = VisionLanguageRanker(tiny_instruct, recipe="qwen3_vl_reranker", instruction="Find slides.")
    custom.warm_up()
    assert "<Instruct>: Find slides.<Query>:" in custom._vlm.prompt_text(
        custom.messages_for("q", "x", is_image=False, meta={})
    )

    # Score: sigmoid(logit_yes - logit_no) at the last position (qwen3_vl_reranker.py lines 114-137).
    calls = _spy_forward(ranker, monkeypatch)
    doc = Document(id="t", content="A cat.")
    ours = ranker.run(query="red sofa", documents=[doc])["documents"][0]
    processor, model = _reference_model(tiny_instruct)
    inputs = processor(text=[text_text], return_tensors="pt")
    assert torch.equal(calls[0]["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        last = model(**inputs).logits[0, -1]
    vocab = processor.tokenizer.get_vocab()
    assert ours.score == pytest.approx(torch.sigmoid(last[vocab["yes"]] - last[vocab["no"]]).item(), abs=1e-5)


def test_zero_shot_sums_the_single_token_case_variants(tiny_instruct: str) -> None:
    ranker = VisionLanguageRanker(tiny_instruct, recipe="zero_shot_yes_no", batch_size=1)
    ranker.warm_up()
    tokenizer = ranker._vlm.tokenizer
    vocab = tokenizer.get_vocab()
    assert len(tokenizer.encode("YES", add_special_tokens=False)) > 1  # not one token: cannot be read, left out
    assert ranker._answer_ids == ([vocab["yes"], vocab["Yes"]], [vocab["no"], vocab["No"]])

    doc = Document(id="t", content="Quarterly revenue grew in Q3.")
    ours = ranker.run(query="revenue", documents=[doc])["documents"][0]
    processor, model = _reference_model(tiny_instruct)
    text = ranker._vlm.prompt_text(ranker.messages_for("revenue", doc.content, is_image=False, meta={}))
    with torch.no_grad():
        probs = torch.softmax(model(**processor(text=[text], return_tensors="pt")).logits[0, -1], -1)
    positive = probs[vocab["yes"]] + probs[vocab["Yes"]]
    negative = probs[vocab["no"]] + probs[vocab["No"]]
    assert ours.score == pytest.approx((positive / (positive + negative)).item(), abs=1e-5)
    only_lower = probs[vocab["yes"]] / (probs[vocab["yes"]] + probs[vocab["no"]])
    assert ours.score != pytest.approx(only_lower.item(), abs=1e-7)  # the variants really count


# --- ranking behaviour ------------------------------------------------------------------------------------------


def test_scores_are_probabilities_and_ordering_follows_them(tiny_monoqwen: str, candidates: list[Document]) -> None:
    out = VisionLanguageRanker(tiny_monoqwen).run(query="a red picture", documents=candidates)["documents"]
    assert len(out) == len(candidates)
    scores = [d.score for d in out]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)
    for doc in out:
        assert doc.meta["cross_encoder_score"] == doc.score
        original = next(c for c in candidates if c.id == doc.id)
        assert doc.meta["dense_score"] == original.score
    assert len({round(s, 6) for s in scores}) > 1  # images and texts really get different judgements


@pytest.mark.parametrize("recipe", ["monoqwen", "qwen3_vl_reranker", "zero_shot_yes_no"])
def test_batching_gives_the_same_scores_as_one_at_a_time(
    tiny_instruct: str, candidates: list[Document], recipe: str
) -> None:
    batched = VisionLanguageRanker(tiny_instruct, recipe=recipe, batch_size=4).run(
        query="revenue", documents=candidates
    )
    single = VisionLanguageRanker(tiny_instruct, recipe=recipe, batch_size=1).run(query="revenue", documents=candidates)
    by_id = {d.id: d.score for d in single["documents"]}
    for doc in batched["documents"]:
        assert doc.score == pytest.approx(by_id[doc.id], abs=1e-4)


def test_max_candidates_bounds_the_forward_passes_and_the_rest_keep_their_order(
    tiny_monoqwen: str, candidates: list[Document], monkeypatch: pytest.MonkeyPatch
) -> None:
    images = [d for d in candidates if d.id.startswith("img")]
    ranker = VisionLanguageRanker(tiny_monoqwen, max_candidates=3, batch_size=2)
    calls = _spy_forward(ranker, monkeypatch)
    out = ranker.run(query="q", documents=list(reversed(images)))["documents"]
    assert [int(c["input_ids"].shape[0]) for c in calls] == [2, 1]  # one pass per judged candidate, in batches of 2
    judged = [d for d in out if "cross_encoder_score" in d.meta]
    assert {d.id for d in judged} == {"img0", "img1", "img2"}  # the best three by incoming score
    assert out[:3] == judged
    assert [d.id for d in out[3:]] == ["img3", "img4"]
    assert len(out) == len(images)


def test_max_candidates_are_shared_between_modalities_not_cut_across_their_scales(
    tiny_monoqwen: str, candidates: list[Document]
) -> None:
    # Pages scored by MaxSim (tens), texts by SigLIP cosines (below 1): one cut by score would judge pages only.
    mixed = [replace(d, score=20.0 - i) if not d.id.startswith("text") else d for i, d in enumerate(candidates)]
    out = VisionLanguageRanker(tiny_monoqwen, max_candidates=4).run(query="q", documents=mixed)["documents"]
    judged = {d.id for d in out if "cross_encoder_score" in d.meta}
    assert judged == {"img0", "img1", "page2", "text-a"}  # round-robin over image, page, text by their own ranks
    assert len(out) == len(mixed)
    assert [d.id for d in out[4:]] == ["img2", "img3", "img4", "text-b"]  # the rest in incoming order


def test_unreadable_candidates_keep_their_score_with_a_warning(
    tiny_monoqwen: str, candidates: list[Document], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "broken.png").write_bytes(b"garbage")
    broken = Document(id="broken", meta={"file_path": str(tmp_path / "broken.png")}, score=0.95)
    with caplog.at_level(logging.WARNING):
        out = VisionLanguageRanker(tiny_monoqwen).run(query="q", documents=[broken, *candidates])["documents"]
    assert len(out) == len(candidates) + 1
    kept = next(d for d in out if d.id == "broken")
    assert kept.score == 0.95
    assert "cross_encoder_score" not in kept.meta
    assert "'broken'" in caplog.text


def test_a_banner_the_processor_refuses_keeps_its_score_and_the_query_goes_on(
    tiny_monoqwen: str, candidates: list[Document], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "banner.png"
    Image.new("RGB", (1600, 6), "navy").save(path)
    banner = Document(id="banner", meta={"file_path": str(path)}, score=0.55)
    with caplog.at_level(logging.WARNING):
        out = VisionLanguageRanker(tiny_monoqwen, batch_size=4).run(query="q", documents=[banner, *candidates])
    docs = out["documents"]
    assert len(docs) == len(candidates) + 1
    assert sum("cross_encoder_score" in d.meta for d in docs) >= len(candidates)  # the others are all judged
    kept = next(d for d in docs if d.id == "banner")
    loaded = load_document_image(banner, "image")
    if max(loaded.size) / min(loaded.size) > 200:
        # The shared loader hands the banner over as it is: Qwen's processor refuses it (aspect ratio > 200).
        assert kept.score == 0.55
        assert "cross_encoder_score" not in kept.meta
        assert "'banner'" in caplog.text
        assert "aspect ratio" in caplog.text
    else:  # the shared loader made it acceptable: it is judged like any image
        assert 0.0 <= kept.meta["cross_encoder_score"] <= 1.0


def test_top_k_threshold_and_empty_query(tiny_monoqwen: str, candidates: list[Document]) -> None:
    ranker = VisionLanguageRanker(tiny_monoqwen, top_k=3)
    assert len(ranker.run(query="q", documents=candidates)["documents"]) == 3
    assert ranker.run(query="q", documents=candidates, top_k=0)["documents"] == []
    assert len(VisionLanguageRanker(tiny_monoqwen).run(query="q", documents=candidates)["documents"]) == len(candidates)
    scores = [d.score for d in ranker.run(query="q", documents=candidates, top_k=100)["documents"]]
    cut = sorted(scores)[len(scores) // 2]
    kept = ranker.run(query="q", documents=candidates, top_k=100, score_threshold=cut)["documents"]
    assert [d.score for d in kept] == [s for s in scores if s >= cut]
    with pytest.raises(ValueError, match="empty query"):
        ranker.run(query="  ", documents=candidates)


def test_top_k_returns_exactly_the_head_of_the_full_ranking_over_many_unjudged_candidates(
    tiny_monoqwen: str, candidates: list[Document]
) -> None:
    # The unjudged candidates are copied only when top_k returns them: the result must be the full ranking's head.
    texts = [
        Document(id=f"t{i:02d}", content=f"passage {i}", score=[0.1 + i / 100, None][i % 3 == 0]) for i in range(40)
    ]
    docs = [*candidates, *texts]
    before = copy.deepcopy(docs)
    ranker = VisionLanguageRanker(tiny_monoqwen, max_candidates=3)
    full = ranker.run(query="q", documents=docs)["documents"]
    assert len(full) == len(docs)
    assert sum("cross_encoder_score" in d.meta for d in full) == 3

    def summary(ranked: list[Document]) -> list[tuple[str, float | None, dict]]:
        return [(d.id, d.score, d.meta) for d in ranked]

    for top_k in (1, 3, 4, 10, len(docs) - 1):
        assert summary(ranker.run(query="q", documents=docs, top_k=top_k)["documents"]) == summary(full[:top_k])
    assert docs == before
    assert [d.meta for d in docs] == [d.meta for d in before]


def test_input_is_not_mutated(tiny_monoqwen: str, candidates: list[Document]) -> None:
    before = copy.deepcopy(candidates)
    VisionLanguageRanker(tiny_monoqwen).run(query="q", documents=candidates)
    assert candidates == before


def test_answer_tokens_come_from_the_tokenizer_and_unknown_tokens_are_named(tiny_instruct: str, tiny_vlm: str) -> None:
    ranker = VisionLanguageRanker(tiny_instruct, recipe="qwen3_vl_reranker")
    ranker.warm_up()
    vocab = ranker._vlm.tokenizer.get_vocab()
    assert ranker._answer_ids == ([vocab["yes"]], [vocab["no"]])  # no case variants outside the zero-shot recipe
    with pytest.raises(ModelLoadError, match=r"positive_token 'definitely' is not a single token"):
        VisionLanguageRanker(tiny_instruct, positive_token="definitely").warm_up()
    # A generic chat model whose vocabulary has no single "True" token cannot run the MonoQwen recipe.
    with pytest.raises(ModelLoadError, match=r"positive_token 'True' is not a single token"):
        VisionLanguageRanker(tiny_vlm).warm_up()
    with pytest.raises(ValueError, match="two different"):
        VisionLanguageRanker(tiny_instruct, positive_token="yes", negative_token="yes")


def test_custom_prompt_template_changes_the_judgement(tiny_instruct: str, candidates: list[Document]) -> None:
    default = VisionLanguageRanker(tiny_instruct, recipe="zero_shot_yes_no").run(query="q", documents=candidates)
    custom = VisionLanguageRanker(
        tiny_instruct,
        recipe="zero_shot_yes_no",
        prompt_template="Relevant to {{ query }}? {{ content }} Say yes or no.",
    ).run(query="q", documents=candidates)
    assert {d.id: d.score for d in default["documents"]} != {d.id: d.score for d in custom["documents"]}
    with pytest.raises(ValueError, match="not valid Jinja2"):
        VisionLanguageRanker(tiny_instruct, prompt_template="{% if %}")


# --- bounds: visual tokens, query and candidate lengths ---------------------------------------------------------


def test_a_12_megapixel_photo_gets_a_bounded_number_of_visual_tokens(
    tiny_instruct_full_budget: str, tiny_instruct: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (4000, 3000), "green").save(path, quality=50)
    photo = Document(id="photo", meta={"file_path": str(path)})

    ranker = VisionLanguageRanker(tiny_instruct_full_budget, recipe="zero_shot_yes_no")
    calls = _spy_forward(ranker, monkeypatch)
    ranker.run(query="q", documents=[photo])
    merge = ranker._vlm.processor.image_processor.merge_size
    visual_tokens = int(calls[0]["image_grid_thw"].prod()) // merge**2
    assert 1000 < visual_tokens <= 1280  # Qwen's recommended cap, not the checkpoint's 16384
    assert int((calls[0]["input_ids"] == ranker._vlm.processor.image_token_id).sum()) == visual_tokens

    # An explicit budget is used as given (and serialized); a checkpoint's own smaller limit is never raised.
    small = VisionLanguageRanker(tiny_instruct_full_budget, processor_kwargs={"max_pixels": 64 * 28 * 28})
    assert small.to_dict()["init_parameters"]["processor_kwargs"] == {"max_pixels": 64 * 28 * 28}
    small_calls = _spy_forward(small, monkeypatch)
    small.run(query="q", documents=[photo])
    assert int(small_calls[0]["image_grid_thw"].prod()) // merge**2 <= 64
    own = VisionLanguageRanker(tiny_instruct)
    own.warm_up()
    assert own._vlm.processor.image_processor.size.longest_edge == 28 * 28 * 16


def test_huge_query_and_candidate_are_cut_to_the_token_budgets_with_a_warning(
    tiny_monoqwen: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ranker = VisionLanguageRanker(tiny_monoqwen, max_query_tokens=64, max_text_tokens=128, batch_size=1)
    calls = _spy_forward(ranker, monkeypatch)
    huge_query = "which slide shows the sales forecast " * 2800  # ~100k characters
    huge_text = Document(id="huge", content="invoice total amount due in thirty days " * 25_000)  # 1M characters
    image = Document(id="img", meta={"file_path": str(make_image(tmp_path / "a.png", size=(56, 56)))})
    with caplog.at_level(logging.WARNING):
        out = ranker.run(query=huge_query, documents=[huge_text, image])["documents"]
    assert {d.id for d in out} == {"huge", "img"}
    assert all("cross_encoder_score" in d.meta for d in out)
    template_tokens = 80  # chat template, MonoQwen prompt and vision markers
    text_call, image_call = calls
    assert text_call["input_ids"].shape[1] <= 64 + 128 + template_tokens
    assert image_call["input_ids"].shape[1] <= 64 + 16 + template_tokens  # 16 visual tokens at most here
    assert "max_query_tokens=64" in caplog.text
    assert "'huge' (1000000 characters)" in caplog.text


# --- pipelines ------------------------------------------------------------------------------------------------


def test_yaml_round_trip_and_calibrator_receives_every_candidate(
    tiny_monoqwen: str, tiny_instruct: str, candidates: list[Document]
) -> None:
    pipe = Pipeline()
    pipe.add_component(
        "vlm_ranker",
        VisionLanguageRanker(
            tiny_monoqwen,
            processor=tiny_instruct,
            max_candidates=6,
            image_size=(64, 64),
            batch_size=3,
            processor_kwargs={"max_pixels": 28 * 28 * 8},
            max_text_tokens=300,
        ),
    )
    pipe.add_component("calibrator", ModalityScoreCalibrator(method="minmax", alpha=1.0))
    pipe.connect("vlm_ranker.documents", "calibrator.documents")
    before = pipe.run({"vlm_ranker": {"query": "q", "documents": candidates}}, include_outputs_from={"vlm_ranker"})
    restored = Pipeline.loads(pipe.dumps())
    ranker = restored.get_component("vlm_ranker")
    assert ranker.image_size == (64, 64)
    assert ranker.processor == tiny_instruct
    assert ranker.processor_kwargs == {"max_pixels": 28 * 28 * 8}
    assert ranker.to_dict() == pipe.get_component("vlm_ranker").to_dict()
    after = restored.run({"vlm_ranker": {"query": "q", "documents": candidates}}, include_outputs_from={"vlm_ranker"})
    assert [d.id for d in after["vlm_ranker"]["documents"]] == [d.id for d in before["vlm_ranker"]["documents"]]
    # top_k=None: the mixed text/image list reaches the calibrator whole, the calibrator makes the cut.
    assert len(after["vlm_ranker"]["documents"]) == len(candidates)
    calibrated = after["calibrator"]["documents"]
    judged = [d for d in calibrated if "cross_encoder_score" in d.meta]
    assert judged
    assert all("calibrated_late_interaction_score" in d.meta for d in judged)
