"""What each row runs for one frame: a list of runners (`leukograph.deploy.runners`), chained by `run_pipeline`.

Every row builds its runners with one of the factories below; the load loop calls `run_pipeline(runners, frame,
boxes)` and reads each runner's `stage_timings()`. The only runner defined here is the seed-style embedder, a
baseline that exists for the comparison alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leukograph.client.contract import (
    BOXES,
    CELL_GRAPH,
    CLASSES,
    CROP_EMBEDDER,
    EMBEDDINGS,
    FRAME,
    FRAME_SIZE,
    MODEL_FILES,
    SERVED_STAGES,
    STAGES,
    stage_path,
)
from leukograph.client.errors import UserError
from leukograph.deploy.runners import ORT_CPU, BaseRunner, OrtRunner, TorchRunner, TritonRunner, TrtRunner
from leukograph.deploy.runners.base import Tensors

Runners = list[BaseRunner]


def triton_runners(url: str, transport: str, localizer: str = "client") -> Runners:
    """The served pipeline over `transport` (grpc, grpc-shm, http, http-shm), through `TritonPipelineClient`:
    `leukocyte_pipeline_boxes` with the frame's boxes (localizer client), or bare frames to `leukocyte_pipeline`,
    whose detector finds the cells (localizer server; the loop's boxes are None)."""
    protocol, _, shm = transport.partition("-")
    return [TritonRunner(url, protocol, shm == "shm", name="triton", localizer=localizer)]


def ort_runners(repository: Path, threads: int, provider: str = ORT_CPU, detector: bool = False) -> Runners:
    """The exported ONNX files in ONNX Runtime, in-process, no server (sessions are thread-safe): crop_embedder and
    cell_graph, after the cell_detector when `detector` (then fed bare frames)."""
    stages = SERVED_STAGES if detector else STAGES
    return [OrtRunner(stage_path(repository, stage, MODEL_FILES["onnxruntime"]), stage, threads, provider=provider)
            for stage in stages]


def torch_stage_modules(weights: Path, threads: int) -> tuple:
    """(CropEmbedderStage, CellGraphStage) of the checkpoints, as `classify` runs them."""
    import torch

    from leukograph.training.checkpoints import load_models
    from leukograph.training.models import CellGraphStage, CropEmbedderStage

    torch.set_num_threads(threads)
    embedder, gnn, _ = load_models(weights)
    return CropEmbedderStage(embedder), CellGraphStage(gnn)


def torch_runners(weights: Path, threads: int, device: str = "cpu") -> Runners:
    """Our model in PyTorch eager, all of a frame's cells in one batch."""
    crop_stage, graph_stage = torch_stage_modules(weights, threads)
    return [TorchRunner(crop_stage, CROP_EMBEDDER, device), TorchRunner(graph_stage, CELL_GRAPH, device)]


class SeedStyleEmbedder(BaseRunner):
    """crop_embedder, seed-paper style: one forward call per cell crop (crop + CNN). The frame is converted to
    float once per frame, not per cell."""

    def __init__(self, crop_stage, device: str = "cpu") -> None:
        super().__init__(CROP_EMBEDDER, name="crop_embed_per_cell")
        import torch

        from leukograph.training.models import crop_cells

        self.torch, self.crop_cells = torch, crop_cells
        self.device = torch.device(device)
        self.embedder = crop_stage.embedder.eval().to(self.device)

    def infer_impl(self, feed: Tensors) -> Tensors:
        torch = self.torch
        frame, boxes = feed[FRAME.name], feed[BOXES.name]
        with torch.no_grad():
            image = torch.from_numpy(frame).to(self.device).to(torch.float32)  # once per frame
            boxes_t = torch.from_numpy(boxes).to(self.device)
            size = self.embedder.crop_size
            embeddings = torch.cat([self.embedder(self.crop_cells(image, boxes_t[i:i + 1], size=size))[0]
                                    for i in range(len(boxes))])
            return {EMBEDDINGS.name: embeddings.cpu().numpy(),
                    FRAME_SIZE.name: np.array(frame.shape[:2], FRAME_SIZE.np_dtype)}


def seed_style_runners(weights: Path, threads: int, device: str = "cpu") -> Runners:
    crop_stage, graph_stage = torch_stage_modules(weights, threads)
    return [SeedStyleEmbedder(crop_stage, device), TorchRunner(graph_stage, CELL_GRAPH, device)]


def tensorrt_runners(plans: Path) -> Runners:
    """The two TensorRT plans (GPU machines with TensorRT only)."""
    return [TrtRunner(_plan_path(plans, stage), stage) for stage in (CROP_EMBEDDER, CELL_GRAPH)]


def _plan_path(plans: Path, stage) -> Path:
    for candidate in (stage_path(plans, stage, MODEL_FILES["tensorrt"]), plans / f"{stage.name}.plan"):
        if candidate.exists():
            return candidate
    raise UserError(f"no plan for {stage.name} under {plans} (expected {stage.name}/1/model.plan or "
                    f"{stage.name}.plan)")


def postprocess(probs: np.ndarray, labels: np.ndarray) -> list[tuple[str, float]]:
    """Labels in hand: class name and confidence per cell."""
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0, np.float32)
    return [(CLASSES[int(k)], float(c)) for k, c in zip(labels, confidence)]
