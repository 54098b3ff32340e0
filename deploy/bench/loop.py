"""The closed load loop: N client threads, each with its own runners, and one run summarised as JSON."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leukograph.client import contract
from leukograph.client.contract import LABELS, PROBS
from leukograph.client.errors import UserError
from leukograph.client.latency import percentiles
from leukograph.deploy.bench.engines import Runners, postprocess
from leukograph.deploy.bench.statistics import stats_delta, triton_breakdown
from leukograph.deploy.runners import run_pipeline


@dataclass
class RunResult:
    latencies: np.ndarray  # seconds per frame, capture -> labels in hand
    stages: dict[str, np.ndarray]  # seconds per frame per stage
    cells: np.ndarray
    wall_s: float
    server: dict[str, dict[str, float]] = field(default_factory=dict)  # per-request ms from Triton's statistics
    load_avg: tuple[float, float, float] = (0.0, 0.0, 0.0)


def run_closed_loop(make_runners: Callable[[int], Runners], capture: Any,
                    boxes_for: Callable[[np.ndarray, int], np.ndarray | None],
                    frames: int, concurrency: int, warmup: int,
                    snapshot: Callable[[], dict] | None = None) -> RunResult:
    """`concurrency` threads, each with its runners (`make_runners(k)`), take frame indices from one counter until
    `frames` are done.

    Each thread first runs `warmup` frames (not recorded); then the statistics snapshot is taken and the clock starts.
    Localisation runs inside each thread (`boxes_for`), as it would in a client handling several cameras."""
    counter = itertools.count()
    lock = threading.Lock()
    ready = threading.Barrier(concurrency + 1)
    go = threading.Event()
    records: list[tuple[float, dict[str, float], int]] = []
    errors: list[BaseException] = []
    finished: list[float] = []

    def one(runners: Runners, index: int) -> tuple[float, dict[str, float], int]:
        t0 = time.perf_counter()
        image = capture.read(index)
        t1 = time.perf_counter()
        boxes = boxes_for(image, index)  # None: bare frames, the runners' detector finds the cells
        t2 = time.perf_counter()
        stages = {"capture": t1 - t0, "localise": t2 - t1}
        if boxes is None or len(boxes):
            outputs = run_pipeline(runners, image, boxes)
            probs, labels = outputs[PROBS.name], outputs[LABELS.name]
            for runner in runners:
                stages.update(runner.stage_timings())
        else:  # the contract: no request for a frame without cells
            probs, labels = np.zeros((0, contract.NUM_CLASSES), np.float32), np.zeros(0, np.int32)
        t3 = time.perf_counter()
        postprocess(probs, labels)
        t4 = time.perf_counter()
        stages["decode"] = stages.get("decode", 0.0) + (t4 - t3)
        return t4 - t0, stages, len(labels)

    def worker(k: int) -> None:
        runners: Runners = []
        try:
            runners = make_runners(k)
            for j in range(warmup):
                one(runners, k * warmup + j)
            ready.wait()
            go.wait()
            local = []
            while (index := next(counter)) < frames:
                local.append(one(runners, index))
            with lock:
                records.extend(local)
                finished.append(time.perf_counter())
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            ready.abort()
        finally:
            for runner in runners:
                runner.close()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    before = None
    try:
        ready.wait()
        before = snapshot() if snapshot else None
        load_avg = os.getloadavg()
        start = time.perf_counter()
        go.set()
    except threading.BrokenBarrierError:
        pass
    for thread in threads:
        thread.join()
    if errors:
        exc = errors[0]
        if isinstance(exc, UserError):
            raise exc
        raise UserError(f"benchmark run failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    after = snapshot() if snapshot else None
    wall = max(finished) - start
    names = sorted({k for _, s, _ in records for k in s})
    return RunResult(
        latencies=np.array([r[0] for r in records]),
        stages={n: np.array([s.get(n, 0.0) for _, s, _ in records]) for n in names},
        cells=np.array([r[2] for r in records]),
        wall_s=wall,
        server=stats_delta(before, after) if before is not None else {},
        load_avg=load_avg,
    )


def summarize(name: str, kind: str, result: RunResult, **extra: Any) -> dict:
    """One run as JSON: latency percentiles, frames/s, per-stage means, server split, raw latencies."""
    row = {"name": name, "kind": kind, **extra,
           "frames": int(len(result.latencies)), "wall_s": round(result.wall_s, 4),
           "fps": round(len(result.latencies) / result.wall_s, 2) if result.wall_s > 0 else 0.0,
           "latency_ms": percentiles(result.latencies * 1e3, digits=3),
           "cells": {"mean": round(float(result.cells.mean()), 2) if len(result.cells) else 0.0,
                     "min": int(result.cells.min()) if len(result.cells) else 0,
                     "max": int(result.cells.max()) if len(result.cells) else 0},
           "stages_ms": {k: round(float(v.mean() * 1e3), 4) for k, v in result.stages.items()},
           "stages_p50_ms": {k: round(float(np.median(v) * 1e3), 4) for k, v in result.stages.items()},
           "load_avg_1m": round(result.load_avg[0], 2),
           "latencies_ms": [round(float(v) * 1e3, 3) for v in result.latencies]}
    if result.server:
        row["server_ms"] = {m: {k: round(v, 4) for k, v in d.items()} for m, d in result.server.items()}
        row["breakdown_ms"] = triton_breakdown(row)
    return row


