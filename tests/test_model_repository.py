"""The generated Triton model repository: both backends parse as Triton model configs, no drift, model version."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leukograph.client import contract
from leukograph.deploy import model_repository as repo
from leukograph.deploy.paths import MODEL_REPOSITORY

try:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
except ImportError:  # structural checks below still run
    text_format = model_config_pb2 = None

LEUKOGRAPH = [sys.executable, "-m", "leukograph.client.cli"]


def parse(path: Path):
    if model_config_pb2 is None:
        pytest.skip("tritonclient.grpc.model_config_pb2 / protobuf not installed: cannot parse config.pbtxt")
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def check_tensors(parsed, specs: tuple[contract.TensorSpec, ...]) -> None:
    assert [t.name for t in parsed] == [s.name for s in specs]
    for tensor, spec in zip(parsed, specs):
        assert model_config_pb2.DataType.Name(tensor.data_type) == spec.triton_dtype
        assert tuple(tensor.dims) == spec.shape


def test_committed_repository_matches_generator() -> None:
    expected = repo.render("onnxruntime")
    for rel, text in expected.items():
        path = MODEL_REPOSITORY / rel
        assert path.exists(), f"{rel} missing: run `leukograph generate-repo`"
        assert path.read_text() == text, f"{rel} drifted from the generator: run `leukograph generate-repo`"
    committed = {str(p.relative_to(MODEL_REPOSITORY)) for p in MODEL_REPOSITORY.rglob("*")
                 if p.is_file() and p.suffix in {".pbtxt", ".py"}}
    assert committed <= set(expected), f"files the generator does not write: {committed - set(expected)}"


@pytest.mark.parametrize("backend", repo.BACKENDS)
def test_generated_configs_parse(tmp_path: Path, backend: str) -> None:
    repo.generate(tmp_path, backend)
    for stage in contract.SERVED_STAGES:
        config = parse(tmp_path / stage.name / "config.pbtxt")
        assert config.name == stage.name
        assert config.max_batch_size == 0
        check_tensors(config.input, stage.inputs)
        check_tensors(config.output, stage.outputs)
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert int(params["max_cells"]) == contract.MAX_CELLS
        assert int(params["max_frame_side"]) == contract.MAX_FRAME_SIDE
        (group,) = config.instance_group
        step_file = tmp_path / stage.name / "1" / "model.py"
        if backend == "onnxruntime":
            assert config.backend == "python" and not config.platform
            assert model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_CPU"
            assert group.count == repo.INSTANCES[stage.name]
            assert int(params["ort_intra_op_threads"]) >= 1
            assert step_file.read_text() == repo.step_shim("onnxruntime")
        else:
            assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
            assert model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_GPU"
            assert 1 <= group.count <= 2
            assert not step_file.exists()
    for pipeline, stages in ((contract.PIPELINE, contract.SERVED_STAGES), (contract.BOXES_PIPELINE, contract.STAGES)):
        ensemble = parse(tmp_path / pipeline.name / "config.pbtxt")
        assert ensemble.platform == "ensemble" and ensemble.max_batch_size == 0
        check_tensors(ensemble.input, pipeline.inputs)
        check_tensors(ensemble.output, pipeline.outputs)
        steps = ensemble.ensemble_scheduling.step
        assert [s.model_name for s in steps] == [s.name for s in stages]
        for step, stage in zip(steps, stages):
            assert sorted(step.input_map) == sorted(stage.input_names)
            assert sorted(step.output_map) == sorted(stage.output_names)
        assert (tmp_path / pipeline.name / "1").is_dir()  # Triton needs the ensemble's version folder
    # the bare-frame ensemble starts at the detector: its only input is the frame
    assert contract.PIPELINE.input_names == [contract.FRAME.name]


def test_switching_backends_keeps_model_files(tmp_path: Path) -> None:
    repo.generate(tmp_path, "onnxruntime")
    onnx = tmp_path / contract.CROP_EMBEDDER.name / "1" / "model.onnx"
    onnx.write_bytes(b"kept")
    repo.generate(tmp_path, "tensorrt")
    assert onnx.read_bytes() == b"kept"
    assert repo.backend_of(tmp_path) == "tensorrt"
    repo.generate(tmp_path, "onnxruntime", ort_threads=2)
    assert repo.backend_of(tmp_path) == "onnxruntime"
    assert 'string_value: "2"' in (tmp_path / contract.CROP_EMBEDDER.name / "config.pbtxt").read_text()


def test_generate_repo_cli(tmp_path: Path) -> None:
    done = subprocess.run([*LEUKOGRAPH, "generate-repo", "--backend", "tensorrt", "--model-repository",
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "tensorrt_plan" in (tmp_path / contract.CELL_GRAPH.name / "config.pbtxt").read_text()
    bad = subprocess.run([*LEUKOGRAPH, "generate-repo", "--ort-threads", "0", "--model-repository", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_repository_digest_names_the_onnx_files(served_repository: Path, tmp_path: Path) -> None:
    version = repo.repository_digest(served_repository)
    assert version.startswith(f"{contract.PIPELINE.name}-onnxruntime-")
    stored = json.loads((served_repository / contract.PIPELINE.name / "1" / repo.VERSION_FILE).read_text())
    assert stored[contract.REPOSITORY_DIGEST_KEY] == version
    assert set(stored["models"]) == {s.name for s in contract.SERVED_STAGES}
    # A different model file gives a different version.
    repo.generate(tmp_path, "onnxruntime")
    for stage in contract.SERVED_STAGES:
        path = tmp_path / stage.name / "1" / "model.onnx"
        path.write_bytes((served_repository / stage.name / "1" / "model.onnx").read_bytes())
    assert repo.repository_digest(tmp_path) == version
    path.write_bytes(path.read_bytes() + b"\0")
    assert repo.repository_digest(tmp_path) != version


def test_example_feed_is_a_valid_request_of_every_served_stage() -> None:
    """The inputs that trace and warm up the served stages pass the contract's own request checks."""
    rng = np.random.default_rng(0)
    for stage in contract.SERVED_STAGES:
        for rows, cells in ((6, 6), (contract.MAX_CELLS, 14)):
            feed = contract.example_feed(stage, rows, cells, 480, 640, rng)
            assert list(feed) == stage.input_names
            contract.validate_stage(stage, feed)
            if contract.BOXES.name in feed:
                assert len(feed[contract.BOXES.name]) == rows
