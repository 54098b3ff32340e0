"""Test-time views: a view of the frame and its boxes cuts exactly the viewed crops, on a real BCCD frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leukograph.client.images import read_image
from leukograph.training.datasets import load_bccd
from leukograph.training.models import crop_cells
from leukograph.training.views import VIEWS, check_views, view_crops, view_frame


@pytest.fixture(scope="module")
def frame_and_boxes() -> tuple[np.ndarray, np.ndarray]:
    frame = load_bccd()[0]
    boxes = np.array([b.box for b in frame.boxes], np.float32)
    return read_image(frame.image_path), boxes


def _crops(frame: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
    return crop_cells(torch.from_numpy(np.ascontiguousarray(frame)), torch.from_numpy(boxes))


@pytest.mark.parametrize("view", range(VIEWS))
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


def test_the_eight_views_are_distinct_and_view_0_is_the_crop(frame_and_boxes: tuple[np.ndarray, np.ndarray]) -> None:
    crops = _crops(*frame_and_boxes)
    viewed = [view_crops(crops, view) for view in range(VIEWS)]
    assert torch.equal(viewed[0], crops)
    for a in range(VIEWS):
        for b in range(a + 1, VIEWS):
            assert not torch.equal(viewed[a], viewed[b]), (a, b)


def test_views_are_one_or_eight() -> None:
    assert check_views(1) == 1 and check_views(VIEWS) == VIEWS
    with pytest.raises(ValueError, match="views must be 1"):
        check_views(4)
