"""Speed and memory of the KIF-ISD port against the bare components doing the same work, side by side.

Bare components: a torchvision ResNet-101 trunk and transformers' BLIP text decoder with 2048-wide cross-attention
(the decoder the original used) — forward + backward + AdamW on the same batch; for generation, the trunk and the
bare decoder's own `generate` with the same beams and lengths. Ratios are port / bare in the same process, medians
of several repetitions after warm-up. Peak memory is measured in separate processes.

    python bench/bench_kif.py                       # full size, CPU, fp32, batch 4, 2 threads
    python bench/bench_kif.py --quick               # tiny configuration, seconds (what the tests run)
    python bench/bench_kif.py --device cuda --dtype bfloat16 --batch_size 32 --gen_batch_size 16   # one GPU
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torchvision
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from configuration_kif import KifConfig  # noqa: E402
from distillation_kif import kd_loss, relational_loss  # noqa: E402
from modeling_kif import KifForConditionalGeneration  # noqa: E402
from run_train import build_optimizer, keep_freed_memory_in_heap  # noqa: E402


TINY_DIR = REPO_ROOT / "configs" / "kif-tiny"
# The original's figures (2-core CPU, fp32, 2 threads, batch 4 at 224x224, 80-token captions), for the table.
ORIGINAL_RATIOS = {"distillation_step": 2.45, "generation": 2.03, "peak_memory_distillation": 1.8}
TARGETS = {"phase1_step": 1.10, "distillation_step": 1.35, "generation": 1.05, "peak_memory_distillation": 1.30}
KD_WEIGHTS = {"cls": 4.0, "kd": 0.01, "rel": 1.0, "temperature": 4.0}
# Port and bare use the same optimiser (run_train.build_optimizer: fused AdamW unless --no-fused_adamw); the values
# do not change the work done.
OPTIMIZER = {"learning_rate": 1e-5, "weight_decay": 0.05, "betas": (0.9, 0.999)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny configuration and few repetitions.")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--gen_batch_size", type=int, default=2)
    parser.add_argument("--caption_length", type=int, default=80, help="Report tokens after the 19-token prompt.")
    parser.add_argument("--new_tokens", type=int, default=20, help="Tokens generated (min = max, equal work).")
    parser.add_argument("--num_beams", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--teacher_dtype", default="bfloat16", choices=["float32", "bfloat16"],
        help="Weights of the frozen teacher, as run_train.py's --teacher_dtype.",
    )  # fmt: skip
    parser.add_argument("--fused_adamw", action=argparse.BooleanOptionalAction, default=True,
                        help="As run_train.py's flag, for the port and the bare components alike.")  # fmt: skip
    parser.add_argument("--system_allocator", action="store_true",
                        help="Time with glibc malloc's default settings instead of run_train.py's "
                             "--tune_cpu_allocator settings (peak memory always uses the defaults).")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sections", nargs="+", default=["train", "generate", "memory", "eval"])
    parser.add_argument("--output", default="bench_results.json")
    parser.add_argument("--memory_child", choices=["distillation", "bare"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.caption_length, args.new_tokens = 1, 1, 12, 4
        args.batch_size, args.gen_batch_size = 2, 1
    return args


# ------------------------------------------------------------------------------------------------ set-up
def build_config(args) -> KifConfig:
    return KifConfig.from_pretrained(TINY_DIR) if args.quick else KifConfig()


def image_size(config: KifConfig, args) -> int:
    return 64 if args.quick else 224


def autocast(args):
    if args.dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=args.device, dtype=torch.bfloat16)


def make_batch(config: KifConfig, args, batch_size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    size = image_size(config, args)
    length = config.prompt_length + args.caption_length
    vocab = config.text_config.vocab_size
    input_ids = torch.randint(len(config.state_tokens) + 1, vocab - 10, (batch_size, length), generator=generator)
    input_ids[:, 0] = config.text_config.bos_token_id
    labels = input_ids.clone()
    labels[:, : config.prompt_length] = -100
    batch = {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "disease_labels": torch.randint(0, 4, (batch_size, config.num_observations), generator=generator),
        "memory_embeds": torch.randn(
            batch_size, config.num_retrieved_reports, config.report_embedding_dim, generator=generator
        ),
    }
    return {name: value.to(args.device) for name, value in batch.items()}


class BareComponents(torch.nn.Module):
    """The original's backbone work without its additions: ResNet trunk -> patches -> BLIP decoder."""

    def __init__(self, config: KifConfig, quick: bool):
        super().__init__()
        if quick:  # a torchvision ResNet of the tiny config's depth/width is not available; use resnet18 widths
            resnet = torchvision.models.resnet18()
            self.patch_projection = torch.nn.Linear(512, config.text_config.encoder_hidden_size)
        else:
            resnet = torchvision.models.resnet101()
            self.patch_projection = torch.nn.Identity()
        self.trunk = torch.nn.Sequential(*list(resnet.children())[:-2])
        self.decoder = BlipTextLMHeadModel(config.text_config)

    def encode(self, pixel_values):
        patches = self.trunk(pixel_values).flatten(2).transpose(1, 2)
        return self.patch_projection(patches)

    def forward(self, pixel_values, input_ids, attention_mask, labels, **unused):
        states = self.encode(pixel_values)
        return self.decoder(input_ids, attention_mask=attention_mask, encoder_hidden_states=states, labels=labels)


