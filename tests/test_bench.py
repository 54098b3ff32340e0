"""`leukograph bench`: the --quick run against a real CPU Triton server, its JSON schema, the README section, and the
`pytorch` repository variant (deploy/bench_gpu.sh) served by the real server on the CPU. Not a timed test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leukograph.client import contract
from leukograph.deploy.bench import constants, engines, frames, report
from leukograph.deploy.paths import WEIGHTS_DIR
from leukograph.deploy.readme import markers, replace_section
from leukograph.deploy.runners import TritonRunner, run_pipeline
from leukograph.deploy.server import TritonServer, free_port

LEUKOGRAPH = [sys.executable, "-m", "leukograph.client.cli"]

NUMBER = (int, float)
LATENCY = {"p50": NUMBER, "p95": NUMBER, "p99": NUMBER, "mean": NUMBER, "max": NUMBER}
RUN = {"name": str, "kind": str, "concurrency": int, "frames": int, "wall_s": NUMBER, "fps": NUMBER,
       "latency_ms": LATENCY, "cells": {"mean": NUMBER, "min": int, "max": int}, "stages_ms": dict,
       "latencies_ms": list, "capture": str, "boxes": str, "load_avg_1m": NUMBER}
SERVER_SPLIT = {"requests": NUMBER, "success_ms": NUMBER, "queue_ms": NUMBER, "compute_input_ms": NUMBER,
                "compute_infer_ms": NUMBER, "compute_output_ms": NUMBER}
TOP = {"schema": str, "created_utc": str, "command": str, "mode": str,
       "machine": {"cpu_model": str, "cores": int, "available_cores": int, "gpu": str, "tritonserver": str,
                   "versions": {"torch": str, "onnxruntime": str, "tritonclient": str, "numpy": str, "opencv": str}},
       "load_avg_start": list, "load_avg_end": list,
       "frames": {"source": str, "count": int, "ids": list, "cells_per_frame": dict},
       "runs": list, "cell_sweep": list, "not_run": list, "checks": dict,
       "analysis": {"targets": list, "notes": list}, "files": list}


def schema_errors(value: object, schema: object, where: str = "$") -> list[str]:
    """Required keys and types, recursively: a dict schema lists required keys, a type (tuple) the allowed types."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {type(value).__name__}"]
        errors = []
        for key, sub in schema.items():
            if key not in value:
                errors.append(f"{where}.{key}: missing")
            else:
                errors += schema_errors(value[key], sub, f"{where}.{key}")
        return errors
    ok = isinstance(value, schema) and not (isinstance(value, bool) and bool not in (
        schema if isinstance(schema, tuple) else (schema,)))
    return [] if ok else [f"{where}: expected {schema}, got {type(value).__name__}"]


def check_result(result: dict) -> list[str]:
    errors = schema_errors(result, TOP)
    if result.get("schema") != constants.SCHEMA:
        errors.append(f"$.schema: {result.get('schema')!r} != {constants.SCHEMA!r}")
    for i, run in enumerate(result.get("runs", []) + result.get("cell_sweep", [])):
        errors += schema_errors(run, RUN, f"$.runs[{i}]")
        if run.get("kind") == "triton":
            errors += schema_errors(run, {"transport": str, "breakdown_ms": dict}, f"$.runs[{i}]")
            for model in constants.STAT_MODELS:
                errors += schema_errors(run.get("server_ms", {}).get(model), SERVER_SPLIT,
                                        f"$.runs[{i}].server_ms.{model}")
        if len(run.get("latencies_ms", [])) != run.get("frames"):
            errors.append(f"$.runs[{i}]: {len(run.get('latencies_ms', []))} latencies for {run.get('frames')} frames")
    for i, row in enumerate(result.get("not_run", [])):
        errors += schema_errors(row, {"name": str, "reason": str}, f"$.not_run[{i}]")
    for i, target in enumerate(result.get("analysis", {}).get("targets", [])):
        errors += schema_errors(target, {"name": str, "value": str, "met": bool}, f"$.analysis.targets[{i}]")
    return errors


