"""The real CPU Triton server: ensemble == in-process ONNX Runtime, bad requests, `leukograph serve` lifecycle."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from leukograph.client import contract
from leukograph.client.errors import UserError
from leukograph.deploy.model_repository import generate
from leukograph.deploy.paths import graph_code_digest
from leukograph.deploy.server import TritonServer, free_port, onnx_stale
from leukograph.training.datasets import held_out_frames, load_bccd

pytestmark = pytest.mark.server
LEUKOGRAPH = [sys.executable, "-m", "leukograph.client.cli"]
TOLERANCE = 1e-4
N_FRAMES = 4


def bccd_requests(count: int = N_FRAMES) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Held-out BCCD frames (RGB) with their VOC boxes, skipping frames whose annotation breaks the contract."""
    held_out = held_out_frames()
    requests = []
    for frame in load_bccd():
        if frame.frame_id not in held_out or not frame.boxes:
            continue
        image = cv2.cvtColor(cv2.imread(str(frame.image_path)), cv2.COLOR_BGR2RGB)
        boxes = np.array([b.box for b in frame.boxes], np.float32)
        try:
            contract.validate_request(image, boxes)
        except contract.ContractError:
            continue
        requests.append((frame.frame_id, image, boxes))
        if len(requests) == count:
            break
    assert len(requests) == count, "not enough held-out BCCD frames"
    return requests


