"""`leukograph localize-eval`: measure the cell localiser against BCCD boxes.

Per kind: GT count, detections, recall and precision at an IoU threshold (greedy matching, most confident
detection first, as in Pascal VOC); frames/s on one core; the 4-class TEST WBC-found rate; and WBC recall
on single-cell crops (GT WBC box + contract.CROP_MARGIN cut from the frames).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from leukograph.client.boxes import box_iou, greedy_pairs
from leukograph.client.contract import CELL_DETECTOR, CELL_KINDS, CROP_MARGIN, MODEL_FILES, stage_path
from leukograph.client.errors import UserError
from leukograph.client.images import read_image
from leukograph.client.localize import WBC, Cells, detector_cells, localize
from leukograph.deploy.paths import MODEL_REPOSITORY

FRAME_SETS = ("held-out", "train", "all")
LOCALIZERS = ("classical", "detector")
DETECTOR_ONNX = stage_path(MODEL_REPOSITORY, CELL_DETECTOR, MODEL_FILES["onnxruntime"])
SPEED_REPEATS = 3  # timed passes over the speed frames (p50 over all of them)
MOSAIC_SIDES = (2, 4)  # frames per side of the mosaics that stand in for a larger camera frame


def _timed_localize(images: Sequence[np.ndarray]) -> tuple[list[Cells], float]:
    """Localise every image on ONE OpenCV thread; returns the results and frames/s (wall time)."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        start = time.perf_counter()
        cells = [localize(image) for image in images]
        elapsed = time.perf_counter() - start
    finally:
        cv2.setNumThreads(threads)
    return cells, len(images) / max(elapsed, 1e-9)


def evaluate_localizer(frames: Sequence[Any], iou: float = 0.5,
                       images: Sequence[np.ndarray] | None = None) -> dict[str, Any]:
    """Recall/precision per kind at `iou` and one-core frames/s over BCCD frames (`datasets.BccdFrame`).

    `images` (decoded RGB frames, same order) skips decoding when the caller has them already."""
    if images is None:
        images = [read_image(frame.image_path) for frame in frames]
    cells, fps = _timed_localize(images)
    per_kind: dict[str, dict[str, float]] = {}
    for k, kind in enumerate(CELL_KINDS):
        n_gt = n_det = n_tp = 0
        for frame, found in zip(frames, cells):
            gt = np.array([b.box for b in frame.boxes if b.kind == kind], np.float64).reshape(-1, 4)
            sel = found.kinds == k
            n_gt += len(gt)
            n_det += int(sel.sum())
            n_tp += len(greedy_pairs(box_iou(found.boxes[sel], gt), iou, scores=found.scores[sel]))
        per_kind[kind] = {"gt": n_gt, "detections": n_det, "true_positives": n_tp,
                          "recall": n_tp / n_gt if n_gt else float("nan"),
                          "precision": n_tp / n_det if n_det else float("nan")}
    return {"frames": len(frames), "iou": iou, "per_kind": per_kind, "frames_per_s_one_core": fps,
            "cells": cells}


def wbc_found_rates(images: Sequence[np.ndarray]) -> dict[str, float]:
    """Fraction of images with >= 1 WBC and with exactly one (for 4-class images: one labelled WBC each)."""
    counts = np.array([int((localize(image).kinds == WBC).sum()) for image in images])
    n = max(len(counts), 1)
    return {"images": len(counts), "at_least_one_wbc": float((counts >= 1).sum() / n),
            "exactly_one_wbc": float((counts == 1).sum() / n)}


def wbc_crops(frames: Sequence[Any], images: Sequence[np.ndarray],
              margin: float = CROP_MARGIN) -> list[tuple[np.ndarray, np.ndarray]]:
    """Single-cell crops: each GT WBC box + `margin` (fraction of its longer side) on every side, clipped to
    the frame; returns (crop, WBC box in crop coordinates)."""
    out = []
    for frame, image in zip(frames, images):
        h, w = image.shape[:2]
        for b in frame.boxes:
            if b.kind != "wbc":
                continue
            x1, y1, x2, y2 = b.box
            pad = margin * max(x2 - x1, y2 - y1)
            cx1, cy1 = int(max(0, np.floor(x1 - pad))), int(max(0, np.floor(y1 - pad)))
            cx2, cy2 = int(min(w, np.ceil(x2 + pad))), int(min(h, np.ceil(y2 + pad)))
            out.append((image[cy1:cy2, cx1:cx2].copy(), np.array([x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1])))
    return out


