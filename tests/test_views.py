"""Test-time views: a view of the frame and its boxes cuts the viewed crops, on a real BCCD frame: flips and turns
exactly, scaled views up to the stored crop's own bilinear step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leukograph.client.images import read_image
from leukograph.training.augment import stored_to_served
from leukograph.training.cells import crops_for
from leukograph.training.datasets import load_bccd
from leukograph.training.models import STORE_ZOOM, crop_cells
from leukograph.training.views import (
    DIHEDRAL,
    VIEW_SCALES,
    VIEWS,
    check_views,
    frame_views,
    scale_boxes,
    view_crops,
    view_frame,
    view_scale,
    view_stored,
)


@pytest.fixture(scope="module")
def frame_and_boxes() -> tuple[np.ndarray, np.ndarray]:
    frame = load_bccd()[0]
    boxes = np.array([b.box for b in frame.boxes], np.float32)
    return read_image(frame.image_path), boxes


def _crops(frame: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
    return crop_cells(torch.from_numpy(np.ascontiguousarray(frame)), torch.from_numpy(boxes))


@pytest.mark.parametrize("view", range(DIHEDRAL))
def test_viewed_frame_cuts_the_viewed_crops(frame_and_boxes: tuple[np.ndarray, np.ndarray], view: int) -> None:
    frame, boxes = frame_and_boxes
    assert frame.shape[0] != frame.shape[1]  # a 640x480 frame: transposing changes its shape
    viewed_frame, viewed_boxes = view_frame(frame, boxes, view)
    assert viewed_frame.shape == (frame.shape[:2] if view < 4 else frame.shape[1::-1]) + (3,)
    widths = viewed_boxes[:, 2] - viewed_boxes[:, 0]
    assert (widths > 0).all() and (viewed_boxes[:, 3] > viewed_boxes[:, 1]).all()
    # float32 sample positions near x = 640 round differently: well under a quarter of one uint8 step
    torch.testing.assert_close(_crops(viewed_frame, viewed_boxes), view_crops(_crops(frame, boxes), view),
                               atol=1e-3, rtol=0)


def test_the_views_are_distinct_and_view_0_is_the_crop(frame_and_boxes: tuple[np.ndarray, np.ndarray]) -> None:
    frame, boxes = frame_and_boxes
    stored = crops_for(frame, boxes)
    viewed = [view_stored(stored, view) for view in range(VIEWS)]
    assert torch.equal(viewed[0], stored_to_served(stored, STORE_ZOOM))
    for a in range(VIEWS):
        for b in range(a + 1, VIEWS):
            assert not torch.equal(viewed[a], viewed[b]), (a, b)


@pytest.mark.parametrize("view", range(VIEWS))
def test_stored_crops_give_the_frames_view(frame_and_boxes: tuple[np.ndarray, np.ndarray], view: int) -> None:
    """What evaluation reads from stored crops is what classify cuts from the viewed frame: flips and turns to the
    stored crops' uint8 step; a scaled view re-samples the stored crop, so it differs where the frame's crop is
    sharpest (its edge against the black outside the frame), within 0.005 on average."""
    frame, boxes = frame_and_boxes
    viewed_frame, viewed_boxes = view_frame(frame, boxes, view)
    difference = (_crops(viewed_frame, viewed_boxes) - view_stored(crops_for(frame, boxes), view)).abs()
    if view_scale(view) == 1.0:
        assert difference.max() <= 1 / 255
    else:
        assert difference.mean() < 0.005 and torch.quantile(difference.flatten()[::7], 0.99) < 0.05


def test_a_scaled_view_shows_the_cell_larger_or_smaller(frame_and_boxes: tuple[np.ndarray, np.ndarray]) -> None:
    """Scale s keeps each box's centre and divides its sides by s: the cell fills s times as much of its crop."""
    _, boxes = frame_and_boxes
    for scale in VIEW_SCALES:
        scaled = scale_boxes(boxes, scale)
        np.testing.assert_allclose(scaled[:, :2] + scaled[:, 2:], boxes[:, :2] + boxes[:, 2:], atol=1e-3)
        np.testing.assert_allclose(scaled[:, 2:] - scaled[:, :2], (boxes[:, 2:] - boxes[:, :2]) / scale, rtol=1e-5)


def test_frame_views_batch_every_scale_of_a_flip(frame_and_boxes: tuple[np.ndarray, np.ndarray]) -> None:
    """One crop_embedder call per flip or turn carries that flip's boxes at every scale; together the calls cover
    every view but the served one, once."""
    frame, boxes = frame_and_boxes
    for views in (DIHEDRAL, VIEWS):
        seen = []
        for ids, viewed_frame, stacked in frame_views(frame, boxes, views):
            assert len(stacked) == len(ids) * len(boxes)
            for k, view in enumerate(ids):
                expected_frame, expected_boxes = view_frame(frame, boxes, view)
                assert np.array_equal(viewed_frame, expected_frame)
                np.testing.assert_array_equal(stacked[k * len(boxes):(k + 1) * len(boxes)], expected_boxes)
            seen += ids
        assert sorted(seen) == list(range(1, views))


def test_views_are_one_eight_or_every_scale() -> None:
    assert check_views(1) == 1 and check_views(DIHEDRAL) == DIHEDRAL and check_views(VIEWS) == VIEWS == 24
    with pytest.raises(ValueError, match="views must be 1"):
        check_views(4)
