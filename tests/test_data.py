"""Tests of data_kif: annotation formats, bad input, the collator, retrieval memory, the synthetic data set, the CLI."""

import importlib.util
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data_kif
from configuration_kif import CHEXPERT_OBSERVATIONS, DISEASE_WORDS, KifConfig
from data_kif import (
    ANNOTATION_FILE,
    BASE_PROBS_FILE,
    CLIP_FEATURES_FILE,
    DISEASE_WORD_FEATURES_FILE,
    IMAGE_DIR_NAME,
    MIN_BASE_PROB,
    OBSERVATIONS,
    KifDataCollator,
    build_retrieval_memory,
    compute_disease_word_embeddings,
    compute_image_embeddings,
    compute_report_embeddings,
    default_synthetic_dir,
    ensure_synthetic_dataset,
    load_base_probs,
    load_features,
    load_report_dataset,
    main,
    make_synthetic_dataset,
    open_image,
    retrieve_nearest_reports,
    verify_images,
)
from processing_kif import KifImageProcessor, KifProcessor, train_report_tokenizer


TINY_DIR = Path(__file__).resolve().parent.parent / "configs" / "kif-tiny"
REPORT = "The heart is normal. The lungs are clear."
CLEANED_REPORT = "the heart is normal . the lungs are clear ."
LABELS_18 = [0, 1, 2, 3, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0, 1, 0]
LABELS_14 = LABELS_18[:14]
NUM_FEATURES, FEATURE_DIM = 6, 4
# Small synthetic sets for generator tests: (studies, k, D, image side).
SMALL_SYNTHETIC = {"num_studies": 24, "num_retrieved_reports": 3, "report_embedding_dim": 8, "image_size": 64}


def observation(name):
    return OBSERVATIONS.index(name)


# ---------------------------------------------------------------------------------------------------------------------
# Small annotation files
# ---------------------------------------------------------------------------------------------------------------------
def write_image(path: Path, mode: str = "L", size=(300, 260)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 90).save(path)
    return path


def entry(study_id: str, report: str = REPORT, num_images: int = 1, **fields) -> dict:
    return {
        "id": study_id,
        "report": report,
        "image_path": [f"{study_id}/{i}.png" for i in range(num_images)],
        **fields,
    }


def write_annotation(root: Path, annotation: dict, with_images: bool = True) -> Path:
    """Write `annotation` and (unless told not to) every image it lists under root/images."""
    if with_images:
        for entries in annotation.values():
            for item in entries if isinstance(entries, list) else []:
                for image_path in item.get("image_path", []) if isinstance(item, dict) else []:
                    write_image(root / IMAGE_DIR_NAME / image_path)
    path = root / ANNOTATION_FILE
    path.write_text(json.dumps(annotation))
    return path


def promptmrg_annotation() -> dict:
    """Two train, one val and one test entry with PromptMRG labels and clip_indices."""
    return {
        "train": [
            entry("t0", labels=LABELS_18, clip_indices=[1, 2, 3]),
            entry("t1", num_images=2, labels=LABELS_18, clip_indices=[0, 2, 5]),
        ],
        "val": [entry("v0", labels=LABELS_14, clip_indices=[0, 1, 2])],
        "test": [entry("s0", labels=LABELS_14, clip_indices=[3, 4, 5])],
    }


def write_features(root: Path, rows: int = NUM_FEATURES, dim: int = FEATURE_DIM) -> Path:
    path = root / CLIP_FEATURES_FILE
    path.write_text(json.dumps(np.arange(rows * dim, dtype=float).reshape(rows, dim).tolist()))
    return path


@pytest.fixture
def promptmrg_dir(tmp_path) -> Path:
    write_annotation(tmp_path, promptmrg_annotation())
    write_features(tmp_path)
    return tmp_path


def load_promptmrg(root: Path, **kwargs):
    return load_report_dataset(
        root / ANNOTATION_FILE, root / IMAGE_DIR_NAME, clip_features_file=root / CLIP_FEATURES_FILE, **kwargs
    )


@pytest.fixture(scope="module")
def processor(synthetic_dir) -> KifProcessor:
    reports = load_synthetic(synthetic_dir)["train"]["report"]
    return KifProcessor(image_processor=KifImageProcessor(), tokenizer=train_report_tokenizer(reports, vocab_size=400))


