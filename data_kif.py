"""Data for KIF-ISD: report data sets as 🤗 Datasets, the training/generation collator, retrieval memory from any
CLIP-style dual encoder, and the embedded synthetic chest X-ray data set.

Files (the formats of R2Gen and PromptMRG, which KIF-ISD inherits):

- `annotation.json`: `{"train" | "val" | "test": [{"id", "report", "image_path": [...], "split", ...}]}`. PromptMRG
  entries add `"labels"` (18 finding states for train, 14 for val/test; 0 blank, 1 positive, 2 negative,
  3 uncertain) and `"clip_indices"` (the training reports nearest to the image, nearest first). Labels may also be
  CheXpert-style dicts (`{"Edema": "1.0", "Fracture": "", ...}`). Image paths are relative to the image directory.
- `clip_text_features.json`: one D-vector per training report; row i belongs to entry i of the annotation's
  `train` list, and `clip_indices` index these rows.
- `disease_word_features.json`: one D-vector per disease word of `DISEASE_WORDS` (20, D).
- `base_probs.json`: the 14 CheXpert observations' positive rates among training reports.

Typical use::

    data = load_report_dataset("annotation.json", "images", dataset="mimic_cxr", clip_features_file="clip_text_features.json")
    collator = KifDataCollator(processor, memory_features=load_features("clip_text_features.json"), augment=True)
    loader = DataLoader(data["train"], batch_size=16, shuffle=True, collate_fn=collator)
"""

import argparse
import inspect
import json
import logging
import math
import os
import re
import reprlib
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict, Features, List, Value
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader

from configuration_kif import AUXILIARY_OBSERVATIONS, CHEXPERT_OBSERVATIONS, DISEASE_WORDS, FINDING_STATES, KifConfig
from processing_kif import IGNORE_INDEX, KifImageProcessor, KifProcessor, clean_report


logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# File formats
# ---------------------------------------------------------------------------------------------------------------------
ANNOTATION_FILE = "annotation.json"
CLIP_FEATURES_FILE = "clip_text_features.json"
DISEASE_WORD_FEATURES_FILE = "disease_word_features.json"
BASE_PROBS_FILE = "base_probs.json"
SYNTHETIC_SETTINGS_FILE = "synthetic_config.json"  # how a synthetic data set was generated
IMAGE_DIR_NAME = "images"

# Annotation key -> DatasetDict split name.
ANNOTATION_SPLITS = {"train": "train", "val": "validation", "test": "test"}
REQUIRED_ENTRY_FIELDS = ("report", "image_path")

OBSERVATIONS = CHEXPERT_OBSERVATIONS + AUXILIARY_OBSERVATIONS
NUM_CHEXPERT = len(CHEXPERT_OBSERVATIONS)
# PromptMRG files carry all 18 observations for train and the 14 CheXpert ones for val/test.
LABEL_LENGTHS = (len(OBSERVATIONS), NUM_CHEXPERT)
BLANK, POSITIVE, NEGATIVE, UNCERTAIN = (
    FINDING_STATES.index(state) for state in ("blank", "positive", "negative", "uncertain")
)
# CheXpert label files: 1.0 positive, 0.0 negative, -1.0 uncertain, empty (or NaN) blank.
CHEXPERT_VALUE_STATES = {1.0: POSITIVE, 0.0: NEGATIVE, -1.0: UNCERTAIN}
# The auxiliary observations have no prior; a prior of 1 leaves their logits unadjusted (log 1 = 0).
AUXILIARY_BASE_PROB = 1.0
# Smallest positive rate written to base_probs.json (see `compute_base_probs`).
MIN_BASE_PROB = 1e-3

# Report cleaning per data set: R2Gen's cleaner of that name. Synthetic reports are written in MIMIC-CXR style.
DATASET_PRESETS = {
    "mimic_cxr": {"cleaner": "mimic_cxr", "clean_reports": True},
    "iu_xray": {"cleaner": "iu_xray", "clean_reports": True},
    "synthetic": {"cleaner": "mimic_cxr", "clean_reports": True},
}
DEFAULT_MAX_WORDS = 100
# How many offending paths or entries an error message lists.
MAX_LISTED = 5

REPORT_FEATURES = Features(
    {
        "id": Value("string"),
        "split": Value("string"),
        "annotation_index": Value("int64"),
        "report": Value("string"),
        "image_path": List(Value("string")),
        "labels": List(Value("int8")),
        "clip_indices": List(Value("int64")),
    }
)

MISSING_MEMORY_HELP = (
    "KIF-ISD conditions on the k training reports retrieved for each image. Build them with a CLIP-style dual "
    "encoder: `python data_kif.py build-memory ANNOTATION IMAGE_DIR OUTPUT_DIR --clip_model MODEL_DIR` (or "
    "`data_kif.build_retrieval_memory`), then load the written annotation with "
    f"`clip_features_file=OUTPUT_DIR/{CLIP_FEATURES_FILE}` and pass `load_features(...)` as the collator's "
    "`memory_features`."
)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file)


def _has_words(text: str) -> bool:
    """False for empty, whitespace-only and punctuation-only text (the cleaner turns "" into " .")."""
    return re.search(r"[^\W_]", text) is not None