@pytest.fixture(scope="module")
def quick(triton_server: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    """One `leukograph bench --quick` against the session's real server (all four transports, baselines)."""
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([*LEUKOGRAPH, "bench", "--quick", "--grpc-url", triton_server.grpc_url,
                           "--http-url", triton_server.http_url, "--model-repository", str(triton_server.repository),
                           "--weights", str(WEIGHTS_DIR), "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), out, done.stdout


@pytest.mark.server
def test_quick_runs_end_to_end_and_matches_schema(quick: tuple[dict, Path, str]) -> None:
    result, out, stdout = quick
    assert check_result(result) == []
    assert result["mode"] == "quick" and result["command"].startswith("leukograph bench --quick")
    triton = [r for r in result["runs"] if r["kind"] == "triton"]
    assert {r["transport"] for r in triton} == set(constants.TRANSPORTS)
    for run in triton:
        assert run["frames"] == 4 and run["fps"] > 0
        assert run["latency_ms"]["p50"] <= run["latency_ms"]["p99"] <= run["latency_ms"]["max"]
        # every request went through both steps; the server's time is about the client's call (Triton's ensemble
        # timestamps end after the response is released, so they can exceed the client's call by a little)
        # bare frames go through the detector ensemble, the client's boxes through the boxes ensemble
        pipeline, steps = ((contract.PIPELINE, contract.SERVED_STAGES) if run["boxes"] == "detector"
                           else (contract.BOXES_PIPELINE, contract.STAGES))
        for model in constants.STAT_MODELS:
            served = model in (pipeline.name, *(s.name for s in steps))
            assert run["server_ms"][model]["requests"] == (run["frames"] if served else 0), (run["name"], model)
        assert run["server_ms"][pipeline.name]["success_ms"] <= 1.2 * run["stages_ms"]["infer"] + 2.0
    # Triton's outputs equal in-process ONNX Runtime's on a real frame, over every transport
    assert all(check["ok"] and check["labels_equal"] for check in result["checks"].values())
    kinds = {r["kind"] for r in result["runs"]}
    assert {"triton", "ort", "torch"} <= kinds
    assert any("seed style" in r["name"] for r in result["runs"])
    detector_rows = [r for r in result["runs"] if r["boxes"] == "detector"]
    assert {r["kind"] for r in detector_rows} == {"triton", "ort"}  # the detector inside the ensemble, and in-process
    assert all(r["cells"]["mean"] > 10 for r in detector_rows)  # BCCD frames: RBCs and platelets found too
    assert all(r["stages_p50_ms"][contract.CELL_DETECTOR.name] > 0 for r in detector_rows if r["kind"] == "ort")
    assert {s["cells_requested"] for s in result["cell_sweep"]} == {1, 8}
    assert all(s["cells"]["min"] == s["cells"]["max"] == s["cells_requested"] for s in result["cell_sweep"])
    # no GPU here: the TensorRT rows say exactly why, with no numbers
    reasons = {row["name"]: row["reason"] for row in result["not_run"]}
    assert "tensorrt" in reasons["tensorrt engine runner (standalone)"]
    assert "triton with tensorrt plans" in reasons
    assert "CUDAExecutionProvider" in reasons["onnxruntime CUDA in-process"]  # ONNX Runtime here is CPU-only
    for name in ("bench.json", "results.md", "latency_cdf.png", "throughput.png", "cells.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| triton grpc-shm | 1 |" in stdout and "### Targets" in stdout


def test_readme_section_renders_from_json(quick: tuple[dict, Path, str], tmp_path: Path) -> None:
    result, out, _ = quick
    readme = tmp_path / "README.md"
    table = report.readme_table(result, os.path.relpath(out / "results.md", tmp_path))
    assert "| configuration | conc. | p50 ms |" in table and result["command"] in table
    start, end = markers(constants.README_SECTION)
    readme.write_text(f"# Title\n\nintro\n\n{start}\nold numbers\n{end}\n\n## After\nkept\n")
    done = subprocess.run([*LEUKOGRAPH, "bench", "--readme-from", str(out / "bench.json"), "--readme", str(readme)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n") and text.endswith("\n\n## After\nkept\n")
    assert "old numbers" not in text and table.strip() in text
    assert not replace_section(constants.README_SECTION, table, readme)  # idempotent
    fresh = tmp_path / "new" / "README.md"
    fresh.parent.mkdir()
    assert replace_section(constants.README_SECTION, table, fresh)
    assert start in fresh.read_text() and end in fresh.read_text()
    bad = subprocess.run([*LEUKOGRAPH, "bench", "--readme-from", str(tmp_path / "missing.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1


def test_tiled_boxes_stay_in_the_frame() -> None:
    loaded = frames.load_frames(limit=1)
    image = loaded.images[0]
    real = frames.localise_boxes(image)
    for cells in (1, 8, 128):
        boxes = frames.tiled_boxes(image, real, cells)
        assert boxes.shape == (cells, 4) and boxes.dtype == np.float32
        contract.validate_request(image, boxes)
    assert np.array_equal(frames.tiled_boxes(image, real, 32), frames.tiled_boxes(image, real, 32))


@pytest.mark.server
def test_pytorch_variant_serves_the_same_outputs(served_repository: Path, tmp_path: Path) -> None:
    """The GPU script's repository variant (TorchScript steps, DLPack through the stub), on the real CPU server."""
    from leukograph.deploy.model_repository import backend_of, generate, write_torchscript

    repository = tmp_path / "repository"
    generate(repository, "pytorch", 1)
    write_torchscript(WEIGHTS_DIR, repository, device="cpu")
    assert backend_of(repository) == "pytorch"
    loaded = frames.load_frames(limit=1)
    image, boxes = loaded.images[0], frames.localise_boxes(loaded.images[0])
    reference = run_pipeline(engines.ort_runners(served_repository, 1), image, boxes)
    detected = run_pipeline(engines.ort_runners(served_repository, 1, detector=True), image)
    server = TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          log_path=tmp_path / "tritonserver.log")
    with server, TritonRunner(server.grpc_url, "grpc", shm=True, localizer="client") as triton, \
            TritonRunner(server.grpc_url, "grpc", shm=True) as bare:
        served = run_pipeline([triton], image, boxes)
        served_bare = run_pipeline([bare], image)
    assert np.abs(served[contract.PROBS.name] - reference[contract.PROBS.name]).max() < 1e-4
    assert np.array_equal(served[contract.LABELS.name], reference[contract.LABELS.name])
    n = int(detected[contract.CELL_COUNT.name][0])  # bare frames: the TorchScript detector finds ORT's cells
    assert int(served_bare[contract.CELL_COUNT.name][0]) == n > 10
    assert np.abs(served_bare[contract.BOXES.name] - detected[contract.BOXES.name][:n]).max() < 0.05
    assert np.abs(served_bare[contract.PROBS.name] - detected[contract.PROBS.name]).max() < 1e-4


@pytest.mark.server
@pytest.mark.slow
def test_instances_setting_is_served_and_recorded(tmp_path: Path) -> None:
    """`--instances crop_embedder=3`: the benchmark's own server runs 3 instances, and bench.json says 3."""
    out = tmp_path / "bench"
    done = subprocess.run([*LEUKOGRAPH, "bench", "--quick", "--instances", f"{contract.CROP_EMBEDDER.name}=3",
                           "--transports", "grpc", "--no-baselines", "--cells", "1", "--weights", str(WEIGHTS_DIR),
                           "--out-dir", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert result["server"]["instances"] == {contract.CELL_DETECTOR.name: 1, contract.CROP_EMBEDDER.name: 3,
                                             contract.CELL_GRAPH.name: 1}
    assert {r["transport"] for r in result["runs"]} == {"grpc"}


def test_ort_gpu_rows_check_fp32_and_fp16_graphs_first(served_repository: Path, tmp_path: Path) -> None:
    """The onnxruntime CUDA rows of `deploy/bench_gpu.sh`, rehearsed with ONNX Runtime's CPU provider: the exported
    graphs and the FP16 graphs TensorRT's fp16 engines are built from are compared with fp32 on the CPU over real
    frames before any row is timed; the factories serve both ensembles' stage chains."""
    from leukograph.deploy.bench.run import ort_cuda_baselines
    from leukograph.deploy.runners import ORT_CPU

    held = frames.load_frames(3)
    boxes = [frames.localise_boxes(image) for image in held.images]
    rows, checks, not_run = ort_cuda_baselines(served_repository, 1, tmp_path, held, boxes,
                                               engines.ort_runners(served_repository, 1), provider=ORT_CPU)
    assert not_run == []
    assert [name for name, *_ in rows] == [
        "onnxruntime CPUExecutionProvider in-process",
        "onnxruntime CPUExecutionProvider in-process with the detector",
        "onnxruntime CPUExecutionProvider in-process, FP16 graphs",
        "onnxruntime CPUExecutionProvider in-process, FP16 graphs with the detector"]
    fp32, fp16 = checks["onnxruntime_cpuexecutionprovider_fp32"], checks["onnxruntime_cpuexecutionprovider_fp16"]
    assert fp32["ok"] and fp32["label_agreement"] == 1.0 and fp32["cells"] == sum(len(b) for b in boxes)
    assert fp16["ok"] and fp16["label_agreement"] >= 0.99 and 0 < fp16["max_abs_diff_vs_ort"] < 0.05
    from leukograph.deploy.bench.analysis import analyse

    notes = analyse({"runs": [], "checks": checks, "machine": {}})["notes"]
    assert any(n.startswith("Check onnxruntime_cpuexecutionprovider_fp16:") and "within the fp16 tolerance" in n
               for n in notes), notes
    for name, _kind, factory, _, extra in rows:
        runners = factory(0)
        stages = contract.SERVED_STAGES if extra.get("localizer") == "detector" else contract.STAGES
        assert [r.stage for r in runners] == list(stages), name
        out = run_pipeline(runners, held.images[0], None if extra.get("localizer") else boxes[0])
        assert out[contract.PROBS.name].shape[1] == len(contract.CLASSES), name


def test_ort_runner_refuses_a_provider_that_does_not_start(served_repository: Path) -> None:
    """ONNX Runtime falls back to the CPU when a provider can't start; a row named CUDA must not time the CPU."""
    from leukograph.client.errors import UserError
    from leukograph.deploy.runners import ORT_CUDA, OrtRunner

    path = contract.stage_path(served_repository, contract.CELL_GRAPH, contract.MODEL_FILES["onnxruntime"])
    with pytest.raises(UserError, match="could not start CUDAExecutionProvider"):
        OrtRunner(path, contract.CELL_GRAPH, provider=ORT_CUDA)


def test_a_copy_of_the_committed_checkpoints_counts_as_committed(tmp_path: Path) -> None:
    """deploy/bench_gpu.sh carries copies of the checkpoints: the run says they are the committed ones by hash."""
    import shutil

    from leukograph.deploy.bench.machine import weights_info

    for name in ("cnn.pt", "gnn.pt"):
        shutil.copy2(WEIGHTS_DIR / name, tmp_path / name)
    assert weights_info(tmp_path)["committed_weights"] is True
    (tmp_path / "gnn.pt").write_bytes(b"another checkpoint")
    assert weights_info(tmp_path)["committed_weights"] is False
