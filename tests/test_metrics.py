"""NLG metrics (parity with pycocoevalcap), CE metrics (hand-computed values) and the local `evaluate` modules."""

import gc
import math
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

import metrics_kif
from configuration_kif import CHEXPERT_OBSERVATIONS
from metrics_kif import CE_METRIC_KEYS, NLG_METRIC_KEYS, compute_ce_metrics, compute_nlg_metrics


REPO_ROOT = Path(__file__).resolve().parent.parent
JAVA_MISSING = shutil.which("java") is None

# Cleaned, tokenised reports as the processor writes them.
PREDICTIONS = [
    "the heart size is normal . the lungs are clear .",
    "there is a small left pleural effusion . no pneumothorax .",
    "moderate cardiomegaly . a pacemaker is present .",
    "no acute cardiopulmonary process .",
    "patchy right lower lobe opacity may represent atelectasis .",
    "endotracheal tube terminates 4 cm above the carina . no pneumothorax .",
]
REFERENCES = [
    "heart size is normal . lungs are clear bilaterally .",
    "small left pleural effusion . there is no pneumothorax .",
    "the heart is enlarged . a left chest wall pacemaker is present .",
    "no acute cardiopulmonary abnormality .",
    "right lower lobe opacity concerning for pneumonia .",
    "the endotracheal tube is in standard position . no pneumothorax is seen .",
]


def coco_scores(predictions, references, scorers):
    """What the COCO caption toolkit gives, called directly."""
    gts = {i: [reference] for i, reference in enumerate(references)}
    res = {i: [prediction] for i, prediction in enumerate(predictions)}
    scores = {}
    for scorer in scorers:
        if isinstance(scorer, Bleu):
            bleu, _ = scorer.compute_score(gts, res, verbose=0)
            scores.update({f"BLEU_{n}": value for n, value in enumerate(bleu, start=1)})
        else:
            name = {Meteor: "METEOR", Rouge: "ROUGE_L", Cider: "CIDEr"}[type(scorer)]
            scores[name] = scorer.compute_score(gts, res)[0]
    return scores


# ---------------------------------------------------------------------------------------------------------------------
# NLG
# ---------------------------------------------------------------------------------------------------------------------


def test_nlg_equals_pycocoevalcap_without_meteor():
    results = compute_nlg_metrics(PREDICTIONS, REFERENCES, meteor=False)
    expected = coco_scores(PREDICTIONS, REFERENCES, [Bleu(4), Rouge(), Cider()])
    assert results == expected
    assert list(results) == [key for key in NLG_METRIC_KEYS if key != "METEOR"]
    assert all(type(value) is float for value in results.values())
    # Overlapping but different reports: every score is strictly between the extremes.
    assert 0 < results["BLEU_4"] < results["BLEU_1"] < 1


@pytest.mark.skipif(JAVA_MISSING, reason="METEOR needs Java (`java` is not on the PATH)")
def test_meteor_equals_pycocoevalcap(monkeypatch):
    # One toolkit scorer (one JVM start, several seconds) serves both sides: compute_nlg_metrics gets it from
    # the patched constructor, so this checks what it passes to METEOR and what it returns.
    scorer = Meteor()
    expected = coco_scores(PREDICTIONS, REFERENCES, [scorer])["METEOR"]
    monkeypatch.setattr(metrics_kif, "Meteor", lambda: scorer)
    results = compute_nlg_metrics(PREDICTIONS, REFERENCES)
    assert results["METEOR"] == expected
    assert type(results["METEOR"]) is float and 0 < expected < 1
    assert list(results) == list(NLG_METRIC_KEYS)


def test_meteor_left_out_with_warning_without_java(monkeypatch):
    monkeypatch.setattr(metrics_kif.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="METEOR is not reported: it needs Java"):
        results = compute_nlg_metrics(PREDICTIONS, REFERENCES)
    assert "METEOR" not in results
    assert results == compute_nlg_metrics(PREDICTIONS, REFERENCES, meteor=False)


