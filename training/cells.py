"""Labelled cell graphs for training and evaluation, built with a serving localiser and the served crop geometry.

Which localiser finds the cells (`use_localizer`): "client", the classical localiser (`client/localize.py`, what
`--localizer client` serves), or "server", the learned cell detector the `leukocyte_pipeline` ensemble runs first
(`training/detector.py`, in PyTorch here; its cells are the served detector's). `leukograph train` and `evaluate`
take `--localizer`; the cache key names it (and the detector's weights).

Every image (a BCCD frame, a 4-class image, a PBC crop or a TXL-PBC image) becomes a `FrameCells`: the localiser's
boxes and kinds, a node label per box, and uint8 crops cut by `models.crop_cells` (the function inside the served
crop_embedder graph) over a STORE_ZOOM wider region (`store_size` of the crop side chosen by `use_crop_size`, default
contract.CROP_SIZE): `served_crops` is exactly the served crop.

Node labels:
* BCCD frame: localiser boxes are matched to VOC boxes (IoU >= MATCH_IOU); a matched box takes the VOC label (WBC
  subtype when the frame's label is certain, else unknown). An unmatched RBC/platelet box keeps its localiser kind
  (BCCD's RBC boxes are incomplete); an unmatched WBC box is unknown.
* 4-class image: its WBC boxes take the folder class (the source frame has a single label); context boxes keep
  their localiser kind.
* PBC image (one centred cell): the box holding the image centre (nearest to it when several do) takes the
  folder class; other WBC-kind boxes are unknown; context boxes keep their localiser kind.
* TXL-PBC image: like BCCD, against its YOLO boxes; a WBC takes its PBC class for PBC-derived images, else
  unknown (Raabin-WBC and BCDD have no subtype here).
Unknown labels are -1 and ignored by the losses.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from leukograph.client import localize as localize_module
from leukograph.client.boxes import box_iou, greedy_pairs
from leukograph.client.contract import (
    CELL_KINDS,
    CLASSES,
    CROP_MARGIN,
    CROP_SIZE,
    LOCALIZERS,
    NUCLEATED_CLASSES,
    file_sha256,
)
from leukograph.client.images import read_image
from leukograph.client.localize import Cells, localize
from leukograph.deploy.paths import CACHE_DIR, DETECTOR_WEIGHTS, detector_weights_dir, write_atomically
from leukograph.training.datasets import BccdFrame, FourClassImage, PbcImage, TxlImage
from leukograph.training.models import STORE_ZOOM, check_crop_size, crop_cells, served_size, store_pad, store_size

MATCH_IOU = 0.3
IGNORE = -1
KIND_TO_CLASS = {CELL_KINDS.index("rbc"): CLASSES.index("rbc"), CELL_KINDS.index("platelet"): CLASSES.index("platelet")}


@dataclass
class FrameCells:
    image_id: str  # BloodImage_00001, 4class/TRAIN/EOSINOPHIL/_0_1616.jpeg, pbc/..., txl/...
    source_frame: str  # grouping key for splits (BCCD frame, or the image's own id)
    frame_label: int  # class index of the image (4-class / BCCD frame label / PBC folder), or -1
    frame_size: tuple[int, int]  # height, width
    boxes: np.ndarray  # float32 [N,4]
    kinds: np.ndarray  # int64 [N] localiser kind
    labels: np.ndarray  # int64 [N] class index or -1
    crops: np.ndarray | StoredCrops  # uint8 [N,S,S,3], S = store_size(crop side); its centre crop-side square is
    # the served crop; a cached set reads its crops from the cache file
    source: str = "bccd"  # bccd | 4class | pbc | txl-raabin-wbc | txl-pbc | txl-bcdd

    @property
    def labelled_nucleated(self) -> np.ndarray:
        """bool [N]: cells labelled with a nucleated class (the five white-cell classes, IG, NRBC)."""
        return (self.labels >= 0) & (self.labels < len(NUCLEATED_CLASSES))

    @property
    def labelled_context(self) -> np.ndarray:
        """bool [N]: cells labelled RBC or platelet."""
        return self.labels >= len(NUCLEATED_CLASSES)

    @property
    def unlabelled_wbc(self) -> np.ndarray:
        """bool [N]: white-cell boxes without a subtype label (what the consistency term learns from)."""
        return (self.labels == IGNORE) & (self.kinds == CELL_KINDS.index("wbc"))

    @property
    def served_crops(self) -> np.ndarray:
        """uint8 [N,C,C,3]: exactly what the served crop_embedder cuts (a view, no copy)."""
        side = served_size(self.crops.shape[1])
        pad = store_pad(side)
        return self.crops[:, pad:pad + side, pad:pad + side]


def crops_for(image: np.ndarray, boxes: np.ndarray, size: int | None = None, zoom: float = STORE_ZOOM) -> np.ndarray:
    """uint8 [N,size,size,3] crops on the served crop_embedder's sampling grid (default: the wider stored view of
    the crop side `use_crop_size` chose)."""
    size = size or store_size(_CROP["size"])
    if len(boxes) == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    with torch.no_grad():
        crops = crop_cells(torch.from_numpy(image), torch.from_numpy(boxes.astype(np.float32)), size=size, zoom=zoom)
    return (crops.permute(0, 2, 3, 1) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def _context_labels(kinds: np.ndarray) -> np.ndarray:
    return np.array([KIND_TO_CLASS.get(int(k), IGNORE) for k in kinds], np.int64)


DEFAULT_LOCALIZER = "client"  # what the released GNN was trained on
_LOCALIZER = {"name": DEFAULT_LOCALIZER}
_CROP = {"size": CROP_SIZE}


def use_crop_size(side: int) -> None:
    """Cut every later FrameCells' crops for a CNN whose crop side is `side` (stored at store_size(side))."""
    _CROP["size"] = check_crop_size(side, "crop side")


