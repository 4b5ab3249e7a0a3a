from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
from haystack import Document, component, default_from_dict, default_to_dict, logging

from haystack_integrations.common.multimodal_rag.errors import DriftStateError, MediaError
from haystack_integrations.common.multimodal_rag.inputs.media import MODALITIES, modality_of
from haystack_integrations.common.multimodal_rag.numerics.statistics import ks_two_sample, psi
from haystack_integrations.common.multimodal_rag.validation import check_positive_int

logger = logging.getLogger(__name__)

METHODS = ("mean_gap", "ks", "psi")
GROUPS = ("text", "visual")  # the gap is text minus image/page
_STATE_VERSION = 1


def _group_of(modality: str) -> str:
    return "text" if modality == "text" else "visual"


class _Ring:
    """A fixed-size window of floats with O(1) running sums (exactly recomputed every `size` pushes)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = np.zeros(size, dtype=np.float64)
        self.count = 0
        self.pos = 0
        self.total = 0.0
        self.total_sq = 0.0
        self._pushes = 0

    def push(self, value: float) -> None:
        if self.count == self.size:
            old = self.data[self.pos]
            self.total -= old
            self.total_sq -= old * old
        else:
            self.count += 1
        self.data[self.pos] = value
        self.total += value
        self.total_sq += value * value
        self.pos = (self.pos + 1) % self.size
        self._pushes += 1
        if self._pushes >= self.size:
            self._pushes = 0
            values = self.values()
            self.total = math.fsum(values)
            self.total_sq = math.fsum(values * values)

    def variance(self) -> float:
        if self.count < 2:
            return 0.0
        mean = self.total / self.count
        return max(0.0, self.total_sq / self.count - mean * mean)

    def values(self) -> np.ndarray:
        if self.count < self.size:
            return self.data[: self.count]
        return np.concatenate([self.data[self.pos :], self.data[: self.pos]])

    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def load(self, values: list[float]) -> None:
        self.count = self.pos = 0
        self.total = self.total_sq = 0.0
        self._pushes = 0
        for value in values[-self.size :]:
            self.push(float(value))


@component
class AlignmentDriftMonitor:
    """
    A pass-through that watches the gap between text and image scores over time ("alignment drift").

    Place it after the ranker/calibrator of a query pipeline. Each call records the scores of the returned
    documents per modality group (text vs image/PDF page), compares a sliding window of recent scores with a
    baseline and reports in `drift_report`:

    - `drifted` (bool), `status` (`"warming_up"`, `"ok"` or `"drift"`), `method`;
    - `gap`: current mean text score minus mean image/page score; `baseline_gap`; `drift_magnitude`;
    - `samples`: window sizes per modality group; `calls`;
    - `p_value` (method `"ks"`) or `psi` (method `"psi"`).

    Methods: `"mean_gap"` (default): drift when `|gap - baseline_gap|` is within one standard error of
    exceeding `threshold` (`|gap - baseline_gap| + standard_error > threshold`, so a change of `threshold`
    is flagged reliably, not half the time; the standard error of the window and baseline means is
    reported); `"ks"`: two-sample
    Kolmogorov-Smirnov test per group, baseline vs window, drift when the smaller p-value is below
    `threshold`; `"psi"`: population stability index per group, drift when the larger PSI exceeds `threshold`.
    The baseline is given explicitly (`baseline={"text": [...], "visual": [...]}` scores, or per modality
    `"image"`/`"page"`, which are pooled) or frozen from the first `min_samples` scores of each group;
    `reset_baseline()` re-freezes it from the most recent scores. A warning is logged once when drift starts
    and once when it ends.

    With `state_path`, windows and baseline persist to a JSON file (written atomically: temp file, fsync,
    rename), so a restart continues where it stopped; a crash mid-write leaves the previous state readable.
    A corrupt state file is an error naming it, unless `reset_corrupt_state=True` (then it is moved aside to
    `<state_path>.corrupt` and the monitor starts fresh, saying so). The instance is thread-safe: concurrent
    pipeline runs lose no sample.

    ### Usage example
    ```python
    from haystack_integrations.components.monitors.alignment_drift import AlignmentDriftMonitor

    monitor = AlignmentDriftMonitor(window_size=1000, min_samples=200, threshold=0.05, state_path="drift.json")
    result = monitor.run(documents=ranked_documents)
    if result["drift_report"]["drifted"]:
        print("text vs image score gap moved by", result["drift_report"]["drift_magnitude"])
    ```
    """

    def __init__(
        self,
        *,
        window_size: int = 1000,
        min_samples: int = 200,
        threshold: float = 0.05,
        method: str = "mean_gap",
        state_path: str | None = None,
        baseline: dict[str, list[float]] | None = None,
        modality_meta_field: str = "modality",
        score_field: str = "dense_score",
        reset_corrupt_state: bool = False,
        persist_every: int = 1,
    ) -> None:
        """
        Create the monitor (and load its state from `state_path` when the file exists).

        :param window_size: Recent scores kept per modality group.
        :param min_samples: Scores per group needed before drift is judged (and to freeze the baseline).
        :param threshold: Gap change (`mean_gap`), p-value (`ks`) or PSI (`psi`) that signals drift.
        :param method: `"mean_gap"`, `"ks"` or `"psi"`.
        :param state_path: JSON file that windows and baseline persist to; `None` keeps them in memory only.
        :param baseline: Explicit baseline scores per group (`"text"`, `"visual"`) or modality.
        :param modality_meta_field: Meta key holding each document's modality.
        :param score_field: Meta key of the score to watch (`"dense_score"` by default, the retriever's score);
            `"score"` watches `Document.score`. Documents without it fall back to `Document.score`.
        :param reset_corrupt_state: Start fresh (moving the bad file aside) instead of raising on a corrupt file.
        :param persist_every: Save the state every this many calls (1 = every call).
        :raises ValueError: On invalid parameters.
        :raises DriftStateError: When `state_path` exists but cannot be read (and `reset_corrupt_state` is False).
        """
        check_positive_int("window_size", window_size)
        check_positive_int("min_samples", min_samples)
        check_positive_int("persist_every", persist_every)
        if min_samples > window_size:
            msg = f"min_samples ({min_samples}) cannot exceed window_size ({window_size})"
            raise ValueError(msg)
        if method not in METHODS:
            msg = f"method must be one of {METHODS}, got {method!r}"
            raise ValueError(msg)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            msg = f"threshold must be a positive number, got {threshold!r}"
            raise ValueError(msg)
        self.window_size = window_size
        self.min_samples = min_samples
        self.threshold = threshold
        self.method = method
        self.state_path = state_path
        self.baseline = baseline
        self.modality_meta_field = modality_meta_field
        self.score_field = score_field
        self.reset_corrupt_state = reset_corrupt_state
        self.persist_every = persist_every

        self._lock = threading.RLock()
        self._windows = {g: _Ring(window_size) for g in GROUPS}
        self._baseline: dict[str, np.ndarray] = {}
        self._pending: dict[str, list[float]] = {g: [] for g in GROUPS}
        self._modality_counts = dict.fromkeys(MODALITIES, 0)
        self._calls = 0
        self._drifted = False
        if baseline is not None:
            self._baseline = self._parse_baseline(baseline)
        if state_path is not None:
            self._load_state(Path(state_path))

    # --- baseline ----------------------------------------------------------------------------------

    @staticmethod
    def _parse_baseline(baseline: dict[str, list[float]]) -> dict[str, np.ndarray]:
        pooled: dict[str, list[float]] = {}
        for key, values in baseline.items():
            if key not in (*GROUPS, *MODALITIES):
                msg = f"baseline keys must be among {GROUPS + MODALITIES}, got {key!r}"
                raise ValueError(msg)
            scores = [float(v) for v in values]
            if not scores or not all(math.isfinite(v) for v in scores):
                msg = f"baseline[{key!r}] must be a non-empty list of finite scores"
                raise ValueError(msg)
            pooled.setdefault("text" if key == "text" else "visual", []).extend(scores)
        return {group: np.asarray(values) for group, values in pooled.items()}

    def reset_baseline(self) -> None:
        """
        Re-freeze the baseline from the most recent `min_samples` scores of each group.

        A group with fewer recent scores is frozen again from its next scores.
        """
        with self._lock:
            self._baseline = {}
            for group, ring in self._windows.items():
                recent = ring.values()[-self.min_samples :]
                if recent.size >= self.min_samples:
                    self._baseline[group] = recent.copy()
                    self._pending[group] = []
                else:
                    self._pending[group] = [float(v) for v in recent]
            self._drifted = False
            self._save_locked()

    # --- state persistence ------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "windows": {g: ring.values().tolist() for g, ring in self._windows.items()},
            "baseline": {g: values.tolist() for g, values in self._baseline.items()},
            "pending": self._pending,
            "modality_counts": self._modality_counts,
            "calls": self._calls,
            "drifted": self._drifted,
        }

    def _load_state(self, path: Path) -> None:
        if not path.exists():
            return
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
                msg = f"unknown state format (version {state.get('version') if isinstance(state, dict) else None})"
                raise ValueError(msg)
            windows = {g: [float(v) for v in state["windows"].get(g, [])] for g in GROUPS}
            baseline = {g: np.asarray([float(v) for v in vs]) for g, vs in state["baseline"].items() if g in GROUPS}
            pending = {g: [float(v) for v in state.get("pending", {}).get(g, [])] for g in GROUPS}
            counts = {m: int(state.get("modality_counts", {}).get(m, 0)) for m in MODALITIES}
            calls = int(state["calls"])
            drifted = bool(state["drifted"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            if not self.reset_corrupt_state:
                msg = (
                    f"AlignmentDriftMonitor state file '{path}' is corrupt or unreadable ({type(e).__name__}: {e}). "
                    "Fix or delete it, or pass reset_corrupt_state=True to start fresh."
                )
                raise DriftStateError(msg) from e
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            logger.warning(
                "AlignmentDriftMonitor state file {path} was corrupt ({error}); moved it to {aside} and started fresh",
                path=str(path),
                error=str(e),
                aside=str(aside),
            )
            return
        for group, values in windows.items():
            self._windows[group].load(values)
        if self.baseline is None:
            self._baseline = baseline
        self._pending = pending
        self._modality_counts = counts
        self._calls = calls
        self._drifted = drifted

    def _save_locked(self) -> None:
        if self.state_path is None:
            return
        path = Path(self.state_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(self._state(), separators=(",", ":"))
        fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as tmp:
                tmp.write(payload)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def save(self) -> None:
        """Write the state to `state_path` now (atomically); no-op without a `state_path`."""
        with self._lock:
            self._save_locked()

    # --- serialization ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize this component's settings (its windows live in `state_path`).

        :returns: The dictionary.
        """
        return default_to_dict(
            self,
            window_size=self.window_size,
            min_samples=self.min_samples,
            threshold=self.threshold,
            method=self.method,
            state_path=self.state_path,
            baseline=self.baseline,
            modality_meta_field=self.modality_meta_field,
            score_field=self.score_field,
            reset_corrupt_state=self.reset_corrupt_state,
            persist_every=self.persist_every,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlignmentDriftMonitor:
        """
        Deserialize a component from a dictionary.

        :param data: The dictionary from `to_dict`.
        :returns: The component.
        """
        return default_from_dict(cls, data)

    # --- monitoring ---------------------------------------------------------------------------------

    def _score(self, doc: Document) -> float | None:
        raw = doc.score if self.score_field == "score" else doc.meta.get(self.score_field, doc.score)
        if raw is None or isinstance(raw, bool):
            return None
        try:
            value = float(raw)
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None

    def _modality(self, doc: Document) -> str | None:
        try:
            return modality_of(doc, modality_meta_field=self.modality_meta_field)
        except MediaError:
            return None  # not counted: no modality group to put the score in

    def _evaluate_locked(self) -> dict[str, Any]:
        windows = {g: self._windows[g] for g in GROUPS}
        text, visual = windows["text"], windows["visual"]
        gap = text.mean() - visual.mean() if text.count and visual.count else None
        base = self._baseline
        baseline_gap = (
            float(base["text"].mean() - base["visual"].mean()) if "text" in base and "visual" in base else None
        )
        ready = (
            baseline_gap is not None
            and text.count >= self.min_samples
            and visual.count >= self.min_samples
            and gap is not None
        )
        report: dict[str, Any] = {
            "method": self.method,
            "gap": gap,
            "baseline_gap": baseline_gap,
            "drift_magnitude": None,
            "samples": {g: windows[g].count for g in GROUPS},
            "calls": self._calls,
        }
        if not ready:
            report.update(drifted=False, status="warming_up")
            return report
        assert gap is not None
        assert baseline_gap is not None
        if self.method == "mean_gap":
            magnitude = abs(gap - baseline_gap)
            # Sampling error of the gap change (window means and frozen baseline means are estimates): a change
            # of `threshold` must be flagged reliably, not by a coin toss at the boundary.
            standard_error = math.sqrt(
                text.variance() / text.count
                + visual.variance() / visual.count
                + float(base["text"].var()) / base["text"].size
                + float(base["visual"].var()) / base["visual"].size
            )
            report["standard_error"] = standard_error
            drifted = magnitude + standard_error > self.threshold
        elif self.method == "ks":
            tests = [ks_two_sample(base[g], windows[g].values()) for g in GROUPS]
            magnitude = max(d for d, _ in tests)
            p_value = min(p for _, p in tests)
            report["p_value"] = p_value
            drifted = p_value < self.threshold
        else:
            values = [psi(base[g], windows[g].values()) for g in GROUPS]
            magnitude = max(values)
            report["psi"] = magnitude
            drifted = magnitude > self.threshold
        report.update(drifted=drifted, status="drift" if drifted else "ok", drift_magnitude=float(magnitude))
        return report

    @component.output_types(documents=list[Document], drift_report=dict)
    def run(self, documents: list[Document], query: str | None = None) -> dict[str, Any]:
        """
        Record the scores of `documents` and report drift; the documents pass through unchanged.

        :param documents: The ranked documents of one query.
        :param query: The query (accepted so the monitor can sit anywhere in a query pipeline; not used).
        :returns: `{"documents": documents, "drift_report": dict}`.
        """
        del query
        observed: list[tuple[str, float]] = []
        for doc in documents:
            modality = self._modality(doc)
            score = self._score(doc)
            if modality is not None and score is not None:
                observed.append((modality, score))
        with self._lock:
            self._calls += 1
            for modality, score in observed:
                self._modality_counts[modality] += 1
                group = _group_of(modality)
                self._windows[group].push(score)
                if group not in self._baseline:
                    pending = self._pending[group]
                    pending.append(score)
                    if len(pending) >= self.min_samples:
                        self._baseline[group] = np.asarray(pending[: self.min_samples])
                        self._pending[group] = []
            report = self._evaluate_locked()
            report["samples_seen"] = dict(self._modality_counts)
            if report["drifted"] != self._drifted:
                self._drifted = bool(report["drifted"])
                if self._drifted:
                    logger.warning(
                        "AlignmentDriftMonitor: drift detected ({method}): text-image score gap {gap:.4f} vs "
                        "baseline {baseline:.4f} (magnitude {magnitude:.4f}, threshold {threshold})",
                        method=self.method,
                        gap=report["gap"],
                        baseline=report["baseline_gap"],
                        magnitude=report["drift_magnitude"],
                        threshold=self.threshold,
                    )
                else:
                    logger.warning(
                        "AlignmentDriftMonitor: drift ended ({method}): gap {gap} vs baseline {baseline}",
                        method=self.method,
                        gap=report["gap"],
                        baseline=report["baseline_gap"],
                    )
            if self.state_path is not None and self._calls % self.persist_every == 0:
                self._save_locked()
        return {"documents": documents, "drift_report": report}
