from __future__ import annotations

import json
import logging
import multiprocessing
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from haystack import Document, Pipeline, component

import haystack_integrations.components.monitors.alignment_drift.monitor as monitor_module
import haystack_integrations.components.monitors.alignment_drift.state as state_module
from haystack_integrations.common.multimodal_rag.errors import DriftStateError
from haystack_integrations.components.monitors.alignment_drift import AlignmentDriftMonitor, DriftReport


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
    monitor.close()

    restarted = AlignmentDriftMonitor(window_size=300, min_samples=100, state_path=str(path))
    again = restarted.run(documents=[])["drift_report"]
    assert again["samples"] == first["samples"]
    assert again["samples_seen"] == first["samples_seen"]
    assert again["baseline_gap"] == pytest.approx(first["baseline_gap"])
    assert again["calls"] == first["calls"] + 1
    restarted.flush()
    written = path.read_text()

    def crash(src, dst):
        raise KeyboardInterrupt("simulated crash between the temp write and the rename")

    restarted.run(documents=_stream(rng, 1, 0.1)[0])
    monkeypatch.setattr(state_module.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        restarted.flush()
    monkeypatch.undo()
    assert not list(path.parent.glob("*.tmp"))
    assert path.read_text() == written  # the previous state, intact
    survivor = AlignmentDriftMonitor(window_size=300, min_samples=100, state_path=str(path))
    assert survivor.run(documents=[])["drift_report"]["calls"] == again["calls"] + 1


def test_init_touches_no_files_and_warm_up_is_idempotent(tmp_path) -> None:
    path = tmp_path / "not-yet" / "drift.json"
    monitor = AlignmentDriftMonitor(state_path=str(path))
    restored = AlignmentDriftMonitor.from_dict(monitor.to_dict())
    assert not (tmp_path / "not-yet").exists()
    assert restored.to_dict()["init_parameters"]["persist_interval"] == 10.0
    monitor.warm_up()
    monitor.warm_up()
    assert (tmp_path / "not-yet" / "drift.json.lock").exists()
    assert not path.exists()  # nothing recorded, nothing written
    # A corrupt file is only read (and refused) at warm_up, not at construction.
    path.write_text("{not json")
    late = AlignmentDriftMonitor(state_path=str(path))
    with pytest.raises(DriftStateError, match=r"drift\.json"):
        late.warm_up()


def test_writes_are_batched_and_close_writes_the_rest(tmp_path) -> None:
    path = tmp_path / "drift.json"
    rng = np.random.default_rng(12)
    monitor = AlignmentDriftMonitor(state_path=str(path), persist_every=10, persist_interval=None)
    for batch in _stream(rng, 25, 0.1, per_modality=2):
        monitor.run(documents=batch)
    # Killed here without close(): what the file holds is everything but the last, unwritten batch.
    on_disk = AlignmentDriftMonitor(state_path=str(path)).run(documents=[])["drift_report"]
    assert on_disk["calls"] == 20 + 1
    assert on_disk["samples_seen"]["text"] == 20 * 2
    monitor.close()
    after_close = AlignmentDriftMonitor(state_path=str(path)).run(documents=[])["drift_report"]
    # The probe above wrote nothing (it was not closed); close() added the 5 unwritten calls.
    assert after_close["calls"] == 25 + 1
    assert after_close["samples_seen"] == {"text": 50, "image": 50, "page": 0}


def test_writes_also_happen_after_persist_interval_seconds(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": 1000.0}

    class FakeTime:
        @staticmethod
        def monotonic() -> float:
            return clock["now"]

    monkeypatch.setattr(monitor_module, "time", FakeTime)
    path = tmp_path / "drift.json"
    monitor = AlignmentDriftMonitor(state_path=str(path), persist_every=1000, persist_interval=5.0)
    batch = _stream(np.random.default_rng(13), 1, 0.1, per_modality=1)[0]
    monitor.run(documents=batch)
    clock["now"] += 4.9
    monitor.run(documents=batch)
    assert not path.exists()
    clock["now"] += 0.2
    monitor.run(documents=batch)
    assert json.loads(path.read_text())["calls"] == 3


def test_eight_instances_in_threads_on_one_state_file_lose_no_sample(tmp_path) -> None:
    path = tmp_path / "drift.json"
    n_instances, n_calls = 8, 60
    batch = _stream(np.random.default_rng(14), 1, 0.1, per_modality=2)[0]
    monitors = [
        AlignmentDriftMonitor(window_size=100_000, min_samples=10, state_path=str(path), persist_every=6)
        for _ in range(n_instances)
    ]
    start = threading.Barrier(n_instances)

    def worker(monitor: AlignmentDriftMonitor) -> None:
        start.wait()
        for _ in range(n_calls):
            monitor.run(documents=batch)
        monitor.close()

    threads = [threading.Thread(target=worker, args=(m,)) for m in monitors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = n_instances * n_calls
    report = AlignmentDriftMonitor(window_size=100_000, min_samples=10, state_path=str(path)).run(documents=[])[
        "drift_report"
    ]
    assert report["calls"] == total + 1
    assert report["samples"] == {"text": total * 2, "visual": total * 2}
    assert report["samples_seen"] == {"text": total * 2, "image": total * 2, "page": 0}
    # Every instance continued from the merged file: the last one to close saw everything.
    assert max(m.run(documents=[])["drift_report"]["calls"] for m in monitors) >= total


def _process_worker(path: str, n_calls: int, start: Any) -> None:
    monitor = AlignmentDriftMonitor(
        window_size=100_000, min_samples=10, state_path=path, persist_every=5, persist_interval=None
    )
    batch = _stream(np.random.default_rng(15), 1, 0.1, per_modality=2)[0]
    monitor.warm_up()
    start.wait()
    for _ in range(n_calls):
        monitor.run(documents=batch)
    monitor.close()


@pytest.mark.timeout(120)
def test_two_processes_on_one_state_file_lose_no_sample(tmp_path) -> None:
    path = str(tmp_path / "drift.json")
    n_calls = 100
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    processes = [context.Process(target=_process_worker, args=(path, n_calls, start)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=100)
    assert [p.exitcode for p in processes] == [0, 0]
    state = json.loads(Path(path).read_text())
    assert state["calls"] == 2 * n_calls
    assert state["modality_counts"] == {"text": 2 * n_calls * 2, "image": 2 * n_calls * 2, "page": 0}
    assert len(state["windows"]["text"]) == len(state["windows"]["visual"]) == 2 * n_calls * 2


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_in_the_state_file_are_refused(tmp_path, bad: str) -> None:
    path = tmp_path / "drift.json"
    monitor = AlignmentDriftMonitor(state_path=str(path), persist_every=1)
    monitor.run(documents=_stream(np.random.default_rng(16), 1, 0.1)[0])
    state = json.loads(path.read_text())
    text = path.read_text().replace(json.dumps(state["windows"]["text"][0]), bad, 1)
    path.write_text(text)
    with pytest.raises(DriftStateError, match=r"drift\.json.*non-finite"):
        AlignmentDriftMonitor(state_path=str(path)).warm_up()
    fresh = AlignmentDriftMonitor(state_path=str(path), reset_corrupt_state=True)
    report = fresh.run(documents=[])["drift_report"]
    assert report["calls"] == 1
    assert report["samples"] == {"text": 0, "visual": 0}
    assert (tmp_path / "drift.json.corrupt").read_text() == text


def test_orphan_temporary_files_of_crashed_writers_are_removed(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "drift.json"
    orphan = tmp_path / "drift.json.k3j2h1.tmp"
    orphan.write_text('{"half": ')
    unrelated = tmp_path / "other.json.k3j2h1.tmp"
    unrelated.write_text("keep me")
    with caplog.at_level(logging.WARNING):
        AlignmentDriftMonitor(state_path=str(path)).warm_up()
    assert not orphan.exists()
    assert unrelated.exists()
    assert "k3j2h1.tmp" in caplog.text


def test_corrupt_state_file_is_named_or_reset_on_request(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "drift.json"
    path.write_text("{not json")

    with pytest.raises(DriftStateError, match=r"drift\.json"):
        AlignmentDriftMonitor(state_path=str(path)).run(documents=[])
    with caplog.at_level(logging.WARNING):
        monitor = AlignmentDriftMonitor(state_path=str(path), reset_corrupt_state=True)
        monitor.warm_up()
    assert "started fresh" in caplog.text
    assert (tmp_path / "drift.json.corrupt").read_text() == "{not json"
    assert monitor.run(documents=[])["drift_report"]["calls"] == 1


def test_drift_report_has_the_typed_keys() -> None:
    rng = np.random.default_rng(17)
    for method, extra in (("mean_gap", "standard_error"), ("ks", "p_value"), ("psi", "psi")):
        monitor = AlignmentDriftMonitor(window_size=50, min_samples=20, method=method, threshold=0.5)
        warming = monitor.run(documents=[])["drift_report"]
        assert set(warming) == DriftReport.__required_keys__
        for batch in _stream(rng, 10, 0.1):
            report = monitor.run(documents=batch)["drift_report"]
        assert report["status"] == "ok"
        assert set(report) == DriftReport.__required_keys__ | {extra}


def test_reset_baseline_on_a_shared_state_file_reaches_the_other_instances(tmp_path) -> None:
    path = str(tmp_path / "drift.json")
    rng = np.random.default_rng(19)
    first = AlignmentDriftMonitor(window_size=400, min_samples=100, state_path=path, persist_every=5)
    second = AlignmentDriftMonitor(window_size=400, min_samples=100, state_path=path, persist_every=5)
    for batch in _stream(rng, 40, 0.2):
        first.run(documents=batch)
        second.run(documents=batch)
    old = second.run(documents=[])["drift_report"]["baseline_gap"]
    assert old == pytest.approx(0.2, abs=0.03)
    for batch in _stream(rng, 40, 0.0):
        first.run(documents=batch)
    first.reset_baseline()  # from the merged windows: the last 100 scores per group have a gap near 0
    for _ in range(5):
        report = second.run(documents=[])["drift_report"]  # its next write adopts the file's baseline
    assert report["baseline_gap"] == pytest.approx(0.0, abs=0.03)


def test_the_drift_report_connects_to_a_dict_input() -> None:
    @component
    class ReportSink:
        @component.output_types(status=str)
        def run(self, report: dict) -> dict:
            return {"status": report["status"]}

    pipe = Pipeline()
    pipe.add_component("monitor", AlignmentDriftMonitor())
    pipe.add_component("sink", ReportSink())
    pipe.connect("monitor.drift_report", "sink.report")
    assert pipe.run({"monitor": {"documents": []}})["sink"]["status"] == "warming_up"


def test_save_is_a_deprecated_alias_of_flush(tmp_path) -> None:
    path = tmp_path / "drift.json"
    monitor = AlignmentDriftMonitor(state_path=str(path))
    monitor.run(documents=_stream(np.random.default_rng(18), 1, 0.1)[0])
    with pytest.warns(DeprecationWarning, match="flush"):
        monitor.save()
    assert json.loads(path.read_text())["calls"] == 1


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
        ({"baseline": {"text": [0.1, float("nan")]}}, "finite scores"),
        ({"persist_every": 0}, "persist_every"),
        ({"persist_interval": 0}, "persist_interval must be a positive number"),
        ({"persist_interval": float("inf")}, "persist_interval must be a positive number"),
    ],
)
def test_invalid_monitor_parameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AlignmentDriftMonitor(**kwargs)


def test_closing_a_monitor_that_recorded_nothing_creates_no_file(tmp_path) -> None:
    state = tmp_path / "typo" / "index" / "drift.json"
    monitor = AlignmentDriftMonitor(state_path=str(state))
    monitor.close()
    assert not (tmp_path / "typo").exists()
