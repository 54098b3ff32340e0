"""The runner protocol (as Polygraphy's `BaseRunner`): `infer(feed) -> outputs`, tensors by contract name.

A runner serves one contract stage (`crop_embedder`, `cell_graph`) or the whole pipeline (`leukocyte_pipeline`, e.g.
Triton). `run_pipeline` chains any list of them over one frame: the only place the stage chain is written.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from leukograph.client.contract import BOXES, CELL_COUNT, FRAME, FRAME_SIZE, STAGES, StageSpec, cell_count

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


def run_pipeline(runners: Sequence[BaseRunner], frame: np.ndarray, boxes: np.ndarray | None = None) -> Tensors:
    """Run the runners in order on one frame, each fed by name from the frame, the boxes (CELL_COUNT = N) and the
    earlier outputs.

    `[crop_embedder, cell_graph]` runners with `boxes`; `[cell_detector, crop_embedder, cell_graph]` or one pipeline
    runner with `boxes=None` (the detector's BOXES, CELL_COUNT feed the rest); returns every tensor (inputs
    included)."""
    tensors: Tensors = {FRAME.name: frame}
    if boxes is not None:
        tensors.update({BOXES.name: boxes, CELL_COUNT.name: cell_count(boxes)})
    for runner in runners:
        empty = no_cell_outputs(runner.stage, tensors)
        tensors.update(runner.infer(tensors) if empty is None else empty)
    return tensors


def no_cell_outputs(stage: StageSpec, inputs: Tensors) -> Tensors | None:
    """A classifier stage's outputs when its inputs say CELL_COUNT = 0 (the detector found nothing), so no graph
    runs over zero cells; None when there are cells (or the stage takes no CELL_COUNT). Used by `run_pipeline` and
    the python-backend steps. FRAME is read for crop_embedder's FRAME_SIZE (its shape only)."""
    count = inputs.get(CELL_COUNT.name)
    if stage not in STAGES or count is None or int(np.asarray(count).reshape(-1)[0]) > 0:
        return None
    return {spec.name: (np.array(inputs[FRAME.name].shape[:2], spec.np_dtype) if spec is FRAME_SIZE
                        else np.zeros([0 if d == -1 else d for d in spec.shape], spec.np_dtype))
            for spec in stage.outputs}
