"""Train KIF-ISD with 🤗 Accelerate: phase 1 (the base model), then Information Self-Distillation rounds.

    python run_train.py                          # embedded default: synthetic data, tiny model, a few minutes on a CPU
    accelerate launch run_train.py \\
        --annotation_file mimic/annotation.json --image_dir mimic/images --dataset mimic_cxr \\
        --clip_features_file mimic/clip_text_features.json --base_probs_file mimic/base_probs.json \\
        --disease_words_file mimic/disease_word_features.json --processor kif-processor --rounds 1 \\
        --output_dir outputs/kif-mimic

Phase 1 trains the base model with L_lm + 4 L_cls. Each distillation round trains a student (fresh, as in the
original, or a copy of its teacher) against a frozen teacher - the best model of the previous phase, or `--teacher` -
with L_lm + 4 L_cls + 0.01 L_kd + 1 L_rel (`distillation_kif`). After every epoch the model generates reports for the
validation split: the validation metrics select the best model (never the test split), and the classifier's positive
probabilities update the logit-adjustment priors `base_probs`.

Outputs in `--output_dir`:

    training_args.json
    <phase>/train_log.jsonl           losses and learning rate per optimiser step (phase: phase1, round1, ...)
    <phase>/eval_log.jsonl            validation metrics per epoch
    <phase>/step_N, <phase>/epoch_N   `accelerator.save_state` checkpoints (`--resume_from_checkpoint latest`)
    <phase>/best                      `save_pretrained` of the phase's best model, with its processor and the report-memory
                                      index of the training set (it generates from a bare image); `best/adapter` with LoRA
    <phase>/test/predictions.jsonl    its generated test reports
    final                             the best model of the last phase
    all_results.json                  test metrics of the trivial baseline and of every phase's best model

Without `--annotation_file` the embedded default runs: the synthetic data set of `data_kif` (generated if absent),
the tiny configuration `configs/kif-tiny`, phase 1 and one distillation round with the `synthetic-demo`
hyper-parameters, then a results table against a trivial baseline.
"""

import argparse
import copy
import ctypes
import json
import logging
import math
import platform
import re
import shutil
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import GenerationConfig

from configuration_kif import CHEXPERT_OBSERVATIONS, FINDING_STATES, GENERATION_PRESETS, KifConfig
from data_kif import (
    ANNOTATION_FILE,
    BASE_PROBS_FILE,
    CLIP_FEATURES_FILE,
    DISEASE_WORD_FEATURES_FILE,
    IMAGE_DIR_NAME,
    KifDataCollator,
    ensure_synthetic_dataset,
    load_base_probs,
    load_features,
    load_report_dataset,
)
from distillation_kif import kd_loss, relational_loss
from metrics_kif import CE_METRIC_KEYS, NLG_METRIC_KEYS
from modeling_kif import KifForConditionalGeneration
from processing_kif import KifProcessor
from run_eval import (
    LABELER_NAMES,
    RESULTS_FILE,
    evaluate_split,
    format_results_table,
    generate_predictions,
    load_labeler,
    score_predictions,
)


logger = get_logger(__name__)

REPO_DIR = Path(__file__).resolve().parent
TINY_CONFIG_DIR = REPO_DIR / "configs" / "kif-tiny"
DEFAULT_OUTPUT_DIR = "outputs/kif-default"
TRACKER_PROJECT = "kif_isd"

# Layout of the output folder.
PHASE1 = "phase1"
ROUND_PREFIX = "round"
BEST_DIR = "best"
FINAL_DIR = "final"
ADAPTER_DIR = "adapter"
TEST_DIR = "test"
ARGS_FILE = "training_args.json"
TRAIN_LOG_FILE = "train_log.jsonl"
EVAL_LOG_FILE = "eval_log.jsonl"
PHASE_RESULTS_FILE = "phase_results.json"  # written last: its presence marks a completed phase
PROGRESS_FILE = "training_progress.json"  # inside each checkpoint
CHECKPOINT_NAME = re.compile(r"^(step|epoch)_(\d+)$")
STAGING_SUFFIX = ".tmp"  # a folder being written; renamed into place when complete
REPLACED_SUFFIX = ".old"

NUM_CHEXPERT = len(CHEXPERT_OBSERVATIONS)
POSITIVE = FINDING_STATES.index("positive")
NEGATIVE = FINDING_STATES.index("negative")
BLANK = FINDING_STATES.index("blank")
NO_FINDING = CHEXPERT_OBSERVATIONS.index("No Finding")
SELECTABLE_METRICS = (*NLG_METRIC_KEYS, *CE_METRIC_KEYS, *(f"findings_{key}" for key in CE_METRIC_KEYS))

