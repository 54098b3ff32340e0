"""Checkpoints: model, optimizer, epoch, args and metrics in one file, loaded with weights_only=True.

Run folders keep full checkpoints (for --resume). The committed release weights in training/weights/ drop the
optimizer state to stay small; everything else is kept, so each file says how it was made.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from leukograph.client.contract import CROP_SIZE
from leukograph.client.errors import UserError
from leukograph.deploy.paths import write_atomically
from leukograph.training.cells import use_crop_size
from leukograph.training.models import CellGraphNet, CropEmbedder, SeedBaseline

CNN_FILE, GNN_FILE, BASELINE_FILE = "cnn.pt", "gnn.pt", "baseline.pt"
CALIBRATION_FILE = "calibration.json"  # temperatures and the unidentified threshold, fitted on validation


def load_calibration(weights_dir: Path) -> dict:
    """calibration.json of a weights folder ({} when absent: temperature 1, uncalibrated)."""
    path = weights_dir / CALIBRATION_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _plain(value: Any) -> Any:
    """Make args safe for weights_only loading: Paths and other objects become strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, epoch: int,
                    args: argparse.Namespace | dict, metrics: dict, config: dict | None = None) -> Path:
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": epoch,
        "args": _plain(vars(args) if isinstance(args, argparse.Namespace) else args),
        "metrics": _plain(metrics),
        "config": _plain(config or {}),
    }
    return write_atomically(path, lambda tmp: torch.save(payload, tmp))  # never a half-written checkpoint


def load_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"checkpoint {path} not found; run `leukograph train` or pass --weights")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted or foreign file
        raise UserError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from None


def cnn_crop_size(weights_dir: Path) -> int:
    """The crop side the released CNN in `weights_dir` takes (checkpoints without it: contract.CROP_SIZE)."""
    return int(load_checkpoint(weights_dir / CNN_FILE)["config"].get("crop_size", CROP_SIZE))


def _cnn_from(ckpt: dict) -> CropEmbedder:
    embedder = CropEmbedder(**ckpt["config"])
    embedder.load_state_dict(ckpt["model"])
    return embedder.eval()


def load_cnn(path: Path) -> CropEmbedder:
    """A CNN checkpoint (run or released) as a CropEmbedder in eval mode."""
    return _cnn_from(load_checkpoint(path))


def _gnn_from(ckpt: dict) -> CellGraphNet:
    gnn = CellGraphNet(**ckpt["config"])
    state = ckpt["model"]
    defaults = gnn.state_dict()
    if "cnn_weight" not in state:  # made before the CNN blend: the GNN's logits alone
        state = {**state, **{k: v for k, v in defaults.items() if k.startswith("cnn_")}}
    if "class_bias" not in state:  # made before the flagged classes' shift: none
        state = {**state, "class_bias": defaults["class_bias"]}
    gnn.load_state_dict(state)
    return gnn.eval()


def load_gnn(path: Path) -> CellGraphNet:
    """A GNN checkpoint (run or released) as a CellGraphNet in eval mode."""
    return _gnn_from(load_checkpoint(path))


def load_models(weights_dir: Path) -> tuple[CropEmbedder, CellGraphNet, dict]:
    """The CNN and GNN in eval mode, plus their checkpoints' metadata. Cells built after this are cut at the CNN's
    crop side (`cells.use_crop_size`), so evaluation, classification and calibration feed it what it was trained on."""
    cnn_ckpt = load_checkpoint(weights_dir / CNN_FILE)
    gnn_ckpt = load_checkpoint(weights_dir / GNN_FILE)
    embedder = _cnn_from(cnn_ckpt)
    gnn = _gnn_from(gnn_ckpt)
    use_crop_size(embedder.crop_size)
    meta = {"cnn": {k: cnn_ckpt[k] for k in ("epoch", "args", "metrics")},
            "gnn": {k: gnn_ckpt[k] for k in ("epoch", "args", "metrics")},
            "calibration": load_calibration(weights_dir)}
    return embedder.eval(), gnn.eval(), meta


def load_baseline(weights_dir: Path) -> SeedBaseline:
    ckpt = load_checkpoint(weights_dir / BASELINE_FILE)
    model = SeedBaseline(**ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model.eval()
