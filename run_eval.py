"""Generate reports for a data split with a saved KIF-ISD model and score them.

    python run_eval.py --model outputs/kif-default/final --annotation_file data/annotation.json \
        --image_dir data/images --dataset mimic_cxr --clip_features_file data/clip_text_features.json \
        --split test --output_dir outputs/eval

Scores: NLG (BLEU-1..4, METEOR when Java is present, ROUGE-L, CIDEr; pycocoevalcap, on the texts exactly as
cleaned), clinical efficacy (CE) of the generated reports from a labeler (`--labeler rule` or `chexbert`), and the
classifier's own findings against the reference labels (`findings_*` keys). Writes `predictions.jsonl` and
`all_results.json`, and prints a table. Several processes (`accelerate launch run_eval.py ...`) split the batches
and gather the predictions without duplicates.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModel, AutoProcessor

from configuration_kif import CHEXPERT_OBSERVATIONS
from data_kif import GENERATION_METADATA_KEYS, KifDataCollator, load_features, load_report_dataset
from labeling_kif import CheXbertLabeler, RuleBasedLabeler
from metrics_kif import compute_ce_metrics, compute_nlg_metrics
from modeling_kif import KifForConditionalGeneration  # noqa: F401  (registers the KIF classes with the Auto classes)


logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
RESULTS_FILE = "all_results.json"
NUM_CHEXPERT = len(CHEXPERT_OBSERVATIONS)
CE_CONVENTION = (
    "example-based precision/recall/F1 with positive = label 1; micro/macro F1 over the 14 and the 5 common "
    "observations with uncertain counted as negative (keys ending in _uncertain_positive: as positive)"
)
LABELER_NAMES = {"rule": "rule-based (CheXpert-style mention, negation and uncertainty rules)", "chexbert": "CheXbert"}
TABLE_KEYS = (
    "BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr",
    "ce_example_precision", "ce_example_recall", "ce_example_f1", "ce_micro_f1_14", "ce_macro_f1_14",
    "ce_micro_f1_5", "ce_macro_f1_5", "findings_ce_example_f1",
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Saved model directory or Hub id.")
    parser.add_argument("--processor", help="Processor directory or Hub id (default: --model).")
    parser.add_argument("--annotation_file", required=True, help="R2Gen/PromptMRG annotation JSON.")
    parser.add_argument("--image_dir", required=True, help="Folder the annotation's image paths are relative to.")
    parser.add_argument("--dataset", default="mimic_cxr", choices=["mimic_cxr", "iu_xray", "synthetic"])
    parser.add_argument("--clip_features_file", help="clip_text_features.json; without it the model's index is used.")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--max_samples", type=int, help="Score only the first N examples (quick checks).")
    parser.add_argument("--labeler", default="rule", choices=sorted(LABELER_NAMES))
    parser.add_argument("--chexbert_checkpoint", help="Stanford chexbert.pth (with --labeler chexbert).")
    parser.add_argument("--chexbert_tokenizer", default="bert-base-uncased")
    parser.add_argument("--bootstrap", type=int, default=0, help="Bootstrap resamples for CE confidence intervals.")
    parser.add_argument("--no_meteor", action="store_true", help="Skip METEOR (it starts a Java process).")
    parser.add_argument("--trust_remote_code", action="store_true", help="Load a Hub model's own code.")
    generation = parser.add_argument_group("generation (defaults: the model's generation_config.json)")
    generation.add_argument("--num_beams", type=int)
    generation.add_argument("--max_new_tokens", type=int)
    generation.add_argument("--min_new_tokens", type=int)
    generation.add_argument("--do_sample", action="store_true")
    generation.add_argument("--top_p", type=float)
    generation.add_argument("--repetition_penalty", type=float)
    args = parser.parse_args(argv)
    if args.labeler == "chexbert" and not args.chexbert_checkpoint:
        parser.error("--labeler chexbert needs --chexbert_checkpoint PATH (the Stanford chexbert.pth).")
    return args


def generation_overrides(args: argparse.Namespace) -> dict:
    names = ("num_beams", "max_new_tokens", "min_new_tokens", "top_p", "repetition_penalty")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.do_sample:
        overrides["do_sample"] = True
    return overrides


def load_model_and_processor(model_path: str, processor_path: str | None, trust_remote_code: bool = False):
    """Load a saved model and its processor, with a clear error when the directory is not a KIF-ISD model."""
    processor_path = processor_path or model_path
    local = Path(model_path)
    if local.exists() and not (local / "config.json").exists():
        raise ValueError(f"{model_path} has no config.json: it is not a saved model directory (save_pretrained).")
    try:
        model = AutoModel.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(processor_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"Could not load a KIF-ISD model and processor from {model_path}: {error}") from error
    if not hasattr(model, "predict_findings") or not hasattr(processor, "build_prompt_ids"):
        raise ValueError(f"{model_path} holds a {type(model).__name__}, not a KIF-ISD model.")
    return model.eval(), processor


def load_labeler(name: str, checkpoint: str | None = None, tokenizer: str = "bert-base-uncased", device="cpu"):
    if name == "chexbert":
        return CheXbertLabeler(checkpoint, tokenizer=tokenizer, device=device)
    return RuleBasedLabeler()


@torch.no_grad()
def generate_predictions(
    model, processor, dataloader, accelerator: Accelerator, generation_kwargs: dict
) -> list[dict]:
    """Generate for every batch; gather across processes (the last batch's padding duplicates dropped)."""
    rows = []
    unwrapped = accelerator.unwrap_model(model)
    for batch in tqdm(dataloader, desc="generate", disable=not accelerator.is_local_main_process):
        metadata = {key: batch.pop(key) for key in GENERATION_METADATA_KEYS}
        # memory_embeds is None when the data set has no retrieval features: the model's own index serves.
        output = unwrapped.generate(**batch, return_dict_in_generate=True, **generation_kwargs)
        reports = processor.batch_decode(output.sequences)
        states = output.findings.states.tolist()
        probabilities = output.findings.probabilities.tolist()
        local = [
            {"id": example_id, "reference": reference, "reference_labels": labels, "generated": report,
             "predicted_states": state_row, "predicted_probabilities": probability_row}
            for example_id, reference, labels, report, state_row, probability_row in zip(
                metadata["ids"], metadata["reports"], metadata["findings"], reports, states, probabilities
            )
        ]  # fmt: skip
        rows.extend(accelerator.gather_for_metrics(local, use_gather_object=True))
    return rows


def score_predictions(rows: list[dict], labeler, labeler_name: str, bootstrap: int = 0, meteor: bool = True) -> dict:
    """NLG, labeler-based CE and classifier-findings CE of the generated reports."""
    generated = [row["generated"] for row in rows]
    references = [row["reference"] for row in rows]
    results = compute_nlg_metrics(generated, references, meteor=meteor)
    generated_labels = labeler.label(generated)
    reference_labels = labeler.label(references)
    for row, labels in zip(rows, generated_labels):
        row["generated_labels"] = labels
    results.update(compute_ce_metrics(generated_labels, reference_labels, bootstrap=bootstrap))

    labelled = [row for row in rows if row["reference_labels"] is not None]
    if labelled:
        findings = compute_ce_metrics(
            [row["predicted_states"][:NUM_CHEXPERT] for row in labelled],
            [row["reference_labels"][:NUM_CHEXPERT] for row in labelled],
        )
        results.update({f"findings_{key}": value for key, value in findings.items()})
    results.update(labeler=LABELER_NAMES[labeler_name], convention=CE_CONVENTION, num_samples=len(rows))
    return results


def write_predictions(rows: list[dict], processor, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            record = {
                "id": row["id"],
                "reference": row["reference"],
                "generated": row["generated"],
                "predicted_findings": processor.findings_to_dict(
                    row["predicted_states"], row["predicted_probabilities"]
                ),
            }
            file.write(json.dumps(record) + "\n")


def evaluate_split(
    model,
    processor,
    dataset,
    collator,
    accelerator: Accelerator | None = None,
    batch_size: int = 8,
    generation_kwargs: dict | None = None,
    labeler=None,
    labeler_name: str = "rule",
    output_dir: str | Path | None = None,
    max_samples: int | None = None,
    num_workers: int = 0,
    bootstrap: int = 0,
    meteor: bool = True,
) -> dict:
    """Generate reports for `dataset` (a split of `load_report_dataset`) and score them.

    `collator` must be a `KifDataCollator(..., for_generation=True)`. Returns the metrics; with `output_dir`, also
    writes `predictions.jsonl` there (main process only).
    """
    accelerator = accelerator or Accelerator()
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    dataloader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=num_workers)
    dataloader = accelerator.prepare(dataloader)
    was_training = model.training
    model.eval()
    rows = generate_predictions(model, processor, dataloader, accelerator, generation_kwargs or {})
    model.train(was_training)
    results = score_predictions(rows, labeler or RuleBasedLabeler(), labeler_name, bootstrap=bootstrap, meteor=meteor)
    if output_dir is not None and accelerator.is_main_process:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        write_predictions(rows, processor, Path(output_dir) / PREDICTIONS_FILE)
    return results


def format_results_table(results: dict[str, dict]) -> str:
    """A plain-text table: one column per run (e.g. baseline / phase1 / round1), one row per metric."""
    runs = list(results)
    keys = [key for key in TABLE_KEYS if any(key in results[run] for run in runs)]
    width = max(len(key) for key in keys) + 2
    lines = ["metric".ljust(width) + "".join(run.rjust(12) for run in runs)]
    for key in keys:
        cells = "".join(
            (f"{results[run][key]:.4f}" if isinstance(results[run].get(key), float) else "-").rjust(12) for run in runs
        )
        lines.append(key.ljust(width) + cells)
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator()
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)

    # 1. Model, processor and labeler.
    model, processor = load_model_and_processor(args.model, args.processor, args.trust_remote_code)
    model.to(accelerator.device)
    labeler = load_labeler(args.labeler, args.chexbert_checkpoint, args.chexbert_tokenizer, accelerator.device)

    # 2. Data: the requested split, with the data set's retrieved memory when its features are given.
    splits = load_report_dataset(
        args.annotation_file, args.image_dir, dataset=args.dataset, clip_features_file=args.clip_features_file
    )
    if args.split not in splits:
        raise ValueError(f"{args.annotation_file} has no {args.split!r} split (it has {sorted(splits)}).")
    memory_features = load_features(args.clip_features_file) if args.clip_features_file else None
    collator = KifDataCollator(
        processor, memory_features, num_retrieved_reports=model.config.num_retrieved_reports, for_generation=True
    )

    # 3. Generate and score.
    results = evaluate_split(
        model, processor, splits[args.split], collator, accelerator=accelerator, batch_size=args.batch_size,
        generation_kwargs=generation_overrides(args), labeler=labeler, labeler_name=args.labeler,
        output_dir=args.output_dir, max_samples=args.max_samples, num_workers=args.num_workers,
        bootstrap=args.bootstrap, meteor=not args.no_meteor,
    )  # fmt: skip
    results.update(model=args.model, split=args.split)

    # 4. Save and report.
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        print(format_results_table({args.split: results}))
        print(f"Labeler: {results['labeler']}. CE convention: {results['convention']}.")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
