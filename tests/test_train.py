"""run_train.py on the tiny configuration and a small synthetic data set: phases, distillation, two processes, resume,
non-finite losses, LoRA, and the schedule / prior / argument helpers."""

import copy
import json
import math
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from safetensors.torch import load_file
from transformers import AutoModel

import run_train
from configuration_kif import KifConfig
from modeling_kif import KifForConditionalGeneration
from processing_kif import KifProcessor
from run_train import EpochCosineSchedule, NonFiniteLossError, updated_base_probs


REPO_DIR = Path(__file__).resolve().parent.parent
TINY_DIR = REPO_DIR / "configs" / "kif-tiny"
# The conftest's tiny synthetic set: 40 studies, 28 of them in train.
NUM_TRAIN = 28
TWO_PROCESS_TIMEOUT = 300  # seconds


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Every `main()` call builds its own Accelerator, as a new process would."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from a second thread, and with other processes busy on a 2-core machine two OpenMP
    threads wait on each other for seconds per step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tiny_synthetic_dir) -> Path:
    """The session's synthetic data set sized for configs/kif-tiny (tests/conftest.py)."""
    return tiny_synthetic_dir


def train_argv(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """A quick run: 2 epochs of 7 steps (batch 4), greedy 12-token validation, no trackers, no METEOR."""
    return [
        "--annotation_file", str(data_dir / "annotation.json"), "--image_dir", str(data_dir / "images"),
        "--clip_features_file", str(data_dir / "clip_text_features.json"),
        "--base_probs_file", str(data_dir / "base_probs.json"),
        "--disease_words_file", str(data_dir / "disease_word_features.json"),
        "--dataset", "synthetic", "--preset", "synthetic-demo", "--output_dir", str(output_dir),
        "--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--learning_rate", "2e-3", "--warmup_steps", "3", "--num_beams", "1", "--max_new_tokens", "12",
        "--report_to", "none", "--no_meteor", "--seed", "0", *extra,
    ]  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def bare_image_batch(data_dir: Path, processor: KifProcessor) -> torch.Tensor:
    from PIL import Image

    image = Image.open(next((data_dir / "images").glob("*/0.png")))
    return processor(images=[image])["pixel_values"]


# ---------------------------------------------------------------------------------------------------------------------
# Phase 1 and a distillation round
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distilled_run(data_dir, tmp_path_factory):
    AcceleratorState._reset_state(reset_partial_state=True)
    output_dir = tmp_path_factory.mktemp("distilled")
    results = run_train.main(train_argv(data_dir, output_dir, "--rounds", "1"))
    return output_dir, results


def test_phase_losses_are_finite_and_fall(distilled_run):
    output_dir, _ = distilled_run
    for phase, terms in (
        ("phase1", ("lm_loss", "cls_loss")),
        ("round1", ("lm_loss", "cls_loss", "kd_loss", "rel_loss")),
    ):
        log = read_jsonl(output_dir / phase / "train_log.jsonl")
        assert [record["step"] for record in log] == list(range(1, 15))  # 2 epochs of 28 / 4 = 7 optimiser steps
        for record in log:
            assert set(terms) <= set(record) and all(math.isfinite(record[name]) for name in (*terms, "loss"))
        first, last = log[:3], log[-3:]
        for name in ("lm_loss", "loss"):
            assert sum(record[name] for record in last) < sum(record[name] for record in first), (phase, name)


def test_round_distils_from_the_phase1_best_and_saves_everything(distilled_run):
    output_dir, results = distilled_run
    assert set(results) == {"baseline", "phase1", "round1"}
    assert results["round1"]["teacher"] == str(output_dir / "phase1" / "best")
    on_disk = json.loads((output_dir / "all_results.json").read_text())
    for run in ("baseline", "phase1", "round1"):
        assert {"BLEU_4", "ce_example_f1", "findings_ce_example_f1"} <= set(on_disk[run])
    args = json.loads((output_dir / "training_args.json").read_text())
    assert args["kd_weight"] == 0.01 and args["rel_weight"] == 1.0 and args["kd_temperature"] == 4.0
    for phase in ("phase1", "round1"):
        assert (output_dir / phase / "test" / "predictions.jsonl").is_file()
        assert not list((output_dir / phase).glob(".*"))  # no staging folder left behind
    final = load_file(output_dir / "final" / "model.safetensors")
    best = load_file(output_dir / "round1" / "best" / "model.safetensors")
    assert all(torch.equal(final[name], best[name]) for name in best)


def test_best_model_reloads_and_generates_from_a_bare_image(distilled_run, data_dir):
    output_dir, _ = distilled_run
    best_dir = output_dir / "round1" / "best"
    model = AutoModel.from_pretrained(best_dir).eval()
    processor = KifProcessor.from_pretrained(best_dir)
    # The report-memory index of the training set was built before saving.
    assert model.config.report_memory_size == NUM_TRAIN
    assert model.report_memory_keys.abs().sum() > 0
    sequences = model.generate(bare_image_batch(data_dir, processor), num_beams=1, max_new_tokens=8)
    assert sequences.shape[0] == 1 and isinstance(processor.batch_decode(sequences)[0], str)


def test_validation_updates_the_saved_priors(distilled_run):
    output_dir, _ = distilled_run
    evaluations = read_jsonl(output_dir / "phase1" / "eval_log.jsonl")
    assert [record["epoch"] for record in evaluations] == [0, 1]
    for record in evaluations:
        assert len(record["base_probs"]) == 18 and record["base_probs"][14:] == [1.0] * 4
        assert max(record["base_probs"][:14]) <= 1.0
    best_epoch = json.loads((output_dir / "phase1" / "phase_results.json").read_text())["best_epoch"]
    saved = load_file(output_dir / "phase1" / "best" / "model.safetensors")["base_probs"]
    assert torch.allclose(saved, torch.tensor(evaluations[best_epoch]["base_probs"]))
    assert not torch.allclose(saved[:14], torch.ones(14))  # the update (largest = 1), not the initial values


def test_teacher_argument_skips_phase1(distilled_run, data_dir, tmp_path):
    output_dir, _ = distilled_run
    teacher = output_dir / "phase1" / "best"
    results = run_train.main(
        train_argv(
            data_dir,
            tmp_path,
            "--teacher",
            str(teacher),
            "--student_init",
            "teacher",
            "--max_train_steps",
            "3",
            "--no_test_eval",
        )  # fmt: skip
    )
    assert set(results) == {"round1"} and results["round1"]["teacher"] == str(teacher)
    assert not (tmp_path / "phase1").exists()
    log = read_jsonl(tmp_path / "round1" / "train_log.jsonl")
    assert len(log) == 3
    # Initialised from the teacher, the student starts close to it.
    assert log[0]["kd_loss"] < 0.1


# ---------------------------------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------------------------------
def _train_as_one_of_two_processes(record_dir: Path, argv: list[str]) -> None:
    """Runs in each torchrun process: trains, recording parameter checksums after every optimiser step."""
    checksums = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        with torch.no_grad():
            parameters = [parameter for group in self.param_groups for parameter in group["params"]]
            checksums.append(
                [sum(float(parameter.double().sum()) for parameter in parameters),
                 sum(float(parameter.double().square().sum()) for parameter in parameters)]
            )  # fmt: skip
        return result

    torch.optim.AdamW.step = recording_step
    run_train.main(argv)
    (record_dir / f"rank{PartialState().process_index}.json").write_text(json.dumps(checksums))


def test_two_processes_keep_replicas_identical_and_count_optimiser_steps(data_dir, tmp_path):
    output_dir, record_dir = tmp_path / "run", tmp_path / "records"
    record_dir.mkdir()
    peak, start, floor = 1e-3, 1e-4, 1e-4
    argv = train_argv(
        data_dir, output_dir, "--rounds", "0", "--no_test_eval", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--learning_rate", str(peak), "--warmup_start_learning_rate", str(start),
        "--min_learning_rate", str(floor), "--warmup_steps", "10",
    )  # fmt: skip
    # Two real CPU processes (SPEC: `accelerate launch --cpu --num_processes 2` starts only one). A fresh interpreter,
    # not a fork of this one: forking a process whose OpenMP pool has run can deadlock the children.
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_DIR)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        __file__, str(record_dir), *argv,
    ]  # fmt: skip
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=TWO_PROCESS_TIMEOUT)
    assert completed.returncode == 0, completed.stderr[-5000:]

    rank0 = json.loads((record_dir / "rank0.json").read_text())
    rank1 = json.loads((record_dir / "rank1.json").read_text())
    # 28 examples / (2 per process x 2 processes) = 7 micro-batches per process -> ceil(7 / 2) = 4 updates per epoch.
    assert len(rank0) == len(rank1) == 8
    assert rank0 == rank1  # DDP keeps the replicas bit-identical
    assert rank0[0] != rank0[-1]

    # Warm-up over min(10, 4) = 4 updates, then epoch 1's cosine value (peak + floor) / 2. Counting micro-batches or
    # stepping the scheduler once per process would give other values.
    expected = [start + (peak - start) * step / 4 for step in range(4)] + [(peak + floor) / 2] * 4
    log = read_jsonl(output_dir / "phase1" / "train_log.jsonl")
    assert [record["lr"] for record in log] == pytest.approx(expected, rel=1e-9)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------------