def load_synthetic(root: Path, **kwargs):
    return load_report_dataset(
        root / ANNOTATION_FILE,
        root / IMAGE_DIR_NAME,
        dataset="synthetic",
        clip_features_file=root / CLIP_FEATURES_FILE,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Annotation formats
# ---------------------------------------------------------------------------------------------------------------------
def test_r2gen_annotation_loads_with_absolute_paths_and_cleaned_reports(tmp_path):
    annotation = {"train": [entry("t0", num_images=2), entry("t1")], "val": [entry("v0")], "test": [entry("s0")]}
    data = load_report_dataset(write_annotation(tmp_path, annotation), tmp_path / IMAGE_DIR_NAME, dataset="iu_xray")

    assert list(data) == ["train", "validation", "test"]
    assert [len(data[split]) for split in data] == [2, 1, 1]
    first = data["train"][0]
    assert first["id"] == "t0"
    assert first["report"] == CLEANED_REPORT
    assert first["image_path"] == [str(tmp_path / IMAGE_DIR_NAME / "t0" / f"{i}.png") for i in range(2)]
    assert all(Path(path).is_absolute() for path in first["image_path"])
    assert first["labels"] is None and first["clip_indices"] is None
    assert data["validation"][0]["split"] == "validation" and data["validation"][0]["annotation_index"] == 0
    assert data.skipped["train"] == {"missing_images": 0, "empty_reports": 0}


def test_promptmrg_annotation_keeps_18_train_and_14_eval_labels_and_clip_indices(promptmrg_dir):
    data = load_promptmrg(promptmrg_dir)

    assert data["train"]["labels"] == [LABELS_18, LABELS_18]
    assert data["validation"][0]["labels"] == LABELS_14
    assert data["test"][0]["labels"] == LABELS_14
    assert data["train"]["clip_indices"] == [[1, 2, 3], [0, 2, 5]]
    assert data["test"][0]["clip_indices"] == [3, 4, 5]


def test_chexpert_label_dicts_convert_to_state_codes(tmp_path):
    chexpert = {"Cardiomegaly": "1.0", "Edema": "0.0", "Pneumonia": "-1.0", "Fracture": "", "Atelectasis": None}
    with_auxiliary = {"Pleural Effusion": 1.0, "Emphysema": "1.0", "No Finding": float("nan")}
    annotation = {"train": [entry("t0", labels=chexpert), entry("t1", labels=with_auxiliary)], "val": [], "test": []}

    data = load_report_dataset(write_annotation(tmp_path, annotation), tmp_path / IMAGE_DIR_NAME)

    expected = [0] * len(CHEXPERT_OBSERVATIONS)
    expected[observation("Cardiomegaly")], expected[observation("Edema")], expected[observation("Pneumonia")] = 1, 2, 3
    assert data["train"][0]["labels"] == expected
    # Naming an auxiliary observation gives all 18.
    expected = [0] * len(OBSERVATIONS)
    expected[observation("Pleural Effusion")], expected[observation("Emphysema")] = 1, 1
    assert data["train"][1]["labels"] == expected


def test_reports_are_cut_to_max_words(tmp_path):
    long_report = " ".join(f"word{i}" for i in range(150)) + "."
    annotation = {"train": [entry("t0", report=long_report)], "val": [], "test": []}
    path = write_annotation(tmp_path, annotation)

    cut = load_report_dataset(path, tmp_path / IMAGE_DIR_NAME)["train"][0]["report"].split()
    whole = load_report_dataset(path, tmp_path / IMAGE_DIR_NAME, max_words=None)["train"][0]["report"].split()

    assert len(cut) == data_kif.DEFAULT_MAX_WORDS and cut[:2] == ["word0", "word1"]
    assert len(whole) == 151 and whole[-1] == "."  # 150 words and the cleaner's closing "."


def test_clean_reports_false_keeps_the_report_text(tmp_path):
    path = write_annotation(tmp_path, {"train": [entry("t0")], "val": [], "test": []})
    data = load_report_dataset(path, tmp_path / IMAGE_DIR_NAME, clean_reports=False)
    assert data["train"][0]["report"] == REPORT


def test_features_and_base_probs_load(tmp_path):
    features = load_features(write_features(tmp_path))
    assert features.shape == (NUM_FEATURES, FEATURE_DIM) and features.dtype == torch.float32
    assert features[1].tolist() == [4.0, 5.0, 6.0, 7.0]

    rates = [0.1 * (i % 5) + 0.05 for i in range(14)]
    (tmp_path / BASE_PROBS_FILE).write_text(json.dumps(rates))
    probs = load_base_probs(tmp_path / BASE_PROBS_FILE)
    assert probs == pytest.approx(rates + [1.0] * 4)
    assert load_base_probs(tmp_path / BASE_PROBS_FILE, num_observations=14) == pytest.approx(rates)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------
def _drop_test_split(annotation):
    del annotation["test"]


def _set(split, index, field, value):
    def edit(annotation):
        annotation[split][index][field] = value

    return edit


def _remove(split, index, field):
    def edit(annotation):
        del annotation[split][index][field]

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_test_split, r"must map each split \['train', 'val', 'test'\].*found \['train', 'val'\]"),
        (_remove("train", 1, "report"), r"split 'train', entry 1 has no field 'report'"),
        (_remove("val", 0, "image_path"), r"split 'val', entry 0 has no field 'image_path'"),
        (_set("train", 0, "image_path", "t0/0.png"), r"split 'train', entry 0: field 'image_path' must be a non-empty list"),
        (_set("train", 0, "report", None), r"split 'train', entry 0: field 'report' must be a string"),
        (_set("train", 1, "labels", [0] * 10), r"split 'train', entry 1: field 'labels' must list 18 or 14 finding states"),
        (_set("test", 0, "labels", [5] + [0] * 13), r"split 'test', entry 0: field 'labels' has values \[5\] that are not states"),
        (_set("train", 0, "labels", {"Cardiomegally": "1.0"}), r"split 'train', entry 0: field 'labels' names unknown observations \['Cardiomegally'\]"),
        (_set("train", 0, "labels", {"Edema": "2.0"}), r"split 'train', entry 0: field 'labels'\['Edema'\] is '2.0'"),
        (_set("val", 0, "clip_indices", [0, 6]), r"split 'val', entry 0: field 'clip_indices' has indices \[6\]; they must be 0..5"),
        (_set("train", 0, "clip_indices", [0.5]), r"split 'train', entry 0: field 'clip_indices' must be a non-empty list of integers"),
        (_remove("test", 0, "clip_indices"), r"split 'test', entry 0 has no field 'clip_indices' but retrieval features were given"),
    ],
)  # fmt: skip
def test_malformed_annotation_names_split_entry_and_field(tmp_path, edit, message):
    annotation = promptmrg_annotation()
    write_annotation(tmp_path, annotation)  # images of the valid file
    edit(annotation)
    write_annotation(tmp_path, annotation, with_images=False)
    write_features(tmp_path)
    with pytest.raises(ValueError, match=message):
        load_promptmrg(tmp_path)


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / ANNOTATION_FILE).write_text('{"train": [')
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / ANNOTATION_FILE))} is not valid JSON"):
        load_report_dataset(tmp_path / ANNOTATION_FILE, tmp_path)


