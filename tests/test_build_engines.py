"""`leukograph build-engines`: profiles and the configs' limits, the TensorRT version gate, plan/server checks, timing
cache handling, build reports, error wording, the CLI without TensorRT, and (where TensorRT, pycuda and a CUDA GPU
exist) a real FP16 build verified against ONNX Runtime fp32 on BCCD held-out frames."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from leukograph.build_engines import build, compat, plan_check, profiles, timing_cache
from leukograph.build_engines.profiles import DimRange, contract_limits, make_profiles
from leukograph.build_engines.runner import (
    REPORT_FILE,
    PlanLoadError,
    TensorRtUnavailable,
    plan_load_problem,
)
from leukograph.client.contract import (
    CELL_GRAPH,
    CROP_EMBEDDER,
    EMBED_DIM,
    MAX_CELLS,
    MAX_FRAME_SIDE,
    MIN_FRAME_SIDE,
    SERVED_STAGES,
    STAGES,
)
from leukograph.client.errors import UserError
from leukograph.deploy.paths import WEIGHTS_DIR


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


# ---- profiles and the limits the configs advertise ---------------------------------------------------------------
def test_default_profile_is_the_contract_with_bccd_camera_as_opt() -> None:
    p = make_profiles()
    assert p.height == DimRange(MIN_FRAME_SIDE, 480, MAX_FRAME_SIDE)
    assert p.width == DimRange(MIN_FRAME_SIDE, 640, MAX_FRAME_SIDE)
    assert p.cells == DimRange(1, profiles.TYPICAL_CELLS, MAX_CELLS)
    assert p.covers_contract and not p.fixed_frame
    crop = p.shapes(CROP_EMBEDDER)
    assert crop["FRAME"] == ((MIN_FRAME_SIDE, MIN_FRAME_SIDE, 3), (480, 640, 3), (MAX_FRAME_SIDE, MAX_FRAME_SIDE, 3))
    assert crop["BOXES"] == ((1, 4), (profiles.TYPICAL_CELLS, 4), (MAX_CELLS, 4))
    graph = p.shapes(CELL_GRAPH)
    assert graph["EMBEDDINGS"] == ((1, EMBED_DIM), (16, EMBED_DIM), (MAX_CELLS, EMBED_DIM))
    assert "FRAME_SIZE" not in graph  # static [2]: no profile entry


def _tensorrt_configs(tmp_path: Path) -> dict[str, Path]:
    from leukograph.deploy.model_repository import generate

    generate(tmp_path, backend="tensorrt")
    return {path.parent.name: path for path in tmp_path.glob("*/config.pbtxt")}


def test_default_profile_admits_exactly_what_every_tensorrt_config_advertises(tmp_path: Path) -> None:
    configs = _tensorrt_configs(tmp_path)
    assert set(configs) >= {s.name for s in STAGES}
    for name, path in configs.items():
        advertised = plan_check.config_limits(path)  # parsed with protobuf text_format into ModelConfig
        assert advertised == contract_limits(), name
        assert make_profiles().config_disagreements(advertised) == [], name


def test_a_narrowed_profile_is_reported_against_the_configs(tmp_path: Path) -> None:
    fixed = make_profiles(frame_size_range="480x640:480x640")
    assert fixed.fixed_frame and not fixed.covers_contract
    advertised = plan_check.config_limits(_tensorrt_configs(tmp_path)[CROP_EMBEDDER.name])
    found = fixed.config_disagreements(advertised)
    assert "max_width: engine profile 640, config 4096" in found and len(found) == 4
    assert make_profiles(cells="2:16:64").config_disagreements(advertised) == [
        "min_cells: engine profile 2, config 1", "max_cells: engine profile 64, config 256"]


def test_frame_size_is_the_opt_shape_and_ranges_narrow() -> None:
    p = make_profiles("2:8:64", "1080x1920")
    assert p.shapes(CROP_EMBEDDER)["FRAME"] == ((MIN_FRAME_SIDE, MIN_FRAME_SIDE, 3), (1080, 1920, 3),
                                                (MAX_FRAME_SIDE, MAX_FRAME_SIDE, 3))
    assert p.shapes(CROP_EMBEDDER)["BOXES"] == ((2, 4), (8, 4), (64, 4))
    r = make_profiles(frame_size_range="240x320:2160x3840")
    assert r.shapes(CROP_EMBEDDER)["FRAME"] == ((240, 320, 3), (480, 640, 3), (2160, 3840, 3))
    clamped = make_profiles(frame_size_range="1000x1000:2000x2000")  # default opt clamped into the range
    assert clamped.height.opt == 1000 and clamped.width.opt == 1000
    full = make_profiles(frame_size="720x1280", frame_size_range="full")
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
    assert p.height == DimRange(MIN_FRAME_SIDE, 720, MAX_FRAME_SIDE) and p.cells.max == 128
    assert "--check-plans" in build.get_args_parser().format_help()


# ---- TensorRT version gate and plan/server match ------------------------------------------------------------------
@pytest.mark.parametrize("version", ["10.0.1", "10.3.0.26", "10.15.1.29"])
def test_version_gate_accepts_tensorrt_10(version: str) -> None:
    compat.check_supported(version)


@pytest.mark.parametrize("version, message", [
    ("8.6.1", "needs TensorRT 10.x"),
    ("9.3.0", "needs TensorRT 10.x"),
    ("11.0.0", "supports TensorRT 10.x only"),
    ("11.2.0.5", "removes BuilderFlag.FP16"),
])
def test_version_gate_refuses_other_majors_with_one_line(version: str, message: str) -> None:
    with pytest.raises(compat.UnsupportedTensorRT, match=message) as info:
        compat.check_supported(version)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


@pytest.mark.parametrize("version, message", [("11.0.0.4", "supports TensorRT 10.x only"),
                                              ("8.6.1", "needs TensorRT 10.x")])
def test_cli_refuses_an_unsupported_tensorrt_in_one_line(tmp_path: Path, version: str, message: str) -> None:
    """The gate wired into the CLI: a test double of the `tensorrt` package that has only `__version__` (all the
    gate reads before refusing) comes first on PYTHONPATH."""
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = _cli("--no-verify", env=env)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and f"TensorRT {version} found" in lines[0], done.stderr


def test_version_parsing_and_plan_matching() -> None:
    assert compat.parse_version("10.3.0.26") == (10, 3, 0, 26)
    assert compat.parse_version("10.8.0.post1") == (10, 8, 0)
    assert compat.parse_version("10.8.0rc1") == (10, 8, 0)
    with pytest.raises(ValueError):
        compat.parse_version("ten")
    assert compat.plans_match("10.3.0.26", "10.3.0")  # a build number on one side only
    assert compat.plans_match("10.3.0.26", "10.3.0.26")
    assert not compat.plans_match("10.3.0.26", "10.3.0.30")
    assert not compat.plans_match("10.3.0", "10.4.0")
    assert not compat.plans_match("10.3", "10.3")  # a release needs major.minor.patch
    assert compat.same_compute_capability("8.6", "8.6") is True
    assert compat.same_compute_capability("8.6", "9.0") is False
    assert compat.same_compute_capability(None, "9.0") is None


def test_library_version_decoding() -> None:
    assert compat.decode_lib_version(100300) == "10.3.0"  # TensorRT 10: major * 10000 + minor * 100 + patch
    assert compat.decode_lib_version(101501) == "10.15.1"
    assert compat.decode_lib_version(8601) == "8.6.1"  # before 10: major * 1000 + minor * 100 + patch


def test_serving_version_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    assert compat.serving_tensorrt_version("10.3.0") == ("10.3.0", "--serving-tensorrt-version")
    monkeypatch.setenv(compat.VERSION_ENV, "10.8.0.43")
    assert compat.serving_tensorrt_version() == ("10.8.0.43", "$TRT_VERSION")
    monkeypatch.delenv(compat.VERSION_ENV)
    if compat.libnvinfer_version() is None:
        version, reason = compat.serving_tensorrt_version()
        assert version is None and "no libnvinfer" in reason


# ---- timing cache -------------------------------------------------------------------------------------------------
class TimingCacheDouble:
    """Test double of TensorRT 10's ITimingCache, from the Python API reference: `serialize()` returns the bytes
    `IBuilderConfig.create_timing_cache` reads back. Its bytes carry the environment key (device and TensorRT
    version) that TensorRT's cache header records."""

    MAGIC = b"timing-cache-double:"

    def __init__(self, key: str, entries: int = 0) -> None:
        self.key, self.entries = key, entries

    def serialize(self) -> bytes:
        return self.MAGIC + json.dumps({"key": self.key, "entries": self.entries}).encode()


