from __future__ import annotations

import math
import threading
import time
import warnings
from typing import Any, Literal, TypedDict

from haystack import Document, component, default_from_dict, default_to_dict, logging

from haystack_integrations.common.multimodal_rag.errors import MediaError
from haystack_integrations.common.multimodal_rag.inputs.failures import check_documents_input
from haystack_integrations.common.multimodal_rag.inputs.media import MODALITIES, modality_of
from haystack_integrations.common.multimodal_rag.numerics.statistics import (
    FrozenSample,
    ScoreWindow,
    ks_two_sample,
    mean_gap_change,
    psi_against_bins,
)
from haystack_integrations.common.multimodal_rag.validation import check_number, check_positive_int
from haystack_integrations.components.monitors.alignment_drift.state import GROUPS, DriftStateFile, StoredState

logger = logging.getLogger(__name__)

DriftMethod = Literal["mean_gap", "ks", "psi"]
METHODS: tuple[DriftMethod, ...] = ("mean_gap", "ks", "psi")
_MODALITY_SET = frozenset(MODALITIES)


class _DriftReportKeys(TypedDict):
    """The keys of every drift report (see `DriftReport`)."""

    #: The drift test in use.
    method: DriftMethod
    #: Whether the current window has drifted from the baseline.
    drifted: bool
    #: `"warming_up"` until both groups have `min_samples` scores and a baseline; then `"ok"` or `"drift"`.
    status: Literal["warming_up", "ok", "drift"]
    #: Mean text score minus mean image/page score in the window (`None` while a group is empty).
    gap: float | None
    #: The same gap in the baseline (`None` until it is frozen).
    baseline_gap: float | None
    #: `|gap - baseline_gap|` (`mean_gap`), the larger KS statistic (`ks`) or the larger PSI (`psi`).
    drift_magnitude: float | None
    #: Scores in the window per group (`"text"`, `"visual"`).
    samples: dict[str, int]
    #: Scores ever recorded per modality (`"text"`, `"image"`, `"page"`), across every instance of the state file.
    samples_seen: dict[str, int]
    #: Calls recorded, across every instance sharing the state file (as of this instance's last merge).
    calls: int


class DriftReport(_DriftReportKeys, total=False):
    """The `drift_report` output of `AlignmentDriftMonitor.run`: the keys above plus the method's own statistic."""

    #: `mean_gap` only: standard error of the gap change.
    standard_error: float
    #: `ks` only: the smaller p-value of the two groups.
    p_value: float
    #: `psi` only: the larger PSI of the two groups.
    psi: float


def _group_of(modality: str) -> str:
    return "text" if modality == "text" else "visual"


