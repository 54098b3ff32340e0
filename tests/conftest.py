"""Shared fixtures. `triton_server`: one real CPU Triton server per test session (see deploy/server.py).

Which models it serves:
* committed weights in training/weights/ (and no $LEUKOGRAPH_WEIGHTS): the project's own model_repository/,
  exported first when model.onnx is missing or older than the weights (as `leukograph serve` does);
* otherwise: a temporary repository generated here and exported from $LEUKOGRAPH_WEIGHTS, else from
  training/weights/ - which fails loudly (checkpoint not found) when there is nothing to export.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from leukograph.deploy.paths import MODEL_REPOSITORY, WEIGHTS_DIR, WEIGHTS_ENV
from leukograph.deploy.server import TritonServer, ensure_exported, free_port

SERVER_START_TIMEOUT_S = 120.0  # ready in ~3 s here; generous for a loaded 2-core CI machine


@pytest.fixture(scope="session")
def served_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with up-to-date model.onnx files and version.json."""
    if not os.environ.get(WEIGHTS_ENV) and (WEIGHTS_DIR / "cnn.pt").exists():
        ensure_exported(MODEL_REPOSITORY, WEIGHTS_DIR)
        return MODEL_REPOSITORY
    from leukograph.deploy.model_repository import generate, write_digest
    from leukograph.training.export import export_all

    repository = tmp_path_factory.mktemp("model_repository")
    generate(repository, "onnxruntime")
    export_all(WEIGHTS_DIR, repository)  # UserError "checkpoint ... not found" when there are no weights
    write_digest(repository)
    return repository


@pytest.fixture(scope="session")
def triton_server(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A started TritonServer (grpc_url, http_url, restart(), stop(), startup_s, repository, log_path)."""
    log_path = tmp_path_factory.mktemp("tritonserver") / "tritonserver.log"
    server = TritonServer(served_repository, http_port=free_port(), grpc_port=free_port(),
                          metrics_port=free_port(), log_path=log_path)
    try:
        server.start(SERVER_START_TIMEOUT_S)
        yield server
    finally:
        server.stop()