class BuilderConfigDouble:
    """Test double of TensorRT 10's IBuilderConfig timing-cache methods, as documented in the Python API reference:

    * `create_timing_cache(blob)`: an empty blob gives a new cache; a serialized cache gives that cache (ours returns
      None for bytes it cannot read);
    * `set_timing_cache(cache, ignore_mismatch)` -> bool: False when the cache was made in another environment and
      ignore_mismatch is False (then no cache is attached); `refuse_all` models a TensorRT that refuses every cache;
    * `get_timing_cache()`: the attached cache, or None when none is set;
    * `build()` stands for `build_serialized_network`, which adds the layers it timed to the attached cache."""

    def __init__(self, key: str, refuse_all: bool = False) -> None:
        self.key, self.refuse_all = key, refuse_all
        self.attached: TimingCacheDouble | None = None

    def create_timing_cache(self, blob: bytes) -> TimingCacheDouble | None:
        if not blob:
            return TimingCacheDouble(self.key)
        if not blob.startswith(TimingCacheDouble.MAGIC):
            return None
        data = json.loads(blob[len(TimingCacheDouble.MAGIC):])
        return TimingCacheDouble(data["key"], data["entries"])

    def set_timing_cache(self, cache: TimingCacheDouble, ignore_mismatch: bool) -> bool:
        if self.refuse_all or (cache.key != self.key and not ignore_mismatch):
            return False
        self.attached = cache
        return True

    def get_timing_cache(self) -> TimingCacheDouble | None:
        return self.attached

    def build(self) -> None:
        if self.attached is not None:
            self.attached.entries += 3