@component
class AlignmentDriftMonitor:
    """
    A pass-through that watches the gap between text and image scores over time ("alignment drift").

    Place it after the ranker/calibrator of a query pipeline. Each call records the scores of the returned
    documents per modality group (text vs image/PDF page), compares a sliding window of recent scores with a
    baseline and reports in `drift_report` (a `DriftReport`):

    - `drifted` (bool), `status` (`"warming_up"`, `"ok"` or `"drift"`), `method`;
    - `gap`: current mean text score minus mean image/page score; `baseline_gap`; `drift_magnitude`;
    - `samples`: window sizes per modality group; `samples_seen` per modality; `calls`;
    - `standard_error` (`"mean_gap"`), `p_value` (`"ks"`) or `psi` (`"psi"`).

    Methods: `"mean_gap"` (default): drift when `|gap - baseline_gap|` is within one standard error of
    exceeding `threshold` (`|gap - baseline_gap| + standard_error > threshold`, so a change of `threshold`
    is flagged reliably, not half the time); `"ks"`: two-sample Kolmogorov-Smirnov test per group, baseline vs
    window, drift when the smaller p-value is below `threshold`; `"psi"`: population stability index per group,
    drift when the larger PSI exceeds `threshold`. The baseline is given explicitly
    (`baseline={"text": [...], "visual": [...]}` scores, or per modality `"image"`/`"page"`, which are pooled)
    or frozen from the first `min_samples` scores of each group; `reset_baseline()` re-freezes it from the most
    recent scores. A warning is logged once when drift starts and once when it ends.

    **Persistence.** With `state_path`, windows, baseline and counters persist to a JSON file so a restart
    continues where it stopped. Nothing touches the file before `warm_up()` (or the first `run()`).
    Writes are batched: every `persist_every` calls or `persist_interval` seconds, whichever comes first, and
    on `flush()`/`close()` (also a `with` block); nothing is written from an exit hook. A clean `close()` loses
    nothing; a process killed without it loses at most the calls since its last write (one batch).
    Each write is atomic (temporary file, fsync, rename) and happens under an exclusive lock of
    `<state_path>.lock` (`fcntl.flock`): the writer reads the file, appends the samples it recorded since its
    last write, writes the result and continues from it. So any number of instances, threads or processes
    can share one `state_path` (a pipeline YAML loaded several times does exactly that) and no sample is
    lost; each instance sees the others' samples from its next write on. Orphan `<state_path>.*.tmp` files of
    crashed writers are removed. A corrupt state file (malformed, NaN or infinite numbers) is a
    `DriftStateError` naming it, unless `reset_corrupt_state=True` (then it is moved aside to
    `<state_path>.corrupt` and the monitor continues from its memory, saying so). On Windows (no `fcntl`)
    only writers inside one process are serialised.

    The instance is thread-safe: concurrent pipeline runs lose no sample.

    ### Usage example
    ```python
    from haystack_integrations.components.monitors.alignment_drift import AlignmentDriftMonitor

    with AlignmentDriftMonitor(window_size=1000, min_samples=200, state_path="drift.json") as monitor:
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
        method: DriftMethod = "mean_gap",
        state_path: str | None = None,
        baseline: dict[str, list[float]] | None = None,
        modality_meta_field: str = "modality",
        score_field: str = "dense_score",
        reset_corrupt_state: bool = False,
        persist_every: int = 100,
        persist_interval: float | None = 10.0,
    ) -> None:
        """
        Create the monitor. Only validates and stores the parameters: the state file is read at `warm_up()`.

        :param window_size: Recent scores kept per modality group.
        :param min_samples: Scores per group needed before drift is judged (and to freeze the baseline).
        :param threshold: Gap change (`mean_gap`), p-value (`ks`) or PSI (`psi`) that signals drift.
        :param method: `"mean_gap"`, `"ks"` or `"psi"`.
        :param state_path: JSON file that windows and baseline persist to; `None` keeps them in memory only.
        :param baseline: Explicit baseline scores per group (`"text"`, `"visual"`) or modality.
        :param modality_meta_field: Meta key holding each document's modality.
        :param score_field: Meta key of the score to watch (`"dense_score"` by default, the retriever's score);
            `"score"` watches `Document.score`. Documents without it fall back to `Document.score`.
        :param reset_corrupt_state: Move a corrupt state file aside and go on instead of raising.
        :param persist_every: Write the state at least every this many calls (1 = every call, with an fsync each).
        :param persist_interval: Also write when this many seconds passed since the last write (checked at each
            call; no background thread). `None`: by call count only.
        :raises ValueError: On invalid parameters.
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
        # An infinite threshold (never alarm) has always been accepted; `persist_interval` must be finite.
        check_number("threshold", threshold, above=0.0, finite=False)
        if persist_interval is not None:
            check_number("persist_interval", persist_interval, above=0.0)
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
        self.persist_interval = persist_interval

        self._explicit_baseline = self._parse_baseline(baseline) if baseline is not None else None
        self._lock = threading.RLock()
        self._state_file = DriftStateFile(state_path) if state_path is not None else None
        self._warmed_up = False
        self._reset_memory()
        self._drifted = False
        # Recorded since the last write to the state file (replayed onto the file's state at the next write).
        self._unflushed: list[tuple[str, float]] = []
        self._unflushed_calls = 0
        self._last_flush = time.monotonic()

    def _reset_memory(self) -> None:
        self._windows = {g: ScoreWindow(self.window_size) for g in GROUPS}
        self._baseline: dict[str, FrozenSample] = dict(self._explicit_baseline or {})
        self._pending: dict[str, list[float]] = {g: [] for g in GROUPS}
        self._modality_counts = dict.fromkeys(MODALITIES, 0)
        self._calls = 0

    # --- baseline ----------------------------------------------------------------------------------

    @staticmethod
    def _parse_baseline(baseline: dict[str, list[float]]) -> dict[str, FrozenSample]:
        pooled: dict[str, list[float]] = {}
        if not isinstance(baseline, dict):
            msg = f"baseline must be a dict of score lists, got {type(baseline).__name__}"
            raise ValueError(msg)
        for key, values in baseline.items():
            if key not in (*GROUPS, *MODALITIES):
                msg = f"baseline keys must be among {GROUPS + MODALITIES}, got {key!r}"
                raise ValueError(msg)
            try:
                scores = [float(v) for v in values]
            except (TypeError, ValueError) as e:
                msg = f"baseline[{key!r}] must be a non-empty list of finite scores ({e})"
                raise ValueError(msg) from e
            if not scores or not all(math.isfinite(v) for v in scores):
                msg = f"baseline[{key!r}] must be a non-empty list of finite scores"
                raise ValueError(msg)
            pooled.setdefault("text" if key == "text" else "visual", []).extend(scores)
        return {group: FrozenSample.of(values) for group, values in pooled.items()}

    def reset_baseline(self) -> None:
        """
        Re-freeze the baseline from the most recent `min_samples` scores of each group (and write the state).

        A group with fewer recent scores is frozen again from its next scores. With a shared `state_path`, the
        new baseline is taken from the merged windows and every instance adopts it at its next write.
        """
        with self._lock:
            self._ensure_warm_locked()
            if self._state_file is None:
                self._rebaseline_locked()
                return
            with self._state_file.locked():
                self._merge_locked()
                self._rebaseline_locked()
                self._write_locked()

    def _rebaseline_locked(self) -> None:
        self._baseline = {}
        for group, window in self._windows.items():
            recent = window.values()[-self.min_samples :]
            if recent.size >= self.min_samples:
                self._baseline[group] = FrozenSample.of(recent)
                self._pending[group] = []
            else:
                self._pending[group] = recent.tolist()
        self._drifted = False

    # --- lifecycle and persistence ------------------------------------------------------------------

    def warm_up(self) -> None:
        """
        Read the state file (creating its folder and lock file when missing), removing orphan temporary files.

        Idempotent; `run()` calls it when needed. Without `state_path` it does nothing.

        :raises DriftStateError: When the state file is corrupt (and `reset_corrupt_state` is False) or its
            folder or lock file cannot be created.
        """
        with self._lock:
            self._ensure_warm_locked()

    def _ensure_warm_locked(self) -> None:
        if self._warmed_up:
            return
        if self._state_file is not None:
            with self._state_file.locked():
                for orphan in self._state_file.remove_orphans():
                    logger.warning(
                        "AlignmentDriftMonitor removed {orphan}, a temporary file left by a writer that crashed",
                        orphan=str(orphan),
                    )
                stored = self._read_locked()
                if stored is not None:
                    self._restore(stored)
                    self._drifted = stored.drifted
        self._last_flush = time.monotonic()
        self._warmed_up = True

    def _read_locked(self) -> StoredState | None:
        assert self._state_file is not None
        try:
            return self._state_file.read(MODALITIES)
        except Exception:
            if not self.reset_corrupt_state:
                raise
            aside = self._state_file.move_aside()
            logger.warning(
                "AlignmentDriftMonitor state file {path} was corrupt; moved it to {aside} and started fresh "
                "(from this instance's memory)",
                path=str(self._state_file.path),
                aside=str(aside),
            )
            return None

    def _restore(self, stored: StoredState) -> None:
        for group in GROUPS:
            self._windows[group].load(stored.windows.get(group, []))
        if self._explicit_baseline is None:
            self._baseline = {g: FrozenSample.of(v) for g, v in stored.baseline.items() if v}
        self._pending = {g: list(stored.pending.get(g, [])) for g in GROUPS}
        self._modality_counts = {m: stored.modality_counts.get(m, 0) for m in MODALITIES}
        self._calls = stored.calls

    def _stored(self) -> StoredState:
        return StoredState(
            windows={g: window.values().tolist() for g, window in self._windows.items()},
            baseline={g: sample.sorted_values.tolist() for g, sample in self._baseline.items()},
            pending={g: list(values) for g, values in self._pending.items()},
            modality_counts=dict(self._modality_counts),
            calls=self._calls,
            drifted=self._drifted,
        )

    def _merge_locked(self) -> None:
        """Under the file lock: continue from the file's state plus what this instance recorded since its last write."""
        assert self._state_file is not None
        stored = self._read_locked()
        if stored is None:
            return  # no file (or a corrupt one moved aside): memory already holds everything this instance saw
        self._restore(stored)
        self._calls += self._unflushed_calls
        for modality, score in self._unflushed:
            self._observe(modality, score)

    def _write_locked(self) -> None:
        assert self._state_file is not None
        self._state_file.write(self._stored())
        self._unflushed = []
        self._unflushed_calls = 0
        self._last_flush = time.monotonic()

    def flush(self) -> None:
        """
        Merge this instance's unwritten samples into the state file now (atomically, under the file lock).

        No-op without a `state_path` or when nothing was recorded since the last write.

        :raises DriftStateError: When the state file cannot be read or written.
        """
        with self._lock:
            # Nothing recorded: nothing to write, and no file or folder is created (a query pipeline loaded with a
            # mistyped base_dir and closed must leave no trace there).
            if self.state_path is None or self._unflushed_calls == 0:
                return
            self._ensure_warm_locked()
            if self._state_file is None:
                return
            with self._state_file.locked():
                self._merge_locked()
                self._write_locked()

    def save(self) -> None:
        """Deprecated alias of `flush()`, kept for one release."""
        warnings.warn("AlignmentDriftMonitor.save() is deprecated: use flush()", DeprecationWarning, stacklevel=2)
        self.flush()

    def close(self) -> None:
        """
        Write what is not written yet (see `flush()`). The monitor stays usable; call this before a process exits.

        :raises DriftStateError: When the state file cannot be written.
        """
        self.flush()

    def __enter__(self) -> AlignmentDriftMonitor:
        """:returns: The monitor, warmed up."""
        self.warm_up()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the monitor (flush)."""
        self.close()

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
            persist_interval=self.persist_interval,
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
        if type(raw) is float:  # the common case, without the checks below
            return raw if math.isfinite(raw) else None
        if raw is None or isinstance(raw, bool):
            return None
        try:
            value = float(raw)
        except (TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None

    def _modality(self, doc: Document) -> str | None:
        declared = doc.meta.get(self.modality_meta_field)
        if declared in _MODALITY_SET:
            return str(declared)
        try:
            return modality_of(doc, modality_meta_field=self.modality_meta_field)
        except MediaError:
            return None  # not counted: no modality group to put the score in

    def _observe(self, modality: str, score: float) -> None:
        self._modality_counts[modality] += 1
        group = _group_of(modality)
        self._windows[group].push(score)
        if group not in self._baseline:
            pending = self._pending[group]
            pending.append(score)
            if len(pending) >= self.min_samples:
                self._baseline[group] = FrozenSample.of(pending[: self.min_samples])
                self._pending[group] = []

    def _evaluate_locked(self) -> DriftReport:
        text, visual = self._windows["text"], self._windows["visual"]
        gap = text.mean() - visual.mean() if text.count and visual.count else None
        base_text, base_visual = self._baseline.get("text"), self._baseline.get("visual")
        baseline_gap = base_text.mean - base_visual.mean if base_text is not None and base_visual is not None else None
        report: DriftReport = {
            "method": self.method,
            "drifted": False,
            "status": "warming_up",
            "gap": gap,
            "baseline_gap": baseline_gap,
            "drift_magnitude": None,
            "samples": {"text": text.count, "visual": visual.count},
            "samples_seen": dict(self._modality_counts),
            "calls": self._calls,
        }
        if (
            base_text is None
            or base_visual is None
            or gap is None
            or text.count < self.min_samples
            or visual.count < self.min_samples
        ):
            return report
        if self.method == "mean_gap":
            magnitude, standard_error = mean_gap_change(text, visual, base_text, base_visual)
            report["standard_error"] = standard_error
            drifted = magnitude + standard_error > self.threshold
        elif self.method == "ks":
            tests = [
                ks_two_sample(base_text.sorted_values, text.values(), sorted_a=True),
                ks_two_sample(base_visual.sorted_values, visual.values(), sorted_a=True),
            ]
            magnitude = max(d for d, _ in tests)
            p_value = min(p for _, p in tests)
            report["p_value"] = p_value
            drifted = p_value < self.threshold
        else:
            magnitude = max(
                psi_against_bins(base_text.psi_edges, base_text.psi_shares, text.values()),
                psi_against_bins(base_visual.psi_edges, base_visual.psi_shares, visual.values()),
            )
            report["psi"] = magnitude
            drifted = magnitude > self.threshold
        report["drifted"] = drifted
        report["status"] = "drift" if drifted else "ok"
        report["drift_magnitude"] = float(magnitude)
        return report

    def _log_transition(self, report: DriftReport) -> None:
        if report["drifted"]:
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

    @component.output_types(documents=list[Document], drift_report=DriftReport)
    def run(self, documents: list[Document], query: str | None = None) -> dict[str, Any]:
        """
        Record the scores of `documents` and report drift; the documents pass through unchanged.

        :param documents: The ranked documents of one query.
        :param query: The query (accepted so the monitor can sit anywhere in a query pipeline; not used).
        :returns: `{"documents": documents, "drift_report": DriftReport}`.
        :raises DriftStateError: When the state file is corrupt (see `reset_corrupt_state`) or cannot be written.
        :raises TypeError: When `documents` is not a list (or tuple) of Documents.
        """
        del query
        check_documents_input(type(self).__name__, documents, allow_tuple=True)
        observed: list[tuple[str, float]] = []
        for doc in documents:
            modality = self._modality(doc)
            if modality is None:
                continue
            score = self._score(doc)
            if score is not None:
                observed.append((modality, score))
        with self._lock:
            self._ensure_warm_locked()
            self._calls += 1
            for modality, score in observed:
                self._observe(modality, score)
            report = self._evaluate_locked()
            if report["drifted"] != self._drifted:
                self._drifted = report["drifted"]
                self._log_transition(report)
            if self._state_file is not None:
                self._unflushed.extend(observed)
                self._unflushed_calls += 1
                if self._unflushed_calls >= self.persist_every or (
                    self.persist_interval is not None and time.monotonic() - self._last_flush >= self.persist_interval
                ):
                    with self._state_file.locked():
                        self._merge_locked()
                        self._write_locked()
        return {"documents": documents, "drift_report": report}
