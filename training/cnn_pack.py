"""The CNN stage's training material in one small file, for a training machine without the datasets (a GPU box).

`leukograph train --save-cnn-pack PACK` writes, for the training and validation parts that `load_cell_sets` builds:
every labelled nucleated cell's stored crop, every white cell the localiser found without a subtype label (for the
consistency term, `--unlabelled-weight`), plus CONTEXT_PER_IMAGE red-cell/platelet crops per image drawn with the
seed, each JPEG-encoded (quality 95 unless chosen), at the stored size of the crop side it was built for (`--crop-
size`: the pack's crops decide the CNN's crop side). `leukograph train --stages cnn --cnn-pack PACK --device cuda`
trains the CNN from it. Differences from training on the datasets, both small: a fixed context draw instead of a
fresh one per epoch, and the pack's JPEG step (the augmentation itself compresses 30% of crops at quality 20-90).
Validation reads only labelled nucleated cells, so the pack's validation part is the same as the datasets'.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from leukograph.client.contract import NUCLEATED_CLASSES
from leukograph.client.errors import UserError
from leukograph.deploy.paths import write_atomically
from leukograph.training.cells import FrameCells

PACK_VERSION = 1
CONTEXT_PER_IMAGE = 1
JPEG_QUALITY = 95  # ~3.9 kB per 80x80 crop: ~10k crops in ~40 MB


def _encode(crop: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise UserError("could not JPEG-encode a crop for the CNN pack")
    return data.tobytes()


def _decode(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _packed_frame(frame: FrameCells, rng: np.random.Generator, quality: int) -> dict | None:
    nucleated = np.flatnonzero(frame.labelled_nucleated | frame.unlabelled_wbc)
    context = np.flatnonzero(frame.labelled_context)
    drawn = rng.choice(context, size=min(CONTEXT_PER_IMAGE, len(context)), replace=False) if len(context) else []
    keep = np.sort(np.concatenate([nucleated, np.asarray(drawn, dtype=np.int64)])).astype(np.int64)
    if len(keep) == 0:
        return None
    return {"image_id": frame.image_id, "source_frame": frame.source_frame, "frame_label": frame.frame_label,
            "frame_size": tuple(frame.frame_size), "boxes": frame.boxes[keep], "kinds": frame.kinds[keep],
            "labels": frame.labels[keep], "source": frame.source,
            "jpeg": [_encode(frame.crops[i], quality) for i in keep]}


def save_cnn_pack(path: Path, train: list[FrameCells], val: list[FrameCells], seed: int,
                  quality: int = JPEG_QUALITY) -> None:
    if not 1 <= quality <= 100:
        raise UserError(f"JPEG quality must be 1-100, got {quality}")
    rng = np.random.default_rng(seed)
    parts = {name: [p for p in (_packed_frame(f, rng, quality) for f in frames) if p is not None]
             for name, frames in (("train", train), ("val", val))}
    pack = {"version": PACK_VERSION, "seed": seed, "classes": list(NUCLEATED_CLASSES), **parts}
    write_atomically(path, lambda tmp: torch.save(pack, tmp))
    crops = sum(len(p["jpeg"]) for part in parts.values() for p in part)
    print(f"CNN pack {path}: {crops} crops of {sum(len(v) for v in parts.values())} images, "
          f"{path.stat().st_size / 1e6:.1f} MB")


def load_cnn_pack(path: Path) -> tuple[list[FrameCells], list[FrameCells]]:
    """(train, val) frames holding the packed cells, crops decoded to uint8."""
    try:
        pack = torch.load(path, weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise UserError(f"cannot read CNN pack {path}: {exc}") from None
    if pack.get("version") != PACK_VERSION or pack.get("classes") != list(NUCLEATED_CLASSES):
        raise UserError(f"{path} is not a version-{PACK_VERSION} CNN pack for these classes; write it again")

    def frames(part: list[dict]) -> list[FrameCells]:
        return [FrameCells(**{k: v for k, v in p.items() if k != "jpeg"},
                           crops=np.stack([_decode(data) for data in p["jpeg"]])) for p in part]

    return frames(pack["train"]), frames(pack["val"])
