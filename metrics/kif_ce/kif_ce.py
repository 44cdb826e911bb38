"""KIF-ISD clinical-efficacy (CE) metrics as a local `evaluate` module.

    import evaluate
    ce = evaluate.load("metrics/kif_ce")  # a local folder: works offline
    ce.compute(predictions=generated_labels, references=reference_labels, bootstrap=1000)

Inputs are the 14 CheXpert labels per report (order of `configuration_kif.CHEXPERT_OBSERVATIONS`; 0 blank,
1 positive, 2 negative, 3 uncertain) that a labeler (`labeling_kif`) extracted from the generated and the reference
reports. The numbers are `metrics_kif.compute_ce_metrics`'s: example-based precision/recall/F1 (positive = 1, as
PromptMRG and KIF-ISD report them) and micro/macro F1 over 14 and 5 observations with uncertain counted as negative
and, in the `_uncertain_positive` keys, as positive. `evaluate` copies this file into its module cache, so it imports
the project's `metrics_kif` absolutely: the project must be installed (`pip install -e .`) or on `sys.path`.
"""

import datasets
import evaluate

from metrics_kif import compute_ce_metrics


_DESCRIPTION = __doc__
_CITATION = """\
@inproceedings{jin2024promptmrg,
  title={PromptMRG: Diagnosis-Driven Prompts for Medical Report Generation},
  author={Jin, Haibo and Che, Haoxuan and Lin, Yi and Chen, Hao},
  booktitle={Proceedings of the AAAI Conference on Artificial Intelligence},
  year={2024}
}
"""
_INPUTS_DESCRIPTION = """
Args:
    predictions: per report, the 14 labels of the generated report.
    references: per report, the 14 labels of the reference report.
    bootstrap: number of bootstrap resamples of the reports for 95% intervals (`<key>_ci_low/_ci_high`); default 0.
    seed: seed of the resampling; default 0.
Returns:
    A dict of floats: ce_example_precision/recall/f1, ce_{micro,macro}_f1_{14,5}[_uncertain_positive],
    ce_num_reports, and the intervals when bootstrap > 0.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS_DESCRIPTION)
class KifCe(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int32")),
                    "references": datasets.Sequence(datasets.Value("int32")),
                }
            ),
        )

    def _compute(self, predictions, references, bootstrap: int = 0, seed: int = 0):
        return compute_ce_metrics(predictions, references, bootstrap=bootstrap, seed=seed)
