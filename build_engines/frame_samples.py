"""Held-out samples moved to the largest frame an engine admits, for checking precision where coordinates are largest.

`in_corner` pastes a real frame into the bottom-right corner of a black frame of the largest admitted size and shifts
its boxes, so the cells keep their real size and appearance while their pixel coordinates reach the profile's maximum
(up to MAX_FRAME_SIDE = 4096): the worst case for fp16 coordinates, which are spaced 2 apart between 2048 and 4096.
"""

from __future__ import annotations

import numpy as np

from leukograph.build_engines.verify import Sample


def in_corner(sample: Sample, height: int, width: int) -> Sample:
    """`sample` pasted into the bottom-right corner of a black height x width frame, boxes shifted to match."""
    h, w = sample.frame.shape[:2]
    if h > height or w > width:
        raise ValueError(f"frame {h}x{w} does not fit in {height}x{width}")
    canvas = np.zeros((height, width, 3), np.uint8)
    canvas[height - h:, width - w:] = sample.frame
    shift = np.array([width - w, height - h, width - w, height - h], np.float32)
    return Sample(f"{sample.frame_id}@{height}x{width}", canvas, (sample.boxes + shift).astype(np.float32),
                  list(sample.labels), sample.box_source)


def largest_frame_samples(samples: list[Sample], height: int, width: int, count: int) -> list[Sample]:
    """The first `count` samples smaller than height x width, each in the corner of a height x width frame (none when
    the frames already have that size: the ordinary check covers them)."""
    fitting = [s for s in samples if s.frame.shape[0] <= height and s.frame.shape[1] <= width
               and s.frame.shape[:2] != (height, width)]
    return [in_corner(s, height, width) for s in fitting[:count]]
