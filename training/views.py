"""Test-time views: the eight flips and quarter-turns of a cell (the dihedral group of the square), each at three
apparent sizes.

A blood cell has no "up": the CNN is trained on crops under any rotation and flip, and averaging its embeddings over
the eight views of each crop steadies the answer. Another lab's magnification and localiser also draw the cell
larger or smaller in its crop than the training labs' did, so each flip or turn is also read with the crop region
shrunk and grown around the cell (`VIEW_SCALES`: the cell at 0.8 and 1.25 times its size; the training augmentation
covers the same range). `leukograph classify` averages the `VIEWS` = 24 views for each image's `white_cell` answer
(`--views 8`: the flips and turns alone) and `leukograph evaluate` reports it as its own row. Only the cells that
answer are viewed (`viewed_rows`); the served pipeline runs the one identity view (the stream's per-cell labels).

View v is flip/turn `v % DIHEDRAL` at scale `VIEW_SCALES[v // DIHEDRAL]`; view 0 is the served crop. Flip/turn k:
transpose if k & 4, then mirror left-right if k & 1, then upside-down if k & 2. The same view exists twice, and the
two agree (tests/test_views.py): on a frame with its boxes (`view_frame`, so any crop_embedder runner cuts the viewed
crops itself) and on training's stored crops (`view_stored`, for evaluation). Flips and turns agree exactly; a
scaled view of a stored crop re-samples that crop at the frame's sample positions, so it is the frame's up to one
more bilinear step. A grown region may reach past the frame's edge, which the in-graph crop fills with black as at
every edge (in-process runners take such boxes; the served contract does not).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from leukograph.client.contract import CELL_KINDS
from leukograph.training.augment import stored_to_served
from leukograph.training.models import STORE_ZOOM, served_size

DIHEDRAL = 8  # flips and quarter-turns
VIEW_SCALES = (1.0, 0.8, 1.25)  # the cell's apparent size in each group of DIHEDRAL views (1.0 first: view 0 served)
VIEWS = DIHEDRAL * len(VIEW_SCALES)  # the default of `leukograph classify --views`
VIEW_COUNTS = (1, DIHEDRAL, VIEWS)  # served view only; flips and turns; flips and turns at every scale


def check_views(views: int) -> int:
    if views not in VIEW_COUNTS:
        raise ValueError(f"views must be 1 (served crop only), {DIHEDRAL} (every flip and quarter-turn) or {VIEWS} "
                         f"(each of those at the scales {VIEW_SCALES}), got {views}")
    return views


def view_scale(view: int) -> float:
    return VIEW_SCALES[view // DIHEDRAL]


def viewed_rows(kinds: np.ndarray) -> np.ndarray:
    """The cells read in every view: where `white_cell` looks, the white-cell boxes (every cell when there is none).
    The other cells keep their served embedding, so the views cost one CNN pass each over one or two cells."""
    wbc = np.asarray(kinds) == CELL_KINDS.index("wbc")
    return np.flatnonzero(wbc) if wbc.any() else np.arange(len(wbc))


def view_crops(crops: Tensor, view: int) -> Tensor:
    """Flip/turn `view % DIHEDRAL` of crops [..., H, W] (the scale is `view_stored`'s part)."""
    view %= DIHEDRAL
    if view & 4:
        crops = crops.transpose(-1, -2)
    if view & 1:
        crops = crops.flip(-1)
    if view & 2:
        crops = crops.flip(-2)
    return crops


def view_stored(crops: np.ndarray, view: int, zoom: float = STORE_ZOOM) -> Tensor:
    """View `view` of uint8 stored crops [B, S, S, 3] (a `zoom` times wider view than the served crop, same pixel
    grid) -> float [B, 3, C, C] in 0..1. At scale 1 the served crop exactly; at scale s the C samples of a region
    1/s times the served one, taken where the frame's crop would take them (bilinear within the stored crop)."""
    scale = view_scale(view)
    if scale == 1.0:
        return view_crops(stored_to_served(crops, zoom), view)
    x = stored_to_served(crops, 1.0)  # zoom 1: the whole stored crop, as float
    stored, side = x.shape[-1], served_size(x.shape[-1], zoom)
    if side / scale > stored:
        raise ValueError(f"scale {scale} needs a view {side / scale:.0f} px wide; the stored crops hold {stored}")
    steps = ((torch.arange(side, dtype=torch.float32) + 0.5) - side / 2) / scale  # stored px from the centre
    position = steps * (2.0 / stored)  # align_corners=False: -1 and 1 are the stored crop's outer edges
    grid = torch.stack([position.expand(side, side), position.unsqueeze(1).expand(side, side)], dim=-1)
    resampled = F.grid_sample(x, grid.expand(len(x), side, side, 2), mode="bilinear", padding_mode="border",
                              align_corners=False)
    return view_crops(resampled, view)


def scale_boxes(boxes: np.ndarray, scale: float) -> np.ndarray:
    """Boxes [N, 4] about their centres 1/`scale` times as large: the cell fills `scale` times as much of its crop."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if scale == 1.0:
        return boxes
    centre = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    half = (boxes[:, 2:] - boxes[:, :2]) * (0.5 / scale)
    return np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)


def view_frame(frame: np.ndarray, boxes: np.ndarray, view: int) -> tuple[np.ndarray, np.ndarray]:
    """View `view` of a frame [H, W, 3] and its boxes [N, 4] (x1, y1, x2, y2 in pixel-edge coordinates): the crops
    `crop_cells` cuts from the result are `view_stored`'s of the stored crops (up to float rounding, and at a scale
    other than 1 up to the stored crop's own bilinear step)."""
    boxes, flip = scale_boxes(boxes, view_scale(view)), view % DIHEDRAL
    if flip & 4:
        frame = frame.transpose(1, 0, 2)
        boxes = boxes[:, [1, 0, 3, 2]]
    height, width = frame.shape[:2]
    if flip & 1:
        frame = frame[:, ::-1]
        boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
    if flip & 2:
        frame = frame[::-1]
        boxes = np.stack([boxes[:, 0], height - boxes[:, 3], boxes[:, 2], height - boxes[:, 1]], axis=1)
    return np.ascontiguousarray(frame), np.ascontiguousarray(boxes, dtype=np.float32)


def frame_views(frame: np.ndarray, boxes: np.ndarray, views: int):
    """The flips and turns of a frame among the first `views` views, each with the boxes of every scale those views
    read, stacked scale by scale: one crop_embedder call per flip or turn. Yields (view ids, frame, boxes [V*N, 4]);
    the served view (0) is left out, its embeddings are the served ones."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    for flip in range(min(views, DIHEDRAL)):
        ids = [v for v in range(flip, views, DIHEDRAL) if v]
        if not ids:
            continue
        viewed = [view_frame(frame, boxes, v) for v in ids]
        yield ids, viewed[0][0], np.concatenate([b for _, b in viewed])
