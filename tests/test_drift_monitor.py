from __future__ import annotations

import logging

import numpy as np
import pytest
from haystack import Document

from haystack_integrations.common.multimodal_rag.errors import DriftStateError
from haystack_integrations.components.monitors.alignment_drift import AlignmentDriftMonitor


def _doc(doc_id: str, modality: str, dense: float | None, late: float | None = None, **meta) -> Document:
    m = {"modality": modality, **meta}
    if late is not None:
        m["late_interaction_score"] = late
    return Document(id=doc_id, content=doc_id if modality == "text" else None, meta={**m, "dense_score": dense})


def _stream(rng: np.random.Generator, n_queries: int, gap: float, *, per_modality: int = 5) -> list[list[Document]]:
    batches = []
    for q in range(n_queries):
        batch = [_doc(f"q{q}t{i}", "text", float(rng.normal(0.3 + gap, 0.08))) for i in range(per_modality)]
        batch += [_doc(f"q{q}i{i}", "image", float(rng.normal(0.3, 0.08))) for i in range(per_modality)]
        batches.append(batch)
    return batches


@pytest.mark.parametrize("method", ["mean_gap", "ks", "psi"])
def test_stationary_stream_raises_no_alarm(method: str) -> None:
    threshold = {"mean_gap": 0.05, "ks": 1e-4, "psi": 0.25}[method]
    monitor = AlignmentDriftMonitor(window_size=500, min_samples=200, threshold=threshold, method=method)
    reports = [monitor.run(documents=b)["drift_report"] for b in _stream(np.random.default_rng(5), 600, 0.2)]
    assert reports[0]["status"] == "warming_up"
    assert reports[-1]["status"] == "ok"
    assert not any(r["drifted"] for r in reports)
    assert reports[-1]["gap"] == pytest.approx(0.2, abs=0.03)


@pytest.mark.parametrize("method", ["mean_gap", "ks", "psi"])
def test_a_gap_shift_of_0_1_is_detected(method: str, caplog: pytest.LogCaptureFixture) -> None:
    threshold = {"mean_gap": 0.05, "ks": 1e-4, "psi": 0.25}[method]
    rng = np.random.default_rng(6)
    monitor = AlignmentDriftMonitor(window_size=500, min_samples=200, threshold=threshold, method=method)
    for batch in _stream(rng, 150, 0.2):
        assert not monitor.run(documents=batch)["drift_report"]["drifted"]
    with caplog.at_level(logging.WARNING):
        reports = [monitor.run(documents=b)["drift_report"] for b in _stream(rng, 150, 0.3)]
    assert reports[-1]["drifted"]
    assert reports[-1]["drift_magnitude"] > 0
    assert caplog.text.count("drift detected") == 1
    if method == "mean_gap":
        assert reports[-1]["drift_magnitude"] == pytest.approx(0.1, abs=0.03)
    # Back to normal: the end of the drift is reported once too.
    with caplog.at_level(logging.WARNING):
        for batch in _stream(rng, 200, 0.2):
            monitor.run(documents=batch)
    assert caplog.text.count("drift ended") == 1


def test_documents_pass_through_unchanged() -> None:
    monitor = AlignmentDriftMonitor()
    docs = _stream(np.random.default_rng(7), 1, 0.1)[0]
    assert monitor.run(documents=docs)["documents"] is docs


def test_explicit_baseline_and_reset_baseline() -> None:
    rng = np.random.default_rng(8)
    baseline = {"text": list(rng.normal(0.5, 0.08, 300)), "image": list(rng.normal(0.3, 0.08, 300))}
    monitor = AlignmentDriftMonitor(window_size=300, min_samples=100, baseline=baseline)
    reports = [monitor.run(documents=b)["drift_report"] for b in _stream(rng, 80, 0.0)]
    assert reports[-1]["baseline_gap"] == pytest.approx(0.2, abs=0.03)
    assert reports[-1]["drifted"]
    monitor.reset_baseline()
    after = monitor.run(documents=_stream(rng, 1, 0.0)[0])["drift_report"]
    assert after["baseline_gap"] == pytest.approx(0.0, abs=0.03)
    assert not after["drifted"]


def test_state_persists_atomically_and_survives_a_crash_between_write_and_rename(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state" / "drift.json"
    rng = np.random.default_rng(9)
    monitor = AlignmentDriftMonitor(window_size=300, min_samples=100, state_path=str(path))
    for batch in _stream(rng, 50, 0.1):
        monitor.run(documents=batch)
    first = monitor.run(documents=_stream(rng, 1, 0.1)[0])["drift_report"]

    restarted = AlignmentDriftMonitor(window_size=300, min_samples=100, state_path=str(path))
    again = restarted.run(documents=[])["drift_report"]
    assert again["samples"] == first["samples"]
    assert again["baseline_gap"] == pytest.approx(first["baseline_gap"])
    assert again["calls"] == first["calls"] + 1

    import haystack_integrations.components.monitors.alignment_drift.monitor as monitor_module

    def crash(src, dst):
        raise KeyboardInterrupt("simulated crash between the temp write and the rename")

    monkeypatch.setattr(monitor_module.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        restarted.run(documents=_stream(rng, 1, 0.1)[0])
    monkeypatch.undo()
    assert not list(path.parent.glob("*.tmp"))
    survivor = AlignmentDriftMonitor(window_size=300, min_samples=100, state_path=str(path))
    assert survivor.run(documents=[])["drift_report"]["calls"] == again["calls"] + 1


def test_corrupt_state_file_is_named_or_reset_on_request(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "drift.json"
    path.write_text("{not json")

    with pytest.raises(DriftStateError, match=r"drift\.json"):
        AlignmentDriftMonitor(state_path=str(path))
    with caplog.at_level(logging.WARNING):
        monitor = AlignmentDriftMonitor(state_path=str(path), reset_corrupt_state=True)
    assert "started fresh" in caplog.text
    assert (tmp_path / "drift.json.corrupt").read_text() == "{not json"
    assert monitor.run(documents=[])["drift_report"]["calls"] == 1


def test_concurrent_runs_lose_no_sample() -> None:
    from concurrent.futures import ThreadPoolExecutor

    monitor = AlignmentDriftMonitor(window_size=100_000, min_samples=10)
    batch = _stream(np.random.default_rng(10), 1, 0.1, per_modality=3)[0]

    def call(_: int) -> None:
        monitor.run(documents=batch)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(4000)))
    report = monitor.run(documents=[])["drift_report"]
    assert report["calls"] == 4001
    assert report["samples"] == {"text": 4000 * 3, "visual": 4000 * 3}
    assert report["samples_seen"]["image"] == 4000 * 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "chi2"}, "method must be one of"),
        ({"threshold": 0}, "threshold must be a positive number"),
        ({"min_samples": 50, "window_size": 10}, "cannot exceed window_size"),
        ({"baseline": {"audio": [1.0]}}, "baseline keys"),
        ({"baseline": {"text": []}}, "non-empty list"),
    ],
)
def test_invalid_monitor_parameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AlignmentDriftMonitor(**kwargs)
