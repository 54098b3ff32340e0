"""The runner protocol (as Polygraphy's `BaseRunner`): `infer(feed) -> outputs`, tensors by contract name.

A runner serves one contract stage (`crop_embedder`, `cell_graph`) or the whole pipeline (`leukocyte_pipeline`, e.g.
Triton). `run_pipeline` chains any list of them over one frame: the only place the stage chain is written.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from leukograph.client.contract import BOXES, FRAME, StageSpec

Tensors = dict[str, np.ndarray]


class BaseRunner:
    """`infer(feed) -> outputs` for one stage: the feed may hold more tensors than the stage reads; the outputs are
    the stage's outputs by contract name. `last_inference_time()` and `stage_timings()` time the last call."""

    def __init__(self, stage: StageSpec, name: str | None = None) -> None:
        self.stage = stage
        self.name = name or stage.name
        self._last_inference_s = 0.0

    @property
    def input_names(self) -> list[str]:
        return self.stage.input_names

    def infer(self, feed: Tensors) -> Tensors:
        missing = [name for name in self.input_names if name not in feed]
        if missing:
            raise KeyError(f"{self.name}: missing inputs {missing}")
        started = time.perf_counter()
        outputs = self.infer_impl({name: feed[name] for name in self.input_names})
        self._last_inference_s = time.perf_counter() - started
        return outputs

    def infer_impl(self, feed: Tensors) -> Tensors:
        raise NotImplementedError

    def last_inference_time(self) -> float:
        """Seconds the last `infer` took."""
        return self._last_inference_s

    def stage_timings(self) -> dict[str, float]:
        """Seconds of the last call by part (a single part, the runner's name, unless a runner splits it)."""
        return {self.name: self._last_inference_s}

    def close(self) -> None:
        """Free what the runner holds (sessions, connections); idempotent."""

    def __enter__(self) -> BaseRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_pipeline(runners: Sequence[BaseRunner], frame: np.ndarray, boxes: np.ndarray) -> Tensors:
    """Run the runners in order on one frame, each fed by name from the frame, the boxes and the earlier outputs.

    `[crop_embedder, cell_graph]` runners, or one pipeline runner; returns every tensor (inputs included)."""
    tensors: Tensors = {FRAME.name: frame, BOXES.name: boxes}
    for runner in runners:
        tensors.update(runner.infer(tensors))
    return tensors
