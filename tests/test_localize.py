"""The classical localiser on real BCCD and 4-class data (held-out frames only for the targets)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukograph.client.boxes import box_iou
from leukograph.client.contract import CELL_KINDS, MAX_CELLS
from leukograph.client.images import read_image
from leukograph.client.localize import (
    WBC,
    Cells,
    _cells,
    _read_stain,
    channel_percentiles,
    localize,
    white_balance,
)
from leukograph.deploy.paths import REPO_ROOT
from leukograph.training.localize_eval import (
    crop_recall,
    evaluate_localizer,
    select_frames,
    wbc_crops,
    wbc_found_rates,
)

FOUR_CLASS_SAMPLE = 200


@pytest.fixture(scope="module")
def held_out() -> tuple[list, list[np.ndarray], dict]:
    frames = select_frames("held-out")
    images = [read_image(frame.image_path) for frame in frames]
    return frames, images, evaluate_localizer(frames, 0.5, images)


def _check_cells(cells: Cells, shape: tuple[int, ...]) -> None:
    h, w = shape[:2]
    n = len(cells)
    assert n <= MAX_CELLS
    assert cells.boxes.dtype == np.float32 and cells.boxes.shape == (n, 4)
    assert cells.kinds.dtype == np.int64 and cells.kinds.shape == (n,)
    assert cells.scores.dtype == np.float32 and cells.scores.shape == (n,)
    if n:
        assert ((cells.kinds >= 0) & (cells.kinds < len(CELL_KINDS))).all()
        assert ((cells.scores >= 0) & (cells.scores <= 1)).all()
        assert (cells.boxes[:, 2] > cells.boxes[:, 0]).all() and (cells.boxes[:, 3] > cells.boxes[:, 1]).all()
        assert (cells.boxes[:, :2] >= 0).all() and (cells.boxes[:, 2] <= w).all() and (cells.boxes[:, 3] <= h).all()
        assert (np.diff(cells.kinds) >= 0).all()  # WBCs first


def test_wbc_targets_on_held_out_frames(held_out) -> None:
    frames, images, result = held_out
    wbc = result["per_kind"]["wbc"]
    assert len(frames) == 72 and wbc["gt"] == 72
    assert wbc["recall"] >= 0.98, wbc
    assert wbc["precision"] >= 0.95, wbc
    # Context cells have no target (RBC GT is incomplete in BCCD); guard against collapse only.
    assert result["per_kind"]["rbc"]["recall"] >= 0.35
    assert result["per_kind"]["platelet"]["recall"] >= 0.45
    for image, cells in zip(images, result["cells"]):
        _check_cells(cells, image.shape)


def test_deterministic(held_out) -> None:
    _, images, result = held_out
    again = localize(images[0])
    first = result["cells"][0]
    assert np.array_equal(again.boxes, first.boxes) and np.array_equal(again.kinds, first.kinds)
    assert np.array_equal(again.scores, first.scores)


def test_speed_one_core(held_out) -> None:
    # Target is >= 100 frames/s; the test machine is shared, so allow a margin.
    assert held_out[2]["frames_per_s_one_core"] >= 50


def test_four_class_test_images_have_a_wbc() -> None:
    from leukograph.training.datasets import load_four_class

    test = load_four_class(split="TEST")
    sample = test[:: len(test) // FOUR_CLASS_SAMPLE][:FOUR_CLASS_SAMPLE]
    images = [read_image(img.path) for img in sample]
    rates = wbc_found_rates(images)
    assert rates["at_least_one_wbc"] >= 0.97, rates
    assert rates["exactly_one_wbc"] >= 0.9, rates
    for image in images[:20]:
        _check_cells(localize(image), image.shape)


def test_white_cell_cut_by_the_field_edge() -> None:
    """A 4-class TRAIN image whose lymphocyte the augmentation shifted half out of view: one pass takes the cut
    nucleus for too small, the edge rule finds it, at the border."""
    from leukograph.training.datasets import load_four_class

    item = next(i for i in load_four_class(split="TRAIN") if i.path.name == "_2_8743.jpeg")
    image = read_image(item.path)
    assert not (_cells(_read_stain(image)).kinds == WBC).any()
    cells = localize(image)
    _check_cells(cells, image.shape)
    wbc = cells.boxes[cells.kinds == WBC]
    assert len(wbc) == 1 and (wbc[0, 1] <= 1 or wbc[0, 3] >= image.shape[0] - 1 or wbc[0, 0] <= 1
                              or wbc[0, 2] >= image.shape[1] - 1)


def test_held_out_white_cells_cut_by_the_frame_edge(held_out) -> None:
    """Each single-WBC held-out frame cut at 30% of its white cell's width: the part left at the right border is found
    (60 of 65 such frames; 50 without the edge rule)."""
    frames, images, _ = held_out
    hits = tried = 0
    for frame, image in zip(frames, images):
        wbc = [b.box for b in frame.boxes if b.kind == "wbc"]
        if len(wbc) != 1:
            continue
        x1, y1, x2, y2 = wbc[0]
        cut = int(x1 + 0.3 * (x2 - x1))
        if cut < 100:
            continue
        cells = localize(image[:, :cut])
        tried += 1
        found = cells.boxes[cells.kinds == WBC]
        hits += bool(len(found) and box_iou(found, np.array([[x1, y1, cut, y2]], np.float32)).max() >= 0.3)
    assert tried == 65 and hits >= 58, (hits, tried)


def test_channel_percentiles_are_numpy_s_to_the_bit() -> None:
    """The histogram percentile is NumPy's linear percentile of the masked pixels, exactly, ties and gaps included."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        height, width = rng.integers(4, 90, 2)
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if trial % 2:
            image = (image // 37 * 37).astype(np.uint8)  # few levels: many ties, gaps between them
        mask = (rng.random((height, width)) < rng.uniform(0.05, 1.0)).astype(np.uint8) * 255
        mask.flat[rng.integers(mask.size)] = 255
        for q in (0.0, 3.3, 50.0, 97.0, 99.9, 100.0):
            assert np.array_equal(channel_percentiles(image, mask, q), np.percentile(image[mask > 0], q, axis=0))


def test_white_balance_is_unchanged_by_its_faster_form(held_out) -> None:
    """The lookup-table white balance gives, pixel for pixel, the float32 scaling it replaced."""
    def reference(image: np.ndarray) -> np.ndarray:
        valid = image.max(axis=2) > 40
        background = np.percentile(image[valid], 97, axis=0).astype(np.float32)
        gain = np.clip(212.0 / np.maximum(background, 1.0), 0.25, 4.0)
        return np.clip(image.astype(np.float32) * gain, 0, 255).astype(np.uint8)

    _, images, _ = held_out
    for image in images[:8]:
        cast = (image.astype(np.float32) * np.array([1.0, 0.9, 0.6], np.float32)).astype(np.uint8)
        for framed in (image, cast, cast[:, ::-1]):  # a mirrored view: not contiguous
            assert np.array_equal(white_balance(framed), reference(framed))


def test_single_cell_crops(held_out) -> None:
    frames, images, _ = held_out
    crops = wbc_crops(frames, images)
    assert crop_recall(crops)["wbc_recall"] >= 0.95
    # The same crops at other sizes (the scale comes from the image itself).
    for size in (48, 1000):
        hits = 0
        for crop, gt in crops[::6]:
            f = size / max(crop.shape[:2])
            resized = cv2.resize(crop, (max(1, round(crop.shape[1] * f)), max(1, round(crop.shape[0] * f))),
                                 interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
            cells = localize(resized)
            _check_cells(cells, resized.shape)
            sel = cells.kinds == WBC
            hits += bool(sel.any() and box_iou(cells.boxes[sel], gt * f).max() >= 0.5)
        assert hits >= 0.9 * len(crops[::6]), (size, hits)


@pytest.mark.parametrize("image", [
    np.zeros((480, 640, 3), np.uint8),
    np.zeros((10, 10, 3), np.uint8),
    np.full((10, 10, 3), 200, np.uint8),
    np.full((3, 2, 3), 90, np.uint8),
    np.zeros((0, 0, 3), np.uint8),
    np.full((480, 640, 3), 255, np.uint8),
    np.full((240, 320, 3), 128, np.uint8),
], ids=["black", "tiny-black", "tiny-grey", "3x2", "empty", "white", "grey"])
def test_degenerate_inputs_are_empty(image: np.ndarray) -> None:
    cells = localize(image)
    assert len(cells) == 0
    _check_cells(cells, image.shape)


def test_grayscale_looking_frame(held_out) -> None:
    _, images, _ = held_out
    gray = cv2.cvtColor(images[0], cv2.COLOR_RGB2GRAY)
    for image in (gray, np.repeat(gray[:, :, None], 3, axis=2)):
        cells = localize(image)
        _check_cells(cells, image.shape)
        assert not (cells.kinds == WBC).any()  # no stain colour, no WBC


def test_black_fill_creates_no_cells(held_out) -> None:
    _, images, _ = held_out
    image = images[1].copy()
    image[:, : image.shape[1] // 3] = 0  # augmentation-style fill
    base = localize(images[1])
    cells = localize(image)
    _check_cells(cells, image.shape)
    centres_x = (cells.boxes[:, 0] + cells.boxes[:, 2]) / 2
    assert (centres_x > image.shape[1] // 3 - 20).all()
    assert len(cells) <= len(base)


def test_cli_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "localize.json"
    cli = Path(sys.executable).parent / "leukograph"
    proc = subprocess.run([str(cli), "localize-eval", "--four-class", "40", "--json", str(out),
                           "--localizers", ""],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| wbc |" in proc.stdout and "frames/s" in proc.stdout
    result = json.loads(out.read_text())
    assert result["per_kind"]["wbc"]["recall"] >= 0.98
    assert result["four_class_test"]["images"] == 40
    assert result["crops"]["crops"] == 72


def _centre_wbc_found(image: np.ndarray) -> bool:
    from leukograph.training.cells import centre_box_index

    cells = localize(image)
    return centre_box_index(cells.boxes[cells.kinds == WBC], *image.shape[:2]) >= 0


def test_pbc_white_cells_are_found() -> None:
    """Target: >= 99% of PBC images of the nucleated classes have a WBC box on the centred cell (all 1,925)."""
    from leukograph.client.contract import NUCLEATED_CLASSES
    from leukograph.training.datasets import load_pbc

    images = [img for img in load_pbc() if img.label in NUCLEATED_CLASSES]
    found = [_centre_wbc_found(read_image(img.path)) for img in images]
    assert len(found) == 1925 and np.mean(found) >= 0.99, np.mean(found)


@pytest.mark.parametrize("cast", ["yellow", "blue-grey", "pink", "dim"])
def test_other_labs_backgrounds(cast: str) -> None:
    """Yellow, blue-grey, pink or dim backgrounds (lamp, camera, stain): the white cell is still found."""
    from leukograph.training.datasets import load_four_class, load_pbc

    gain, offset = {"yellow": ((1.0, 0.97, 0.7), (10, 5, -20)), "blue-grey": ((0.85, 0.9, 1.0), (-10, 0, 10)),
                    "pink": ((1.0, 0.85, 0.95), (15, -5, 5)), "dim": ((0.7, 0.7, 0.7), (0, 0, 0))}[cast]
    pbc = [img for img in load_pbc() if img.label not in ("platelet",)][::40]
    four = list(load_four_class(split="TEST"))[::120]

    def shifted(path: Path) -> np.ndarray:
        image = read_image(path).astype(np.float32) * np.array(gain) + np.array(offset)
        return np.clip(image, 0, 255).astype(np.uint8)

    assert np.mean([_centre_wbc_found(shifted(img.path)) for img in pbc]) >= 0.95
    assert np.mean([(localize(shifted(img.path)).kinds == WBC).any() for img in four]) >= 0.95


@pytest.mark.parametrize("scale", [0.15, 1.6])
def test_white_cells_30_to_300_px(scale: float) -> None:
    """PBC white cells are ~190 px across: scaled to ~30 px (a 40x field) and ~300 px (a 100x oil crop)."""
    from leukograph.training.datasets import load_pbc

    pbc = [img for img in load_pbc() if img.label not in ("platelet",)][::40]
    found = [_centre_wbc_found(cv2.resize(read_image(img.path), None, fx=scale, fy=scale,
                                          interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR))
             for img in pbc]
    assert np.mean(found) >= 0.95, np.mean(found)
