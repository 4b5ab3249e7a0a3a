from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
from haystack import Document, Pipeline

from haystack_integrations.common.multimodal_rag.numerics.ranking import select_top
from haystack_integrations.components.monitors.alignment_drift import AlignmentDriftMonitor
from haystack_integrations.components.rankers.modality_calibration import ModalityScoreCalibrator
from haystack_integrations.components.rankers.modality_calibration.calibrator import MAX_RULE_QUERY_CHARS


def _doc(doc_id: str, modality: str, dense: float | None, late: float | None = None, **meta) -> Document:
    m = {"modality": modality, **meta}
    if late is not None:
        m["late_interaction_score"] = late
    return Document(id=doc_id, content=doc_id if modality == "text" else None, meta={**m, "dense_score": dense})


def _reference(rng: np.random.Generator) -> ModalityScoreCalibrator:
    """Text dense ~ N(0.6, 0.1), image dense ~ N(0.3, 0.05), image MaxSim ~ N(12, 2)."""
    batches = []
    for _ in range(40):
        batch = [_doc(f"t{i}", "text", float(rng.normal(0.6, 0.1))) for i in range(5)]
        batch += [_doc(f"i{i}", "image", float(rng.normal(0.3, 0.05)), float(rng.normal(12, 2))) for i in range(5)]
        batches.append(batch)
    calibrator = ModalityScoreCalibrator(method="ecdf", alpha=0.5)
    calibrator.fit(batches)
    return calibrator


def test_ecdf_lifts_a_typical_image_above_a_mediocre_text() -> None:
    calibrator = _reference(np.random.default_rng(2))
    docs = [_doc("mediocre-text", "text", 0.55), _doc("good-image", "image", 0.36, 14.0)]
    # Raw dense scores put the text first; calibrated, the image is above its modality's median on both scores.
    out = calibrator.run(documents=docs)["documents"]
    assert [d.id for d in out] == ["good-image", "mediocre-text"]
    image = out[0]
    assert image.meta["calibrated_dense_score"] == pytest.approx(0.89, abs=0.06)
    assert image.meta["calibrated_late_interaction_score"] == pytest.approx(0.84, abs=0.06)
    assert image.meta["fused_score"] == image.score
    assert "calibrated_late_interaction_score" not in out[1].meta


def test_ecdf_does_not_make_the_best_of_a_bad_set_a_perfect_score_but_minmax_does() -> None:
    calibrator = _reference(np.random.default_rng(3))
    bad_images = [_doc(f"bad{i}", "image", 0.15 + i * 0.01, 6.0 + i) for i in range(3)]
    ecdf_best = calibrator.run(documents=bad_images)["documents"][0]
    assert ecdf_best.score < 0.1
    minmax = ModalityScoreCalibrator(method="minmax", alpha=0.5)
    assert minmax.run(documents=bad_images)["documents"][0].score == 1.0


def test_zscore_uses_the_reference_mean_and_std() -> None:
    calibrator = _reference(np.random.default_rng(4))
    ref = calibrator.reference["distributions"]["text"]["dense"]
    zs = ModalityScoreCalibrator(method="zscore", reference=calibrator.reference)
    out = zs.run(documents=[_doc("t", "text", ref["mean"] + ref["std"])])["documents"][0]
    assert out.score == pytest.approx(1.0, abs=1e-6)


def test_fusion_uses_alpha_and_query_rules_first_match_wins() -> None:
    calibrator = ModalityScoreCalibrator(
        method="minmax",
        alpha=0.5,
        query_alpha_rules=[
            {"pattern": r"\b(chart|diagram)\b", "alpha": 0.9},
            {"pattern": r"chart", "alpha": 0.1},
            {"pattern": r"^what is\b", "alpha": 0.2},
        ],
    )
    assert calibrator.alpha_for("Show me the CHART of sales") == 0.9
    assert calibrator.alpha_for("What is EBITDA?") == 0.2
    assert calibrator.alpha_for("sales") == 0.5
    assert calibrator.alpha_for(None) == 0.5
    # One image high on dense, low on late; the other the opposite: alpha decides the order.
    docs = [_doc("dense-strong", "image", 0.9, 1.0), _doc("late-strong", "image", 0.1, 9.0)]
    assert calibrator.run(documents=docs, query="a chart")["documents"][0].id == "late-strong"
    assert calibrator.run(documents=docs, query="what is it")["documents"][0].id == "dense-strong"
    fused = calibrator.run(documents=docs, query="a chart")["documents"][0]
    assert fused.score == pytest.approx(0.1 * 0.0 + 0.9 * 1.0)