# Hyper-parameters that depend on the run. `paper`: the KIF-ISD / PromptMRG recipe, the default when training data is
# given. `synthetic-demo`: the embedded default - the tiny model learns the small synthetic data set in minutes on a
# CPU only with a much higher learning rate, a short warm-up and more epochs.
PRESETS = {
    "paper": {
        "model_config": None,  # the full-size KifConfig()
        "processor": None,
        "num_train_epochs": 10,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 16,
        "learning_rate": 5e-5,
        "warmup_steps": 2000,
    },
    "synthetic-demo": {
        "model_config": str(TINY_CONFIG_DIR),
        "processor": str(TINY_CONFIG_DIR),
        "num_train_epochs": 40,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "learning_rate": 4e-3,
        "warmup_steps": 30,
    },
}
# The paper's floor and warm-up start relative to the peak (5e-6 and 5e-7 for 5e-5), the defaults for any peak.
MIN_LEARNING_RATE_RATIO = 0.1
WARMUP_START_LEARNING_RATE_RATIO = 0.01
TRAINING_DATA_PRESET = "paper"
EMBEDDED_DEFAULT_PRESET = "synthetic-demo"
# glibc malloc settings for CPU training (mallopt parameter number -> value). By default glibc hands every freed
# block of 128 KiB-32 MiB back to the kernel, so each step re-faults gigabytes of fresh zeroed pages: on a 2-core
# CPU a quarter of the full-size step was kernel time (bench/bench_kif.py). Keeping freed memory in the heap, as
# jemalloc and tcmalloc do, takes that away.
GLIBC_MALLOPT = {
    -3: 32 * 2**20,  # M_MMAP_THRESHOLD: blocks below 32 MiB (glibc's maximum) come from the heap
    -1: 2**31 - 1,  # M_TRIM_THRESHOLD: never give the heap's top back
    -2: 2**30,  # M_TOP_PAD: grow the heap in 1 GiB steps
}


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite: training stops before the update, keeping the last good checkpoint."""


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------
def _preset_help(name: str) -> str:
    return "; ".join(f"{preset}: {values[name]}" for preset, values in PRESETS.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help=f"Hyper-parameter preset (default: {TRAINING_DATA_PRESET} with --annotation_file, else "
        f"{EMBEDDED_DEFAULT_PRESET}). Explicit arguments override it.",
    )

    data = parser.add_argument_group("data (none given: the embedded synthetic data set)")
    data.add_argument("--annotation_file", help="R2Gen/PromptMRG annotation.json.")
    data.add_argument("--image_dir", help="Folder the annotation's image paths are relative to.")
    data.add_argument("--dataset", choices=["mimic_cxr", "iu_xray", "synthetic"], default="mimic_cxr",
                      help="Report cleaning and generation-length preset.")  # fmt: skip
    data.add_argument("--clip_features_file", help="clip_text_features.json: the retrieved-report memory (required).")
    data.add_argument("--base_probs_file", help="base_probs.json: initial logit-adjustment priors (default: 1).")
    data.add_argument(
        "--disease_words_file", help="disease_word_features.json, copied into model.disease_word_embeds."
    )
    data.add_argument("--synthetic_data_dir",
                      help="Embedded default only: where the synthetic data set is (generated if absent; default: "
                      "data_kif's cache).")  # fmt: skip
    data.add_argument("--max_train_samples", type=int, help="Train on the first N training examples (quick runs).")
    data.add_argument("--max_eval_samples", type=int, help="Validate and test on the first N examples (quick runs).")
    data.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes.")

    model = parser.add_argument_group("model")
    model.add_argument("--model_config", help=f"KifConfig directory or Hub id ({_preset_help('model_config')}).")
    model.add_argument("--init_from", help="Saved model to start phase 1 (and fresh students) from.")
    model.add_argument("--processor", help=f"KifProcessor directory or Hub id ({_preset_help('processor')}; "
                       "else --init_from or --model_config).")  # fmt: skip
    model.add_argument("--rounds", type=int, default=1, help="Self-distillation rounds after phase 1.")
    model.add_argument("--teacher", help="Saved model to distil from: skips phase 1 (round 1's teacher).")
    model.add_argument(
        "--teacher_dtype",
        choices=["float32", "bfloat16"],
        default="bfloat16",
        help="Weights of the frozen teacher. It only provides soft targets: bfloat16 halves its memory "
        "and, on GPUs and CPUs with bf16 units, its time.",
    )
    model.add_argument("--student_init", choices=["fresh", "teacher"], default="fresh",
                       help="Student initialisation: 'fresh' as phase 1 (the original), or a copy of the teacher.")  # fmt: skip

    losses = parser.add_argument_group("losses (paper defaults)")
    losses.add_argument("--cls_weight", type=float, default=4.0, help="Weight of the classification loss.")
    losses.add_argument("--kd_weight", type=float, default=0.01, help="Weight of the KD loss (rounds).")
    losses.add_argument("--rel_weight", type=float, default=1.0, help="Weight of the relational loss (rounds).")
    losses.add_argument("--kd_temperature", type=float, default=4.0, help="KD softening temperature T.")

    optim = parser.add_argument_group("optimisation (preset-dependent defaults are listed per preset)")
    optim.add_argument("--num_train_epochs", type=int, help=f"Epochs per phase ({_preset_help('num_train_epochs')}).")
    optim.add_argument("--max_train_steps", type=int,
                       help="Stop each phase after this many optimiser steps (the schedule still spans the epochs).")  # fmt: skip
    optim.add_argument("--per_device_train_batch_size", type=int,
                       help=f"Training batch per process ({_preset_help('per_device_train_batch_size')}).")  # fmt: skip
    optim.add_argument("--per_device_eval_batch_size", type=int,
                       help=f"Generation batch per process ({_preset_help('per_device_eval_batch_size')}).")  # fmt: skip
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--learning_rate", type=float, help=f"Peak learning rate ({_preset_help('learning_rate')}).")
    optim.add_argument("--min_learning_rate", type=float,
                       help=f"Floor of the per-epoch cosine (default: {MIN_LEARNING_RATE_RATIO} x --learning_rate).")  # fmt: skip
    optim.add_argument("--warmup_start_learning_rate", type=float,
                       help="Learning rate of the first step (default: "
                       f"{WARMUP_START_LEARNING_RATE_RATIO} x --learning_rate).")  # fmt: skip
    optim.add_argument("--warmup_steps", type=int,
                       help=f"Linear warm-up in optimiser steps, within the first epoch ({_preset_help('warmup_steps')}).")  # fmt: skip
    optim.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay of weight matrices.")
    optim.add_argument("--adam_betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("BETA1", "BETA2"))
    optim.add_argument("--fused_adamw", action=argparse.BooleanOptionalAction, default=True,
                       help="torch's fused AdamW kernel (default); --no-fused_adamw for devices without one.")  # fmt: skip
    optim.add_argument("--tune_cpu_allocator", action=argparse.BooleanOptionalAction, default=True,
                       help="On a CPU, keep freed memory in glibc's heap (GLIBC_MALLOPT) instead of re-faulting it "
                            "every step: full-size steps 1.2-1.4x faster on a 2-core CPU, about 7%% more resident memory.")  # fmt: skip
    optim.add_argument("--max_grad_value", type=float, default=0.1, help="Clip each gradient element to +-this.")
    optim.add_argument("--seed", type=int, default=42)

    lora = parser.add_argument_group("LoRA (peft)")
    lora.add_argument("--lora_r", type=int, default=0, help="LoRA rank; 0 trains all weights.")
    lora.add_argument("--lora_alpha", type=float, default=16.0)
    lora.add_argument("--lora_dropout", type=float, default=0.05)
    lora.add_argument("--lora_target_modules", nargs="+", default=["query", "value"],
                      help="Module names to adapt ('query value' also hits the decoder's cross-attention).")  # fmt: skip
    lora.add_argument("--lora_modules_to_save", nargs="+", help="Modules trained in full beside the adapters.")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    run.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="Default: the accelerate config.")
    run.add_argument("--report_to", default="tensorboard", help="Trackers: tensorboard, all, none, ...")
    run.add_argument("--checkpointing_steps", default="epoch",
                     help="Save the training state every N optimiser steps, or 'epoch'.")  # fmt: skip
    run.add_argument("--checkpoints_total_limit", type=int, default=2,
                     help="Checkpoints kept per phase (oldest removed first); 0 keeps all.")  # fmt: skip
    run.add_argument(
        "--resume_from_checkpoint", help="A checkpoint folder (<output_dir>/<phase>/step_N), or 'latest'."
    )

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--selection_metric", default="ce_example_f1+BLEU_4",
                            help="Validation metric (or '+'-joined sum) that selects the best model.")  # fmt: skip
    evaluation.add_argument("--labeler", choices=sorted(LABELER_NAMES), default="rule")
    evaluation.add_argument("--chexbert_checkpoint", help="chexbert.pth for --labeler chexbert.")
    evaluation.add_argument("--chexbert_tokenizer", default="bert-base-uncased")
    evaluation.add_argument("--no_test_eval", action="store_true", help="Skip the test-split evaluation at the end.")
    hub = parser.add_argument_group("Hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the final model, processor and card.")
    hub.add_argument("--hub_model_id", help="Repository id (user/name) for --push_to_hub.")
    hub.add_argument("--hub_private", action="store_true", help="Create the repository as private.")
    hub.add_argument("--hub_token", help="Token (default: the logged-in user's).")
    evaluation.add_argument("--no_meteor", action="store_true", help="Skip METEOR on the test split (Java).")
    evaluation.add_argument("--num_beams", type=int, help="Override the saved generation config.")
    evaluation.add_argument("--max_new_tokens", type=int, help="Override the saved generation config.")
    evaluation.add_argument("--min_new_tokens", type=int, help="Override the saved generation config.")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    preset = known.preset or (TRAINING_DATA_PRESET if known.annotation_file else EMBEDDED_DEFAULT_PRESET)
    parser.set_defaults(preset=preset, **PRESETS[preset])
    args = parser.parse_args(argv)
    if args.min_learning_rate is None:
        args.min_learning_rate = MIN_LEARNING_RATE_RATIO * args.learning_rate
    if args.warmup_start_learning_rate is None:
        args.warmup_start_learning_rate = WARMUP_START_LEARNING_RATE_RATIO * args.learning_rate
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id USER/NAME.")
    """ValueErrors for arguments that cannot work, before any data or model is loaded."""
    if args.annotation_file is not None:
        missing = [name for name in ("image_dir", "clip_features_file") if getattr(args, name) is None]
        if missing:
            raise ValueError(
                f"--annotation_file needs --{' and --'.join(missing)}: KIF-ISD conditions on retrieved training "
                "reports (build them with `python data_kif.py build-memory`)."
            )
    elif any(
        getattr(args, name) for name in ("image_dir", "clip_features_file", "base_probs_file", "disease_words_file")
    ):
        raise ValueError(
            "Data files were given without --annotation_file; pass it too, or none for the embedded data."
        )
    positive = {
        "num_train_epochs": args.num_train_epochs,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "per_device_eval_batch_size": args.per_device_eval_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate,
        "kd_temperature": args.kd_temperature,
        "max_grad_value": args.max_grad_value,
        "max_train_steps": args.max_train_steps if args.max_train_steps is not None else 1,
        "max_train_samples": args.max_train_samples if args.max_train_samples is not None else 1,
        "max_eval_samples": args.max_eval_samples if args.max_eval_samples is not None else 1,
    }
    not_positive = [f"--{name} {value}" for name, value in positive.items() if not value > 0]
    if not_positive:
        raise ValueError(f"These arguments must be positive: {', '.join(not_positive)}.")
    negative = {name: getattr(args, name) for name in ("cls_weight", "kd_weight", "rel_weight", "weight_decay",
                                                         "warmup_steps", "rounds", "lora_r", "num_workers",
                                                         "checkpoints_total_limit")}  # fmt: skip
    negative = [f"--{name} {value}" for name, value in negative.items() if value < 0]
    if negative:
        raise ValueError(f"These arguments cannot be negative: {', '.join(negative)}.")
    if (
        not 0 < args.min_learning_rate <= args.learning_rate
        or not 0 < args.warmup_start_learning_rate <= args.learning_rate
    ):
        raise ValueError(
            f"Need 0 < --min_learning_rate ({args.min_learning_rate}) and 0 < --warmup_start_learning_rate "
            f"({args.warmup_start_learning_rate}), both <= --learning_rate ({args.learning_rate})."
        )
    if not (
        args.checkpointing_steps == "epoch"
        or (args.checkpointing_steps.isdigit() and int(args.checkpointing_steps) > 0)
    ):
        raise ValueError(
            f"--checkpointing_steps must be a positive number of steps or 'epoch', got {args.checkpointing_steps!r}."
        )
    if args.teacher is not None and args.rounds == 0:
        raise ValueError("--teacher needs at least one distillation round (--rounds >= 1).")
    if args.teacher is not None and not (Path(args.teacher) / "config.json").is_file():
        raise ValueError(f"--teacher {args.teacher} is not a saved model folder (no config.json).")
    unknown = [key for key in selection_keys(args.selection_metric) if key not in SELECTABLE_METRICS]
    if unknown:
        raise ValueError(f"--selection_metric uses unknown metrics {unknown}; choose from {list(SELECTABLE_METRICS)}.")
    if args.labeler == "chexbert" and not args.chexbert_checkpoint:
        raise ValueError("--labeler chexbert needs --chexbert_checkpoint (the Stanford chexbert.pth).")


def selection_keys(selection_metric: str) -> list[str]:
    return [key.strip() for key in selection_metric.split("+")]


def phase_names(args: argparse.Namespace) -> list[str]:
    """`phase1` (unless a --teacher replaces it), then `round1` .. `roundN`."""
    rounds = [f"{ROUND_PREFIX}{index}" for index in range(1, args.rounds + 1)]
    return rounds if args.teacher is not None else [PHASE1, *rounds]


def generation_overrides(args: argparse.Namespace) -> dict:
    names = ("num_beams", "max_new_tokens", "min_new_tokens")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


# ---------------------------------------------------------------------------------------------------------------------
# Set-up: logging, configuration, processor, data
# ---------------------------------------------------------------------------------------------------------------------
def configure_logging(accelerator: Accelerator) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    # accelerate logs every file of every checkpoint at INFO; one line per checkpoint (ours) is enough.
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def keep_freed_memory_in_heap() -> bool:
    """Apply GLIBC_MALLOPT to this process (and the data-loader workers it forks). Returns False, changing nothing,
    where the C library is not glibc. Written by hand because no library of the field tunes the host allocator:
    PyTorch's CPU performance guide recommends preloading jemalloc or tcmalloc, which a pip install cannot do."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the symbols this process already has, glibc's among them
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in GLIBC_MALLOPT.items())


