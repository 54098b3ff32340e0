"""Reading images from disk with clear one-line errors (used by classify, evaluation and the folder source)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from leukograph.client.contract import MAX_IMAGE_SIDE, MIN_FRAME_SIDE
from leukograph.client.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 [H,W,3]. Raises UserError for a missing, empty, non-image, tiny or huge file.

    The size is read from the header before decoding, so a huge image is refused without allocating it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file")
    try:
        with Image.open(path) as header:
            width, height = header.size
    except (UnidentifiedImageError, OSError):
        raise UserError(f"{path}: not a readable JPEG, PNG or BMP image") from None
    if min(width, height) < MIN_FRAME_SIDE:
        raise UserError(f"{path}: image is {width}x{height}, smaller than {MIN_FRAME_SIDE} px")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise UserError(f"{path}: image is {width}x{height}, larger than {MAX_IMAGE_SIDE} px")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise UserError(f"{path}: image data is corrupt or truncated")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def list_images(paths: list[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and directories into image files; returns (images, [(path, problem)]).

    Inside a directory, files that are not images by suffix are reported as skipped, not silently ignored."""
    images: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if child.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(child)
                else:
                    problems.append((child, "not a JPEG, PNG or BMP file"))
        elif path.exists():
            images.append(path)
        else:
            problems.append((path, "no such file or directory"))
    return images, problems
