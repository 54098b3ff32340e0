"""`leukograph classify PATH... [--json]`: localise and classify every cell in image files, in-process (PyTorch).

The same localiser and the same two stages (in-graph crop + CNN, dense GNN) that Triton serves, chained by
`leukograph.deploy.runners.run_pipeline` over two `TorchRunner`s.
Python API: `Classifier().classify_image(rgb)` and `Classifier().classify_path(path)` return the JSON objects.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from leukograph.client.contract import CELL_GRAPH, CELL_KINDS, CLASSES, CROP_EMBEDDER, EMBEDDINGS, NUM_CLASSES, PROBS
from leukograph.client.errors import UserError
from leukograph.client.images import ImageError, list_images, read_image, safe_name
from leukograph.client.localize import Cells, localize
from leukograph.deploy.paths import WEIGHTS_DIR
from leukograph.deploy.runners import TorchRunner, run_pipeline
from leukograph.training.checkpoints import load_models
from leukograph.training.models import CellGraphStage, CropEmbedderStage


@dataclass
class Prediction:
    cells: Cells
    probs: np.ndarray  # [N, C] CNN+GNN
    cnn_probs: np.ndarray  # [N, C] CNN alone


class Classifier:
    """In-process CNN+GNN inference on RGB images, with the serving localiser."""

    def __init__(self, weights_dir: Path = WEIGHTS_DIR, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        embedder, gnn, self.meta = load_models(weights_dir)
        self.crop_stage = CropEmbedderStage(embedder).eval()
        self.graph_stage = CellGraphStage(gnn).eval()
        self.runners = [TorchRunner(self.crop_stage, CROP_EMBEDDER), TorchRunner(self.graph_stage, CELL_GRAPH)]

    @torch.no_grad()
    def predict(self, image: np.ndarray, cells: Cells | None = None) -> Prediction:
        cells = localize(image) if cells is None else cells
        if len(cells) == 0:
            empty = np.zeros((0, NUM_CLASSES), np.float32)
            return Prediction(cells, empty, empty)
        outputs = run_pipeline(self.runners, np.ascontiguousarray(image), cells.boxes.astype(np.float32))
        cnn_logits = self.crop_stage.embedder.classifier(torch.from_numpy(outputs[EMBEDDINGS.name]))
        return Prediction(cells, outputs[PROBS.name], torch.softmax(cnn_logits, 1).numpy())

    def classify_image(self, image: np.ndarray) -> list[dict]:
        prediction = self.predict(image)
        return cells_json(prediction.cells, prediction.probs)

    def classify_path(self, path: str | Path) -> dict:
        return {"path": str(path), "cells": self.classify_image(read_image(path))}


def cells_json(cells: Cells, probs: np.ndarray) -> list[dict]:
    """The documented per-cell JSON: box, localiser kind, label (argmax class) and all class probabilities."""
    return [
        {
            "box": [round(float(v), 1) for v in box],
            "kind": CELL_KINDS[int(kind)],
            "label": CLASSES[int(np.argmax(p))],
            "probs": {name: round(float(v), 5) for name, v in zip(CLASSES, p)},
        }
        for box, kind, p in zip(cells.boxes, cells.kinds, probs)
    ]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Localise and classify every cell in images", add_help=add_help)
    parser.add_argument("paths", nargs="+", help="image files (JPEG, PNG, BMP) or directories")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--threads", type=int, default=None)
    return parser


def _summary_line(result: dict) -> str:
    wbc = [c for c in result["cells"] if c["kind"] == "wbc"]
    labels = ", ".join(f"{c['label']} ({max(c['probs'].values()):.2f})" for c in wbc) or "no WBC"
    return f"{safe_name(result['path'])}: {len(result['cells'])} cells; WBC: {labels}"


def main(args: argparse.Namespace) -> int:
    images, problems = list_images(args.paths)
    if not images and not problems:
        raise UserError("no images given")
    classifier = Classifier(args.weights, args.threads) if images else None
    total = len(images) + len(problems)
    for path in images:
        try:
            result = classifier.classify_path(path)
        except ImageError as exc:
            problems.append((path, exc.problem))
            continue
        print(json.dumps(result) if args.json else _summary_line(result), flush=True)
    for path, problem in problems:
        print(f"leukograph classify: error: {safe_name(path)}: {problem}", file=sys.stderr)
    if problems:
        print(f"leukograph classify: {len(problems)} of {total} inputs failed", file=sys.stderr)
        return 1
    return 0
