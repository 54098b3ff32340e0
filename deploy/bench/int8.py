"""`leukograph bench --int8`: FP32 against INT8 on the same frames, in one run.

Rows (BCCD held-out frames, boxes from the localiser, tiled to a fixed cell count with `frames.tiled_boxes`):

* in-process ONNX Runtime, one intra-op thread (as a server step): the crop_embedder alone (FP32 `model.onnx`, INT8
  `model.int8.onnx`) at 16 and 128 cells per frame, median ms per frame and per cell; the cell_graph (FP32 in both);
  the whole pipeline at 16 cells;
* PyTorch eager, seed-paper style (one crop per forward call), at 16 cells: the baseline of the issue's ">= 6x";
* Triton end to end (`leukocyte_pipeline_boxes` through the product's client, over gRPC and over gRPC with system
  shared memory; localisation excluded: boxes given) at 16 cells, concurrency 1 and 2, for a repository serving
  each precision (`model_repository.set_precision`), after checking the ensemble's outputs against the same
  precision in-process; then bare frames to `leukocyte_pipeline`, whose detector finds the cells (the path
  `leukograph stream` runs), over gRPC with shared memory at concurrency 1 and 2;
* roofline: the CNN's multiply-adds per crop (counted with forward hooks on the Conv2d/Linear layers) divided by the
  measured crop_embedder time per cell at 128 cells, against one core's peak (`core_peak`).

Output: `docs/bench/int8.json` (`--out-dir`), and with `--readme` the README "int8-bench" table from it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

import numpy as np

from leukograph.client.contract import CELL_GRAPH, CROP_EMBEDDER, MODEL_FILES, boxes_feed, stage_path
from leukograph.client.errors import UserError
from leukograph.deploy.bench.frames import MemoryCapture, load_frames, localise_boxes, tiled_boxes
from leukograph.deploy.bench.loop import run_closed_loop, summarize
from leukograph.deploy.runners import OrtRunner, Sample, compare, run_pipeline

INT8_JSON = "int8.json"
README_SECTION = "int8-bench"
FMA_PIPES = 2  # 512-bit FMA pipes per core (AMD Zen 4/5, Intel server cores with two AVX-512 FMA units)
CELLS = (16, 128)
TRITON_TRANSPORTS = ("grpc", "grpc-shm")
# The rows where the served ensemble's detector finds the cells in bare frames (as `leukograph stream` runs).
DETECTOR_TRANSPORT, DETECTOR_BOXES = "grpc-shm", "detector"
ONNX_FILES = {"fp32": MODEL_FILES["onnxruntime"], "int8": "model.int8.onnx"}  # what each precision serves
# In-process only: the TensorRT QDQ graph run by ONNX Runtime (symmetric activations: ReLU stays in float between
# int8 convolutions), the measurement behind serving model.int8.onnx on the CPU.
IN_PROCESS_FILES = {**ONNX_FILES, "int8 tensorrt graph": "model.int8.tensorrt.onnx"}


def cpu_flags_and_clock() -> tuple[set[str], float]:
    """(/proc/cpuinfo flags of the first CPU, its clock in GHz from `cpu MHz`)."""
    flags: set[str] = set()
    mhz = 0.0
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "cpu MHz" and not mhz:
                mhz = float(value)
    return flags, mhz / 1000.0


def core_peak() -> dict:
    """One core's peak multiply-adds per second, FP32 (FMA) and INT8 (VNNI dot products), from its vector width and
    clock: pipes x lanes x GHz. FP32: an FMA on a 512-bit register is 16 multiply-adds; INT8: a VPDPBUSD on a 512-bit
    register is 64 (four u8 x s8 products summed into each of 16 int32 lanes)."""
    flags, ghz = cpu_flags_and_clock()
    bits = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
    vnni = "avx512_vnni" in flags if bits == 512 else "avx_vnni" in flags
    fp32 = FMA_PIPES * (bits // 32) * ghz * 1e9
    int8 = FMA_PIPES * (bits // 8) * ghz * 1e9 if vnni else None
    vnni_flag = ("avx512_vnni" if bits == 512 else "avx_vnni") if vnni else "no VNNI"
    how = (f"{FMA_PIPES} FMA pipes x {bits}-bit vectors x {ghz:.3f} GHz (`cpu MHz` in /proc/cpuinfo; "
           f"{'avx512f' if bits == 512 else 'avx2'}, {vnni_flag}): FP32 {bits // 32} multiply-adds per FMA, INT8 "
           f"{bits // 8} per VNNI dot product")
    return {"clock_ghz": round(ghz, 3), "vector_bits": bits, "fma_pipes": FMA_PIPES, "vnni": vnni,
            "fp32_macs_per_s": fp32, "int8_macs_per_s": int8, "how": how}


def macs_per_crop(weights: Path) -> int:
    """Multiply-adds of the CNN for one crop of its side: Conv2d (output elements x in-channels/groups x kernel area)
    and Linear (in x out) layers, counted with forward hooks."""
    import torch

    from leukograph.training.checkpoints import load_models

    embedder, _, _ = load_models(weights)
    total = 0

    def hook(module, _inputs, output) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            total += output.numel() * (module.in_channels // module.groups) * int(np.prod(module.kernel_size))
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in embedder.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m is not embedder.classifier]
    with torch.no_grad():
        embedder(torch.rand(1, 3, embedder.crop_size, embedder.crop_size))
    for handle in handles:
        handle.remove()
    return total


def _median_s(call, reps: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return median(times)


def _interleaved_medians(calls: dict[str, dict[str, object]], reps: int) -> dict[str, dict[str, float]]:
    """Median wall seconds of every call, and (key `<name> cpu`) median CPU seconds of the calling thread, the graphs
    taking turns rep by rep (so a burst of load on a shared machine falls on all of them alike). With one intra-op
    thread ONNX Runtime computes in the calling thread, so its CPU time is the compute time without the waits for a
    core that a loaded machine adds to the wall time."""
    times: dict[str, dict[str, list[float]]] = {p: {k: [] for key in c for k in (key, f"{key} cpu")}
                                                for p, c in calls.items()}
    for rep in range(reps + 1):  # the first round warms up
        for precision, named in calls.items():
            for name, call in named.items():
                start, start_cpu = time.perf_counter(), time.thread_time()
                call()
                if rep:
                    times[precision][name].append(time.perf_counter() - start)
                    times[precision][f"{name} cpu"].append(time.thread_time() - start_cpu)
    return {p: {k: median(v) for k, v in named.items()} for p, named in times.items()}


def serving_repository(source: Path, target: Path, precision: str) -> Path:
    """A copy of `source` (configs and model files) serving `precision`, with its version.json."""
    from leukograph.deploy.model_repository import set_precision, write_digest

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.plan", "__pycache__"))
    set_precision(target, precision)
    write_digest(target)
    return target


def triton_rows(repository: Path, precision: str, frames, boxes: list[np.ndarray], count: int,
                reference: list[OrtRunner], work: Path) -> tuple[list[dict], dict]:
    """Triton serving `precision`: the ensemble checked against in-process ORT of the same precision on the first
    frame, then concurrency 1 and 2 at the given boxes, over gRPC and over gRPC with the frames in system shared
    memory (client and server on the same lab PC)."""
    from leukograph.deploy.bench.engines import triton_runners
    from leukograph.deploy.bench.statistics import stats_snapshot
    from leukograph.deploy.runners import TOLERANCES
    from leukograph.deploy.server import TritonServer, free_port

    served = serving_repository(repository, work / f"repository-{precision}", precision)
    server = TritonServer(served, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          log_path=work / f"tritonserver-{precision}.log")
    rows = []
    try:
        server.start(timeout=180.0)
        candidate = triton_runners(server.grpc_url, "grpc")
        sample = Sample(frames.ids[0], frames.images[0], boxes[0], [None] * len(boxes[0]), "tiled")
        comparison = compare(reference, candidate, [sample])
        failures = comparison.failures_for(TOLERANCES["fp32"])  # the same graph in the same runtime
        if failures:
            raise UserError(f"Triton serving {precision} differs from in-process ORT: {'; '.join(failures)}")
        check = {"cells": comparison.nodes, "max_prob_diff_vs_in_process": comparison.max_prob_diff,
                 "labels_equal": comparison.agreeing_nodes == comparison.nodes}
        capture = MemoryCapture(frames.images)

        def given(image: np.ndarray, index: int) -> np.ndarray:
            return boxes[index % len(boxes)]

        def bare(image: np.ndarray, index: int) -> None:
            return None

        # (transport, localizer, the loop's boxes, their label, name suffix): the boxes given, then the default path,
        # bare frames whose cells the ensemble's detector finds
        paths = [(transport, "client", given, f"{len(boxes[0])} given", "") for transport in TRITON_TRANSPORTS]
        paths.append((DETECTOR_TRANSPORT, "server", bare, DETECTOR_BOXES, ", detector in the ensemble"))
        for (transport, localizer, boxes_for, boxes_label, suffix), concurrency in itertools.product(paths, (1, 2)):
            run = run_closed_loop(lambda k, t=transport, where=localizer: triton_runners(server.grpc_url, t, where),
                                  capture, boxes_for, count, concurrency, 2, lambda: stats_snapshot(server.grpc_url))
            row = summarize(f"triton {transport} {precision}{suffix}", "triton", run, precision=precision,
                            concurrency=concurrency, transport=transport, boxes=boxes_label)
            row.pop("latencies_ms", None)
            rows.append(row)
    finally:
        server.stop()
    return rows, check


def op_profile_ms(path: Path, feed: dict[str, np.ndarray], reps: int) -> dict[str, float]:
    """Mean ms per call by op type in one ONNX Runtime session (1 thread), from ORT's own profiler: where a
    graph's time goes (e.g. the FP32 GridSample left in front of the INT8 convolutions)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="leukograph-ort-profile-") as folder:
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, feed)  # warm-up: its kernels are timed too, so it counts as one of the calls
        for _ in range(reps):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1e3 / (reps + 1)
    return {op: round(ms, 3) for op, ms in sorted(totals.items(), key=lambda kv: -kv[1])}