def _build_with_cache(config: BuilderConfigDouble, path: Path | None) -> timing_cache.TimingCacheUse:
    use = timing_cache.attach(config, path)
    config.build()
    return timing_cache.save(use)


def test_timing_cache_file_is_keyed_by_tensorrt_version_and_compute_capability(tmp_path: Path) -> None:
    a = timing_cache.cache_file(tmp_path, "10.3.0.26", "8.6")
    assert a == tmp_path / "timing-trt10.3.0.26-sm8.6.cache"
    assert timing_cache.cache_file(tmp_path, "10.3.0.26", "9.0") != a
    assert timing_cache.cache_file(tmp_path, "10.8.0.43", "8.6") != a
    assert timing_cache.cache_file(tmp_path, "10.3.0", None) is None  # unknown GPU: no cache rather than a shared one
    assert timing_cache.cache_file(tmp_path, "10.3/../x", "8.6").parent == tmp_path


def test_timing_cache_new_then_loaded_and_grown(tmp_path: Path) -> None:
    path = timing_cache.cache_file(tmp_path, "10.3.0", "8.6")
    first = _build_with_cache(BuilderConfigDouble("sm86-trt10.3.0"), path)
    assert (first.status, first.saved, first.note) == ("new", True, "")
    second = _build_with_cache(BuilderConfigDouble("sm86-trt10.3.0"), path)
    assert (second.status, second.saved) == ("loaded", True)
    assert json.loads(path.read_bytes()[len(TimingCacheDouble.MAGIC):])["entries"] == 6
    assert second.to_json() == {"path": str(path), "status": "loaded", "saved": True, "note": None}


def test_timing_cache_refused_is_replaced_and_the_created_cache_is_saved(tmp_path: Path) -> None:
    path = tmp_path / "timing.cache"
    path.write_bytes(TimingCacheDouble("another-gpu", 40).serialize())
    config = BuilderConfigDouble("sm90-trt10.3.0")
    use = timing_cache.attach(config, path)
    assert use.status == "replaced" and "refused" in use.note and "another device" in use.note
    config.build()
    saved = timing_cache.save(use)
    assert saved.saved
    assert json.loads(path.read_bytes()[len(TimingCacheDouble.MAGIC):]) == {"key": "sm90-trt10.3.0", "entries": 3}


def test_timing_cache_unreadable_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "timing.cache"
    path.write_bytes(b"\x00garbage")
    use = _build_with_cache(BuilderConfigDouble("k"), path)
    assert use.status == "replaced" and "not readable" in use.note and use.saved


def test_timing_cache_refused_entirely_builds_without_one_and_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "timing.cache"
    path.write_bytes(TimingCacheDouble("other").serialize())
    config = BuilderConfigDouble("k", refuse_all=True)
    use = _build_with_cache(config, path)
    assert use.status == "unusable" and use.cache is None and not use.saved
    assert config.get_timing_cache() is None  # what the old code serialized: None.serialize() raised after the plan
    assert path.read_bytes() == TimingCacheDouble("other").serialize()  # left as it was


