"""One runner protocol: ONNX Runtime, PyTorch and the served Triton pipeline give the same answers through
`run_pipeline`, compared by the one comparator at the fp32 tolerance, on real held-out frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leukograph.client import contract
from leukograph.deploy.bench.engines import ort_runners, torch_runners
from leukograph.deploy.bench.frames import load_frames, localise_boxes
from leukograph.deploy.paths import WEIGHTS_DIR
from leukograph.deploy.runners import TOLERANCES, Sample, TritonRunner, compare, run_pipeline
from leukograph.deploy.server import TritonServer


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    frames = load_frames(limit=2)
    out = []
    for frame_id, image in zip(frames.ids, frames.images):
        boxes = localise_boxes(image)
        out.append(Sample(frame_id, image, boxes, [None] * len(boxes), "localised"))
    return out


def test_stage_runners_chain_and_time_each_stage(served_repository: Path, samples: list[Sample]) -> None:
    runners = ort_runners(served_repository, 1)
    outputs = run_pipeline(runners, samples[0].frame, samples[0].boxes)
    n = len(samples[0].boxes)
    assert outputs[contract.EMBEDDINGS.name].shape == (n, contract.EMBED_DIM)
    assert outputs[contract.PROBS.name].shape == (n, contract.NUM_CLASSES)
    assert np.array_equal(outputs[contract.FRAME_SIZE.name], np.float32(samples[0].frame.shape[:2]))
    assert [list(r.stage_timings()) for r in runners] == [[s.name] for s in contract.STAGES]
    assert all(r.last_inference_time() > 0 for r in runners)
    with pytest.raises(KeyError, match=contract.EMBEDDINGS.name):
        runners[1].infer({contract.BOXES.name: samples[0].boxes})


def test_torch_matches_onnxruntime_at_fp32(served_repository: Path, samples: list[Sample]) -> None:
    comparison = compare(ort_runners(served_repository, 1), torch_runners(WEIGHTS_DIR, 1), samples)
    assert comparison.nodes == sum(len(s.boxes) for s in samples)
    assert comparison.failures_for(TOLERANCES["fp32"]) == [], comparison.line()


@pytest.mark.server
@pytest.mark.parametrize("transport", [("grpc", False), ("grpc", True), ("http", False)])
def test_triton_runner_matches_onnxruntime(triton_server: TritonServer, served_repository: Path,
                                           samples: list[Sample], transport: tuple[str, bool]) -> None:
    protocol, shm = transport
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    with TritonRunner(url, protocol, shm, localizer="client") as triton:  # the samples' own boxes
        comparison = compare(ort_runners(served_repository, 1), [triton], samples)
        assert set(triton.stage_timings()) == {"encode", "infer", "decode"}  # the client's timing hook
    assert comparison.agreeing_nodes == comparison.nodes > 0
    assert comparison.failures_for(TOLERANCES["fp32"]) == [], comparison.line()


@pytest.mark.server
@pytest.mark.parametrize("transport", [("grpc", False), ("grpc", True), ("http", False)])
def test_bare_frames_through_the_served_detector_match_onnxruntime(
        triton_server: TritonServer, served_repository: Path, samples: list[Sample],
        transport: tuple[str, bool]) -> None:
    """FRAME in, labelled cells out: the ensemble's detector -> crop_embedder -> cell_graph on the server gives what the
    three ONNX graphs give in-process, cell for cell."""
    protocol, shm = transport
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    local = ort_runners(served_repository, 1, detector=True)
    assert [r.stage for r in local] == list(contract.SERVED_STAGES)
    with TritonRunner(url, protocol, shm) as triton:
        for sample in samples:
            want = run_pipeline(local, sample.frame)
            got = run_pipeline([triton], sample.frame)
            n = int(want[contract.CELL_COUNT.name][0])
            assert n > 10 and int(got[contract.CELL_COUNT.name][0]) == n  # a BCCD frame: RBCs, WBC, platelets
            np.testing.assert_allclose(got[contract.BOXES.name], want[contract.BOXES.name][:n], atol=1e-3)
            np.testing.assert_array_equal(got[contract.KINDS.name], want[contract.KINDS.name][:n])
            assert got[contract.PROBS.name].shape == (n, contract.NUM_CLASSES)
            np.testing.assert_allclose(got[contract.PROBS.name], want[contract.PROBS.name], atol=1e-5)
            np.testing.assert_array_equal(got[contract.LABELS.name], want[contract.LABELS.name])
            assert (got[contract.KINDS.name] == contract.CELL_KINDS.index("wbc")).any()
