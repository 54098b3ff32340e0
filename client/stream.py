"""`leukograph stream SOURCE`: count a sample's white cells from a microscope stream through the Triton ensemble.

Per frame: capture (camera / video / folder / URL, `sources`) -> the bare FRAME to `leukocyte_pipeline`, whose
detector finds the cells on the server (`--localizer server`, the default), or the classical localiser on the client
(`localize`) and FRAME + BOXES to `leukocyte_pipeline_boxes` (`--localizer client`, e.g. an edge server without the
detector) -> over gRPC (async, at most --max-in-flight outstanding; system shm with --shm) -> in frame order: track
ids (`CellTracker`), labels with the review threshold (`label_cells`), one SQLite transaction per frame
(`ResultStore.record_frame`, which owns counting and idempotency) -> overlay / video.

Pacing and drops: a live source (camera, URL), or a file with --realtime FPS, is never waited for: when the server is
slower, the OLDEST waiting frame is dropped (and counted) so the queue stays bounded and results stay fresh. A file
without --realtime is read at the pace the server allows (no drops); --max-fps caps that pace.

Frame identity: a frame is recorded under its source identity (`Frame.key`: image path + content hash, video
path + hash + frame number, camera/stream + capture time), never its place in a listing, so streaming the same files
again into the same sample skips what is recorded (before any request is sent), whatever was added, removed or
reordered meanwhile, and a restarted client continues where it stopped. `frame_index` is the recording order,
assigned by the store inside the write transaction; frames are recorded strictly in capture order. One client
writes a sample at a time (the store's writer lease; a second one is refused with one line). On resume the tracker
continues the sample's track ids and the last frame's tracks.

Memory: the session keeps the frames in flight, the tracks in view, the running counts and fixed-size latency
histograms; nothing grows with the number of frames.

Latency (summary): capture -> labels recorded. For a file read at the server's pace (no --realtime / --max-fps) the
reader only prefetches, so there it starts when the client takes the frame from the queue.

Faults: a request that fails because the server is down, restarting or not ready is kept and re-sent after the
server is back (exponential backoff; an outage may last at most --retry-timeout seconds, counted from the first
failure until a request succeeds again); nothing is lost or recorded twice. A request the server rejects as bad is
logged and nothing is recorded for that frame. Model version: after each batch of answers the client reads the
served weights id; an answer whose request went out under another id (the server loaded new weights meanwhile:
`leukograph adapt`, a restart) is sent again, so each frame records the weights id that labelled it.
Ctrl-C / SIGTERM: stop capturing, finish and record the requests in flight, print the summary; exit 130 after
Ctrl-C, 0 after SIGTERM (a second Ctrl-C aborts at once).
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from leukograph.client.contract import CELL_KINDS, LOCALIZERS, MAX_CELLS, NUM_CLASSES
from leukograph.client.differential import DEFAULT_TARGET, DEFAULT_THRESHOLD, TARGETS, label_cells
from leukograph.client.endpoints import open_client
from leukograph.client.errors import UserError
from leukograph.client.images import safe_name
from leukograph.client.latency import LatencyHistogram, percentiles
from leukograph.client.localize import Cells, localize
from leukograph.client.overlay import Display, VideoSink, draw_cells, video_frame_count
from leukograph.client.records import DEFAULT_DB, ResultStore, SampleState
from leukograph.client.review_store import cell_records, record_classified_frame, require_unsigned
from leukograph.client.sources import CaptureThread, Frame, FrameBuffer, Source, open_source
from leukograph.client.tracking import CellTracker, Track
from leukograph.client.triton_client import (
    DEFAULT_URLS,
    PROTOCOLS,
    InferOutcome,
    PipelineError,
    RequestNotSent,
    RequestRejected,
    TritonPipelineClient,
)

EXIT_INTERRUPTED = 130
EXIT_GAVE_UP = 1
RECOVERY_BACKOFF_S = (0.25, 4.0)  # first and largest delay between reconnect attempts


def log(message: str) -> None:
    print(f"leukograph stream: {message}", file=sys.stderr, flush=True)


def _warm_up_localizer() -> None:
    """The first localize() call pays ~100+ ms of OpenCV/numpy set-up; pay it before the first frame."""
    import cv2

    image = np.zeros((240, 320, 3), np.uint8)
    image[:] = (230, 170, 180)  # pink background, a red cell and a stained nucleus
    cv2.circle(image, (100, 100), 30, (200, 120, 130), -1)
    cv2.circle(image, (200, 150), 20, (90, 60, 160), -1)
    localize(image)


@dataclass
class Pending:
    """A frame between capture and its record. States: in_flight -> done | retry | failed."""

    seq: int
    frame: Frame
    cells: Cells | None  # None until the answer brings the server detector's cells
    state: str = "in_flight"
    probs: np.ndarray | None = None
    error: str | None = None
    infer_ms: float | None = None
    attempts: int = 0
    version: str | None = None  # the served weights id known when the request was sent


@dataclass
class Counters:
    read: int = 0  # frames the source delivered this session
    recorded: int = 0  # frames newly recorded (with or without cells)
    no_cells: int = 0  # of those, frames without cells (recorded without a request)
    cells: int = 0  # cells newly recorded
    already_recorded: int = 0  # skipped before sending, or found recorded by the store (idempotent no-op)
    dropped: int = 0  # oldest waiting frames dropped because the server was slower than the source
    retried: int = 0  # requests re-sent after a server failure
    failed: int = 0  # frames with no record: the server rejected the request, or it broke the contract
    discarded: int = 0  # captured but not processed because the stream was stopping
    unrecorded: int = 0  # requests still unanswered when the client gave up on the server
    latency_ms: LatencyHistogram = field(default_factory=LatencyHistogram)  # capture -> labels, recorded frames
    infer_ms: LatencyHistogram = field(default_factory=LatencyHistogram)  # request round trip, answered requests


class StreamSession:
    """One run of the stream client: source, server client, store, tracker; `run()` returns the exit code."""

    def __init__(self, args: argparse.Namespace, source: Source, client: TritonPipelineClient, store: ResultStore,
                 state: SampleState) -> None:
        self.args = args
        self.source = source
        self.client = client
        self.store = store
        self.state = state
        self.sample = state.sample_id
        self.model_version = client.weights_id
        self.counters = Counters()
        self.results: queue.Queue[tuple[int, InferOutcome]] = queue.Queue()
        self.pending: OrderedDict[int, Pending] = OrderedDict()
        self.in_flight = 0
        self.seq = 0
        self.stop_event = threading.Event()  # stop capturing
        self.stop_reason: str | None = None
        self.exit_code = 0
        self.outage_since: float | None = None
        self.gave_up: str | None = None
        self.recovery_delay = RECOVERY_BACKOFF_S[0]
        self.tracker = CellTracker(first_track_id=state.next_track_id)
        self.next_index = 0 if state.last_frame_index is None else state.last_frame_index + 1  # tracker's clock
        self._seed_tracker()
        live_pacing = source.live or args.realtime is not None
        # Files read at the server's pace are prefetched: their latency starts when the client takes the frame.
        self.latency_from_take = not live_pacing and args.max_fps is None
        self.buffer = FrameBuffer(max(1, args.max_in_flight), drop_oldest=live_pacing)
        fps = args.realtime if args.realtime is not None else args.max_fps
        already = None if source.live else (lambda frame: store.has_frame(self.sample, frame.key))
        self.capture = CaptureThread(source, self.buffer, fps, self.stop_event, already)
        self.sink: VideoSink | None = None
        if args.save:
            self.sink = VideoSink(args.save, fps or source.fps)
        self.display = Display(args.show, log)
        self.started = time.perf_counter()
        self.wall_s = 0.0

    # ---- indexing and resume -------------------------------------------------------------------
    def _seed_tracker(self) -> None:
        """Continue the tracks of the sample's last recorded frame (a resumed still field keeps its ids)."""
        last = self.state.last_frame_index
        if last is None:
            return
        rows = [c for c in self.store.last_frame_cells(self.sample) if c["track_id"] is not None]
        for c in rows:
            box = np.array([c["x1"], c["y1"], c["x2"], c["y2"]], np.float64)
            self.tracker.tracks[int(c["track_id"])] = Track(int(c["track_id"]), box, last, last)
        self.tracker.last_frame_index = last

    # ---- signals -------------------------------------------------------------------------------
    def request_stop(self, reason: str, exit_code: int = 0) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.exit_code = exit_code
        self.stop_event.set()

    # ---- main loop -----------------------------------------------------------------------------
    def run(self) -> int:
        if self.args.localizer == "client":
            _warm_up_localizer()
        if self.state.differential.is_complete:
            self.request_stop(f"sample already complete ({self.state.differential.n_wbc} WBC, "
                              f"target {self.state.target})")
        else:
            self.capture.start()
        try:
            self._loop()
        finally:
            self.stop_event.set()
            self.buffer.close()
            if self.capture.is_alive():
                self.capture.join(5)
            self.wall_s = time.perf_counter() - self.started
            if self.sink:
                self.sink.close()
            self.display.close()
        self.counters.read = self.capture.read_count
        self.counters.already_recorded += self.capture.skipped_recorded
        self.counters.dropped = self.buffer.dropped
        if self.capture.error is not None and self.exit_code == 0:
            self.exit_code = EXIT_GAVE_UP
        return self.exit_code

    def _loop(self) -> None:
        while True:
            # Block on results only when no new frame may be taken (full, outage, stopping): no busy loop.
            retrying = any(p.state == "retry" for p in self.pending.values())
            blocked = retrying or self.stop_reason is not None or self.in_flight >= self.args.max_in_flight
            self._drain_results(timeout=0.02 if blocked and self.in_flight else 0.0)
            self._resend()
            self._record_ready()
            if any(p.state == "retry" for p in self.pending.values()):
                if self.in_flight == 0 and not self._recover():
                    return
                continue
            if self.stop_reason is not None:
                self.counters.discarded += self.buffer.discard()
                if self.in_flight == 0 and not self.pending:
                    return
                continue
            if self.in_flight >= self.args.max_in_flight:
                continue
            frame = self.buffer.get(timeout=0.005 if self.in_flight else 0.05)
            if frame is not None:
                self._start_frame(frame)
            elif (self.buffer.closed and len(self.buffer) == 0 and not self.capture.is_alive()
                  and self.in_flight == 0 and not self.pending):
                self.stop_reason = self.stop_reason or self.capture.end_reason or "end of source"
                return

    def _start_frame(self, frame: Frame) -> None:
        if self.latency_from_take:
            frame.captured_mono = time.perf_counter()
        if self.args.localizer == "server":  # the ensemble's detector finds the cells; they come with the answer
            pending = Pending(self.seq, frame, None)
            self.pending[self.seq] = pending
            self.seq += 1
            self._submit(pending)
            return
        cells = localize(frame.rgb)
        if len(cells) > MAX_CELLS:  # localize caps already; never send an invalid request
            keep = np.sort(np.argsort(-cells.scores, kind="stable")[:MAX_CELLS])
            cells = Cells(cells.boxes[keep], cells.kinds[keep], cells.scores[keep])
        pending = Pending(self.seq, frame, cells)
        self.pending[self.seq] = pending
        self.seq += 1
        if len(cells) == 0:  # N = 0: an empty result, no request
            pending.state = "done"
            pending.probs = np.zeros((0, NUM_CLASSES), np.float32)
            return
        self._submit(pending)

    def _resend(self) -> None:
        """Send again, in order and within --max-in-flight, the answers whose labelling version was not certain."""
        for p in list(self.pending.values()):
            if self.in_flight >= self.args.max_in_flight:
                return
            if p.state == "resend":
                self.counters.retried += 1
                self._submit(p)

    def _submit(self, pending: Pending) -> None:
        pending.state = "in_flight"
        pending.version = self.model_version
        pending.attempts += 1
        self.in_flight += 1
        seq = pending.seq
        boxes = None if self.args.localizer == "server" else pending.cells.boxes
        self.client.submit(pending.frame.rgb, boxes, lambda outcome: self.results.put((seq, outcome)))

    def _drain_results(self, timeout: float) -> None:
        try:
            item = self.results.get(timeout=timeout) if timeout > 0 else self.results.get_nowait()
        except queue.Empty:
            return
        answered = []
        while True:
            if self._on_result(*item):
                answered.append(self.pending[item[0]])
            try:
                item = self.results.get_nowait()
            except queue.Empty:
                break
        if answered:
            self._confirm_versions(answered)

    def _confirm_versions(self, answered: list[Pending]) -> None:
        """Which weights labelled these answers: the served weights id is read after they arrived; an answer whose
        request was sent under another id (the server loaded new weights in between: `leukograph adapt`, a restart)
        may come from either, so it is sent again. A recorded frame always carries the version that labelled it."""
        try:
            served = self.client.fetch_weights_id()
        except PipelineError as exc:  # the pipeline is going away (a reload, a restart): ask again once it is back
            for p in answered:
                p.state, p.error = "retry", str(exc)
            self._outage(exc)
            return
        if served != self.model_version:
            log(f"server now serves {served} (was {self.model_version}); new frames record it")
            self.model_version = served
        for p in answered:
            if p.version != served:
                p.state = "resend"

    def _outage(self, error: BaseException) -> None:
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            log(f"server unavailable ({error}); keeping frames and retrying for up to {self.args.retry_timeout:g} s")

    def _on_result(self, seq: int, outcome: InferOutcome) -> bool:
        """Handle one answer; True when it carries labels (the caller confirms which weights gave them)."""
        self.in_flight -= 1
        pending = self.pending[seq]
        if outcome.ok:
            pending.state, pending.probs = "done", outcome.probs
            if outcome.boxes is not None:  # a bare frame: the cells the server's detector found
                pending.cells = Cells(outcome.boxes, outcome.kinds, outcome.scores)
            pending.infer_ms = 1e3 * outcome.latency_s
            self.counters.infer_ms.append(pending.infer_ms)
            self.outage_since = None
            self.recovery_delay = RECOVERY_BACKOFF_S[0]
            return True
        error = outcome.error
        if isinstance(error, RequestNotSent) or (isinstance(error, RequestRejected) and self.client.is_ready()):
            pending.state, pending.error = "failed", str(error)
            log(f"frame {safe_name(pending.frame.ref)}: request rejected, nothing recorded: {error}")
            return False
        pending.state, pending.error = "retry", str(error)
        self._outage(error)
        return False

    def _recover(self) -> bool:
        """Wait (backoff) for the server, then re-send the failed requests in order. False: gave up."""
        assert self.outage_since is not None
        left = self.args.retry_timeout - (time.monotonic() - self.outage_since)
        stopping = self.stop_reason is not None
        if left <= 0 or stopping:
            waiting = list(self.pending.values())
            why = "stop requested during a server outage" if stopping else \
                f"server unavailable for {self.args.retry_timeout:g} s"
            self.gave_up = f"{why}; {len(waiting)} frame(s) not recorded (stream again with --sample " \
                           f"{self.sample} to resume)"
            if not stopping:
                self.request_stop(why, EXIT_GAVE_UP)
            else:
                self.exit_code = self.exit_code or EXIT_GAVE_UP
            # Record nothing after the first lost frame: a resumed run continues from there without gaps.
            self.counters.unrecorded = len(self.pending)
            self.pending.clear()
            self.counters.discarded += self.buffer.discard()
            return False
        deadline = time.monotonic() + min(self.recovery_delay, left)
        while time.monotonic() < deadline and self.stop_reason is None:
            time.sleep(0.05)
        self.recovery_delay = min(self.recovery_delay * 2, RECOVERY_BACKOFF_S[1])
        if self.stop_reason is not None:
            return True  # next round gives up (in-flight is empty)
        stopping_now = lambda: self.stop_reason is not None  # noqa: E731
        if not self.client.reconnect(timeout=min(2.0, max(left, 0.1)), should_stop=stopping_now):
            return True
        try:
            version = self.client.fetch_weights_id()
        except Exception:  # noqa: BLE001 - not ready after all: next round
            return True
        if version != self.model_version:
            log(f"server now serves {version} (was {self.model_version}); new frames record it")
            self.model_version = version
        retry = [p for p in self.pending.values() if p.state == "retry"]
        log(f"server back; re-sending {len(retry)} frame(s)")
        for p in retry:
            self.counters.retried += 1
            self._submit(p)
        return True

    # ---- recording, in frame order -------------------------------------------------------------
    def _record_ready(self) -> None:
        while self.pending:
            head = next(iter(self.pending.values()))
            if head.state not in ("done", "failed"):
                return
            self.pending.popitem(last=False)
            if head.state == "failed":
                self.counters.failed += 1
                continue
            self._record(head)

    def _record(self, p: Pending) -> None:
        cells = p.cells
        track_ids = self.tracker.update(cells.boxes, self.next_index)
        self.next_index += 1
        kinds = [CELL_KINDS[int(k)] for k in cells.kinds]
        labels = label_cells(p.probs, self.args.threshold, kinds) if len(cells) else []
        confidences = p.probs.max(axis=1) if len(cells) else np.zeros(0)
        records = cell_records(cells.boxes, kinds, labels, p.probs, track_ids)
        latency_ms = 1e3 * (time.perf_counter() - p.frame.captured_mono)
        outcome = record_classified_frame(  # the frame, its cells, and the review station's thumbnails
            self.store, self.sample, p.frame.rgb, records, source_key=p.frame.key, source=p.frame.ref,
            captured_at=p.frame.captured_at, received_at=time.time(), latency_ms=round(latency_ms, 3),
            model_version=p.version or self.model_version)
        if not outcome.new:
            self.counters.already_recorded += 1
            return
        self.counters.recorded += 1
        self.counters.cells += len(records)
        self.counters.no_cells += len(records) == 0
        self.counters.latency_ms.append(latency_ms)
        if self.args.verbose:
            wbc = [f"{lab}" for lab, kind in zip(labels, kinds) if kind == "wbc"]
            log(f"frame {outcome.frame_index} ({safe_name(p.frame.ref)}): {len(records)} cells, WBC {wbc or '-'}, "
                f"{latency_ms:.0f} ms")
        if self.sink or self.display.enabled:
            diff = self.state.differential
            caption = (f"{self.sample}  frame {outcome.frame_index}  WBC {diff.n_wbc}/{diff.target}  "
                       f"review {diff.n_unidentified}")
            annotated = draw_cells(p.frame.rgb, cells.boxes, labels, confidences, track_ids, caption)
            if self.sink:
                self.sink.write(annotated)
            self.display.show(annotated)
            if self.display.quit_requested:
                self.request_stop("quit from the window")
        if self.state.differential.is_complete:
            self.request_stop(f"target reached ({self.state.differential.n_wbc} identified WBC)")

    # ---- summary -------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        c = self.counters
        diff = self.state.differential  # live: exactly what a replay of the database gives
        video = None
        if self.sink is not None:
            readable = video_frame_count(self.sink.path) if self.sink.frames else 0
            video = {"path": str(self.sink.path), "frames_written": self.sink.frames, "frames_readable": readable}
        return {
            "sample": self.sample,
            "source": self.source.uri,
            "model_version": self.model_version,
            "protocol": self.client.protocol,
            "shm": self.client.use_shm,
            "stop_reason": self.stop_reason,
            "resumed": self.state.resumed,
            "frames": {"read": c.read, "recorded": c.recorded, "no_cells": c.no_cells,
                       "already_recorded": c.already_recorded, "dropped": c.dropped, "retried": c.retried,
                       "failed": c.failed, "discarded": c.discarded, "unrecorded": c.unrecorded},
            "cells_recorded": c.cells,
            "queue": {"capacity": self.buffer.capacity, "max_depth": self.buffer.max_depth,
                      "drop_oldest": self.buffer.drop_oldest, "max_in_flight": self.args.max_in_flight},
            "latency_ms": percentiles(c.latency_ms),
            "request_ms": percentiles(c.infer_ms),
            "wall_s": round(self.wall_s, 3),
            "frames_per_s": round(c.recorded / self.wall_s, 3) if self.wall_s > 0 else None,
            "differential": diff.summary().to_dict(),
            "differential_markdown": diff.to_markdown(),
            "review": diff.n_unidentified,
            "skipped_files": [{"path": path, "problem": problem}
                              for path, problem in getattr(self.source, "skipped", [])],
            "video": video,
        }


