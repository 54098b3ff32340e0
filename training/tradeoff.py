"""`leukograph tradeoff CNN.pt...`: accuracy per test source against CPU cost per cell, one row per CNN checkpoint.

For choosing the crop embedder's capacity (issue: "Capacity within the latency budget"). Each checkpoint's CNN alone
(no GNN, so checkpoints trained without one compare fairly) classifies the localiser's WBC boxes:
4-class TEST per image, PBC test per image (five WBC classes and all seven nucleated) and BCCD held-out WBC nodes.
Cost: the exported crop_embedder stage in ONNX Runtime, one thread, 128 cells of a held-out BCCD frame, median ms
per cell. Writes JSON and the README's `tradeoff` section.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from leukograph.client.contract import BOXES, CROP_EMBEDDER, FRAME, WBC_CLASSES
from leukograph.client.errors import UserError
from leukograph.client.images import read_image
from leukograph.client.localize import WBC
from leukograph.deploy.bench.frames import localise_boxes, tiled_boxes
from leukograph.deploy.paths import REPO_ROOT, shown_path
from leukograph.deploy.readme import replace_section
from leukograph.deploy.runners import OrtRunner
from leukograph.training.augment import stored_to_served
from leukograph.training.cells import FrameCells, build_cells
from leukograph.training.checkpoints import load_checkpoint
from leukograph.training.datasets import load_bccd, load_four_class, load_pbc, split_frames
from leukograph.training.export import export_stage
from leukograph.training.metrics import image_prediction
from leukograph.training.models import STORE_ZOOM, CropEmbedder, CropEmbedderStage

NUM_WBC = len(WBC_CLASSES)
TIMING_CELLS = 128
TIMING_REPS = 20


def load_cnn(path: Path) -> CropEmbedder:
    ckpt = load_checkpoint(path)
    model = CropEmbedder(**ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


@torch.no_grad()
def wbc_probs(model: CropEmbedder, frames: list[FrameCells]) -> list[np.ndarray]:
    """CNN probabilities of each frame's WBC-kind cells (all cells where the localiser drew no WBC box)."""
    out = []
    for frame in frames:
        chosen = np.flatnonzero(frame.kinds == WBC)
        chosen = chosen if len(chosen) else np.arange(len(frame.labels))
        if len(chosen) == 0:
            out.append(np.zeros((0, model.classifier.out_features), np.float32))
            continue
        _, logits = model(stored_to_served(frame.crops[chosen], STORE_ZOOM))
        out.append(torch.softmax(logits, 1).numpy())
    return out


def image_accuracy(probs: list[np.ndarray], truth: list[int], classes: int) -> float:
    return float(np.mean([image_prediction(p, classes)[0] == t for p, t in zip(probs, truth)])) if truth else 0.0


def ms_per_cell(model: CropEmbedder, frame: np.ndarray, boxes: np.ndarray) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = export_stage(CropEmbedderStage(model), CROP_EMBEDDER, Path(tmp) / "crop_embedder.onnx")
        runner = OrtRunner(path, CROP_EMBEDDER, threads=1)
        feed = {FRAME.name: frame, BOXES.name: boxes}
        runner.infer(feed)
        times = []
        for _ in range(TIMING_REPS):
            started = time.perf_counter()
            runner.infer(feed)
            times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000.0 / len(boxes)


class TestSets:
    """The test sources' localised cells, loaded once for every checkpoint."""

    def __init__(self, data_root: str | None) -> None:
        self.four_items = load_four_class(data_root, "TEST")
        self.four = build_cells(self.four_items, "4class-test")
        self.pbc = build_cells([img for img in load_pbc(data_root) if img.split == "test"], "pbc-test")
        held = split_frames(data_root).held_out
        bccd_meta = [f for f in load_bccd(data_root) if f.frame_id in held]
        self.bccd = build_cells(bccd_meta, "bccd-heldout")
        self.frame = read_image(bccd_meta[0].image_path)
        self.boxes = tiled_boxes(self.frame, localise_boxes(self.frame), TIMING_CELLS)


def evaluate_checkpoint(path: Path, sets: TestSets) -> dict:
    model = load_cnn(path)
    pbc_probs = wbc_probs(model, sets.pbc)
    nucleated = [(p, f.frame_label) for p, f in zip(pbc_probs, sets.pbc) if 0 <= f.frame_label < 7]
    five = [(p, t) for p, t in nucleated if t < NUM_WBC]
    bccd = [(p, f.frame_label) for p, f in zip(wbc_probs(model, sets.bccd), sets.bccd)
            if 0 <= f.frame_label < NUM_WBC]
    ckpt = load_checkpoint(path)
    return {
        "checkpoint": shown_path(path), "width": ckpt["config"].get("width"), "epoch": ckpt["epoch"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "four_class_test_images": image_accuracy(wbc_probs(model, sets.four),
                                                 [WBC_CLASSES.index(i.label) for i in sets.four_items], NUM_WBC),
        "pbc_test_five_wbc": image_accuracy(*zip(*five), NUM_WBC) if five else 0.0,
        "pbc_test_nucleated": image_accuracy(*zip(*nucleated), 7) if nucleated else 0.0,
        "bccd_heldout_images": image_accuracy(*zip(*bccd), NUM_WBC) if bccd else 0.0,
        "ms_per_cell_ort_1_thread": ms_per_cell(model, sets.frame, sets.boxes),
    }


def readme_body(result: dict, json_path: Path) -> str:
    lines = [f"Generated by `leukograph tradeoff` from `{shown_path(json_path)}` (CNN only, crop {result['crop']} px; "
             f"load average {result['load_avg'][0]:.1f} on {result['cores']} cores while timing).", "",
             "| CNN width | parameters | 4-class TEST images | PBC test, 5 WBC | PBC test, 7 nucleated | "
             "BCCD held-out frames | ms per cell (ORT, 1 thread, 128 cells) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['width']} | {row['parameters']:,} | {row['four_class_test_images']:.1%} | "
                     f"{row['pbc_test_five_wbc']:.1%} | {row['pbc_test_nucleated']:.1%} | "
                     f"{row['bccd_heldout_images']:.1%} | {row['ms_per_cell_ort_1_thread']:.2f} |")
    return "\n".join(lines)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Accuracy per source against ms per cell, per CNN checkpoint",
                                     add_help=add_help)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="cnn.pt files (e.g. one per width)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "docs" / "results" / "tradeoff.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README's tradeoff section")
    return parser


def main(args: argparse.Namespace) -> int:
    missing = [str(p) for p in args.checkpoints if not p.exists()]
    if missing:
        raise UserError(f"checkpoint(s) not found: {', '.join(missing)}")
    torch.set_num_threads(args.threads)
    from leukograph.client.contract import CROP_SIZE

    sets = TestSets(args.data_root)
    rows = [evaluate_checkpoint(path, sets) for path in args.checkpoints]
    result = {"crop": CROP_SIZE, "cores": os.cpu_count(), "load_avg": list(os.getloadavg()), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(readme_body(result, args.json))
    if not args.no_readme:
        replace_section("tradeoff", readme_body(result, args.json))
    return 0