# Resume and non-finite losses
# ---------------------------------------------------------------------------------------------------------------------
class Interrupted(Exception):
    pass


def test_resume_repeats_the_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    quick = ("--rounds", "0", "--no_test_eval", "--checkpointing_steps", "3", "--checkpoints_total_limit", "0")
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    run_train.main(train_argv(data_dir, uninterrupted, *quick))

    # Interrupt right after the checkpoint at step 3, in the middle of epoch 0 (7 steps).
    save_checkpoint = run_train.save_checkpoint

    def save_then_crash(*args, **kwargs):
        path = save_checkpoint(*args, **kwargs)
        raise Interrupted(path)

    monkeypatch.setattr(run_train, "save_checkpoint", save_then_crash)
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(Interrupted):
        run_train.main(train_argv(data_dir, interrupted, *quick))
    monkeypatch.setattr(run_train, "save_checkpoint", save_checkpoint)
    assert [path.name for path in run_train.list_checkpoints(interrupted / "phase1")] == ["step_3"]

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    run_train.main(train_argv(data_dir, interrupted, *quick, "--resume_from_checkpoint", "latest"))

    expected_log = read_jsonl(uninterrupted / "phase1" / "train_log.jsonl")
    resumed_log = read_jsonl(interrupted / "phase1" / "train_log.jsonl")
    assert [record["step"] for record in resumed_log] == list(range(1, 15))
    for expected, resumed in zip(expected_log, resumed_log):
        assert resumed["lr"] == pytest.approx(expected["lr"])
        assert resumed["loss"] == pytest.approx(expected["loss"], rel=1e-4)
    for name in ("step_12", "best"):
        expected = load_file(uninterrupted / "phase1" / name / "model.safetensors")
        resumed = load_file(interrupted / "phase1" / name / "model.safetensors")
        for key, tensor in expected.items():
            assert torch.allclose(resumed[key], tensor, atol=1e-5), (name, key)
    expected_results = json.loads((uninterrupted / "phase1" / "phase_results.json").read_text())
    resumed_results = json.loads((interrupted / "phase1" / "phase_results.json").read_text())
    assert resumed_results["best_epoch"] == expected_results["best_epoch"]
    assert resumed_results["best_score"] == pytest.approx(expected_results["best_score"])


