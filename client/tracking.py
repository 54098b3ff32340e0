"""Keep one identity per cell across the frames of a still field, so a cell is counted once.

A camera streams ~30 frames/s of the same field until the technologist moves the stage. `CellTracker` matches
each frame's boxes to the live tracks by IoU with an optimal assignment (`scipy.optimize.linear_sum_assignment`
on 1 - IoU), so localiser jitter keeps the identity, and a track survives `max_missed` updates without a match
(a cell the localiser missed for a couple of frames).

New field: when the stage moves, the new boxes overlap the old ones only by chance. Dense red-cell fields do
give chance overlaps above the IoU threshold, so a frame where fewer than `new_field_fraction` of the possible
matches succeed is treated as a new field: every live track ends and every box starts a new track.

Counting policy (see `differential.Differential.observe`): a track is counted once, at its first observation;
a track first seen as UNIDENTIFIED takes its first later confident WBC class. `is_new` tells which boxes of the
last update started a track (a cell never seen before).

Thresholds, measured on BCCD's VOC boxes (1000 random pairs of unrelated frames; every frame jittered with
Gaussian noise on each coordinate): at IoU >= 0.5 unrelated frames match 11% of possible pairs on average (p99 36%),
while jitter of sd 3 px matches 100% and sd 6 px 98.5% (worst frame 50%). Hence IoU 0.5 and a new field below
50% matched. At IoU 0.3 chance matches reach 34% on average: too close to tell fields apart.

Limitation: a stage pan faster than roughly a quarter of a cell's width per processed frame breaks matching,
and the cells seen during the pan start new tracks. Count on still fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from leukograph.client.boxes import box_iou

DEFAULT_IOU_THRESHOLD = 0.5
DEFAULT_MAX_MISSED = 2  # updates a track may go unmatched and still be continued
DEFAULT_NEW_FIELD_FRACTION = 0.5




@dataclass
class Track:
    track_id: int
    box: np.ndarray  # last matched box
    first_frame: int
    last_frame: int
    hits: int = 1
    missed: int = 0  # consecutive updates without a match


class CellTracker:
    """Persistent track ids for boxes across consecutive frames (IoU + Hungarian assignment)."""

    def __init__(self, iou_threshold: float = DEFAULT_IOU_THRESHOLD, max_missed: int = DEFAULT_MAX_MISSED,
                 new_field_fraction: float = DEFAULT_NEW_FIELD_FRACTION, first_track_id: int = 0) -> None:
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        if max_missed < 0:
            raise ValueError("max_missed must be >= 0")
        self.iou_threshold = iou_threshold
        self.max_missed = max_missed
        self.new_field_fraction = new_field_fraction
        self.next_track_id = int(first_track_id)  # resume: start after the sample's last recorded id
        self.tracks: dict[int, Track] = {}
        self.last_frame_index: int | None = None
        self.is_new: list[bool] = []  # per box of the last update: True when it started a track
        self.new_fields = 0  # field changes detected (stage moves)

    def _new_track(self, box: np.ndarray, frame_index: int) -> int:
        track_id = self.next_track_id
        self.next_track_id += 1
        self.tracks[track_id] = Track(track_id, box.copy(), frame_index, frame_index)
        return track_id

    def update(self, boxes: np.ndarray, frame_index: int) -> list[int | None]:
        """Assign a track id to every box of this frame (None for a box with no area or non-finite values).

        Sets `self.is_new` (one bool per box). frame_index must increase from call to call."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if self.last_frame_index is not None and frame_index <= self.last_frame_index:
            raise ValueError(f"frame_index {frame_index} does not follow {self.last_frame_index}")
        self.last_frame_index = frame_index
        valid = np.isfinite(boxes).all(axis=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        box_rows = np.flatnonzero(valid)
        track_ids = list(self.tracks)
        ids: list[int | None] = [None] * len(boxes)
        matched_boxes: set[int] = set()
        matched_tracks: set[int] = set()
        if len(box_rows) and track_ids:
            iou = box_iou(boxes[box_rows], np.stack([self.tracks[t].box for t in track_ids]))
            rows, cols = linear_sum_assignment(1.0 - iou)
            pairs = [(r, c) for r, c in zip(rows, cols, strict=True) if iou[r, c] >= self.iou_threshold]
            possible = min(len(box_rows), len(track_ids))
            if len(pairs) < self.new_field_fraction * possible:
                # Too few overlaps to be the same field: the stage moved.
                self.new_fields += 1
                self.tracks.clear()
                pairs = []
            for r, c in pairs:
                track = self.tracks[track_ids[c]]
                box_index = int(box_rows[r])
                track.box = boxes[box_index].copy()
                track.last_frame = frame_index
                track.hits += 1
                track.missed = 0
                ids[box_index] = track.track_id
                matched_boxes.add(box_index)
                matched_tracks.add(track.track_id)
        for track_id in list(self.tracks):
            if track_id not in matched_tracks:
                self.tracks[track_id].missed += 1
                if self.tracks[track_id].missed > self.max_missed:
                    del self.tracks[track_id]
        self.is_new = [False] * len(boxes)
        for box_index in box_rows:
            if int(box_index) not in matched_boxes:
                ids[box_index] = self._new_track(boxes[box_index], frame_index)
                self.is_new[box_index] = True
        return ids