def test_bad_feature_and_base_prob_files_are_rejected(tmp_path):
    (tmp_path / "ragged.json").write_text("[[1, 2], [3]]")
    with pytest.raises(ValueError, match="ragged.json must hold a list of equally long numeric vectors"):
        load_features(tmp_path / "ragged.json")
    (tmp_path / BASE_PROBS_FILE).write_text(json.dumps([0.5] * 13))
    with pytest.raises(ValueError, match=r"base_probs.json must list 14 positive rates in \[0, 1\]"):
        load_base_probs(tmp_path / BASE_PROBS_FILE)


def test_missing_images_raise_with_count_and_paths(promptmrg_dir):
    (promptmrg_dir / IMAGE_DIR_NAME / "t1" / "1.png").unlink()
    (promptmrg_dir / IMAGE_DIR_NAME / "s0" / "0.png").unlink()
    missing = re.escape(str(promptmrg_dir / IMAGE_DIR_NAME / "t1" / "1.png"))
    with pytest.raises(
        ValueError,
        match=rf"2 image files listed in .* are missing under .*e\.g\. \['{missing}', .*skip_missing_images=True",
    ):
        load_promptmrg(promptmrg_dir)


def test_skip_missing_images_drops_and_counts_the_studies(promptmrg_dir, caplog):
    (promptmrg_dir / IMAGE_DIR_NAME / "t1" / "1.png").unlink()
    with caplog.at_level(logging.WARNING, logger="data_kif"):
        data = load_promptmrg(promptmrg_dir, skip_missing_images=True)

    assert data["train"]["id"] == ["t0"]
    assert data.skipped["train"] == {"missing_images": 1, "empty_reports": 0}
    assert data.skipped["test"] == {"missing_images": 0, "empty_reports": 0}
    assert "Skipped 1 train examples" in caplog.text


def test_empty_reports_raise_or_are_skipped_with_a_count(tmp_path):
    annotation = {"train": [entry("t0"), entry("t1", report="  \n ")], "val": [entry("v0", report="")], "test": []}
    path = write_annotation(tmp_path, annotation)
    with pytest.raises(ValueError, match=r"2 reports in .* are empty, e\.g\. \[\"split 'train' entry 1 \(id 't1'\)\""):
        load_report_dataset(path, tmp_path / IMAGE_DIR_NAME)

    data = load_report_dataset(path, tmp_path / IMAGE_DIR_NAME, skip_empty_reports=True)
    assert data["train"]["id"] == ["t0"] and len(data["validation"]) == 0
    assert data.skipped["train"]["empty_reports"] == 1 and data.skipped["validation"]["empty_reports"] == 1


