"""False alarms, detection delay and per-call overhead of AlignmentDriftMonitor, per method.

Synthetic, seeded score streams: each query returns 5 text and 5 image documents; text dense scores
~ N(0.5, 0.08), image ~ N(0.3, 0.08) (a 0.2 modality gap). Monitors use the defaults (window 1000,
min_samples 200) with the threshold printed per method.

- false-alarm rate: share of 10,000 stationary queries (after the baseline is frozen) reported as drifted;
- detection delay: queries after the text-image gap shifts by 0.02, 0.05 and 0.1 until the first
  `drifted=True` (median over seeded trials; "n/d" when fewer than half the trials detect it within the cap);
- overhead: median microseconds of one `run()` with full windows, no state file; and the mean per call
  with a state file at the defaults (`state_path` as the shipped rag.yaml sets it: a locked, atomic,
  fsynced write every 100 calls or 10 s), writes included.

    python benchmarks/drift_detection.py [--trials 20 --stationary 10000]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from haystack import Document

from haystack_integrations.components.monitors.alignment_drift import AlignmentDriftMonitor

THRESHOLDS = {"mean_gap": 0.05, "ks": 1e-3, "psi": 0.25}
WARMUP = 400  # queries before the change: fills the baseline (200 per group) and the window


def batch(rng: np.random.Generator, gap: float, n: int = 5) -> list[Document]:
    text = rng.normal(0.3 + gap, 0.08, n)
    image = rng.normal(0.3, 0.08, n)
    return [Document(content="t", meta={"modality": "text", "dense_score": float(s)}) for s in text] + [
        Document(meta={"modality": "image", "dense_score": float(s)}) for s in image
    ]


def false_alarm_rate(method: str, n_queries: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    monitor = AlignmentDriftMonitor(method=method, threshold=THRESHOLDS[method])
    alarms = judged = 0
    for _ in range(WARMUP):
        monitor.run(documents=batch(rng, 0.2))
    for _ in range(n_queries):
        report = monitor.run(documents=batch(rng, 0.2))["drift_report"]
        if report["status"] != "warming_up":
            judged += 1
            alarms += int(report["drifted"])
    return alarms / max(judged, 1)


def detection_delay(method: str, shift: float, seed: int, cap: int) -> int | None:
    rng = np.random.default_rng(seed)
    monitor = AlignmentDriftMonitor(method=method, threshold=THRESHOLDS[method])
    for _ in range(WARMUP):
        monitor.run(documents=batch(rng, 0.2))
    for q in range(1, cap + 1):
        if monitor.run(documents=batch(rng, 0.2 + shift))["drift_report"]["drifted"]:
            return q
    return None


def overhead_us(method: str) -> float:
    rng = np.random.default_rng(0)
    monitor = AlignmentDriftMonitor(method=method, threshold=THRESHOLDS[method])
    batches = [batch(rng, 0.2) for _ in range(600)]
    for b in batches:
        monitor.run(documents=b)
    times = []
    for b in batches[:300]:
        start = time.perf_counter()
        monitor.run(documents=b)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def persisted_overhead_us(method: str, calls: int = 1000) -> float:
    """Mean microseconds per call with a state file at the default batching, writes (and close) included."""
    rng = np.random.default_rng(0)
    batches = [batch(rng, 0.2) for _ in range(calls)]
    with tempfile.TemporaryDirectory() as folder:
        monitor = AlignmentDriftMonitor(
            method=method, threshold=THRESHOLDS[method], state_path=str(Path(folder) / "drift.json")
        )
        for b in batches[:400]:  # baseline frozen, window full
            monitor.run(documents=b)
        monitor.flush()
        start = time.perf_counter()
        for b in batches[400:]:
            monitor.run(documents=b)
        monitor.close()
        return (time.perf_counter() - start) / (calls - 400) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--stationary", type=int, default=10_000)
    parser.add_argument("--cap", type=int, default=2000, help="queries after the change before giving up")
    args = parser.parse_args()
    # The monitor warns at every drift transition; thousands of simulated transitions are not news here.
    logging.getLogger("haystack_integrations.components.monitors.alignment_drift.monitor").setLevel(logging.ERROR)

    print(
        f"queries of 5 text + 5 image scores; baseline gap 0.2; window 1000, min_samples 200; "
        f"{args.trials} trials per shift, {args.stationary} stationary queries"
    )
    header = f"{'method':9s} {'threshold':>9s} {'false alarms':>12s}"
    shifts = (0.02, 0.05, 0.1)
    header += "".join(f" {'delay @' + str(s):>11s}" for s in shifts)
    header += f" {'us/call':>8s} {'us/call w/ state':>17s}"
    print(header)
    for method in ("mean_gap", "ks", "psi"):
        rate = false_alarm_rate(method, args.stationary, seed=1)
        row = f"{method:9s} {THRESHOLDS[method]:9g} {rate * 100:11.2f}%"
        for shift in shifts:
            delays = [detection_delay(method, shift, seed=100 + t, cap=args.cap) for t in range(args.trials)]
            found = sorted(d for d in delays if d is not None)
            if len(found) * 2 > len(delays):
                padded = found + [args.cap + 1] * (len(delays) - len(found))
                row += f" {statistics.median(padded):11.0f}"
            else:
                row += f" {'n/d':>11s}"
        row += f" {overhead_us(method):8.1f} {persisted_overhead_us(method):17.1f}"
        print(row)


if __name__ == "__main__":
    main()
