"""Where things live: data root, repository root, committed weights, model repository, cache.

In a source checkout everything is relative to the checkout. In an installed package (a wheel) there is no checkout:
the weights are the package's own, and the model repository, cache and data default to the current directory.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
from collections.abc import Callable, Iterable
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


# The code that builds the served ONNX graphs. Every exported graph carries the digest of these files
# (`GRAPH_CODE_KEY` in its metadata): a graph exported by other code (an upgrade that changed a stage but not the
# weights) is stale, as one older than the weights is.
GRAPH_SOURCES = ("client/contract.py", "training/models.py", "training/detector.py", "training/export.py")
GRAPH_CODE_KEY = "leukograph_graph_code"


@functools.cache
def graph_code_digest() -> str:
    """sha256 (16 hex digits) over `GRAPH_SOURCES`, names and bytes."""
    digest = hashlib.sha256()
    for name in GRAPH_SOURCES:
        digest.update(name.encode() + b"\0" + (PACKAGE_ROOT / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def graph_code_stale(path: Path) -> str | None:
    """Why the exported graph at `path` was not built by this code, or None when it was."""
    import onnx  # only when checking: `paths` stays light

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is simply to be exported again
        return f"{path} is not a readable ONNX file ({type(exc).__name__})"
    stamped = {prop.key: prop.value for prop in model.metadata_props}.get(GRAPH_CODE_KEY)
    if stamped != graph_code_digest():
        return f"{path} was exported by other code (graph code {stamped or 'not recorded'}, now {graph_code_digest()})"
    return None


def export_stale(path: Path, checkpoints: Iterable[Path]) -> str | None:
    """Why the exported graph at `path` must be exported (again): missing, older than one of `checkpoints`, or built
    by other code (`graph_code_stale`); None when it is up to date."""
    if not path.exists():
        return f"{path} is missing"
    newest = max(checkpoints, key=lambda checkpoint: checkpoint.stat().st_mtime, default=None)
    if newest is not None and path.stat().st_mtime < newest.stat().st_mtime:
        return f"{path} is older than the weights in {newest.parent}"
    return graph_code_stale(path)