# ---------------------------------------------------------------------------------------------------------------------
# Annotation fields
# ---------------------------------------------------------------------------------------------------------------------
def _is_state(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value in range(len(FINDING_STATES))


def _chexpert_state(value, where: str) -> int:
    """State code of one CheXpert-convention value ("1.0", "0.0", "-1.0", "" or missing)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return BLANK
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is not None and math.isnan(number):  # pandas writes empty CheXpert cells as NaN
        return BLANK
    if number not in CHEXPERT_VALUE_STATES:
        raise ValueError(
            f"{where} is {value!r}; expected 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or '' (blank)."
        )
    return CHEXPERT_VALUE_STATES[number]


def labels_from_chexpert_dict(labels: dict, where: str = "labels") -> list[int]:
    """Convert a CheXpert-style label dict keyed by observation name to state codes.

    Returns the 14 CheXpert observations, or all 18 when the dict names an auxiliary one. Unnamed observations are
    blank; unknown names are an error (a typo would otherwise silently blank an observation).
    """
    unknown = sorted(set(labels) - set(OBSERVATIONS))
    if unknown:
        raise ValueError(f"{where} names unknown observations {unknown}; known: {list(OBSERVATIONS)}.")
    names = OBSERVATIONS if any(name in labels for name in AUXILIARY_OBSERVATIONS) else CHEXPERT_OBSERVATIONS
    return [_chexpert_state(labels.get(name), f"{where}[{name!r}]") for name in names]


def _parse_labels(raw, where: str) -> list[int] | None:
    if raw is None:
        return None
    if isinstance(raw, dict):
        return labels_from_chexpert_dict(raw, f"{where}: field 'labels'")
    if not isinstance(raw, list) or len(raw) not in LABEL_LENGTHS:
        raise ValueError(
            f"{where}: field 'labels' must list {LABEL_LENGTHS[0]} or {LABEL_LENGTHS[1]} finding states "
            f"(or be a CheXpert label dict), got {reprlib.repr(raw)}."
        )
    invalid = [value for value in raw if not _is_state(value)]
    if invalid:
        coding = ", ".join(f"{code} {state}" for code, state in enumerate(FINDING_STATES))
        raise ValueError(f"{where}: field 'labels' has values {invalid[:MAX_LISTED]} that are not states ({coding}).")
    return [int(value) for value in raw]


def _parse_clip_indices(raw, num_features: int | None, where: str) -> list[int] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or not all(isinstance(i, int) and not isinstance(i, bool) for i in raw):
        raise ValueError(
            f"{where}: field 'clip_indices' must be a non-empty list of integers, got {reprlib.repr(raw)}."
        )
    upper = num_features if num_features is not None else math.inf
    outside = [i for i in raw if not 0 <= i < upper]
    if outside:
        bound = f"0..{num_features - 1}, the rows of the retrieval features" if num_features else "non-negative"
        raise ValueError(f"{where}: field 'clip_indices' has indices {outside[:MAX_LISTED]}; they must be {bound}.")
    return raw


def _parse_image_paths(raw, image_dir: Path, where: str) -> list[str]:
    if not isinstance(raw, list) or not raw or not all(isinstance(path, str) and path for path in raw):
        raise ValueError(
            f"{where}: field 'image_path' must be a non-empty list of paths relative to the image directory, "
            f"got {reprlib.repr(raw)}."
        )
    return [str((image_dir / path).absolute()) for path in raw]


def read_annotation(path) -> dict:
    """Read an R2Gen/PromptMRG annotation file, checking that it maps each split to a list of entries."""
    annotation = _read_json(path)
    if not isinstance(annotation, dict) or any(not isinstance(annotation.get(key), list) for key in ANNOTATION_SPLITS):
        found = sorted(annotation) if isinstance(annotation, dict) else type(annotation).__name__
        raise ValueError(
            f"{path} must map each split {list(ANNOTATION_SPLITS)} to a list of entries (R2Gen/PromptMRG format); "
            f"found {found}."
        )
    return annotation


def _parse_entry(entry, key: str, index: int, image_dir: Path, num_features: int | None, where: str) -> dict:
    """Validate one annotation entry and convert it to a row of `REPORT_FEATURES` (report not yet cleaned).

    `num_features`: rows of the retrieval features, when given; the entry's `clip_indices` must then index them.
    """
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a {type(entry).__name__}, not an object with fields {REQUIRED_ENTRY_FIELDS}.")
    for field in REQUIRED_ENTRY_FIELDS:
        if field not in entry:
            raise ValueError(f"{where} has no field {field!r}.")
    if not isinstance(entry["report"], str):
        raise ValueError(f"{where}: field 'report' must be a string, got {reprlib.repr(entry['report'])}.")
    if num_features is not None and entry.get("clip_indices") is None:
        raise ValueError(f"{where} has no field 'clip_indices' but retrieval features were given.")
    return {
        "id": str(entry.get("id", f"{key}_{index}")),
        "split": ANNOTATION_SPLITS[key],
        "annotation_index": index,
        "report": entry["report"],
        "image_path": _parse_image_paths(entry["image_path"], image_dir, where),
        "labels": _parse_labels(entry.get("labels"), where),
        "clip_indices": _parse_clip_indices(entry.get("clip_indices"), num_features, where),
    }


def _prepare_report(report: str, cleaner: str | None, max_words: int | None) -> str:
    """R2Gen cleaning, then PromptMRG's cut to the first `max_words` words."""
    if cleaner is not None:
        report = clean_report(report, cleaner)
    if max_words is not None:
        report = " ".join(report.split()[:max_words])
    return report


def _raise_unless_skipped(flagged: dict, skip: bool, problem: str, hint: str) -> None:
    """Raise one error listing the flagged items (`{split: {row position: [items]}}`), or log them when `skip`."""
    items = [item for positions in flagged.values() for row_items in positions.values() for item in row_items]
    if items and not skip:
        raise ValueError(f"{len(items)} {problem}, e.g. {items[:MAX_LISTED]}. {hint}")
    for split, positions in flagged.items():
        if positions:
            first = next(iter(positions.values()))[0]
            logger.warning("Skipped %d %s examples: %s (e.g. %s).", len(positions), split, problem, first)


def _to_dataset(rows: list[dict]) -> Dataset:
    # Column-wise, because `Dataset.from_list` cannot build an empty split with given features.
    return Dataset.from_dict({name: [row[name] for row in rows] for name in REPORT_FEATURES}, features=REPORT_FEATURES)


def load_report_dataset(
    annotation_file,
    image_dir,
    dataset: str = "mimic_cxr",
    clip_features_file=None,
    clean_reports: bool | None = None,
    max_words: int | None = DEFAULT_MAX_WORDS,
    skip_missing_images: bool = False,
    skip_empty_reports: bool = False,
) -> DatasetDict:
    """Load an R2Gen or PromptMRG annotation file as a `DatasetDict` with splits `train`, `validation` and `test`.

    Every entry is validated; problems raise a `ValueError` naming the file, split, entry index and field. Examples
    whose image files are missing, or whose report is empty, raise too unless `skip_missing_images` /
    `skip_empty_reports` is set; skipped examples are logged and counted in the returned dict's attribute
    `skipped` (`{split: {"missing_images": n, "empty_reports": m}}`). Images are decoded later, by the collator.

    Args:
        annotation_file: `annotation.json` (R2Gen or PromptMRG format).
        image_dir: Directory the entries' `image_path`s are relative to.
        dataset: Preset for report cleaning: `"mimic_cxr"`, `"iu_xray"` or `"synthetic"`.
        clip_features_file: `clip_text_features.json` (or the tensor `load_features` returned for it). When given,
            every entry must have `clip_indices` within its rows.
        clean_reports: Apply the data set's R2Gen report cleaner (`None`: the preset's choice).
        max_words: Cut reports to their first `max_words` words after cleaning (`None` keeps them whole).

    Returns:
        Columns `id`, `split`, `annotation_index` (position in the annotation's split list), `report` (cleaned and
        cut), `image_path` (absolute paths of the study's images), `labels` (the file's 18 or 14 states, or None)
        and `clip_indices` (or None).
    """
    if dataset not in DATASET_PRESETS:
        raise ValueError(f"Unknown dataset {dataset!r}; choose one of {sorted(DATASET_PRESETS)}.")
    preset = DATASET_PRESETS[dataset]
    if clean_reports is None:
        clean_reports = preset["clean_reports"]
    cleaner = preset["cleaner"] if clean_reports else None
    num_features = None
    if clip_features_file is not None:
        features = (
            clip_features_file if isinstance(clip_features_file, torch.Tensor) else load_features(clip_features_file)
        )
        num_features = len(features)

    annotation = read_annotation(annotation_file)
    rows, missing_images, empty_reports = {}, {}, {}
    for key, split in ANNOTATION_SPLITS.items():
        rows[split] = [
            _parse_entry(
                entry, key, index, Path(image_dir), num_features, f"{annotation_file}: split {key!r}, entry {index}"
            )
            for index, entry in enumerate(annotation[key])
        ]
        for row in rows[split]:
            row["report"] = _prepare_report(row["report"], cleaner, max_words)
        empty_reports[split] = {
            position: [f"split {key!r} entry {row['annotation_index']} (id {row['id']!r})"]
            for position, row in enumerate(rows[split]) if not _has_words(row["report"])
        }  # fmt: skip
        missing_images[split] = {
            position: absent for position, row in enumerate(rows[split])
            if (absent := [path for path in row["image_path"] if not os.path.isfile(path)])
        }  # fmt: skip

    _raise_unless_skipped(
        empty_reports, skip_empty_reports, f"reports in {annotation_file} are empty",
        "Fix them, or pass skip_empty_reports=True to skip those examples.",
    )  # fmt: skip
    _raise_unless_skipped(
        missing_images, skip_missing_images, f"image files listed in {annotation_file} are missing under {image_dir}",
        "Check image_dir, or pass skip_missing_images=True to skip those examples.",
    )  # fmt: skip
    for split in rows:
        dropped = empty_reports[split].keys() | missing_images[split].keys()
        rows[split] = [row for position, row in enumerate(rows[split]) if position not in dropped]
    data = DatasetDict({split: _to_dataset(split_rows) for split, split_rows in rows.items()})
    data.skipped = {
        split: {"missing_images": len(missing_images[split]), "empty_reports": len(empty_reports[split])}
        for split in rows
    }
    return data


def load_features(path) -> torch.Tensor:
    """Load a (N, D) float32 matrix from a JSON list of vectors: `clip_text_features.json` (the retrieval memory,
    one row per training report) or `disease_word_features.json` (20 rows)."""
    try:
        features = np.asarray(_read_json(path), dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path} must hold a list of equally long numeric vectors: {error}") from error
    if features.ndim != 2 or not features.size:
        raise ValueError(f"{path} must hold a non-empty list of vectors, got an array of shape {features.shape}.")
    return torch.from_numpy(features)


def load_base_probs(path, num_observations: int = len(OBSERVATIONS)) -> list[float]:
    """Load `base_probs.json` (14 CheXpert positive rates) padded to `num_observations` with 1.0 for the
    auxiliary observations, whose logits get no prior adjustment."""
    probs = _read_json(path)
    valid = isinstance(probs, list) and len(probs) == NUM_CHEXPERT
    if not valid or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1 for p in probs):
        raise ValueError(f"{path} must list {NUM_CHEXPERT} positive rates in [0, 1], got {reprlib.repr(probs)}.")
    if num_observations < NUM_CHEXPERT:
        raise ValueError(f"num_observations ({num_observations}) must be at least {NUM_CHEXPERT}.")
    return [float(p) for p in probs] + [AUXILIARY_BASE_PROB] * (num_observations - NUM_CHEXPERT)


# ---------------------------------------------------------------------------------------------------------------------
# Images and collation
# ---------------------------------------------------------------------------------------------------------------------
def _read_dicom(path) -> Image.Image:
    try:
        import pydicom
    except ImportError as error:
        raise ValueError(f"Reading the DICOM file {path} needs pydicom: pip install pydicom.") from error
    dicom = pydicom.dcmread(path)
    pixels = dicom.pixel_array.astype(np.float32)
    if dicom.get("PhotometricInterpretation") == "MONOCHROME1":  # bright air: invert to the usual radiograph look
        pixels = pixels.max() - pixels
    return Image.fromarray(pixels)  # mode "F": the image processor min-max scales it


def open_image(path, example: str = "") -> Image.Image:
    """Open and fully decode an image (any PIL format; DICOM with pydicom), so that truncated or corrupt files fail
    here with an error naming the file and `example`, not later inside a transform."""
    try:
        if str(path).lower().endswith(".dcm"):
            return _read_dicom(path)
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"Cannot read image {path}{example}: {error}") from error


def _describe(example: dict) -> str:
    return f" (split {example.get('split')!r}, annotation index {example.get('annotation_index')}, id {example.get('id')!r})"


def open_first_image(example: dict) -> Image.Image:
    """The first image of a study, as the original code uses."""
    return open_image(example["image_path"][0], _describe(example))


def verify_images(dataset: Dataset) -> None:
    """Decode the first image of every example; raises naming the first unreadable file."""
    for example in dataset.select_columns(["id", "split", "annotation_index", "image_path"]):
        open_first_image(example)