def test_unknown_dataset_preset_is_rejected(promptmrg_dir):
    with pytest.raises(
        ValueError, match=r"Unknown dataset 'chexpert'; choose one of \['iu_xray', 'mimic_cxr', 'synthetic'\]"
    ):
        load_promptmrg(promptmrg_dir, dataset="chexpert")


def _truncate(path: Path):
    """Write a real PNG, then cut it in half: the header parses, the pixel data does not."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_an_image(path: Path):
    path.write_text("not an image")


@pytest.mark.parametrize("corrupt", [_truncate, _not_an_image])
def test_unreadable_images_fail_naming_split_index_and_path(promptmrg_dir, processor, corrupt):
    broken = promptmrg_dir / IMAGE_DIR_NAME / "t1" / "0.png"
    corrupt(broken)
    data = load_promptmrg(promptmrg_dir)  # the file exists: loading succeeds, decoding fails
    collator = KifDataCollator(processor, load_features(promptmrg_dir / CLIP_FEATURES_FILE), num_retrieved_reports=3)
    message = rf"Cannot read image {re.escape(str(broken))} \(split 'train', annotation index 1, id 't1'\)"

    with pytest.raises(ValueError, match=message):
        collator(list(data["train"]))
    with pytest.raises(ValueError, match=message):
        verify_images(data["train"])


@pytest.mark.skipif(importlib.util.find_spec("pydicom") is not None, reason="pydicom is installed")
def test_dicom_without_pydicom_explains_what_to_install(tmp_path):
    with pytest.raises(ValueError, match=r"Reading the DICOM file .*scan.dcm needs pydicom"):
        open_image(tmp_path / "scan.dcm")


# ---------------------------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------------------------
def test_collator_returns_model_inputs_with_shapes_and_dtypes(synthetic_dir, processor):
    data = load_synthetic(synthetic_dir)
    memory = load_features(synthetic_dir / CLIP_FEATURES_FILE)
    k = 5
    examples = list(data["train"].select(range(3))) + [data["validation"][0]]
    batch = KifDataCollator(processor, memory, augment=True, num_retrieved_reports=k)(examples)

    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels", "disease_labels", "memory_embeds"}
    assert batch["pixel_values"].shape == (4, 3, 224, 224) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape
    assert batch["input_ids"].dtype == torch.long
    assert (batch["labels"][:, : processor.prompt_length] == -100).all()
    assert batch["disease_labels"].dtype == torch.long and batch["disease_labels"].shape == (4, 18)
    assert batch["disease_labels"][:3].tolist() == [example["labels"] for example in examples[:3]]
    # A 14-label validation row: the auxiliary observations are ignored by the classifier loss.
    assert batch["disease_labels"][3].tolist() == examples[3]["labels"] + [-100] * 4
    assert batch["memory_embeds"].shape == (4, k, 32) and batch["memory_embeds"].dtype == torch.float32
    assert torch.equal(batch["memory_embeds"][1], memory[examples[1]["clip_indices"][:k]])


def test_collator_ignores_every_observation_of_unlabelled_rows(processor):
    collator = KifDataCollator(processor)
    assert collator.disease_labels([None, LABELS_14]).tolist() == [[-100] * 18, LABELS_14 + [-100] * 4]


def test_generation_collator_returns_images_memory_and_references(synthetic_dir, processor):
    data = load_synthetic(synthetic_dir)
    examples = list(data["test"].select(range(2)))
    memory = load_features(synthetic_dir / CLIP_FEATURES_FILE)
    batch = KifDataCollator(processor, memory, num_retrieved_reports=5, for_generation=True)(examples)

    assert set(batch) == {"pixel_values", "memory_embeds", *data_kif.GENERATION_METADATA_KEYS}
    assert batch["pixel_values"].shape == (2, 3, 224, 224) and batch["memory_embeds"].shape == (2, 5, 32)
    assert batch["ids"] == [example["id"] for example in examples]
    assert batch["reports"] == [example["report"] for example in examples]
    assert batch["findings"] == [example["labels"] for example in examples]
    with pytest.raises(ValueError, match="Generation uses the eval transform"):
        KifDataCollator(processor, memory, augment=True, for_generation=True)


def test_collator_without_retrieval_memory_explains_how_to_build_it(tmp_path, processor):
    path = write_annotation(tmp_path, {"train": [entry("t0")], "val": [], "test": []})
    data = load_report_dataset(path, tmp_path / IMAGE_DIR_NAME)
    with pytest.raises(ValueError, match=r"collator has no memory_features\. .*python data_kif.py build-memory"):
        KifDataCollator(processor)(list(data["train"]))
    with pytest.raises(
        ValueError, match=r"example \(split 'train', annotation index 0, id 't0'\) has no clip_indices"
    ):
        KifDataCollator(processor, torch.zeros(3, 4), num_retrieved_reports=2)(list(data["train"]))


def test_collator_rejects_too_few_clip_indices(promptmrg_dir, processor):
    data = load_promptmrg(promptmrg_dir)
    collator = KifDataCollator(processor, load_features(promptmrg_dir / CLIP_FEATURES_FILE), num_retrieved_reports=4)
    with pytest.raises(ValueError, match=r"id 't0'\) has 3 clip_indices; the model retrieves 4"):
        collator(list(data["train"]))


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval memory with a tiny CLIP
# ---------------------------------------------------------------------------------------------------------------------
CLIP_PROJECTION_DIM = 16


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP (32 wide, 32x32 images) with a WordPiece tokenizer trained on a few reports,
    saved to a directory as a Hub-style model."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]"])
    backend.train_from_iterator(
        [REPORT, "Small left pleural effusion.", "The heart is enlarged."] + list(DISEASE_WORDS), trainer
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", model_max_length=32
    )
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "max_position_embeddings": 32, **layers},
        vision_config={"image_size": 32, "patch_size": 8, **layers},
        projection_dim=CLIP_PROJECTION_DIM,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    clip_processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    directory = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(directory)
    clip_processor.save_pretrained(directory)
    return model, clip_processor, directory


def test_report_and_image_embeddings_are_unit_vectors(tiny_clip, tmp_path):
    model, clip_processor, _ = tiny_clip
    reports = [REPORT, "Small left pleural effusion.", "The heart is enlarged."]
    embeddings = compute_report_embeddings(reports, model, clip_processor)
    in_batches_of_two = compute_report_embeddings(reports, model, clip_processor, batch_size=2)

    assert embeddings.shape == (3, CLIP_PROJECTION_DIM)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(embeddings, in_batches_of_two, atol=1e-5)

    paths = [str(write_image(tmp_path / f"{i}.png", mode=mode)) for i, mode in enumerate(["L", "RGB", "I;16"])]
    image_embeddings = compute_image_embeddings(paths, model, clip_processor)
    assert image_embeddings.shape == (3, CLIP_PROJECTION_DIM)
    assert torch.allclose(image_embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)

    words = compute_disease_word_embeddings(model, clip_processor)
    assert words.shape == (len(DISEASE_WORDS), CLIP_PROJECTION_DIM)


def test_retrieval_ranks_by_cosine_and_excludes_the_own_report():
    reports = torch.eye(4)
    images = torch.tensor([[1.0, 0.5, 0.2, 0], [0.4, 1.0, 0, 0.1], [0.1, 0, 2.0, 1.0], [0, 0.2, 0.9, 1.0]])

    assert retrieve_nearest_reports(images, reports, k=2).tolist() == [[0, 1], [1, 0], [2, 3], [3, 2]]
    assert retrieve_nearest_reports(images, reports, k=2, exclude_self=True).tolist() == [
        [1, 2],
        [0, 3],
        [3, 0],
        [2, 1],
    ]
    excluded = retrieve_nearest_reports(images, reports, k=1, exclude_indices=[0, -1, -1, 3])
    assert excluded.tolist() == [[1], [1], [2], [2]] and excluded.dtype == torch.long
    with pytest.raises(ValueError, match="Cannot retrieve k=4 reports from 3 candidates"):
        retrieve_nearest_reports(images, reports, k=4, exclude_self=True)


def _r2gen_dir(root: Path) -> Path:
    annotation = {
        "train": [entry(f"t{i}", report=f"{REPORT} Study {i}.") for i in range(5)],
        "val": [entry("v0")],
        "test": [entry("s0"), entry("s1")],
    }
    write_annotation(root, annotation)
    return root


def test_build_retrieval_memory_writes_promptmrg_files(tiny_clip, tmp_path):
    model, clip_processor, _ = tiny_clip
    source = _r2gen_dir(tmp_path / "source")
    annotation_path = build_retrieval_memory(
        source / ANNOTATION_FILE, source / IMAGE_DIR_NAME, model, clip_processor, tmp_path / "memory", k=3
    )

    features = load_features(tmp_path / "memory" / CLIP_FEATURES_FILE)
    assert features.shape == (5, CLIP_PROJECTION_DIM)
    assert load_features(tmp_path / "memory" / DISEASE_WORD_FEATURES_FILE).shape == (
        len(DISEASE_WORDS),
        CLIP_PROJECTION_DIM,
    )
    data = load_report_dataset(annotation_path, source / IMAGE_DIR_NAME, clip_features_file=features)
    assert [len(indices) for indices in data["test"]["clip_indices"]] == [3, 3]
    for index, indices in enumerate(data["train"]["clip_indices"]):
        assert index not in indices and len(set(indices)) == 3
    assert json.loads(annotation_path.read_text())["train"][0]["report"] == f"{REPORT} Study 0."


def test_cli_build_memory_loads_a_saved_clip_model(tiny_clip, tmp_path, capsys):
    source = _r2gen_dir(tmp_path / "source")
    main(["build-memory", str(source / ANNOTATION_FILE), str(source / IMAGE_DIR_NAME), str(tmp_path / "out"),
          "--clip_model", str(tiny_clip[2]), "--k", "2"])  # fmt: skip
    assert "clip_text_features.json" in capsys.readouterr().out
    data = load_report_dataset(
        tmp_path / "out" / ANNOTATION_FILE,
        source / IMAGE_DIR_NAME,
        clip_features_file=tmp_path / "out" / CLIP_FEATURES_FILE,
    )
    assert all(len(indices) == 2 for indices in data["validation"]["clip_indices"])


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic data set
# ---------------------------------------------------------------------------------------------------------------------
def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_synthetic_generation_is_deterministic_in_the_seed(tmp_path):
    first = _files(make_synthetic_dataset(tmp_path / "a", seed=3, **SMALL_SYNTHETIC))
    again = _files(make_synthetic_dataset(tmp_path / "b", seed=3, **SMALL_SYNTHETIC))
    other = _files(make_synthetic_dataset(tmp_path / "c", seed=4, **SMALL_SYNTHETIC))

    assert first == again
    assert first.keys() == other.keys()
    assert first[ANNOTATION_FILE] != other[ANNOTATION_FILE]
    image = f"{IMAGE_DIR_NAME}/synthetic_00000/0.png"
    assert first[image] != other[image]


def test_synthetic_files_follow_the_promptmrg_formats(synthetic_dir):
    annotation = json.loads((synthetic_dir / ANNOTATION_FILE).read_text())
    assert {key: len(entries) for key, entries in annotation.items()} == {"train": 84, "val": 18, "test": 18}
    assert {len(e["labels"]) for e in annotation["train"]} == {18}
    assert {len(e["labels"]) for e in annotation["val"] + annotation["test"]} == {14}
    assert {len(e["clip_indices"]) for entries in annotation.values() for e in entries} == {5}
    assert annotation["val"][0]["image_path"] == [f"{annotation['val'][0]['id']}/0.png"]

    features = load_features(synthetic_dir / CLIP_FEATURES_FILE)
    assert features.shape == (84, 32)
    assert torch.allclose(features.norm(dim=-1), torch.ones(84), atol=1e-4)
    assert load_features(synthetic_dir / DISEASE_WORD_FEATURES_FILE).shape == (len(DISEASE_WORDS), 32)

    image = Image.open(synthetic_dir / IMAGE_DIR_NAME / annotation["train"][0]["image_path"][0])
    assert image.mode == "L" and image.size == (256, 256)

    data = load_synthetic(synthetic_dir)  # the real loading path
    assert [len(data[split]) for split in data] == [84, 18, 18]
    assert data["train"][0]["report"].endswith(" .") and data["train"][0]["report"].islower()


def test_synthetic_base_probs_are_train_positive_rates(synthetic_dir):
    annotation = json.loads((synthetic_dir / ANNOTATION_FILE).read_text())
    labels = np.array([e["labels"][:14] for e in annotation["train"]])
    expected = np.maximum((labels == 1).mean(axis=0), MIN_BASE_PROB)
    probs = load_base_probs(synthetic_dir / BASE_PROBS_FILE)
    assert probs[:14] == pytest.approx(expected.tolist(), abs=1e-6)
    assert probs[observation("Cardiomegaly")] > 0.05 and probs[14:] == [1.0] * 4


def test_synthetic_retrieval_excludes_own_report_and_finds_similar_ones(synthetic_dir):
    annotation = json.loads((synthetic_dir / ANNOTATION_FILE).read_text())
    train = annotation["train"]
    for index, item in enumerate(train):
        assert index not in item["clip_indices"] and len(set(item["clip_indices"])) == 5
    assert max(i for entries in annotation.values() for e in entries for i in e["clip_indices"]) < len(train)

    positives = np.array([[state == 1 for state in e["labels"][:14]] for e in train])
    neighbour_agreement = np.mean([(positives[e["clip_indices"]] == positives[i]).mean() for i, e in enumerate(train)])
    random_agreement = np.mean([(positives == positives[i]).mean() for i in range(len(train))])
    assert neighbour_agreement > random_agreement + 0.05


# Phrase in a sentence of a synthetic report -> the label it must carry.
REPORT_PHRASE_LABELS = [
    (r"no pleural effusion", "Pleural Effusion", 2),
    (r"no (pleural effusion or )?pneumothorax", "Pneumothorax", 2),
    (r"possible small \w+ pleural effusion|may represent a small effusion|pleural effusion cannot be excluded", "Pleural Effusion", 3),
    (r"^(there is a |a )?(small|moderate) (left|right) pleural effusion(?! cannot)|bilateral pleural effusions", "Pleural Effusion", 1),
    (r"there is cardiomegaly|moderate cardiomegaly|the heart is enlarged|cardiac silhouette is enlarged", "Cardiomegaly", 1),
    (r"borderline enlarged|possible mild cardiomegaly|cardiomegaly cannot be excluded", "Cardiomegaly", 3),
    (r"heart size is normal|normal heart size", "Cardiomegaly", 2),
    (r"may represent atelectasis", "Atelectasis", 3),
    (r"lung opacity|patchy opacity|focal opacity", "Lung Opacity", 1),
    (r"no focal (airspace )?consolidation", "Consolidation", 2),
    (r"pacemaker|endotracheal tube|catheter|jugular line", "Support Devices", 1),
    (r"no acute (cardiopulmonary|intrathoracic)", "No Finding", 1),
]  # fmt: skip


def test_synthetic_labels_agree_with_the_report_text(synthetic_dir):
    data = load_synthetic(synthetic_dir)
    checked = {name: 0 for _, name, _ in REPORT_PHRASE_LABELS}
    for example in data["train"]:
        report, labels = example["report"], example["labels"]
        for sentence in report.split(" . "):
            for pattern, name, state in REPORT_PHRASE_LABELS:
                if re.search(pattern, sentence):
                    assert labels[observation(name)] == state, f"{name} of {sentence!r} in {report!r}"
                    checked[name] += 1
        if "effusion" not in report:  # unmentioned: blank
            assert labels[observation("Pleural Effusion")] == 0
        pathologies = [
            state for name, state in zip(OBSERVATIONS, labels) if name not in ("No Finding", "Support Devices")
        ]
        assert (labels[observation("No Finding")] == 1) == (not {1, 3} & set(pathologies))
    assert all(count > 0 for count in checked.values()), checked


def _region_mean(image: np.ndarray, x0, x1, y0, y1) -> float:
    size = image.shape[0]
    return float(image[int(y0 * size) : int(y1 * size), int(x0 * size) : int(x1 * size)].mean())


# Image measurements (regions in fractions of the side; "right" is the image's left) that each finding changes.
FINDING_MEASURES = {
    # Both sides of the heart border at ventricle height: lung for a normal heart, heart for an enlarged one.
    "Cardiomegaly": lambda im: (
        (_region_mean(im, 0.30, 0.37, 0.62, 0.70) + _region_mean(im, 0.73, 0.79, 0.62, 0.70)) / 2
    ),
    # The brighter lung base.
    "Pleural Effusion": lambda im: max(
        _region_mean(im, 0.16, 0.26, 0.64, 0.74), _region_mean(im, 0.74, 0.84, 0.64, 0.74)
    ),
    # The darker lateral apex (negated: a pneumothorax lowers it).
    "Pneumothorax": lambda im: (
        -min(_region_mean(im, 0.15, 0.21, 0.20, 0.36), _region_mean(im, 0.79, 0.85, 0.20, 0.36))
    ),
    # Perihilar lung.
    "Edema": lambda im: (_region_mean(im, 0.30, 0.40, 0.38, 0.48) + _region_mean(im, 0.60, 0.70, 0.38, 0.48)) / 2,
    # Metal: the share of near-white pixels (scaled to gray levels).
    "Support Devices": lambda im: 255 * 100 * (im > 215).mean(),
}
MIN_VISIBLE_DIFFERENCE = 20  # gray levels between the mean measure of positive and negative/blank studies


@pytest.mark.parametrize("name", list(FINDING_MEASURES))
def test_synthetic_findings_are_visible_in_the_images(synthetic_dir, name):
    annotation = json.loads((synthetic_dir / ANNOTATION_FILE).read_text())
    measure, column = FINDING_MEASURES[name], observation(name)
    groups = {True: [], False: []}
    for item in (e for entries in annotation.values() for e in entries):
        if item["labels"][column] == 3:  # uncertain findings are drawn fainter
            continue
        image = np.asarray(Image.open(synthetic_dir / IMAGE_DIR_NAME / item["image_path"][0]), dtype=np.float32)
        groups[item["labels"][column] == 1].append(measure(image))
    assert len(groups[True]) >= 3, f"too few {name} studies"
    assert np.mean(groups[True]) - np.mean(groups[False]) > MIN_VISIBLE_DIFFERENCE


def test_ensure_synthetic_dataset_generates_once_into_place(tmp_path, monkeypatch):
    monkeypatch.setenv("KIF_DATA_DIR", str(tmp_path))
    assert default_synthetic_dir() == tmp_path / f"synthetic-v{data_kif.SYNTHETIC_VERSION}"
    target = default_synthetic_dir(**SMALL_SYNTHETIC)
    assert (
        target.name
        == f"synthetic-v{data_kif.SYNTHETIC_VERSION}-num_studies24-image_size64-num_retrieved_reports3-report_embedding_dim8"
    )

    assert ensure_synthetic_dataset(**SMALL_SYNTHETIC) == target
    written = (target / ANNOTATION_FILE).stat().st_mtime_ns
    assert ensure_synthetic_dataset(**SMALL_SYNTHETIC) == target
    assert (target / ANNOTATION_FILE).stat().st_mtime_ns == written
    assert [path.name for path in tmp_path.iterdir()] == [target.name]  # no staging directory left
    settings = json.loads((target / data_kif.SYNTHETIC_SETTINGS_FILE).read_text())
    assert settings == {"version": data_kif.SYNTHETIC_VERSION, "seed": 0, **SMALL_SYNTHETIC}


def test_ensure_synthetic_dataset_never_reuses_other_settings(tmp_path):
    path = ensure_synthetic_dataset(tmp_path / "synthetic", **SMALL_SYNTHETIC)
    with pytest.raises(
        ValueError,
        match=r"synthetic holds a data set made with .*'report_embedding_dim': 8.*not .*'report_embedding_dim': 16",
    ):
        ensure_synthetic_dataset(path, **{**SMALL_SYNTHETIC, "report_embedding_dim": 16})


def test_interrupted_synthetic_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupted(output_dir, **kwargs):
        (Path(output_dir) / "partial.png").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(data_kif, "make_synthetic_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(tmp_path / "synthetic")
    assert list(tmp_path.iterdir()) == []


def test_synthetic_generation_needs_more_training_reports_than_k(tmp_path):
    with pytest.raises(ValueError, match="10 studies give 7 training reports; retrieving 21"):
        make_synthetic_dataset(tmp_path, num_studies=10)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
def test_cli_makes_and_checks_a_synthetic_dataset(tmp_path, capsys):
    out = tmp_path / "synthetic"
    main(["make-synthetic", str(out), "--num_studies", "24", "--seed", "1", "--image_size", "64",
          "--num_retrieved_reports", "3", "--report_embedding_dim", "8"])  # fmt: skip
    assert "Wrote 24 synthetic studies" in capsys.readouterr().out

    main(["check", str(out / ANNOTATION_FILE), str(out / IMAGE_DIR_NAME), "--dataset", "synthetic",
          "--clip_features", str(out / CLIP_FEATURES_FILE), "--decode_images"])  # fmt: skip
    assert capsys.readouterr().out.splitlines() == ["train: 17 examples", "validation: 4 examples", "test: 3 examples"]

    (out / IMAGE_DIR_NAME / "synthetic_00001" / "0.png").unlink()
    with pytest.raises(ValueError, match="1 image files listed"):
        main(["check", str(out / ANNOTATION_FILE), str(out / IMAGE_DIR_NAME)])
    main(["check", str(out / ANNOTATION_FILE), str(out / IMAGE_DIR_NAME), "--skip_missing_images"])
    assert "train: 16 examples (1 skipped for missing images)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# Round trip: synthetic files -> loader -> collator -> model
# ---------------------------------------------------------------------------------------------------------------------
def test_synthetic_batches_train_the_tiny_model(tmp_path):
    modeling_kif = pytest.importorskip("modeling_kif", reason="modeling_kif.py cannot be imported yet")
    config = KifConfig.from_pretrained(TINY_DIR)
    processor = KifProcessor.from_pretrained(TINY_DIR)
    k = config.num_retrieved_reports
    out = make_synthetic_dataset(
        tmp_path,
        num_studies=40,
        num_retrieved_reports=k,
        report_embedding_dim=config.report_embedding_dim,
        image_size=160,
    )
    data = load_synthetic(out)
    memory = load_features(out / CLIP_FEATURES_FILE)
    torch.manual_seed(0)
    model = modeling_kif.KifForConditionalGeneration(config)

    train_batch = KifDataCollator(processor, memory, augment=True, num_retrieved_reports=k)(
        list(data["train"].select(range(4)))
    )
    loss = model(**train_batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert any(parameter.grad is not None for parameter in model.parameters())

    model.eval()
    eval_batch = KifDataCollator(processor, memory, num_retrieved_reports=k)(list(data["validation"].select(range(2))))
    with torch.no_grad():
        assert torch.isfinite(model(**eval_batch).loss)