def test_timing_cache_save_failure_is_a_note(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache folder should be")
    use = _build_with_cache(BuilderConfigDouble("k"), blocked / "timing.cache")
    assert use.status == "new" and not use.saved and "timing cache not saved" in use.note
    disabled = timing_cache.attach(BuilderConfigDouble("k"), None, "--no-timing-cache")
    assert disabled.to_json()["status"] == "disabled" and timing_cache.save(disabled).saved is False


# ---- report -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def exported_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from leukograph.training.export import export_all

    repository = tmp_path_factory.mktemp("build_engines_repo")
    export_all(WEIGHTS_DIR, repository)
    return repository


def _report(onnx_path: Path, plan: Path, tensorrt_version: str = "10.3.0.26", compute_capability: str = "8.6",
            profile: profiles.Profiles | None = None, stage=CELL_GRAPH) -> dict:
    use = timing_cache.TimingCacheUse(plan.parent / "timing.cache", "new", saved=True)
    gpu = {"name": "test GPU", "compute_capability": compute_capability, "driver": None, "source": "test"}
    return build.build_report(stage, onnx_path, plan, profile or make_profiles(), tensorrt_version=tensorrt_version,
                              gpu=gpu, precision="fp16", workspace_bytes=1 << 30,
                              build=build.EngineBuild(1.23456, use, False, onnx_path))


def test_build_report_is_written_with_every_field(exported_repository: Path, tmp_path: Path) -> None:
    onnx_path = exported_repository / CELL_GRAPH.name / "1" / "model.onnx"
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0" * 1234)  # stands in for an engine: the report measures its size and hash
    path = build.write_report(_report(onnx_path, plan), tmp_path / REPORT_FILE)
    loaded = json.loads(path.read_text())
    assert loaded["engine_bytes"] == 1234 and loaded["build_seconds"] == 1.235
    assert loaded["onnx_sha256"] == build.sha256(onnx_path) and len(loaded["onnx_sha256"]) == 64
    assert loaded["plan_sha256"] == build.sha256(plan)
    assert loaded["profiles"]["BOXES"] == {"min": [1, 4], "opt": [16, 4], "max": [MAX_CELLS, 4]}
    assert set(loaded["profiles"]) == {"EMBEDDINGS", "BOXES"}
    assert loaded["tensorrt_version"] == "10.3.0.26" and loaded["compute_capability"] == "8.6"
    assert loaded["strongly_typed"] is True and loaded["tf32"] is False and loaded["precision"] == "fp16"
    assert loaded["served_limits"]["max_width"] == MAX_FRAME_SIDE and loaded["covers_contract"] is True
    assert loaded["timing_cache"]["status"] == "new"
    assert "10." in loaded["operator_table"]


# ---- plan check before Triton loads the plans ---------------------------------------------------------------------
@pytest.fixture
def built_repository(exported_repository: Path, tmp_path: Path) -> Path:
    """A tensorrt repository with generated configs and, per stage, a plan file and the report a build writes."""
    from leukograph.deploy.model_repository import generate

    repository = tmp_path / "repo"
    generate(repository, backend="tensorrt")
    for stage in STAGES:
        folder = repository / stage.name / "1"
        folder.mkdir(parents=True, exist_ok=True)
        plan = folder / build.PLAN_FILE
        plan.write_bytes(stage.name.encode() * 100)  # stands in for an engine: the check reads only its hash
        onnx_path = exported_repository / stage.name / "1" / "model.onnx"
        build.write_report(_report(onnx_path, plan, stage=stage), folder / REPORT_FILE)
    return repository


def test_plan_check_passes_for_the_same_tensorrt_and_gpu(built_repository: Path) -> None:
    problems, summaries = plan_check.check_repository(built_repository, "10.3.0.26", "8.6")
    assert problems == [] and len(summaries) == len(STAGES)
    assert "profile = config limits" in summaries[0]


def test_plan_check_names_a_version_or_gpu_mismatch(built_repository: Path) -> None:
    problems, _ = plan_check.check_repository(built_repository, "10.8.0.43", "9.0")
    text = "; ".join(problems)
    assert "plan built with TensorRT 10.3.0.26, the server runs TensorRT 10.8.0.43" in text
    assert "compute capability 8.6, the serving GPU is 9.0" in text
    assert len(problems) == 2 * len(STAGES)


def test_plan_check_finds_a_narrowed_profile_a_foreign_report_and_a_missing_plan(built_repository: Path,
                                                                                  exported_repository: Path) -> None:
    folder = built_repository / CROP_EMBEDDER.name / "1"
    onnx_path = exported_repository / CROP_EMBEDDER.name / "1" / "model.onnx"
    narrowed = _report(onnx_path, folder / build.PLAN_FILE, profile=make_profiles(frame_size_range="480x640:480x640"),
                       stage=CROP_EMBEDDER)
    build.write_report(narrowed, folder / REPORT_FILE)
    (built_repository / CELL_GRAPH.name / "1" / build.PLAN_FILE).write_bytes(b"rebuilt without a report")
    problems, _ = plan_check.check_repository(built_repository, "10.3.0.26", "8.6")
    text = "; ".join(problems)
    assert "crop_embedder: max_width: engine profile 640, config 4096" in text
    assert "cell_graph: build_report.json describes another plan" in text
    (folder / build.PLAN_FILE).unlink()
    assert plan_check.check_repository(built_repository, "10.3.0.26")[0][0].startswith("crop_embedder: no ")


def _cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leukograph.client.cli", "build-engines", *argv],
                          capture_output=True, text=True, timeout=120, env=env)


