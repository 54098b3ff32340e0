"""The detector as the ensemble's first step: padded fixed-K rows never change a cell's result, CELL_COUNT = 0 is a
frame without cells, and a built detector is checked against ONNX Runtime's (here: its FP16 graph in ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from leukograph.build_engines import fp16, verify
from leukograph.client import contract
from leukograph.client.localize import localize
from leukograph.client.triton_client import RequestNotSent, TritonPipelineClient
from leukograph.deploy.bench.engines import ort_runners
from leukograph.deploy.bench.frames import load_frames
from leukograph.deploy.runners import OrtRunner, Sample, run_pipeline
from leukograph.deploy.server import TritonServer


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return load_frames(limit=1).images[0]


def padded(boxes: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    """`boxes` followed by padding rows: random boxes anywhere, degenerate ones, and NaN (never read)."""
    rng = np.random.default_rng(seed)
    extra = rng.uniform(-50, 700, (rows - len(boxes), 4)).astype(np.float32)
    extra[::3] = np.nan
    extra[1::3, 2:] = extra[1::3, :2]  # x2 == x1: degenerate
    return np.concatenate([boxes, extra]).astype(np.float32)


def test_padding_rows_change_no_cell_in_either_stage(served_repository: Path, frame: np.ndarray) -> None:
    boxes = localize(frame).boxes
    runners = ort_runners(served_repository, 1)
    alone = run_pipeline(runners, frame, boxes)
    count = contract.cell_count(boxes)
    with_padding = {contract.FRAME.name: frame, contract.BOXES.name: padded(boxes, contract.MAX_CELLS),
                    contract.CELL_COUNT.name: count}
    contract.validate_request(frame, with_padding[contract.BOXES.name], count)  # padding is not validated
    for runner in runners:
        with_padding.update(runner.infer(with_padding))
    for name in (contract.EMBEDDINGS.name, contract.PROBS.name, contract.LABELS.name):
        np.testing.assert_array_equal(with_padding[name], alone[name])
    assert len(with_padding[contract.PROBS.name]) == len(boxes)


def test_cell_count_is_checked_against_the_rows(frame: np.ndarray) -> None:
    boxes = localize(frame).boxes
    for bad, why in ((np.array([len(boxes) + 1], np.int32), "outside"), (np.array([-1], np.int32), "outside"),
                     (np.array([2], np.int64), "int32"), (np.array([1, 2], np.int32), "shape")):
        with pytest.raises(contract.ContractError, match=why):
            contract.validate_request(frame, boxes, bad)
    nan_cell = boxes.copy()
    nan_cell[0, 0] = np.nan
    with pytest.raises(contract.ContractError, match="NaN"):
        contract.validate_request(frame, nan_cell, contract.cell_count(boxes))


def test_fp16_detector_agrees_with_fp32_by_the_build_check(served_repository: Path, tmp_path: Path) -> None:
    """The check `build-engines` runs on a built detector, here on the FP16 graph in ONNX Runtime."""
    fp32 = contract.stage_path(served_repository, contract.CELL_DETECTOR, contract.MODEL_FILES["onnxruntime"])
    half = fp16.convert_file(fp32, tmp_path, fp32_after=contract.DETECTOR_FP32_AFTER)
    frames = load_frames(limit=4)
    samples = [Sample(frame_id, image, np.zeros((0, 4), np.float32), [], "none")
               for frame_id, image in zip(frames.ids, frames.images)]
    result = verify.detector_agreement(served_repository, OrtRunner(half, contract.CELL_DETECTOR), samples)
    assert result["failures"] == [] and result["cells"] > 4 * 10 and result["matched_share"] >= 0.98, result


@pytest.mark.server
def test_padded_request_through_triton_equals_the_unpadded_one(triton_server: TritonServer,
                                                               frame: np.ndarray) -> None:
    boxes = localize(frame).boxes
    with TritonPipelineClient(triton_server.grpc_url, localizer="client") as client:
        probs, labels = client.infer(frame, boxes)
    raw = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        rows = padded(boxes, contract.MAX_CELLS, seed=1)
        inputs = []
        for spec, array in ((contract.FRAME, frame), (contract.BOXES, rows),
                            (contract.CELL_COUNT, contract.cell_count(boxes))):
            tensor = grpcclient.InferInput(spec.name, list(array.shape), spec.client_dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = raw.infer(contract.BOXES_PIPELINE.name, inputs, client_timeout=30)
    finally:
        raw.close()
    np.testing.assert_array_equal(result.as_numpy(contract.PROBS.name), probs)
    np.testing.assert_array_equal(result.as_numpy(contract.LABELS.name), labels)


@pytest.mark.server
def test_bare_frame_without_cells_answers_empty_and_bad_frames_get_one_line(triton_server: TritonServer) -> None:
    blank = np.full((240, 320, 3), 235, np.uint8)  # an empty field: background only
    with TritonPipelineClient(triton_server.grpc_url) as client:
        outcome = client.infer_outcome(blank)
        assert outcome.ok and outcome.boxes.shape == (0, 4) and outcome.probs.shape == (0, contract.NUM_CLASSES)
        with pytest.raises(RequestNotSent, match="FRAME"):
            client.infer_outcome(blank[:, :, :2])
        tiny = np.zeros((8, 8, 3), np.uint8)
        with pytest.raises(RequestNotSent, match="side"):
            client.infer_outcome(tiny)
        assert client.infer_outcome(blank).ok  # the server stays up
