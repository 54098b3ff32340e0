"""`leukograph tradeoff CNN.pt...`: accuracy per test source against CPU cost per cell, one row per CNN checkpoint.

For choosing the crop embedder's capacity (issue: "Capacity within the latency budget"): crop side and width, both
read from each checkpoint (the test cells are cut at each checkpoint's crop side). Each checkpoint's CNN alone
(no GNN, so checkpoints trained without one compare fairly) classifies the localiser's WBC boxes:
4-class TEST per image, PBC test per image (five WBC classes and all seven nucleated) and BCCD held-out WBC nodes.
Cost: the exported crop_embedder stage in ONNX Runtime, one thread, 128 cells of a held-out BCCD frame, median ms
per cell. Writes JSON and the README's `tradeoff` section.

`--split validation` instead scores each CNN alone on the validation cells of every source (what `leukograph train`
selects on; no test data), per source: labelled nucleated cells right over the seven nucleated classes, and over the
five white-cell classes. This is how training recipes are compared for an unseen lab: a CNN trained with
`--exclude-source pbc` is scored on PBC's validation cells, which it never saw. A weights folder (cnn.pt + gnn.pt)
gives three rows: its CNN alone, CNN+GNN, and CNN+GNN with the white-cell candidates read in every view (as
`leukograph classify` answers).
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

from leukograph.client.contract import CROP_EMBEDDER, WBC_CLASSES, boxes_feed, white_cell_class
from leukograph.client.errors import UserError
from leukograph.client.images import read_image
from leukograph.client.localize import WBC
from leukograph.deploy.bench.frames import localise_boxes, tiled_boxes
from leukograph.deploy.paths import REPO_ROOT, shown_path
from leukograph.deploy.readme import replace_section
from leukograph.deploy.runners import OrtRunner
from leukograph.training.augment import stored_to_served
from leukograph.training.cells import (
    DEFAULT_LOCALIZER,
    LOCALIZERS,
    FrameCells,
    build_cells,
    use_crop_size,
    use_localizer,
)
from leukograph.training.checkpoints import load_checkpoint, load_cnn, load_models
from leukograph.training.datasets import load_bccd, load_four_class, load_pbc, split_frames
from leukograph.training.embedding import embed_frames
from leukograph.training.evaluate import Models
from leukograph.training.export import export_stage
from leukograph.training.heap import add_keep_freed_memory_argument, apply_keep_freed_memory
from leukograph.training.metrics import NUM_NUCLEATED, image_prediction, labelled_nucleated
from leukograph.training.models import STORE_ZOOM, CropEmbedder, CropEmbedderStage
from leukograph.training.views import VIEW_COUNTS, VIEWS

NUM_WBC = len(WBC_CLASSES)
TIMING_CELLS = 128
TIMING_REPS = 20


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


def ms_per_cell(model: CropEmbedder, frame: np.ndarray, boxes: np.ndarray) -> dict[str, float]:
    """Median wall and CPU milliseconds per cell. With one intra-op thread ONNX Runtime computes on the calling
    thread, so its CPU time is the compute alone, even on a machine busy with other jobs."""
    with tempfile.TemporaryDirectory() as tmp:
        path = export_stage(CropEmbedderStage(model), CROP_EMBEDDER, Path(tmp) / "crop_embedder.onnx")
        runner = OrtRunner(path, CROP_EMBEDDER, threads=1)
        feed = boxes_feed(frame, boxes)
        runner.infer(feed)
        wall, cpu = [], []
        for _ in range(TIMING_REPS):
            started, started_cpu = time.perf_counter(), time.thread_time()
            runner.infer(feed)
            wall.append(time.perf_counter() - started)
            cpu.append(time.thread_time() - started_cpu)
    return {"wall": float(np.median(wall)) * 1000.0 / len(boxes), "cpu": float(np.median(cpu)) * 1000.0 / len(boxes)}


def macs_per_crop(model: CropEmbedder) -> int:
    """Multiply-adds of one crop (the model's crop side) through the CNN's convolutions and linear layers."""
    total = 0

    def count(module: torch.nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * kh * kw * module.in_channels // module.groups
        elif isinstance(module, torch.nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(torch.rand(1, 3, model.crop_size, model.crop_size))
    for hook in hooks:
        hook.remove()
    return total


class TestSets:
    """The test sources' localised cells, cut once per crop side for every checkpoint that takes it."""

    def __init__(self, data_root: str | None) -> None:
        self.four_items = load_four_class(data_root, "TEST")
        self.pbc_items = [img for img in load_pbc(data_root) if img.split == "test"]
        held = split_frames(data_root).held_out
        self.bccd_items = [f for f in load_bccd(data_root) if f.frame_id in held]
        self.frame = read_image(self.bccd_items[0].image_path)
        self.boxes = tiled_boxes(self.frame, localise_boxes(self.frame), TIMING_CELLS)
        self._cells: dict[int, tuple[list[FrameCells], list[FrameCells], list[FrameCells]]] = {}

    def cells(self, crop_size: int) -> tuple[list[FrameCells], list[FrameCells], list[FrameCells]]:
        """(4-class TEST, PBC test, BCCD held-out) cells cut for a `crop_size` CNN."""
        if crop_size not in self._cells:
            use_crop_size(crop_size)
            self._cells[crop_size] = (build_cells(self.four_items, "4class-test"),
                                      build_cells(self.pbc_items, "pbc-test"),
                                      build_cells(self.bccd_items, "bccd-heldout"))
        return self._cells[crop_size]


def evaluate_checkpoint(path: Path, sets: TestSets) -> dict:
    model = load_cnn(path)
    four, pbc, bccd_cells = sets.cells(model.crop_size)
    pbc_probs = wbc_probs(model, pbc)
    nucleated = [(p, f.frame_label) for p, f in zip(pbc_probs, pbc) if 0 <= f.frame_label < 7]
    five = [(p, t) for p, t in nucleated if t < NUM_WBC]
    bccd = [(p, f.frame_label) for p, f in zip(wbc_probs(model, bccd_cells), bccd_cells)
            if 0 <= f.frame_label < NUM_WBC]
    ckpt = load_checkpoint(path)
    return {
        "checkpoint": shown_path(path), "crop": model.crop_size, "width": ckpt["config"].get("width"),
        "epoch": ckpt["epoch"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "four_class_test_images": image_accuracy(wbc_probs(model, four),
                                                 [WBC_CLASSES.index(i.label) for i in sets.four_items], NUM_WBC),
        "pbc_test_five_wbc": image_accuracy(*zip(*five), NUM_WBC) if five else 0.0,
        "pbc_test_nucleated": image_accuracy(*zip(*nucleated), 7) if nucleated else 0.0,
        "bccd_heldout_images": image_accuracy(*zip(*bccd), NUM_WBC) if bccd else 0.0,
        "macs_per_crop": macs_per_crop(model),
        "ms_per_cell_ort_1_thread": ms_per_cell(model, sets.frame, sets.boxes),
    }


class _EmbeddingsOnce(Models):
    """`Models` that embeds each set of frames once, for scoring several CNN blends of the same embeddings."""

    def embed(self, frames: list[FrameCells], stain_strength: float = 0.0, view: int = 0,
              rows: list[np.ndarray] | None = None) -> list[np.ndarray]:
        cache = self.__dict__.setdefault("_embedded", {})
        key = (id(frames), stain_strength, view, rows is None)
        if key not in cache:
            cache[key] = super().embed(frames, stain_strength, view, rows)
        return cache[key]


VALIDATION_SOURCES = ("4class", "bccd", "pbc", "txl-pbc", "txl-raabin-wbc", "txl-bcdd")


def _source_order(source: str) -> int:
    return VALIDATION_SOURCES.index(source) if source in VALIDATION_SOURCES else len(VALIDATION_SOURCES)


def _validation_frames(crop_size: int, data_root: str | None,
                       cells_by_side: dict[int, list[FrameCells]]) -> list[FrameCells]:
    """Every source's validation frames, cut for `crop_size` (built once per crop side)."""
    from leukograph.training.train import load_cell_sets

    if crop_size not in cells_by_side:
        use_crop_size(crop_size)
        cells_by_side[crop_size] = load_cell_sets(data_root, None, 0).val
    return cells_by_side[crop_size]


def validation_row(path: Path, data_root: str | None, cells_by_side: dict[int, list[FrameCells]]) -> dict:
    """One CNN alone on every source's labelled nucleated validation cells (argmax over the nucleated classes)."""
    model = load_cnn(path)
    frames = _validation_frames(model.crop_size, data_root, cells_by_side)
    probs = [frame_probs for _, frame_probs in embed_frames(model, frames)]
    return _validation_scores(shown_path(path), model.crop_size, *labelled_nucleated(frames, probs))


def _validation_scores(name: str, crop: int, truth: np.ndarray, probs: np.ndarray, sources: list[str]) -> dict:
    """Accuracy per source of labelled cells: over the nucleated classes; on the five white-cell classes' cells with
    the nucleated label (`five_wbc`: an IG or NRBC answer is wrong) and with `classify`'s white-cell class, the
    largest of the five white-cell probabilities (`five_wbc_answer`)."""
    predicted, sources = probs[:, :NUM_NUCLEATED].argmax(1), np.asarray(sources)
    answered = white_cell_class(probs)
    row: dict = {"checkpoint": name, "crop": crop, "sources": {}}
    for source in sorted(set(sources), key=_source_order):
        here = sources == source
        y, p, a = truth[here], predicted[here], answered[here]
        five = y < NUM_WBC
        row["sources"][source] = {"cells": int(len(y)), "nucleated": float(np.mean(y == p)),
                                  "five_wbc_cells": int(five.sum()),
                                  "five_wbc": float(np.mean(y[five] == p[five])) if five.any() else None,
                                  "five_wbc_answer": float(np.mean(y[five] == a[five])) if five.any() else None}
    return row


def validation_rows_of_weights(folder: Path, data_root: str | None,
                               cells_by_side: dict[int, list[FrameCells]], views: int = VIEWS,
                               blends: tuple[float, ...] = ()) -> list[dict]:
    """A weights folder (cnn.pt + gnn.pt): one row per model `leukograph evaluate` scores (CNN only, CNN+GNN,
    CNN+GNN with the white-cell candidates read in `views` views), on every source's validation cells; then one row
    per CNN blend in `blends` (`train --cnn-blend`, at the folder's validation temperatures), in `views` views."""
    embedder, gnn, meta = load_models(folder)
    models = _EmbeddingsOnce.of_stages(embedder, gnn, views=views)
    frames = _validation_frames(embedder.crop_size, data_root, cells_by_side)
    probs = models.cell_probs(frames)
    rows = [_validation_scores(f"{shown_path(folder)} ({name})", embedder.crop_size,
                               *labelled_nucleated(frames, probs[name])) for name in models.cell_models]
    calibration = meta["calibration"]
    gnn_temperature = calibration.get("gnn_alone_temperature", calibration.get("gnn_temperature", 1.0))
    for blend in blends:
        gnn.pool_with_cnn(embedder.classifier, blend, gnn_temperature, calibration.get("cnn_temperature", 1.0))
        name = models.cell_models[-1]
        rows.append(_validation_scores(f"{shown_path(folder)} ({name}, CNN blend {blend:g})", embedder.crop_size,
                                       *labelled_nucleated(frames, models.cell_probs(frames)[name])))
    return rows


def validation_body(result: dict) -> str:
    sources = sorted({s for row in result["rows"] for s in row["sources"]}, key=_source_order)
    header = " | ".join(f"{s} 5 WBC | {s} 5 WBC, classify's class | {s} 7 nucleated" for s in sources)
    lines = [f"| checkpoint | {header} |", "|---|" + "---:|" * (3 * len(sources))]
    for row in result["rows"]:
        cells = []
        for source in sources:
            got = row["sources"].get(source) or {}
            cells += [f"{got[key]:.1%} ({got['five_wbc_cells']})" if got.get(key) is not None else "n/a"
                      for key in ("five_wbc", "five_wbc_answer")]
            cells.append(f"{got['nucleated']:.1%} ({got['cells']})" if got else "n/a")
        lines.append(f"| {row['checkpoint']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_body(result: dict, json_path: Path) -> str:
    lines = [f"Generated by `leukograph tradeoff` from `{shown_path(json_path)}` (CNN only; "
             f"load average {result['load_avg'][0]:.1f} on {result['cores']} cores while timing).", "",
             "| crop px | CNN width | parameters | M multiply-adds per crop | 4-class TEST images | PBC test, 5 WBC | "
             "PBC test, 7 nucleated | BCCD held-out frames | CPU ms per cell (ORT, 1 thread, 128 cells) | "
             "wall ms per cell |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        cost = row["ms_per_cell_ort_1_thread"]
        lines.append(f"| {row['crop']} | {row['width']} | {row['parameters']:,} | {row['macs_per_crop'] / 1e6:.1f} | "
                     f"{row['four_class_test_images']:.1%} | {row['pbc_test_five_wbc']:.1%} | "
                     f"{row['pbc_test_nucleated']:.1%} | {row['bccd_heldout_images']:.1%} | {cost['cpu']:.2f} | "
                     f"{cost['wall']:.2f} |")
    return "\n".join(lines)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Accuracy per source against ms per cell, per CNN checkpoint",
                                     add_help=add_help)
    parser.add_argument("checkpoints", nargs="+", type=Path,
                        help="cnn.pt files (e.g. one per width); with --split validation also weights folders (cnn.pt "
                        "+ gnn.pt), scored as CNN only, CNN+GNN and CNN+GNN in --views views")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "docs" / "results" / "tradeoff.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README's tradeoff section")
    parser.add_argument("--views", type=int, choices=VIEW_COUNTS, default=VIEWS,
                        help="with --split validation: the views a weights folder's last row reads (training/views.py)")
    parser.add_argument("--cnn-blend", type=float, nargs="+", default=[], metavar="A",
                        help="with --split validation: also score each weights folder's CNN+GNN with the CNN pooled "
                        "in at each A (`leukograph train --cnn-blend`), in --views views")
    parser.add_argument("--localizer", choices=LOCALIZERS, default=DEFAULT_LOCALIZER,
                        help="with --split validation: who finds the cells: client, the classical localiser the "
                        "released GNN was trained on (default); server, the learned detector `classify` and the "
                        "served ensemble run")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="test: accuracy on the test sources and ms per cell (default); validation: accuracy on "
                        "every source's validation cells (for comparing recipes; writes JSON only)")
    add_keep_freed_memory_argument(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    missing = [str(p) for p in args.checkpoints if not p.exists()]
    if missing:
        raise UserError(f"checkpoint(s) not found: {', '.join(missing)}")
    if any(not 0.0 <= blend < 1.0 for blend in args.cnn_blend):
        raise UserError(f"--cnn-blend values must be in [0, 1), got {args.cnn_blend}")
    apply_keep_freed_memory(args)
    torch.set_num_threads(args.threads)
    if args.split == "validation":
        use_localizer(args.localizer)
        cells_by_side: dict[int, list[FrameCells]] = {}
        rows = []
        for path in args.checkpoints:
            rows += (validation_rows_of_weights(path, args.data_root, cells_by_side, args.views,
                                                tuple(args.cnn_blend)) if path.is_dir()
                     else [validation_row(path, args.data_root, cells_by_side)])
        result = {"split": "validation", "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(validation_body(result))
        return 0
    sets = TestSets(args.data_root)
    rows = [evaluate_checkpoint(path, sets) for path in args.checkpoints]
    result = {"cores": os.cpu_count(), "load_avg": list(os.getloadavg()), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(readme_body(result, args.json))
    if not args.no_readme:
        replace_section("tradeoff", readme_body(result, args.json))
    return 0