def warn_about_setup(accelerator: Accelerator) -> None:
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        logger.warning("fp16 mixed precision does nothing on a CPU (training runs in float32); use bf16.")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        logger.warning(
            "DeepSpeed clips gradients by norm (its config's `gradient_clipping`), not by value (--max_grad_value)."
        )


def load_model_config(args: argparse.Namespace) -> KifConfig:
    source = args.init_from or args.model_config
    config = KifConfig.from_pretrained(source) if source else KifConfig()
    config.classification_loss_weight = args.cls_weight
    return config


def load_processor(args: argparse.Namespace, config: KifConfig) -> KifProcessor:
    source = args.processor or args.init_from or args.model_config
    if source is None:
        raise ValueError(
            "The full-size configuration needs --processor: a KifProcessor folder, e.g. bert-base-uncased's tokenizer "
            "with processing_kif.prepare_report_tokenizer, saved with KifProcessor(...).save_pretrained."
        )
    processor = KifProcessor.from_pretrained(source)
    if processor.state_token_ids != list(config.state_token_ids) or (
        processor.tokenizer.bos_token_id != config.text_config.bos_token_id
    ):
        raise ValueError(
            f"The processor from {source} does not match the model configuration: its state tokens have ids "
            f"{processor.state_token_ids} and [DEC] {processor.tokenizer.bos_token_id}, the model expects "
            f"{list(config.state_token_ids)} and {config.text_config.bos_token_id}."
        )
    return processor