# Keys of a generation batch that are for scoring, not model inputs.
GENERATION_METADATA_KEYS = ("ids", "reports", "findings")


@dataclass
class KifDataCollator:
    """Batch report examples for `KifForConditionalGeneration`: opens each study's first image, applies the train
    (`augment=True`) or eval transform, tokenises the diagnosis-prompted reports and gathers the retrieved-report
    memory.

    Returns `pixel_values`, `input_ids`, `attention_mask`, `labels`, `disease_labels` and `memory_embeds` (B, k, D).
    `disease_labels` (B, num_observations) are the classifier targets, -100 (ignored) where a row has no state: the
    4 auxiliary observations of 14-label rows and every observation of unlabelled rows.

    With `for_generation=True` it returns `pixel_values` and `memory_embeds` (eval transform, no text), plus
    `ids`, `reports` and `findings` (the label rows) as Python lists for scoring; pop `GENERATION_METADATA_KEYS`
    before calling `generate`.

    Args:
        processor (`KifProcessor`): Image transforms and tokenizer.
        memory_features (`torch.Tensor`, *optional*): (N_train, D) report features, `load_features(clip_text_features.json)`.
        augment (`bool`): Use the train image transform.
        num_retrieved_reports (`int`): k, how many of each example's `clip_indices` to gather.
        for_generation (`bool`): Return generation inputs instead of training inputs.
    """

    processor: KifProcessor
    memory_features: torch.Tensor | None = None
    augment: bool = False
    num_retrieved_reports: int = KifConfig.num_retrieved_reports
    for_generation: bool = False

    def __post_init__(self):
        if self.for_generation and self.augment:
            raise ValueError("Generation uses the eval transform; set augment=False with for_generation=True.")

    def __call__(self, examples: list[dict]) -> dict:
        images = [open_first_image(example) for example in examples]
        memory_embeds = self.gather_memory(examples)
        if self.for_generation:
            pixel_values = self.processor.image_processor(images, augment=False, return_tensors="pt")["pixel_values"]
            return {
                "pixel_values": pixel_values,
                "memory_embeds": memory_embeds,
                "ids": [example["id"] for example in examples],
                "reports": [example["report"] for example in examples],
                "findings": [example["labels"] for example in examples],
            }
        findings = [example["labels"] for example in examples]
        inputs = self.processor(
            images=images,
            text=[example["report"] for example in examples],
            findings=findings,
            augment=self.augment,
            return_tensors="pt",
        )
        return {**inputs, "disease_labels": self.disease_labels(findings), "memory_embeds": memory_embeds}

    def disease_labels(self, findings: list[list[int] | None]) -> torch.LongTensor:
        """Classifier targets (B, num_observations), -100 (ignored by the loss) where a row has no state."""
        width = self.processor.num_observations
        rows = []
        for states in findings:
            states = [] if states is None else list(states)
            if len(states) > width:
                raise ValueError(f"A label row has {len(states)} states; the classifier has {width} observations.")
            rows.append(states + [IGNORE_INDEX] * (width - len(states)))
        return torch.tensor(rows, dtype=torch.long)

    def gather_memory(self, examples: list[dict]) -> torch.FloatTensor | None:
        """The features of each example's first k retrieved training reports, (B, k, D). For generation without
        features it is None: the model then retrieves from its own report-memory index."""
        if self.for_generation and self.memory_features is None:
            return None
        if self.memory_features is None:
            raise ValueError(
                f"Cannot build the retrieved-report memory: the collator has no memory_features. {MISSING_MEMORY_HELP}"
            )
        for example in examples:
            if example.get("clip_indices") is None:
                raise ValueError(
                    f"Cannot build the retrieved-report memory: example{_describe(example)} has no clip_indices. "
                    f"{MISSING_MEMORY_HELP}"
                )
        k = self.num_retrieved_reports
        for example in examples:
            indices = example["clip_indices"]
            if len(indices) < k:
                raise ValueError(
                    f"Example{_describe(example)} has {len(indices)} clip_indices; the model retrieves {k}."
                )
            if max(indices[:k]) >= len(self.memory_features):
                raise ValueError(
                    f"Example{_describe(example)} retrieves report {max(indices[:k])}, but memory_features has "
                    f"{len(self.memory_features)} rows."
                )
        indices = torch.tensor([example["clip_indices"][:k] for example in examples], dtype=torch.long)
        return self.memory_features[indices].float()


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval memory from a CLIP-style dual encoder
# ---------------------------------------------------------------------------------------------------------------------
EMBEDDING_BATCH_SIZE = 64
# Queries scored against all reports at once; bounds the similarity matrix (chunk x N) in memory.
RETRIEVAL_CHUNK_SIZE = 1024
# Decimals kept when writing features to JSON (float32 carries about 7 significant digits).
FEATURE_DECIMALS = 6


def _pooled(output) -> torch.Tensor:
    """transformers 5's `get_*_features` return a ModelOutput whose `pooler_output` is the projected embedding;
    older versions and other dual encoders return the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def compute_report_embeddings(
    reports: Sequence[str], model, processor, batch_size: int = EMBEDDING_BATCH_SIZE
) -> torch.Tensor:
    """L2-normalised text embeddings (N, D) of `reports` from a CLIP-style model (`get_text_features`).

    `processor` is the model's processor or tokenizer (called with `text=`).
    """
    reports = list(reports)  # also accepts a datasets Column
    if not reports:
        raise ValueError("No reports to embed.")
    embeddings = []
    for start in range(0, len(reports), batch_size):
        inputs = processor(
            text=reports[start : start + batch_size], padding=True, truncation=True, return_tensors="pt"
        )
        output = model.get_text_features(
            input_ids=inputs["input_ids"].to(model.device), attention_mask=inputs["attention_mask"].to(model.device)
        )
        embeddings.append(F.normalize(_pooled(output).float(), dim=-1).cpu())
    return torch.cat(embeddings)


@torch.no_grad()
def compute_image_embeddings(
    image_paths: Sequence[str], model, processor, batch_size: int = EMBEDDING_BATCH_SIZE
) -> torch.Tensor:
    """L2-normalised image embeddings (N, D) of the image files from a CLIP-style model (`get_image_features`).

    `processor` is the model's processor or image processor (called with `images=`).
    """
    image_paths = list(image_paths)
    if not image_paths:
        raise ValueError("No images to embed.")
    embeddings = []
    for start in range(0, len(image_paths), batch_size):
        images = [open_image(path).convert("RGB") for path in image_paths[start : start + batch_size]]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
        embeddings.append(
            F.normalize(_pooled(model.get_image_features(pixel_values=pixel_values)).float(), dim=-1).cpu()
        )
    return torch.cat(embeddings)


@torch.no_grad()
def compute_disease_word_embeddings(model, processor, words: Sequence[str] = DISEASE_WORDS) -> torch.Tensor:
    """Text embeddings (20, D) of the disease words, the memory of the model's "poke" transformer."""
    return compute_report_embeddings(list(words), model, processor)


def retrieve_nearest_reports(
    image_embeds: torch.Tensor,
    report_embeds: torch.Tensor,
    k: int,
    exclude_self: bool = False,
    exclude_indices: Sequence[int] | torch.Tensor | None = None,
) -> torch.LongTensor:
    """Indices (N, k) of the k reports most similar (cosine) to each image, most similar first.

    Args:
        image_embeds: (N, D) queries.
        report_embeds: (M, D) training report embeddings.
        exclude_self: The queries are the training images themselves (N == M): never retrieve an image's own report,
            which would leak the target into the input.
        exclude_indices: Alternatively, per query one report index to exclude (-1 for none).
    """
    if exclude_self:
        if len(image_embeds) != len(report_embeds):
            raise ValueError(
                f"exclude_self needs one image per report; got {len(image_embeds)} and {len(report_embeds)}."
            )
        exclude_indices = torch.arange(len(image_embeds))
    available = len(report_embeds) - (exclude_indices is not None)
    if not 0 < k <= available:
        raise ValueError(f"Cannot retrieve k={k} reports from {available} candidates per image.")
    queries, keys = F.normalize(image_embeds.float(), dim=-1), F.normalize(report_embeds.float(), dim=-1)
    if exclude_indices is not None:
        exclude_indices = torch.as_tensor(exclude_indices, dtype=torch.long)
    neighbours = []
    for start in range(0, len(queries), RETRIEVAL_CHUNK_SIZE):
        similarity = queries[start : start + RETRIEVAL_CHUNK_SIZE] @ keys.T
        if exclude_indices is not None:
            excluded = exclude_indices[start : start + RETRIEVAL_CHUNK_SIZE]
            rows = torch.nonzero(excluded >= 0).squeeze(1)
            similarity[rows, excluded[rows]] = -math.inf
        neighbours.append(similarity.topk(k, dim=1).indices)
    return torch.cat(neighbours)


def _features_to_json(features: torch.Tensor) -> list:
    return np.round(features.numpy().astype(np.float64), FEATURE_DECIMALS).tolist()


