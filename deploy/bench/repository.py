"""The model repository a benchmark serves: generated, exported from the weights, instance counts set."""

from __future__ import annotations

from pathlib import Path


def prepare_repository(path: Path, backend: str, weights: Path, threads: int, instances: dict[str, int]) -> Path:
    """A model repository in `path`: generated configs, model files from `weights`, optional instance counts."""
    from leukograph.deploy.model_repository import generate, write_digest, write_torchscript
    from leukograph.training.export import export_all

    generate(path, backend if backend == "pytorch" else "onnxruntime", threads, instances)
    export_all(weights, path)  # the ONNX files: served (onnxruntime) and the in-process ORT rows (both)
    if backend == "pytorch":
        write_torchscript(weights, path)
    write_digest(path)
    return path


