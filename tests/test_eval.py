import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import run_eval
from configuration_kif import STATE_TOKENS
from data_kif import load_report_dataset
from kif_testing import REPO_ROOT, KifModelTester
from metrics_kif import compute_nlg_metrics


GENERATION = ["--max_new_tokens", "6", "--num_beams", "2", "--no_meteor", "--batch_size", "3"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """The tiny model with a report-memory index and its processor, saved as run_train.py saves them."""
    tester = KifModelTester()
    model = tester.model()
    model.set_report_memory(torch.randn(16, tester.config.vision_hidden_size), torch.randn(16, 64))
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    tester.processor.save_pretrained(directory)
    return directory


def data_args(synthetic_dir, with_features=True) -> list[str]:
    args = ["--annotation_file", str(synthetic_dir / "annotation.json"), "--image_dir", str(synthetic_dir / "images")]
    args += ["--dataset", "synthetic"]
    if with_features:
        args += ["--clip_features_file", str(synthetic_dir / "clip_text_features.json")]
    return args


def read_predictions(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / run_eval.PREDICTIONS_FILE).read_text().splitlines()]


def test_run_eval_end_to_end_writes_predictions_and_results(tmp_path, saved_model, tiny_synthetic_dir):
    output_dir = tmp_path / "eval"
    argv = ["--model", str(saved_model), *data_args(tiny_synthetic_dir), "--output_dir", str(output_dir), *GENERATION]
    results = run_eval.main(argv)

    test_split = load_report_dataset(
        tiny_synthetic_dir / "annotation.json", tiny_synthetic_dir / "images", "synthetic"
    )
    predictions = read_predictions(output_dir)
    assert [row["id"] for row in predictions] == test_split["test"]["id"]
    assert all(len(row["predicted_findings"]) == 18 for row in predictions)
    assert not any(token in row["generated"] for row in predictions for token in STATE_TOKENS)

    saved = json.loads((output_dir / run_eval.RESULTS_FILE).read_text())
    assert saved["num_samples"] == len(test_split["test"])
    assert "rule-based" in saved["labeler"] and "positive = label 1" in saved["convention"]
    for key in ("BLEU_4", "ROUGE_L", "CIDEr", "ce_example_f1", "ce_micro_f1_14", "findings_ce_example_f1"):
        assert 0.0 <= saved[key] <= 10.0
    assert "METEOR" not in saved  # skipped with --no_meteor
    nlg = compute_nlg_metrics(
        [row["generated"] for row in predictions], [row["reference"] for row in predictions], meteor=False
    )
    assert saved["BLEU_4"] == pytest.approx(nlg["BLEU_4"]) and results["CIDEr"] == pytest.approx(nlg["CIDEr"])


def test_run_eval_without_retrieval_features_uses_the_models_index(tmp_path, saved_model, tiny_synthetic_dir):
    output_dir = tmp_path / "eval"
    argv = ["--model", str(saved_model), *data_args(tiny_synthetic_dir, with_features=False)]
    results = run_eval.main([*argv, "--output_dir", str(output_dir), "--max_samples", "4", *GENERATION])
    assert results["num_samples"] == 4 and len(read_predictions(output_dir)) == 4


def test_a_malformed_model_directory_gives_a_clear_error(tmp_path, tiny_synthetic_dir):
    (tmp_path / "weights.bin").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="no config.json"):
        run_eval.main(["--model", str(tmp_path), *data_args(tiny_synthetic_dir), "--output_dir", str(tmp_path / "o")])
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="Could not load|not a KIF-ISD model"):
        run_eval.main(["--model", str(tmp_path), *data_args(tiny_synthetic_dir), "--output_dir", str(tmp_path / "o")])


def test_a_missing_split_gives_a_clear_error(tmp_path, saved_model, tiny_synthetic_dir):
    annotation = json.loads((tiny_synthetic_dir / "annotation.json").read_text())
    del annotation["test"]
    broken = tmp_path / "annotation.json"
    broken.write_text(json.dumps(annotation))
    argv = [
        "--model",
        str(saved_model),
        "--annotation_file",
        str(broken),
        "--image_dir",
        str(tiny_synthetic_dir / "images"),
    ]
    with pytest.raises(ValueError, match="test"):
        run_eval.main([*argv, "--dataset", "synthetic", "--output_dir", str(tmp_path / "o"), *GENERATION])


def test_results_table_lists_each_run():
    table = run_eval.format_results_table({"baseline": {"BLEU_4": 0.1}, "round1": {"BLEU_4": 0.25, "CIDEr": 1.5}})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "baseline", "round1"]
    assert lines[1].split() == ["BLEU_4", "0.1000", "0.2500"] and lines[2].split() == ["CIDEr", "-", "1.5000"]


def test_two_process_generation_gathers_every_example_once(tmp_path, saved_model, tiny_synthetic_dir):
    """`run_eval.py` under two CPU processes: each generates half of the batches, and the gathered predictions hold
    every test example exactly once (the duplicates that pad the last batch are dropped)."""
    output_dir = tmp_path / "eval"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(REPO_ROOT / "run_eval.py"), "--model", str(saved_model), *data_args(tiny_synthetic_dir),
        "--output_dir", str(output_dir), *GENERATION, "--batch_size", "2",
    ]  # fmt: skip
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = load_report_dataset(tiny_synthetic_dir / "annotation.json", tiny_synthetic_dir / "images", "synthetic")
    gathered = [row["id"] for row in read_predictions(output_dir)]
    assert sorted(gathered) == sorted(expected["test"]["id"])  # nothing lost, nothing duplicated
    assert len(expected["test"]) % 4 != 0  # the split does not divide evenly: the padding path is exercised


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
