"""The benchmark script runs end to end in --quick mode (tiny configuration). No timings are asserted."""

import json
import platform
import sys

from kif_testing import REPO_ROOT


sys.path.insert(0, str(REPO_ROOT / "bench"))
import bench_kif  # noqa: E402


def test_bench_quick_mode_writes_the_ratios(tmp_path):
    output = tmp_path / "bench.json"
    results = bench_kif.main(["--quick", "--sections", "train", "generate", "eval", "--output", str(output)])
    saved = json.loads(output.read_text())
    for key in ("phase1_step", "distillation_step", "generation", "eval_reports_per_s"):
        assert saved[key] == results[key] and saved[key] > 0
    assert saved["distillation_step_s"] > 0 and saved["bare_step_s"] > 0
    assert saved["settings"]["quick"] is True
    # The timed sections keep freed memory in glibc's heap, for port and bare alike.
    assert saved["settings"]["tuned_allocator"] is (platform.libc_ver()[0] == "glibc")
