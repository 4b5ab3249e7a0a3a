from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
from haystack import Document, Pipeline

from haystack_integrations.common.multimodal_rag.errors import ModelLoadError
from haystack_integrations.components.rankers.modality_calibration import ModalityScoreCalibrator
from haystack_integrations.components.rankers.vlm import VisionLanguageRanker
from tests.helpers import COLORS, make_image, make_pdf


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


def _count_forward_passes(ranker: VisionLanguageRanker, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    ranker.warm_up()
    sizes: list[int] = []
    model = ranker._vlm.model
    real = model.forward

    def counting(*args, **kwargs):
        sizes.append(int(kwargs["input_ids"].shape[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    return sizes


def test_scores_are_probabilities_and_ordering_follows_them(tiny_vlm: str, candidates: list[Document]) -> None:
    out = VisionLanguageRanker(tiny_vlm, top_k=20).run(query="a red picture", documents=candidates)["documents"]
    assert len(out) == len(candidates)
    scores = [d.score for d in out]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)
    for doc in out:
        assert doc.meta["cross_encoder_score"] == doc.score
        original = next(c for c in candidates if c.id == doc.id)
        assert doc.meta["dense_score"] == original.score
    assert len({round(s, 6) for s in scores}) > 1  # images and texts really get different judgements


def test_batching_gives_the_same_scores_as_one_at_a_time(tiny_vlm: str, candidates: list[Document]) -> None:
    batched = VisionLanguageRanker(tiny_vlm, batch_size=4, top_k=20).run(query="revenue", documents=candidates)
    single = VisionLanguageRanker(tiny_vlm, batch_size=1, top_k=20).run(query="revenue", documents=candidates)
    by_id = {d.id: d.score for d in single["documents"]}
    for doc in batched["documents"]:
        assert doc.score == pytest.approx(by_id[doc.id], abs=1e-4)


def test_max_candidates_bounds_the_forward_passes_and_the_rest_keep_their_order(
    tiny_vlm: str, candidates: list[Document], monkeypatch: pytest.MonkeyPatch
) -> None:
    ranker = VisionLanguageRanker(tiny_vlm, max_candidates=3, batch_size=2, top_k=20)
    sizes = _count_forward_passes(ranker, monkeypatch)
    out = ranker.run(query="q", documents=list(reversed(candidates)))["documents"]
    assert sum(sizes) == 3  # one pass per judged candidate
    assert len(sizes) == 2  # in batches of 2
    judged = [d for d in out if "cross_encoder_score" in d.meta]
    assert {d.id for d in judged} == {"img0", "img1", "img2"}  # the best three by incoming score
    assert out[:3] == judged
    assert [d.id for d in out[3:]] == ["img3", "img4", "page2", "text-a", "text-b"]
    assert len(out) == len(candidates)


def test_unreadable_candidates_keep_their_score_with_a_warning(
    tiny_vlm: str, candidates: list[Document], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "broken.png").write_bytes(b"garbage")
    broken = Document(id="broken", meta={"file_path": str(tmp_path / "broken.png")}, score=0.95)
    with caplog.at_level(logging.WARNING):
        out = VisionLanguageRanker(tiny_vlm, top_k=20).run(query="q", documents=[broken, *candidates])["documents"]
    assert len(out) == len(candidates) + 1
    kept = next(d for d in out if d.id == "broken")
    assert kept.score == 0.95
    assert "cross_encoder_score" not in kept.meta
    assert "'broken'" in caplog.text


def test_top_k_threshold_and_empty_query(tiny_vlm: str, candidates: list[Document]) -> None:
    ranker = VisionLanguageRanker(tiny_vlm, top_k=3)
    assert len(ranker.run(query="q", documents=candidates)["documents"]) == 3
    assert ranker.run(query="q", documents=candidates, top_k=0)["documents"] == []
    scores = [d.score for d in ranker.run(query="q", documents=candidates, top_k=100)["documents"]]
    cut = sorted(scores)[len(scores) // 2]
    kept = ranker.run(query="q", documents=candidates, top_k=100, score_threshold=cut)["documents"]
    assert [d.score for d in kept] == [s for s in scores if s >= cut]
    with pytest.raises(ValueError, match="empty query"):
        ranker.run(query="  ", documents=candidates)


def test_input_is_not_mutated(tiny_vlm: str, candidates: list[Document]) -> None:
    before = copy.deepcopy(candidates)
    VisionLanguageRanker(tiny_vlm).run(query="q", documents=candidates)
    assert candidates == before


def test_token_ids_come_from_the_tokenizer_and_unknown_tokens_are_named(tiny_vlm: str) -> None:
    ranker = VisionLanguageRanker(tiny_vlm)
    ranker.warm_up()
    vocab = ranker._vlm.tokenizer.get_vocab()
    assert ranker._token_ids == (vocab["yes"], vocab["no"])
    with pytest.raises(ModelLoadError, match=r"positive_token 'definitely' is not a single token"):
        VisionLanguageRanker(tiny_vlm, positive_token="definitely").warm_up()
    with pytest.raises(ValueError, match="two different"):
        VisionLanguageRanker(tiny_vlm, positive_token="yes", negative_token="yes")


def test_custom_prompt_template_changes_the_judgement(tiny_vlm: str, candidates: list[Document]) -> None:
    default = VisionLanguageRanker(tiny_vlm, top_k=20).run(query="q", documents=candidates)["documents"]
    custom = VisionLanguageRanker(
        tiny_vlm, top_k=20, prompt_template="Relevant to {{ query }}? {{ content }} Say yes or no."
    ).run(query="q", documents=candidates)["documents"]
    assert {d.id: d.score for d in default} != {d.id: d.score for d in custom}
    with pytest.raises(ValueError, match="not valid Jinja2"):
        VisionLanguageRanker(tiny_vlm, prompt_template="{% if %}")


def test_yaml_round_trip_and_calibrator_reads_the_cross_encoder_score(
    tiny_vlm: str, candidates: list[Document]
) -> None:
    pipe = Pipeline()
    pipe.add_component(
        "vlm_ranker", VisionLanguageRanker(tiny_vlm, top_k=5, max_candidates=6, image_size=(64, 64), batch_size=3)
    )
    pipe.add_component("calibrator", ModalityScoreCalibrator(method="minmax", alpha=1.0))
    pipe.connect("vlm_ranker.documents", "calibrator.documents")
    before = pipe.run({"vlm_ranker": {"query": "q", "documents": candidates}}, include_outputs_from={"vlm_ranker"})
    restored = Pipeline.loads(pipe.dumps())
    ranker = restored.get_component("vlm_ranker")
    assert ranker.image_size == (64, 64)
    assert ranker.to_dict() == pipe.get_component("vlm_ranker").to_dict()
    after = restored.run({"vlm_ranker": {"query": "q", "documents": candidates}}, include_outputs_from={"vlm_ranker"})
    assert [d.id for d in after["vlm_ranker"]["documents"]] == [d.id for d in before["vlm_ranker"]["documents"]]
    calibrated = after["calibrator"]["documents"]
    judged = [d for d in calibrated if "cross_encoder_score" in d.meta]
    assert judged
    assert all("calibrated_late_interaction_score" in d.meta for d in judged)