def build_retrieval_memory(
    annotation_file,
    image_dir,
    model,
    processor,
    output_dir,
    k: int = KifConfig.num_retrieved_reports,
    dataset: str = "mimic_cxr",
    batch_size: int = EMBEDDING_BATCH_SIZE,
) -> Path:
    """Give an annotation file PromptMRG's retrieval memory with a CLIP-style dual encoder.

    Embeds every training report and every study's first image, retrieves for each image the k most similar
    training reports (a training image never retrieves its own report), and writes to `output_dir`:
    `annotation.json` (the input entries plus `clip_indices`), `clip_text_features.json` (the training report
    embeddings) and `disease_word_features.json` (embeddings of `DISEASE_WORDS`). Returns the new annotation path.
    """
    annotation = read_annotation(annotation_file)
    # Validates every entry and image; reports are embedded as written.
    data = load_report_dataset(annotation_file, image_dir, dataset=dataset, clean_reports=False, max_words=None)
    report_embeds = compute_report_embeddings(data["train"]["report"], model, processor, batch_size)
    for key, split in ANNOTATION_SPLITS.items():
        if not len(data[split]):
            continue
        first_images = [paths[0] for paths in data[split]["image_path"]]
        image_embeds = compute_image_embeddings(first_images, model, processor, batch_size)
        neighbours = retrieve_nearest_reports(image_embeds, report_embeds, k, exclude_self=split == "train")
        for entry, indices in zip(annotation[key], neighbours.tolist()):
            entry["clip_indices"] = indices
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(output_dir / ANNOTATION_FILE, annotation)
    _write_json(output_dir / CLIP_FEATURES_FILE, _features_to_json(report_embeds))
    _write_json(
        output_dir / DISEASE_WORD_FEATURES_FILE, _features_to_json(compute_disease_word_embeddings(model, processor))
    )
    return output_dir / ANNOTATION_FILE


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic chest X-ray data set
# ---------------------------------------------------------------------------------------------------------------------
# Bump when the generator's output changes: the default cache directory is versioned, so a stale copy is not reused.
SYNTHETIC_VERSION = 1
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15}  # test: the rest

# Each finding kind: its observation, how often a study has it, and the fraction of those mentioned as uncertain.
_FINDING_KINDS = {
    # kind: (observation, prevalence, uncertain fraction)
    "cardiomegaly": ("Cardiomegaly", 0.22, 0.25),
    "effusion": ("Pleural Effusion", 0.20, 0.2),
    "pneumothorax": ("Pneumothorax", 0.08, 0.15),
    "opacity": ("Lung Opacity", 0.15, 0.0),
    "consolidation": ("Consolidation", 0.07, 0.0),
    "atelectasis": ("Atelectasis", 0.10, 0.0),
    "edema": ("Edema", 0.09, 0.25),
    "device": ("Support Devices", 0.18, 0.0),
    "calcification": ("Calcinosis", 0.06, 0.0),
    "emphysema": ("Emphysema", 0.04, 0.0),
}
_SECTION_OF_KIND = {
    "device": "devices", "cardiomegaly": "heart", "calcification": "mediastinum", "opacity": "lungs",
    "consolidation": "lungs", "atelectasis": "lungs", "edema": "lungs", "emphysema": "lungs",
    "effusion": "pleura", "pneumothorax": "pleura",
}  # fmt: skip
_SECTIONS = ("opening", "devices", "heart", "mediastinum", "lungs", "pleura", "bones", "closing")
# Not pathologies: a study whose only positive is a device still has "No Finding".
_NON_PATHOLOGIES = ("No Finding", "Support Devices")
_PATHOLOGIES = tuple(name for name in OBSERVATIONS if name not in _NON_PATHOLOGIES)
_LUNG_PATHOLOGIES = ("Lung Opacity", "Consolidation", "Atelectasis", "Edema", "Pneumonia", "Emphysema", "Lung Lesion")


@dataclass(frozen=True)
class SyntheticFinding:
    """One finding of a synthetic study: drawn into the image and described in the report."""

    kind: str  # key of _FINDING_KINDS
    state: int  # POSITIVE or UNCERTAIN
    side: str = ""  # "left", "right" or "bilateral" (the patient's side)
    zone: str = ""  # "upper" or "lower"
    variant: str = ""  # severity ("small", "moderate", "trace", "tiny") or device type


# Report sentences per (kind, state, bilateral / device type): (template, additional labels it asserts).
_FINDING_SENTENCES = {
    ("cardiomegaly", POSITIVE, ""): [
        ("The heart is enlarged.", {}), ("Moderate cardiomegaly.", {}), ("The cardiac silhouette is enlarged.", {}),
        ("There is cardiomegaly.", {}), ("Cardiomegaly is present.", {}),
    ],
    ("cardiomegaly", UNCERTAIN, ""): [
        ("The heart is borderline enlarged.", {}), ("Possible mild cardiomegaly.", {}),
        ("Mild cardiomegaly cannot be excluded.", {}),
    ],
    ("effusion", POSITIVE, ""): [
        ("{Size} {side} pleural effusion.", {}), ("There is a {size} {side} pleural effusion.", {}),
        ("A {size} {side} pleural effusion is present.", {}),
        ("{Size} {side} pleural effusion with blunting of the costophrenic angle.", {}),
    ],
    ("effusion", POSITIVE, "bilateral"): [
        ("{Size} bilateral pleural effusions.", {}), ("There are {size} bilateral pleural effusions.", {}),
        ("Bilateral {size} pleural effusions are present.", {}),
    ],
    ("effusion", UNCERTAIN, ""): [
        ("Possible small {side} pleural effusion.", {}),
        ("Blunting of the {side} costophrenic angle may represent a small effusion.", {}),
        ("A small {side} pleural effusion cannot be excluded.", {}),
    ],
    ("pneumothorax", POSITIVE, ""): [
        ("There is a small {side} apical pneumothorax.", {}), ("Small {side} apical pneumothorax.", {}),
        ("A {side} apical pneumothorax is present.", {}),
    ],
    ("pneumothorax", UNCERTAIN, ""): [
        ("A tiny {side} apical pneumothorax cannot be excluded.", {}), ("Possible tiny {side} apical pneumothorax.", {}),
    ],
    ("opacity", POSITIVE, ""): [
        ("There is a patchy opacity in the {side} {zone} lung.", {}), ("Focal opacity in the {side} {zone} lung zone.", {}),
        ("{Side} {zone} lung opacity.", {}),
        ("Patchy {side} {zone} lung opacity may represent atelectasis.", {"Atelectasis": UNCERTAIN}),
        ("Focal {side} {zone} lung opacity, concerning for pneumonia.", {"Pneumonia": UNCERTAIN}),
    ],
    ("consolidation", POSITIVE, ""): [
        ("Consolidation in the {side} {zone} lobe.", {}), ("There is {side} {zone} lobe consolidation.", {}),
        ("{Side} {zone} lobe consolidation, consistent with pneumonia.", {"Pneumonia": POSITIVE}),
        ("Dense {side} {zone} lobe consolidation, concerning for pneumonia.", {"Pneumonia": UNCERTAIN}),
    ],
    ("atelectasis", POSITIVE, ""): [
        ("Linear atelectasis at the {side} lung base.", {}), ("Mild {side} basilar atelectasis.", {}),
        ("Subsegmental atelectasis at the {side} base.", {}),
    ],
    ("atelectasis", POSITIVE, "bilateral"): [
        ("Bibasilar atelectasis.", {}), ("Mild bibasilar atelectasis.", {}), ("Linear atelectasis at both lung bases.", {}),
    ],
    ("edema", POSITIVE, ""): [
        ("Mild pulmonary edema.", {}), ("There is mild interstitial pulmonary edema.", {}),
        ("Perihilar haziness consistent with pulmonary edema.", {}), ("Moderate pulmonary edema.", {}),
    ],
    ("edema", UNCERTAIN, ""): [
        ("Mild perihilar haziness may reflect early pulmonary edema.", {}), ("Possible mild pulmonary edema.", {}),
    ],
    ("device", POSITIVE, "pacemaker"): [
        ("A left chest wall pacemaker is present with leads in the right atrium and right ventricle.", {}),
        ("Dual lead pacemaker in place.", {}), ("Left pectoral pacemaker with leads terminating in the heart.", {}),
    ],
    ("device", POSITIVE, "endotracheal tube"): [
        ("Endotracheal tube terminates approximately 4 cm above the carina.", {}),
        ("The endotracheal tube is in standard position.", {}), ("An endotracheal tube is in place.", {}),
    ],
    ("device", POSITIVE, "central line"): [
        ("Right internal jugular central venous catheter terminates in the mid SVC.", {}),
        ("A right internal jugular line ends in the superior vena cava.", {}), ("Right IJ catheter tip in the SVC.", {}),
    ],
    ("calcification", POSITIVE, ""): [
        ("Calcification of the aortic knob.", {}), ("Atherosclerotic calcifications of the aortic arch.", {}),
        ("The aortic knob is calcified.", {}),
    ],
    ("emphysema", POSITIVE, ""): [
        ("The lungs are hyperinflated, consistent with emphysema.", {}), ("Emphysematous changes are noted.", {}),
        ("Hyperinflated lungs with flattened diaphragms, compatible with emphysema.", {}),
    ],
}  # fmt: skip

