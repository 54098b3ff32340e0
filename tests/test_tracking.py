"""Cell tracking across frames: jitter keeps identity, a moved stage starts new tracks (synthetic + BCCD boxes)."""

from __future__ import annotations

import numpy as np
import pytest

from leukograph.client.boxes import box_iou
from leukograph.client.differential import Differential
from leukograph.client.tracking import CellTracker
from leukograph.training.datasets import held_out_frames, load_bccd


def _grid(n: int = 12, side: float = 40.0, pitch: float = 70.0) -> np.ndarray:
    xy = np.array([(pitch * (i % 4) + 10, pitch * (i // 4) + 10) for i in range(n)], dtype=np.float64)
    return np.hstack([xy, xy + side])


@pytest.fixture(scope="module")
def held_out() -> list:
    held = held_out_frames()
    return [f for f in load_bccd() if f.frame_id in held and len(f.boxes) >= 2]


def test_box_iou() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], dtype=float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], dtype=float)
    np.testing.assert_allclose(box_iou(a, b), [[1, 50 / 150, 0], [1, 50 / 150, 0]])


def test_jitter_keeps_ids_and_only_first_frame_is_new() -> None:
    rng = np.random.default_rng(0)
    boxes = _grid()
    tracker = CellTracker()
    first = tracker.update(boxes, 0)
    assert first == list(range(len(boxes))) and all(tracker.is_new)
    for frame in range(1, 30):
        ids = tracker.update(boxes + rng.normal(0, 2.0, boxes.shape), frame)
        assert ids == first and not any(tracker.is_new)


def test_order_of_boxes_does_not_matter() -> None:
    boxes = _grid()
    tracker = CellTracker()
    first = tracker.update(boxes, 0)
    order = np.random.default_rng(1).permutation(len(boxes))
    assert tracker.update(boxes[order], 1) == [first[i] for i in order]


def test_missing_for_two_frames_is_tolerated_three_is_not() -> None:
    boxes = _grid()
    tracker = CellTracker(max_missed=2)
    first = tracker.update(boxes, 0)
    tracker.update(boxes[1:], 1)
    tracker.update(boxes[1:], 2)
    ids = tracker.update(boxes, 3)  # box 0 back after two missed updates: same cell
    assert ids == first and not any(tracker.is_new)
    for frame in (4, 5, 6):
        tracker.update(boxes[1:], frame)
    ids = tracker.update(boxes, 7)  # gone for three updates: a new track
    assert ids[1:] == first[1:] and ids[0] == len(boxes) and tracker.is_new == [True] + [False] * 11


def test_moved_stage_starts_new_tracks() -> None:
    boxes = _grid()
    tracker = CellTracker()
    first = tracker.update(boxes, 0)
    moved = boxes + np.array([23.0, 17.0, 23.0, 17.0])  # a few boxes still overlap a neighbour's old place
    ids = tracker.update(moved, 1)
    assert all(tracker.is_new) and set(ids).isdisjoint(first) and tracker.new_fields == 1
    # a new field where a few cells land by chance on old cells' places (3 of 12 IoU 1): still a new field
    chance = moved + 300.0
    chance[:3] = moved[:3]
    tracker.update(chance, 2)
    assert all(tracker.is_new) and tracker.new_fields == 2
    # an empty frame (blur while moving) ages tracks but assigns nothing
    assert tracker.update(np.zeros((0, 4)), 3) == []


def test_invalid_boxes_get_no_id_and_frame_index_must_increase() -> None:
    tracker = CellTracker(first_track_id=100)  # resume: ids continue after the sample's last one
    ids = tracker.update(np.array([[0, 0, 10, 10], [5, 5, 5, 9], [np.nan, 0, 1, 1]]), 3)
    assert ids == [100, None, None] and tracker.is_new == [True, False, False]
    with pytest.raises(ValueError):
        tracker.update(np.array([[0, 0, 10, 10]]), 3)


def test_bccd_boxes_jittered_then_new_field(held_out: list) -> None:
    """Real VOC boxes of a held-out frame, jittered over 5 frames with one cell missed once; then another
    frame (stage moved). Each cell is counted once."""
    rng = np.random.default_rng(0)
    frame, other = held_out[0], held_out[1]
    boxes = np.array([b.box for b in frame.boxes])
    kinds = [b.kind for b in frame.boxes]
    assert len(boxes) >= 10
    tracker = CellTracker()
    diff = Differential(target=100)
    first = tracker.update(boxes, 0)
    for track, kind in zip(first, kinds, strict=True):
        diff.observe("neutrophil" if kind == "wbc" else kind, track)
    for index in range(1, 5):
        keep = np.arange(len(boxes)) != 3 if index == 2 else np.ones(len(boxes), bool)
        ids = tracker.update(boxes[keep] + rng.normal(0, 2.0, boxes[keep].shape), index)
        assert ids == [t for t, k in zip(first, keep, strict=True) if k] and not any(tracker.is_new)
        for track, kind in zip(ids, np.array(kinds)[keep], strict=True):
            assert not diff.observe("neutrophil" if kind == "wbc" else kind, track)
    assert diff.n_wbc == kinds.count("wbc") and diff.n_platelets == kinds.count("platelet")
    other_boxes = np.array([b.box for b in other.boxes])
    ids = tracker.update(other_boxes, 5)
    assert all(tracker.is_new) and min(ids) == len(boxes)


def test_all_held_out_frames(held_out: list) -> None:
    """Every held-out frame: 5 jittered copies start no new track; the next frame is recognised as new."""
    rng = np.random.default_rng(1)
    spurious_new, missed_fields = 0, 0
    for frame, other in zip(held_out, held_out[1:], strict=False):
        boxes = np.array([b.box for b in frame.boxes])
        tracker = CellTracker()
        tracker.update(boxes, 0)
        for index in range(1, 5):
            tracker.update(boxes + rng.normal(0, 2.0, boxes.shape), index)
            spurious_new += sum(tracker.is_new)
        tracker.update(np.array([b.box for b in other.boxes]), 5)
        missed_fields += not all(tracker.is_new)
    assert spurious_new == 0
    assert missed_fields == 0, f"{missed_fields} of {len(held_out) - 1} new fields partly matched old tracks"
