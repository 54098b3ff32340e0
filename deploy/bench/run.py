"""`run_benchmark`: every row on the same frames, against one server (started here or given)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from leukograph.client.contract import LABELS, MODEL_FILES, SERVED_STAGES, STAGES, stage_path
from leukograph.client.errors import UserError
from leukograph.deploy.bench.analysis import analyse
from leukograph.deploy.bench.constants import (
    CELL_COUNTS,
    CONCURRENCIES,
    SCHEMA,
    TRANSPORTS,
)
from leukograph.deploy.bench.engines import (
    Runners,
    ort_runners,
    seed_style_runners,
    tensorrt_runners,
    torch_runners,
    triton_runners,
)
from leukograph.deploy.bench.frames import (
    Frames,
    MemoryCapture,
    VideoCapture,
    load_frames,
    localise_boxes,
    tiled_boxes,
    write_mjpg,
)
from leukograph.deploy.bench.loop import run_closed_loop, summarize
from leukograph.deploy.bench.machine import gpu_status, machine_description, tensorrt_status, weights_info
from leukograph.deploy.bench.profile import start_pyspy, stub_pids, summarize_pyspy
from leukograph.deploy.bench.repository import prepare_repository
from leukograph.deploy.bench.statistics import server_version, stats_snapshot
from leukograph.deploy.paths import WEIGHTS_DIR
from leukograph.deploy.runners import (
    ORT_CUDA,
    TOLERANCES,
    OrtRunner,
    Sample,
    compare,
    ort_cuda_status,
    run_pipeline,
)

# (row name, kind, runners factory, concurrencies, extra fields of the row)
Baseline = tuple[str, str, Callable[[int], Any], tuple[int, ...], dict]


@dataclass
class Plan:
    transports: tuple[str, ...]
    concurrencies: tuple[int, ...]
    cells: tuple[int, ...]
    frames: int
    warmup: int
    sweep_reps: int
    frame_limit: int | None
    video: bool


def make_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        return Plan(tuple(args.transports or TRANSPORTS), (1,), tuple(args.cells or (1, 8)), args.frames or 4, 1,
                    args.sweep_reps or 2, 4, False)
    return Plan(tuple(args.transports or TRANSPORTS), tuple(args.concurrency or CONCURRENCIES),
                tuple(args.cells or CELL_COUNTS), args.frames or 216, 3, args.sweep_reps or 30, None,
                not args.no_video)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_benchmark(args: argparse.Namespace) -> dict:
    plan = make_plan(args)
    missing: list[dict] = []
    started = time.time()
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join(["leukograph", *sys.argv[1:]] if sys.argv[1:2] == ["bench"] else sys.argv),
        "mode": "quick" if args.quick else "full",
        "label": args.label,
        "machine": machine_description(),
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
    }
    transports = []
    for transport in plan.transports:
        protocol = transport.partition("-")[0]
        try:
            __import__(f"tritonclient.{protocol}")
            transports.append(transport)
        except (ImportError, RuntimeError) as exc:  # tritonclient.http raises RuntimeError without gevent
            missing.append({"name": f"triton {transport}", "reason": f"tritonclient.{protocol} not importable: {exc}"})
    if not transports:
        raise UserError("no usable Triton transport: " + "; ".join(m["reason"] for m in missing))
    plan.transports = tuple(transports)
    frames = load_frames(plan.frame_limit, args.frames_dir)
    _log(f"bench: {len(frames.ids)} held-out frames decoded; load average {os.getloadavg()[0]:.2f}")
    real_boxes = [localise_boxes(image) for image in frames.images]
    source = f"images in {args.frames_dir}" if args.frames_dir else "BCCD held-out frames (split_frames().held_out)"
    result["frames"] = {"source": source + ", decoded once",
                        "count": len(frames.ids), "ids": frames.ids,
                        "shape": list(frames.images[0].shape),
                        "cells_per_frame": {"mean": round(float(np.mean([len(b) for b in real_boxes])), 2),
                                            "min": int(min(len(b) for b in real_boxes)),
                                            "max": int(max(len(b) for b in real_boxes))}}
    weights = Path(args.weights).expanduser() if args.weights else None
    runs: list[dict] = []
    sweep: list[dict] = []
    not_run: list[dict] = list(missing)
    checks: dict[str, Any] = {}

    with contextlib.ExitStack() as stack:
        # -- the server: an external one, or one started here on a fresh repository exported from the weights
        if args.grpc_url:
            grpc_url, http_url = args.grpc_url, args.http_url
            repository = Path(args.model_repository) if args.model_repository else None
            server_proc = None
            result["server"] = {"external": True, "grpc_url": grpc_url, "http_url": http_url}
        else:
            from leukograph.deploy.model_repository import instance_counts
            from leukograph.deploy.server import TritonServer, free_port

            weights = weights or WEIGHTS_DIR
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="leukograph-bench-")))
            instances = dict(args.instances or {})
            _log(f"bench: exporting a {args.backend} repository from {weights}")
            repository = prepare_repository(tmp / "repository", args.backend, weights, args.ort_threads, instances)
            server = TritonServer(repository, http_port=free_port(), grpc_port=free_port(),
                                  metrics_port=free_port(), log_path=tmp / "tritonserver.log")
            stack.callback(server.stop)
            server.start(timeout=180.0)
            grpc_url, http_url = server.grpc_url, server.http_url
            server_proc = server.process
            result["server"] = {"external": False, "backend": args.backend, "ort_threads": args.ort_threads,
                                "instances": instance_counts(repository),
                                "startup_s": round(server.startup_s or 0.0, 2)}
        result["machine"]["tritonserver"] = server_version(grpc_url)
        if repository is not None:
            from leukograph.deploy.model_repository import repository_digest

            with contextlib.suppress(Exception):
                result["repository_digest"] = repository_digest(repository)
        if weights is not None:
            result["weights"] = weights_info(weights)
        def snapshot() -> dict:
            return stats_snapshot(grpc_url)

        urls = {"grpc": grpc_url, "http": http_url}

        def triton_factory(transport: str, url_map: dict[str, str | None] = urls,
                           localizer: str = "client") -> Callable[[int], Runners]:
            url = url_map[transport.partition("-")[0]]
            if not url:
                raise UserError(f"no URL for transport {transport}")
            return lambda k: triton_runners(url, transport, localizer)

        def localised(image: np.ndarray, index: int) -> np.ndarray:
            return localise_boxes(image)

        def bare_frames(image: np.ndarray, index: int) -> None:
            return None

        capture = MemoryCapture(frames.images)

        # -- correctness first: Triton's outputs against in-process ORT on one frame, per transport
        reference = ort_runners(repository, args.ort_threads) if repository and not args.no_baselines else None
        for transport in plan.transports:
            checks[f"triton_{transport}"] = check_transport(transport, triton_factory(transport)(0), reference,
                                                            frames, real_boxes[0], args.backend)

        # -- Triton end to end, every transport and concurrency
        for transport in plan.transports:
            for concurrency in plan.concurrencies:
                _log(f"bench: triton {transport} x{concurrency} (load {os.getloadavg()[0]:.2f})")
                run = run_closed_loop(triton_factory(transport), capture, localised, plan.frames, concurrency,
                                      plan.warmup, snapshot)
                runs.append(summarize(f"triton {transport}", "triton", run, transport=transport,
                                      concurrency=concurrency, capture="memory", boxes="localised"))
        # -- the default path: bare frames, the ensemble's detector finds the cells (--localizer server)
        transport = plan.transports[0]
        for concurrency in plan.concurrencies:
            _log(f"bench: triton {transport} x{concurrency}, detector in the ensemble (load {os.getloadavg()[0]:.2f})")
            run = run_closed_loop(triton_factory(transport, localizer="server"), capture, bare_frames, plan.frames,
                                  concurrency, plan.warmup, snapshot)
            runs.append(summarize(f"triton {transport}, detector in the ensemble", "triton", run,
                                  transport=transport, concurrency=concurrency, capture="memory", boxes="detector"))
        if plan.video:
            video = write_mjpg(frames.images, Path(tempfile.mkdtemp(prefix="leukograph-bench-video-")) / "held.avi")
            video_capture = VideoCapture(video)
            try:
                transport = plan.transports[0]
                _log(f"bench: triton {transport} x1, frames from an MJPG video")
                run = run_closed_loop(triton_factory(transport), video_capture, localised, plan.frames, 1,
                                      plan.warmup, snapshot)
                runs.append(summarize(f"triton {transport} (MJPG video capture)", "triton", run, transport=transport,
                                      concurrency=1, capture="video", boxes="localised"))
            finally:
                video_capture.close()
                shutil.rmtree(video.parent, ignore_errors=True)

        # -- in-process baselines on the same frames
        baselines: list[Baseline] = []
        if args.no_baselines:
            not_run.append({"name": "in-process baselines", "reason": "--no-baselines"})
        elif repository is None:
            not_run.append({"name": "in-process baselines",
                            "reason": "external server without --model-repository (no ONNX files here)"})
        else:
            threads_torch = args.torch_threads or len(os.sched_getaffinity(0))
            baselines += [
                (f"onnxruntime in-process ({args.ort_threads} thread)", "ort",
                 lambda k: ort_runners(repository, args.ort_threads), tuple(c for c in plan.concurrencies if c <= 2),
                 {"threads": args.ort_threads}),
                ("onnxruntime in-process (2 threads)", "ort", lambda k: ort_runners(repository, 2), (1,),
                 {"threads": 2}),
                # the detector's cost: its stage time in stages_p50_ms["cell_detector"] (a 640x480 frame)
                (f"onnxruntime in-process with the detector ({args.ort_threads} thread)", "ort",
                 lambda k: ort_runners(repository, args.ort_threads, detector=True), (1,),
                 {"threads": args.ort_threads, "localizer": "detector"}),
                ("onnxruntime in-process with the detector (2 threads)", "ort",
                 lambda k: ort_runners(repository, 2, detector=True), (1,), {"threads": 2, "localizer": "detector"}),
            ]
            cuda_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="leukograph-bench-fp16-")))
            cuda_rows, cuda_checks, cuda_missing = ort_cuda_baselines(repository, args.ort_threads, cuda_dir, frames,
                                                                      real_boxes, reference)
            baselines += cuda_rows
            checks.update(cuda_checks)
            not_run += cuda_missing
            if weights is not None:
                device = args.torch_device
                batched = torch_runners(weights, threads_torch, device)
                seed = seed_style_runners(weights, threads_torch, device)
                where = "" if device == "cpu" else f" on {device}"
                baselines += [
                    (f"pytorch eager{where}, batched per frame", "torch", lambda k: batched, (1,),
                     {"threads": threads_torch, "device": device}),
                    (f"pytorch eager{where}, one crop per call (seed style)", "torch", lambda k: seed, (1,),
                     {"threads": threads_torch, "device": device}),
                ]
            else:
                not_run.append({"name": "pytorch baselines", "reason": "no --weights for an external server"})
        trt_reason = tensorrt_status()
        gpu_ok, gpu_reason = gpu_status() if not args.no_baselines else (False, "not checked")
        if trt_reason is None and args.plans:
            engines = tensorrt_runners(Path(args.plans))
            baselines.append(("tensorrt engine runner", "tensorrt", lambda k: engines, (1,), {}))
        else:
            reason = trt_reason or "no --plans given (folder with <stage>/1/model.plan built by build-engines)"
            if trt_reason and not gpu_ok:
                reason = f"{trt_reason}; {gpu_reason}"
            not_run.append({"name": "tensorrt engine runner (standalone)", "reason": reason})
        for name, kind, factory, concurrencies, extra in baselines:
            for concurrency in concurrencies:
                _log(f"bench: {name} x{concurrency} (load {os.getloadavg()[0]:.2f})")
                frames_here = plan.frames if kind != "torch" else max(plan.frames // 2, min(plan.frames, 8))
                detector = extra.get("localizer") == "detector"
                run = run_closed_loop(factory, capture, bare_frames if detector else localised, frames_here,
                                      concurrency, plan.warmup)
                runs.append(summarize(name, kind, run, concurrency=concurrency, capture="memory",
                                      boxes="detector" if detector else "localised", **extra))
        if args.trt_grpc_url:
            trt_urls = {"grpc": args.trt_grpc_url, "http": None}
            for concurrency in plan.concurrencies:
                run = run_closed_loop(triton_factory("grpc", trt_urls), capture, localised, plan.frames, concurrency,
                                      plan.warmup, lambda: stats_snapshot(args.trt_grpc_url))
                runs.append(summarize("triton tensorrt grpc", "triton", run, transport="grpc",
                                      concurrency=concurrency, capture="memory", boxes="localised"))
        else:
            reasons = [r for r in (trt_reason, None if gpu_ok else gpu_reason) if r]
            reasons.append("Triton's tensorrt backend is not in the nvidia-pytriton wheel (NVIDIA's Triton container "
                           "only); pass --trt-grpc-url to measure such a server")
            not_run.append({"name": "triton with tensorrt plans", "reason": "; ".join(reasons)})

        # -- cells per frame: the model path alone (boxes given)
        sweep_frame = int(np.argsort([len(b) for b in real_boxes])[len(real_boxes) // 2])
        sweep_image = frames.images[sweep_frame]
        sweep_engines = [(f"triton {plan.transports[0]}", "triton", triton_factory(plan.transports[0]),
                          {"transport": plan.transports[0]})]
        sweep_engines += [(name, kind, factory, extra) for name, kind, factory, _, extra in baselines
                          if extra.get("localizer") != "detector"]
        for cells in plan.cells:
            boxes = tiled_boxes(sweep_image, real_boxes[sweep_frame], cells)
            for name, kind, factory, extra in sweep_engines:
                _log(f"bench: {cells} cells, {name}")
                reps = plan.sweep_reps if not (kind == "torch" and cells >= 128) else max(2, plan.sweep_reps // 3)
                run = run_closed_loop(factory, MemoryCapture([sweep_image]), lambda image, i, b=boxes: b, reps, 1,
                                      1, snapshot if kind == "triton" else None)
                sweep.append(summarize(name, kind, run, cells_requested=cells, concurrency=1, capture="memory",
                                       boxes="given", frame_id=frames.ids[sweep_frame], **extra))

        # -- optional profile of the server steps and this client under load
        if args.profile:
            result["profile"] = profile_run(args, plan, server_proc, triton_factory, capture, localised, snapshot)

    result.update({"runs": runs, "cell_sweep": sweep, "not_run": not_run, "checks": checks,
                   "load_avg_end": [round(v, 2) for v in os.getloadavg()],
                   "elapsed_s": round(time.time() - started, 1)})
    result["analysis"] = analyse(result)
    return result


def check_transport(transport: str, candidate: Runners, reference: Runners | None, frames: Frames,
                    boxes: np.ndarray, backend: str) -> dict[str, Any]:
    """Triton over one transport against in-process ONNX Runtime on the first frame (the comparator, fp32 tolerance;
    PyTorch steps on CUDA may use TF32 convolutions: the tf32 one). Raises UserError when they differ."""
    sample = Sample(frames.ids[0], frames.images[0], boxes, [None] * len(boxes), "localised")
    try:
        if reference is None:
            return {"cells": int(len(run_pipeline(candidate, sample.frame, sample.boxes)[LABELS.name]))}
        tolerance = TOLERANCES["fp32" if backend == "onnxruntime" else "tf32"]
        comparison = compare(reference, candidate, [sample])
    finally:
        for runner in candidate:
            runner.close()
    failures = comparison.failures_for(tolerance)
    if failures:
        raise UserError(f"Triton over {transport} differs from in-process ONNX Runtime: {'; '.join(failures)}")
    return {"cells": comparison.nodes, "max_abs_diff_vs_ort": comparison.max_prob_diff,
            "labels_equal": comparison.agreeing_nodes == comparison.nodes, "atol": tolerance.max_prob_diff,
            "ok": True}


def ort_cuda_baselines(repository: Path, threads: int, work_dir: Path, frames: Frames, boxes: list[np.ndarray],
                       reference: Runners, provider: str = ORT_CUDA
                       ) -> tuple[list[Baseline], dict[str, Any], list[dict]]:
    """ONNX Runtime's CUDA provider on the exported fp32 graphs and on the FP16 graphs that TensorRT's fp16 engines
    are built from (`build_engines.build.network_onnx`). Each is first compared with `reference` (ONNX Runtime fp32
    on the CPU, the runners the Triton checks use) over every frame (tf32 and fp16 tolerances; a miss is recorded,
    not fatal). Returns (rows, checks, not-run rows): a graph that does not start on `provider` is a not-run row with
    ONNX Runtime's reason."""
    reason = ort_cuda_status() if provider == ORT_CUDA else None
    if reason:
        return [], {}, [{"name": "onnxruntime CUDA in-process", "reason": reason}]
    import onnx

    from leukograph.build_engines.build import network_onnx  # onnx and the fp16 converter, only here

    fp32_paths = {s.name: stage_path(repository, s, MODEL_FILES["onnxruntime"]) for s in SERVED_STAGES}

    def fp16_paths() -> dict[str, Path]:
        return {s.name: network_onnx(s, fp32_paths[s.name], "fp16", work_dir, {}) for s in SERVED_STAGES}

    samples = [Sample(frame_id, image, frame_boxes, [None] * len(frame_boxes), "localised")
               for frame_id, image, frame_boxes in zip(frames.ids, frames.images, boxes)]
    label = "CUDA" if provider == ORT_CUDA else provider
    rows: list[Baseline] = []
    checks: dict[str, Any] = {}
    not_run: list[dict] = []
    for precision, graphs, tolerance_name, concurrencies in (("fp32", lambda: fp32_paths, "tf32", (1, 2)),
                                                            ("fp16", fp16_paths, "fp16", (1,))):
        name = f"onnxruntime {label} in-process" + (", FP16 graphs" if precision == "fp16" else "")
        try:
            paths = graphs()
        except (RuntimeError, onnx.checker.ValidationError) as exc:  # the fp16 converter of this onnxruntime
            not_run.append({"name": name, "reason": f"FP16 conversion failed: {exc}"})
            continue

        def make(detector: bool, paths: dict[str, Path] = paths) -> Runners:
            return [OrtRunner(paths[s.name], s, threads, provider=provider)
                    for s in (SERVED_STAGES if detector else STAGES)]

        try:
            comparison = compare(reference, make(False), samples)
        except UserError as exc:
            not_run.append({"name": name, "reason": str(exc)})
            continue
        tolerance = TOLERANCES[tolerance_name]
        failures = comparison.failures_for(tolerance)
        checks[f"onnxruntime_{label.lower()}_{precision}"] = {
            "against": "onnxruntime fp32 on the CPU, every frame, localised boxes", "frames": comparison.frames,
            "cells": comparison.nodes, "label_agreement": round(comparison.class_agreement, 5),
            "max_abs_diff_vs_ort": comparison.max_prob_diff, "min_embedding_cosine": comparison.min_embedding_cosine,
            "tolerance": tolerance_name, "failures": failures, "ok": not failures}
        extra = {"provider": provider, "precision": precision}
        rows += [(name, "ort", lambda k, make=make: make(False), concurrencies, extra),
                 (f"{name} with the detector", "ort", lambda k, make=make: make(True), (1,),
                  {**extra, "localizer": "detector"})]
    return rows, checks, not_run