@dataclass
class TrainingData:
    splits: datasets.DatasetDict
    memory_features: torch.Tensor  # (training reports, D): the retrieved-report memory
    base_probs: list[float] | None
    disease_words: torch.Tensor | None


def use_embedded_data(args: argparse.Namespace, config: KifConfig) -> None:
    """Point the data arguments at the synthetic data set, generating it (with the model's k and D) if absent."""
    data_dir = ensure_synthetic_dataset(
        args.synthetic_data_dir,
        num_retrieved_reports=config.num_retrieved_reports,
        report_embedding_dim=config.report_embedding_dim,
    )
    args.annotation_file = str(data_dir / ANNOTATION_FILE)
    args.image_dir = str(data_dir / IMAGE_DIR_NAME)
    args.dataset = "synthetic"
    args.clip_features_file = str(data_dir / CLIP_FEATURES_FILE)
    args.base_probs_file = str(data_dir / BASE_PROBS_FILE)
    args.disease_words_file = str(data_dir / DISEASE_WORD_FEATURES_FILE)


def load_training_data(args: argparse.Namespace, config: KifConfig) -> TrainingData:
    if args.annotation_file is None:
        use_embedded_data(args, config)
    memory_features = load_features(args.clip_features_file)
    if memory_features.shape[1] != config.report_embedding_dim:
        raise ValueError(
            f"{args.clip_features_file} holds {memory_features.shape[1]}-wide report features but the model's "
            f"report_embedding_dim is {config.report_embedding_dim}."
        )
    splits = load_report_dataset(
        args.annotation_file, args.image_dir, dataset=args.dataset, clip_features_file=memory_features
    )
    if args.max_train_samples is not None:
        splits["train"] = splits["train"].select(range(min(args.max_train_samples, len(splits["train"]))))
    for split in ("validation", "test"):
        if args.max_eval_samples is not None:
            splits[split] = splits[split].select(range(min(args.max_eval_samples, len(splits[split]))))
    if not len(splits["train"]) or not len(splits["validation"]):
        raise ValueError(
            f"{args.annotation_file} needs training and validation examples (model selection uses validation); "
            f"found {len(splits['train'])} and {len(splits['validation'])}."
        )
    disease_words = None
    if args.disease_words_file:
        disease_words = load_features(args.disease_words_file)
        expected = (config.num_disease_words, config.report_embedding_dim)
        if tuple(disease_words.shape) != expected:
            raise ValueError(
                f"{args.disease_words_file} must hold {expected} features, got {tuple(disease_words.shape)}."
            )
    base_probs = load_base_probs(args.base_probs_file, config.num_observations) if args.base_probs_file else None
    return TrainingData(splits, memory_features, base_probs, disease_words)


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------
def configure_generation(model: KifForConditionalGeneration, args: argparse.Namespace) -> None:
    """Generation settings saved with the model: the data set's length preset (MIMIC-CXR / IU X-Ray), else those of the
    configuration folder (e.g. the tiny model's), then the command line's overrides."""
    settings = {}
    config_dir = Path(args.model_config) if args.model_config and not args.init_from else None
    if args.dataset in GENERATION_PRESETS:
        settings.update(GENERATION_PRESETS[args.dataset])
    elif config_dir is not None and (config_dir / "generation_config.json").is_file():
        saved = GenerationConfig.from_pretrained(config_dir)
        settings.update({name: getattr(saved, name) for name in ("num_beams", "min_new_tokens", "max_new_tokens")})
    settings.update(generation_overrides(args))
    model.generation_config.update(**settings)


def build_initial_model(
    args: argparse.Namespace, config: KifConfig, data: TrainingData
) -> KifForConditionalGeneration:
    """Phase 1's starting point, and a fresh student's: --init_from, else a new random initialisation of the config,
    with the data set's disease-word embeddings and class priors."""
    if args.init_from:
        model = KifForConditionalGeneration.from_pretrained(args.init_from)
        model.config.classification_loss_weight = args.cls_weight
    else:
        model = KifForConditionalGeneration(copy.deepcopy(config))  # models never share (and mutate) one config
    with torch.no_grad():
        if data.disease_words is not None:
            model.disease_word_embeds.copy_(data.disease_words)
        if data.base_probs is not None:
            model.base_probs.copy_(torch.tensor(data.base_probs))
    return model


def build_student(
    args: argparse.Namespace, config: KifConfig, data: TrainingData, teacher_dir: Path | None
) -> KifForConditionalGeneration:
    if teacher_dir is not None and args.student_init == "teacher":
        model = KifForConditionalGeneration.from_pretrained(teacher_dir)
        model.config.classification_loss_weight = args.cls_weight
    else:
        model = build_initial_model(args, config, data)
    configure_generation(model, args)
    if args.lora_r:
        lora_config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=args.lora_target_modules,
            modules_to_save=args.lora_modules_to_save,
        )
        model = get_peft_model(model, lora_config)
    return model


def load_teacher(teacher_dir: Path, accelerator: Accelerator, dtype: str = "float32") -> KifForConditionalGeneration:
    """The frozen teacher: eval mode, no gradients, moved to the device by hand - never `accelerator.prepare`d (DDP
    cannot wrap a model without trainable parameters) and never given to the optimiser."""
    teacher = KifForConditionalGeneration.from_pretrained(teacher_dir, dtype=getattr(torch, dtype))
    return teacher.requires_grad_(False).eval().to(accelerator.device)


def unwrap_kif_model(accelerator: Accelerator, model) -> KifForConditionalGeneration:
    """The `KifForConditionalGeneration` inside the DDP/FSDP wrapper and, with LoRA, the peft wrapper."""
    unwrapped = accelerator.unwrap_model(model)
    return unwrapped.get_base_model() if isinstance(unwrapped, PeftModel) else unwrapped


def keep_frozen_batch_norms_in_eval(model: nn.Module) -> None:
    """In train mode BatchNorm updates its running statistics even when peft froze its weights; those statistics are
    not in the adapter and would silently change the frozen backbone. Call after every `model.train()`."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            parameter.requires_grad for parameter in module.parameters()
        ):
            module.eval()


def build_optimizer(
    model: nn.Module, learning_rate: float, weight_decay: float, betas: tuple[float, float], fused: bool = True
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. The fused kernel updates every parameter in one pass instead of a dozen
    element-wise ops per tensor: on a 2-core CPU the full-size model's update drops from about 1 s to 0.17 s
    (bench/bench_kif.py), a fifth of the step; the CUDA kernel likewise saves launches."""
    groups = optimizer_parameter_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), fused=fused)


