from __future__ import annotations

import math
import re
import re._parser as re_parser  # private, but the only parser of re's own syntax; pinned by test_calibrator.py
import threading
from typing import Any, Literal

import numpy as np
from haystack import Document, component, default_from_dict, default_to_dict, logging

from haystack_integrations.common.multimodal_rag.errors import MediaError
from haystack_integrations.common.multimodal_rag.inputs.failures import check_documents_input
from haystack_integrations.common.multimodal_rag.inputs.media import MODALITIES, modality_of
from haystack_integrations.common.multimodal_rag.numerics.ranking import (
    CALIBRATED_DENSE_SCORE_META_KEY,
    CALIBRATED_LATE_SCORE_META_KEY,
    CROSS_ENCODER_SCORE_META_KEY,
    DENSE_SCORE_META_KEY,
    FUSED_SCORE_META_KEY,
    LATE_INTERACTION_SCORE_META_KEY,
    check_top_k_and_threshold,
    rescored,
)
from haystack_integrations.common.multimodal_rag.numerics.statistics import (
    DEFAULT_N_QUANTILES,
    EcdfTable,
    check_reference_distribution,
    ecdf_transform,
    fit_reference,
    minmax_transform,
    rank_percentiles,
    zscore_transform,
)
from haystack_integrations.common.multimodal_rag.validation import check_number

logger = logging.getLogger(__name__)

CalibrationMethod = Literal["ecdf", "zscore", "minmax"]
METHODS: tuple[CalibrationMethod, ...] = ("ecdf", "zscore", "minmax")
#: Score types a reference can hold, and the meta key each is read from.
SCORE_TYPES: dict[str, str] = {
    "dense": DENSE_SCORE_META_KEY,
    "late_interaction": LATE_INTERACTION_SCORE_META_KEY,
    "cross_encoder": CROSS_ENCODER_SCORE_META_KEY,
}
_REFERENCE_VERSION = 1
_MIN_FIT_SAMPLES = 10
#: `query_alpha_rules` patterns are matched against the first this many characters of the query, so the cost
#: of a rule is bounded whatever the query's length.
MAX_RULE_QUERY_CHARS = 1000
_MODALITY_SET = frozenset(MODALITIES)
_MODALITY_CODES = {modality: code for code, modality in enumerate(MODALITIES)}
_PLAIN_NUMBER_TYPES = frozenset({float, int, np.float64, np.float32, np.float16})
_REPEATS = {re_parser.MAX_REPEAT, re_parser.MIN_REPEAT, re_parser.POSSESSIVE_REPEAT}


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _score_array(raws: list[Any]) -> tuple[np.ndarray, list[int]]:
    """
    Scores as float64, NaN where missing or unusable, and the positions of unusable (present but not finite) ones.

    Same rules as `_finite` per value, vectorised for the common case of floats and `None`s.
    """
    values = [math.nan if raw is None else raw for raw in raws]
    if set(map(type, values)) <= _PLAIN_NUMBER_TYPES:
        array = np.array(values, dtype=np.float64)
    else:  # strings, bools, odd objects: one by one
        array = np.array([math.nan if (v := _finite(raw)) is None else v for raw in raws], dtype=np.float64)
    unusable = ~np.isfinite(array)
    if not unusable.any():
        return array, []
    bad = [i for i in np.flatnonzero(unusable).tolist() if raws[i] is not None]
    array[unusable] = np.nan
    return array, bad


