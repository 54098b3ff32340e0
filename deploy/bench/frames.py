"""The frames every row reads: BCCD held-out frames decoded once, captured from memory or from an MJPG video."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leukograph.client.errors import UserError
from leukograph.client.images import read_image


@dataclass
class Frames:
    ids: list[str]
    images: list[np.ndarray]  # RGB uint8, decoded once


def held_out_paths() -> list[tuple[str, Path]]:
    """(frame id, JPEG path) of the BCCD held-out frames (`split_frames().held_out`), sorted by id."""
    from leukograph.training.datasets import load_bccd, split_frames  # torch-free

    held_out = split_frames().held_out
    return [(f.frame_id, f.image_path) for f in load_bccd() if f.frame_id in held_out]


def load_frames(limit: int | None = None, folder: Path | None = None) -> Frames:
    """The held-out frames decoded once (or every image in `folder`, e.g. a copy carried to a GPU machine)."""

    if folder is not None:
        paths = [(p.stem, p) for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    else:
        paths = held_out_paths()
    paths = paths[:limit]
    if not paths:
        raise UserError(f"no frames found in {folder}" if folder else
                        "no BCCD held-out frames found (check LEUKOGRAPH_DATA)")
    images = [read_image(path) for _, path in paths]
    return Frames([frame_id for frame_id, _ in paths], images)


class MemoryCapture:
    """'Capture' = taking the decoded frame from memory."""

    name = "memory"

    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = images

    def read(self, index: int) -> np.ndarray:
        return self.images[index % len(self.images)]

    def close(self) -> None:
        pass


class VideoCapture:
    """Frames read and decoded from an MJPG .avi made from the held-out frames (a camera stand-in), in order."""

    name = "video"

    def __init__(self, path: Path) -> None:
        import cv2

        self._cv2 = cv2
        self.path = path
        self._lock = threading.Lock()
        self._capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        if not self._capture.isOpened():
            raise UserError(f"cannot open {path} with OpenCV's FFMPEG backend")

    def read(self, index: int) -> np.ndarray:
        with self._lock:
            ok, bgr = self._capture.read()
            if not ok:  # end of the clip: loop
                self._capture.set(self._cv2.CAP_PROP_POS_FRAMES, 0)
                ok, bgr = self._capture.read()
            if not ok:
                raise UserError(f"cannot read a frame from {self.path}")
        return np.ascontiguousarray(self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB))

    def close(self) -> None:
        self._capture.release()


def write_mjpg(images: list[np.ndarray], path: Path, fps: float = 10.0) -> Path:
    import cv2

    height, width = images[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise UserError(f"cannot write an MJPG video to {path}")
    for image in images:
        writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def localise_boxes(image: np.ndarray) -> np.ndarray:
    from leukograph.client.localize import localize

    return np.ascontiguousarray(localize(image).boxes, dtype=np.float32)


def tiled_boxes(image: np.ndarray, real: np.ndarray, cells: int, seed: int = 0) -> np.ndarray:
    """`cells` boxes from a frame's real boxes: cycled, and jittered (shifted by up to half a box) after the first
    pass, kept inside the frame. One cell is the frame's largest box (a WBC on a BCCD frame)."""
    height, width = image.shape[:2]
    order = np.argsort(-(real[:, 2] - real[:, 0]) * (real[:, 3] - real[:, 1]))
    rng = np.random.default_rng(seed)
    boxes = []
    for i in range(cells):
        box = real[order[i % len(order)]].copy()
        if i >= len(order):
            size = box[2:] - box[:2]
            shift = rng.uniform(-0.5, 0.5, 2) * size
            shift = np.clip(shift, -box[:2], [width - box[2], height - box[3]])
            box += np.concatenate([shift, shift])
        boxes.append(box)
    return np.ascontiguousarray(boxes, dtype=np.float32)