def profile_run(args: argparse.Namespace, plan: Plan, server_proc: subprocess.Popen | None,
                triton_factory: Callable, capture: Any, localised: Callable, snapshot: Callable) -> dict:
    """py-spy on both python-backend stubs and on this client during a gRPC run at concurrency 2."""
    if server_proc is None:
        return {"error": "profiling needs the server started by the benchmark (not --grpc-url)"}
    pids = stub_pids(server_proc.pid)
    pids["client"] = os.getpid()
    folder = Path(tempfile.mkdtemp(prefix="leukograph-bench-pyspy-"))
    duration = 8.0
    spies = {name: start_pyspy(pid, duration, folder / f"{name}.txt") for name, pid in pids.items()}
    if any(s is None for s in spies.values()):
        return {"error": "py-spy not found (pip install py-spy)"}
    time.sleep(0.5)
    transport = "grpc"
    concurrency = 2
    deadline = time.perf_counter() + duration
    done = 0
    while time.perf_counter() < deadline:
        run_closed_loop(triton_factory(transport), capture, localised, 24, concurrency, 0, None)
        done += 24
    out: dict[str, Any] = {"transport": transport, "concurrency": concurrency, "frames": done, "rate_hz": 200}
    for name, spy in spies.items():
        _, err = spy.communicate(timeout=60)
        summary = summarize_pyspy(folder / f"{name}.txt")
        if spy.returncode not in (0, None) and "error" not in summary:
            summary["stderr"] = err.decode(errors="replace")[-300:]
        out[name] = summary
    shutil.rmtree(folder, ignore_errors=True)
    return out