def use_localizer(name: str) -> None:
    """Build every later FrameCells with this localiser: "client" (classical) or "server" (the learned detector)."""
    if name not in LOCALIZERS:
        raise ValueError(f"localizer must be one of {LOCALIZERS}, got {name!r}")
    _LOCALIZER["name"] = name


@functools.cache
def _detector_stage():
    from leukograph.training.detector import DetectorStage, load_detector

    return DetectorStage(load_detector(detector_weights_dir())).eval()


def find_cells(image: np.ndarray) -> Cells:
    """The cells of an RGB image by the active localiser (`use_localizer`)."""
    return localize(image) if _LOCALIZER["name"] == "client" else _detector_stage().find_cells(image)


def bccd_cells(frame: BccdFrame) -> FrameCells:
    image = read_image(frame.image_path)
    found = find_cells(image)
    labels = _context_labels(found.kinds)
    gt_boxes = np.array([b.box for b in frame.boxes], np.float32).reshape(-1, 4)
    gt_labels = [CLASSES.index(b.label) if b.label in CLASSES else IGNORE for b in frame.boxes]
    labels[found.kinds == CELL_KINDS.index("wbc")] = IGNORE  # unless matched to a labelled VOC box below
    for det, gt in greedy_pairs(box_iou(found.boxes, gt_boxes), MATCH_IOU):
        labels[det] = gt_labels[gt]
    label = frame.frame_label
    return FrameCells(frame.frame_id, frame.frame_id, CLASSES.index(label) if label else IGNORE,
                      image.shape[:2], found.boxes, found.kinds, labels, crops_for(image, found.boxes), "bccd")


def four_class_cells(item: FourClassImage) -> FrameCells:
    image = read_image(item.path)
    found = find_cells(image)
    labels = _context_labels(found.kinds)
    labels[found.kinds == CELL_KINDS.index("wbc")] = CLASSES.index(item.label)
    image_id = f"4class/{item.split}/{item.path.parent.name}/{item.path.name}"
    return FrameCells(image_id, item.source_frame, CLASSES.index(item.label), image.shape[:2], found.boxes,
                      found.kinds, labels, crops_for(image, found.boxes), "4class")