def seconds(step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_medians(steps: dict, repeats: int, warmup: int, device: str) -> dict:
    """Median seconds of each step, the steps taking turns in every repetition: a slow spell of a shared machine then
    hits port and bare alike instead of whichever happened to run during it."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(seconds(step, device))
    return {name: statistics.median(values) for name, values in times.items()}


# ------------------------------------------------------------------------------------------------ training steps
def optimise(loss, optimizer) -> None:
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def teacher_inputs(batch: dict, dtype: torch.dtype) -> dict:
    """The batch with floating inputs in the teacher's dtype (the teacher may be kept in bfloat16)."""
    return {name: value.to(dtype) if value.is_floating_point() else value for name, value in batch.items()}


def port_steps(config: KifConfig, args) -> dict:
    """The port's phase-1 step and distillation step (student + frozen teacher under no_grad)."""
    student = KifForConditionalGeneration(config).to(args.device).train()
    teacher = KifForConditionalGeneration(config).to(args.device, getattr(torch, args.teacher_dtype)).eval()
    teacher.requires_grad_(False)
    optimizer = build_optimizer(student, **OPTIMIZER, fused=args.fused_adamw)
    batch = make_batch(config, args, args.batch_size)

    def phase1_step():
        with autocast(args):
            loss = student(**batch).loss
        optimise(loss, optimizer)

    def distillation_step():
        with torch.no_grad(), autocast(args):
            teacher_output = teacher(**teacher_inputs(batch, teacher.dtype))
        with autocast(args):
            output = student(**batch)
            distillation = KD_WEIGHTS["kd"] * kd_loss(
                output.logits, teacher_output.logits, batch["labels"], KD_WEIGHTS["temperature"]
            ) + KD_WEIGHTS["rel"] * relational_loss(
                output.patch_features, output.cls_logits, teacher_output.patch_features, teacher_output.cls_logits
            )
            loss = output.lm_loss + KD_WEIGHTS["cls"] * output.cls_loss + distillation
        optimise(loss, optimizer)

    return {"phase1_step": phase1_step, "distillation_step": distillation_step}


def bare_training_step(config: KifConfig, args):
    """Forward + backward + AdamW of the bare components on the same batch."""
    bare = BareComponents(config, args.quick).to(args.device).train()
    optimizer = build_optimizer(bare, **OPTIMIZER, fused=args.fused_adamw)
    batch = make_batch(config, args, args.batch_size)

    def bare_step():
        with autocast(args):
            loss = bare(**batch).loss
        optimise(loss, optimizer)

    return bare_step


def bench_training(config, args) -> dict:
    steps = {**port_steps(config, args), "bare_step": bare_training_step(config, args)}
    medians = interleaved_medians(steps, args.repeats, args.warmup, args.device)
    return {
        **{f"{name}_s": value for name, value in medians.items()},
        "phase1_step": medians["phase1_step"] / medians["bare_step"],
        "distillation_step": medians["distillation_step"] / medians["bare_step"],
    }


# ------------------------------------------------------------------------------------------------ generation
def bench_generation(config, args) -> dict:
    model = KifForConditionalGeneration(config).to(args.device).eval()
    bare = BareComponents(config, args.quick).to(args.device).eval()
    batch = make_batch(config, args, args.gen_batch_size)
    settings = {
        "num_beams": args.num_beams, "min_new_tokens": args.new_tokens, "max_new_tokens": args.new_tokens,
        "do_sample": False,
    }  # fmt: skip
    prompt = batch["input_ids"][:, : config.prompt_length]

    @torch.no_grad()
    def port_generate():
        with autocast(args):
            model.generate(batch["pixel_values"], memory_embeds=batch["memory_embeds"], **settings)

    @torch.no_grad()
    def bare_generate():
        with autocast(args):
            states = bare.encode(batch["pixel_values"])
            bare.decoder.generate(
                input_ids=prompt, encoder_hidden_states=states, eos_token_id=None,
                pad_token_id=config.text_config.pad_token_id, **settings,
            )  # fmt: skip

    medians = interleaved_medians(
        {"port": port_generate, "bare": bare_generate}, args.repeats, args.warmup, args.device
    )
    port, reference = medians["port"], medians["bare"]
    return {
        "port_generate_s": port,
        "bare_generate_s": reference,
        "port_seconds_per_token": port / args.new_tokens,
        "bare_seconds_per_token": reference / args.new_tokens,
        "generation": port / reference,
    }


# ------------------------------------------------------------------------------------------------ peak memory
def peak_memory_bytes() -> int:
    """Peak memory of this process: GPU memory allocated on CUDA, else the resident-set high-water mark. VmHWM is
    read rather than `getrusage`'s ru_maxrss, which Linux carries over from the parent across fork + exec."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated()
    status = Path("/proc/self/status").read_text()
    kibibytes = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kibibytes) * 1024


def memory_child(config, args) -> None:
    """Run in its own process: two steps of one kind, then print the process's peak memory."""
    if args.memory_child == "distillation":
        step = port_steps(config, args)["distillation_step"]
    else:
        step = bare_training_step(config, args)
    for _ in range(2):
        step()
    print(json.dumps({"peak_bytes": peak_memory_bytes()}))


def bench_memory(args, argv) -> dict:
    peaks = {}
    for kind in ("distillation", "bare"):
        command = [sys.executable, __file__, *argv, "--memory_child", kind]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        peaks[kind] = json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]
    return {
        "distillation_peak_gb": peaks["distillation"] / 2**30,
        "bare_peak_gb": peaks["bare"] / 2**30,
        "peak_memory_distillation": peaks["distillation"] / peaks["bare"],
    }


