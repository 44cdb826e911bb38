"""Model card and Hub upload (hub_kif.py), offline: the card renders from a saved tiny model and its results, the
upload sends exactly the files loading needs, and those files alone load and generate in a fresh process."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from hub_kif import files_to_upload, main, make_model_card, push_output_dir
from kif_testing import HIDE_PROJECT_PREAMBLE, KifModelTester


REPO_ID = "radiology-lab/kif-isd-tiny"
RESULTS = {
    "baseline": {"BLEU_1": 0.2011, "BLEU_4": 0.0312, "CIDEr": 0.0457},
    "phase1": {"BLEU_1": 0.3127, "BLEU_4": 0.0823, "ce_example_f1": 0.3962},
    "round1": {
        "BLEU_1": 0.3341, "BLEU_2": 0.2107, "BLEU_3": 0.1398, "BLEU_4": 0.0991, "METEOR": 0.1288, "ROUGE_L": 0.2764,
        "CIDEr": 0.1673, "ce_example_precision": 0.4412, "ce_example_recall": 0.3874, "ce_example_f1": 0.4125,
        "ce_micro_f1_14": 0.3517, "num_samples": 120, "split": "test",
        "labeler": "rule-based (CheXpert-style mention, negation and uncertainty rules)",
        "convention": "example-based precision/recall/F1 with positive = label 1",
    },
}  # fmt: skip
TRAINING_ARGS = {
    "dataset": "synthetic", "rounds": 1, "learning_rate": 5e-05, "num_train_epochs": 3, "per_device_batch_size": 16,
    "phases": {"phase1": {"epochs": 3}, "distillation": {"temperature": 4.0, "kd_weight": 0.01}},
    "annotation_file": "/data/private/annotation.json", "output_dir": "/home/me/runs/kif", "max_train_samples": None,
}  # fmt: skip
# Files of a training run that must never be uploaded.
RUN_LEFTOVERS = (
    "checkpoints/step_10/model.safetensors", "checkpoints/step_10/config.json", "step_20/optimizer.bin",
    "predictions.jsonl", "logs/events.out.tfevents", "optimizer.pt", "train.log", "eval/all_results.json",
)  # fmt: skip
EXPECTED_UPLOAD = {
    "model.safetensors", "config.json", "generation_config.json", "processor_config.json", "tokenizer_config.json",
    "tokenizer.json", "configuration_kif.py", "modeling_kif.py", "processing_kif.py", "README.md",
    "all_results.json", "training_args.json",
}  # fmt: skip
GENERATION_KWARGS = {"num_beams": 2, "max_new_tokens": 6, "min_new_tokens": 0}

# Runs in a fresh interpreter that cannot import the project: only the uploaded files can serve. It follows the model
# card's snippet.
FRESH_PROCESS_SCRIPT = HIDE_PROJECT_PREAMBLE + textwrap.dedent(
    """
    import json

    import torch
    from PIL import Image

    project_root, model_dir, image_file, outputs_file, generation = sys.argv[1:6]
    sys.path = [entry for entry in sys.path if entry != project_root]
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    image = Image.open(image_file)
    output = model.generate(**processor(images=image, return_tensors="pt"), return_dict_in_generate=True,
                            **json.loads(generation))
    torch.save({"sequences": output.sequences, "report": processor.batch_decode(output.sequences)[0]}, outputs_file)
    """
)


class RecordingHfApi:
    """Stands in for `HfApi`: records `create_repo` and lists the files `upload_folder` would send, filtered by the
    same allow/ignore patterns as the real one."""

    def __init__(self):
        self.created = []
        self.folder_path = None
        self.uploaded = None
        self.upload_kwargs = None

    def create_repo(self, repo_id, **kwargs):
        self.created.append((repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        self.folder_path = folder_path = Path(folder_path)
        files = sorted(path.relative_to(folder_path).as_posix() for path in folder_path.rglob("*") if path.is_file())
        self.uploaded = set(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        self.upload_kwargs = {"repo_id": repo_id, **kwargs}
        return f"https://huggingface.co/{repo_id}/commit/0123abc"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tester():
    return KifModelTester()


@pytest.fixture(scope="module")
def model(tester):
    model = tester.model()
    model.set_report_memory(
        torch.randn(8, tester.config.vision_hidden_size), torch.randn(8, tester.config.report_embedding_dim)
    )
    return model


@pytest.fixture
def output_dir(tmp_path, tester, model):
    """A training output directory: the saved model and processor, results, arguments and run leftovers."""
    directory = tmp_path / "kif-isd-tiny"
    model.save_pretrained(directory)
    tester.processor.save_pretrained(directory)
    (directory / "all_results.json").write_text(json.dumps(RESULTS))
    (directory / "training_args.json").write_text(json.dumps(TRAINING_ARGS))
    for leftover in RUN_LEFTOVERS:
        (directory / leftover).parent.mkdir(parents=True, exist_ok=True)
        (directory / leftover).write_text("not for the Hub")
    return directory


def metadata(card: ModelCard) -> dict:
    return yaml.safe_load(str(card).split("---")[1])


# --------------------------------------------------------------------------------------------------------- card
def test_card_metadata_parses_and_reports_the_final_run(output_dir):
    card = make_model_card(output_dir, repo_id=REPO_ID)
    data = metadata(card)
    assert data == card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-to-text"
    assert data["license"] == "apache-2.0"
    assert {"radiology", "chest-x-ray", "medical-report-generation", "knowledge-distillation", "kif-isd"} <= set(
        data["tags"]
    )
    (entry,) = data["model-index"]
    assert entry["name"] == "kif-isd-tiny"
    (result,) = entry["results"]
    assert result["dataset"]["split"] == "test"
    metrics = {metric["type"]: metric for metric in result["metrics"]}
    final = RESULTS["round1"]
    assert {key: metrics[key.lower()]["value"] for key in ("BLEU_4", "CIDEr", "ce_micro_f1_14")} == {
        key: final[key] for key in ("BLEU_4", "CIDEr", "ce_micro_f1_14")
    }
    assert metrics["ce_example_f1"]["args"] == {"labeler": final["labeler"], "convention": final["convention"]}
    assert "args" not in metrics["bleu_4"]


def test_card_body_has_every_run_usage_and_caveats(output_dir):
    text = make_model_card(output_dir, repo_id=REPO_ID).text
    assert "| metric | baseline | phase1 | round1 |" in text
    assert "| BLEU-4 | 0.0312 | 0.0823 | 0.0991 |" in text
    assert "| CIDEr | 0.0457 | - | 0.1673 |" in text
    assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert "model.generate(**processor(images=image" in text and "processor.batch_decode" in text
    assert "not be used for diagnosis" in text and "trained on synthetic images" in text
    assert "| phases.distillation.temperature | 4.0 |" in text and "| learning_rate | 5e-05 |" in text
    assert "/data/private" not in text and "/home/me" not in text and "max_train_samples" not in text
    assert "10.3390/app152010974" in text and "PromptMRG" in text and "BLIP" in text
    assert "rule-based (CheXpert-style" in text


def test_flat_results_without_training_args(output_dir):
    (output_dir / "training_args.json").unlink()
    (output_dir / "all_results.json").write_text(json.dumps(RESULTS["round1"]))
    card = make_model_card(output_dir, license="cc-by-nc-4.0")
    data = metadata(card)
    assert data["license"] == "cc-by-nc-4.0"
    assert data["model-index"][0]["results"][0]["metrics"][0] == {"type": "bleu_1", "value": 0.3341, "name": "BLEU-1"}
    assert "| metric | test |" in card.text and "No training record" in card.text
    assert "synthetic" not in card.text.split("## Training procedure")[0]


def test_card_without_results_has_no_model_index(tmp_path, model):
    model.save_pretrained(tmp_path / "bare")
    card = make_model_card(tmp_path / "bare", repo_id=REPO_ID)
    assert "model-index" not in metadata(card)
    assert "No evaluation results" in card.text


def test_card_command_writes_readme(output_dir):
    main(["card", str(output_dir), "--repo_id", REPO_ID])
    assert ModelCard.load(output_dir / "README.md").data.model_name == "kif-isd-tiny"


# --------------------------------------------------------------------------------------------------------- upload
def test_push_uploads_exactly_the_loadable_files_and_they_load_in_a_fresh_process(tmp_path, output_dir, tester, model):
    api = RecordingHfApi()
    commit = push_output_dir(output_dir, REPO_ID, private=True, api=api)

    assert commit == f"https://huggingface.co/{REPO_ID}/commit/0123abc"
    assert api.created == [(REPO_ID, {"token": None, "private": True, "exist_ok": True})]
    assert api.uploaded == EXPECTED_UPLOAD
    assert api.upload_kwargs["create_pr"] is False
    assert metadata(ModelCard.load(output_dir / "README.md"))["model-index"]

    fresh = tmp_path / "hub_copy" / "kif-isd-tiny"
    fresh.mkdir(parents=True)
    for name in api.uploaded:
        shutil.copy(output_dir / name, fresh / name)
    image_file = tmp_path / "xray.png"
    pixels = np.random.default_rng(0).integers(0, 255, (160, 150), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(image_file)
    script = tmp_path / "load_from_hub_copy.py"
    script.write_text(FRESH_PROCESS_SCRIPT)
    project_root = str(Path(__file__).resolve().parent.parent)
    result = subprocess.run(
        [sys.executable, str(script), project_root, str(fresh), str(image_file), str(tmp_path / "out.pt"),
         json.dumps(GENERATION_KWARGS)],
        cwd=fresh.parent,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(tmp_path / "out.pt")

    inputs = tester.processor(images=Image.open(image_file), return_tensors="pt")
    expected = model.eval().generate(**inputs, **GENERATION_KWARGS)
    assert torch.equal(outputs["sequences"], expected)
    assert outputs["report"] == tester.processor.batch_decode(expected)[0]


def test_incomplete_directory_is_refused_with_the_missing_files(output_dir):
    (output_dir / "modeling_kif.py").unlink()
    (output_dir / "tokenizer.json").unlink()
    api = RecordingHfApi()
    with pytest.raises(ValueError, match=r"missing: modeling_kif\.py, tokenizer\.json or vocab\.txt"):
        push_output_dir(output_dir, REPO_ID, api=api)
    assert api.created == [] and not (output_dir / "README.md").exists()


def test_config_without_auto_map_is_refused(output_dir):
    config = json.loads((output_dir / "config.json").read_text())
    del config["auto_map"]
    (output_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no auto_map entry"):
        files_to_upload(output_dir)


def test_sharded_weights_upload_the_index_and_every_shard(output_dir):
    (output_dir / "model.safetensors").rename(output_dir / "model-00001-of-00002.safetensors")
    (output_dir / "model-00002-of-00002.safetensors").write_bytes(b"")
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (output_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    files = files_to_upload(output_dir)
    assert {
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    } <= set(files)
    (output_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        files_to_upload(output_dir)


def test_run_train_output_directory_publishes_its_final_model(tmp_path, tester, model):
    """run_train.py keeps the model to publish in `final/` and the run's JSON files at the top."""
    run_dir = tmp_path / "kif-run"
    model.save_pretrained(run_dir / "final")
    tester.processor.save_pretrained(run_dir / "final")
    (run_dir / "all_results.json").write_text(json.dumps(RESULTS))
    (run_dir / "training_args.json").write_text(json.dumps(TRAINING_ARGS))
    for leftover in ("phase1/best/model.safetensors", "phase1/epoch_1/optimizer.bin", "round1/eval_log.jsonl"):
        (run_dir / leftover).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / leftover).write_text("not for the Hub")

    api = RecordingHfApi()
    push_output_dir(run_dir, REPO_ID, api=api)
    assert api.folder_path == run_dir / "final"
    assert api.uploaded == EXPECTED_UPLOAD
    card = ModelCard.load(run_dir / "final" / "README.md")
    assert card.data.eval_results[0].metric_value == RESULTS["round1"]["BLEU_1"]