def optimizer_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices (2-D and up), none on biases and normalisation weights."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return [
        {"params": [parameter for parameter in trainable if parameter.ndim >= 2], "weight_decay": weight_decay},
        {"params": [parameter for parameter in trainable if parameter.ndim < 2], "weight_decay": 0.0},
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class EpochCosineSchedule:
    """BLIP/PromptMRG's schedule as a `LambdaLR` multiplier: in the first epoch a linear warm-up from
    `warmup_start_lr` to `peak_lr` over `warmup_steps` optimiser steps (capped by the epoch length), then in each
    epoch e >= 1 the constant `min_lr + (peak_lr - min_lr) * (1 + cos(pi * e / num_epochs)) / 2`.

    The scheduler that `accelerator.prepare` returns steps `scheduler_steps_per_update` times per optimiser step (once
    per process unless batches are split), so the multiplier converts scheduler steps back to optimiser steps: the
    learning rate depends on the optimiser steps taken, not on the number of processes or micro-batches.
    """

    peak_lr: float
    warmup_start_lr: float
    min_lr: float
    warmup_steps: int
    steps_per_epoch: int
    num_epochs: int
    scheduler_steps_per_update: int = 1

    def learning_rate(self, optimizer_step: int) -> float:
        """The learning rate of optimiser step `optimizer_step` (0-based)."""
        epoch = optimizer_step // self.steps_per_epoch
        if epoch == 0:
            warmup = min(self.warmup_steps, self.steps_per_epoch)
            if warmup == 0:
                return self.peak_lr
            return min(
                self.peak_lr, self.warmup_start_lr + (self.peak_lr - self.warmup_start_lr) * optimizer_step / warmup
            )
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / self.num_epochs))

    def __call__(self, scheduler_step: int) -> float:
        return self.learning_rate(scheduler_step // self.scheduler_steps_per_update) / self.peak_lr


# ---------------------------------------------------------------------------------------------------------------------
# Data loading
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class SeededAugmentation:
    """The training collator, with each batch's random crops and rotations drawn from a generator seeded by (seed,
    epoch, example ids) instead of the global one. Augmentation then does not depend on when or where a batch is built
    (DataLoader prefetching, worker processes, batches skipped on resume) and leaves the global generator - dropout -
    alone, so an interrupted and resumed run repeats the uninterrupted one exactly."""

    collator: KifDataCollator
    seed: int
    epoch: int = 0

    def __call__(self, examples: list[dict]) -> dict:
        key = f"{self.seed}/{self.epoch}/" + "/".join(example["id"] for example in examples)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(key.encode()))
            return self.collator(examples)


def make_dataloaders(args, processor, config, data) -> tuple[DataLoader, DataLoader, SeededAugmentation]:
    train_collator = SeededAugmentation(
        KifDataCollator(
            processor, data.memory_features, augment=True, num_retrieved_reports=config.num_retrieved_reports
        ),
        seed=args.seed,
    )
    train_loader = DataLoader(
        data.splits["train"],
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=train_collator,
        num_workers=args.num_workers,
        # Its own generator: drawing worker seeds must not advance the global one (see SeededAugmentation).
        generator=torch.Generator().manual_seed(args.seed),
    )
    validation_loader = DataLoader(
        data.splits["validation"],
        batch_size=args.per_device_eval_batch_size,
        collate_fn=generation_collator(processor, config, data),
        num_workers=args.num_workers,
    )
    return train_loader, validation_loader, train_collator


def generation_collator(processor, config, data) -> KifDataCollator:
    return KifDataCollator(
        processor, data.memory_features, num_retrieved_reports=config.num_retrieved_reports, for_generation=True
    )


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class TrainingProgress:
    """Where a phase stands; saved beside each `accelerator.save_state` checkpoint."""

    epoch: int = 0  # the epoch in progress
    batches_in_epoch: int = 0  # micro-batches of that epoch already trained
    completed_steps: int = 0  # optimiser steps of the phase
    best_score: float | None = None
    best_epoch: int | None = None
    best_metrics: dict = field(default_factory=dict)


def staging_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{STAGING_SUFFIX}")


def replace_directory(staging: Path, final: Path) -> None:
    """Move a completely written folder into place with renames, so `final` is never seen half-written."""
    replaced = final.with_name(f".{final.name}{REPLACED_SUFFIX}")
    shutil.rmtree(replaced, ignore_errors=True)
    if final.exists():
        final.rename(replaced)
    staging.rename(final)
    shutil.rmtree(replaced, ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator, phase_dir: Path, name: str, progress: TrainingProgress, total_limit: int
) -> Path:
    """`accelerator.save_state` into `<phase_dir>/<name>` via a staging folder (every process writes its part), then
    the training progress; the oldest checkpoints beyond `total_limit` are removed once the new one is complete."""
    final, staging = phase_dir / name, staging_path(phase_dir / name)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)
    if accelerator.is_main_process:
        (staging / PROGRESS_FILE).write_text(json.dumps(asdict(progress), indent=2))
        replace_directory(staging, final)
        if total_limit:
            for old in list_checkpoints(phase_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    logger.info(f"Saved checkpoint {final}.")
    return final


def list_checkpoints(phase_dir: Path) -> list[Path]:
    """Complete checkpoints of a phase, oldest first."""
    found = []
    for path in phase_dir.glob("*_*"):
        if path.is_dir() and CHECKPOINT_NAME.match(path.name) and (path / PROGRESS_FILE).is_file():
            progress = json.loads((path / PROGRESS_FILE).read_text())
            found.append(((progress["completed_steps"], progress["epoch"]), path))
    return [path for _, path in sorted(found)]


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> TrainingProgress:
    # Not strict: safetensors drops tensors that share storage - the tied LM head, and the empty report-memory buffers
    # of a model without an index - so they are absent from the file although the model has them.
    accelerator.load_state(checkpoint, strict=False)
    return TrainingProgress(**json.loads((checkpoint / PROGRESS_FILE).read_text()))


def resolve_resume(args: argparse.Namespace, phases: list[str], output_dir: Path) -> tuple[list[str], Path | None]:
    """Phases already complete (skipped), and the checkpoint the first incomplete phase resumes from (or None)."""
    if args.resume_from_checkpoint is None:
        return [], None
    complete = []
    for phase in phases:
        if not (output_dir / phase / PHASE_RESULTS_FILE).is_file():
            break
        complete.append(phase)
    if args.resume_from_checkpoint == "latest":
        if len(complete) == len(phases):
            return complete, None
        checkpoints = list_checkpoints(output_dir / phases[len(complete)])
        if not checkpoints and not complete:
            logger.warning(f"No checkpoint in {output_dir}: --resume_from_checkpoint latest starts from scratch.")
        return complete, checkpoints[-1] if checkpoints else None
    checkpoint = Path(args.resume_from_checkpoint)
    if not (checkpoint / PROGRESS_FILE).is_file():
        raise ValueError(f"--resume_from_checkpoint {checkpoint} is not a complete checkpoint (no {PROGRESS_FILE}).")
    phase = checkpoint.parent.name
    if checkpoint.parent.parent.resolve() != output_dir.resolve() or phase not in phases:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} must be a checkpoint of one of the phases {phases} in --output_dir "
            f"{output_dir} (<output_dir>/<phase>/step_N)."
        )
    earlier = phases[: phases.index(phase)]
    if complete[: len(earlier)] != earlier:
        raise ValueError(f"Cannot resume {phase}: the earlier phases {earlier} of {output_dir} are not all complete.")
    return earlier, checkpoint