def _regex_hazard(items: Any, inside_repeat: bool) -> str | None:
    """Why a parsed pattern can backtrack exponentially (a repeat inside a repeat, an alternation inside one)."""
    for op, av in items:
        if op in _REPEATS:
            _low, high, body = av
            repeats = high is re_parser.MAXREPEAT or high > 1
            if inside_repeat and repeats:
                return "a quantifier inside a quantified group (nested quantifiers, as in '(a+)+')"
            reason = _regex_hazard(body, inside_repeat or repeats)
            if reason is not None:
                return reason
            continue
        if op is re_parser.BRANCH and inside_repeat:
            return "an alternation inside a quantified group (as in '(a|ab)+')"
        for child in av if isinstance(av, tuple | list) else (av,):
            if isinstance(child, re_parser.SubPattern):
                reason = _regex_hazard(child, inside_repeat)
            elif isinstance(child, list) and child and isinstance(child[0], re_parser.SubPattern):
                reason = next((r for c in child if (r := _regex_hazard(c, inside_repeat)) is not None), None)
            else:
                continue
            if reason is not None:
                return reason
    return None


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
    matched case-insensitively against the first 1000 characters of the query (`MAX_RULE_QUERY_CHARS`). So that
    no query can make a rule backtrack for minutes, patterns with a quantifier inside a quantified group
    (`(a+)+`, `(\\w+\\s?)*`) or an alternation inside one (`(a|ab)+`) are refused at init; a single-character
    class like `[ab]+` or `(?:a|b)+` is fine.

    References are validated when set (`reference=`, `from_dict`, assigning `calibrator.reference`) and when
    fitted: quantiles finite and non-decreasing, `mean`/`std` finite (and present for `"zscore"`); an error names
    the modality and score type.

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
        method: CalibrationMethod = "ecdf",
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
        :raises ValueError: On an unknown method, an alpha outside `[0, 1]`, a bad or backtracking-prone rule, or a
            malformed reference (naming the modality and score type).
        """
        if method not in METHODS:
            msg = f"method must be one of {METHODS}, got {method!r}"
            raise ValueError(msg)
        self._check_alpha(alpha, "alpha")
        check_top_k_and_threshold(top_k, None)
        self._rules = self._compile_rules(query_alpha_rules)
        self.method = method
        self.alpha = alpha
        self.query_alpha_rules = query_alpha_rules
        self.modality_meta_field = modality_meta_field
        self.top_k = top_k
        self._warned: set[tuple[str, str]] = set()
        self._warn_lock = threading.Lock()
        # ECDF tables of `reference`, rebuilt when `reference` is replaced (fit() or assignment).
        self._tables: tuple[Any, dict[tuple[str, str], EcdfTable]] = (None, {})
        self._reference: dict[str, Any] | None = None
        self.reference = reference  # validated by the property setter

    @property
    def reference(self) -> dict[str, Any] | None:
        """The fitted reference distributions (`fit()`'s result), or `None`. Validated whenever it is set."""
        return self._reference

    @reference.setter
    def reference(self, value: dict[str, Any] | None) -> None:
        if value is not None:
            self._check_reference(value, self.method)
        self._reference = value

    # --- validation --------------------------------------------------------------------------------

    @staticmethod
    def _check_alpha(alpha: Any, name: str) -> None:
        check_number(name, alpha, minimum=0.0, maximum=1.0)

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
            hazard = _regex_hazard(re_parser.parse(pattern.pattern, pattern.flags), inside_repeat=False)
            if hazard is not None:
                msg = (
                    f"query_alpha_rules[{i}]['pattern'] {pattern.pattern!r} is refused: it has {hazard}, which can "
                    "backtrack exponentially on some queries. Rewrite it without nesting (e.g. '(a+)+' -> 'a+')."
                )
                raise ValueError(msg)
            compiled.append((pattern, float(rule["alpha"])))
        return compiled

    @staticmethod
    def _check_reference(reference: Any, method: str) -> None:
        if not isinstance(reference, dict) or not isinstance(reference.get("distributions"), dict):
            msg = "reference must be a dict with a 'distributions' mapping (as returned by fit())"
            raise ValueError(msg)
        version = reference.get("version", _REFERENCE_VERSION)
        if version != _REFERENCE_VERSION:
            msg = f"reference version {version!r} is not supported (expected {_REFERENCE_VERSION}); refit with fit()"
            raise ValueError(msg)
        for modality, by_type in reference["distributions"].items():
            if modality not in MODALITIES:
                msg = f"reference has an unknown modality {modality!r} (expected one of {MODALITIES})"
                raise ValueError(msg)
            if not isinstance(by_type, dict):
                msg = f"reference[{modality!r}] must map score types to distributions, got {type(by_type).__name__}"
                raise ValueError(msg)
            for score_type, dist in by_type.items():
                if score_type not in SCORE_TYPES:
                    msg = f"reference has an unknown score type {score_type!r} (expected one of {tuple(SCORE_TYPES)})"
                    raise ValueError(msg)
                check_reference_distribution(
                    dist, name=f"reference[{modality!r}][{score_type!r}]", need_moments=method == "zscore"
                )

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
        declared = doc.meta.get(self.modality_meta_field)
        if declared in _MODALITY_SET:
            return str(declared)
        try:
            return modality_of(doc, modality_meta_field=self.modality_meta_field)
        except MediaError as e:
            msg = f"ModalityScoreCalibrator: document '{doc.id}': {e}"
            raise MediaError(msg) from e

    def _modality_code(self, doc: Document, meta: dict[str, Any]) -> int:
        declared = meta.get(self.modality_meta_field)
        if type(declared) is str:
            code = _MODALITY_CODES.get(declared)
            if code is not None:
                return code
        return _MODALITY_CODES[self._modality(doc)]

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
        :raises ValueError: When no (modality, score type) has enough scores, a document's modality is unknown, or a
            fitted distribution is not finite (naming the modality and score type); `self.reference` is then kept.
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
        reference = {"version": _REFERENCE_VERSION, "distributions": distributions}
        self._check_reference(reference, "zscore")  # e.g. scores near the float limit overflow the mean or std
        self._reference = reference
        with self._warn_lock:
            self._warned.clear()
        return reference

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
            return ecdf_transform(values, self._ecdf_table(modality, score_type, dist["quantiles"]))
        return zscore_transform(values, float(dist["mean"]), float(dist["std"]))

    def _ecdf_table(self, modality: str, score_type: str, quantiles: list[float]) -> EcdfTable:
        reference, tables = self._tables
        if reference is not self.reference:
            tables = {}
            self._tables = (self.reference, tables)
        table = tables.get((modality, score_type))
        if table is None:
            table = tables[(modality, score_type)] = EcdfTable.of(quantiles)
        return table

    def alpha_for(self, query: str | None) -> float:
        """
        The fusion weight for a query: the first matching rule's alpha, else `alpha`.

        :param query: The query, or `None`.
        :returns: The weight of the late score.
        """
        if query:
            head = query[:MAX_RULE_QUERY_CHARS]
            for pattern, alpha in self._rules:
                if pattern.search(head):
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
        :returns: `{"documents": [...]}` sorted by fused score, best first (stable; documents without a usable
            score last), cut at `top_k`.
        :raises ValueError: On an unknown modality value or a negative `top_k`.
        :raises TypeError: When `documents` is not a list (or tuple) of Documents.
        """
        check_documents_input(type(self).__name__, documents, allow_tuple=True)
        top_k = self.top_k if top_k is None else top_k
        check_top_k_and_threshold(top_k, None)
        if not documents:
            return {"documents": []}
        alpha = self.alpha_for(query)

        metas = [doc.meta for doc in documents]
        modalities = np.array([self._modality_code(doc, meta) for doc, meta in zip(documents, metas, strict=True)])
        dense, dense_bad = _score_array(
            [meta.get(DENSE_SCORE_META_KEY, doc.score) for meta, doc in zip(metas, documents, strict=True)]
        )
        cross, cross_bad = _score_array([meta.get(CROSS_ENCODER_SCORE_META_KEY) for meta in metas])
        interaction, interaction_bad = _score_array([meta.get(LATE_INTERACTION_SCORE_META_KEY) for meta in metas])
        # The cross-encoder score is the late score where usable; the late-interaction score is read otherwise.
        use_cross = ~np.isnan(cross)
        use_interaction = ~use_cross & ~np.isnan(interaction)
        late = np.where(use_cross, cross, interaction)
        self._warn_unusable(documents, dense_bad, cross_bad, [i for i in interaction_bad if not use_cross[i]])

        cal_dense = np.full(len(documents), np.nan)
        cal_late = np.full(len(documents), np.nan)
        groups: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]] = []
        for code, modality in enumerate(MODALITIES):
            of_modality = modalities == code
            if not of_modality.any():
                continue
            for score_type, mask, source, target in (
                ("dense", of_modality & ~np.isnan(dense), dense, cal_dense),
                ("cross_encoder", of_modality & use_cross, late, cal_late),
                ("late_interaction", of_modality & use_interaction, late, cal_late),
            ):
                if mask.any():
                    groups.append((modality, score_type, mask, source, target))
        if self.method != "minmax":
            self._warn_fallback_once([(m, t) for m, t, *_ in groups if self._reference_for(m, t) is None])
        for modality, score_type, mask, source, target in groups:
            target[mask] = self._calibrate(source[mask], modality, score_type)

        has_dense, has_late = ~np.isnan(cal_dense), ~np.isnan(cal_late)
        fused = np.where(
            has_dense & has_late, (1.0 - alpha) * cal_dense + alpha * cal_late, np.where(has_dense, cal_dense, cal_late)
        )
        unscored = np.isnan(fused)
        # The shared ranking rule (`select_top`): best first, stable, documents without a score last.
        order = np.lexsort((np.where(unscored, 0.0, -fused), unscored))
        kept = order if top_k is None else order[:top_k]
        # Python floats (NaN = absent) for the per-document loop: indexing numpy arrays one by one is slower.
        dense_values, late_values, fused_values = cal_dense.tolist(), cal_late.tolist(), fused.tolist()
        out: list[Document] = []
        for i in kept.tolist():
            doc = documents[i]
            meta = dict(doc.meta)
            calibrated_dense, calibrated_late, score = dense_values[i], late_values[i], fused_values[i]
            meta[CALIBRATED_DENSE_SCORE_META_KEY] = None if math.isnan(calibrated_dense) else calibrated_dense
            if math.isnan(calibrated_late):
                meta.pop(CALIBRATED_LATE_SCORE_META_KEY, None)  # a stale value from an earlier calibration
            else:
                meta[CALIBRATED_LATE_SCORE_META_KEY] = calibrated_late
            final = None if math.isnan(score) else score
            meta[FUSED_SCORE_META_KEY] = final
            meta.setdefault(DENSE_SCORE_META_KEY, doc.score)
            out.append(rescored(doc, final, meta))
        return {"documents": out}

    @staticmethod
    def _warn_unusable(documents: list[Document], dense: list[int], cross: list[int], interaction: list[int]) -> None:
        if not (dense or cross or interaction):
            return
        problems: dict[int, list[str]] = {}
        for key, bad, positions in (
            (DENSE_SCORE_META_KEY, "dense", dense),
            (CROSS_ENCODER_SCORE_META_KEY, "cross_encoder", cross),
            (LATE_INTERACTION_SCORE_META_KEY, "late_interaction", interaction),
        ):
            for i in positions:
                doc = documents[i]
                raw = doc.meta.get(key, doc.score) if key == DENSE_SCORE_META_KEY else doc.meta.get(key)
                problems.setdefault(i, []).append(f"{bad} score {raw!r}")
        logger.warning(
            "ModalityScoreCalibrator ignored non-finite scores (the documents are kept): {details}",
            details="; ".join(f"'{documents[i].id}': {', '.join(problems[i])}" for i in sorted(problems)),
        )