# Statements about what is normal, per report section: slots (probability, alternatives). A slot is written with its
# probability, as one of its alternatives that applies: (sentence, labels it asserts, observations that must be
# absent besides those). An alternative applies when none of its observations is present or already stated.
_N = NEGATIVE  # short alias for the tables below
_PLEURA_NEGATIONS = [
    ("No pleural effusion or pneumothorax.", {"Pleural Effusion": _N, "Pneumothorax": _N}, ()),
    ("There is no pleural effusion or pneumothorax.", {"Pleural Effusion": _N, "Pneumothorax": _N}, ()),
    ("No pleural effusion.", {"Pleural Effusion": _N}, ()), ("There is no pleural effusion.", {"Pleural Effusion": _N}, ()),
    ("No pneumothorax.", {"Pneumothorax": _N}, ()), ("No pneumothorax is seen.", {"Pneumothorax": _N}, ()),
]  # fmt: skip
_NORMAL_STATEMENTS = {
    "opening": [(0.3, [
        ("PA and lateral views of the chest were obtained.", {}, ()), ("Frontal and lateral views of the chest.", {}, ()),
        ("Single frontal view of the chest.", {}, ()),
    ])],
    "heart": [(0.85, [
        ("The heart size is normal.", {"Cardiomegaly": _N}, ()), ("Heart size is normal.", {"Cardiomegaly": _N}, ()),
        ("The cardiac silhouette is within normal limits.", {"Cardiomegaly": _N}, ()),
        ("Normal heart size.", {"Cardiomegaly": _N}, ()),
    ])],
    "mediastinum": [(0.5, [
        ("The mediastinal contours are normal.", {"Enlarged Cardiomediastinum": _N}, ()),
        ("Mediastinal and hilar contours are unremarkable.", {"Enlarged Cardiomediastinum": _N}, ()),
        ("The cardiomediastinal silhouette is normal.", {"Enlarged Cardiomediastinum": _N}, ()),
    ])],
    "lungs": [
        (0.8, [
            ("The lungs are clear.", {}, _LUNG_PATHOLOGIES), ("Lungs are clear bilaterally.", {}, _LUNG_PATHOLOGIES),
            ("The lungs are well expanded and clear.", {}, _LUNG_PATHOLOGIES),
        ]),
        (0.45, [
            ("No focal consolidation.", {"Consolidation": _N}, ()), ("There is no focal consolidation.", {"Consolidation": _N}, ()),
            ("No focal airspace consolidation.", {"Consolidation": _N}, ()),
        ]),
        (0.35, [
            ("No pulmonary edema.", {"Edema": _N}, ()), ("There is no pulmonary edema.", {"Edema": _N}, ()),
            ("No evidence of pulmonary edema.", {"Edema": _N}, ()),
        ]),
        (0.15, [("No evidence of pneumonia.", {"Pneumonia": _N}, ())]),
    ],
    "pleura": [(0.9, _PLEURA_NEGATIONS), (0.9, _PLEURA_NEGATIONS)],  # a second try adds what a first one left out
    "bones": [(0.3, [
        ("No acute osseous abnormality.", {}, ()), ("The osseous structures are unremarkable.", {}, ()),
        ("No displaced rib fractures.", {"Fracture": _N}, ()),
    ])],
    "closing": [(0.5, [
        ("No acute cardiopulmonary process.", {}, _PATHOLOGIES), ("No acute cardiopulmonary abnormality.", {}, _PATHOLOGIES),
        ("No acute intrathoracic process.", {}, _PATHOLOGIES),
    ])],
}  # fmt: skip
_STATE_PRIORITY = {BLANK: 0, NEGATIVE: 1, UNCERTAIN: 2, POSITIVE: 3}


def _choice(rng: np.random.Generator, options: Sequence):
    return options[rng.integers(len(options))]


def _sample_finding(kind: str, rng: np.random.Generator) -> SyntheticFinding:
    _, _, uncertain_fraction = _FINDING_KINDS[kind]
    state = UNCERTAIN if rng.random() < uncertain_fraction else POSITIVE
    side = _choice(rng, ("left", "right"))
    if kind == "effusion":
        if state == UNCERTAIN:
            return SyntheticFinding(kind, state, side, variant="trace")
        side = _choice(rng, ("left", "right", "left", "right", "bilateral"))
        return SyntheticFinding(kind, state, side, variant=_choice(rng, ("small", "small", "moderate")))
    if kind == "pneumothorax":
        return SyntheticFinding(kind, state, side, zone="upper", variant="tiny" if state == UNCERTAIN else "small")
    if kind == "opacity":
        return SyntheticFinding(kind, state, side, zone=_choice(rng, ("upper", "lower")))
    if kind == "consolidation":
        return SyntheticFinding(kind, state, side, zone=_choice(rng, ("lower", "lower", "upper")))
    if kind == "atelectasis":
        return SyntheticFinding(kind, state, _choice(rng, ("left", "right", "bilateral")), zone="lower")
    if kind == "device":
        return SyntheticFinding(kind, state, variant=_choice(rng, ("pacemaker", "endotracheal tube", "central line")))
    return SyntheticFinding(kind, state)


def sample_synthetic_findings(rng: np.random.Generator) -> list[SyntheticFinding]:
    """Each finding kind independently with its prevalence; about a quarter of studies are normal."""
    return [
        _sample_finding(kind, rng) for kind, (_, prevalence, _) in _FINDING_KINDS.items() if rng.random() < prevalence
    ]


def _finding_sentence(finding: SyntheticFinding, rng: np.random.Generator) -> tuple[str, dict[str, int]]:
    group = finding.variant if finding.kind == "device" else ("bilateral" if finding.side == "bilateral" else "")
    template, extra = _choice(rng, _FINDING_SENTENCES[(finding.kind, finding.state, group)])
    values = {"side": finding.side, "zone": finding.zone, "size": finding.variant}
    values.update({name.capitalize(): value.capitalize() for name, value in values.items()})
    observation = _FINDING_KINDS[finding.kind][0]
    return template.format(**values), {observation: finding.state, **extra}


def _merge_states(labels: dict[str, int], stated: dict[str, int]) -> None:
    for name, state in stated.items():
        if _STATE_PRIORITY[state] > _STATE_PRIORITY[labels[name]]:
            labels[name] = state


def write_synthetic_report(findings: list[SyntheticFinding], rng: np.random.Generator) -> tuple[str, list[int]]:
    """A radiology-style report of the findings and its 18 labels, which follow from its sentences: stated findings
    positive or uncertain, negated ones negative, unmentioned ones blank, and "No Finding" positive when no pathology
    is positive or uncertain."""
    labels = dict.fromkeys(OBSERVATIONS, BLANK)
    sentences = {section: [] for section in _SECTIONS}
    for finding in findings:
        sentence, stated = _finding_sentence(finding, rng)
        sentences[_SECTION_OF_KIND[finding.kind]].append(sentence)
        _merge_states(labels, stated)
    present = {name for name, state in labels.items() if state in (POSITIVE, UNCERTAIN)}
    for section, slots in _NORMAL_STATEMENTS.items():
        for probability, alternatives in slots:
            if rng.random() >= probability:
                continue
            applicable = [
                (sentence, stated) for sentence, stated, absent in alternatives
                if not present.intersection(absent) and all(labels[name] == BLANK for name in stated)
            ]  # fmt: skip
            if applicable:
                sentence, stated = _choice(rng, applicable)
                sentences[section].append(sentence)
                labels.update(stated)
    if not present.intersection(_PATHOLOGIES):
        labels["No Finding"] = POSITIVE
    report = " ".join(sentence for section in _SECTIONS for sentence in sentences[section])
    return report, [labels[name] for name in OBSERVATIONS]