def test_resume_latest_skips_completed_phases(distilled_run, data_dir, tmp_path, monkeypatch):
    save_checkpoint = run_train.save_checkpoint

    def crash_in_round1(accelerator, phase_dir, *args, **kwargs):
        path = save_checkpoint(accelerator, phase_dir, *args, **kwargs)
        if phase_dir.name == "round1":
            raise Interrupted(path)
        return path

    monkeypatch.setattr(run_train, "save_checkpoint", crash_in_round1)
    with pytest.raises(Interrupted):
        run_train.main(train_argv(data_dir, tmp_path, "--rounds", "1"))
    monkeypatch.setattr(run_train, "save_checkpoint", save_checkpoint)
    phase1_log = (tmp_path / "phase1" / "train_log.jsonl").read_text()

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    results = run_train.main(train_argv(data_dir, tmp_path, "--rounds", "1", "--resume_from_checkpoint", "latest"))
    assert (tmp_path / "phase1" / "train_log.jsonl").read_text() == phase1_log  # phase 1 was not trained again
    assert set(results) == {"baseline", "phase1", "round1"}
    # Resumed at epoch 1 of round 1, it ends where the uninterrupted run (same arguments) ended.
    uninterrupted, _ = distilled_run
    expected = load_file(uninterrupted / "round1" / "best" / "model.safetensors")
    resumed = load_file(tmp_path / "round1" / "best" / "model.safetensors")
    assert all(torch.allclose(resumed[key], tensor, atol=1e-5) for key, tensor in expected.items())


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    forward = KifForConditionalGeneration.forward
    calls = {"count": 0}

    def forward_with_nan_at_step_3(self, *args, **kwargs):
        outputs = forward(self, *args, **kwargs)
        calls["count"] += 1
        if self.training and calls["count"] == 3:
            outputs.lm_loss = outputs.lm_loss * float("nan")
            outputs.loss = outputs.lm_loss + outputs.cls_loss
        return outputs

    monkeypatch.setattr(KifForConditionalGeneration, "forward", forward_with_nan_at_step_3)
    argv = train_argv(data_dir, tmp_path, "--rounds", "0", "--no_test_eval", "--checkpointing_steps", "1")
    with pytest.raises(NonFiniteLossError) as error:
        run_train.main(argv)
    message = str(error.value)
    assert "phase1" in message and "optimiser step 3" in message and "lm_loss" in message
    assert str(tmp_path / "phase1" / "step_2") in message

    phase_dir = tmp_path / "phase1"
    assert [path.name for path in run_train.list_checkpoints(phase_dir)] == ["step_1", "step_2"]
    assert not list(phase_dir.glob(".*"))
    weights = load_file(phase_dir / "step_2" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert len(read_jsonl(phase_dir / "train_log.jsonl")) == 2

    # The checkpoint is complete: the run resumes from it once the cause is gone.
    monkeypatch.setattr(KifForConditionalGeneration, "forward", forward)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    run_train.main(argv + ["--resume_from_checkpoint", "latest", "--max_train_steps", "4"])
    assert [record["step"] for record in read_jsonl(phase_dir / "train_log.jsonl")] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------------
def test_lora_saves_adapters_and_a_merged_model(data_dir, tmp_path):
    run_train.main(
        train_argv(
            data_dir,
            tmp_path,
            "--rounds",
            "0",
            "--no_test_eval",
            "--max_train_steps",
            "3",
            "--lora_r",
            "4",
            "--lora_target_modules",
            "query",
            "value",
        )  # fmt: skip
    )
    best_dir = tmp_path / "phase1" / "best"
    adapter = json.loads((best_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"query", "value"}
    adapter_weights = load_file(best_dir / "adapter" / "adapter_model.safetensors")
    assert adapter_weights and all("lora_" in name for name in adapter_weights)

    merged = load_file(best_dir / "model.safetensors")
    assert not any("lora_" in name or "base_model" in name for name in merged)
    model = AutoModel.from_pretrained(best_dir).eval()
    processor = KifProcessor.from_pretrained(best_dir)
    sequences = model.generate(bare_image_batch(data_dir, processor), num_beams=1, max_new_tokens=8)
    assert sequences.shape[0] == 1


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: schedule, priors, arguments
# ---------------------------------------------------------------------------------------------------------------------
def test_schedule_warms_up_in_the_first_epoch_then_steps_a_cosine_per_epoch():
    schedule = EpochCosineSchedule(
        peak_lr=1e-3, warmup_start_lr=1e-5, min_lr=1e-4, warmup_steps=4, steps_per_epoch=10, num_epochs=4
    )
    # Warm-up: 1e-5 + (1e-3 - 1e-5) * step / 4, then the peak for the rest of epoch 0.
    assert schedule.learning_rate(0) == pytest.approx(1e-5)
    assert schedule.learning_rate(2) == pytest.approx(1e-5 + 0.99e-3 / 2)
    assert schedule.learning_rate(4) == schedule.learning_rate(9) == pytest.approx(1e-3)
    # Epoch e: 1e-4 + 0.9e-3 * (1 + cos(pi e / 4)) / 2, constant within the epoch.
    assert (
        schedule.learning_rate(10) == schedule.learning_rate(19) == pytest.approx(1e-4 + 0.9e-3 * (1 + 0.5**0.5) / 2)
    )
    assert schedule.learning_rate(20) == pytest.approx(1e-4 + 0.9e-3 / 2)
    # A warm-up longer than the first epoch is cut at its end.
    long_warmup = EpochCosineSchedule(1e-3, 1e-5, 1e-4, warmup_steps=2000, steps_per_epoch=10, num_epochs=4)
    assert long_warmup.learning_rate(5) == pytest.approx(1e-5 + 0.99e-3 / 2)
    # Two processes: the prepared scheduler steps twice per update; the multiplier counts updates.
    two = EpochCosineSchedule(
        1e-3, 1e-5, 1e-4, warmup_steps=4, steps_per_epoch=10, num_epochs=4, scheduler_steps_per_update=2
    )
    assert two(4) * 1e-3 == pytest.approx(schedule.learning_rate(2))


def test_base_probs_update_by_hand():
    def row(positive_probabilities, reference):
        probabilities = [[0.0, p, 1.0 - p, 0.0] for p in positive_probabilities] + [[1.0, 0.0, 0.0, 0.0]] * 4
        return {"predicted_probabilities": probabilities, "reference_labels": reference}

    # Observation 0: positive in both rows, probabilities 0.2 and 0.4 -> mean 0.3. Observation 1: positive in row 1
    # only, probability 0.6 -> 0.6 (the largest). Observation 2: never positive -> keeps its previous value 0.05.
    rows = [
        row([0.2, 0.9, 0.7] + [0.1] * 11, [1, 2, 2] + [0] * 11),
        row([0.4, 0.6, 0.8] + [0.1] * 11, [1, 1, 3] + [0] * 11),
        {"predicted_probabilities": None, "reference_labels": None},  # an unlabelled example is ignored
    ]
    previous = torch.full((18,), 0.05)
    updated = updated_base_probs(rows, previous)
    assert updated[0].item() == pytest.approx(0.3 / 0.6) and updated[1].item() == pytest.approx(1.0)
    assert updated[2].item() == pytest.approx(0.05) and torch.equal(updated[14:], torch.ones(4))
    assert torch.equal(previous, torch.full((18,), 0.05))  # not modified in place


def test_optimizer_is_fused_adamw_with_decay_on_weight_matrices_only():
    model = KifForConditionalGeneration(KifConfig.from_pretrained(TINY_DIR))
    model.vision_model.requires_grad_(False)
    optimizer = run_train.build_optimizer(model, 1e-3, 0.05, (0.9, 0.999))
    decayed, undecayed = optimizer.param_groups
    assert optimizer.defaults["fused"] is True
    assert decayed["weight_decay"] == 0.05 and undecayed["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in undecayed["params"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(trainable)  # every trainable parameter once, frozen ones not at all
    assert not trainable & {id(p) for p in model.vision_model.parameters()}


def test_fused_and_unfused_adamw_take_the_same_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    replica = copy.deepcopy(model)
    initial = [parameter.detach().clone() for parameter in model.parameters()]
    inputs = torch.randn(16, 8)
    for network, fused in ((model, True), (replica, False)):
        optimizer = run_train.build_optimizer(network, 1e-2, 0.05, (0.9, 0.999), fused=fused)
        for _ in range(3):
            network(inputs).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for fused_parameter, reference, start in zip(model.parameters(), replica.parameters(), initial):
        assert not torch.equal(fused_parameter, start)
        torch.testing.assert_close(fused_parameter, reference)
    assert run_train.parse_args([]).fused_adamw is True
    assert run_train.parse_args(["--no-fused_adamw"]).fused_adamw is False


# Allocates 64 blocks of 4 MiB, frees them, and allocates them again; prints the page faults of the second round.
REFAULT_SCRIPT = """
import resource, sys, torch
import run_train
if sys.argv[1] == "tuned":
    assert run_train.keep_freed_memory_in_heap()
def one_round():
    blocks = [torch.ones(2**20) for _ in range(64)]
    del blocks
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator settings are glibc's")
def test_tuned_allocator_reuses_freed_memory_instead_of_refaulting_it():
    def second_round_faults(mode: str) -> int:
        command = [sys.executable, "-c", REFAULT_SCRIPT, mode]
        return int(subprocess.run(command, cwd=REPO_DIR, capture_output=True, text=True, check=True).stdout)

    system, tuned = second_round_faults("system"), second_round_faults("tuned")
    assert system > 32 * 1024  # the 256 MiB came back from the kernel as fresh 4 KiB pages
    assert tuned < system / 10
    assert run_train.parse_args(["--no-tune_cpu_allocator"]).tune_cpu_allocator is False


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--annotation_file", "a.json", "--image_dir", "images"], "clip_features_file"),
        (["--selection_metric", "BLEU_5"], "unknown metrics"),
        (["--checkpointing_steps", "often"], "checkpointing_steps"),
        (["--rounds", "0", "--teacher", "somewhere"], "distillation round"),
        (["--learning_rate", "1e-4", "--min_learning_rate", "1e-3"], "min_learning_rate"),
        (["--per_device_train_batch_size", "0"], "must be positive"),
        (["--image_dir", "images"], "without --annotation_file"),
    ],
)
def test_bad_arguments_raise_value_errors(extra, message):
    with pytest.raises(ValueError, match=message):
        run_train.parse_args(extra)


def test_presets_and_explicit_arguments():
    embedded = run_train.parse_args([])
    assert embedded.preset == "synthetic-demo" and Path(embedded.model_config) == TINY_DIR
    paper = run_train.parse_args(["--annotation_file", "a.json", "--image_dir", "i", "--clip_features_file", "c.json"])
    assert paper.preset == "paper" and paper.learning_rate == 5e-5 and paper.warmup_steps == 2000
    assert paper.per_device_train_batch_size == 16 and paper.num_train_epochs == 10 and paper.model_config is None
    assert paper.min_learning_rate == pytest.approx(5e-6) and paper.warmup_start_learning_rate == pytest.approx(5e-7)
    explicit = run_train.parse_args(["--learning_rate", "3e-4"])
    assert explicit.learning_rate == 3e-4 and explicit.min_learning_rate == pytest.approx(3e-5)


def test_resume_path_must_belong_to_the_output_dir(tmp_path):
    elsewhere = tmp_path / "other" / "phase1" / "step_3"
    elsewhere.mkdir(parents=True)
    (elsewhere / run_train.PROGRESS_FILE).write_text("{}")
    args = run_train.parse_args(["--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", str(elsewhere)])
    with pytest.raises(ValueError, match="must be a checkpoint"):
        run_train.resolve_resume(args, run_train.phase_names(args), Path(args.output_dir))


if __name__ == "__main__":  # one process of test_two_processes_keep_replicas_identical_and_count_optimiser_steps
    _train_as_one_of_two_processes(Path(sys.argv[1]), sys.argv[2:])


def test_push_to_hub_needs_a_repository_id():
    with pytest.raises(ValueError, match="--hub_model_id"):
        run_train.parse_args(["--push_to_hub"])


def test_push_to_hub_uploads_the_output_directory(distilled_run, monkeypatch):
    """`--push_to_hub` hands the run's output directory to hub_kif.push_output_dir (tested offline in test_hub)."""
    import hub_kif

    output_dir, _ = distilled_run
    calls = []
    monkeypatch.setattr(hub_kif, "push_output_dir", lambda *args, **kwargs: calls.append((args, kwargs)))
    args = run_train.parse_args(["--push_to_hub", "--hub_model_id", "user/kif-test", "--hub_private"])
    run_train.publish(output_dir, args)
    assert calls == [((output_dir, "user/kif-test"), {"token": None, "private": True})]
