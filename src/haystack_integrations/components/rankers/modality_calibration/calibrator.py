from __future__ import annotations

import itertools
import math
import re
import threading
from dataclasses import replace
from typing import Any

import numpy as np
from haystack import Document, component, default_from_dict, default_to_dict, logging

from haystack_integrations.common.multimodal_rag.errors import MediaError
from haystack_integrations.common.multimodal_rag.inputs.media import MODALITIES, modality_of
from haystack_integrations.common.multimodal_rag.numerics.ranking import (
    CALIBRATED_DENSE_SCORE_META_KEY,
    CALIBRATED_LATE_SCORE_META_KEY,
    CROSS_ENCODER_SCORE_META_KEY,
    DENSE_SCORE_META_KEY,
    FUSED_SCORE_META_KEY,
    LATE_INTERACTION_SCORE_META_KEY,
    check_top_k_and_threshold,
    select_top,
)
from haystack_integrations.common.multimodal_rag.numerics.statistics import (
    DEFAULT_N_QUANTILES,
    ecdf_transform,
    fit_reference,
    minmax_transform,
    rank_percentiles,
    zscore_transform,
)

logger = logging.getLogger(__name__)

METHODS = ("ecdf", "zscore", "minmax")
#: Score types a reference can hold, and the meta key each is read from.
SCORE_TYPES: dict[str, str] = {
    "dense": DENSE_SCORE_META_KEY,
    "late_interaction": LATE_INTERACTION_SCORE_META_KEY,
    "cross_encoder": CROSS_ENCODER_SCORE_META_KEY,
}
_REFERENCE_VERSION = 1
_MIN_FIT_SAMPLES = 10


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@component
class ModalityScoreCalibrator:
    """
    Makes text and image scores comparable, fuses dense and late-interaction scores, and re-ranks.

    Raw similarities are not comparable across modalities (text-to-text cosine sits higher than
    text-to-image for the same model) nor across score types (MaxSim lives on its own scale). Each raw
    score is mapped onto a common scale **per modality and score type**:

    - `"ecdf"` (default): its percentile in a fitted REFERENCE distribution (`fit()`), so one query's
      candidate set does not define the scale: the best image of a poor set does not become 1.0;
    - `"zscore"`: standardised against the reference mean and standard deviation;
    - `"minmax"`: min-max within the candidate set of each modality (the simple per-query approach, kept
      for comparison).

    Without a reference for a (modality, score type), `ecdf` and `zscore` fall back to per-query
    statistics (percentile ranks / mean and std of the candidate set) and log a warning once.

    Fusion: `fused = (1 - alpha) * dense + alpha * late` where a document has a late score, `fused = dense`
    otherwise. The late score is `meta["cross_encoder_score"]` when present (from `VisionLanguageRanker`,
    the more precise judge), else `meta["late_interaction_score"]` (from `ColPaliRanker`). The dense score is
    `meta["dense_score"]`, or `score` when that is absent. `alpha` can depend on the query through
    `query_alpha_rules`: an ordered list of `{"pattern": regex, "alpha": float}`, first match wins,
    matched case-insensitively.

    Handling of odd input (documented, never a silent drop): a document without `meta["modality"]` is
    classified like the embedders do (a file or blob makes it an image/page, content makes it text); an
    unknown modality value is an error naming the document; a missing, NaN or infinite score is ignored
    (a warning names the document) and a document with no usable score at all gets `score=None` and is
    ranked last. Only `top_k` removes documents.

    Output documents carry `meta["calibrated_dense_score"]`, `meta["calibrated_late_interaction_score"]`
    (when they had a late score) and `meta["fused_score"]`; `score` is the fused score.

    ### Usage example
    ```python
    from haystack_integrations.components.rankers.modality_calibration import ModalityScoreCalibrator

    calibrator = ModalityScoreCalibrator(
        alpha=0.65,
        query_alpha_rules=[{"pattern": r"\\b(chart|diagram|figure|plot|table)\\b", "alpha": 0.85},
                           {"pattern": r"^(what is|define)\\b", "alpha": 0.4}],
    )
    calibrator.fit(past_ranked_results)          # list of lists of Documents from ColPaliRanker
    result = calibrator.run(documents=ranked, query="Which chart shows revenue by region?")
    ```
    """

    def __init__(
        self,
        *,
        method: str = "ecdf",
        alpha: float = 0.65,
        query_alpha_rules: list[dict[str, Any]] | None = None,
        modality_meta_field: str = "modality",
        reference: dict[str, Any] | None = None,
        top_k: int | None = None,
    ) -> None:
        """
        Create the calibrator.

        :param method: `"ecdf"`, `"zscore"` or `"minmax"`.
        :param alpha: Weight of the late (ColPali or cross-encoder) score in the fusion, in `[0, 1]`.
        :param query_alpha_rules: Ordered `[{"pattern": regex, "alpha": float}, ...]`; first match wins.
        :param modality_meta_field: Meta key holding each document's modality.
        :param reference: Fitted distributions, as returned by `fit()` (or `reference` of a fitted instance).
        :param top_k: How many documents to return; `None` returns all.
        :raises ValueError: On an unknown method, an alpha outside `[0, 1]`, a bad rule or a malformed reference.
        """
        if method not in METHODS:
            msg = f"method must be one of {METHODS}, got {method!r}"
            raise ValueError(msg)
        self._check_alpha(alpha, "alpha")
        check_top_k_and_threshold(top_k, None)
        self._rules = self._compile_rules(query_alpha_rules)
        if reference is not None:
            self._check_reference(reference)
        self.method = method
        self.alpha = alpha
        self.query_alpha_rules = query_alpha_rules
        self.modality_meta_field = modality_meta_field
        self.reference = reference
        self.top_k = top_k
        self._warned: set[tuple[str, str]] = set()
        self._warn_lock = threading.Lock()

    # --- validation --------------------------------------------------------------------------------

    @staticmethod
    def _check_alpha(alpha: Any, name: str) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
            msg = f"{name} must be a number in [0, 1], got {alpha!r}"
            raise ValueError(msg)

    @classmethod
    def _compile_rules(cls, rules: list[dict[str, Any]] | None) -> list[tuple[re.Pattern[str], float]]:
        compiled: list[tuple[re.Pattern[str], float]] = []
        for i, rule in enumerate(rules or []):
            if not isinstance(rule, dict) or "pattern" not in rule or "alpha" not in rule:
                msg = f"query_alpha_rules[{i}] must be a dict with 'pattern' and 'alpha', got {rule!r}"
                raise ValueError(msg)
            cls._check_alpha(rule["alpha"], f"query_alpha_rules[{i}]['alpha']")
            try:
                pattern = re.compile(rule["pattern"], re.IGNORECASE)
            except (re.error, TypeError) as e:
                msg = f"query_alpha_rules[{i}]['pattern'] is not a valid regular expression: {e}"
                raise ValueError(msg) from e
            compiled.append((pattern, float(rule["alpha"])))
        return compiled

    @staticmethod
    def _check_reference(reference: dict[str, Any]) -> None:
        distributions = reference.get("distributions")
        if not isinstance(distributions, dict):
            msg = "reference must be a dict with a 'distributions' mapping (as returned by fit())"
            raise ValueError(msg)
        for modality, by_type in distributions.items():
            if modality not in MODALITIES:
                msg = f"reference has an unknown modality {modality!r} (expected one of {MODALITIES})"
                raise ValueError(msg)
            for score_type, dist in by_type.items():
                if score_type not in SCORE_TYPES:
                    msg = f"reference has an unknown score type {score_type!r} (expected one of {tuple(SCORE_TYPES)})"
                    raise ValueError(msg)
                quantiles = dist.get("quantiles") if isinstance(dist, dict) else None
                if not isinstance(quantiles, list) or len(quantiles) < 2:
                    msg = f"reference[{modality!r}][{score_type!r}] needs a 'quantiles' list of at least 2 values"
                    raise ValueError(msg)
                if any(b < a for a, b in itertools.pairwise(quantiles)):
                    msg = f"reference[{modality!r}][{score_type!r}] quantiles must be non-decreasing"
                    raise ValueError(msg)

    # --- serialization --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """
        Serialize this component, its fitted reference included, to a dictionary.

        :returns: The dictionary.
        """
        return default_to_dict(
            self,
            method=self.method,
            alpha=self.alpha,
            query_alpha_rules=self.query_alpha_rules,
            modality_meta_field=self.modality_meta_field,
            reference=self.reference,
            top_k=self.top_k,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModalityScoreCalibrator:
        """
        Deserialize a component from a dictionary.

        :param data: The dictionary from `to_dict`.
        :returns: The component.
        """
        return default_from_dict(cls, data)

    # --- reading documents ----------------------------------------------------------------------

    def _modality(self, doc: Document) -> str:
        try:
            return modality_of(doc, modality_meta_field=self.modality_meta_field)
        except MediaError as e:
            msg = f"ModalityScoreCalibrator: document '{doc.id}': {e}"
            raise ValueError(msg) from e

    @staticmethod
    def _raw_scores(doc: Document) -> tuple[float | None, str | None, float | None, list[str]]:
        """(dense, late score type, late, problems) of one document."""
        problems: list[str] = []
        raw_dense = doc.meta.get(DENSE_SCORE_META_KEY, doc.score)
        dense = _finite(raw_dense)
        if raw_dense is not None and dense is None:
            problems.append(f"dense score {raw_dense!r}")
        late_type: str | None = None
        late: float | None = None
        for score_type in ("cross_encoder", "late_interaction"):
            raw = doc.meta.get(SCORE_TYPES[score_type])
            if raw is None:
                continue
            value = _finite(raw)
            if value is None:
                problems.append(f"{score_type} score {raw!r}")
                continue
            late_type, late = score_type, value
            break
        return dense, late_type, late, problems

    # --- fitting --------------------------------------------------------------------------------

    def fit(self, scored_batches: list[list[Document]], *, n_quantiles: int = DEFAULT_N_QUANTILES) -> dict[str, Any]:
        """
        Learn the reference distributions from past retrieval results (or a calibration query set).

        Each batch is the ranked output of one query (e.g. `ColPaliRanker`'s documents). Scores are pooled per
        (modality, score type) and summarised as `n_quantiles` quantiles plus mean/std: compact enough to live
        inside a YAML pipeline. Pairs with fewer than 10 scores are left out (with a warning).

        :param scored_batches: Lists of scored documents.
        :param n_quantiles: Quantiles kept per distribution.
        :returns: The reference, also stored in `self.reference`.
        :raises ValueError: When no (modality, score type) has enough scores, or a document's modality is unknown.
        """
        pools: dict[str, dict[str, list[float]]] = {}
        for batch in scored_batches:
            for doc in batch:
                modality = self._modality(doc)
                dense, late_type, late, _ = self._raw_scores(doc)
                by_type = pools.setdefault(modality, {})
                if dense is not None:
                    by_type.setdefault("dense", []).append(dense)
                if late_type is not None and late is not None:
                    by_type.setdefault(late_type, []).append(late)
        distributions: dict[str, dict[str, Any]] = {}
        for modality, by_type in pools.items():
            for score_type, values in by_type.items():
                if len(values) < _MIN_FIT_SAMPLES:
                    logger.warning(
                        "ModalityScoreCalibrator.fit: only {n} {score_type} scores for modality {modality}; "
                        "not enough for a reference (need {need}), that pair falls back to per-query statistics",
                        n=len(values),
                        score_type=score_type,
                        modality=modality,
                        need=_MIN_FIT_SAMPLES,
                    )
                    continue
                distributions.setdefault(modality, {})[score_type] = fit_reference(values, n_quantiles)
        if not distributions:
            msg = "ModalityScoreCalibrator.fit: no (modality, score type) had enough scores to fit a reference"
            raise ValueError(msg)
        self.reference = {"version": _REFERENCE_VERSION, "distributions": distributions}
        with self._warn_lock:
            self._warned.clear()
        return self.reference

    # --- calibration ----------------------------------------------------------------------------

    def _reference_for(self, modality: str, score_type: str) -> dict[str, Any] | None:
        if self.reference is None:
            return None
        return self.reference["distributions"].get(modality, {}).get(score_type)

    def _warn_fallback_once(self, pairs: list[tuple[str, str]]) -> None:
        with self._warn_lock:
            new = [pair for pair in pairs if pair not in self._warned]
            self._warned.update(new)
        if new:
            logger.warning(
                "ModalityScoreCalibrator: no fitted reference for {pairs}; using per-query statistics for them "
                "(call fit() or pass `reference` to calibrate against past results)",
                pairs=", ".join(f"{score_type} scores of {modality}" for modality, score_type in new),
            )

    def _calibrate(self, values: np.ndarray, modality: str, score_type: str) -> np.ndarray:
        if self.method == "minmax":
            return minmax_transform(values)
        dist = self._reference_for(modality, score_type)
        if dist is None:
            if self.method == "ecdf":
                return rank_percentiles(values)
            return zscore_transform(values, float(values.mean()), float(values.std()))
        if self.method == "ecdf":
            return ecdf_transform(values, dist["quantiles"])
        return zscore_transform(values, float(dist["mean"]), float(dist["std"]))

    def alpha_for(self, query: str | None) -> float:
        """
        The fusion weight for a query: the first matching rule's alpha, else `alpha`.

        :param query: The query, or `None`.
        :returns: The weight of the late score.
        """
        if query:
            for pattern, alpha in self._rules:
                if pattern.search(query):
                    return alpha
        return float(self.alpha)

    @component.output_types(documents=list[Document])
    def run(
        self, documents: list[Document], query: str | None = None, top_k: int | None = None
    ) -> dict[str, list[Document]]:
        """
        Calibrate, fuse and re-rank.

        :param documents: Scored documents (e.g. from `ColPaliRanker`); not modified.
        :param query: The query, used by `query_alpha_rules`.
        :param top_k: Overrides the init `top_k` for this call.
        :returns: `{"documents": [...]}` sorted by fused score, best first.
        :raises ValueError: On an unknown modality value or a negative `top_k`.
        """
        top_k = self.top_k if top_k is None else top_k
        check_top_k_and_threshold(top_k, None)
        if not documents:
            return {"documents": []}
        alpha = self.alpha_for(query)

        modalities = [self._modality(doc) for doc in documents]
        dense = np.full(len(documents), np.nan)
        late = np.full(len(documents), np.nan)
        late_types: list[str | None] = [None] * len(documents)
        problems: list[str] = []
        for i, doc in enumerate(documents):
            d, late_type, lv, bad = self._raw_scores(doc)
            if d is not None:
                dense[i] = d
            if lv is not None:
                late[i] = lv
                late_types[i] = late_type
            if bad:
                problems.append(f"'{doc.id}': {', '.join(bad)}")
        if problems:
            logger.warning(
                "ModalityScoreCalibrator ignored non-finite scores (the documents are kept): {details}",
                details="; ".join(problems),
            )

        cal_dense = np.full(len(documents), np.nan)
        cal_late = np.full(len(documents), np.nan)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, modality in enumerate(modalities):
            if not np.isnan(dense[i]):
                groups.setdefault((modality, "dense"), []).append(i)
            late_type = late_types[i]
            if late_type is not None:
                groups.setdefault((modality, late_type), []).append(i)
        if self.method != "minmax":
            self._warn_fallback_once([pair for pair in groups if self._reference_for(*pair) is None])
        for (modality, score_type), idx in groups.items():
            index = np.asarray(idx)
            if score_type == "dense":
                cal_dense[index] = self._calibrate(dense[index], modality, score_type)
            else:
                cal_late[index] = self._calibrate(late[index], modality, score_type)

        out: list[Document] = []
        for i, doc in enumerate(documents):
            has_dense, has_late = not np.isnan(cal_dense[i]), not np.isnan(cal_late[i])
            if has_dense and has_late:
                fused: float | None = (1.0 - alpha) * float(cal_dense[i]) + alpha * float(cal_late[i])
            elif has_dense:
                fused = float(cal_dense[i])
            elif has_late:
                fused = float(cal_late[i])
            else:
                fused = None
            meta = dict(doc.meta)
            meta[CALIBRATED_DENSE_SCORE_META_KEY] = float(cal_dense[i]) if has_dense else None
            if has_late:
                meta[CALIBRATED_LATE_SCORE_META_KEY] = float(cal_late[i])
            meta[FUSED_SCORE_META_KEY] = fused
            meta.setdefault(DENSE_SCORE_META_KEY, doc.score)
            out.append(replace(doc, score=fused, meta=meta))
        return {"documents": select_top(out, top_k=top_k, score_threshold=None)}