def test_cross_encoder_score_wins_over_late_interaction_score() -> None:
    calibrator = ModalityScoreCalibrator(method="minmax", alpha=1.0)
    docs = [
        _doc("a", "image", 0.5, 10.0, cross_encoder_score=0.1),
        _doc("b", "image", 0.5, 1.0, cross_encoder_score=0.9),
    ]
    assert [d.id for d in calibrator.run(documents=docs)["documents"]] == ["b", "a"]


def test_missing_and_non_finite_scores_are_kept_and_named(caplog: pytest.LogCaptureFixture) -> None:
    calibrator = ModalityScoreCalibrator(method="minmax")
    docs = [
        _doc("ok", "text", 0.5),
        _doc("nan-dense", "text", float("nan")),
        _doc("inf-late", "image", 0.4, float("inf")),
        Document(id="no-score", content="x", meta={"modality": "text"}),
    ]
    with caplog.at_level(logging.WARNING):
        out = calibrator.run(documents=docs)["documents"]
    assert len(out) == 4
    assert out[-1].score is None
    assert {out[-1].id, out[-2].id} == {"nan-dense", "no-score"}
    assert "'nan-dense'" in caplog.text
    assert "'inf-late'" in caplog.text
    inf_late = next(d for d in out if d.id == "inf-late")
    assert "calibrated_late_interaction_score" not in inf_late.meta


def test_unknown_modality_is_an_error_naming_the_document_and_missing_one_is_inferred() -> None:
    calibrator = ModalityScoreCalibrator(method="minmax")
    with pytest.raises(ValueError, match=r"'weird'.*'video'"):
        calibrator.run(documents=[Document(id="weird", content="x", meta={"modality": "video", "dense_score": 1.0})])
    out = calibrator.run(documents=[Document(id="plain", content="text only", score=0.3)])["documents"]
    assert out[0].score == 1.0


def test_fallback_without_reference_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    calibrator = ModalityScoreCalibrator(method="ecdf")
    docs = [_doc("a", "text", 0.2), _doc("b", "text", 0.4)]
    with caplog.at_level(logging.WARNING):
        calibrator.run(documents=docs)
        calibrator.run(documents=docs)
    assert caplog.text.count("no fitted reference") == 1


def test_top_k_override_and_input_not_mutated() -> None:
    calibrator = ModalityScoreCalibrator(method="minmax", top_k=2)
    docs = [_doc(f"d{i}", "text", i / 10) for i in range(5)]
    before = copy.deepcopy(docs)
    assert len(calibrator.run(documents=docs)["documents"]) == 2
    assert len(calibrator.run(documents=docs, top_k=0)["documents"]) == 0
    assert len(calibrator.run(documents=docs, top_k=10)["documents"]) == 5
    assert docs == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "softmax"}, "method must be one of"),
        ({"alpha": 1.5}, "alpha must be a number in"),
        ({"query_alpha_rules": [{"pattern": "("}]}, "must be a dict with 'pattern' and 'alpha'"),
        ({"query_alpha_rules": [{"pattern": "(", "alpha": 0.3}]}, "not a valid regular expression"),
        ({"reference": {"distributions": {"video": {}}}}, "unknown modality"),
        ({"reference": {"distributions": {"text": {"dense": {"quantiles": [2, 1]}}}}}, "non-decreasing"),
    ],
)
def test_invalid_parameters_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModalityScoreCalibrator(**kwargs)


