"""Detection data for the cell detector: samples, geometric augmentation and CenterNet targets.

Sources (splits from `datasets`, so content shared between PBC and TXL-PBC falls in one split everywhere):
* BCCD frames of `split_frames().train` (never held-out frames): TXL-PBC's re-annotated boxes
  (`txl-pbc/bccd-relabelled`, frames whose use is "training allowed") where they exist, else the VOC boxes. VOC files
  miss many red cells (and some platelets), so on VOC-only frames only WBC negatives are trusted: the RBC and platelet
  heatmaps are not pushed down where VOC has no box.
* TXL-PBC images of our split (Raabin-WBC, PBC, BCDD), boxes de-duplicated by `datasets.parse_yolo`; RGBA PNGs and
  JPEG-in-.png are decoded by content (`read_image`).

Images stay uint8 at their own resolution in memory; every batch is warped (cv2, bilinear like the served Resize)
straight to the working size and converted to float there.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from leukograph.client.contract import CELL_KINDS, DETECTOR_SIZE, DETECTOR_STRIDE
from leukograph.client.images import read_image
from leukograph.deploy.paths import data_root
from leukograph.training.datasets import load_bccd, load_txl, parse_yolo, split_frames

RELABELLED = Path("txl-pbc") / "bccd-relabelled"
TRAINING_ALLOWED = "training allowed"
ALL_TRUSTED = np.ones(len(CELL_KINDS), bool)
WBC_ONLY_TRUSTED = np.array([kind == "wbc" for kind in CELL_KINDS])
ZOOM_RANGE = (0.5, 2.0)  # scale augmentation relative to the frame stretched to the working size
ASPECT_JITTER = 0.15
ROTATE_CHANCE = 0.5  # any angle (4-class images are rotated copies of BCCD frames)
BLACK_FILL_CHANCE = 0.25  # some sources pad with black (4-class images); the rest with the image's background
MIN_VISIBLE = 0.4  # a box cut by the view keeps its label when this share of it is still inside
GAUSSIAN_ALPHA = 0.54  # TTFNet: sigma = alpha * side / 6
MIN_SIGMA = 0.5


@dataclass
class DetectionSample:
    name: str
    source: str  # BCCD | Raabin-WBC | PBC | BCDD
    image: np.ndarray  # HxWx3 uint8 RGB
    boxes: np.ndarray  # [n,4] float32 x1,y1,x2,y2 pixels
    kinds: np.ndarray  # [n] int64 index into CELL_KINDS
    trusted: np.ndarray  # [len(CELL_KINDS)] bool: are this kind's negatives (no box = no cell) reliable?


def box_arrays(pairs: list[tuple[str, tuple[float, float, float, float]]]) -> tuple[np.ndarray, np.ndarray]:
    """(kind name, box) pairs -> boxes float32 [n,4] and kind indices int64 [n] (into CELL_KINDS)."""
    boxes = np.array([box for _, box in pairs], np.float32).reshape(-1, 4)
    kinds = np.array([CELL_KINDS.index(kind) for kind, _ in pairs], np.int64)
    return boxes, kinds


def relabelled_frames(root: Path | None = None) -> dict[str, str]:
    """BCCD frame id -> its allowed use in txl-pbc/bccd-relabelled/frames.csv."""
    with open(data_root(root) / RELABELLED / "frames.csv", newline="") as fh:
        return {row["bccd_frame"]: row["use"] for row in csv.DictReader(fh)}


def relabelled_boxes(frame_id: str, height: int, width: int,
                     root: Path | None = None) -> list[tuple[str, tuple[float, float, float, float]]]:
    return parse_yolo(data_root(root) / RELABELLED / "labels" / f"{frame_id}.txt", height, width)


def bccd_samples(frame_ids: frozenset[str], root: Path | None = None,
                 training: bool = True) -> list[DetectionSample]:
    """BCCD frames by id; re-annotated boxes where allowed (training: only 'training allowed' frames)."""
    uses = relabelled_frames(root)
    out = []
    for frame in load_bccd(root):
        if frame.frame_id not in frame_ids:
            continue
        image = read_image(frame.image_path)
        use = uses.get(frame.frame_id)
        if training and use not in (None, TRAINING_ALLOWED):
            continue  # evaluation-only frames (all held-out) are never trained on, whatever the caller passed
        if use is not None and (use == TRAINING_ALLOWED or not training):
            boxes, kinds = box_arrays(relabelled_boxes(frame.frame_id, *image.shape[:2], root=root))
            trusted = ALL_TRUSTED
        else:
            boxes, kinds = box_arrays([(b.kind, b.box) for b in frame.boxes])
            trusted = WBC_ONLY_TRUSTED
        out.append(DetectionSample(frame.frame_id, "BCCD", image, boxes, kinds, trusted))
    return out


def txl_samples(split: str, root: Path | None = None, limit: int | None = None) -> list[DetectionSample]:
    out = []
    chosen = [img for img in load_txl(root) if img.split == split]
    for img in chosen[:: max(1, len(chosen) // limit)][:limit] if limit else chosen:
        boxes, kinds = box_arrays([(b.kind, b.box) for b in img.boxes])
        out.append(DetectionSample(img.path.stem, img.source, read_image(img.path), boxes, kinds, ALL_TRUSTED))
    return out


def training_samples(root: Path | None = None, limit: int | None = None) -> list[DetectionSample]:
    """BCCD training frames + TXL-PBC train split (held-out BCCD frames are never among them)."""
    frames = split_frames(root)
    train_ids = sorted(frames.train - frames.held_out)
    if limit:  # a smoke test: decode only what it uses
        train_ids = train_ids[:: max(1, len(train_ids) // max(1, limit // 2))][: max(1, limit // 2)]
    return bccd_samples(frozenset(train_ids), root) + txl_samples("train", root, limit and limit - len(train_ids))


def _background(image: np.ndarray) -> tuple[float, float, float]:
    """The smear's background colour: each channel's 90th percentile over a sparse pixel sample."""
    sample = image[::7, ::7].reshape(-1, 3)
    return tuple(float(v) for v in np.percentile(sample, 90, axis=0))


def random_view(sample: DetectionSample, rng: np.random.Generator,
                size: int = DETECTOR_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An augmented size x size uint8 view: the image stretched to the working size (as served), zoomed x0.5-x2,
    aspect jitter, shifted, flipped, rotated; out-of-view area filled with the background (or black). Boxes follow."""
    h, w = sample.image.shape[:2]
    zoom = float(np.exp(rng.uniform(*np.log(ZOOM_RANGE))))
    aspect = float(np.exp(rng.uniform(-ASPECT_JITTER, ASPECT_JITTER)))
    sx, sy = size / w * zoom * aspect, size / h * zoom / aspect
    if rng.random() < 0.5:
        sx = -sx
    if rng.random() < 0.5:
        sy = -sy
    spread_x = abs(abs(sx) * w - size) / 2
    spread_y = abs(abs(sy) * h - size) / 2
    tx = size / 2 + rng.uniform(-spread_x, spread_x) - sx * w / 2
    ty = size / 2 + rng.uniform(-spread_y, spread_y) - sy * h / 2
    matrix = np.array([[sx, 0, tx], [0, sy, ty], [0, 0, 1]], np.float64)
    angle = rng.uniform(-np.pi, np.pi) if rng.random() < ROTATE_CHANCE else 0.0
    cos, sin = np.cos(angle), np.sin(angle)
    centre = size / 2
    rotation = np.array([[cos, -sin, centre - cos * centre + sin * centre],
                         [sin, cos, centre - sin * centre - cos * centre], [0, 0, 1]])
    matrix = (rotation @ matrix)[:2]
    fill = (0.0, 0.0, 0.0) if rng.random() < BLACK_FILL_CHANCE else _background(sample.image)
    view = cv2.warpAffine(sample.image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    # a cell is the ellipse inscribed in its box: the rotated box is that ellipse's bounding box
    b = sample.boxes.astype(np.float64)
    centres = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, np.ones(len(b))], 1) @ matrix.T
    half_w, half_h = (b[:, 2] - b[:, 0]) / 2 * abs(sx), (b[:, 3] - b[:, 1]) / 2 * abs(sy)
    extent_x = np.hypot(half_w * cos, half_h * sin)
    extent_y = np.hypot(half_w * sin, half_h * cos)
    boxes = np.stack([centres[:, 0] - extent_x, centres[:, 1] - extent_y, centres[:, 0] + extent_x,
                      centres[:, 1] + extent_y], 1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    clipped = np.clip(boxes, 0, size)
    visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (visible >= MIN_VISIBLE * np.maximum(area, 1e-6)) & (clipped[:, 2] - clipped[:, 0] >= 2) & (
        clipped[:, 3] - clipped[:, 1] >= 2)
    return view, clipped[keep].astype(np.float32), sample.kinds[keep]


@dataclass
class Targets:
    heat: np.ndarray  # [B, kinds, h, w] gaussian centre heatmaps
    trusted: np.ndarray  # [B, kinds] bool: negatives of this kind count in the loss
    batch_index: np.ndarray  # [n] which image each box is in
    pixel_index: np.ndarray  # [n] flat output-pixel index of its centre
    regression: np.ndarray  # [n, 4] log w, log h (output pixels), centre offset x, y


def make_targets(boxes: list[np.ndarray], kinds: list[np.ndarray], trusted: np.ndarray,
                 size: int = DETECTOR_SIZE) -> Targets:
    side = size // DETECTOR_STRIDE
    heat = np.zeros((len(boxes), len(CELL_KINDS), side, side), np.float32)
    grid = np.arange(side, dtype=np.float32)
    batch_index, pixel_index, regression = [], [], []
    for i, (image_boxes, image_kinds) in enumerate(zip(boxes, kinds)):
        for box, kind in zip(image_boxes / DETECTOR_STRIDE, image_kinds):
            x1, y1, x2, y2 = (float(v) for v in box)
            cx, cy, bw, bh = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
            ix, iy = min(int(cx), side - 1), min(int(cy), side - 1)
            sigma_x = max(GAUSSIAN_ALPHA * bw / 6, MIN_SIGMA)
            sigma_y = max(GAUSSIAN_ALPHA * bh / 6, MIN_SIGMA)
            gx = np.exp(-((grid - ix) ** 2) / (2 * sigma_x ** 2))
            gy = np.exp(-((grid - iy) ** 2) / (2 * sigma_y ** 2))
            np.maximum(heat[i, kind], gy[:, None] * gx[None, :], out=heat[i, kind])
            batch_index.append(i)
            pixel_index.append(iy * side + ix)
            regression.append((np.log(bw), np.log(bh), cx - ix, cy - iy))
    return Targets(heat, trusted, np.array(batch_index, np.int64), np.array(pixel_index, np.int64),
                   np.array(regression, np.float32).reshape(-1, 4))
