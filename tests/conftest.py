import os
import sys
from pathlib import Path

import torch


# The project's modules are top-level files in the repository root; make them importable without installation too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Under pytest-xdist every worker would start one thread per core: with 2 workers on 2 cores the OpenMP threads
# oversubscribe the CPU and spin against each other. One thread per worker is faster overall.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------------
# Data fixtures (data_kif.py): a small synthetic data set shared by the tests of one session.
# ---------------------------------------------------------------------------------------------------------------------
import pytest  # noqa: E402


SYNTHETIC_TEST_STUDIES = 120
SYNTHETIC_TEST_RETRIEVED_REPORTS = 5
SYNTHETIC_TEST_EMBEDDING_DIM = 32


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A synthetic data set (120 studies, k=5 retrieved reports, 32-dim features) in PromptMRG's file formats."""
    from data_kif import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"),
        num_studies=SYNTHETIC_TEST_STUDIES,
        num_retrieved_reports=SYNTHETIC_TEST_RETRIEVED_REPORTS,
        report_embedding_dim=SYNTHETIC_TEST_EMBEDDING_DIM,
    )


@pytest.fixture(scope="session")
def tiny_synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic data set whose retrieval features fit configs/kif-tiny (k=21, 64-dim)."""
    from configuration_kif import KifConfig
    from data_kif import make_synthetic_dataset

    config = KifConfig.from_pretrained(Path(__file__).resolve().parent.parent / "configs" / "kif-tiny")
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("tiny-synthetic"),
        num_studies=40,
        num_retrieved_reports=config.num_retrieved_reports,
        report_embedding_dim=config.report_embedding_dim,
    )