def trim_log(path: Path, keep) -> None:
    """Drop the log lines of work that a resumed run repeats (written after its checkpoint)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if keep(json.loads(line))]
        path.write_text("".join(f"{line}\n" for line in lines))


def append_json_line(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Training step
# ---------------------------------------------------------------------------------------------------------------------
def compute_loss(
    model, teacher, batch: dict, args: argparse.Namespace, accelerator: Accelerator
) -> tuple[torch.Tensor, dict]:
    """The phase's loss L_lm + w_cls L_cls (+ w_kd L_kd + w_rel L_rel against a teacher), and a dict of it and its
    terms for logging."""
    if teacher is not None:
        # The teacher runs first: its activations are freed before the student's are built, lowering peak memory.
        with torch.no_grad(), accelerator.autocast():
            taught = teacher(
                pixel_values=batch["pixel_values"].to(teacher.dtype),
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                memory_embeds=batch["memory_embeds"].to(teacher.dtype),
            )
    outputs = model(**batch)
    terms = {"lm_loss": outputs.lm_loss, "cls_loss": outputs.cls_loss}
    loss = outputs.loss  # lm_loss + cls_weight * cls_loss (the model config's classification_loss_weight)
    if teacher is not None:
        terms["kd_loss"] = kd_loss(outputs.logits, taught.logits, batch["labels"], args.kd_temperature)
        terms["rel_loss"] = relational_loss(
            outputs.patch_features, outputs.cls_logits, taught.patch_features, taught.cls_logits
        )
        loss = loss + args.kd_weight * terms["kd_loss"] + args.rel_weight * terms["rel_loss"]
    return loss, {"loss": loss, **terms}


def clip_gradients_by_value(accelerator: Accelerator, model: nn.Module, clip_value: float) -> None:
    if accelerator.distributed_type == DistributedType.FSDP:
        # accelerate refuses clip_grad_value_ under FSDP, but clipping element by element is exact on gradient shards.
        accelerator.unscale_gradients()
        torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
    elif accelerator.distributed_type != DistributedType.DEEPSPEED:  # DeepSpeed clips in its engine (warned at start)
        accelerator.clip_grad_value_(model.parameters(), clip_value)


def raise_if_not_finite(terms: dict, phase: str, progress: TrainingProgress, last_checkpoint: Path | None) -> None:
    """Stop on a NaN/inf loss term, naming it; nothing has been updated or saved from this batch."""
    bad = [name for name, value in terms.items() if not math.isfinite(value)]
    if not bad:
        return
    values = ", ".join(f"{name} = {value:.6g}" for name, value in terms.items())
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
    raise NonFiniteLossError(
        f"Non-finite loss in {phase} at optimiser step {progress.completed_steps + 1} (epoch {progress.epoch}, "
        f"micro-batch {progress.batches_in_epoch} of the epoch): {', '.join(bad)} is not finite ({values}). "
        f"Training stopped before this update; {kept}. Fix the cause (e.g. a lower --learning_rate, bf16 instead of "
        "fp16) and continue with --resume_from_checkpoint latest."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Validation, priors and model selection
# ---------------------------------------------------------------------------------------------------------------------
def validate(model, processor, loader, accelerator, labeler, args) -> tuple[dict, list[dict]]:
    """Generate the validation reports (the model's saved generation settings) and score them on every process."""
    model.eval()
    rows = generate_predictions(model, processor, loader, accelerator, generation_kwargs={})
    metrics = score_predictions(rows, labeler, args.labeler, meteor="METEOR" in selection_keys(args.selection_metric))
    return metrics, rows


def updated_base_probs(rows: list[dict], previous: torch.Tensor) -> torch.Tensor:
    """PromptMRG's prior update from a validation pass: per CheXpert observation, the mean predicted positive
    probability over the samples whose reference is positive, divided by the largest such mean. Observations without
    a positive sample keep their previous prior; the auxiliary observations stay at 1."""
    updated = previous.detach().clone().float().cpu()
    labelled = [row for row in rows if row["reference_labels"] is not None]
    if labelled:
        probabilities = torch.tensor([row["predicted_probabilities"] for row in labelled])[:, :NUM_CHEXPERT, POSITIVE]
        positive = torch.tensor([row["reference_labels"][:NUM_CHEXPERT] for row in labelled]) == POSITIVE
        counts = positive.sum(dim=0)
        means = (probabilities * positive).sum(dim=0) / counts.clamp_min(1)
        seen = counts > 0
        if seen.any() and means[seen].max() > 0:
            updated[:NUM_CHEXPERT][seen] = means[seen] / means[seen].max()
    updated[NUM_CHEXPERT:] = 1.0
    return updated


def selection_score(metrics: dict, selection_metric: str) -> float:
    missing = [key for key in selection_keys(selection_metric) if key not in metrics]
    if missing:
        raise ValueError(
            f"The validation results lack {missing} of --selection_metric {selection_metric!r} (METEOR needs Java); "
            f"available: {sorted(key for key, value in metrics.items() if isinstance(value, float))}."
        )
    return sum(metrics[key] for key in selection_keys(selection_metric))


def numeric(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if isinstance(value, (int, float))}


# ---------------------------------------------------------------------------------------------------------------------
# Saving models
# ---------------------------------------------------------------------------------------------------------------------
def save_best_model(accelerator: Accelerator, model, processor: KifProcessor, best_dir: Path) -> None:
    """`save_pretrained` of the model being trained into `best_dir`, atomically. With LoRA: the adapters in
    `best_dir/adapter` and the merged full model in `best_dir`."""
    state_dict = accelerator.get_state_dict(model)  # every process: FSDP and DeepSpeed gather the shards
    if accelerator.is_main_process:
        staging = staging_path(best_dir)
        shutil.rmtree(staging, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        if isinstance(unwrapped, PeftModel):
            unwrapped.save_pretrained(staging / ADAPTER_DIR)
            copy.deepcopy(unwrapped).merge_and_unload().save_pretrained(staging)
        else:
            unwrapped.save_pretrained(staging, state_dict=state_dict)
        processor.save_pretrained(staging)
        replace_directory(staging, best_dir)
    accelerator.wait_for_everyone()


@torch.no_grad()
def build_report_memory(accelerator, model, data: TrainingData, collator, batch_size: int, num_workers: int) -> None:
    """Give `model` its report-memory index: keys = global image features of the training images (eval transform),
    values = those training reports' retrieval features. It then generates from a bare image."""
    train = data.splits["train"]
    loader = accelerator.prepare(
        DataLoader(train, batch_size=batch_size, collate_fn=collator, num_workers=num_workers)
    )
    keys = []
    for batch in loader:
        keys.append(accelerator.gather_for_metrics(model.encode_image(batch["pixel_values"])[1]))
    values = data.memory_features[torch.tensor(train["annotation_index"])]
    model.set_report_memory(torch.cat(keys).cpu(), values)


def finalize_best_model(accelerator, best_dir: Path, processor, config, data, args) -> None:
    """Reload the phase's best model, add the training set's report-memory index and save it again (atomically)."""
    model = KifForConditionalGeneration.from_pretrained(best_dir).to(accelerator.device).eval()
    collator = generation_collator(processor, config, data)
    build_report_memory(accelerator, model, data, collator, args.per_device_eval_batch_size, args.num_workers)
    if accelerator.is_main_process:
        staging = staging_path(best_dir)
        shutil.rmtree(staging, ignore_errors=True)
        if (best_dir / ADAPTER_DIR).is_dir():
            shutil.copytree(best_dir / ADAPTER_DIR, staging / ADAPTER_DIR)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        replace_directory(staging, best_dir)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------------------
# One phase: phase 1 or a distillation round
# ---------------------------------------------------------------------------------------------------------------------
def train_phase(
    args: argparse.Namespace,
    accelerator: Accelerator,
    phase: str,
    phase_index: int,
    config: KifConfig,
    processor: KifProcessor,
    data: TrainingData,
    labeler,
    teacher_dir: Path | None,
    resume_checkpoint: Path | None,
) -> dict:
    """Train one phase, select its best model on validation and save it to `<output_dir>/<phase>/best`."""
    phase_dir = Path(args.output_dir) / phase
    if resume_checkpoint is None and accelerator.is_main_process and phase_dir.exists():
        logger.warning(f"Starting {phase} from scratch: removing {phase_dir} (--resume_from_checkpoint continues it).")
        shutil.rmtree(phase_dir)
    if accelerator.is_main_process:
        phase_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(args.seed + phase_index)  # each phase starts from the same state whether or not earlier ones were resumed

    # Models: the student (phase 1's base model) and, in a distillation round, the frozen teacher.
    model = build_student(args, config, data, teacher_dir)
    teacher = load_teacher(teacher_dir, accelerator, args.teacher_dtype) if teacher_dir is not None else None
    logger.info(f"{phase}: {'distilling from ' + str(teacher_dir) if teacher else 'training the base model'}.")

    # Data, optimiser and the per-epoch schedule, counted in optimiser steps.
    train_loader, validation_loader, train_collator = make_dataloaders(args, processor, config, data)
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, args.adam_betas, args.fused_adamw)
    batches_per_process = math.ceil(len(train_loader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    schedule = EpochCosineSchedule(
        peak_lr=args.learning_rate,
        warmup_start_lr=args.warmup_start_learning_rate,
        min_lr=args.min_learning_rate,
        warmup_steps=args.warmup_steps,
        steps_per_epoch=steps_per_epoch,
        num_epochs=args.num_train_epochs,
        scheduler_steps_per_update=1 if accelerator.split_batches else accelerator.num_processes,
    )
    lr_scheduler = LambdaLR(optimizer, schedule)
    model, optimizer, train_loader, validation_loader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_loader, validation_loader, lr_scheduler
    )
    kif_model = unwrap_kif_model(accelerator, model)

    # Resume: weights, optimiser, scheduler, RNG states and where the phase stood.
    progress, last_checkpoint = TrainingProgress(), None
    if resume_checkpoint is not None:
        logger.info(f"Resuming {phase} from {resume_checkpoint}.")
        progress, last_checkpoint = load_checkpoint(accelerator, resume_checkpoint), resume_checkpoint
        if accelerator.is_main_process:
            trim_log(phase_dir / TRAIN_LOG_FILE, lambda record: record["step"] <= progress.completed_steps)
            trim_log(phase_dir / EVAL_LOG_FILE, lambda record: record["epoch"] < progress.epoch)
    total_steps = steps_per_epoch * args.num_train_epochs
    if args.max_train_steps is not None:
        total_steps = min(total_steps, args.max_train_steps)
    progress_bar = tqdm(
        total=total_steps, initial=progress.completed_steps, desc=phase, disable=not accelerator.is_local_main_process
    )

    # Train: one validation pass per epoch updates the priors and selects the best model.
    step_terms = []
    while progress.epoch < args.num_train_epochs and progress.completed_steps < total_steps:
        model.train()
        keep_frozen_batch_norms_in_eval(model)
        train_loader.set_epoch(progress.epoch)
        train_collator.epoch = progress.epoch
        batches = (
            accelerator.skip_first_batches(train_loader, progress.batches_in_epoch)
            if progress.batches_in_epoch
            else train_loader
        )
        for batch in batches:
            with accelerator.accumulate(model):
                loss, terms = compute_loss(model, teacher, batch, args, accelerator)
                # The mean over processes: every process sees the same values, so all stop together on a NaN.
                reduced = accelerator.reduce(torch.stack([term.detach().float() for term in terms.values()]), "mean")
                terms = dict(zip(terms, reduced.tolist()))
                raise_if_not_finite(terms, phase, progress, last_checkpoint)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    clip_gradients_by_value(accelerator, model, args.max_grad_value)
                learning_rate = lr_scheduler.get_last_lr()[0]
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            progress.batches_in_epoch += 1
            step_terms.append(terms)
            if not accelerator.sync_gradients:
                continue
            progress.completed_steps += 1
            progress_bar.update(1)
            # Logged per optimiser step: the mean over its micro-batches (and processes).
            means = {name: sum(terms[name] for terms in step_terms) / len(step_terms) for name in step_terms[0]}
            record = {"step": progress.completed_steps, "epoch": progress.epoch, "lr": learning_rate, **means}
            step_terms = []
            progress_bar.set_postfix(loss=f"{record['loss']:.4f}")
            if accelerator.is_main_process:
                append_json_line(phase_dir / TRAIN_LOG_FILE, record)
            accelerator.log({f"{phase}/train/{name}": value for name, value in record.items() if name != "step"},
                            step=progress.completed_steps)  # fmt: skip
            if args.checkpointing_steps != "epoch" and progress.completed_steps % int(args.checkpointing_steps) == 0:
                last_checkpoint = save_checkpoint(
                    accelerator, phase_dir, f"step_{progress.completed_steps}", progress, args.checkpoints_total_limit
                )
            if progress.completed_steps >= total_steps:
                break

        metrics, rows = validate(model, processor, validation_loader, accelerator, labeler, args)
        kif_model.base_probs.copy_(updated_base_probs(rows, kif_model.base_probs))
        score = selection_score(metrics, args.selection_metric)
        is_best = progress.best_score is None or score > progress.best_score
        if is_best:
            progress.best_score, progress.best_epoch, progress.best_metrics = score, progress.epoch, numeric(metrics)
            save_best_model(accelerator, model, processor, phase_dir / BEST_DIR)
        logger.info(
            f"{phase} epoch {progress.epoch}: {args.selection_metric} = {score:.4f}{' (best)' if is_best else ''}."
        )
        if accelerator.is_main_process:
            append_json_line(
                phase_dir / EVAL_LOG_FILE,
                {"epoch": progress.epoch, "step": progress.completed_steps, "score": score, "is_best": is_best,
                 "base_probs": kif_model.base_probs.tolist(), **numeric(metrics)},
            )  # fmt: skip
        accelerator.log({f"{phase}/validation/{key}": value for key, value in numeric(metrics).items()},
                        step=progress.completed_steps)  # fmt: skip
        progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0
        if args.checkpointing_steps == "epoch":
            last_checkpoint = save_checkpoint(
                accelerator, phase_dir, f"epoch_{progress.epoch}", progress, args.checkpoints_total_limit
            )
    progress_bar.close()

    # The best model gets the report-memory index of the training set; then the phase is complete.
    accelerator.free_memory()
    del model, teacher, kif_model, optimizer, lr_scheduler, train_loader, validation_loader
    finalize_best_model(accelerator, phase_dir / BEST_DIR, processor, config, data, args)
    accelerator.free_memory()
    results = {
        "selection_metric": args.selection_metric,
        "best_score": progress.best_score,
        "best_epoch": progress.best_epoch,
        "teacher": str(teacher_dir) if teacher_dir is not None else None,
        "validation": progress.best_metrics,
    }
    if accelerator.is_main_process:
        (phase_dir / PHASE_RESULTS_FILE).write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Test evaluation
# ---------------------------------------------------------------------------------------------------------------------
def baseline_rows(data: TrainingData, config: KifConfig) -> list[dict]:
    """The trivial baseline: the most frequent training report for every test image, with all-normal findings
    ("No Finding" positive, every other CheXpert observation negative)."""
    report = Counter(data.splits["train"]["report"]).most_common(1)[0][0]
    states = [NEGATIVE] * NUM_CHEXPERT + [BLANK] * (config.num_observations - NUM_CHEXPERT)
    states[NO_FINDING] = POSITIVE
    probabilities = [[float(state == index) for index in range(config.num_states)] for state in states]
    test = data.splits["test"]
    return [
        {"id": example_id, "reference": reference, "reference_labels": labels, "generated": report,
         "predicted_states": states, "predicted_probabilities": probabilities}
        for example_id, reference, labels in zip(test["id"], test["report"], test["labels"])
    ]  # fmt: skip


def evaluate_on_test(args, accelerator, processor, config, data, labeler, phases: list[str]) -> dict:
    """Test metrics of the trivial baseline and of each phase's best model (generating from the saved model)."""
    output_dir = Path(args.output_dir)
    meteor = not args.no_meteor
    results = {"baseline": score_predictions(baseline_rows(data, config), labeler, args.labeler, meteor=meteor)}
    collator = generation_collator(processor, config, data)
    for phase in phases:
        model = KifForConditionalGeneration.from_pretrained(output_dir / phase / BEST_DIR).to(accelerator.device)
        results[phase] = evaluate_split(
            model, processor, data.splits["test"], collator, accelerator=accelerator,
            batch_size=args.per_device_eval_batch_size, labeler=labeler, labeler_name=args.labeler,
            output_dir=output_dir / phase / TEST_DIR, num_workers=args.num_workers, meteor=meteor,
        )  # fmt: skip
        accelerator.free_memory()
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------
def publish(output_dir: Path, args: argparse.Namespace):
    """Upload the final model with its processor, code and a filled model card (hub_kif.push_output_dir)."""
    from hub_kif import push_output_dir

    return push_output_dir(output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private or None)


def main(argv=None) -> dict:
    # 1. Arguments.
    args = parse_args(argv)
    output_dir = Path(args.output_dir)

    # 2. Accelerator. The seedable sampler makes each epoch's order a function of (seed, epoch), so a resumed run
    # skips exactly the batches it had seen.
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    configure_logging(accelerator)
    warn_about_setup(accelerator)
    if args.tune_cpu_allocator and accelerator.device.type == "cpu" and not keep_freed_memory_in_heap():
        logger.info("--tune_cpu_allocator needs glibc; training with the system allocator's settings.")
    try:
        # 3. Configuration, processor, data and labeler.
        config = load_model_config(args)
        processor = load_processor(args, config)
        with accelerator.main_process_first():
            data = load_training_data(args, config)
        if accelerator.is_main_process:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / ARGS_FILE).write_text(json.dumps(vars(args), indent=2, default=str))
        if args.report_to != "none":
            tracked = {
                key: value if isinstance(value, (int, float, str, bool)) else str(value)
                for key, value in vars(args).items()
            }
            accelerator.init_trackers(TRACKER_PROJECT, config=tracked)
        labeler = load_labeler(args.labeler, args.chexbert_checkpoint, args.chexbert_tokenizer, accelerator.device)

        # 4. Phase 1 and the distillation rounds; each phase's best model teaches the next.
        phases = phase_names(args)
        complete, resume_checkpoint = resolve_resume(args, phases, output_dir)
        teacher_dir = Path(args.teacher) if args.teacher else None
        phase_results = {}
        for phase_index, phase in enumerate(phases):
            if phase in complete:
                logger.info(f"{phase} was completed before; skipping it.")
                phase_results[phase] = json.loads((output_dir / phase / PHASE_RESULTS_FILE).read_text())
            else:
                checkpoint = resume_checkpoint if phase_index == len(complete) else None
                phase_results[phase] = train_phase(
                    args, accelerator, phase, phase_index, config, processor, data, labeler, teacher_dir, checkpoint
                )
            teacher_dir = output_dir / phase / BEST_DIR

        # 5. The final model: the best of the last phase.
        if accelerator.is_main_process:
            staging = staging_path(output_dir / FINAL_DIR)
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(teacher_dir, staging)
            replace_directory(staging, output_dir / FINAL_DIR)
        accelerator.wait_for_everyone()

        # 6. Test evaluation against the trivial baseline; all_results.json and a table.
        all_results = {}
        if not args.no_test_eval and len(data.splits["test"]):
            all_results = evaluate_on_test(args, accelerator, processor, config, data, labeler, phases)
        for phase in phases:
            all_results[phase] = {**all_results.get(phase, {}), **phase_results[phase]}
        if accelerator.is_main_process:
            (output_dir / RESULTS_FILE).write_text(json.dumps(all_results, indent=2))
            if "baseline" in all_results:
                print(f"\nTest split ({len(data.splits['test'])} studies) of {args.annotation_file}:")
                print(format_results_table(all_results))
                print(f"Labeler: {all_results['baseline']['labeler']}. CE: {all_results['baseline']['convention']}.")
            print(f"Final model: {output_dir / FINAL_DIR}")
            if args.push_to_hub:
                publish(output_dir, args)
        return all_results
    finally:
        accelerator.end_training()


if __name__ == "__main__":
    main()
