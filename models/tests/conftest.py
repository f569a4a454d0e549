import sys
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(MODELS / "src"))

from fptserve_models.config import TINY_BACKBONE, TINY_SIDE  # noqa: E402
from fptserve_models.export import export_backbone  # noqa: E402
from fptserve_models.weights import random_backbone  # noqa: E402


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS


@pytest.fixture(scope="session")
def tiny_backbone():
    return random_backbone(TINY_BACKBONE, 0)


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory, tiny_backbone):
    """A repository holding the tiny fp32 backbone 'tiny' (seed 0)."""
    repo = tmp_path_factory.mktemp("tiny-repo")
    export_backbone(tiny_backbone, repo, "tiny", "random-init(seed=0)", 0)
    return repo
