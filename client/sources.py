"""Frame sources for `leukograph stream`: camera index, video file, folder of images, RTSP/HTTP URL.

Everything comes out as `Frame` (RGB uint8 [H,W,3]). Camera, video and URL go through `cv2.VideoCapture` (video files
and URLs with the FFMPEG backend); a folder (or one image file) through `images.read_image`, sorted, with bad files
reported and skipped.

Frame identity (`Frame.key`, what the result store keys frames by): an image file is its resolved path plus the
sha256 of its bytes (adding, removing or renaming other files changes nothing); a video file frame is the video's
path and content hash plus the frame number; a camera or stream frame is the source plus its capture count and
capture time. `position` is only the place in this run's listing (or the capture count).

`FrameBuffer` is the bounded queue between the capture thread and the client: either blocking (files read at
the pace the server allows) or drop-oldest (live sources, or files simulating a camera with --realtime), where a
full buffer drops its OLDEST frame for the new one and counts it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from leukograph.client.errors import UserError
from leukograph.client.images import (
    FORMAT_NAMES,
    IMAGE_SUFFIXES,
    ImageError,
    content_hash,
    list_images,
    read_image,
    safe_name,
)

URL_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp")


@dataclass
class Frame:
    position: int  # place in the source (files) or capture count (live); see module docstring
    rgb: np.ndarray  # uint8 [H,W,3]
    captured_at: float  # epoch seconds
    captured_mono: float  # time.perf_counter() at capture, for latency
    ref: str  # where it came from, for people: the image file, or "<source uri>#<position>"
    key: str  # the frame's identity in the result store (see module docstring)


class Source:
    """A stream of frames. `read()` returns the next Frame or None at the end (or when a camera is lost)."""

    live: bool = False
    uri: str = ""
    fps: float | None = None
    end_reason: str = "end of source"

    def read(self) -> Frame | None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _frame(self, position: int, rgb: np.ndarray, ref: str | None = None, key: str | None = None) -> Frame:
        captured_at = time.time()
        ref = ref or f"{self.uri}#{position}"
        if key is None:
            key = f"{self.uri}#{position}@{captured_at:.6f}"
        return Frame(position, rgb, captured_at, time.perf_counter(), ref, key)


class CaptureSource(Source):
    """cv2.VideoCapture: camera index, video file or URL."""

    def __init__(self, spec: str | int, kind: str) -> None:
        self.kind = kind  # "camera" | "video" | "url"
        self.live = kind != "video"
        self.uri = f"camera:{spec}" if kind == "camera" else _redact(str(spec)) if kind == "url" \
            else str(Path(spec).resolve())
        with _quiet_native_stderr():  # OpenCV/FFmpeg log their own warnings; the UserError below says it once
            if kind == "camera":
                self.capture = cv2.VideoCapture(int(spec))
            else:
                self.capture = cv2.VideoCapture(str(spec), cv2.CAP_FFMPEG)
        if not self.capture.isOpened():
            self.capture.release()
            what = {"camera": f"camera {spec} (no such device, or it is busy)", "url": f"stream {self.uri}",
                    "video": f"video {spec} (not a video OpenCV/FFMPEG can read)"}[kind]
            raise UserError(f"cannot open {what}")
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and np.isfinite(fps) and 0 < fps < 1000 else None
        self._position = 0
        self._video_id = f"video:{self.uri}:sha256:{content_hash(spec)}" if kind == "video" else None

    def read(self) -> Frame | None:
        ok, bgr = self.capture.read()
        if not ok or bgr is None:
            self.end_reason = {"camera": "camera lost (no frame)", "url": "stream ended or lost",
                               "video": "end of video"}[self.kind]
            return None
        if bgr.ndim == 2:
            bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
        key = f"{self._video_id}#{self._position}" if self._video_id else None
        frame = self._frame(self._position, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), key=key)
        self._position += 1
        return frame

    def close(self) -> None:
        self.capture.release()


def image_file_key(resolved_path: str, digest: str) -> str:
    """An image file's frame identity: its resolved path plus the sha256 of its bytes (`images.content_hash`)."""
    return f"file:{resolved_path}:sha256:{digest}"


class FolderSource(Source):
    """Images of a folder (recursively, sorted) or one image file; unreadable ones are reported (one line each,
    names printed safely), listed in `skipped`, and the files after them still run."""

    live = False

    def __init__(self, path: Path, report: Callable[[str], None]) -> None:
        self.uri = str(path.resolve())
        self.images, problems = list_images([path])
        self.report = report
        self.skipped: list[tuple[str, str]] = []
        for bad, problem in problems:
            self._skip(bad, problem)
        if not self.images:
            raise UserError(f"no {FORMAT_NAMES} images in {path}")
        self._next = 0

    def _skip(self, path: Path, problem: str) -> None:
        self.skipped.append((str(path), problem))
        self.report(f"skipped {safe_name(path)}: {problem}")

    def read(self) -> Frame | None:
        while self._next < len(self.images):
            position, path = self._next, self.images[self._next]
            self._next += 1
            try:
                rgb = read_image(path)
                digest = content_hash(path)
            except ImageError as exc:
                self._skip(path, exc.problem)
                continue
            except OSError as exc:  # removed or made unreadable between decoding and hashing
                self._skip(path, exc.strerror or str(exc))
                continue
            resolved = str(path.resolve())
            return self._frame(position, rgb, ref=resolved, key=image_file_key(resolved, digest))
        self.end_reason = "end of folder"
        return None


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence OpenCV's logger and native writes to fd 2 (FFmpeg) while a capture is opened."""
    previous = cv2.getLogLevel()
    cv2.setLogLevel(0)  # LOG_LEVEL_SILENT
    sys.stderr.flush()
    saved = devnull = None
    try:
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    except OSError:
        pass
    try:
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        if devnull is not None:
            os.close(devnull)
        cv2.setLogLevel(previous)