def crop_recall(crops: Sequence[tuple[np.ndarray, np.ndarray]], iou: float = 0.5) -> dict[str, float]:
    """Fraction of crops where some WBC box has IoU >= iou with the crop's WBC."""
    hits = 0
    for crop, gt in crops:
        found = localize(crop)
        sel = found.kinds == WBC
        if sel.any() and box_iou(found.boxes[sel], gt).max() >= iou:
            hits += 1
    return {"crops": len(crops), "wbc_recall": hits / max(len(crops), 1)}


class OnnxDetector:
    """The exported cell_detector graph in ONNX Runtime (CPU, `threads` intra-op threads): image -> Cells."""

    def __init__(self, path: Path = DETECTOR_ONNX, threads: int = 2) -> None:
        import onnxruntime as ort

        if not Path(path).exists():
            raise UserError(f"no detector model at {path}; run `leukograph export-detector` first")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def outputs(self, image: np.ndarray) -> list[np.ndarray]:
        """BOXES, SCORES, KINDS, CELL_COUNT for one RGB uint8 image."""
        return self.session.run(None, {CELL_DETECTOR.inputs[0].name: np.ascontiguousarray(image, np.uint8)})

    def ranked_and_accepted(self, image: np.ndarray) -> tuple[Cells, Cells]:
        """Every candidate (for AP) and the cells above the in-graph threshold."""
        boxes, scores, kinds, count = self.outputs(image)
        return detector_cells(boxes, scores, kinds, count, keep_padding=True), detector_cells(boxes, scores, kinds,
                                                                                               count)


def ensure_detector_exported(repository: Path = MODEL_REPOSITORY) -> Path:
    """Export the committed detector weights when the repository's ONNX file is missing, older than them or exported
    by other code (`leukograph serve`'s rule, `paths.export_stale`), keeping the field scale it was exported with."""
    from leukograph.deploy.paths import DETECTOR_WEIGHTS, WEIGHTS_DIR, export_stale

    path = stage_path(repository, CELL_DETECTOR, MODEL_FILES["onnxruntime"])
    weights = WEIGHTS_DIR / DETECTOR_WEIGHTS
    if weights.exists() and export_stale(path, [weights]) is not None:
        from leukograph.training.detector import export_detector, load_detector  # torch only when exporting

        export_detector(load_detector(WEIGHTS_DIR), path)  # at the scale it was exported with
    return path


def _classical_ranked_and_accepted(image: np.ndarray) -> tuple[Cells, Cells]:
    cells = localize(image)
    return cells, cells