def test_yaml_round_trip_of_a_pipeline_with_fitted_calibrator_and_monitor(tmp_path) -> None:
    calibrator = _reference(np.random.default_rng(11))
    monitor = AlignmentDriftMonitor(window_size=300, min_samples=50, state_path=str(tmp_path / "drift.json"))
    pipe = Pipeline()
    pipe.add_component("calibrator", calibrator)
    pipe.add_component("monitor", monitor)
    pipe.connect("calibrator.documents", "monitor.documents")
    docs = [_doc("t", "text", 0.55), _doc("i", "image", 0.36, 14.0)]
    before = pipe.run({"calibrator": {"documents": docs, "query": "a chart"}})
    monitor.close()  # writes are batched: close() writes what the batch holds
    yaml_text = pipe.dumps()
    assert "quantiles" in yaml_text
    restored = Pipeline.loads(yaml_text)
    assert restored.get_component("calibrator").reference == calibrator.reference
    after = restored.run({"calibrator": {"documents": docs, "query": "a chart"}})
    assert [d.id for d in after["monitor"]["documents"]] == [d.id for d in before["monitor"]["documents"]]
    assert [d.score for d in after["monitor"]["documents"]] == [d.score for d in before["monitor"]["documents"]]
    assert after["monitor"]["drift_report"]["calls"] == 2  # continued from the state file


def _fitted_reference() -> dict:
    return _reference(np.random.default_rng(20)).reference


@pytest.mark.parametrize(
    ("method", "mutate", "message"),
    [
        ("ecdf", lambda d: d["image"]["dense"]["quantiles"].__setitem__(3, float("nan")), r"'image'.*'dense'.*finite"),
        ("ecdf", lambda d: d["text"]["dense"]["quantiles"].reverse(), r"'text'.*'dense'.*non-decreasing"),
        ("ecdf", lambda d: d["image"]["late_interaction"].__setitem__("quantiles", [1.0]), "at least 2 values"),
        ("zscore", lambda d: d["image"]["late_interaction"].pop("std"), r"'image'.*'late_interaction'.*no 'std'"),
        ("zscore", lambda d: d["text"]["dense"].pop("mean"), r"'text'.*'dense'.*no 'mean'"),
        ("ecdf", lambda d: d["text"]["dense"].__setitem__("std", float("inf")), r"'text'.*'dense'.*'std'.*finite"),
        ("ecdf", lambda d: d["text"].__setitem__("dense", "oops"), r"'text'.*'dense'.*must be a dict"),
    ],
)
def test_references_are_validated_when_set_naming_modality_and_score_type(method, mutate, message) -> None:
    reference = copy.deepcopy(_fitted_reference())
    mutate(reference["distributions"])
    with pytest.raises(ValueError, match=message):
        ModalityScoreCalibrator(method=method, reference=reference)
    data = ModalityScoreCalibrator(method=method).to_dict()
    data["init_parameters"]["reference"] = reference
    with pytest.raises(ValueError, match=message):
        ModalityScoreCalibrator.from_dict(data)
    calibrator = ModalityScoreCalibrator(method=method)
    with pytest.raises(ValueError, match=message):
        calibrator.reference = reference
    assert calibrator.reference is None


def test_an_ecdf_reference_without_moments_is_accepted_but_zscore_needs_them() -> None:
    reference = copy.deepcopy(_fitted_reference())
    for by_type in reference["distributions"].values():
        for dist in by_type.values():
            dist.pop("mean")
            dist.pop("std")
    docs = [_doc("t", "text", 0.6), _doc("i", "image", 0.3, 12.0)]
    assert len(ModalityScoreCalibrator(method="ecdf", reference=reference).run(documents=docs)["documents"]) == 2
    with pytest.raises(ValueError, match="zscore method needs"):
        ModalityScoreCalibrator(method="zscore", reference=reference)