def onnxruntime_reference(repository: Path, frame: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sessions = [ort.InferenceSession(str(repository / s.name / "1" / "model.onnx"),
                                     providers=["CPUExecutionProvider"]) for s in contract.STAGES]
    feed = contract.boxes_feed(frame, boxes)
    embeddings, frame_size = sessions[0].run(None, feed)
    probs, labels = sessions[1].run(None, {"EMBEDDINGS": embeddings, "BOXES": boxes, "FRAME_SIZE": frame_size,
                                           "CELL_COUNT": feed["CELL_COUNT"]})
    return probs, labels


def infer(module, url: str, frame: np.ndarray, boxes: np.ndarray, model: str = contract.BOXES_PIPELINE.name,
          frame_dtype: str | None = None, boxes_dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One request with the client's boxes through tritonclient (grpc or http module), the contract's names and
    dtypes (CELL_COUNT = N)."""
    client = module.InferenceServerClient(url)
    inputs = []
    for spec, array, dtype in ((contract.FRAME, frame, frame_dtype), (contract.BOXES, boxes, boxes_dtype),
                               (contract.CELL_COUNT, contract.cell_count(boxes), None)):
        tensor = module.InferInput(spec.name, list(array.shape), dtype or spec.client_dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [module.InferRequestedOutput(name) for name in contract.BOXES_PIPELINE.output_names]
    try:
        result = client.infer(model, inputs, outputs=outputs)
    finally:
        client.close()  # an open HTTP keep-alive connection delays the server's shutdown by its exit timeout
    return result.as_numpy(contract.PROBS.name), result.as_numpy(contract.LABELS.name)


@pytest.fixture(scope="module")
def frames() -> list[tuple[str, np.ndarray, np.ndarray]]:
    return bccd_requests()


def test_server_became_ready(triton_server: TritonServer) -> None:
    assert triton_server.is_ready()
    print(f"tritonserver ready in {triton_server.startup_s:.2f} s")  # shown with -s; ~3 s on the 2-core box


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ensemble_matches_onnxruntime(triton_server: TritonServer, frames, protocol: str) -> None:
    module, url = (grpcclient, triton_server.grpc_url) if protocol == "grpc" else \
        (httpclient, triton_server.http_url)
    for frame_id, frame, boxes in frames:
        probs, labels = infer(module, url, frame, boxes)
        want_probs, want_labels = onnxruntime_reference(triton_server.repository, frame, boxes)
        assert probs.dtype == contract.PROBS.np_dtype and labels.dtype == contract.LABELS.np_dtype
        assert probs.shape == (len(boxes), contract.NUM_CLASSES), frame_id
        np.testing.assert_allclose(probs, want_probs, atol=TOLERANCE, rtol=0, err_msg=frame_id)
        np.testing.assert_array_equal(labels, want_labels, err_msg=frame_id)


def _bad_cases(frame: np.ndarray, boxes: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, dict, str]]:
    """name -> (frame, boxes, infer kwargs, text the error must contain)."""
    h, w = frame.shape[:2]
    nan_boxes = boxes.copy()
    nan_boxes[0, 1] = np.nan
    outside = boxes.copy()
    outside[0] = [w - 10, h - 10, w + 40, h + 40]
    many = np.tile(boxes[:1], (contract.MAX_CELLS + 1, 1))
    return {
        "boxes float64": (frame, boxes.astype(np.float64), {"boxes_dtype": "FP64"}, "BOXES"),
        "frame float32": (frame.astype(np.float32), boxes, {"frame_dtype": "FP32"}, "FRAME"),
        "boxes Nx5": (frame, np.hstack([boxes, boxes[:, :1]]), {}, "BOXES"),
        "frame 2-D": (frame[:, :, 0].copy(), boxes, {}, "FRAME"),
        "frame 4 channels": (np.dstack([frame, frame[:, :, :1]]), boxes, {}, "FRAME"),
        "no cells": (frame, np.zeros((0, 4), np.float32), {}, "BOXES is empty"),
        "too many cells": (frame, many, {}, f"MAX_CELLS={contract.MAX_CELLS}"),
        "box outside the frame": (frame, outside, {}, "outside"),
        "NaN box": (frame, nan_boxes, {}, "NaN"),
        "frame too small": (frame[:8, :8].copy(), np.array([[1, 1, 6, 6]], np.float32), {}, "FRAME side"),
    }


def test_bad_requests_get_clear_errors_and_server_keeps_serving(triton_server: TritonServer, frames) -> None:
    _, frame, boxes = frames[0]
    for name, (bad_frame, bad_boxes, kwargs, expected) in _bad_cases(frame, boxes).items():
        with pytest.raises(InferenceServerException) as error:
            infer(grpcclient, triton_server.grpc_url, bad_frame, bad_boxes, **kwargs)
        message = error.value.message()
        assert expected in message, f"{name}: {message}"
        assert "\n" not in message.strip(), f"{name}: not one line: {message}"
        if "bad request" in message:  # the python step's own validation: INVALID_ARG
            assert "INVALID_ARG" in str(error.value.status()), f"{name}: {error.value.status()}"
    # Over HTTP the contract violation is a 400 with the same message.
    with pytest.raises(InferenceServerException) as error:
        infer(httpclient, triton_server.http_url, frame, np.zeros((0, 4), np.float32))
    assert "BOXES is empty" in error.value.message() and error.value.status() == "400"
    # The models are still loaded and a good request succeeds.
    assert triton_server.is_ready()
    probs, _ = infer(grpcclient, triton_server.grpc_url, frame, boxes)
    assert probs.shape == (len(boxes), contract.NUM_CLASSES)


def test_cell_graph_validates_its_own_inputs(triton_server: TritonServer, frames) -> None:
    """Called directly (not through the ensemble) the second step still checks the contract."""
    _, frame, boxes = frames[0]
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    h, w = frame.shape[:2]
    n = contract.cell_count(boxes)
    rows = np.zeros((len(boxes), contract.EMBED_DIM), np.float32)
    cases = {  # expected text: (EMBEDDINGS, FRAME_SIZE, CELL_COUNT)
        "EMBEDDINGS has": (np.zeros((len(boxes) + 1, contract.EMBED_DIM), np.float32), np.float32([h, w]), n),
        "CELL_COUNT is": (rows, np.float32([h, w]), n + 1),
        "FRAME_SIZE contains NaN": (rows, np.float32([h, np.nan]), n),
        "FRAME_SIZE must be in": (rows, np.float32([h, 1e6]), n),
    }
    for expected, (embeddings, frame_size, count) in cases.items():
        inputs = []
        for spec, array in zip(contract.CELL_GRAPH.inputs, (embeddings, boxes, frame_size, count)):
            tensor = grpcclient.InferInput(spec.name, list(array.shape), spec.client_dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        with pytest.raises(InferenceServerException, match=expected):
            client.infer(contract.CELL_GRAPH.name, inputs)
    client.close()


def test_limits_and_version_are_visible_to_clients(triton_server: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    config = client.get_model_config(contract.PIPELINE_NAME, as_json=True)["config"]
    client.close()
    assert int(config["parameters"]["max_cells"]["string_value"]) == contract.MAX_CELLS
    assert (triton_server.repository / contract.PIPELINE_NAME / "1" / "version.json").exists()


def test_restart(triton_server: TritonServer, frames) -> None:
    triton_server.restart()
    assert triton_server.is_ready()
    _, frame, boxes = frames[1]
    probs, _ = infer(httpclient, triton_server.http_url, frame, boxes)
    assert probs.shape == (len(boxes), contract.NUM_CLASSES)


def test_server_that_cannot_load_its_models_fails_clearly(tmp_path: Path) -> None:
    generate(tmp_path, "onnxruntime")  # configs but no model.onnx: the python steps fail to load
    server = TritonServer(tmp_path, free_port(), free_port(), free_port(), log_path=tmp_path / "log.txt")
    with pytest.raises(UserError, match="tritonserver exited with code"):
        server.start(timeout=60)
    assert server.process is None


def _read_until(process: subprocess.Popen, needle: str, timeout: float) -> str:
    """stdout of `process` until a line containing `needle` (or timeout / exit); a thread does the reading."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(lines.get(timeout=0.5))
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        if needle in seen[-1]:
            return "".join(seen)
    raise AssertionError(f"no {needle!r} from leukograph serve; output:\n{''.join(seen)}")


def test_serve_cli_starts_answers_and_stops_on_sigterm(served_repository: Path, tmp_path: Path, frames) -> None:
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    command = [*LEUKOGRAPH, "serve", "--model-repository", str(served_repository), "--http-port", str(http_port),
               "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
               "--log-file", str(tmp_path / "serve.log")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ))
    try:
        output = _read_until(process, "GPU deployment", timeout=120)
        assert "ready in" in output and f"127.0.0.1:{grpc_port}" in output
        _, frame, boxes = frames[0]
        probs, _ = infer(grpcclient, f"127.0.0.1:{grpc_port}", frame, boxes)
        assert probs.shape == (len(boxes), contract.NUM_CLASSES)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        if process.poll() is None:  # SIGTERM first: it also stops the tritonserver child's process group
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_killed_serve_cli_leaves_no_server_behind(served_repository: Path, tmp_path: Path) -> None:
    """SIGKILL on `leukograph serve` (no chance to clean up): its tritonserver still goes away (PR_SET_PDEATHSIG)."""
    grpc_port = free_port()
    command = [*LEUKOGRAPH, "serve", "--model-repository", str(served_repository), "--http-port", str(free_port()),
               "--grpc-port", str(grpc_port), "--metrics-port", str(free_port()),
               "--log-file", str(tmp_path / "serve.log")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _read_until(process, "GPU deployment", timeout=120)
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", grpc_port)) != 0:
                break
        time.sleep(0.2)
    else:
        pytest.fail(f"tritonserver still listens on {grpc_port} 30 s after `leukograph serve` was killed")


def test_serve_cli_bad_repository_is_one_line_error(tmp_path: Path) -> None:
    done = subprocess.run([*LEUKOGRAPH, "serve", "--model-repository", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0], done.stderr


def test_onnx_staleness_follows_the_weights_and_the_code(tmp_path: Path, tiny_graph: Callable) -> None:
    """`leukograph serve` re-exports when model.onnx is missing, older than any checkpoint, or was exported by other
    code than the installed one (an upgrade that changed a stage's graph but not the weights)."""
    repository, weights = tmp_path / "repo", tmp_path / "weights"
    generate(repository, "onnxruntime")
    weights.mkdir()
    assert "missing" in onnx_stale(repository, weights)
    files = [repository / stage.name / "1" / "model.onnx" for stage in contract.SERVED_STAGES]
    for path in files:
        tiny_graph(path, graph_code_digest())
    assert onnx_stale(repository, weights) is None  # no checkpoints: keep what is there
    tiny_graph(files[0], None)
    assert "exported by other code (graph code not recorded" in onnx_stale(repository, weights)
    tiny_graph(files[0], "0123456789abcdef")
    assert "exported by other code (graph code 0123456789abcdef" in onnx_stale(repository, weights)
    files[0].write_bytes(b"onnx")
    assert "not a readable ONNX file" in onnx_stale(repository, weights)
    tiny_graph(files[0], graph_code_digest())
    checkpoint = weights / "cnn.pt"
    checkpoint.write_bytes(b"pt")
    later = time.time() + 60
    os.utime(checkpoint, (later, later))
    assert "older than the weights" in onnx_stale(repository, weights)