# Synthetic anatomy in fractions of the image side (x to the right, y down). Radiographs are viewed facing the
# patient: the patient's right lung is on the image's left.
_BODY_BOX = (0.03, 0.02, 0.97, 1.2)
# Lungs are ellipses whose lower part the diaphragm covers, leaving sharp costophrenic angles at the sides.
_LUNG_BOXES = {"right": (0.13, 0.12, 0.47, 1.08), "left": (0.53, 0.12, 0.87, 1.08)}
# Hemidiaphragms: tops of large ellipses (the right one higher), and the abdomen below them.
_DIAPHRAGM_BOXES = {"right": (0.08, 0.72, 0.52, 1.40), "left": (0.48, 0.75, 0.92, 1.43)}
_ABDOMEN_BOX = (0.13, 0.86, 0.87, 1.0)
_HYPERINFLATION_DROP = 0.07  # emphysema: lower, flatter diaphragm
_MEDIASTINUM_POLYGON = ((0.45, 0.0), (0.55, 0.0), (0.58, 0.60), (0.42, 0.60))
_HEART_CENTER, _HEART_HALF_HEIGHT = (0.55, 0.66), 0.12
# Cardiothoracic ratio about 0.4 (normal), 0.5 (borderline) and 0.65 (enlarged) of the 0.74-wide thorax.
_HEART_HALF_WIDTH = {"normal": 0.15, "borderline": 0.19, "enlarged": 0.24}
_HILA = {"right": (0.41, 0.42), "left": (0.59, 0.42)}
_CLAVICLES = {"right": (0.12, 0.17, 0.44, 0.12), "left": (0.88, 0.17, 0.56, 0.12)}
_RIB_ROWS = np.linspace(0.13, 0.73, 9)
_AORTIC_KNOB_BOX = (0.53, 0.18, 0.61, 0.26)
# Opacity centres per zone and side; the lower zone stays above the heart, which would hide a retrocardiac opacity.
_ZONE_ROWS = {"upper": (0.25, 0.38), "lower": (0.50, 0.60)}
_LATERAL_COLUMNS = {"right": (0.20, 0.34), "left": (0.68, 0.80)}
_ATELECTASIS_ROWS = (0.60, 0.66)
# Effusion fluid level by size; the meniscus rises this much towards the chest wall.
_EFFUSION_LEVEL = {"trace": 0.73, "small": 0.66, "moderate": 0.55}
_MENISCUS_RISE = 0.07
# Pneumothorax: how far the collapsed lung edge sits from the chest wall and apex, and the lowest row of the air.
_PNEUMOTHORAX_GAP = {"tiny": 0.035, "small": 0.065}
_PNEUMOTHORAX_BOTTOM = 0.5
_GRAY = {
    "background": 8, "soft_tissue": 100, "lung": 45, "emphysema_lung": 30, "mediastinum": 175, "heart": 185,
    "diaphragm": 165, "fluid": 160, "air": 10, "pleural_line": 95, "clavicle": 170, "device": 245, "calcification": 235,
}  # fmt: skip
# Gray-level increments of lung structures and parenchymal findings.
_CONTRAST = {
    "rib": 30,
    "marking": 22,
    "opacity": 75,
    "consolidation": 105,
    "atelectasis": 85,
    "edema": 55,
    "edema_uncertain": 30,
}
_BLOB_SIGMA = {"opacity": 0.045, "consolidation": 0.07}
_EDEMA_SIGMA = 0.12
_NUM_MARKINGS = 7
# Acquisition variation: scale, shift (fraction of the side), contrast, brightness, noise and blur (fraction of the side).
_JITTER = {"scale": 0.05, "shift": 0.025, "contrast": 0.15, "brightness": 12.0, "noise": 4.0, "blur": 0.004}


def _px(size: int, *fractions: float) -> list[int]:
    return [round(value * size) for value in fractions]


def _width(size: int, fraction: float = 0.008) -> int:
    return max(1, round(fraction * size))


def _mask(size: int, draw) -> np.ndarray:
    """Boolean mask of what `draw(ImageDraw)` paints."""
    layer = Image.new("L", (size, size))
    draw(ImageDraw.Draw(layer))
    return np.asarray(layer) > 0


def _shape_mask(size: int, shape: str, *fractions: float, **style) -> np.ndarray:
    """Boolean mask of one `ImageDraw` shape ("ellipse", "line", ...) at coordinates given as fractions."""
    style = {"fill": 255, **style}
    return _mask(size, lambda canvas: getattr(canvas, shape)(_px(size, *fractions), **style))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) as fractions of the side."""
    coordinates = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(coordinates, coordinates)


def _gaussian(size: int, center: tuple[float, float], sigma: float) -> np.ndarray:
    x, y = _grid(size)
    return np.exp(-((x - center[0]) ** 2 + (y - center[1]) ** 2) / (2 * sigma**2))


def _sides(side: str) -> tuple[str, ...]:
    return ("right", "left") if side == "bilateral" else (side,)


def _draw_lung_markings(pixels, lungs, size, rng):
    """Vessels branching from the hila; a pneumothorax shows none."""

    def draw(canvas):
        for side, (hx, hy) in _HILA.items():
            outward = -1 if side == "right" else 1
            for _ in range(_NUM_MARKINGS):
                angle = rng.uniform(-1.2, 1.2)
                length = rng.uniform(0.10, 0.24)
                end = (hx + outward * length * math.cos(angle), hy + length * math.sin(angle))
                canvas.line(_px(size, hx, hy, *end), fill=255, width=_width(size, 0.005))

    pixels += _CONTRAST["marking"] * (_mask(size, draw) & lungs)


def _draw_parenchyma(pixels, lungs, findings, size, rng):
    """Opacity, consolidation, atelectasis and edema: brighter lung, confined to the lungs."""
    added = np.zeros_like(pixels)
    for finding in findings:
        if finding.kind in _BLOB_SIGMA:
            center = (rng.uniform(*_LATERAL_COLUMNS[finding.side]), rng.uniform(*_ZONE_ROWS[finding.zone]))
            blob = _gaussian(size, center, _BLOB_SIGMA[finding.kind])
            if finding.kind == "consolidation":  # dense and homogeneous: a plateau rather than a soft peak
                blob = np.minimum(1.6 * blob, 1.0)
            added += _CONTRAST[finding.kind] * blob
        elif finding.kind == "atelectasis":
            for side in _sides(finding.side):
                x = rng.uniform(*_LATERAL_COLUMNS[side])
                y = rng.uniform(*_ATELECTASIS_ROWS)
                tilt = rng.uniform(-0.02, 0.02)
                band = _shape_mask(size, "line", x - 0.08, y - tilt, x + 0.08, y + tilt, width=_width(size, 0.024))
                added += _CONTRAST["atelectasis"] * band
        elif finding.kind == "edema":
            contrast = _CONTRAST["edema" if finding.state == POSITIVE else "edema_uncertain"]
            added += contrast * sum(_gaussian(size, hilum, _EDEMA_SIGMA) for hilum in _HILA.values())
    pixels += added * lungs


def _draw_pneumothorax(pixels, finding, size):
    """Black air without lung markings between the chest wall and the collapsed lung's edge (a thin pleural line)."""
    x0, y0, x1, y1 = _LUNG_BOXES[finding.side]
    gap = _PNEUMOTHORAX_GAP[finding.variant]
    collapsed = (x0 + gap, y0 + 1.3 * gap, x1, y1) if finding.side == "right" else (x0, y0 + 1.3 * gap, x1 - gap, y1)
    _, y = _grid(size)
    apex = y < _PNEUMOTHORAX_BOTTOM
    lung = _shape_mask(size, "ellipse", *_LUNG_BOXES[finding.side])
    inside = _shape_mask(size, "ellipse", *collapsed)
    edge = _shape_mask(size, "ellipse", *collapsed, fill=None, outline=255, width=_width(size, 0.006))
    pixels[lung & ~inside & apex] = _GRAY["air"]
    pixels[lung & edge & apex] = _GRAY["pleural_line"]


def _draw_effusion(pixels, finding, size):
    """Fluid filling the lung base up to a level that curves up towards the chest wall (meniscus), blunting the
    costophrenic angle."""
    x, y = _grid(size)
    level = _EFFUSION_LEVEL[finding.variant]
    for side in _sides(finding.side):
        x0, _, x1, _ = _LUNG_BOXES[side]
        lateral = np.clip((x1 - x) / (x1 - x0) if side == "right" else (x - x0) / (x1 - x0), 0, 1)
        lung = _shape_mask(size, "ellipse", *_LUNG_BOXES[side])
        pixels[lung & (y > level - _MENISCUS_RISE * lateral**2)] = _GRAY["fluid"]


def _draw_device(canvas, finding, size):
    gray, width = _GRAY["device"], _width(size)
    if finding.variant == "pacemaker":
        canvas.rounded_rectangle(_px(size, 0.70, 0.13, 0.80, 0.19), radius=_width(size), fill=gray)
        canvas.line(_px(size, 0.72, 0.18, 0.60, 0.30, 0.52, 0.60), fill=gray, width=width, joint="curve")
        canvas.line(_px(size, 0.74, 0.18, 0.62, 0.34, 0.58, 0.72), fill=gray, width=width, joint="curve")
    elif finding.variant == "endotracheal tube":
        canvas.line(_px(size, 0.50, 0.0, 0.50, 0.27), fill=gray, width=_width(size, 0.012))
    else:  # central line through the right internal jugular vein into the superior vena cava
        canvas.line(_px(size, 0.38, 0.0, 0.44, 0.15, 0.47, 0.33), fill=gray, width=width, joint="curve")


def _draw_overlays(image: Image.Image, findings, size: int) -> None:
    """Opaque structures drawn over the lungs: diaphragm and abdomen, mediastinum, heart, clavicles, calcification
    and devices."""
    canvas = ImageDraw.Draw(image)
    drop = _HYPERINFLATION_DROP if any(finding.kind == "emphysema" for finding in findings) else 0.0
    for x0, y0, x1, y1 in _DIAPHRAGM_BOXES.values():
        canvas.ellipse(_px(size, x0, y0 + drop, x1, y1 + drop), fill=_GRAY["diaphragm"])
    canvas.rectangle(_px(size, *_ABDOMEN_BOX), fill=_GRAY["diaphragm"])
    canvas.polygon([tuple(_px(size, *point)) for point in _MEDIASTINUM_POLYGON], fill=_GRAY["mediastinum"])
    heart = _heart_size(findings)
    (cx, cy), half_width = _HEART_CENTER, _HEART_HALF_WIDTH[heart]
    canvas.ellipse(
        _px(size, cx - half_width, cy - _HEART_HALF_HEIGHT, cx + half_width, cy + _HEART_HALF_HEIGHT),
        fill=_GRAY["heart"],
    )
    for clavicle in _CLAVICLES.values():
        canvas.line(_px(size, *clavicle), fill=_GRAY["clavicle"], width=_width(size, 0.016))
    for finding in findings:
        if finding.kind == "calcification":
            canvas.arc(_px(size, *_AORTIC_KNOB_BOX), 180, 360, fill=_GRAY["calcification"], width=_width(size))
        elif finding.kind == "device":
            _draw_device(canvas, finding, size)


