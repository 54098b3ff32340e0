"""Where things live: data root, repository root, committed weights, model repository."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ENV = "LEUKOGRAPH_DATA"
WEIGHTS_ENV = "LEUKOGRAPH_WEIGHTS"
CACHE_ENV = "LEUKOGRAPH_CACHE"


def data_root(cli_value: str | os.PathLike | None = None) -> Path:
    """`--data-root`, else $LEUKOGRAPH_DATA, else ../shared/datasets beside the repository."""
    if cli_value:
        return Path(cli_value).expanduser().resolve()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser().resolve()
    return (REPO_ROOT.parent / "shared" / "datasets").resolve()


# Committed release weights; LEUKOGRAPH_WEIGHTS points elsewhere (e.g. a fresh training run).
WEIGHTS_DIR = Path(os.environ.get(WEIGHTS_ENV) or REPO_ROOT / "training" / "weights").expanduser().resolve()
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
CACHE_DIR = Path(os.environ.get(CACHE_ENV) or REPO_ROOT / ".cache").expanduser().resolve()