def test_meteor_left_out_with_warning_when_java_cannot_start(monkeypatch):
    class UnstartableMeteor:
        def __init__(self):
            raise PermissionError("[Errno 13] Permission denied: 'java'")

    monkeypatch.setattr(metrics_kif.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(metrics_kif, "Meteor", UnstartableMeteor)
    with pytest.warns(UserWarning, match="Java could not be started.*Permission denied"):
        results = compute_nlg_metrics(PREDICTIONS, REFERENCES)
    assert "METEOR" not in results and "CIDEr" in results


def test_meteor_left_out_with_warning_when_java_dies(monkeypatch):
    class DeadJavaMeteor(Meteor):
        """The toolkit's scorer whose Java process exits at once (as a JVM without memory for its heap does)."""

        def __init__(self):
            command = [sys.executable, "-c", "pass"]
            self.meteor_p = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self.meteor_p.wait()
            self.lock = threading.Lock()

    monkeypatch.setattr(metrics_kif, "Meteor", DeadJavaMeteor)
    monkeypatch.setattr(metrics_kif.shutil, "which", lambda name: "/usr/bin/java")
    with pytest.warns(UserWarning, match="Java process failed"):
        results = compute_nlg_metrics(PREDICTIONS, REFERENCES)
    assert "METEOR" not in results and "CIDEr" in results
    gc.collect()  # the scorer's __del__ takes its lock: it must have been released (or this would hang)


def test_meteor_false_is_silent(monkeypatch):
    monkeypatch.setattr(metrics_kif.shutil, "which", lambda name: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_nlg_metrics(PREDICTIONS, REFERENCES, meteor=False)


@pytest.mark.parametrize(
    "predictions, references",
    [
        (["", "no pneumothorax ."], ["heart size is normal .", "no pneumothorax ."]),  # empty prediction
        (["heart size is normal .", "no pneumothorax ."], ["", "no pneumothorax ."]),  # empty reference
        (["", ""], ["heart size is normal .", "no pneumothorax ."]),  # every prediction empty
    ],
)
def test_empty_texts_score_as_the_toolkit_does(predictions, references):
    results = compute_nlg_metrics(predictions, references, meteor=False)
    assert results == coco_scores(predictions, references, [Bleu(4), Rouge(), Cider()])
    assert all(math.isfinite(value) for value in results.values())


def test_cider_is_zero_when_no_reference_has_a_word():
    predictions, references = ["no effusion .", ""], ["", " "]
    # pycocoevalcap's CIDEr crashes here (max() of no document frequencies); its BLEU and ROUGE-L do not.
    with pytest.raises(ValueError):
        coco_scores(predictions, references, [Cider()])
    results = compute_nlg_metrics(predictions, references, meteor=False)
    # Every reference TF-IDF vector is zero, so every similarity, and CIDEr, is 0.
    assert results == {**coco_scores(predictions, references, [Bleu(4), Rouge()]), "CIDEr": 0.0}


def test_nlg_rejects_mismatched_and_empty_inputs():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_nlg_metrics(["a .", "b ."], ["a ."])
    with pytest.raises(ValueError, match="No reports to score"):
        compute_nlg_metrics([], [])


# ---------------------------------------------------------------------------------------------------------------------
# Clinical efficacy
# ---------------------------------------------------------------------------------------------------------------------

CM, ED, AT, PX, PE, SD = (
    CHEXPERT_OBSERVATIONS.index(name)
    for name in ("Cardiomegaly", "Edema", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Support Devices")
)


def labels(codes: dict[int, int]) -> list[int]:
    """A row of 14 labels: blank except `codes` ({observation index: code})."""
    return [codes.get(index, 0) for index in range(len(CHEXPERT_OBSERVATIONS))]


# Report A: predicted CM=1 ED=3 PE=1, reference CM=1 ED=1 PE=2.
# Report B: predicted SD=1, reference SD=1 PX=1.
# Report C: predicted CM=2, reference AT=3: no label 1 on either side.
PREDICTED = [labels({CM: 1, ED: 3, PE: 1}), labels({SD: 1}), labels({CM: 2})]
REFERENCE = [labels({CM: 1, ED: 1, PE: 2}), labels({SD: 1, PX: 1}), labels({AT: 3})]


def test_ce_hand_computed():
    results = compute_ce_metrics(PREDICTED, REFERENCE)
    # Example-based, positive = 1. A: tp 1 (CM), fp 1 (PE), fn 1 (ED) -> P 1/2, R 1/2, F1 2/(2+1+1) = 1/2.
    # B: tp 1 (SD), fn 1 (PX) -> P 1, R 1/2, F1 2/3. C: nothing positive on either side -> 0, 0, 0.
    assert results["ce_example_precision"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert results["ce_example_recall"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert results["ce_example_f1"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    # Uncertain as negative. Per observation: CM tp, SD tp, PE fp, ED fn, PX fn; the 9 others have no positive (F1 0).
    # Micro 14: 2*2 / (2*2 + 1 + 2) = 4/7; macro 14: (1 + 1) / 14. Over the 5 (CM ED CO AT PE): CM tp, PE fp, ED fn
    # -> micro 2 / (2 + 1 + 1) = 1/2; macro (1 + 0 + 0 + 0 + 0) / 5.
    assert results["ce_micro_f1_14"] == pytest.approx(4 / 7)
    assert results["ce_macro_f1_14"] == pytest.approx(2 / 14)
    assert results["ce_micro_f1_5"] == pytest.approx(1 / 2)
    assert results["ce_macro_f1_5"] == pytest.approx(1 / 5)
    # Uncertain as positive: A's predicted ED=3 is now a tp, C's reference AT=3 a fn. CM tp, ED tp, SD tp, PE fp,
    # PX fn, AT fn. Micro 14: 2*3 / (2*3 + 1 + 2) = 2/3; macro 14: 3/14. Over the 5: CM tp, ED tp, PE fp, AT fn
    # -> micro 4 / (4 + 1 + 1) = 2/3; macro (1 + 1 + 0 + 0 + 0) / 5.
    assert results["ce_micro_f1_14_uncertain_positive"] == pytest.approx(2 / 3)
    assert results["ce_macro_f1_14_uncertain_positive"] == pytest.approx(3 / 14)
    assert results["ce_micro_f1_5_uncertain_positive"] == pytest.approx(2 / 3)
    assert results["ce_macro_f1_5_uncertain_positive"] == pytest.approx(2 / 5)
    assert results["ce_num_reports"] == 3
    assert set(results) == {*CE_METRIC_KEYS, "ce_num_reports"}
    assert all(type(results[key]) is float for key in CE_METRIC_KEYS)


def test_ce_reports_without_positives_score_zero():
    # As in PromptMRG: an empty-empty report counts 0 (not 1) in the example-based means; no positives -> F1 0.
    negatives = [[2] * len(CHEXPERT_OBSERVATIONS)] * 4
    results = compute_ce_metrics(negatives, [[0] * len(CHEXPERT_OBSERVATIONS)] * 4)
    assert all(results[key] == 0.0 for key in CE_METRIC_KEYS)


def test_ce_perfect_prediction_and_numpy_input():
    reference = np.array(REFERENCE)
    results = compute_ce_metrics(reference, reference)
    # Reports A and B have positives (precision 1), C has none (0): mean 2/3.
    assert results["ce_example_precision"] == pytest.approx(2 / 3)
    assert results["ce_micro_f1_14"] == 1.0
    assert results["ce_micro_f1_14_uncertain_positive"] == 1.0


@pytest.mark.parametrize(
    "predicted, match",
    [
        ([[0] * 13, [0] * 14, [0] * 14], r"predicted_labels\[0\] must hold 14 labels"),
        ([[0] * 14, [0] * 14, [0] * 15], r"predicted_labels\[2\] must hold 14 labels"),
        ([[0] * 14, [0] * 13 + [4], [0] * 14], r"predicted_labels\[1\] has label 4 for No Finding"),
        ([[0] * 14, [0] * 14, [-1] + [0] * 13], r"predicted_labels\[2\] has label -1 for Enlarged Cardiomediastinum"),
        ([[0.5] + [0] * 13, [0] * 14, [0] * 14], r"predicted_labels\[0\] has label 0.5"),
        ([[0] * 14, [0] * 14], "2 rows of predicted labels but 3 rows of reference labels"),
        ([], "predicted_labels is empty"),
    ],
)
def test_ce_rejects_bad_labels(predicted, match):
    with pytest.raises(ValueError, match=match):
        compute_ce_metrics(predicted, REFERENCE)


def test_ce_rejects_negative_bootstrap():
    with pytest.raises(ValueError, match="bootstrap must be >= 0"):
        compute_ce_metrics(PREDICTED, REFERENCE, bootstrap=-1)


@pytest.fixture(scope="module")
def noisy_labels():
    """200 reports whose predictions agree with the references 70% of the time."""
    rng = np.random.default_rng(0)
    reference = rng.choice(4, size=(200, len(CHEXPERT_OBSERVATIONS)), p=[0.5, 0.2, 0.2, 0.1])
    predicted = np.where(rng.random(reference.shape) < 0.7, reference, rng.integers(0, 4, reference.shape))
    return predicted, reference


def test_ce_bootstrap_intervals(noisy_labels):
    predicted, reference = noisy_labels
    results = compute_ce_metrics(predicted, reference, bootstrap=200, seed=1)
    assert results == compute_ce_metrics(predicted, reference, bootstrap=200, seed=1)  # seeded
    assert results != compute_ce_metrics(predicted, reference, bootstrap=200, seed=2)
    point = compute_ce_metrics(predicted, reference)
    for key in CE_METRIC_KEYS:
        assert results[key] == point[key]
        low, high = results[f"{key}_ci_low"], results[f"{key}_ci_high"]
        assert 0 <= low < point[key] < high <= 1, key
        assert high - low < 0.2, key  # 200 reports: a few points either way, not the whole range
    assert "ce_num_reports_ci_low" not in results
    assert not any(key.endswith("_ci_low") for key in point)


# ---------------------------------------------------------------------------------------------------------------------
# Local `evaluate` modules
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_evaluate_nlg_module_loads_offline_and_matches(offline, tmp_path):
    import evaluate

    module = evaluate.load(str(REPO_ROOT / "metrics" / "kif_nlg"), cache_dir=str(tmp_path))
    results = module.compute(predictions=PREDICTIONS, references=REFERENCES, meteor=False)
    assert results == compute_nlg_metrics(PREDICTIONS, REFERENCES, meteor=False)


def test_evaluate_ce_module_loads_offline_and_matches(offline, tmp_path, noisy_labels):
    import evaluate

    predicted, reference = noisy_labels
    module = evaluate.load(str(REPO_ROOT / "metrics" / "kif_ce"), cache_dir=str(tmp_path))
    results = module.compute(predictions=predicted.tolist(), references=reference.tolist(), bootstrap=50, seed=3)
    assert results == compute_ce_metrics(predicted, reference, bootstrap=50, seed=3)
