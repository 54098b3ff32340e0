"""Draw classified cells on a frame (OpenCV), show it in a window, write annotated video.

Boxes are coloured by label; each box carries its label and top probability. WBCs get a thick box; unidentified
cells (the review bucket) are magenta so they stand out. `--show` needs an OpenCV build with a GUI: on headless
builds `Display` warns once and turns itself off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from leukograph.client.contract import NUCLEATED_CLASSES, UNIDENTIFIED
from leukograph.client.errors import UserError

# RGB colours per label (frames are RGB until written).
COLOURS: dict[str, tuple[int, int, int]] = {
    "neutrophil": (30, 120, 255),
    "eosinophil": (255, 120, 0),
    "lymphocyte": (0, 200, 80),
    "monocyte": (230, 200, 0),
    "basophil": (140, 40, 200),
    "ig": (0, 220, 220),
    "nrbc": (160, 80, 40),
    "rbc": (200, 60, 60),
    "platelet": (120, 120, 120),
    UNIDENTIFIED: (255, 0, 255),
}
VIDEO_FOURCC = "mp4v"
DEFAULT_VIDEO_FPS = 5.0


def draw_cells(rgb: np.ndarray, boxes: np.ndarray, labels: Sequence[str], confidences: Sequence[float] | None = None,
               track_ids: Sequence[int | None] | None = None, caption: str | None = None) -> np.ndarray:
    """A copy of the RGB frame with every box, its label (+ confidence, + track id) and an optional caption."""
    out = np.ascontiguousarray(rgb).copy()
    scale = max(out.shape[:2]) / 800.0
    font_scale, thin = max(0.35, 0.45 * scale), max(1, round(scale))
    for i, (box, label) in enumerate(zip(np.asarray(boxes).reshape(-1, 4), labels)):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        colour = COLOURS.get(label, (255, 255, 255))
        wbc = label in NUCLEATED_CLASSES or label == UNIDENTIFIED
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, 2 * thin if wbc else thin)
        if not wbc and label == "rbc":
            continue  # dozens of red cells: boxes only, text would hide the smear
        text = label
        if confidences is not None:
            text += f" {float(confidences[i]):.2f}"
        if track_ids is not None and track_ids[i] is not None:
            text += f" #{track_ids[i]}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thin)
        ty = y1 - 3 if y1 - th - 3 >= 0 else min(y2 + th + 3, out.shape[0] - 1)
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw, ty + base), colour, -1)
        cv2.putText(out, text, (x1, ty), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), thin, cv2.LINE_AA)
    if caption:
        cv2.putText(out, caption, (8, int(24 * scale) + 8), cv2.FONT_HERSHEY_SIMPLEX, font_scale * 1.2,
                    (0, 0, 0), thin + 2, cv2.LINE_AA)
        cv2.putText(out, caption, (8, int(24 * scale) + 8), cv2.FONT_HERSHEY_SIMPLEX, font_scale * 1.2,
                    (255, 255, 255), thin, cv2.LINE_AA)
    return out


class VideoSink:
    """Annotated frames to a video file (mp4v). The size is fixed by the first frame; others are resized to it."""

    def __init__(self, path: str | Path, fps: float | None = None) -> None:
        self.path = Path(path)
        self.fps = fps if fps and fps > 0 else DEFAULT_VIDEO_FPS
        self._writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None  # width, height
        self.frames = 0
        if not self.path.parent.is_dir():
            raise UserError(f"cannot write {self.path}: folder {self.path.parent} does not exist")

    def write(self, rgb: np.ndarray) -> None:
        if self._writer is None:
            h, w = rgb.shape[:2]
            self.size = (w - w % 2, h - h % 2)  # even sides: some decoders refuse odd ones
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*VIDEO_FOURCC), self.fps,
                                           self.size)
            if not self._writer.isOpened():
                raise UserError(f"cannot write video {self.path} (OpenCV has no {VIDEO_FOURCC} encoder?)")
        if (rgb.shape[1], rgb.shape[0]) != self.size:
            rgb = cv2.resize(rgb, self.size, interpolation=cv2.INTER_AREA)
        self._writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


def video_frame_count(path: str | Path) -> int | None:
    """Frames decodable from a video file (read back to the end), or None when OpenCV can't open it."""
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            return None
        count = 0
        while capture.grab():
            count += 1
        return count
    finally:
        capture.release()


class Display:
    """An OpenCV window (`--show`). Headless OpenCV: warns once, then does nothing. `quit_requested` on 'q'/Esc."""

    WINDOW = "leukograph stream"

    def __init__(self, enabled: bool, warn: callable = print) -> None:
        self.enabled = enabled
        self.warn = warn
        self.quit_requested = False

    def show(self, rgb: np.ndarray) -> None:
        if not self.enabled:
            return
        try:
            cv2.imshow(self.WINDOW, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
            if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                self.quit_requested = True
        except cv2.error:
            self.enabled = False
            self.warn("--show: this OpenCV build has no GUI (headless); continuing without a window")

    def close(self) -> None:
        if self.enabled:
            with contextlib.suppress(cv2.error):
                cv2.destroyWindow(self.WINDOW)
