"""The one image reader (classify, evaluation, the folder source): every bad file becomes one `ImageError` line.

* The size is read from the header before anything is decoded: a decompression bomb (a PNG whose header says
  60000x60000) is refused without allocating it.
* Truncated files are refused: Pillow decodes strictly (`LOAD_TRUNCATED_IMAGES` stays off), where OpenCV would
  fill the missing part with grey and only log a libjpeg warning.
* Multi-frame images (animated GIF/PNG, multi-page TIFF) are refused with that reason, not called corrupt.
* Microscope cameras' formats are read beside JPEG, PNG and BMP: TIFF (16-bit grey scaled to 8 bits, not clipped
  white), WebP and JPEG 2000.
* Names are printed safely (`safe_name`): a name with a newline or undecodable bytes is shown JSON-quoted.
* Folders are walked with their unreadable subfolders reported, not silently skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from leukograph.client.contract import MAX_IMAGE_SIDE, MIN_FRAME_SIDE
from leukograph.client.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".j2k"}
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "JPEG2000", "GIF")  # what Pillow may open; GIF: one frame
FORMAT_NAMES = "JPEG, PNG, BMP, TIFF, WebP or JPEG 2000"
SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's modes for 16-bit (and 32-bit) grey
HASH_CHUNK = 1 << 20


class ImageError(UserError):
    """One unreadable image: `path` and `problem` (the line is `<safe name>: <problem>`)."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{safe_name(path)}: {problem}")
        self.path = Path(path)
        self.problem = problem


def safe_name(path: str | Path) -> str:
    """The path as text for one output line: as it is when printable, else JSON-quoted (newlines, odd bytes)."""
    text = str(path)
    return text if text.isprintable() else json.dumps(text)


def _problem(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror.lower() if exc.strerror else str(exc)


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 [H,W,3]. Raises ImageError for a missing, unreadable, empty, non-image, tiny, huge, animated,
    truncated or corrupt file."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ImageError(path, "no such file" if not path.exists() else "not a file")
        if path.stat().st_size == 0:
            raise ImageError(path, "empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as image:
                return _decode(path, image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(path, f"image header declares more pixels than the limit ({MAX_IMAGE_SIDE} px a side); "
                         "refused before decoding") from None
    except UnidentifiedImageError:
        raise ImageError(path, f"not a readable {FORMAT_NAMES} image") from None
    except OSError as exc:  # permission, I/O error, or Pillow's "image file is truncated"
        raise ImageError(path, _problem(exc)) from None
    except (ValueError, SyntaxError, MemoryError) as exc:  # Pillow's decoders raise these on corrupt data
        raise ImageError(path, f"image data is corrupt ({exc})") from None


def _decode(path: Path, image: Image.Image) -> np.ndarray:
    width, height = image.size
    if min(width, height) < MIN_FRAME_SIDE:
        raise ImageError(path, f"image is {width}x{height}, smaller than {MIN_FRAME_SIDE} px")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageError(path, f"image is {width}x{height}, larger than {MAX_IMAGE_SIDE} px")
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise ImageError(path, f"animated image with {frames} frames (or a multi-page file); give single images or "
                         "a video")
    assert not ImageFile.LOAD_TRUNCATED_IMAGES, "truncated images must be refused"
    try:
        image.load()
    except OSError as exc:
        message = str(exc)
        if "truncated" in message or "broken data stream" in message:
            raise ImageError(path, "image data is truncated") from None
        raise ImageError(path, f"image data is corrupt ({message})") from None
    image = ImageOps.exif_transpose(image)  # as OpenCV's IMREAD_COLOR does
    if image.mode in SIXTEEN_BIT_GREY:  # Pillow's convert("RGB") would clip every value above 255 to white
        grey = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy


def content_hash(path: str | Path) -> str:
    """sha256 of a file's bytes (a frame's identity is its path plus this)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _walk(folder: Path, images: list[Path], problems: list[tuple[Path, str]]) -> None:
    """Every file under folder, sorted; unreadable folders and non-image files are reported as problems."""

    def unreadable(exc: OSError) -> None:
        problems.append((Path(exc.filename or folder), f"folder not readable: {_problem(exc)}"))

    found: list[Path] = []
    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs.sort()
        found.extend(Path(root) / name for name in files)
    for child in sorted(found):
        if child.suffix.lower() in IMAGE_SUFFIXES:
            images.append(child)
        else:
            problems.append((child, f"not a {FORMAT_NAMES} file"))


def list_images(paths: list[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files and directories into image files; returns (images, [(path, problem)]).

    Inside a directory, files that are not images by suffix and subfolders that cannot be read are reported,
    not silently ignored."""
    images: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        if str(raw) == "":  # Path("") is the working directory: an unset shell variable must not walk it
            problems.append((Path(repr(str(raw))), "empty path"))  # shown as '' rather than "."
            continue
        try:
            if path.is_dir():
                _walk(path, images, problems)
            elif path.exists():
                images.append(path)
            else:
                problems.append((path, "no such file or directory"))
        except OSError as exc:  # e.g. a file inside a folder that may not be searched
            problems.append((path, _problem(exc)))
    return images, problems
