"""What the run ran on: CPU, GPU, library versions, TensorRT availability, which weights."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from leukograph.deploy.paths import REPO_ROOT


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_description() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = "none"
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(Exception):
            done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                   "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            gpu = done.stdout.strip() or f"nvidia-smi failed: {done.stderr.strip()[:200]}"
    import cv2

    versions = {name: _version(dist) for name, dist in (
        ("torch", "torch"), ("onnxruntime", "onnxruntime"), ("tritonclient", "tritonclient"), ("numpy", "numpy"),
        ("nvidia-pytriton", "nvidia-pytriton"), ("torch-geometric", "torch_geometric"))}
    with contextlib.suppress(ImportError):  # the module imported, which onnxruntime-gpu also provides
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    versions["opencv"] = cv2.__version__
    versions["python"] = platform.python_version()
    return {"cpu_model": cpu, "cores": os.cpu_count(), "available_cores": len(os.sched_getaffinity(0)),
            "gpu": gpu, "platform": platform.platform(), "versions": versions}


def gpu_status() -> tuple[bool, str]:
    """(CUDA GPU usable, why not)."""
    reason = "nvidia-smi present" if shutil.which("nvidia-smi") else "no CUDA GPU (nvidia-smi not found)"
    try:
        import torch

        if torch.cuda.is_available():
            return True, f"CUDA GPU: {torch.cuda.get_device_name(0)}"
        return False, f"no CUDA GPU (torch {torch.__version__}: torch.cuda.is_available() is False; {reason})"
    except ImportError:
        return False, reason


def tensorrt_status() -> str | None:
    """None when TensorRT and a CUDA runtime can be used here, else the exact reason."""
    from leukograph.build_engines.runner import EngineRunnerError, import_runtime

    try:
        import_runtime()
    except EngineRunnerError as exc:
        return str(exc)
    return None


def _short_hash(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def weights_info(weights: Path) -> dict:
    """Which checkpoints the run used (path, epochs, a hash): trained weights or the development stand-ins."""
    info: dict[str, Any] = {"dir": str(weights)}
    for name in ("cnn.pt", "gnn.pt"):
        path = weights / name
        if path.exists():
            info[name] = _short_hash(path)
    with contextlib.suppress(Exception):
        from leukograph.training.checkpoints import load_checkpoint

        for name in ("cnn", "gnn"):
            ckpt = load_checkpoint(weights / f"{name}.pt")
            info[f"{name}_epoch"] = ckpt.get("epoch")
            metrics = ckpt.get("metrics") or {}
            info[f"{name}_metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    release = (REPO_ROOT / "training" / "weights").resolve()
    # the release folder (trained), or a copy of its checkpoints (carried to another machine), not a stand-in
    info["committed_weights"] = weights.resolve() == release or all(
        (release / name).exists() and info.get(name) == _short_hash(release / name) for name in ("cnn.pt", "gnn.pt"))
    with contextlib.suppress(Exception):
        done = subprocess.run(["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h %cI", "--",
                               str(weights / "cnn.pt")], capture_output=True, text=True, timeout=10)
        info["git_commit_of_cnn"] = done.stdout.strip() or "not committed yet"
    return info