def _heart_size(findings: list[SyntheticFinding]) -> str:
    for finding in findings:
        if finding.kind == "cardiomegaly":
            return "enlarged" if finding.state == POSITIVE else "borderline"
    return "normal"


def _acquire(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Positioning and exposure differences between studies: blur, scale and shift, contrast, brightness, noise."""
    size = image.width
    image = image.filter(ImageFilter.GaussianBlur(_JITTER["blur"] * size))
    scale = 1 + rng.uniform(-_JITTER["scale"], _JITTER["scale"])
    dx, dy = rng.uniform(-_JITTER["shift"], _JITTER["shift"], 2) * size
    center = size / 2
    # The affine maps output to input coordinates: scale about the centre, then shift.
    coefficients = (1 / scale, 0, center - center / scale + dx, 0, 1 / scale, center - center / scale + dy)
    image = image.transform(
        image.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR, fillcolor=_GRAY["background"]
    )
    contrast = 1 + rng.uniform(-_JITTER["contrast"], _JITTER["contrast"])
    brightness = rng.uniform(-_JITTER["brightness"], _JITTER["brightness"])
    pixels = (np.asarray(image, dtype=np.float32) - 128) * contrast + 128 + brightness
    pixels += rng.normal(0.0, _JITTER["noise"], pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def render_synthetic_image(findings: list[SyntheticFinding], rng: np.random.Generator, size: int = 256) -> Image.Image:
    """A grayscale ("L") frontal chest radiograph with the findings drawn where a radiologist would see them."""
    pixels = np.full((size, size), _GRAY["background"], dtype=np.float32)
    pixels[_shape_mask(size, "ellipse", *_BODY_BOX)] = _GRAY["soft_tissue"]
    lungs = _shape_mask(size, "ellipse", *_LUNG_BOXES["right"]) | _shape_mask(size, "ellipse", *_LUNG_BOXES["left"])
    emphysema = any(finding.kind == "emphysema" for finding in findings)
    pixels[lungs] = _GRAY["emphysema_lung" if emphysema else "lung"]
    _draw_lung_markings(pixels, lungs, size, rng)
    _draw_parenchyma(pixels, lungs, findings, size, rng)
    for finding in findings:
        if finding.kind == "pneumothorax":
            _draw_pneumothorax(pixels, finding, size)

    def draw_ribs(canvas):
        for row in _RIB_ROWS:
            for center_x in (0.30, 0.70):
                canvas.arc(
                    _px(size, center_x - 0.2, row, center_x + 0.2, row + 0.12), 180, 360, fill=255, width=_width(size)
                )

    pixels += _CONTRAST["rib"] * (_mask(size, draw_ribs) & lungs)
    for finding in findings:
        if finding.kind == "effusion":
            _draw_effusion(pixels, finding, size)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    _draw_overlays(image, findings, size)
    return _acquire(image, rng)


# Synthetic retrieval features. No CLIP model is available offline, so a report's feature is the normalised sum of
# fixed random vectors, one per (observation, stated state) of its labels, plus phrasing noise; an image's query is
# the sum for its visible (positive or uncertain) findings plus more noise. Reports stating the same findings are
# close, so retrieval behaves like a good but imperfect image-text encoder.
_PHRASING_NOISE = 0.3
_QUERY_NOISE = 0.8
# Disease words -> the observation whose positive-state vector they embed (others get their own random vector).
_DISEASE_WORD_OBSERVATIONS = {
    "normal": "No Finding", "cardiomegaly": "Cardiomegaly", "scoliosis": "Scoliosis", "fractures": "Fracture",
    "effusion": "Pleural Effusion", "thickening": "Pleural Other", "pneumothorax": "Pneumothorax", "hernia": "Hernia",
    "calcinosis": "Calcinosis", "emphysema": "Emphysema", "pneumonia": "Pneumonia", "edema": "Edema",
    "atelectasis": "Atelectasis", "opacity": "Lung Opacity", "lesion": "Lung Lesion", "airspace disease": "Consolidation",
    "medical device": "Support Devices",
}  # fmt: skip


def _random_unit_scale(rng: np.random.Generator, shape: tuple, dim: int) -> np.ndarray:
    """Gaussian vectors of expected unit norm."""
    return rng.normal(0.0, 1.0 / math.sqrt(dim), (*shape, dim))


def _normalize(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def _synthetic_embeddings(labels, fact_vectors, rng) -> tuple[np.ndarray, np.ndarray]:
    """(report feature, image query) of one study."""
    dim = fact_vectors.shape[-1]
    stated = sum(fact_vectors[observation, state] for observation, state in enumerate(labels))
    visible = sum(fact_vectors[o, s] for o, s in enumerate(labels) if s in (POSITIVE, UNCERTAIN))
    report = _normalize(stated + _PHRASING_NOISE * _random_unit_scale(rng, (), dim))
    query = _normalize(visible + _QUERY_NOISE * _random_unit_scale(rng, (), dim))
    return report, query


def _synthetic_disease_word_features(fact_vectors, rng) -> np.ndarray:
    dim = fact_vectors.shape[-1]
    rows = []
    for word in DISEASE_WORDS:
        observation = _DISEASE_WORD_OBSERVATIONS.get(word)
        base = (
            fact_vectors[OBSERVATIONS.index(observation), POSITIVE]
            if observation
            else _random_unit_scale(rng, (), dim)
        )
        rows.append(_normalize(base + _PHRASING_NOISE * _random_unit_scale(rng, (), dim)))
    return np.stack(rows)


def _split_keys(num_studies: int) -> list[str]:
    num_train = round(SPLIT_FRACTIONS["train"] * num_studies)
    num_val = round(SPLIT_FRACTIONS["val"] * num_studies)
    return ["train"] * num_train + ["val"] * num_val + ["test"] * (num_studies - num_train - num_val)


def compute_base_probs(train_labels: Sequence[Sequence[int]]) -> list[float]:
    """Positive rate of each CheXpert observation among training label rows (`base_probs.json`), at least
    `MIN_BASE_PROB`: the model adds log(base_probs) to its logits, which must stay finite for observations that
    no training report has."""
    states = np.asarray([row[:NUM_CHEXPERT] for row in train_labels])
    rates = np.maximum((states == POSITIVE).mean(axis=0), MIN_BASE_PROB)
    return rates.round(FEATURE_DECIMALS).tolist()


def make_synthetic_dataset(
    output_dir,
    num_studies: int = 300,
    seed: int = 0,
    image_size: int = 256,
    num_retrieved_reports: int = KifConfig.num_retrieved_reports,
    report_embedding_dim: int = KifConfig.report_embedding_dim,
) -> Path:
    """Generate the synthetic chest X-ray data set in PromptMRG's file formats; deterministic in `seed`.

    Writes `images/<id>/0.png` (grayscale), `annotation.json` (70/15/15 train/val/test; 18 labels for train, 14
    for val/test; `clip_indices` of the k nearest training reports, a training study never retrieving its own),
    `clip_text_features.json`, `disease_word_features.json`, `base_probs.json` and `synthetic_config.json` (these
    arguments and the generator version). Load it with
    `load_report_dataset(out / "annotation.json", out / "images", dataset="synthetic",
    clip_features_file=out / "clip_text_features.json")`. Returns `output_dir`.
    """
    split_keys = _split_keys(num_studies)
    num_train = split_keys.count("train")
    if num_train <= num_retrieved_reports:
        raise ValueError(
            f"{num_studies} studies give {num_train} training reports; retrieving {num_retrieved_reports} per image "
            f"(excluding its own) needs more than {num_retrieved_reports}."
        )
    output_dir = Path(output_dir)
    fact_seed, word_seed, *study_seeds = np.random.SeedSequence(seed).spawn(num_studies + 2)
    # One vector per (observation, state); blank states add nothing.
    fact_vectors = _random_unit_scale(
        np.random.default_rng(fact_seed), (len(OBSERVATIONS), len(FINDING_STATES)), report_embedding_dim
    )
    fact_vectors[:, BLANK] = 0.0

    annotation = {key: [] for key in ANNOTATION_SPLITS}
    report_features, queries = [], []
    for index, (key, study_seed) in enumerate(zip(split_keys, study_seeds)):
        rng = np.random.default_rng(study_seed)
        findings = sample_synthetic_findings(rng)
        report, labels = write_synthetic_report(findings, rng)
        study_id = f"synthetic_{index:05d}"
        image_path = f"{study_id}/0.png"
        (output_dir / IMAGE_DIR_NAME / study_id).mkdir(parents=True, exist_ok=True)
        render_synthetic_image(findings, rng, image_size).save(output_dir / IMAGE_DIR_NAME / image_path, format="PNG")
        report_feature, query = _synthetic_embeddings(labels, fact_vectors, rng)
        if key == "train":
            report_features.append(report_feature)
        queries.append(query)
        labels = labels if key == "train" else labels[:NUM_CHEXPERT]
        annotation[key].append(
            {"id": study_id, "report": report, "image_path": [image_path], "split": key, "labels": labels}
        )

    report_features = torch.from_numpy(np.stack(report_features)).float()
    neighbours = retrieve_nearest_reports(
        torch.from_numpy(np.stack(queries)).float(),
        report_features,
        num_retrieved_reports,
        exclude_indices=[i if key == "train" else -1 for i, key in enumerate(split_keys)],  # train studies come first
    )
    entries = [entry for key in ANNOTATION_SPLITS for entry in annotation[key]]
    for entry, indices in zip(entries, neighbours.tolist()):
        entry["clip_indices"] = indices

    disease_words = _synthetic_disease_word_features(fact_vectors, np.random.default_rng(word_seed))
    _write_json(output_dir / ANNOTATION_FILE, annotation)
    _write_json(output_dir / CLIP_FEATURES_FILE, _features_to_json(report_features))
    _write_json(output_dir / DISEASE_WORD_FEATURES_FILE, _features_to_json(torch.from_numpy(disease_words)))
    _write_json(output_dir / BASE_PROBS_FILE, compute_base_probs([entry["labels"] for entry in annotation["train"]]))
    settings = synthetic_settings(
        num_studies=num_studies, seed=seed, image_size=image_size,
        num_retrieved_reports=num_retrieved_reports, report_embedding_dim=report_embedding_dim,
    )  # fmt: skip
    _write_json(output_dir / SYNTHETIC_SETTINGS_FILE, settings)
    return output_dir


def synthetic_settings(**generator_kwargs) -> dict:
    """The generator version and every `make_synthetic_dataset` argument (defaults filled in) but the directory:
    what `synthetic_config.json` records."""
    bound = inspect.signature(make_synthetic_dataset).bind(None, **generator_kwargs)
    bound.apply_defaults()
    return {
        "version": SYNTHETIC_VERSION,
        **{name: value for name, value in bound.arguments.items() if name != "output_dir"},
    }


def default_synthetic_dir(**generator_kwargs) -> Path:
    """Where `ensure_synthetic_dataset` keeps a synthetic data set: `$KIF_DATA_DIR/synthetic-v<N>` (`KIF_DATA_DIR`
    defaulting to `~/.cache/kif_isd`), suffixed with the arguments that differ from the defaults, e.g.
    `synthetic-v1-report_embedding_dim64`."""
    root = Path(os.environ.get("KIF_DATA_DIR") or Path.home() / ".cache" / "kif_isd")
    defaults, settings = synthetic_settings(), synthetic_settings(**generator_kwargs)
    suffix = "".join(f"-{name}{value}" for name, value in settings.items() if value != defaults[name])
    return root / f"synthetic-v{SYNTHETIC_VERSION}{suffix}"


def ensure_synthetic_dataset(path=None, **generator_kwargs) -> Path:
    """Return the synthetic data set made with `generator_kwargs` (see `make_synthetic_dataset`) at `path` (default
    `default_synthetic_dir(**generator_kwargs)`), generating it if absent.

    Generation writes to a temporary sibling directory that is renamed into place when complete, so an interrupted
    run never leaves a half-written data set, and concurrent runs keep whichever finished first. A data set already
    at `path` but made with other settings is an error, never silently reused.
    """
    settings = synthetic_settings(**generator_kwargs)
    path = Path(path) if path is not None else default_synthetic_dir(**generator_kwargs)
    if not (path / ANNOTATION_FILE).is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            logger.info("Generating the synthetic data set in %s.", path)
            make_synthetic_dataset(staging, **generator_kwargs)
            staging.rename(path)
        except OSError:
            if not (path / ANNOTATION_FILE).is_file():  # else another process finished first
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    found = _read_json(path / SYNTHETIC_SETTINGS_FILE) if (path / SYNTHETIC_SETTINGS_FILE).is_file() else None
    if found != settings:
        raise ValueError(
            f"{path} holds a data set made with {found}, not {settings}; remove it or choose another path."
        )
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Input pipeline throughput (a measurement, not a test)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _ImageBatcher:
    """Decode + transform only: what a DataLoader worker does per batch besides tokenisation."""

    image_processor: KifImageProcessor
    augment: bool

    def __call__(self, examples):
        images = [open_first_image(example) for example in examples]
        return self.image_processor(images, augment=self.augment, return_tensors="pt")["pixel_values"]


def measure_image_throughput(
    dataset: Dataset, image_processor, augment: bool = False, num_workers: int = 0, batch_size: int = 16
) -> float:
    """Images per second that a `DataLoader` decodes and transforms over one pass of `dataset` (worker start-up
    included)."""
    columns = dataset.select_columns(["id", "split", "annotation_index", "image_path"])
    loader = DataLoader(
        columns, batch_size=batch_size, num_workers=num_workers, collate_fn=_ImageBatcher(image_processor, augment)
    )
    start = time.perf_counter()
    count = sum(len(batch) for batch in loader)
    return count / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
def _make_synthetic(args):
    start = time.perf_counter()
    make_synthetic_dataset(
        args.output_dir,
        args.num_studies,
        args.seed,
        args.image_size,
        args.num_retrieved_reports,
        args.report_embedding_dim,
    )
    print(f"Wrote {args.num_studies} synthetic studies to {args.output_dir} in {time.perf_counter() - start:.1f} s.")


def _check(args):
    data = load_report_dataset(
        args.annotation, args.image_dir, dataset=args.dataset, clip_features_file=args.clip_features,
        skip_missing_images=args.skip_missing_images, skip_empty_reports=args.skip_empty_reports,
    )  # fmt: skip
    for split, dataset in data.items():
        if args.decode_images:
            verify_images(dataset)
        skipped = ", ".join(
            f"{count} skipped for {reason.replace('_', ' ')}" for reason, count in data.skipped[split].items() if count
        )
        print(f"{split}: {len(dataset)} examples" + (f" ({skipped})" if skipped else ""))


def _build_memory(args):
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(args.clip_model).eval()
    processor = AutoProcessor.from_pretrained(args.clip_model)
    path = build_retrieval_memory(
        args.annotation, args.image_dir, model, processor, args.output_dir, args.k, args.dataset
    )
    print(
        f"Wrote {path}, {Path(args.output_dir) / CLIP_FEATURES_FILE} and {Path(args.output_dir) / DISEASE_WORD_FEATURES_FILE}."
    )


def _benchmark(args):
    data_dir = args.data_dir or ensure_synthetic_dataset()
    data = load_report_dataset(data_dir / ANNOTATION_FILE, data_dir / IMAGE_DIR_NAME, dataset="synthetic")
    image_processor = KifImageProcessor()
    for augment in (False, True):
        for num_workers in args.num_workers:
            rate = measure_image_throughput(data["train"], image_processor, augment, num_workers, args.batch_size)
            print(f"{'train' if augment else 'eval'} transform, num_workers={num_workers}: {rate:.0f} images/s")


def main(argv=None):
    parser = argparse.ArgumentParser(description="KIF-ISD data tools.")
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser("make-synthetic", help="Generate the synthetic chest X-ray data set.")
    make.add_argument("output_dir", type=Path)
    make.add_argument("--num_studies", type=int, default=300)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--image_size", type=int, default=256)
    make.add_argument("--num_retrieved_reports", type=int, default=KifConfig.num_retrieved_reports)
    make.add_argument("--report_embedding_dim", type=int, default=KifConfig.report_embedding_dim)
    make.set_defaults(run=_make_synthetic)

    check = commands.add_parser("check", help="Validate an annotation file and its images; print split sizes.")
    check.add_argument("annotation", type=Path)
    check.add_argument("image_dir", type=Path)
    check.add_argument("--dataset", choices=sorted(DATASET_PRESETS), default="mimic_cxr")
    check.add_argument("--clip_features", type=Path, help=f"{CLIP_FEATURES_FILE}, to check clip_indices against it.")
    check.add_argument("--skip_missing_images", action="store_true")
    check.add_argument("--skip_empty_reports", action="store_true")
    check.add_argument("--decode_images", action="store_true", help="Also decode every study's first image.")
    check.set_defaults(run=_check)

    memory = commands.add_parser(
        "build-memory", help="Add retrieval memory (clip_indices, features) with a CLIP model."
    )
    memory.add_argument("annotation", type=Path)
    memory.add_argument("image_dir", type=Path)
    memory.add_argument("output_dir", type=Path)
    memory.add_argument("--clip_model", required=True, help="Local directory (or Hub id) of a CLIP-style model.")
    memory.add_argument("--k", type=int, default=KifConfig.num_retrieved_reports)
    memory.add_argument("--dataset", choices=sorted(DATASET_PRESETS), default="mimic_cxr")
    memory.set_defaults(run=_build_memory)

    bench = commands.add_parser("benchmark", help="Measure image decoding + transform throughput on synthetic data.")
    bench.add_argument("data_dir", type=Path, nargs="?", help="Synthetic data directory (default: the cache).")
    bench.add_argument("--num_workers", type=int, nargs="+", default=[0, 2])
    bench.add_argument("--batch_size", type=int, default=16)
    bench.set_defaults(run=_benchmark)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    main()
