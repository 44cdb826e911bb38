"""Model card and Hub upload for a saved KIF-ISD model directory.

    python hub_kif.py card OUTPUT_DIR [--repo_id user/kif-isd] [--license apache-2.0]   # (re)writes OUTPUT_DIR/README.md
    python hub_kif.py push OUTPUT_DIR REPO_ID [--private] [--token hf_...] [--create_pr]

OUTPUT_DIR is a saved model directory (`save_pretrained` of the model and its processor), or a run_train.py output
directory, whose `final/` holds the model and whose top level holds the run's JSON files. The card is filled from
`config.json` (architecture), `all_results.json` from run_eval.py or run_train.py (flat, or nested per run such as
`{"baseline": {...}, "phase1": {...}, "round1": {...}}`: the `final` run, else the last one, goes into the
model-index; all runs into the table) and `training_args.json` (hyper-parameters, phases, rounds, dataset). `push`
uploads only what loading needs - weights, config, generation config, processor and tokenizer files, the custom code,
the card and the result/argument JSONs - never checkpoints, predictions, logs or optimizer states.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData


TEMPLATE_PATH = Path(__file__).resolve().parent / "model_cards" / "README_TEMPLATE.md"
CARD_FILE = "README.md"
RESULTS_FILE = "all_results.json"
TRAINING_ARGS_FILE = "training_args.json"
RUN_FILES = (RESULTS_FILE, TRAINING_ARGS_FILE)
FINAL_MODEL_DIR = "final"  # run_train.py saves the model to publish here
# Training arguments that name local files or folders: not hyper-parameters, and not for a public card.
LOCAL_PATH_ARG_SUFFIXES = ("_dir", "_file", "_path", "_checkpoint")
DEFAULT_LICENSE = "apache-2.0"
TAGS = ["radiology", "chest-x-ray", "medical-report-generation", "knowledge-distillation", "kif-isd"]
PIPELINE_TAG = "image-to-text"
TASK_NAME = "Chest X-ray report generation"
FINAL_RUN = "final"
UNSPECIFIED_DATASET = "unspecified"
SYNTHETIC_DATASET = "synthetic"
DATASET_NAMES = {"mimic_cxr": "MIMIC-CXR", "iu_xray": "IU X-Ray", SYNTHETIC_DATASET: "synthetic chest X-rays"}
# ResNet depths of the named torchvision/transformers variants, to describe the image encoder.
RESNET_NAMES = {(3, 4, 6, 3): "ResNet-50", (3, 4, 23, 3): "ResNet-101", (3, 8, 36, 3): "ResNet-152"}

# Headline metrics (the model-index) in table order, with display names. CE metrics depend on a labeler and a
# convention, which go into their `args`.
NLG_METRICS = {
    "BLEU_1": "BLEU-1", "BLEU_2": "BLEU-2", "BLEU_3": "BLEU-3", "BLEU_4": "BLEU-4",
    "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr",
}  # fmt: skip
CE_METRICS = {
    "ce_example_precision": "CE precision (example-based)",
    "ce_example_recall": "CE recall (example-based)",
    "ce_example_f1": "CE F1 (example-based)",
    "ce_micro_f1_14": "CE micro-F1, 14 observations",
    "ce_macro_f1_14": "CE macro-F1, 14 observations",
    "ce_micro_f1_5": "CE micro-F1, 5 observations",
    "ce_macro_f1_5": "CE macro-F1, 5 observations",
}
HEADLINE_METRICS = {**NLG_METRICS, **CE_METRICS}
CE_CONTEXT_KEYS = ("labeler", "convention")

# What a saved model directory must hold to load anywhere with `trust_remote_code=True`.
REQUIRED_FILES = (
    "config.json", "generation_config.json", "processor_config.json", "tokenizer_config.json",
    "configuration_kif.py", "modeling_kif.py", "processing_kif.py",
)  # fmt: skip
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_VOCABULARY_FILES = ("tokenizer.json", "vocab.txt")  # at least one
OPTIONAL_FILES = ("special_tokens_map.json", "added_tokens.json", CARD_FILE, RESULTS_FILE, TRAINING_ARGS_FILE)
REQUIRED_AUTO_MAP = ("AutoConfig", "AutoModel")


# ---------------------------------------------------------------------------------------------------------------------
# Reading the output directory
# ---------------------------------------------------------------------------------------------------------------------
def model_directory(output_dir: Path) -> Path:
    """The saved model of `output_dir`: the directory itself, or run_train.py's `final/`."""
    for candidate in (output_dir, output_dir / FINAL_MODEL_DIR):
        if (candidate / "config.json").is_file():
            return candidate
    raise ValueError(
        f"{output_dir} holds no saved model: neither it nor {output_dir / FINAL_MODEL_DIR} has a config.json "
        "(save the model there with save_pretrained)."
    )


