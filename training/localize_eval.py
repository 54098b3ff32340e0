"""`leukograph localize-eval`: measure the cell localiser against BCCD boxes.

Per kind: GT count, detections, recall and precision at an IoU threshold (greedy matching, most confident
detection first, as in Pascal VOC); frames/s on one core; the 4-class TEST WBC-found rate; and WBC recall
on single-cell crops (GT WBC box + contract.CROP_MARGIN cut from the frames).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from leukograph.client.boxes import box_iou, greedy_pairs
from leukograph.client.contract import CELL_KINDS, CROP_MARGIN
from leukograph.client.errors import UserError
from leukograph.client.images import read_image
from leukograph.client.localize import WBC, Cells, localize

FRAME_SETS = ("held-out", "train", "all")


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
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--readme", action="store_true", help="also rewrite the README's localisation section")
    return parser


def main(args: argparse.Namespace) -> int:
    from leukograph.training.datasets import load_four_class

    if not 0 < args.iou <= 1:
        raise UserError(f"--iou must be in (0, 1], got {args.iou}")
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
    print(table)
    if args.readme:
        from leukograph.deploy.readme import replace_section

        command = f"leukograph localize-eval --readme --frames {args.frames}"
        replace_section("localize", f"Generated by `{command}`.\n\n{table}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
        print(f"wrote {path}")
    return 0
