"""A saved model and processor load with `trust_remote_code=True` in a fresh process where the project is not
importable, and give the same outputs."""

import subprocess
import sys
import textwrap

import torch

from kif_testing import HIDE_PROJECT_PREAMBLE, KifModelTester


# Runs in a fresh interpreter: the project's modules are made unimportable, so only the copies that
# `save_pretrained` wrote next to the weights can serve.
FRESH_PROCESS_SCRIPT = HIDE_PROJECT_PREAMBLE + textwrap.dedent(
    """
    import torch
    from transformers import AutoModel, AutoProcessor

    model_dir, inputs_file, outputs_file = sys.argv[1:4]
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    inputs = torch.load(inputs_file)
    with torch.no_grad():
        logits = model(**inputs["forward"]).logits
    sequences = model.generate(inputs["pixel_values"], num_beams=3, max_new_tokens=6, min_new_tokens=0)
    text = processor(text=inputs["reports"], findings=inputs["findings"])
    torch.save({"logits": logits, "sequences": sequences, "input_ids": text["input_ids"],
                "reports": processor.batch_decode(sequences)}, outputs_file)
    """
)


def test_saved_model_loads_with_remote_code_in_a_fresh_process(tmp_path):
    tester = KifModelTester()
    model = tester.model()
    model.set_report_memory(torch.randn(12, tester.config.vision_hidden_size), torch.randn(12, 64))
    model_dir = tmp_path / "saved"
    model.save_pretrained(model_dir)
    tester.processor.save_pretrained(model_dir)
    for code_file in ("configuration_kif.py", "modeling_kif.py", "processing_kif.py"):
        assert (model_dir / code_file).exists()

    reports = ["the heart size is normal .", "no pleural effusion ."]
    findings = [[1] * 18, [2] * 14]
    inputs = {
        "forward": tester.training_inputs(),
        "pixel_values": tester.pixel_values(),
        "reports": reports,
        "findings": findings,
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "load_remote.py"
    script.write_text(FRESH_PROCESS_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(model_dir), str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(tmp_path / "outputs.pt")

    with torch.no_grad():
        torch.testing.assert_close(outputs["logits"], model(**inputs["forward"]).logits)
    expected = model.generate(inputs["pixel_values"], num_beams=3, max_new_tokens=6, min_new_tokens=0)
    assert torch.equal(outputs["sequences"], expected)
    assert torch.equal(outputs["input_ids"], tester.processor(text=reports, findings=findings)["input_ids"])
    assert outputs["reports"] == tester.processor.batch_decode(expected)