def test_check_plans_cli_exit_codes_and_one_line(built_repository: Path) -> None:
    ok = _cli("--check-plans", "--model-repository", str(built_repository), "--serving-tensorrt-version",
              "10.3.0.26", "--serving-compute-capability", "8.6")
    assert ok.returncode == 0, ok.stderr
    assert "crop_embedder: OK" in ok.stdout and "server TensorRT 10.3.0.26 from --serving-tensorrt-version" in ok.stdout
    bad = _cli("--check-plans", "--model-repository", str(built_repository), "--serving-tensorrt-version", "10.8.0")
    assert bad.returncode == plan_check.CHECK_EXIT_CODE
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert "the server runs TensorRT 10.8.0" in bad.stderr


# ---- error wording ------------------------------------------------------------------------------------------------
def test_verification_errors_say_what_went_wrong() -> None:
    missing = build.verification_error(TensorRtUnavailable("pycuda not importable", "No module named 'pycuda'"))
    assert str(missing) == ("plans built but not verified: pycuda not importable (No module named 'pycuda'); "
                            "install pycuda, or rerun with --no-verify")
    no_gpu = build.verification_error(TensorRtUnavailable("no CUDA GPU", "pycuda.driver.Device.count() is 0"))
    assert "run on a machine with a CUDA GPU" in str(no_gpu)
    old_plan = build.verification_error(PlanLoadError("model.plan was built with TensorRT 10.3.0, this runtime is "
                                                      "TensorRT 10.8.0"))
    assert str(old_plan).startswith("plans built but cannot be loaded for verification: model.plan was built")
    assert "install" not in str(old_plan) and "--no-verify" not in str(old_plan)
    assert {e.exit_code for e in (missing, no_gpu, old_plan)} == {build.VERIFY_EXIT_CODE}


def test_plan_load_problems_name_versions_or_damage(exported_repository: Path, tmp_path: Path) -> None:
    plan = tmp_path / build.PLAN_FILE
    plan.write_bytes(b"plan bytes")
    assert plan_load_problem(plan, "10.3.0", "8.6") is None  # no report: nothing known against it yet
    assert "no build_report.json beside it" in plan_load_problem(plan, "10.3.0", "8.6", deserialized=False)
    onnx_path = exported_repository / CELL_GRAPH.name / "1" / "model.onnx"
    build.write_report(_report(onnx_path, plan, "10.3.0.26", "8.6"), tmp_path / REPORT_FILE)
    assert plan_load_problem(plan, "10.3.0.26", "8.6") is None
    version = plan_load_problem(plan, "10.8.0.43", "8.6")
    assert "built with TensorRT 10.3.0.26, this runtime is TensorRT 10.8.0.43" in version and "rebuild" in version
    assert "compute capability 8.6, this GPU is 9.0" in plan_load_problem(plan, "10.3.0.26", "9.0")
    assert "may be damaged" in plan_load_problem(plan, "10.3.0.26", "8.6", deserialized=False)