def _redact(url: str) -> str:
    """A URL without user:password@ (it is printed and stored)."""
    return re.sub(r"//[^/@]*@", "//", url)


def open_source(spec: str, report: Callable[[str], None] = print) -> Source:
    """Camera index ("0"), URL (rtsp://, http://...), folder, image file or video file. UserError when it can't."""
    spec = str(spec).strip()
    if not spec:
        raise UserError("empty source")
    if spec.isdigit():
        return CaptureSource(spec, "camera")
    scheme = spec.split("://", 1)[0].lower() if "://" in spec else ""
    if scheme in URL_SCHEMES:
        return CaptureSource(spec, "url")
    if scheme:
        raise UserError(f"unsupported source URL scheme {scheme!r} (use {', '.join(URL_SCHEMES)})")
    path = Path(spec).expanduser()
    if path.is_dir():
        return FolderSource(path, report)
    if not path.exists():
        raise UserError(f"{spec}: no such file or directory (and not a camera index or URL)")
    if not path.is_file():
        raise UserError(f"{spec}: not a file")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return FolderSource(path, report)
    return CaptureSource(str(path), "video")


class FrameBuffer:
    """Bounded frame queue between the capture thread and the consumer.

    drop_oldest=False: `put` waits while full (backpressure: files read at the server's pace).
    drop_oldest=True: `put` never waits; a full buffer drops its oldest frame (counted in `dropped`)."""

    def __init__(self, capacity: int, drop_oldest: bool) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.drop_oldest = drop_oldest
        self._frames: collections.deque[Frame] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0
        self.max_depth = 0

    def put(self, frame: Frame, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Queue a frame; False when the buffer was closed or should_stop() became true while waiting."""
        with self._cond:
            while not self.drop_oldest and len(self._frames) >= self.capacity:
                if self._closed or should_stop():
                    return False
                self._cond.wait(0.05)
            if self._closed:
                return False
            if len(self._frames) >= self.capacity:
                self._frames.popleft()
                self.dropped += 1
            self._frames.append(frame)
            self.max_depth = max(self.max_depth, len(self._frames))
            self._cond.notify_all()
            return True

    def get(self, timeout: float) -> Frame | None:
        """The oldest queued frame, or None when none came within timeout."""
        with self._cond:
            if not self._frames:
                self._cond.wait(timeout)
            if not self._frames:
                return None
            frame = self._frames.popleft()
            self._cond.notify_all()
            return frame

    def close(self) -> None:
        """The producer is done (end of source) or the consumer stops: wake everyone."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def discard(self) -> int:
        """Drop whatever is still queued (stop requested); returns how many frames."""
        with self._cond:
            n = len(self._frames)
            self._frames.clear()
            self._cond.notify_all()
            return n

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._cond:
            return len(self._frames)


class CaptureThread(threading.Thread):
    """Reads a source into a FrameBuffer, optionally paced at `fps` (simulated camera / rate limit)."""

    def __init__(self, source: Source, buffer: FrameBuffer, fps: float | None, stop: threading.Event,
                 already_recorded: Callable[[Frame], bool] | None = None) -> None:
        super().__init__(name="capture", daemon=True)
        self.source, self.buffer, self.fps, self.stop = source, buffer, fps, stop
        self.already_recorded = already_recorded  # frames it says yes to are read and skipped
        self.read_count = 0
        self.skipped_recorded = 0
        self.end_reason = ""
        self.error: BaseException | None = None

    def run(self) -> None:
        started = time.perf_counter()
        paced = 0
        try:
            while not self.stop.is_set():
                if self.fps:
                    wait = started + paced / self.fps - time.perf_counter()
                    if wait > 0:
                        self.stop.wait(wait)
                        if self.stop.is_set():
                            break
                frame = self.source.read()
                if frame is None:
                    self.end_reason = self.source.end_reason
                    break
                self.read_count += 1
                if self.already_recorded is not None and self.already_recorded(frame):
                    self.skipped_recorded += 1
                    continue
                paced += 1
                if not self.buffer.put(frame, self.stop.is_set):
                    break
            else:
                self.end_reason = "stopped"
            if not self.end_reason:
                self.end_reason = "stopped"
        except Exception as exc:  # noqa: BLE001 - reported by the consumer as one line
            self.error = exc
            self.end_reason = f"source error: {exc}"
        finally:
            self.buffer.close()