def average_precision(ranked: Sequence[tuple[np.ndarray, np.ndarray]], truths: Sequence[np.ndarray],
                      iou: float = 0.5) -> float:
    """Pascal VOC all-point AP of one kind: per image (boxes, scores) of the detections against GT boxes."""
    n_truth = sum(len(t) for t in truths)
    if n_truth == 0:
        return float("nan")
    scores, hits = [], []
    for (boxes, score), truth in zip(ranked, truths):
        matched = np.zeros(len(boxes), bool)
        for row, _ in greedy_pairs(box_iou(boxes, truth), iou, scores=score):
            matched[row] = True
        scores.append(np.asarray(score, np.float64))
        hits.append(matched)
    if not scores:
        return 0.0
    order = np.argsort(-np.concatenate(scores), kind="stable")
    hit = np.concatenate(hits)[order]
    tp, fp = np.cumsum(hit), np.cumsum(~hit)
    recall = np.concatenate([[0.0], tp / n_truth, [1.0]])
    precision = np.concatenate([[0.0], tp / np.maximum(tp + fp, 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


@dataclass
class BoxSet:
    """Images with ground-truth boxes: (image, [n,4] boxes, [n] kind indices) per item."""

    name: str
    items: list[tuple[np.ndarray, np.ndarray, np.ndarray]]


def score_box_set(box_set: BoxSet, localizer: Callable[[np.ndarray], tuple[Cells, Cells]],
                  iou: float = 0.5) -> dict[str, Any]:
    """Per kind: AP@iou over every candidate, recall/precision of the accepted cells, GT and detection counts."""
    results = [localizer(image) for image, _, _ in box_set.items]
    out: dict[str, Any] = {"images": len(box_set.items)}
    for k, kind in enumerate(CELL_KINDS):
        truths = [boxes[kinds == k] for _, boxes, kinds in box_set.items]
        ranked = [(r.boxes[r.kinds == k], r.scores[r.kinds == k]) for r, _ in results]
        n_tp = n_det = 0
        for (_, accepted), truth in zip(results, truths):
            sel = accepted.kinds == k
            n_det += int(sel.sum())
            n_tp += len(greedy_pairs(box_iou(accepted.boxes[sel], truth), iou, scores=accepted.scores[sel]))
        n_truth = sum(len(t) for t in truths)
        out[kind] = {"ap50" if iou == 0.5 else f"ap{round(iou * 100)}": average_precision(ranked, truths, iou),
                     "recall": n_tp / n_truth if n_truth else float("nan"),
                     "precision": n_tp / n_det if n_det else float("nan"), "gt": n_truth, "detections": n_det}
    return out


def _holds_centre(boxes: np.ndarray, height: int, width: int) -> bool:
    cx, cy = width / 2.0, height / 2.0
    return bool(((boxes[:, 0] <= cx) & (cx <= boxes[:, 2]) & (boxes[:, 1] <= cy) & (cy <= boxes[:, 3])).any())


def white_cell_found(images: Sequence[np.ndarray], localizer: Callable[[np.ndarray], tuple[Cells, Cells]],
                     centred: bool) -> dict[str, Any]:
    """Share of images where an accepted WBC box holds the image centre (`centred`: single-cell crops such as PBC)
    or where at least one WBC is found (4-class images, no boxes)."""
    hits = 0
    for image in images:
        accepted = localizer(image)[1]
        wbc = accepted.boxes[accepted.kinds == WBC]
        hits += _holds_centre(wbc, *image.shape[:2]) if centred else len(wbc) > 0
    return {"images": len(images), "wbc": {"found": hits / max(len(images), 1)}}


def box_sets(root: str | None = None, split: str = "test") -> list[BoxSet]:
    """test: BCCD held-out frames against TXL-PBC's re-annotated boxes (the 37 marked evaluation-only) and against
    VOC (all held-out frames), and TXL-PBC's test split per source. Nothing here is ever trained on.
    val: the same for BCCD validation frames (re-annotated boxes where TXL-PBC has them) and TXL-PBC's val split,
    for choosing between training runs without looking at the test sets."""
    from leukograph.training.datasets import held_out_frames, load_bccd, load_txl, split_frames
    from leukograph.training.detector_data import TRAINING_ALLOWED, box_arrays, relabelled_boxes, relabelled_frames

    if split not in ("test", "val"):
        raise UserError(f"--split must be test or val, got {split!r}")
    chosen = held_out_frames(root) if split == "test" else split_frames(root).val
    relabelled = relabelled_frames(root)
    frames = [f for f in load_bccd(root) if f.frame_id in chosen]
    images = {f.frame_id: read_image(f.image_path) for f in frames}
    prefix = "bccd-held-out" if split == "test" else "bccd-val"

    def has_relabelled(frame_id: str) -> bool:
        use = relabelled.get(frame_id)
        return use is not None and (use != TRAINING_ALLOWED if split == "test" else True)

    sets = [BoxSet(f"{prefix}-relabelled", [
        (images[f.frame_id], *box_arrays(relabelled_boxes(f.frame_id, *images[f.frame_id].shape[:2], root=root)))
        for f in frames if has_relabelled(f.frame_id)]),
        BoxSet(f"{prefix}-voc", [(images[f.frame_id], *box_arrays([(b.kind, b.box) for b in f.boxes]))
                                 for f in frames])]
    txl = [img for img in load_txl(root) if img.split == split]
    for source in sorted({img.source for img in txl}):
        sets.append(BoxSet(f"txl-{split}-{source.lower()}", [
            (read_image(img.path), *box_arrays([(b.kind, b.box) for b in img.boxes])) for img in txl
            if img.source == source]))
    return sets


def four_class_images(root: str | None = None, split: str = "test", limit: int = 0) -> list[Path]:
    """test: 4-class TEST; val: 4-class TRAIN images made from BCCD validation frames."""
    from leukograph.training.datasets import load_four_class, split_frames

    if split == "test":
        return _evenly([img.path for img in load_four_class(root, "TEST")], limit)
    val = split_frames(root).val
    return _evenly([img.path for img in load_four_class(root, "TRAIN") if img.source_frame in val], limit)


def pbc_images_not_trained_on(root: str | None = None, limit: int = 0, split: str = "test") -> list[Path]:
    """test: PBC images of the nucleated classes whose bytes are not among the detector's training images (every
    split of PBC's own; TXL-PBC's training images excluded). val: PBC's validation split only."""
    from leukograph.client.contract import NUCLEATED_CLASSES
    from leukograph.training.datasets import load_pbc, load_txl

    trained = {img.sha1 for img in load_txl(root) if img.split == "train"}
    paths = [img.path for img in load_pbc(root) if img.label in NUCLEATED_CLASSES and img.sha1 not in trained
             and (split == "test" or img.split == "val")]
    return _evenly(paths, limit)


def _evenly(items: list, limit: int) -> list:
    return items[:: max(1, len(items) // limit)][:limit] if limit > 0 else items


def speed(localizer: Callable[[np.ndarray], Any], images: Sequence[np.ndarray]) -> dict[str, float]:
    """Per-frame wall time over SPEED_REPEATS passes (after one warm-up frame): p50 ms and frames/s."""
    localizer(images[0])
    times = []
    for _ in range(SPEED_REPEATS):
        for image in images:
            start = time.perf_counter()
            localizer(image)
            times.append(time.perf_counter() - start)
    return {"p50_ms": float(np.median(times) * 1000), "frames_per_s": float(len(times) / sum(times)),
            "frames": len(images), "frame_size": "x".join(str(v) for v in images[0].shape[1::-1])}


def mosaic_set(box_set: BoxSet, side: int) -> BoxSet:
    """side x side mosaics of consecutive frames of `box_set` (same size), boxes moved with their frame: the same
    cells at the same magnification in a larger camera frame (a 640x480 set becomes 1280x960 or 2560x1920)."""
    items = []
    per = side * side
    for start in range(0, len(box_set.items) - per + 1, per):
        group = box_set.items[start:start + per]
        height, width = group[0][0].shape[:2]
        rows = [np.concatenate([image for image, _, _ in group[r * side:(r + 1) * side]], axis=1) for r in range(side)]
        shifts = [np.array([c * width, r * height] * 2, np.float32) for r in range(side) for c in range(side)]
        items.append((np.ascontiguousarray(np.concatenate(rows, axis=0)),
                      np.concatenate([boxes + shift for (_, boxes, _), shift in zip(group, shifts)]),
                      np.concatenate([kinds for _, _, kinds in group])))
    height, width = items[0][0].shape[:2]
    return BoxSet(f"{box_set.name}, {side}x{side} mosaics {width}x{height}", items)


def compare_localizers(localizers: Sequence[str], root: str | None = None, iou: float = 0.5, four_class: int = 0,
                       pbc: int = 0, detector_path: Path = DETECTOR_ONNX, threads: int = 2,
                       split: str = "test") -> dict[str, Any]:
    """Both localisers side by side on every set: {"sets": {set: {localiser: {kind: {ap50, recall, precision}}}},
    "frames_per_s": {localiser: ...}, "speed": {localiser: {p50_ms, ...}}}."""
    runners: dict[str, Callable[[np.ndarray], tuple[Cells, Cells]]] = {}
    for name in localizers:
        if name not in LOCALIZERS:
            raise UserError(f"unknown localiser {name!r}; expected some of {LOCALIZERS}")
        if name == "detector" and Path(detector_path) == DETECTOR_ONNX:
            ensure_detector_exported()
        runners[name] = (OnnxDetector(detector_path, threads).ranked_and_accepted if name == "detector"
                         else _classical_ranked_and_accepted)
    result: dict[str, Any] = {"iou": iou, "sets": {}, "frames_per_s": {}, "speed": {},
                              "threads": {"classical": 1, "detector": threads}}
    sets = box_sets(root, split)
    bccd = sets[1]  # the 640x480 BCCD held-out frames with their VOC boxes
    sets += [mosaic_set(bccd, side) for side in MOSAIC_SIDES]
    for box_set in sets:
        result["sets"][box_set.name] = {name: score_box_set(box_set, run, iou) for name, run in runners.items()}
    four = [read_image(path) for path in four_class_images(root, split, four_class)]
    result["sets"][f"four-class-{split}"] = {name: white_cell_found(four, run, centred=False)
                                             for name, run in runners.items()}
    pbc_images = [read_image(path) for path in pbc_images_not_trained_on(root, pbc, split)]
    result["sets"]["pbc" if split == "test" else "pbc-val"] = {
        name: white_cell_found(pbc_images, run, centred=True) for name, run in runners.items()}
    frames = [image for image, _, _ in bccd.items]
    threads_before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        for name, run in runners.items():
            result["speed"][name] = speed(run, frames)
            result["frames_per_s"][name] = result["speed"][name]["frames_per_s"]
    finally:
        cv2.setNumThreads(threads_before)
    result["load_average_1min"] = os.getloadavg()[0]  # other work on the machine slows the timings above
    result["cpu_cores"] = os.cpu_count()
    return result


def comparison_table(result: dict[str, Any]) -> str:
    """Markdown: per set and kind, AP@0.5 / recall / precision of each localiser; found rates; speed."""
    names = list(result["frames_per_s"])
    lines = ["| set | kind | " + " | ".join(f"{n} AP@0.5 | {n} recall | {n} precision" for n in names) + " |",
             "|---|---|" + "---|" * (3 * len(names))]
    found = []
    for set_name, per in result["sets"].items():
        first = per[names[0]]
        if "found" in first.get("wbc", {}):
            found.append(f"| {set_name} ({first['images']} images) | " +
                         " | ".join(f"{per[n]['wbc']['found']:.3f}" for n in names) + " |")
            continue
        for kind in CELL_KINDS:
            if not first[kind]["gt"]:
                continue
            cells = [f"{per[n][kind]['ap50']:.3f} | {per[n][kind]['recall']:.3f} | {per[n][kind]['precision']:.3f}"
                     for n in names]
            lines.append(f"| {set_name} ({first['images']}) | {kind} ({first[kind]['gt']}) | " + " | ".join(cells)
                         + " |")
    lines += ["", "White cell found (a WBC box on the centred cell for PBC; at least one WBC for 4-class images):", "",
              "| set | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)] + found
    lines += [""] + [f"- {n}: p50 {s['p50_ms']:.1f} ms per {s['frame_size']} frame, {s['frames_per_s']:.1f} frames/s "
                     f"({result['threads'][n]} thread{'s' if result['threads'][n] > 1 else ''})"
                     for n, s in result["speed"].items()]
    if "load_average_1min" in result:
        busy = " (other jobs running)" if result["load_average_1min"] >= result["cpu_cores"] else ""
        lines.append(f"- timed on {result['cpu_cores']} CPU cores at a 1-minute load average of "
                     f"{result['load_average_1min']:.1f}{busy}")
    return "\n".join(lines) + "\n"


def select_frames(which: str, root: str | None = None) -> list[Any]:
    from leukograph.training.datasets import held_out_frames, load_bccd  # torch-free

    if which not in FRAME_SETS:
        raise UserError(f"--frames must be one of {FRAME_SETS}, got {which!r}")
    held = held_out_frames(root)
    frames = load_bccd(root)
    if which == "held-out":
        return [f for f in frames if f.frame_id in held]
    if which == "train":
        return [f for f in frames if f.frame_id not in held]
    return list(frames)


def markdown_table(result: dict, frames: str, iou: float) -> str:
    lines = [f"Localiser on {result['frames']} BCCD {frames} frames, IoU >= {iou}", "",
             "| kind | GT | detections | recall | precision |", "|---|---|---|---|---|"]
    lines += [f"| {kind} | {m['gt']} | {m['detections']} | {m['recall']:.3f} | {m['precision']:.3f} |"
              for kind, m in result["per_kind"].items()]
    fc, cr = result["four_class_test"], result["crops"]
    lines += ["", f"- speed: {result['frames_per_s_one_core']:.1f} frames/s on one core (640x480)",
              f"- 4-class TEST ({fc['images']} images): >= 1 WBC found in {fc['at_least_one_wbc']:.3f}, exactly 1 in "
              f"{fc['exactly_one_wbc']:.3f}",
              f"- single-cell crops ({cr['crops']}, GT WBC + {CROP_MARGIN:.0%} margin): WBC found at IoU >= {iou} in "
              f"{cr['wbc_recall']:.3f}"]
    return "\n".join(lines) + "\n"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Measure the cell localiser against BCCD boxes", add_help=add_help)
    parser.add_argument("--data-root", default=None,
                        help="datasets folder (default $LEUKOGRAPH_DATA or ../shared/datasets)")
    parser.add_argument("--frames", default="held-out", choices=FRAME_SETS,
                        help="BCCD frames to measure on: held-out (4-class TEST sources), train (the others), all")
    parser.add_argument("--iou", type=float, default=0.5, help="IoU for a detection to match a GT box")
    parser.add_argument("--four-class", type=int, default=0,
                        help="number of 4-class TEST images to check (evenly spaced; 0 = all)")
    parser.add_argument("--json", nargs="?", const="-", default=None,
                        help="write the results as JSON to this file, or print them (`--json` alone)")
    parser.add_argument("--readme", action="store_true",
                        help="also rewrite the README's localisation and Detector sections")
    parser.add_argument("--localizers", default=",".join(LOCALIZERS),
                        help=f"comma-separated, compared side by side on every set: {', '.join(LOCALIZERS)} "
                             "(empty: only the classical BCCD table)")
    parser.add_argument("--detector", default=str(DETECTOR_ONNX), help="the exported cell_detector ONNX file")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads for the detector")
    parser.add_argument("--pbc", type=int, default=0, help="number of PBC images to check (evenly spaced; 0 = all)")
    parser.add_argument("--split", default="test", choices=("test", "val"),
                        help="test sets (held-out frames, TXL-PBC test) or validation sets (to compare training runs)")
    return parser


def main(args: argparse.Namespace) -> int:
    from leukograph.training.datasets import load_four_class

    if args.readme and args.split != "test":
        raise UserError("--readme writes the test-set figures; leave out --split val")
    if not 0 < args.iou <= 1:
        raise UserError(f"--iou must be in (0, 1], got {args.iou}")
    if "detector" in args.localizers.split(",") and Path(args.detector) != DETECTOR_ONNX and not Path(
            args.detector).exists():
        raise UserError(f"no detector model at {args.detector}; run `leukograph export-detector` first")
    frames = select_frames(args.frames, args.data_root)
    images = [read_image(frame.image_path) for frame in frames]
    result = evaluate_localizer(frames, args.iou, images)
    result.pop("cells")
    test = load_four_class(args.data_root, "TEST")
    if args.four_class > 0:
        test = test[:: max(1, len(test) // args.four_class)][: args.four_class]
    result["four_class_test"] = wbc_found_rates([read_image(img.path) for img in test])
    result["crops"] = crop_recall(wbc_crops(frames, images), args.iou)

    table = markdown_table(result, args.frames, args.iou)
    localizers = [name for name in args.localizers.split(",") if name]
    command = ["leukograph localize-eval"] + [f"--localizers {args.localizers}"] * (
        args.localizers != ",".join(LOCALIZERS)) + [f"--four-class {args.four_class}"] * (args.four_class > 0) + [
        f"--pbc {args.pbc}"] * (args.pbc > 0) + [f"--split {args.split}"] * (args.split != "test")
    comparison = None
    if localizers:
        comparison = compare_localizers(localizers, args.data_root, args.iou, args.four_class, args.pbc,
                                        Path(args.detector), args.threads, args.split)
        result.update(comparison)
    print(table, file=sys.stderr if args.json == "-" else sys.stdout)
    if comparison is not None:
        print(comparison_table(comparison), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.readme:
        from leukograph.deploy.readme import replace_section

        if comparison is None:  # the classical-only table (--localizers "")
            replace_section("localize", f"Generated by `leukograph localize-eval --readme --localizers \"\" --frames "
                                        f"{args.frames}`.\n\n{table}")
        else:
            replace_section("detector", f"Generated by `{' '.join(command + ['--readme'])}`.\n\n"
                                        f"{comparison_table(comparison)}")
    if args.json == "-":
        print(json.dumps(result, indent=2, allow_nan=True))
    elif args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
        print(f"wrote {path}")
    return 0
