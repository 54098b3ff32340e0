"""Box geometry shared by the localiser evaluation, the tracker, training labels and engine verification."""

from __future__ import annotations

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a [N,4] against every box in b [M,4] (x1, y1, x2, y2) -> [N, M]; 0 for empty unions."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def greedy_pairs(iou: np.ndarray, threshold: float, scores: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Pairs (row, col) with IoU >= threshold, each row and column at most once, matched greedily.

    Without `scores`: by decreasing IoU (the tracker). With `scores` (one per row, e.g. detection confidences): rows
    in decreasing score each take their best still-free column, as Pascal VOC matches detections to ground truth."""
    if scores is not None:
        return _pairs_by_score(iou, threshold, scores)
    pairs: list[tuple[int, int]] = []
    used_rows: set[int] = set()
    used_cols: set[int] = set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        row, col = (int(i) for i in np.unravel_index(flat, iou.shape))
        if iou[row, col] < threshold:
            break
        if row not in used_rows and col not in used_cols:
            pairs.append((row, col))
            used_rows.add(row)
            used_cols.add(col)
    return pairs


def _pairs_by_score(iou: np.ndarray, threshold: float, scores: np.ndarray) -> list[tuple[int, int]]:
    pairs: list[tuple[int, int]] = []
    free = np.ones(iou.shape[1], bool)
    if not free.size:
        return pairs
    for row in np.argsort(-np.asarray(scores), kind="stable"):
        candidates = np.where(free, iou[row], -1.0)
        col = int(np.argmax(candidates))
        if candidates[col] >= threshold:
            free[col] = False
            pairs.append((int(row), col))
    return pairs