def run_int8_bench(args: argparse.Namespace) -> dict:
    from leukograph.deploy.bench.engines import seed_style_runners
    from leukograph.deploy.paths import MODEL_REPOSITORY, WEIGHTS_DIR

    repository = Path(args.model_repository or MODEL_REPOSITORY)
    weights = Path(args.weights or WEIGHTS_DIR)
    for precision, name in IN_PROCESS_FILES.items():
        if not stage_path(repository, CROP_EMBEDDER, name).exists():
            raise UserError(f"{stage_path(repository, CROP_EMBEDDER, name)} is missing: run `leukograph export"
                            f"{' --int8' if precision == 'int8' else ''}`")
    started = time.time()
    reps = 3 if args.quick else 15
    count = 6 if args.quick else (args.frames or 40)
    frames = load_frames(4 if args.quick else None)
    real = [localise_boxes(image) for image in frames.images]
    middle = int(np.argsort([len(b) for b in real])[len(real) // 2])
    result: dict = {"command": "leukograph bench --int8" + (" --quick" if args.quick else ""),
                    "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "load_avg_start": [round(v, 2) for v in os.getloadavg()], "frame_id": frames.ids[middle],
                    "ort_threads": 1}
    pipelines = {p: [OrtRunner(stage_path(repository, CROP_EMBEDDER, f), CROP_EMBEDDER, 1),
                     OrtRunner(stage_path(repository, CELL_GRAPH, MODEL_FILES["onnxruntime"]), CELL_GRAPH, 1)]
                 for p, f in IN_PROCESS_FILES.items()}
    image = frames.images[middle]
    in_process = []
    for cells in CELLS:
        boxes = tiled_boxes(image, real[middle], cells)
        calls = {}
        for precision, (crop, graph) in pipelines.items():
            embedded = crop.infer(boxes_feed(image, boxes))
            graph_feed = {**boxes_feed(image, boxes), **embedded}
            calls[precision] = {"crop_embedder": lambda c=crop, b=boxes: c.infer(boxes_feed(image, b)),
                                "cell_graph": lambda g=graph, f=graph_feed: g.infer(f),
                                "pipeline": lambda p=(crop, graph), b=boxes: run_pipeline(list(p), image, b)}
        times = _interleaved_medians(calls, reps)
        for precision, median_s in times.items():
            in_process.append({"precision": precision, "cells": cells,
                               "crop_embedder_ms": round(median_s["crop_embedder"] * 1e3, 3),
                               "crop_embedder_ms_per_cell": round(median_s["crop_embedder"] * 1e3 / cells, 4),
                               "crop_embedder_cpu_ms_per_cell": round(median_s["crop_embedder cpu"] * 1e3 / cells, 4),
                               "cell_graph_ms": round(median_s["cell_graph"] * 1e3, 3),
                               "pipeline_ms": round(median_s["pipeline"] * 1e3, 3)})
    result["in_process"] = in_process
    boxes_most = tiled_boxes(image, real[middle], CELLS[-1])
    result["op_profile_ms"] = {"cells": CELLS[-1], **{
        precision: op_profile_ms(stage_path(repository, CROP_EMBEDDER, name), boxes_feed(image, boxes_most), reps)
        for precision, name in ONNX_FILES.items()}}
    seed = seed_style_runners(weights, 1)
    boxes16 = tiled_boxes(image, real[middle], CELLS[0])
    result["seed_style_ms_16_cells"] = round(_median_s(lambda: run_pipeline(seed, image, boxes16), reps) * 1e3, 3)

    boxes = [tiled_boxes(img, b, CELLS[0]) for img, b in zip(frames.images, real)]
    triton, checks = [], {}
    with tempfile.TemporaryDirectory(prefix="leukograph-bench-int8-") as work:
        for precision in ONNX_FILES:
            rows, checks[precision] = triton_rows(repository, precision, frames, boxes, count, pipelines[precision],
                                                  Path(work))
            triton += rows
    result["triton"], result["triton_checks"] = triton, checks
    macs = macs_per_crop(weights)
    peak = core_peak()
    per_cell = {row["precision"]: row["crop_embedder_cpu_ms_per_cell"] / 1e3 for row in in_process
                if row["cells"] == CELLS[-1]}
    result["roofline"] = {
        "macs_per_crop": macs, "peak": peak,
        "fp32_macs_per_s": macs / per_cell["fp32"], "int8_macs_per_s": macs / per_cell["int8"],
        "fp32_share_of_peak": macs / per_cell["fp32"] / peak["fp32_macs_per_s"],
        "int8_share_of_peak": (macs / per_cell["int8"] / peak["int8_macs_per_s"]) if peak["int8_macs_per_s"]
        else None,
        "note": f"crop_embedder CPU time per cell at {CELLS[-1]} cells (the calling thread's, one ORT thread), "
                "in-graph crop and colour standardisation included"}
    result["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    result["elapsed_s"] = round(time.time() - started, 1)
    return result


def markdown(result: dict) -> str:
    """The README "int8-bench" table and lines."""
    rows = {(r["precision"], r["cells"]): r for r in result["in_process"]}
    roof = result["roofline"]
    peak = roof["peak"]
    lines = [f"Generated by `{result['command']}` ({result['created_utc']}; load average "
             f"{result['load_avg_start'][0]:.2f} at start, {result['load_avg_end'][0]:.2f} at end, on a 2-core machine "
             "shared with other work: wall times include waits for a core, \"CPU ms\" is the computing thread's "
             "own time; the graphs took turns on the same frame, rep by rep).",
             "",
             "| in-process ONNX Runtime, 1 thread | cells | crop_embedder ms | ms per cell | CPU ms per cell | "
             "vs FP32 (CPU) | cell_graph ms (FP32) | pipeline ms |", "|---|---|---|---|---|---|---|---|"]
    for cells in CELLS:
        fp32 = rows[("fp32", cells)]
        for precision in dict.fromkeys(r["precision"] for r in result["in_process"]):
            row = rows[(precision, cells)]
            lines.append(f"| {precision} | {cells} | {row['crop_embedder_ms']:.1f} | "
                         f"{row['crop_embedder_ms_per_cell']:.3f} | {row['crop_embedder_cpu_ms_per_cell']:.3f} | "
                         f"{fp32['crop_embedder_cpu_ms_per_cell'] / row['crop_embedder_cpu_ms_per_cell']:.2f}x | "
                         f"{row['cell_graph_ms']:.2f} | {row['pipeline_ms']:.1f} |")
    lines += ["", "| Triton, 16 cells, boxes given | transport | concurrency | p50 ms | p99 ms | frames/s | "
                  "vs seed style |", "|---|---|---|---|---|---|---|"]
    given = [row for row in result["triton"] if row.get("boxes") != DETECTOR_BOXES]
    for row in given:
        speedup = result["seed_style_ms_16_cells"] / row["latency_ms"]["p50"]
        lines.append(f"| {row['precision']} | {row.get('transport', 'grpc')} | {row['concurrency']} | "
                     f"{row['latency_ms']['p50']:.1f} | "
                     f"{row['latency_ms']['p99']:.1f} | {row['fps']:.1f} | {speedup:.1f}x |")
    detected = [row for row in result["triton"] if row.get("boxes") == DETECTOR_BOXES]
    if detected:
        lines += ["", "| Triton, bare frames, the detector in the ensemble | transport | concurrency | cells per frame "
                      "| p50 ms | p99 ms | frames/s |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {row['precision']} | {row['transport']} | {row['concurrency']} | {row['cells']['mean']:.1f} | "
                  f"{row['latency_ms']['p50']:.1f} | {row['latency_ms']['p99']:.1f} | {row['fps']:.1f} |"
                  for row in detected]
    lines += ["", f"Seed style (PyTorch eager, one crop per call, 1 thread), 16 cells: "
                  f"{result['seed_style_ms_16_cells']:.1f} ms per frame. Triton's outputs matched in-process ORT of "
                  "the same precision: " + ", ".join(f"{p} max prob diff {c['max_prob_diff_vs_in_process']:.2g}"
                                                      for p, c in result["triton_checks"].items()) + ".", "",
              f"Roofline: {roof['macs_per_crop'] / 1e6:.1f} M multiply-adds per crop; measured "
              f"{roof['fp32_macs_per_s'] / 1e9:.1f} G/s FP32 ({100 * roof['fp32_share_of_peak']:.0f}% of "
              f"{peak['fp32_macs_per_s'] / 1e9:.0f} G/s) and {roof['int8_macs_per_s'] / 1e9:.1f} G/s INT8"
              + (f" ({100 * roof['int8_share_of_peak']:.0f}% of {peak['int8_macs_per_s'] / 1e9:.0f} G/s)"
                 if roof["int8_share_of_peak"] is not None else " (no VNNI: no INT8 peak)")
              + f". Peak of one core: {peak['how']}. `cpu MHz` is the nominal clock (under a hypervisor, the TSC "
                "rate); a core that boosts above it has a higher peak, so a share near or above 100% says the core ran "
                f"faster than {peak['clock_ghz']:.2f} GHz, not that the kernel beat the hardware. Measured: "
                f"{roof['note']}."]
    profile = result.get("op_profile_ms")
    if profile:
        lines += ["", f"Where the crop_embedder's time goes at {profile['cells']} cells (ONNX Runtime's profiler, 1 "
                  "thread, mean ms per call, the largest op types): " + "; ".join(
                      f"{precision} {sum(ops.values()):.1f} ms: " + ", ".join(
                          f"{op} {ms:.1f}" for op, ms in list(ops.items())[:4])
                      for precision, ops in profile.items() if precision != "cells") + "."]
    return "\n".join(lines) + "\n"
