"""Report-generation metrics: natural-language generation (NLG) and clinical efficacy (CE).

NLG scores are the COCO caption toolkit's (pycocoevalcap) on the texts exactly as given: tokenisation and cleaning
happen upstream (`KifProcessor`), so the numbers equal the toolkit's on the same strings.

CE scores compare the 14 CheXpert labels that a labeler (`labeling_kif`) extracts from the generated and the reference
reports. Every label is coded 0 blank, 1 positive, 2 negative, 3 uncertain. Conventions:

- example-based precision/recall/F1 (PromptMRG's `ce_precision/ce_recall/ce_f1`, the numbers KIF-ISD reports): per
  report over all 14 observations with positive = label 1, then averaged over reports. A ratio whose denominator is 0
  counts as 0 (PromptMRG's `np.nan_to_num`), so a report with no positive label in either text scores 0;
- micro/macro F1 over the 14 observations and over the 5 common ones (`CHEXPERT_5_OBSERVATIONS`), with uncertain
  counted as negative (positive = 1) and, in the keys ending in `_uncertain_positive`, as positive (positive = 1 or
  3). Macro F1 is the mean of the per-observation F1; an observation with no positive in either set scores 0 there
  (scikit-learn's `zero_division=0`).
"""

import contextlib
import re
import shutil
import warnings
from collections.abc import Sequence

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from configuration_kif import CHEXPERT_5_OBSERVATIONS, CHEXPERT_OBSERVATIONS


BLEU_ORDER = 4
BLEU_KEYS = tuple(f"BLEU_{n}" for n in range(1, BLEU_ORDER + 1))
NLG_METRIC_KEYS = (*BLEU_KEYS, "METEOR", "ROUGE_L", "CIDEr")

BLANK, POSITIVE, NEGATIVE, UNCERTAIN = 0, 1, 2, 3
LABEL_CODES = (BLANK, POSITIVE, NEGATIVE, UNCERTAIN)
NUM_OBSERVATIONS = len(CHEXPERT_OBSERVATIONS)
COMMON_5_INDICES = tuple(CHEXPERT_OBSERVATIONS.index(name) for name in CHEXPERT_5_OBSERVATIONS)

# The two conventions for uncertain labels: which codes count as positive, and the suffix of their keys.
UNCERTAIN_AS_NEGATIVE = ((POSITIVE,), "")
UNCERTAIN_AS_POSITIVE = ((POSITIVE, UNCERTAIN), "_uncertain_positive")
EXAMPLE_METRIC_KEYS = ("ce_example_precision", "ce_example_recall", "ce_example_f1")
LABEL_METRIC_KEYS = tuple(
    f"ce_{average}_f1_{subset}{suffix}"
    for _, suffix in (UNCERTAIN_AS_NEGATIVE, UNCERTAIN_AS_POSITIVE)
    for subset in ("14", "5")
    for average in ("micro", "macro")
)
CE_METRIC_KEYS = EXAMPLE_METRIC_KEYS + LABEL_METRIC_KEYS
CE_NUM_REPORTS_KEY = "ce_num_reports"

CONFIDENCE_LEVEL = 0.95
CI_PERCENTILES = (100 * (1 - CONFIDENCE_LEVEL) / 2, 100 * (1 + CONFIDENCE_LEVEL) / 2)


# ---------------------------------------------------------------------------------------------------------------------
# NLG
# ---------------------------------------------------------------------------------------------------------------------