# ---- CLI without TensorRT ---------------------------------------------------------------------------------------
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

    with pytest.raises(TensorRtUnavailable) as info:
        EngineRunner("model.plan")
    assert isinstance(info.value, EngineRunnerError)
    assert info.value.missing in ("tensorrt Python package not importable", "pycuda not importable")


def test_qdq_arguments_and_graph_check(exported_repository: Path) -> None:
    assert build.parse_qdq_arguments(["crop_embedder=q.onnx"]) == {"crop_embedder": Path("q.onnx")}
    with pytest.raises(UserError, match="STAGE=PATH"):
        build.parse_qdq_arguments(["q.onnx"])
    fp32 = exported_repository / CROP_EMBEDDER.name / "1" / "model.onnx"
    with pytest.raises(UserError, match="no QuantizeLinear/DequantizeLinear"):
        build.check_qdq_graph(fp32, fp32)


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
    args = build.get_args_parser().parse_args(["--model-repository", str(repository), "--work-dir",
                                               str(tmp_path / "work")])
    assert build.main(args) == 0
    for stage in SERVED_STAGES:
        report = json.loads((repository / stage.name / "1" / REPORT_FILE).read_text())
        assert report["verification"]["passed"], report["verification"]["failures"]
        assert report["verification"]["detector"]["matched_share"] >= 0.98
        assert report["verification"]["largest_frame"]["frame"] == [MAX_FRAME_SIDE, MAX_FRAME_SIDE]
        assert report["engine_bytes"] > 0 and report["gpu"]["name"] and report["timing_cache"]["saved"]
    assert list((tmp_path / "work" / "timing-cache").glob("timing-trt*-sm*.cache"))
    import tensorrt

    problems, _ = plan_check.check_repository(repository, str(tensorrt.__version__), build.gpu_info()[
        "compute_capability"])
    assert [p for p in problems if "config" not in p] == []  # configs are generated later (generate-repo)

    from leukograph.build_engines.runner import EngineRunner
    from leukograph.build_engines.verify import held_out_samples

    sample = held_out_samples("voc")[0]
    feeds = {"FRAME": sample.frame, "BOXES": sample.boxes, "CELL_COUNT": np.array([len(sample.boxes) - 1], np.int32)}
    with EngineRunner(repository / CROP_EMBEDDER.name / "1" / build.PLAN_FILE) as runner:
        out = runner(feeds)  # EMBEDDINGS' rows depend on CELL_COUNT: the runner's output allocator sizes them
        assert out["EMBEDDINGS"].shape == (len(sample.boxes) - 1, EMBED_DIM)
        assert list(out["FRAME_SIZE"]) == [480.0, 640.0]
        with ThreadPoolExecutor(2) as pool:  # the benchmark calls the runner from worker threads
            results = list(pool.map(lambda _: runner(feeds), range(4)))
        for result in results:
            np.testing.assert_array_equal(result["EMBEDDINGS"], out["EMBEDDINGS"])


def test_cli_check_only_runs_without_tensorrt(exported_repository: Path) -> None:
    done = _cli("--check-only", "--model-repository", str(exported_repository))
    assert "cell_graph: OK" in done.stdout, done.stdout + done.stderr
    assert "crop_embedder:" in done.stdout and "cell_detector: OK" in done.stdout


def test_parser_is_usable_standalone() -> None:
    assert isinstance(build.get_args_parser(add_help=False), argparse.ArgumentParser)
    assert isinstance(plan_check.get_args_parser(add_help=False), argparse.ArgumentParser)


def test_largest_frame_samples_keep_cells_and_shift_boxes() -> None:
    from leukograph.build_engines.frame_samples import largest_frame_samples
    from leukograph.build_engines.verify import held_out_samples

    samples = held_out_samples("voc")[:2]
    big = largest_frame_samples(samples, MAX_FRAME_SIDE, MAX_FRAME_SIDE, 8)
    assert len(big) == 2
    h, w = samples[0].frame.shape[:2]
    assert big[0].frame.shape == (MAX_FRAME_SIDE, MAX_FRAME_SIDE, 3) and big[0].frame[:-h].max() == 0
    np.testing.assert_array_equal(big[0].frame[-h:, -w:], samples[0].frame)
    np.testing.assert_allclose(big[0].boxes - samples[0].boxes, [[MAX_FRAME_SIDE - w, MAX_FRAME_SIDE - h] * 2]
                               * len(samples[0].boxes))
    assert big[0].labels == samples[0].labels
    assert largest_frame_samples(samples, h, w, 8) == []  # already that size: nothing to add