def centre_box_index(boxes: np.ndarray, height: int, width: int) -> int:
    """The box holding the image centre (the nearest centre among several), or -1 when none does."""
    if len(boxes) == 0:
        return -1
    cx, cy = width / 2.0, height / 2.0
    holds = (boxes[:, 0] <= cx) & (cx <= boxes[:, 2]) & (boxes[:, 1] <= cy) & (cy <= boxes[:, 3])
    if not holds.any():
        return -1
    distance = np.hypot((boxes[:, 0] + boxes[:, 2]) / 2 - cx, (boxes[:, 1] + boxes[:, 3]) / 2 - cy)
    return int(np.argmin(np.where(holds, distance, np.inf)))


def pbc_cells(item: PbcImage) -> FrameCells:
    image = read_image(item.path)
    found = find_cells(image)
    labels = _context_labels(found.kinds)
    labels[found.kinds == CELL_KINDS.index("wbc")] = IGNORE
    centre = centre_box_index(found.boxes, *image.shape[:2])
    if centre >= 0:
        labels[centre] = CLASSES.index(item.label)
    return FrameCells(f"pbc/{item.path.parent.name}/{item.path.name}", f"pbc:{item.sha1}", CLASSES.index(item.label),
                      image.shape[:2], found.boxes, found.kinds, labels, crops_for(image, found.boxes), "pbc")


def txl_cells(item: TxlImage) -> FrameCells:
    image = read_image(item.path)  # RGBA PNGs lose their alpha channel here
    found = find_cells(image)
    labels = _context_labels(found.kinds)
    labels[found.kinds == CELL_KINDS.index("wbc")] = IGNORE
    gt_boxes = np.array([b.box for b in item.boxes], np.float32).reshape(-1, 4)
    gt_labels = [CLASSES.index(b.label) if b.label in CLASSES else IGNORE for b in item.boxes]
    for det, gt in greedy_pairs(box_iou(found.boxes, gt_boxes), MATCH_IOU):
        labels[det] = gt_labels[gt]
    wbc_labels = {b.label for b in item.boxes if b.kind == "wbc"}
    frame_label = CLASSES.index(next(iter(wbc_labels))) if len(wbc_labels) == 1 and None not in wbc_labels else IGNORE
    return FrameCells(f"txl/{item.upstream_split}/{item.path.name}", f"txl:{item.sha1}", frame_label,
                      image.shape[:2], found.boxes, found.kinds, labels, crops_for(image, found.boxes),
                      "txl-" + item.source.lower())


def cells_of(item: BccdFrame | FourClassImage | PbcImage | TxlImage) -> FrameCells:
    if isinstance(item, BccdFrame):
        return bccd_cells(item)
    if isinstance(item, FourClassImage):
        return four_class_cells(item)
    if isinstance(item, PbcImage):
        return pbc_cells(item)
    return txl_cells(item)


def _cache_key(name: str, ids: list[str]) -> str:
    digest = hashlib.sha256()
    if _LOCALIZER["name"] == "client":
        digest.update(inspect.getsource(localize_module).encode())
    else:  # the detector: its weights and its decoding
        from leukograph.training import detector

        digest.update(file_sha256(detector_weights_dir() / DETECTOR_WEIGHTS).encode())
        digest.update(inspect.getsource(detector).encode())
    side = _CROP["size"]
    digest.update(f"{side}/{CROP_MARGIN}/{MATCH_IOU}/{store_size(side)}/{STORE_ZOOM}/v2".encode())
    digest.update("\n".join(ids).encode())
    return f"{name}-{digest.hexdigest()[:16]}"