def compute_nlg_metrics(predictions: Sequence[str], references: Sequence[str], meteor: bool = True) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr (the toolkit's CIDEr-D) of `predictions` against one reference each.

    The values are pycocoevalcap's `Bleu(4)`, `Meteor()`, `Rouge()` and `Cider()` on `gts={i: [references[i]]}` and
    `res={i: [predictions[i]]}`. Empty strings are scored as the toolkit scores them (BLEU, ROUGE-L and METEOR accept
    them); the one input the toolkit crashes on, CIDEr when no reference has a single word, is given its limit value 0
    (every reference TF-IDF vector is then zero, so every per-report similarity is 0).

    METEOR runs the toolkit's Java process. Without Java on the PATH, or when that process fails, the `METEOR` key is
    left out and a warning says why; `meteor=False` leaves it out silently (it costs a JVM start).
    """
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
    if not predictions:
        raise ValueError("No reports to score: predictions and references are empty lists.")
    res = {i: [prediction] for i, prediction in enumerate(predictions)}
    gts = {i: [reference] for i, reference in enumerate(references)}

    bleu, _ = Bleu(BLEU_ORDER).compute_score(gts, res, verbose=0)
    results = {key: float(value) for key, value in zip(BLEU_KEYS, bleu)}
    if meteor:
        meteor_score = _meteor_score(gts, res)
        if meteor_score is not None:
            results["METEOR"] = meteor_score
    results["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    results["CIDEr"] = _cider_score(gts, res)
    return results


def _cider_score(gts: dict, res: dict) -> float:
    # CiderScorer asserts on the largest document frequency, which does not exist when no reference has a word.
    if not any(reference.split() for references in gts.values() for reference in references):
        return 0.0
    return float(Cider().compute_score(gts, res)[0])


def _meteor_score(gts: dict, res: dict) -> float | None:
    """The toolkit's METEOR, or None (with a warning) when Java is missing or its process fails."""
    if shutil.which("java") is None:
        warnings.warn("METEOR is not reported: it needs Java (`java` is not on the PATH).", stacklevel=3)
        return None
    # The toolkit talks to Java one line per text: a line break inside a text would desynchronise it (and hang).
    gts, res = ({key: [_one_line(text) for text in texts] for key, texts in d.items()} for d in (gts, res))
    try:
        scorer = Meteor()
    except OSError as error:
        warnings.warn(f"METEOR is not reported: Java could not be started ({error!r}).", stacklevel=3)
        return None
    try:
        return float(scorer.compute_score(gts, res)[0])
    except (OSError, ValueError) as error:  # e.g. the JVM died (no memory for its heap): no number comes back
        _release_failed_meteor(scorer)
        warnings.warn(f"METEOR is not reported: its Java process failed ({error!r}).", stacklevel=3)
        return None


def _release_failed_meteor(scorer: Meteor) -> None:
    """Free a toolkit scorer whose scoring failed, so that its __del__ neither blocks nor raises.

    The scorer still holds its lock (its __del__ would wait for it forever) and a pipe to a dead process (its __del__
    would fail to flush it).
    """
    scorer.lock.release()
    with contextlib.suppress(OSError):  # closes the pipe even when flushing it fails
        scorer.meteor_p.stdin.close()
    scorer.meteor_p.kill()


def _one_line(text: str) -> str:
    return re.sub(r"[\r\n]", " ", text)


# ---------------------------------------------------------------------------------------------------------------------
# Clinical efficacy
# ---------------------------------------------------------------------------------------------------------------------


def compute_ce_metrics(predicted_labels, reference_labels, bootstrap: int = 0, seed: int = 0) -> dict:
    """Clinical-efficacy scores of predicted against reference CheXpert labels (see the module docstring).

    Args:
        predicted_labels, reference_labels: N rows of 14 label codes (0 blank, 1 positive, 2 negative, 3 uncertain)
            in the order of `CHEXPERT_OBSERVATIONS`, as nested lists or an (N, 14) array.
        bootstrap: when > 0, also return `<key>_ci_low` / `<key>_ci_high`: the 95% percentile interval of every
            metric over `bootstrap` resamples (with replacement) of the N reports.
        seed: seed of the numpy random generator that draws the resamples.

    Returns:
        A dict of plain floats with the keys of `CE_METRIC_KEYS` (plus the intervals) and `ce_num_reports`.
    """
    predicted = _validate_labels(predicted_labels, "predicted_labels")
    reference = _validate_labels(reference_labels, "reference_labels")
    if len(predicted) != len(reference):
        raise ValueError(
            f"Got {len(predicted)} rows of predicted labels but {len(reference)} rows of reference labels."
        )
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0 (number of resamples), got {bootstrap}.")

    num_reports = len(predicted)
    # Every metric is a function of per-report counts summed with per-report weights: weight 1 each gives the point
    # estimate, and a bootstrap resample weighs each report by the number of times it draws it.
    point = _weighted_ce_scores(predicted, reference, np.ones((1, num_reports)))
    results = {key: float(values[0]) for key, values in point.items()}
    if bootstrap:
        draws = np.random.default_rng(seed).integers(num_reports, size=(bootstrap, num_reports))
        resampled = _weighted_ce_scores(predicted, reference, _draw_counts(draws, num_reports))
        for key, values in resampled.items():
            low, high = np.percentile(values, CI_PERCENTILES)
            results[f"{key}_ci_low"], results[f"{key}_ci_high"] = float(low), float(high)
    results[CE_NUM_REPORTS_KEY] = num_reports
    return results


def _validate_labels(labels, name: str) -> np.ndarray:
    """`labels` as an (N, 14) int8 array; a ValueError names the first bad row otherwise."""
    if len(labels) == 0:
        raise ValueError(f"{name} is empty: there are no reports to score.")
    try:
        array = np.asarray(labels)
    except ValueError:  # ragged rows: found below
        array = None
    if array is None or array.ndim != 2 or array.shape[1] != NUM_OBSERVATIONS:
        _raise_for_bad_row(labels, name)
    valid = np.isin(array, LABEL_CODES)
    if not valid.all():
        index, column = np.argwhere(~valid)[0]
        value = array[index, column]
        value = value.item() if isinstance(value, np.generic) else value  # 5, not np.int64(5)
        raise ValueError(
            f"{name}[{index}] has label {value!r} for {CHEXPERT_OBSERVATIONS[column]}: labels must be "
            f"0 blank, 1 positive, 2 negative or 3 uncertain."
        )
    return array.astype(np.int8)


def _raise_for_bad_row(labels, name: str) -> None:
    """Name the first row that is not a flat sequence of 14 labels (the slow path, only taken on bad input)."""
    for index, row in enumerate(labels):
        is_flat = isinstance(row, Sequence | np.ndarray) and all(np.isscalar(value) for value in row)
        if not is_flat or len(row) != NUM_OBSERVATIONS:
            raise ValueError(
                f"{name}[{index}] must hold {NUM_OBSERVATIONS} labels (one per CheXpert observation), got {row!r}."
            )
    raise ValueError(f"{name} must be N rows of {NUM_OBSERVATIONS} integer labels.")


def _draw_counts(draws: np.ndarray, num_reports: int) -> np.ndarray:
    """How often each report occurs in each resample: (B, N) indices -> (B, N) counts."""
    offsets = np.arange(len(draws))[:, None] * num_reports
    return np.bincount((draws + offsets).ravel(), minlength=draws.size).reshape(draws.shape)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0, PromptMRG's nan_to_num)."""
    return np.divide(
        numerator, denominator, out=np.zeros(np.broadcast(numerator, denominator).shape), where=denominator > 0
    )


def _confusion(predicted: np.ndarray, reference: np.ndarray, positive_codes: tuple) -> tuple:
    """Per report and observation: (true positive, false positive, false negative) as 0/1 float arrays."""
    predicted_positive = np.isin(predicted, positive_codes)
    reference_positive = np.isin(reference, positive_codes)
    true_positive = predicted_positive & reference_positive
    false_positive = predicted_positive & ~reference_positive
    false_negative = ~predicted_positive & reference_positive
    return tuple(counts.astype(np.float64) for counts in (true_positive, false_positive, false_negative))


def _f1(true_positive: np.ndarray, false_positive: np.ndarray, false_negative: np.ndarray) -> np.ndarray:
    # 2PR / (P + R) written with counts, so that it is 0 (not NaN) when there is no positive at all.
    return _safe_divide(2 * true_positive, 2 * true_positive + false_positive + false_negative)


def _weighted_ce_scores(predicted: np.ndarray, reference: np.ndarray, weights: np.ndarray) -> dict:
    """Every CE metric for each row of report weights (W, N): {key: (W,) array}."""
    num_reports = predicted.shape[0]
    scores = {}

    # Example-based: per-report ratios over all 14 observations, then the (weighted) mean over reports.
    true_positive, false_positive, false_negative = (
        counts.sum(axis=1) for counts in _confusion(predicted, reference, UNCERTAIN_AS_NEGATIVE[0])
    )
    per_report = {
        "ce_example_precision": _safe_divide(true_positive, true_positive + false_positive),
        "ce_example_recall": _safe_divide(true_positive, true_positive + false_negative),
        "ce_example_f1": _f1(true_positive, false_positive, false_negative),
    }
    for key, values in per_report.items():
        scores[key] = weights @ values / num_reports

    # Label-based: per-observation counts summed over the (weighted) reports.
    for positive_codes, suffix in (UNCERTAIN_AS_NEGATIVE, UNCERTAIN_AS_POSITIVE):
        per_observation = [weights @ counts for counts in _confusion(predicted, reference, positive_codes)]  # (W, 14)
        for subset, columns in (("14", slice(None)), ("5", list(COMMON_5_INDICES))):
            true_positive, false_positive, false_negative = (counts[:, columns] for counts in per_observation)
            scores[f"ce_micro_f1_{subset}{suffix}"] = _f1(
                true_positive.sum(axis=1), false_positive.sum(axis=1), false_negative.sum(axis=1)
            )
            scores[f"ce_macro_f1_{subset}{suffix}"] = _f1(true_positive, false_positive, false_negative).mean(axis=1)
    return {key: scores[key] for key in CE_METRIC_KEYS}
