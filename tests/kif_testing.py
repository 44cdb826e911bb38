"""A small "model tester" shared by the test files: the tiny configuration, its processor, and random inputs."""

from pathlib import Path

import torch

from configuration_kif import KifConfig
from modeling_kif import KifForConditionalGeneration
from processing_kif import KifProcessor


REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_DIR = REPO_ROOT / "configs" / "kif-tiny"
# Small images keep the tests fast: the tiny ResNet reduces 64x64 to a 2x2 map (4 patches).
IMAGE_SIZE = 64
REPORTS = [
    "the heart size is normal . the lungs are clear .",
    "there is a small left pleural effusion . no pneumothorax .",
    "moderate cardiomegaly . a pacemaker is present .",
]


# Preamble of scripts run in a fresh interpreter that must not import the project: only the code files that
# `save_pretrained` wrote next to the weights (loaded with trust_remote_code) can serve.
HIDE_PROJECT_PREAMBLE = """
import sys

PROJECT_MODULES = {"configuration_kif", "modeling_kif", "processing_kif"}


class HideProject:
    def find_spec(self, name, path=None, target=None):
        if name in PROJECT_MODULES:
            raise ModuleNotFoundError(f"{name} is hidden from this process")
        return None


sys.meta_path.insert(0, HideProject())
"""


class KifModelTester:
    """Builds the tiny model and inputs of known shapes."""

    def __init__(self, batch_size: int = 3, seed: int = 0):
        self.batch_size = batch_size
        self.seed = seed
        self.config = KifConfig.from_pretrained(TINY_DIR)
        self.processor = KifProcessor.from_pretrained(TINY_DIR)

    @property
    def num_patches(self) -> int:
        return (IMAGE_SIZE // 32) ** 2

    def model(self) -> KifForConditionalGeneration:
        torch.manual_seed(self.seed)
        return KifForConditionalGeneration(self.config).eval()

    def pixel_values(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)

    def memory_embeds(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 1)
        shape = (self.batch_size, self.config.num_retrieved_reports, self.config.report_embedding_dim)
        return torch.randn(*shape, generator=generator)

    def findings(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + 2)
        return torch.randint(0, 4, (self.batch_size, self.config.num_observations), generator=generator).tolist()

    def training_inputs(self) -> dict:
        """Everything `forward` takes, for a batch whose reports have different lengths (so padding is exercised)."""
        reports = [REPORTS[index % len(REPORTS)] for index in range(self.batch_size)]
        findings = self.findings()
        text = self.processor(text=reports, findings=findings)
        return {
            "pixel_values": self.pixel_values(),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "labels": text["labels"],
            "disease_labels": torch.tensor(findings),
            "memory_embeds": self.memory_embeds(),
        }