def test_fit_refuses_a_reference_that_is_not_finite_and_keeps_the_old_one() -> None:
    calibrator = _reference(np.random.default_rng(21))
    before = calibrator.reference
    huge = [[_doc(f"t{i}", "text", 1.7e308) for i in range(12)]]  # the mean of these overflows to infinity
    with pytest.raises(ValueError, match=r"'text'.*'dense'.*'mean'.*finite"):
        calibrator.fit(huge)
    assert calibrator.reference is before


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(\w+\s?)*$", r"(a|aa)+$", r"((ab)*c)*d", r"(?:x+y?)+"])
def test_backtracking_prone_rule_patterns_are_refused_at_init(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"query_alpha_rules\[0\]\['pattern'\].*refused.*backtrack"):
        ModalityScoreCalibrator(query_alpha_rules=[{"pattern": pattern, "alpha": 0.9}])


@pytest.mark.timeout(30)
def test_rules_see_a_bounded_prefix_so_a_huge_query_cannot_hang() -> None:
    # The shipped rag.yaml rules, plus single-character classes in quantified groups (allowed).
    calibrator = ModalityScoreCalibrator(
        alpha=0.5,
        query_alpha_rules=[
            {"pattern": r"\b(chart|graph|plot|diagram|figure|table|slide|photo|image|picture)s?\b", "alpha": 0.85},
            {"pattern": r"^\s*(what is|what are|define|who is)\b", "alpha": 0.4},
            {"pattern": r"(?:[ab])+c$", "alpha": 0.2},
            {"pattern": r"[a-z]{2,5}\d+", "alpha": 0.3},
        ],
    )
    attack = "a" * 1_000_000 + "b"
    assert calibrator.alpha_for(attack) == 0.5  # finishes (a 1M-character scan per rule at most)
    assert calibrator.alpha_for("what is " + "x" * 500_000) == 0.4
    # A keyword after the first MAX_RULE_QUERY_CHARS characters is not seen (documented).
    assert calibrator.alpha_for("x " * (MAX_RULE_QUERY_CHARS // 2) + "chart") == 0.5
    assert calibrator.alpha_for("x " * 10 + "chart") == 0.85


def test_ranking_matches_the_shared_select_top_rule_with_ties_and_unscored_documents() -> None:
    calibrator = ModalityScoreCalibrator(method="minmax", alpha=0.5)
    docs = [
        _doc("none-1", "text", None),
        _doc("tie-a", "text", 0.5),
        _doc("low", "text", 0.1),
        _doc("tie-b", "text", 0.5),
        _doc("none-2", "image", float("nan")),
        _doc("top", "text", 0.9),
    ]
    out = calibrator.run(documents=docs)["documents"]
    assert [d.id for d in out] == [d.id for d in select_top(out, top_k=None, score_threshold=None)]
    assert [d.id for d in out] == ["top", "tie-a", "tie-b", "low", "none-1", "none-2"]
    assert [d.id for d in calibrator.run(documents=docs, top_k=2)["documents"]] == ["top", "tie-a"]


def test_a_stale_calibrated_late_score_from_an_earlier_run_is_not_kept() -> None:
    calibrator = ModalityScoreCalibrator(method="minmax")
    docs = [_doc("t", "text", 0.4, calibrated_late_interaction_score=0.99), _doc("u", "text", 0.5)]
    out = calibrator.run(documents=docs)["documents"]
    assert all("calibrated_late_interaction_score" not in d.meta for d in out)
    assert docs[0].meta["calibrated_late_interaction_score"] == 0.99  # the input is untouched


def test_string_and_bool_scores_follow_the_per_value_rules(caplog: pytest.LogCaptureFixture) -> None:
    calibrator = ModalityScoreCalibrator(method="minmax")
    docs = [_doc("str", "text", "0.7"), _doc("bool", "text", True), _doc("num", "text", 0.2)]  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        out = {d.id: d for d in calibrator.run(documents=docs)["documents"]}
    assert out["str"].score == 1.0
    assert out["num"].score == 0.0
    assert out["bool"].score is None
    assert "'bool': dense score True" in caplog.text