def run_file(output_dir: Path, name: str) -> Path | None:
    """A run's JSON file: beside the model, else at the top of a run_train.py output directory."""
    return next((path for path in (model_directory(output_dir) / name, output_dir / name) if path.is_file()), None)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def split_runs(results: dict) -> dict[str, dict]:
    """Results per run. Nested files (`{"phase1": {...}, "round1": {...}}`) give their runs, with top-level scalars
    (e.g. a shared `labeler`) as defaults; a flat file is a single run named after its split."""
    runs = {name: value for name, value in results.items() if isinstance(value, dict)}
    if not runs:
        return {results.get("split", "evaluation"): results}
    shared = {key: value for key, value in results.items() if not isinstance(value, dict)}
    return {name: {**shared, **values} for name, values in runs.items()}


def final_run_name(runs: dict[str, dict]) -> str:
    """The run that describes the published weights: `final` if present, else the last one written."""
    return FINAL_RUN if FINAL_RUN in runs else list(runs)[-1]


def results_table(runs: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """(metric, one formatted value per run) rows: headline metrics first, then every other numeric entry."""
    numeric_keys = [key for values in runs.values() for key, value in values.items() if _is_number(value)]
    ordered = [key for key in HEADLINE_METRICS if key in numeric_keys]
    ordered += [key for key in dict.fromkeys(numeric_keys) if key not in HEADLINE_METRICS]
    return [
        (HEADLINE_METRICS.get(key, key), [_format(values.get(key)) for values in runs.values()]) for key in ordered
    ]


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value) if _is_number(value) else "-"


def training_rows(training_args: dict) -> list[tuple[str, str]]:
    """Hyper-parameters as (name, value) rows; nested sections (e.g. per phase) are flattened with dots. Unset
    arguments and local paths are left out."""
    rows = []
    for key, value in training_args.items():
        if value is None or key.endswith(LOCAL_PATH_ARG_SUFFIXES):
            continue
        if isinstance(value, dict):
            rows += [(f"{key}.{name}", text) for name, text in training_rows(value)]
        else:
            rows.append((key, json.dumps(value) if isinstance(value, (list, bool)) else str(value)))
    return rows


def describe_architecture(config: dict) -> dict[str, str]:
    vision, text = config["vision_config"], config["text_config"]
    depths = tuple(vision["depths"])
    return {
        "vision": RESNET_NAMES.get(depths, f"ResNet (bottleneck depths {list(depths)})"),
        "vision_width": str(vision["hidden_sizes"][-1]),
        "knowledge_nodes": str(len(config["knowledge_node_names"])),
        "knowledge_layers": str(config["knowledge_num_layers"]),
        "fusion_layers": str(config["fusion_num_layers"]),
        "decoder_layers": str(text["num_hidden_layers"]),
        "decoder_width": str(text["hidden_size"]),
        "vocab_size": str(text["vocab_size"]),
        "num_observations": str(len(config["observations"])),
        "num_retrieved_reports": str(config["num_retrieved_reports"]),
    }


def eval_results(run: dict, dataset: str, dataset_name: str) -> list[EvalResult]:
    """The headline metrics of one run as model-index entries; CE metrics carry their labeler and convention."""
    ce_context = {key: run[key] for key in CE_CONTEXT_KEYS if key in run}
    return [
        EvalResult(
            task_type=PIPELINE_TAG,
            task_name=TASK_NAME,
            dataset_type=dataset,
            dataset_name=dataset_name,
            dataset_split=run.get("split"),
            metric_type=key.lower(),
            metric_name=name,
            metric_value=run[key],
            metric_args=ce_context if key in CE_METRICS and ce_context else None,
        )
        for key, name in HEADLINE_METRICS.items()
        if _is_number(run.get(key))
    ]


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


# ---------------------------------------------------------------------------------------------------------------------
# Card
# ---------------------------------------------------------------------------------------------------------------------
def make_model_card(output_dir: str | Path, repo_id: str | None = None, license: str = DEFAULT_LICENSE) -> ModelCard:
    """Build the model card of a saved model directory (see the module docstring for the files it reads).

    Args:
        output_dir: A saved model directory, or a run_train.py output directory (model in `final/`).
        repo_id: Hub id used in the card's name and code snippet (default: the run's directory name).
        license: License identifier for the metadata.
    """
    output_dir = Path(output_dir)
    config = _read_json(model_directory(output_dir) / "config.json")
    results_path, training_path = (run_file(output_dir, name) for name in RUN_FILES)
    results = _read_json(results_path) if results_path else {}
    training_args = _read_json(training_path) if training_path else {}

    repo_id = repo_id or output_dir.resolve().name
    model_name = repo_id.split("/")[-1]
    dataset = training_args.get("dataset") or results.get("dataset") or UNSPECIFIED_DATASET
    dataset_name = DATASET_NAMES.get(dataset, dataset)
    synthetic = dataset == SYNTHETIC_DATASET
    runs = split_runs(results) if results else {}
    final_run = runs[final_run_name(runs)] if runs else {}

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        license=license,
        language="en",
        tags=TAGS,
        datasets=None if synthetic or dataset == UNSPECIFIED_DATASET else [dataset],
        base_model=_as_list(training_args.get("base_model")) or None,
        model_name=model_name,
        eval_results=eval_results(final_run, dataset, dataset_name) or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        repo_id=repo_id,
        architecture=describe_architecture(config),
        memory_index=config.get("report_memory_size", 0) > 0,
        dataset_name=dataset_name,
        synthetic=synthetic,
        training=training_rows(training_args),
        rounds=training_args.get("rounds"),
        result_runs=list(runs),
        result_rows=results_table(runs),
        final_run=final_run_name(runs) if runs else None,
        labeler=final_run.get("labeler"),
        convention=final_run.get("convention"),
    )


