"""Shared fixtures. `triton_server`: one real CPU Triton server per test session (see deploy/server.py).

Which models it serves:
* committed weights in training/weights/ (and no $LEUKOGRAPH_WEIGHTS): the project's own model_repository/,
  exported first when model.onnx is missing, older than the weights or exported by other code (as `leukograph
  serve` does);
* otherwise: a temporary repository generated here and exported from $LEUKOGRAPH_WEIGHTS, else from
  training/weights/ - which fails loudly (checkpoint not found) when there is nothing to export.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from leukograph.deploy.paths import GRAPH_CODE_KEY, MODEL_REPOSITORY, WEIGHTS_DIR, WEIGHTS_ENV
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


@pytest.fixture
def tiny_graph() -> Callable[[Path, str | None], None]:
    """Writes a one-node ONNX file stamped as exported by the given graph code (None: no stamp, as before the stamp
    existed), for the re-export rule's tests."""
    import onnx

    def write(path: Path, graph_code: str | None) -> None:
        value = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1]) for name in ("x", "y")]
        model = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])],
                                                              "g", value[:1], value[1:]))
        if graph_code is not None:
            onnx.helper.set_model_props(model, {GRAPH_CODE_KEY: graph_code})
        onnx.save(model, str(path))

    return write
