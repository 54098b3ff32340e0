"""Errors are typed, never recognised by their text: not sent, rejected by the server, server unavailable, and the one
missing-TensorRT error."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from leukograph.build_engines import build
from leukograph.build_engines.runner import EngineRunner, EngineRunnerError, TensorRtUnavailable
from leukograph.client.errors import UserError
from leukograph.client.triton_client import (
    RequestNotSent,
    RequestRejected,
    ServerUnavailable,
    TritonPipelineClient,
    classify_error,
)
from leukograph.deploy.server import TritonServer


@pytest.mark.parametrize(("status", "kind"), [
    (str(grpc.StatusCode.INVALID_ARGUMENT), RequestRejected), ("400", RequestRejected),
    (str(grpc.StatusCode.NOT_FOUND), ServerUnavailable), ("404", ServerUnavailable),
    (str(grpc.StatusCode.UNAVAILABLE), ServerUnavailable), (str(grpc.StatusCode.DEADLINE_EXCEEDED), ServerUnavailable),
    (None, ServerUnavailable)])
def test_classified_by_status_not_by_words(status: str | None, kind: type) -> None:
    # The words that used to decide ("shared memory", "not found") no longer matter; only the status does.
    error = classify_error(InferenceServerException("Unable to find shared memory region: not found", status=status))
    assert type(error) is kind
    assert type(classify_error(ConnectionRefusedError("refused"))) is ServerUnavailable


@pytest.mark.server
def test_not_sent_rejected_and_unavailable_from_a_real_server(triton_server: TritonServer) -> None:
    frame = np.zeros((64, 64, 3), np.uint8)
    boxes = np.array([[4, 4, 30, 30]], np.float32)
    with TritonPipelineClient(triton_server.grpc_url) as client:
        assert client.wait_ready(30)
        with pytest.raises(RequestNotSent):
            client.infer(frame, boxes[:0])
        with pytest.raises(RequestRejected) as rejected:  # sent anyway, refused by the server's contract check
            client.infer(frame, boxes[:0], validate=False)
        assert not isinstance(rejected.value, RequestNotSent)
    # a shared-memory region the server does not know (as after a restart): NOT_FOUND, worth retrying
    inputs = [grpcclient.InferInput("FRAME", list(frame.shape), "UINT8"),
              grpcclient.InferInput("BOXES", list(boxes.shape), "FP32"),
              grpcclient.InferInput("CELL_COUNT", [1], "INT32")]
    inputs[0].set_shared_memory("leukograph_unregistered_region", frame.nbytes)
    inputs[1].set_shared_memory("leukograph_unregistered_region", boxes.nbytes, offset=frame.nbytes)
    inputs[2].set_data_from_numpy(np.array([1], np.int32))
    raw = grpcclient.InferenceServerClient(triton_server.grpc_url)
    with pytest.raises(InferenceServerException) as unknown_region:
        raw.infer("leukocyte_pipeline_boxes", inputs)
    raw.close()
    assert isinstance(classify_error(unknown_region.value), ServerUnavailable)
    with TritonPipelineClient("127.0.0.1:1", request_timeout_s=2.0) as nowhere, pytest.raises(ServerUnavailable):
        nowhere.infer(frame, boxes)


def test_missing_tensorrt_is_one_type() -> None:
    """The engine runner and the builder raise the same type, a UserError (one line at the CLI)."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - the condition under test
        pass
    else:
        pytest.skip("TensorRT is installed here: nothing is missing")
    for attempt in (lambda: EngineRunner("model.plan"), build.import_tensorrt):
        with pytest.raises(TensorRtUnavailable) as missing:
            attempt()
        assert isinstance(missing.value, UserError) and isinstance(missing.value, EngineRunnerError)