def format_summary(s: dict[str, Any]) -> str:
    f, lat = s["frames"], s["latency_ms"]
    lines = [f"Sample {s['sample']} ({s['model_version']}): {s['stop_reason']}", "", s["differential_markdown"], "",
             f"Review list: {s['review']} cell(s) (`leukograph report {s['sample']} --json -` lists them).",
             f"Frames: {f['recorded']} recorded ({f['no_cells']} without cells), {f['already_recorded']} already "
             f"recorded, {f['dropped']} dropped (server slower than the source), {f['retried']} retried, "
             f"{f['failed']} failed, {f['discarded']} discarded at stop, {f['unrecorded']} unrecorded; "
             f"{f['read']} read."]
    if lat["n"]:
        lines.append(f"Latency capture->labels: p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, "
                     f"p99 {lat['p99']:.1f} ms over {lat['n']} frames; {s['frames_per_s']:.2f} frames/s "
                     f"({s['protocol']}{', shm' if s['shm'] else ''}, queue max {s['queue']['max_depth']}"
                     f"/{s['queue']['capacity']}).")
    if s.get("skipped_files"):
        names = ", ".join(safe_name(f["path"]) for f in s["skipped_files"][:10])
        more = len(s["skipped_files"]) - 10
        lines.append(f"Skipped files: {len(s['skipped_files'])} ({names}{f' and {more} more' if more > 0 else ''}).")
    if s["video"]:
        v = s["video"]
        lines.append(f"Video: {v['path']}: {v['frames_written']} frames written, {v['frames_readable']} readable.")
    return "\n".join(lines)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Stream a camera, video, folder or URL through the Triton ensemble "
                                     "and count the white-cell differential", add_help=add_help)
    parser.add_argument("source", help="camera index (0), video file (.avi, .mp4), folder of images, or an "
                        "rtsp:// / http:// URL")
    parser.add_argument("--url", default=None,
                        help=f"Triton server (default {DEFAULT_URLS['grpc']} for gRPC, "
                        f"{DEFAULT_URLS['http']} for HTTP); several servers: a comma-separated list or "
                        "dns:///NAME:PORT, one request each in turn")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    parser.add_argument("--localizer", choices=LOCALIZERS, default="server",
                        help="server: send bare frames, the ensemble's detector finds the cells (default); client: "
                        "find them here with the classical localiser and send the boxes (a server without the "
                        "detector)")
    parser.add_argument("--shm", action="store_true",
                        help="send FRAME/BOXES through system shared memory (client on the server's host)")
    parser.add_argument("--max-in-flight", type=int, default=2, help="requests outstanding at once (default 2)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--realtime", type=float, default=None, metavar="FPS",
                      help="files: simulate a camera at FPS (drop the oldest waiting frames when the server is slower)")
    pace.add_argument("--max-fps", type=float, default=None, metavar="FPS",
                      help="files: read at most FPS frames/s, never dropping (default: as fast as the server allows)")
    parser.add_argument("--sample", default=None, help="sample id (default: sample-<timestamp>); an existing sample "
                        "is resumed")
    parser.add_argument("--target", type=int, default=DEFAULT_TARGET,
                        help=f"stop when this many WBC are identified (usually {' or '.join(map(str, TARGETS))}; "
                        f"default {DEFAULT_TARGET})")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"WBC below this top probability go to the review list (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--db", default=DEFAULT_DB, help=f"result database (default ./{DEFAULT_DB})")
    parser.add_argument("--retry-timeout", type=float, default=60.0,
                        help="seconds to keep retrying while the server is unavailable (default 60)")
    parser.add_argument("--save", default=None, metavar="VIDEO",
                        help="write the annotated stream (mp4v), e.g. annotated.mp4")
    parser.add_argument("--show", action="store_true", help="show the annotated stream in a window ('q' stops)")
    parser.add_argument("--json-summary", default=None, metavar="PATH",
                        help="also write the summary as JSON (- for stdout)")
    parser.add_argument("--verbose", "-v", action="store_true", help="one line per recorded frame")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if args.max_in_flight < 1:
        raise UserError("--max-in-flight must be >= 1")
    for name in ("realtime", "max_fps"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    if args.target < 1:
        raise UserError("--target must be >= 1")
    if not 0.0 <= args.threshold <= 1.0:
        raise UserError("--threshold must be in [0, 1]")
    if args.retry_timeout < 0:
        raise UserError("--retry-timeout must be >= 0")
    if args.save and Path(args.save).suffix.lower() not in (".mp4", ".avi", ".mov", ".m4v"):
        raise UserError("--save wants a video file name such as annotated.mp4")
    if args.save and not Path(args.save).expanduser().resolve().parent.is_dir():
        raise UserError(f"--save {args.save}: folder {Path(args.save).parent} does not exist")


def _install_signals(session_ref: list[StreamSession | None]) -> dict[int, Any]:
    """SIGINT/SIGTERM ask the session to stop gracefully; a second Ctrl-C aborts (KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        session = session_ref[0]
        interrupted = signum == signal.SIGINT
        if session is None:
            raise KeyboardInterrupt if interrupted else SystemExit(0)
        if session.stop_reason is not None and interrupted:
            raise KeyboardInterrupt
        log("stopping: finishing the requests in flight (Ctrl-C again to abort)")
        session.request_stop("interrupted (Ctrl-C)" if interrupted else "terminated (SIGTERM)",
                             EXIT_INTERRUPTED if interrupted else 0)

    return {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}


def main(args: argparse.Namespace) -> int:
    _check_args(args)
    sample = args.sample or datetime.now().strftime("sample-%Y%m%d-%H%M%S")
    session_ref: list[StreamSession | None] = [None]
    previous = _install_signals(session_ref)
    try:
        with open_source(args.source, report=log) as source:
            if source.live and args.max_fps is not None:
                raise UserError("--max-fps is for files; a live source runs at its own rate")
            try:  # one URL: one client; a list or dns:///NAME:PORT: round robin over servers (client/endpoints.py)
                client = open_client(args.url, args.protocol, localizer=args.localizer, shm=args.shm,
                                     max_in_flight=args.max_in_flight, log=log)
            except ValueError as exc:
                raise UserError(f"--url: {exc}") from None
            try:
                waited = [False]

                def on_wait(delay: float, why: str) -> None:
                    if not waited[0]:
                        log(f"{why}; waiting up to {args.retry_timeout:g} s")
                        waited[0] = True

                if not client.wait_ready(args.retry_timeout, on_wait=on_wait):
                    raise UserError(f"Triton server at {args.protocol}://{client.url} not ready after "
                                    f"{args.retry_timeout:g} s (is `leukograph serve` running?)")
                if not client.reconnect(timeout=args.retry_timeout):  # registers shm regions
                    raise UserError(f"cannot set up the connection to {client.url}")
                try:
                    client.weights_id  # noqa: B018 - asked once here, where a refusal is one line
                except PipelineError as exc:
                    raise UserError(f"cannot read the served weights id from {client.url}: {exc}") from None
                with ResultStore(args.db) as store:
                    require_unsigned(store.path, sample)
                    settings = {"threshold": args.threshold, "source": source.uri, "protocol": args.protocol}
                    state = store.start_sample(sample, args.target, client.weights_id, settings)
                    if state.resumed:
                        log(f"resuming sample {sample}: {state.n_frames} frames recorded, "
                            f"{state.differential.n_wbc}/{state.target} WBC identified")
                    session = StreamSession(args, source, client, store, state)
                    session_ref[0] = session
                    code = session.run()
                    summary = session.summary()
            finally:
                client.close()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(format_summary(summary), flush=True)
    if args.json_summary:
        text = json.dumps(summary, indent=2) + "\n"
        if args.json_summary == "-":
            sys.stdout.write(text)
        else:
            try:
                Path(args.json_summary).write_text(text)
            except OSError as exc:
                raise UserError(f"cannot write {args.json_summary}: {exc.strerror or exc}") from None
    video = summary["video"]
    if video and video["frames_written"] and video["frames_readable"] != video["frames_written"]:
        log(f"warning: {video['path']} reads back {video['frames_readable']} of {video['frames_written']} frames")
    if session.capture.error is not None:
        raise UserError(f"source failed: {session.capture.error}", EXIT_GAVE_UP)
    if session.gave_up:
        raise UserError(session.gave_up, EXIT_GAVE_UP)
    return code


if __name__ == "__main__":
    from leukograph.client.cli import main as cli_main

    sys.exit(cli_main(["stream", *sys.argv[1:]]))
