"""Labelled cell graphs for training and evaluation, built with the serving localiser and crop geometry.

Every image (a BCCD frame or a 4-class image) becomes a `FrameCells`: the localiser's boxes and kinds, a node label
per box, and the 64x64 crops cut by `models.crop_cells` (the function inside the served crop_embedder graph).

Node labels:
* BCCD frame: localiser boxes are matched to VOC boxes (IoU >= MATCH_IOU); a matched box takes the VOC label (WBC
  subtype when the frame's label is certain, else unknown). An unmatched RBC/platelet box keeps its localiser kind
  (BCCD's RBC boxes are incomplete); an unmatched WBC box is unknown.
* 4-class image: its WBC boxes take the folder class (the source frame has a single label); context boxes keep
  their localiser kind.
Unknown labels are -1 and ignored by the losses.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from leukograph.client import localize as localize_module
from leukograph.client.boxes import box_iou, greedy_pairs
from leukograph.client.contract import CELL_KINDS, CLASSES, CROP_MARGIN, CROP_SIZE
from leukograph.client.images import read_image
from leukograph.client.localize import localize
from leukograph.deploy.paths import CACHE_DIR
from leukograph.training.datasets import BccdFrame, FourClassImage
from leukograph.training.models import crop_cells

MATCH_IOU = 0.3
IGNORE = -1
KIND_TO_CLASS = {CELL_KINDS.index("rbc"): CLASSES.index("rbc"), CELL_KINDS.index("platelet"): CLASSES.index("platelet")}


@dataclass
class FrameCells:
    image_id: str  # BloodImage_00001 or 4class/TRAIN/EOSINOPHIL/_0_1616.jpeg
    source_frame: str  # BCCD frame the image comes from (grouping key for splits)
    frame_label: int  # WBC class index of the image (4-class / BCCD frame label), or -1
    frame_size: tuple[int, int]  # height, width
    boxes: np.ndarray  # float32 [N,4]
    kinds: np.ndarray  # int64 [N] localiser kind
    labels: np.ndarray  # int64 [N] class index or -1
    crops: np.ndarray  # uint8 [N,S,S,3]


def crops_for(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """uint8 [N,S,S,3] crops exactly as the served crop_embedder cuts them."""
    if len(boxes) == 0:
        return np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    with torch.no_grad():
        crops = crop_cells(torch.from_numpy(image), torch.from_numpy(boxes.astype(np.float32)))
    return (crops.permute(0, 2, 3, 1) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def _context_labels(kinds: np.ndarray) -> np.ndarray:
    return np.array([KIND_TO_CLASS.get(int(k), IGNORE) for k in kinds], np.int64)


def bccd_cells(frame: BccdFrame) -> FrameCells:
    image = read_image(frame.image_path)
    found = localize(image)
    labels = _context_labels(found.kinds)
    gt_boxes = np.array([b.box for b in frame.boxes], np.float32).reshape(-1, 4)
    gt_labels = [CLASSES.index(b.label) if b.label in CLASSES else IGNORE for b in frame.boxes]
    labels[found.kinds == CELL_KINDS.index("wbc")] = IGNORE  # unless matched to a labelled VOC box below
    for det, gt in greedy_pairs(box_iou(found.boxes, gt_boxes), MATCH_IOU):
        labels[det] = gt_labels[gt]
    label = frame.frame_label
    return FrameCells(frame.frame_id, frame.frame_id, CLASSES.index(label) if label else IGNORE,
                      image.shape[:2], found.boxes, found.kinds, labels, crops_for(image, found.boxes))


def four_class_cells(item: FourClassImage) -> FrameCells:
    image = read_image(item.path)
    found = localize(image)
    labels = _context_labels(found.kinds)
    labels[found.kinds == CELL_KINDS.index("wbc")] = CLASSES.index(item.label)
    image_id = f"4class/{item.split}/{item.path.parent.name}/{item.path.name}"
    return FrameCells(image_id, item.source_frame, CLASSES.index(item.label), image.shape[:2], found.boxes,
                      found.kinds, labels, crops_for(image, found.boxes))


def _cache_key(name: str, ids: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(inspect.getsource(localize_module).encode())
    digest.update(f"{CROP_SIZE}/{CROP_MARGIN}/{MATCH_IOU}".encode())
    digest.update("\n".join(ids).encode())
    return f"{name}-{digest.hexdigest()[:16]}"


def build_cells(items: Iterable[BccdFrame | FourClassImage], name: str, cache: bool = True,
                progress: bool = True) -> list[FrameCells]:
    """Localise, label and crop every item; cached under .cache/ keyed by the localiser source and the items."""
    items = list(items)
    ids = [getattr(item, "frame_id", None) or str(getattr(item, "path", "")) for item in items]
    path = CACHE_DIR / f"{_cache_key(name, ids)}.pt"
    if cache and path.exists():
        return [FrameCells(**record) for record in torch.load(path, weights_only=False)]
    out = [bccd_cells(item) if isinstance(item, BccdFrame) else four_class_cells(item)
           for item in tqdm(items, desc=f"cells {name}", disable=not progress, leave=False)]
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save([vars(record) for record in out], path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return out
