"""KIF-ISD NLG metrics as a local `evaluate` module: BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap).

    import evaluate
    nlg = evaluate.load("metrics/kif_nlg")  # a local folder: works offline
    nlg.compute(predictions=["no pleural effusion ."], references=["there is no pleural effusion ."], meteor=False)

The numbers are `metrics_kif.compute_nlg_metrics`'s: pycocoevalcap's scorers on the texts as given. METEOR needs Java;
without it the key is left out with a warning. `evaluate` copies this file into its module cache, so it imports the
project's `metrics_kif` absolutely: the project must be installed (`pip install -e .`) or on `sys.path`.
"""

import datasets
import evaluate

from metrics_kif import compute_nlg_metrics


_DESCRIPTION = __doc__
_CITATION = """\
@inproceedings{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and
          Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""
_INPUTS_DESCRIPTION = """
Args:
    predictions: generated reports, one string each, cleaned and tokenised as the references.
    references: one reference report (string) per prediction.
    meteor: compute METEOR (starts a Java process); default True.
Returns:
    A dict with BLEU_1, BLEU_2, BLEU_3, BLEU_4, METEOR (when Java runs), ROUGE_L and CIDEr, as floats.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS_DESCRIPTION)
class KifNlg(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap"],
        )

    def _compute(self, predictions, references, meteor: bool = True):
        return compute_nlg_metrics(predictions, references, meteor=meteor)