def write_model_card(output_dir: str | Path, repo_id: str | None = None, license: str = DEFAULT_LICENSE) -> Path:
    """Write the card as README.md beside the model's weights."""
    path = model_directory(Path(output_dir)) / CARD_FILE
    make_model_card(output_dir, repo_id=repo_id, license=license).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Upload
# ---------------------------------------------------------------------------------------------------------------------
def _weight_files(output_dir: Path) -> list[str]:
    """The single safetensors file, or a shard index with every shard it names."""
    if (output_dir / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE]
    index_path = output_dir / WEIGHTS_INDEX_FILE
    if index_path.is_file():
        return [WEIGHTS_INDEX_FILE, *sorted(set(_read_json(index_path)["weight_map"].values()))]
    return [WEIGHTS_FILE]


def files_to_upload(output_dir: str | Path) -> list[str]:
    """Every file that loading the model and processor needs, plus the card and result files that exist.

    Raises a ValueError that lists what is missing when the directory is incomplete.
    """
    output_dir = Path(output_dir)
    vocabulary = [name for name in TOKENIZER_VOCABULARY_FILES if (output_dir / name).is_file()]
    needed = [*_weight_files(output_dir), *REQUIRED_FILES]
    missing = [name for name in needed if not (output_dir / name).is_file()]
    if not vocabulary:
        missing.append(" or ".join(TOKENIZER_VOCABULARY_FILES))
    if missing:
        raise ValueError(
            f"{output_dir} is not a complete model directory; missing: {', '.join(missing)}. Save the model and the "
            "processor there with save_pretrained."
        )
    auto_map = _read_json(output_dir / "config.json").get("auto_map", {})
    absent = [name for name in REQUIRED_AUTO_MAP if name not in auto_map]
    if absent:
        raise ValueError(
            f"{output_dir / 'config.json'} has no auto_map entry for {absent}: it would not load with "
            "trust_remote_code. Save it with KifForConditionalGeneration.save_pretrained."
        )
    optional = [name for name in OPTIONAL_FILES if (output_dir / name).is_file()]
    return [*needed, *vocabulary, *optional]


def push_output_dir(
    output_dir: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload KIF-ISD model",
    create_pr: bool = False,
    api: HfApi | None = None,
    license: str = DEFAULT_LICENSE,
):
    """Refresh the model card, check the directory is complete and upload exactly the files loading needs.

    Returns the `CommitInfo` of the upload (its `.commit_url`, or `.pr_url` with `create_pr=True`).
    """
    output_dir = Path(output_dir)
    model_dir = model_directory(output_dir)
    files_to_upload(model_dir)  # fail before writing anything when the directory is incomplete
    write_model_card(output_dir, repo_id=repo_id, license=license)
    for name in RUN_FILES:  # a run's results and arguments travel with the model they describe
        source = run_file(output_dir, name)
        if source and source.parent != model_dir:
            shutil.copy2(source, model_dir / name)
    api = api or HfApi(token=token)
    api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=model_dir,
        allow_patterns=files_to_upload(model_dir),
        commit_message=commit_message,
        create_pr=create_pr,
        token=token,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    card = commands.add_parser("card", help="Write OUTPUT_DIR/README.md.")
    card.add_argument("output_dir")
    card.add_argument("--repo_id", help="Hub id to show in the card (default: the directory's name).")
    push = commands.add_parser("push", help="Write the card and upload the model directory to the Hub.")
    push.add_argument("output_dir")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true", help="Create the repository as private.")
    push.add_argument("--token", help="Hub token (default: the logged-in user's).")
    push.add_argument("--create_pr", action="store_true", help="Open a pull request instead of committing to main.")
    push.add_argument("--commit_message", default="Upload KIF-ISD model")
    for command in (card, push):
        command.add_argument("--license", default=DEFAULT_LICENSE)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "card":
        path = write_model_card(args.output_dir, repo_id=args.repo_id, license=args.license)
        print(f"Wrote {path}")
        return path
    commit = push_output_dir(
        args.output_dir, args.repo_id, token=args.token, private=args.private or None,
        commit_message=args.commit_message, create_pr=args.create_pr, license=args.license,
    )  # fmt: skip
    print(f"Uploaded {args.output_dir} to {args.repo_id}: {commit}")
    return commit


if __name__ == "__main__":
    main(sys.argv[1:])
