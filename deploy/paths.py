"""Where things live: data root, repository root, committed weights, model repository, cache.

In a source checkout everything is relative to the checkout. In an installed package (a wheel) there is no checkout:
the weights are the package's own, and the model repository, cache and data default to the current directory.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

DATA_ENV = "LEUKOGRAPH_DATA"
WEIGHTS_ENV = "LEUKOGRAPH_WEIGHTS"
CACHE_ENV = "LEUKOGRAPH_CACHE"

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # holds training/, deploy/, ... (checkout or site-packages)
# A source checkout has its pyproject.toml beside the packages; an installed package works from the current directory.
REPO_ROOT = PACKAGE_ROOT if (PACKAGE_ROOT / "pyproject.toml").exists() else Path.cwd().resolve()


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` to a temporary file of this process's own beside `path`, then rename it into place: a reader never
    sees half a file, a crash leaves the old one, and processes writing the same file at once (two trainings filling
    one cell cache) do not rename each other's temporary away."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def data_root(cli_value: str | os.PathLike | None = None) -> Path:
    """`--data-root`, else $LEUKOGRAPH_DATA, else ../shared/datasets beside the repository."""
    if cli_value:
        return Path(cli_value).expanduser().resolve()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser().resolve()
    return (REPO_ROOT.parent / "shared" / "datasets").resolve()


# Release weights shipped with the package; LEUKOGRAPH_WEIGHTS points elsewhere (e.g. a fresh training run).
RELEASE_WEIGHTS_DIR = PACKAGE_ROOT / "training" / "weights"
WEIGHTS_DIR = Path(os.environ.get(WEIGHTS_ENV) or RELEASE_WEIGHTS_DIR).expanduser().resolve()
DETECTOR_WEIGHTS = "detector.pt"  # the cell detector's checkpoint in a weights folder


def detector_weights_dir(weights_dir: Path = WEIGHTS_DIR) -> Path:
    """`weights_dir` when it holds detector.pt, else the released weights' folder: a folder of classifier weights
    alone (`leukograph adapt`'s, a CNN/GNN training run) keeps the released detector."""
    return Path(weights_dir) if (Path(weights_dir) / DETECTOR_WEIGHTS).exists() else RELEASE_WEIGHTS_DIR


MODEL_REPOSITORY = REPO_ROOT / "model_repository"
CACHE_DIR = Path(os.environ.get(CACHE_ENV) or REPO_ROOT / ".cache").expanduser().resolve()


def shown_path(path: Path) -> str:
    """A path as the repository's docs and help texts show it: relative to the repository root when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
