"""Classical (OpenCV) cell localiser: WBC, RBC and platelet boxes in a blood-smear image.

One source of truth: training builds its crops from these boxes and the client sends them at serving time.
Torch-free; numpy + OpenCV only. Deterministic.

Method (on a copy downscaled to WORK_SIDE):
* Stained nuclei (WBC) and platelets are strongly blue/purple: Lab b* channel well below neutral.
  That mask is split into groups (nucleus lobes merged by a dilation sized to the image), and each group
  is a WBC nucleus when its area is a large enough fraction of the image, else a platelet when not tiny.
  The WBC box is the nucleus box expanded by factors fitted on BCCD training frames (the GT box includes
  the cytoplasm).
* RBCs are the pink (Lab a* above neutral) regions outside WBCs; pallor holes are closed, and the peaks of
  the distance transform give one disc per cell, so touching cells separate.
* Scale comes from the image itself: the image size sets the lobe-merging radius and the WBC/platelet
  area split (WBCs are a sizeable fraction of a frame and most of a single-cell crop); the RBC disc radii
  come from the distance transform. Black pixels (augmentation fill) are excluded everywhere.
* Another lab's colour: when the first pass finds no WBC, the image is white-balanced against its own
  background (each channel's bright percentile, BACKGROUND_PERCENTILE, is mapped to BACKGROUND_TARGET) and
  localised again. A yellow, blue-grey, pink or dim background then looks like the fitted one. Images where the
  first pass finds a WBC are untouched, so results on the fitted sources do not move.
* A white cell cut by the field's edge: when neither pass finds a WBC, a nucleus-sized stain group that touches the
  image's border or its black fill is taken for the visible part of a WBC, from EDGE_WBC_MIN_AREA_FRAC of the image
  (a whole nucleus needs WBC_MIN_AREA_FRAC; BCCD training frames' cut nuclei start there, their platelets stay
  below it). Images where a pass finds a WBC are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from leukograph.client.contract import CELL_KINDS, MAX_CELLS

WBC, RBC, PLATELET = (CELL_KINDS.index(k) for k in ("wbc", "rbc", "platelet"))

# ---- tunables (fitted on BCCD training frames only; held-out frames are for measurement) -------------
WORK_SIDE = 320  # longer side of the working copy (images are never upscaled beyond their size)
MIN_SIDE = 8  # smaller images return no cells
BLACK_L_MAX = 40  # Lab L at or below this is augmentation fill / no data
BLACK_ERODE = 2  # px (working scale) to erode the valid area, so JPEG fringes at the fill edge don't count
NUC_B_MAX = 112  # Lab b* (uint8, neutral 128) at or below this is nucleus/platelet stain
NUC_L_MAX = 215  # ...and not brighter than this (guards against bright blue-ish glare)
NUC_OPEN = 3  # px opening of the stain mask (speckle removal)
LOBE_MERGE_FRAC = 0.015  # dilation radius merging nucleus lobes, as a fraction of sqrt(image area)
LOBE_MIN_REL = 0.15  # in a group, a blob below this fraction of the largest blob is no lobe (platelet, debris)
WBC_MIN_AREA_FRAC = 0.012  # a stain group with at least this fraction of the image area is a WBC nucleus
PLT_MIN_AREA_FRAC = 0.0005  # smaller groups down to this fraction are platelets when stained deeply enough
PLT_B_MAX = 102  # ... i.e. their darkest Lab b* is at or below this (faint blue specks on RBCs are not)
WBC_BOX_SCALE = (1.25, 1.2)  # WBC box width/height = stain-group box width/height * this (adds the cytoplasm)
PLT_BOX_SCALE = 1.8  # platelet box = stain box * this
RBC_A_MIN = 134  # Lab a* (uint8, neutral 128) at or above this is RBC pink
RBC_CLOSE_FRAC = 0.03  # closing radius (fraction of sqrt(image area)) filling RBC pallor holes
RBC_MIN_RADIUS_FRAC = 0.05  # distance-transform peak below this fraction of sqrt(image area) is no RBC
RBC_PEAK_SEP = 1.1  # two RBC peaks closer than this times the larger radius are one cell
RBC_BOX_SCALE = 1.3  # RBC box half-side = peak distance * this
WBC_SCORE_AREA = 2.0  # WBC score saturates at this multiple of WBC_MIN_AREA_FRAC
BACKGROUND_PERCENTILE = 97  # per channel, over valid pixels: the smear's background (brightest common colour)
BACKGROUND_TARGET = 212.0  # ... is mapped to this neutral grey (BCCD training frames' background is ~210)
MAX_BALANCE_GAIN = 4.0  # white-balance gains are clipped to [1 / this, this]
EDGE_WBC_MIN_AREA_FRAC = 0.005  # a stain group touching the field's edge is a cut WBC nucleus from this area fraction
EDGE_TOUCH = 2  # px (working scale): a stain group this close to the border or the black fill touches the edge


@dataclass(frozen=True)
class Cells:
    boxes: np.ndarray  # float32 [N,4] x1,y1,x2,y2 in input-image pixels, inside the image
    kinds: np.ndarray  # int64 [N], index into contract.CELL_KINDS
    scores: np.ndarray  # float32 [N] in [0,1], a confidence for the kind

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @staticmethod
    def empty() -> Cells:
        return Cells(np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), np.zeros((0,), np.float32))


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray | None:
    """Coerce to HxWx3 uint8 RGB, or None when that makes no sense."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.size == 0:
        return None
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.number):
            return None
        image = np.clip(np.nan_to_num(image.astype(np.float32)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def _disk(radius: int) -> np.ndarray:
    radius = max(int(radius), 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _stain_groups(lab: np.ndarray, valid: np.ndarray, unit: float) -> list[tuple[np.ndarray, int, bool, bool]]:
    """Blue/purple stain groups as (x1, y1, x2, y2) working-scale box (exclusive ends), pixel area, whether the
    group is a major one (a nucleus candidate made of its large lobes) or a minor blob left beside one, and whether
    it touches the field's edge (the image border or the black fill, within EDGE_TOUCH)."""
    stain = ((lab[:, :, 2] <= NUC_B_MAX) & (lab[:, :, 0] <= NUC_L_MAX) & valid).astype(np.uint8)
    stain = cv2.morphologyEx(stain, cv2.MORPH_OPEN, _disk(NUC_OPEN // 2))
    n_comp, comp, stats, _ = cv2.connectedComponentsWithStats(stain, connectivity=8)
    if n_comp <= 1:
        return []
    # Lobes closer than the merge radius form one group (one cell).
    merged = cv2.dilate(stain, _disk(round(LOBE_MERGE_FRAC * unit)))
    _, group = cv2.connectedComponents(merged, connectivity=8)
    comp_group = np.zeros(n_comp, np.int64)
    on = stain > 0
    comp_group[comp[on]] = group[on]
    areas = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    x1, y1 = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    x2, y2 = x1 + stats[:, cv2.CC_STAT_WIDTH], y1 + stats[:, cv2.CC_STAT_HEIGHT]
    edge = cv2.dilate((~valid).astype(np.uint8), _disk(EDGE_TOUCH), borderType=cv2.BORDER_CONSTANT,
                      borderValue=1) > 0  # outside the image counts as edge
    at_edge = np.zeros(n_comp, bool)
    at_edge[comp[on & edge]] = True
    out = []
    for g in np.unique(comp_group[1:]):
        members = np.nonzero(comp_group == g)[0]
        members = members[members > 0]
        major = areas[members] >= LOBE_MIN_REL * areas[members].max()
        for sel, is_major in ((members[major], True), *((np.array([m]), False) for m in members[~major])):
            box = np.array([x1[sel].min(), y1[sel].min(), x2[sel].max(), y2[sel].max()], np.float32)
            out.append((box, int(areas[sel].sum()), is_major, bool(at_edge[sel].any())))
    return out


def _darkest_b(lab: np.ndarray, box: np.ndarray) -> int:
    x1, y1, x2, y2 = box.astype(int)
    return int(lab[y1:y2, x1:x2, 2].min())


def _rbc_discs(lab: np.ndarray, valid: np.ndarray, unit: float,
               exclude: np.ndarray) -> list[tuple[float, float, float]]:
    """RBC discs (cx, cy, radius) at working scale from distance-transform peaks of the pink mask."""
    pink = ((lab[:, :, 1] >= RBC_A_MIN) & valid).astype(np.uint8)
    pink = cv2.morphologyEx(pink, cv2.MORPH_CLOSE, _disk(round(RBC_CLOSE_FRAC * unit)))
    pink[exclude] = 0
    pink = cv2.morphologyEx(pink, cv2.MORPH_OPEN, _disk(2))
    if not pink.any():
        return []
    dist = cv2.distanceTransform(pink, cv2.DIST_L2, 5)
    min_radius = RBC_MIN_RADIUS_FRAC * unit
    side = 2 * max(2, round(min_radius)) + 1  # square window: OpenCV dilates it separably (fast)
    peak = (dist >= cv2.dilate(dist, cv2.getStructuringElement(cv2.MORPH_RECT, (side, side)))) & (dist >= min_radius)
    ys, xs = np.nonzero(peak)
    if xs.size == 0:
        return []
    radii = np.minimum(dist[ys, xs], unit)  # a mask without background has "infinite" distances: no cell is larger
    order = np.lexsort((xs, ys, -radii))  # largest first, ties by position: deterministic
    kept: list[tuple[float, float, float]] = []
    for i in order:
        x, y, r = float(xs[i]), float(ys[i]), float(radii[i])
        if all((x - kx) ** 2 + (y - ky) ** 2 >= (RBC_PEAK_SEP * max(r, kr)) ** 2 for kx, ky, kr in kept):
            kept.append((x, y, r))
        if len(kept) >= MAX_CELLS:
            break
    return kept


def channel_percentiles(image: np.ndarray, mask: np.ndarray, q: float) -> np.ndarray:
    """`np.percentile(image[mask > 0], q, axis=0)` (its default linear method, to the last bit) from each channel's
    histogram of the masked pixels: a fraction of a millisecond on a 640x480 frame, where NumPy's partition of every
    pixel took about 20 ms. `image` uint8 HxWx3, `mask` uint8 HxW with at least one pixel set."""
    count = cv2.countNonZero(mask)
    position = (count - 1) * (q / 100)  # NumPy's virtual index for the linear method
    lower = int(np.floor(position))
    upper = min(lower + 1, count - 1)
    gamma = position - lower
    values = []
    for channel in range(3):
        cumulative = np.cumsum(cv2.calcHist([image], [channel], mask, [256], [0, 256]).ravel().astype(np.int64))
        below, above = (int(np.searchsorted(cumulative, rank, side="right")) for rank in (lower, upper))
        step = above - below  # NumPy's lerp: from the nearer end
        values.append(above - step * (1 - gamma) if gamma >= 0.5 else below + step * gamma)
    return np.asarray(values, np.float64)


def white_balance(image: np.ndarray) -> np.ndarray:
    """The image with each channel scaled so that its background (BACKGROUND_PERCENTILE of the non-black pixels)
    becomes BACKGROUND_TARGET: a neutral background whatever the lamp, camera or stain cast."""
    image = np.ascontiguousarray(image)
    brightest = cv2.max(cv2.max(image[:, :, 0], image[:, :, 1]), image[:, :, 2])
    valid = cv2.compare(brightest, BLACK_L_MAX, cv2.CMP_GT)  # 255 where any channel is above the fill level
    if cv2.countNonZero(valid) < 16:
        return image
    background = channel_percentiles(image, valid, BACKGROUND_PERCENTILE).astype(np.float32)
    gain = np.clip(BACKGROUND_TARGET / np.maximum(background, 1.0), 1.0 / MAX_BALANCE_GAIN, MAX_BALANCE_GAIN)
    # Per channel, each of the 256 levels scaled as float32, clipped and truncated, applied as a lookup table
    levels = np.arange(256, dtype=np.float32)[:, None] * gain
    table = np.clip(levels, 0, 255).astype(np.uint8).reshape(1, 256, 3)
    return cv2.LUT(image, table)


def localize(image_rgb: np.ndarray) -> Cells:
    """Boxes for the WBCs, RBCs and platelets in an RGB uint8 image (full frame, 4-class image or crop).

    A second pass on the white-balanced image runs only when the first finds no WBC; then, only when neither finds
    one, both again taking a nucleus cut by the field's edge for a WBC. Each image (as taken, balanced) is read once
    (`_read_stain`); a pass whose rule no stain group meets is skipped."""
    image = _as_rgb_uint8(image_rgb)
    if image is None or min(image.shape[:2]) < MIN_SIDE:
        return Cells.empty()
    taken = _read_stain(image)
    first = _cells(taken)
    if (first.kinds == WBC).any():
        return first
    balanced = _read_stain(white_balance(image))
    for stain, edge_cut in ((balanced, False), (taken, True), (balanced, True)):
        if stain is not None and any(_is_wbc(group, stain.area, edge_cut) for group in stain.groups):
            found = _cells(stain, edge_cut)
            if (found.kinds == WBC).any():
                return found
    return first


@dataclass(frozen=True)
class _Stain:
    """An image read at working scale: what every pass over it decides from."""
    lab: np.ndarray
    valid: np.ndarray  # bool: not black fill
    factor: float  # working scale / input scale
    size: tuple[int, int]  # input height, width
    area: float  # working-scale pixels
    unit: float  # sqrt(area): the image's own length scale
    groups: list[tuple[np.ndarray, int, bool, bool]]  # `_stain_groups`


def _read_stain(image: np.ndarray) -> _Stain | None:
    """A validated RGB uint8 image at working scale, its fill mask and stain groups; None when it is all fill."""
    h, w = image.shape[:2]
    factor = min(1.0, WORK_SIDE / max(h, w))
    small = image if factor == 1.0 else cv2.resize(
        image, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB)
    valid = (lab[:, :, 0] > BLACK_L_MAX).astype(np.uint8)
    valid = cv2.erode(valid, _disk(BLACK_ERODE), borderType=cv2.BORDER_REPLICATE) > 0
    if not valid.any():
        return None
    area = float(lab.shape[0] * lab.shape[1])
    unit = float(np.sqrt(area))
    return _Stain(lab, valid, factor, (h, w), area, unit, _stain_groups(lab, valid, unit))


def _is_wbc(group: tuple[np.ndarray, int, bool, bool], area: float, edge_cut: bool) -> bool:
    """A whole nucleus; with `edge_cut`, also a smaller one cut by the field's edge."""
    _, px, is_major, at_edge = group
    frac = px / area
    return is_major and (frac >= WBC_MIN_AREA_FRAC or edge_cut and at_edge and frac >= EDGE_WBC_MIN_AREA_FRAC)


def _cells(stain: _Stain | None, edge_cut: bool = False) -> Cells:
    """One localisation pass over a read image; `edge_cut`: a stain group touching the field's edge is a WBC from
    EDGE_WBC_MIN_AREA_FRAC of the image."""
    if stain is None:
        return Cells.empty()
    lab, valid, unit, area = stain.lab, stain.valid, stain.unit, stain.area
    (h, w), factor = stain.size, stain.factor
    sh, sw = lab.shape[:2]

    boxes: list[np.ndarray] = []
    kinds: list[int] = []
    scores: list[float] = []
    for group in stain.groups:
        box, px = group[0], group[1]
        frac = px / area
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        bw, bh = box[2] - box[0], box[3] - box[1]
        if _is_wbc(group, area, edge_cut):
            half_w, half_h = bw * WBC_BOX_SCALE[0] / 2, bh * WBC_BOX_SCALE[1] / 2
            kinds.append(WBC)
            scores.append(min(1.0, 0.5 + 0.5 * frac / (WBC_SCORE_AREA * WBC_MIN_AREA_FRAC)))
        elif frac >= PLT_MIN_AREA_FRAC and _darkest_b(lab, box) <= PLT_B_MAX:
            half_w, half_h = bw * PLT_BOX_SCALE / 2, bh * PLT_BOX_SCALE / 2
            kinds.append(PLATELET)
            scores.append(min(1.0, 0.5 + 0.5 * frac / WBC_MIN_AREA_FRAC))
        else:
            continue
        boxes.append(np.array([cx - half_w, cy - half_h, cx + half_w, cy + half_h], np.float32))

    # A stain blob centred inside a WBC box is WBC debris or granules, not a platelet.
    wbc_boxes = [b for b, k in zip(boxes, kinds) if k == WBC]
    inside = [k == PLATELET and any(w[0] <= (b[0] + b[2]) / 2 <= w[2] and w[1] <= (b[1] + b[3]) / 2 <= w[3]
                                    for w in wbc_boxes) for b, k in zip(boxes, kinds)]
    boxes = [b for b, drop in zip(boxes, inside) if not drop]
    scores = [s for s, drop in zip(scores, inside) if not drop]
    kinds = [k for k, drop in zip(kinds, inside) if not drop]

    exclude = np.zeros((sh, sw), bool)
    for box, kind in zip(boxes, kinds):
        if kind == WBC:
            x1, y1, x2, y2 = np.round(box).astype(int)
            exclude[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = True
    for x, y, r in _rbc_discs(lab, valid, unit, exclude):
        half = r * RBC_BOX_SCALE
        boxes.append(np.array([x - half, y - half, x + half, y + half], np.float32))
        kinds.append(RBC)
        scores.append(min(1.0, r / (2 * RBC_MIN_RADIUS_FRAC * unit)))

    if not boxes:
        return Cells.empty()
    out = np.stack(boxes) / np.float32(factor)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, w)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, h)
    kind_arr = np.asarray(kinds, np.int64)
    score_arr = np.clip(np.asarray(scores, np.float32), 0, 1)
    keep = (out[:, 2] - out[:, 0] >= 1) & (out[:, 3] - out[:, 1] >= 1)
    out, kind_arr, score_arr = out[keep], kind_arr[keep], score_arr[keep]
    # Most confident first (WBCs win ties), capped, then ordered: kind (WBC first), top-to-bottom, left-to-right.
    top = np.lexsort((out[:, 0], out[:, 1], kind_arr, -score_arr))[:MAX_CELLS]
    out, kind_arr, score_arr = out[top], kind_arr[top], score_arr[top]
    order = np.lexsort((out[:, 0], out[:, 1], kind_arr))
    return Cells(np.ascontiguousarray(out[order]), kind_arr[order], score_arr[order])


def detector_cells(boxes: np.ndarray, scores: np.ndarray, kinds: np.ndarray, count: np.ndarray | int,
                   keep_padding: bool = False) -> Cells:
    """The cell_detector stage's fixed-K outputs as Cells: rows [0, CELL_COUNT) are cells, the rest is padding
    (kept only when `keep_padding`, e.g. to rank every candidate for average precision)."""
    n = len(scores) if keep_padding else int(np.asarray(count).reshape(-1)[0])
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)[:n]
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return Cells(boxes[valid], np.asarray(kinds).astype(np.int64)[:n][valid],
                 np.asarray(scores, np.float32)[:n][valid])
