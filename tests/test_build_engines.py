"""`leukograph build-engines`: profiles, build reports, the CLI without TensorRT, and (where TensorRT, pycuda and a
CUDA GPU exist) a real FP16 build verified against ONNX Runtime fp32 on BCCD held-out frames."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from leukograph.build_engines import build, profiles
from leukograph.build_engines.profiles import DimRange, make_profiles
from leukograph.client.contract import (
    CELL_GRAPH,
    CROP_EMBEDDER,
    EMBED_DIM,
    MAX_CELLS,
    MAX_FRAME_SIDE,
    MIN_FRAME_SIDE,
    STAGES,
)
from leukograph.client.errors import UserError
from leukograph.project.paths import WEIGHTS_DIR


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:
        return f"tensorrt Python package not importable ({' '.join(str(exc).split())})"
    return None


def _pycuda_missing() -> str | None:
    try:
        import pycuda.driver  # noqa: F401
    except Exception as exc:
        return f"pycuda not importable ({' '.join(str(exc).split())})"
    return None


def _gpu_missing() -> str | None:
    return None if build.gpu_info()["name"] else "no CUDA GPU (nvidia-smi, pycuda and torch.cuda found none)"


# ---- profiles ---------------------------------------------------------------------------------------------------
def test_default_profile_is_bccd_camera_fixed_and_cells_1_to_max() -> None:
    p = make_profiles()
    assert (p.height, p.width) == (DimRange.fixed(480), DimRange.fixed(640)) and p.fixed_frame
    assert p.cells == DimRange(1, profiles.TYPICAL_CELLS, MAX_CELLS)
    crop = p.shapes(CROP_EMBEDDER)
    assert crop["FRAME"] == ((480, 640, 3),) * 3
    assert crop["BOXES"] == ((1, 4), (profiles.TYPICAL_CELLS, 4), (MAX_CELLS, 4))
    graph = p.shapes(CELL_GRAPH)
    assert graph["EMBEDDINGS"] == ((1, EMBED_DIM), (16, EMBED_DIM), (MAX_CELLS, EMBED_DIM))
    assert "FRAME_SIZE" not in graph  # static [2]: no profile entry


def test_frame_size_and_ranges() -> None:
    p = make_profiles("2:8:64", "1080x1920")
    assert p.shapes(CROP_EMBEDDER)["FRAME"] == ((1080, 1920, 3),) * 3
    assert p.shapes(CROP_EMBEDDER)["BOXES"] == ((2, 4), (8, 4), (64, 4))
    r = make_profiles(frame_size_range="240x320:2160x3840")
    assert r.shapes(CROP_EMBEDDER)["FRAME"] == ((240, 320, 3), (480, 640, 3), (2160, 3840, 3))
    full = make_profiles(frame_size="720x1280", frame_size_range="full")
    assert full.shapes(CROP_EMBEDDER)["FRAME"] == ((MIN_FRAME_SIDE, MIN_FRAME_SIDE, 3), (720, 1280, 3),
                                                   (MAX_FRAME_SIDE, MAX_FRAME_SIDE, 3))
    clamped = make_profiles(frame_size_range="1000x1000:2000x2000")  # default opt clamped into the range
    assert clamped.height.opt == 1000 and clamped.width.opt == 1000
    assert json.loads(json.dumps(full.to_json()))["per_input"]["crop_embedder"]["FRAME"]["max"] == [4096, 4096, 3]


@pytest.mark.parametrize("kwargs, message", [
    ({"cells": "1:16"}, "MIN:OPT:MAX"),
    ({"cells": "8:4:16"}, "min <= opt <= max"),
    ({"cells": f"1:16:{MAX_CELLS + 1}"}, "MAX_CELLS"),
    ({"frame_size": "640"}, "HEIGHTxWIDTH"),
    ({"frame_size": f"{MAX_FRAME_SIDE + 1}x640"}, "outside"),
    ({"frame_size": "100x100", "frame_size_range": "240x320:480x640"}, "outside --frame-size-range"),
    ({"frame_size_range": "240x320"}, "MIN_HxMIN_W:MAX_HxMAX_W"),
])
def test_bad_profile_values_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        make_profiles(**kwargs)


def test_cli_flags_reach_profiles() -> None:
    args = build.get_args_parser().parse_args(["--frame-size", "720x1280", "--cells", "1:32:128"])
    p = profiles.profiles_from_args(args)
    assert p.fixed_frame and p.height.opt == 720 and p.cells.max == 128
    assert "FIXED" in build.get_args_parser().format_help()  # the help says the default frame is fixed


# ---- report -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def exported_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from leukograph.training.export import export_all

    repository = tmp_path_factory.mktemp("build_engines_repo")
    export_all(WEIGHTS_DIR, repository)
    return repository


def test_build_report_is_written_with_every_field(exported_repository: Path, tmp_path: Path) -> None:
    onnx_path = exported_repository / CELL_GRAPH.name / "1" / "model.onnx"
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0" * 1234)  # stands in for an engine: the report only measures its size
    gpu = build.gpu_info()
    report = build.build_report(CELL_GRAPH, onnx_path, plan, make_profiles(), tensorrt_version="10.x (test)",
                                gpu=gpu, precision="fp16", workspace_bytes=1 << 30, build_seconds=1.23456,
                                timing_cache=tmp_path / "timing.cache")
    path = build.write_report(report, tmp_path / build.REPORT_FILE)
    loaded = json.loads(path.read_text())
    assert loaded["engine_bytes"] == 1234 and loaded["build_seconds"] == 1.235
    assert loaded["onnx_sha256"] == build.sha256(onnx_path) and len(loaded["onnx_sha256"]) == 64
    assert loaded["profiles"]["BOXES"] == {"min": [1, 4], "opt": [16, 4], "max": [MAX_CELLS, 4]}
    assert set(loaded["profiles"]) == {"EMBEDDINGS", "BOXES"}
    assert set(loaded["gpu"]) == {"name", "compute_capability", "driver", "source"}
    assert loaded["tensorrt_version"] == "10.x (test)" and loaded["precision"] == "fp16"
    assert "10." in loaded["operator_table"]


# ---- CLI without TensorRT ---------------------------------------------------------------------------------------
def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leukograph.client.cli", "build-engines", *argv],
                          capture_output=True, text=True, timeout=120)


def test_cli_without_tensorrt_prints_one_line_and_fails() -> None:
    if _tensorrt_missing() is None:
        pytest.skip("tensorrt is importable here: the missing-TensorRT path cannot be exercised")
    done = _cli()
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "TensorRT Python package not importable" in lines[0] and "Triton container" in lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_cli_bad_profile_is_one_line() -> None:
    done = _cli("--cells", "0:1:2")
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_engine_runner_names_what_is_missing() -> None:
    missing = _tensorrt_missing() or _pycuda_missing()
    if missing is None:
        pytest.skip("tensorrt and pycuda are importable here")
    from leukograph.build_engines.runner import EngineRunner, EngineRunnerError

    with pytest.raises(EngineRunnerError, match="tensorrt Python package not importable|pycuda not importable"):
        EngineRunner("model.plan")


# ---- real build (TensorRT machines only) ------------------------------------------------------------------------
@pytest.fixture
def tensorrt_gpu() -> None:
    for missing in (_tensorrt_missing(), _pycuda_missing(), _gpu_missing()):
        if missing:
            pytest.skip(missing)


@pytest.mark.slow
def test_build_verify_and_run_engines(tensorrt_gpu: None, exported_repository: Path, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(exported_repository, repository)
    args = build.get_args_parser().parse_args(["--model-repository", str(repository), "--timing-cache",
                                               str(tmp_path / "timing.cache")])
    assert build.main(args) == 0
    for stage in STAGES:
        report = json.loads((repository / stage.name / "1" / build.REPORT_FILE).read_text())
        assert report["verification"]["passed"], report["verification"]["failures"]
        assert report["engine_bytes"] > 0 and report["gpu"]["name"]
    assert (tmp_path / "timing.cache").stat().st_size > 0

    from leukograph.build_engines.runner import EngineRunner
    from leukograph.build_engines.verify import held_out_samples

    runner = EngineRunner(repository / CROP_EMBEDDER.name / "1" / build.PLAN_FILE)
    sample = held_out_samples("voc")[0]
    out = runner({"FRAME": sample.frame, "BOXES": sample.boxes})
    assert out["EMBEDDINGS"].shape == (len(sample.boxes), EMBED_DIM)
    assert list(out["FRAME_SIZE"]) == [480.0, 640.0]


def test_cli_check_only_runs_without_tensorrt(exported_repository: Path) -> None:
    done = _cli("--check-only", "--model-repository", str(exported_repository))
    assert "cell_graph: OK" in done.stdout, done.stdout + done.stderr
    assert "crop_embedder:" in done.stdout


def test_parser_is_usable_standalone() -> None:
    assert isinstance(build.get_args_parser(add_help=False), argparse.ArgumentParser)