def build_cells(items: Iterable[BccdFrame | FourClassImage | PbcImage | TxlImage], name: str, cache: bool = True,
                progress: bool = True) -> list[FrameCells]:
    """Localise, label and crop every item; cached under .cache/ keyed by the localiser source and the items.

    The cache is two files: `KEY.pt`, each image's boxes, kinds and labels, and `KEY.crops`, every image's crops
    back to back as raw uint8. A set read from the cache (or just cut and written to it) reads its crops from that
    file when they are indexed (`StoredCrops`): they are never held whole in memory, in the heap or mapped (a
    from-scratch `leukograph train` held 1.4 GB of mapped cache pages at its peak when they were mapped; the
    kernel's page cache keeps the file's bytes at hand instead)."""
    items = list(items)
    ids = [getattr(item, "frame_id", None) or str(getattr(item, "path", "")) for item in items]
    path = CACHE_DIR / f"{_cache_key(name, ids)}.pt"
    if cache:
        cached = _load_cells(path)
        if cached is not None:
            return cached
    out = [cells_of(item) for item in tqdm(items, desc=f"cells {name}", disable=not progress, leave=False)]
    if not cache:
        return out
    _write_cells(path, out)
    # Freshly cut crops sit in the heap between the freed image buffers, from where little returns to the system;
    # read from the file just written they cost what they cost when a later run reads the cache.
    del out
    return _load_cells(path)


class StoredCrops:
    """One image's cached crops, uint8 [N,S,S,3], read from the cache's crops file when indexed (`os.preadv` into a
    new array), never mapped. Indexing takes what the training code uses on numpy crops: an int, a slice, an index
    array or a boolean mask first, then any further numpy index; `np.asarray` reads them all."""

    dtype = np.dtype(np.uint8)

    def __init__(self, file, offset: int, shape: tuple[int, ...]) -> None:
        self._file, self._offset, self.shape = file, offset, tuple(shape)
        self._crop_bytes = int(np.prod(self.shape[1:], dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(stop - start, 0), *self.shape[1:]), dtype=np.uint8)
        if out.size:
            done = os.preadv(self._file.fileno(), [out], self._offset + start * self._crop_bytes)
            if done != out.nbytes:
                raise OSError(f"{self._file.name}: {done} of {out.nbytes} bytes read; the cell cache is truncated")
        return out

    def __getitem__(self, key) -> np.ndarray:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(first, (int, np.integer)):
            index = range(len(self))[int(first)]
            return self._read(index, index + 1)[(0, *rest)]
        if isinstance(first, slice):
            start, stop, step = first.indices(len(self))
            chosen = self._read(start, stop)[::step] if step > 0 else self[np.arange(start, stop, step)]
        else:
            indices = np.arange(len(self))[np.asarray(first)]
            chosen = np.empty((len(indices), *self.shape[1:]), dtype=np.uint8)
            for row, index in enumerate(indices):
                chosen[row] = self._read(int(index), int(index) + 1)[0]
        return chosen[(slice(None), *rest)] if rest else chosen

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        crops = self._read(0, len(self))
        return crops if dtype is None else crops.astype(dtype)


def _crops_path(path: Path) -> Path:
    return path.with_suffix(".crops")


def _write_cells(path: Path, cells: list[FrameCells]) -> None:
    """The crops file first, then the records that point into it: a reader never finds records without their crops."""
    records: list[dict] = []
    crops_bytes = 0

    def write_crops(tmp: Path) -> None:
        nonlocal crops_bytes
        offset = 0
        with open(tmp, "wb") as out:
            for record in cells:
                crops = np.ascontiguousarray(record.crops, dtype=np.uint8)
                out.write(crops.data)
                records.append({**vars(record), "crops": {"offset": offset, "shape": crops.shape}})
                offset += crops.nbytes
        crops_bytes = offset

    write_atomically(_crops_path(path), write_crops)
    write_atomically(path, lambda tmp: torch.save({"crops_bytes": crops_bytes, "records": records}, tmp))


def _load_cells(path: Path) -> list[FrameCells] | None:
    """A cached set, or None where there is none that this code wrote (a missing or shorter crops file, or a cache
    from before the crops file: such a set is cut again and replaces it)."""
    crops_path = _crops_path(path)
    if not path.exists() or not crops_path.exists():
        return None
    saved = torch.load(path, weights_only=False)
    if not isinstance(saved, dict) or crops_path.stat().st_size != saved["crops_bytes"]:
        return None
    file = open(crops_path, "rb")  # noqa: SIM115 - shared by the set's StoredCrops, closed when the last one goes
    return [FrameCells(**{**record, "crops": StoredCrops(file, **record["crops"])}) for record in saved["records"]]