# ------------------------------------------------------------------------------------------------ evaluation
def bench_evaluation(args) -> dict:
    import numpy as np

    from data_kif import sample_synthetic_findings, write_synthetic_report
    from labeling_kif import RuleBasedLabeler
    from metrics_kif import compute_ce_metrics, compute_nlg_metrics

    count = 200 if args.quick else 4000
    rng = np.random.default_rng(0)
    references = [write_synthetic_report(sample_synthetic_findings(rng), rng)[0] for _ in range(count)]
    predictions = [write_synthetic_report(sample_synthetic_findings(rng), rng)[0] for _ in range(count)]
    labeler = RuleBasedLabeler()
    start = time.perf_counter()
    compute_nlg_metrics(predictions, references, meteor=False)
    compute_ce_metrics(labeler.label(predictions), labeler.label(references))
    seconds = time.perf_counter() - start
    return {"eval_pairs": count, "eval_seconds": seconds, "eval_reports_per_s": count / seconds}


# ------------------------------------------------------------------------------------------------ report
def format_table(results: dict) -> str:
    lines = [f"{'measure':<28}{'port/bare':>10}{'target':>9}{'original':>10}"]
    for key, target in TARGETS.items():
        if key in results:
            original = ORIGINAL_RATIOS.get(key)
            lines.append(f"{key:<28}{results[key]:>10.3f}{target:>9.2f}{(f'{original:.2f}' if original else '-'):>10}")
    for key in sorted(results):
        if key not in TARGETS and isinstance(results[key], float):
            lines.append(f"  {key:<40}{results[key]:.4g}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = build_config(args)
    if args.memory_child:
        memory_child(config, args)
        return {}

    tuned_allocator = not args.system_allocator and keep_freed_memory_in_heap()  # timed sections only
    settings = {key: value for key, value in vars(args).items() if key != "memory_child"}
    results = {"settings": {**settings, "tuned_allocator": tuned_allocator}}
    if "train" in args.sections:
        results.update(bench_training(config, args))
    if "generate" in args.sections:
        results.update(bench_generation(config, args))
    if "memory" in args.sections:
        results.update(bench_memory(args, argv))
    if "eval" in args.sections:
        results.update(bench_evaluation(args))
    print(format_table(results))
    Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
