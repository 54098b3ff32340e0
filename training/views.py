"""Test-time views: the eight flips and quarter-turns of a cell (the dihedral group of the square).

A blood cell has no "up": the CNN is trained on crops under any rotation and flip, and averaging its embeddings over
the eight views of each crop steadies the answer. `leukograph classify` does so for each image's `white_cell`
answer and `leukograph evaluate` reports it as its own row. Only the cells that answer are viewed
(`viewed_rows`); the served pipeline runs the one identity view (the stream's per-cell labels).

The same view exists twice, and the two agree (tests/test_views.py): on crops [..., H, W] (`view_crops`, for
evaluation's stored crops) and on a frame with its boxes (`view_frame`, so any crop_embedder runner, in-process or
Triton, cuts the viewed crops itself). View k: transpose if k & 4, then mirror left-right if k & 1, then
upside-down if k & 2; view 0 is the identity.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from leukograph.client.contract import CELL_KINDS

VIEWS = 8  # the number of distinct views; `leukograph classify --views` takes 1 or VIEWS


def check_views(views: int) -> int:
    if views not in (1, VIEWS):
        raise ValueError(f"views must be 1 (served crop only) or {VIEWS} (every flip and quarter-turn), got {views}")
    return views


def viewed_rows(kinds: np.ndarray) -> np.ndarray:
    """The cells read in every view: where `white_cell` looks, the white-cell boxes (every cell when there is none).
    The other cells keep their served embedding, so eight views cost eight CNN passes over one or two cells."""
    wbc = np.asarray(kinds) == CELL_KINDS.index("wbc")
    return np.flatnonzero(wbc) if wbc.any() else np.arange(len(wbc))


def view_crops(crops: Tensor, view: int) -> Tensor:
    """View `view` (0-7) of crops [..., H, W]."""
    if view & 4:
        crops = crops.transpose(-1, -2)
    if view & 1:
        crops = crops.flip(-1)
    if view & 2:
        crops = crops.flip(-2)
    return crops


def view_frame(frame: np.ndarray, boxes: np.ndarray, view: int) -> tuple[np.ndarray, np.ndarray]:
    """View `view` of a frame [H, W, 3] and its boxes [N, 4] (x1, y1, x2, y2 in pixel-edge coordinates): the crops
    `crop_cells` cuts from the result are `view_crops(crops, view)` of the original's (up to float rounding)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if view & 4:
        frame = frame.transpose(1, 0, 2)
        boxes = boxes[:, [1, 0, 3, 2]]
    height, width = frame.shape[:2]
    if view & 1:
        frame = frame[:, ::-1]
        boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
    if view & 2:
        frame = frame[::-1]
        boxes = np.stack([boxes[:, 0], height - boxes[:, 3], boxes[:, 2], height - boxes[:, 1]], axis=1)
    return np.ascontiguousarray(frame), np.ascontiguousarray(boxes, dtype=np.float32)
