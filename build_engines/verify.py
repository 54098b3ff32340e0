"""Compare two implementations of the served pipeline on real BCCD held-out frames.

Both sides are runner chains (`leukograph.deploy.runners`: `OrtRunner`, `TrtRunner`, ...), compared by the one
comparator (`leukograph.deploy.runners.compare`). The reference pipeline is ONNX Runtime fp32; the candidate is an FP16
ONNX graph in ORT (tests) or the built TensorRT engines (after a build).

Boxes come from the project's localiser (`leukograph.client.localize.localize`) when it imports, else from the VOC
annotations. A localised box is a *labelled WBC node* when it overlaps (IoU >= 0.5) a VOC WBC box with a subtype.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from leukograph.client.boxes import box_iou
from leukograph.client.contract import CLASSES, MAX_CELLS, MODEL_FILES, STAGES, stage_path
from leukograph.client.images import read_image
from leukograph.deploy.runners import TOLERANCES, OrtRunner, Sample, compare  # noqa: F401  (compare: build's API)

# FP16 tolerances (TensorRT engine or FP16 ONNX vs ONNX Runtime fp32), over all nodes of all held-out frames.
MIN_CLASS_AGREEMENT = TOLERANCES["fp16"].min_class_agreement
MAX_ACCURACY_DROP = TOLERANCES["fp16"].max_accuracy_drop
MAX_PROB_DIFF = TOLERANCES["fp16"].max_prob_diff
MIN_EMBEDDING_COSINE = TOLERANCES["fp16"].min_embedding_cosine
MATCH_IOU = 0.5  # a localised box is a labelled WBC node when it overlaps a labelled VOC WBC box this much


def _localizer() -> Callable | None:
    try:
        from leukograph.client.localize import localize
    except ImportError:
        return None
    return localize


def held_out_samples(box_source: str = "auto", frame_size: tuple[int, int] | None = None,
                     root: Path | None = None) -> list[Sample]:
    """Every BCCD held-out frame (split_frames().held_out present in load_bccd()), with boxes and node labels.

    box_source: "localize", "voc" or "auto" (localize when importable). frame_size (height, width) resizes frames and
    boxes, for engines whose profile fixes another camera size."""
    from leukograph.training.datasets import load_bccd, split_frames

    held = split_frames(root).held_out
    localize = _localizer() if box_source in ("auto", "localize") else None
    if box_source == "localize" and localize is None:
        raise RuntimeError("leukograph.client.localize is not importable")
    samples = []
    for item in load_bccd(root):
        if item.frame_id not in held:
            continue
        frame = read_image(item.image_path)
        voc = np.array([b.box for b in item.boxes], np.float32).reshape(-1, 4)
        voc_labels = [CLASSES.index(b.label) if b.kind == "wbc" and b.label in CLASSES else None for b in item.boxes]
        if localize is not None:
            boxes = np.asarray(localize(frame).boxes, np.float32).reshape(-1, 4)
            labels: list[int | None] = [None] * len(boxes)
            labelled = [i for i, lab in enumerate(voc_labels) if lab is not None]
            if len(boxes) and labelled:
                iou = box_iou(boxes, voc[labelled])
                for j, i_voc in enumerate(labelled):  # each labelled VOC WBC claims its best localised box
                    best = int(np.argmax(iou[:, j]))
                    if iou[best, j] >= MATCH_IOU and labels[best] is None:
                        labels[best] = voc_labels[i_voc]
            source = "localize"
        else:
            boxes, labels, source = voc, voc_labels, "voc"
        boxes, labels = boxes[:MAX_CELLS], labels[:MAX_CELLS]
        if len(boxes) == 0:
            continue
        if frame_size is not None and frame.shape[:2] != tuple(frame_size):
            scale = np.array([frame_size[1] / frame.shape[1], frame_size[0] / frame.shape[0]] * 2, np.float32)
            frame = cv2.resize(frame, (frame_size[1], frame_size[0]), interpolation=cv2.INTER_AREA)
            boxes = boxes * scale
        samples.append(Sample(item.frame_id, np.ascontiguousarray(frame), boxes.astype(np.float32), labels, source))
    return samples


def ort_pipeline(repository: Path, threads: int = 1) -> list[OrtRunner]:
    """ONNX Runtime fp32 runners for the classifier stages' `model.onnx` in `repository`."""
    return [OrtRunner(stage_path(repository, stage, MODEL_FILES["onnxruntime"]), stage, threads) for stage in STAGES]


def detector_agreement(repository: Path, candidate, samples: list[Sample], min_box_iou: float = 0.9,
                       max_count_diff: int = 2) -> dict:
    """A built cell_detector (any runner) against the ONNX graph in ONNX Runtime on the samples' frames: each frame's
    cell count may differ by at most `max_count_diff` (scores at the threshold may cross it), and each reference cell
    must have a candidate box of the same kind with IoU >= `min_box_iou`."""
    from leukograph.client.contract import BOXES, CELL_COUNT, CELL_DETECTOR, FRAME, KINDS

    reference = OrtRunner(stage_path(repository, CELL_DETECTOR, MODEL_FILES["onnxruntime"]), CELL_DETECTOR)
    failures, matched, total = [], 0, 0
    for sample in samples:
        want, got = reference.infer({FRAME.name: sample.frame}), candidate.infer({FRAME.name: sample.frame})
        n_want, n_got = int(want[CELL_COUNT.name][0]), int(got[CELL_COUNT.name][0])
        if abs(n_want - n_got) > max_count_diff:
            failures.append(f"{sample.frame_id}: cell_detector finds {n_got} cells, ONNX Runtime {n_want}")
        if n_want and n_got:
            iou = box_iou(want[BOXES.name][:n_want], got[BOXES.name][:n_got])
            same_kind = want[KINDS.name][:n_want, None] == got[KINDS.name][None, :n_got]
            matched += int(((iou * same_kind).max(axis=1) >= min_box_iou).sum())
        total += n_want
    share = matched / total if total else 1.0
    if share < 0.98:
        failures.append(f"cell_detector: {share:.1%} of ONNX Runtime's cells matched (IoU >= {min_box_iou})")
    return {"frames": len(samples), "cells": total, "matched_share": round(share, 4), "failures": failures}
