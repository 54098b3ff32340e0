"""The learned cell detector: a small CenterNet-style network and its served graph.

Network (`CellDetector`, ~0.9M parameters): the frame stretched to DETECTOR_SIZE x DETECTOR_SIZE, standardised per
image over its smear (channel means removed, one global scale: a yellow or blue background looks like any other;
black fill and field-stop corners left out of both, `standardise`), a 5-level
convolutional backbone (stride 2..32) with a top-down path back to stride DETECTOR_STRIDE, then one head giving per
output pixel: 3 kind logits (wbc/rbc/platelet centre heatmaps), log width/height (in output pixels) and the
sub-pixel centre offset.

Served graph (`DetectorStage`): FRAME (HxWx3 uint8) in; Cast, Resize to the working size, the network, sigmoid,
kind = ArgMax, peaks = score where 3x3 MaxPool equals it, TopK at the constant K = MAX_CELLS, Gathers of the size and
offset at the peaks, boxes scaled back to the frame and clipped. Only ops TensorRT's ONNX parser takes; coordinate
grids are constants (the working size is fixed), so no integer Div/Mod.

Field scale (`--field-scale S`, stored in the exported graph's metadata under FIELD_SCALE_KEY): a camera whose frame
shows a field S times wider and taller than BCCD's at the same magnification (a lower-power objective, a larger
sensor) draws every cell S times smaller against the frame; stretched to DETECTOR_SIZE, its white cells fall below
what the network was trained on. The served graph then works at S x DETECTOR_SIZE a side (the network is fully
convolutional; S^2 times the compute), so cells keep their trained size. The weights are the same.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leukograph.client.contract import (
    CELL_DETECTOR,
    CELL_KINDS,
    DETECTOR_SIZE,
    DETECTOR_STRIDE,
    DETECTOR_THRESHOLD,
    MAX_CELLS,
    MODEL_FILES,
    stage_path,
)
from leukograph.client.errors import UserError
from leukograph.client.localize import Cells, detector_cells
from leukograph.deploy.paths import DETECTOR_WEIGHTS, MODEL_REPOSITORY, WEIGHTS_DIR

OUTPUT_SIDE = DETECTOR_SIZE // DETECTOR_STRIDE
NUM_KINDS = len(CELL_KINDS)
HEAD_CHANNELS = NUM_KINDS + 4  # kind logits, log w, log h, offset x, offset y
HEAT_PRIOR = 0.05  # initial heatmap probability (focal-loss init)
OPSET = 17
BLACK_LEVEL = 10 / 255  # channel mean below which a pixel is fill or field stop, not smear
MIN_SMEAR_SHARE = 1e-3  # an all-black frame: no division by zero
FIELD_SCALE_KEY = "leukograph_field_scale"  # exported graph metadata: the field scale its working size was set for
MAX_FIELD_SCALE = 4.0
BACKBONE_STRIDE = 32  # the working side must be a multiple of the deepest level's stride


def check_field_scale(scale: float) -> float:
    """A field scale the served graph can work at: 1 to MAX_FIELD_SCALE, its working side a multiple of
    BACKBONE_STRIDE (steps of 0.125 for DETECTOR_SIZE 256)."""
    side = DETECTOR_SIZE * scale
    if not 1.0 <= scale <= MAX_FIELD_SCALE or side != round(side) or round(side) % BACKBONE_STRIDE:
        step = BACKBONE_STRIDE / DETECTOR_SIZE
        raise UserError(f"--field-scale must be from 1 to {MAX_FIELD_SCALE:g} in steps of {step:g} (the detector "
                        f"works at {DETECTOR_SIZE} x the scale a side, a multiple of {BACKBONE_STRIDE}), got {scale:g}")
    return float(scale)


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels),
                                  nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.body(x))


def standardise(x: Tensor) -> Tensor:
    """[B,3,H,W] in 0..1 -> channel means removed, divided by one global standard deviation per image, both taken
    over the smear only: pixels darker than BLACK_LEVEL (a rotated image's black fill, a microscope field stop's
    black corners) are left out of the statistics and set to the mean. A frame without such pixels is standardised
    exactly as over all its pixels (the share is then 1)."""
    smear = (x.mean(dim=1, keepdim=True) > BLACK_LEVEL).to(x.dtype)
    share = smear.mean(dim=(2, 3), keepdim=True).clamp_min(MIN_SMEAR_SHARE)
    centred = (x - (x * smear).mean(dim=(2, 3), keepdim=True) / share) * smear
    scale = (centred.pow(2).mean(dim=(1, 2, 3), keepdim=True) / share).add(1e-4).sqrt()
    return centred / scale


class CellDetector(nn.Module):
    """[B,3,S,S] float 0..1 -> [B, HEAD_CHANNELS, S/4, S/4] (kind logits, log size, offset)."""

    def __init__(self, widths: tuple[int, int, int, int] = (32, 64, 96, 128), neck: int = 32) -> None:
        super().__init__()
        w4, w8, w16, w32 = widths
        self.s4 = nn.Sequential(conv_bn(3, 16, stride=2), conv_bn(16, w4, stride=2), Residual(w4))
        self.s8 = nn.Sequential(conv_bn(w4, w8, stride=2), Residual(w8))
        self.s16 = nn.Sequential(conv_bn(w8, w16, stride=2), Residual(w16))
        self.s32 = nn.Sequential(conv_bn(w16, w32, stride=2), Residual(w32), Residual(w32))
        self.lateral = nn.ModuleList(nn.Conv2d(w, neck, 1) for w in (w4, w8, w16, w32))
        self.fuse = conv_bn(neck, neck)
        self.head = nn.Sequential(conv_bn(neck, neck), nn.Conv2d(neck, HEAD_CHANNELS, 1))
        bias = self.head[-1].bias
        with torch.no_grad():
            bias.zero_()
            bias[:NUM_KINDS] = -torch.log(torch.tensor((1 - HEAT_PRIOR) / HEAT_PRIOR))

    def forward(self, x: Tensor) -> Tensor:
        c4 = self.s4(standardise(x))
        c8 = self.s8(c4)
        c16 = self.s16(c8)
        c32 = self.s32(c16)
        p = self.lateral[3](c32)
        for level, feature in ((2, c16), (1, c8), (0, c4)):
            p = F.interpolate(p, scale_factor=2.0, mode="nearest") + self.lateral[level](feature)
        return self.head(self.fuse(p))


def decode(head: Tensor, frame_height: Tensor, frame_width: Tensor, k: int = MAX_CELLS) -> tuple[Tensor, ...]:
    """One image's head output [HEAD_CHANNELS, h, w] -> boxes [k,4] in frame pixels, scores [k], kinds [k] (int64),
    sorted by score. Peaks: the best kind's score where a 3x3 max-pool leaves it unchanged."""
    channels, height, width = head.shape
    heat = torch.sigmoid(head[:NUM_KINDS])
    best, kind = heat.max(dim=0)
    pooled = F.max_pool2d(best[None, None], 3, stride=1, padding=1)[0, 0]
    peaks = best * (pooled == best).to(best.dtype)
    scores, index = torch.topk(peaks.reshape(-1), k)
    grid_y, grid_x = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=head.device),
                                    torch.arange(width, dtype=torch.float32, device=head.device), indexing="ij")
    regression = head[NUM_KINDS:].reshape(4, -1)[:, index]
    cx = (grid_x.reshape(-1)[index] + regression[2]) * DETECTOR_STRIDE
    cy = (grid_y.reshape(-1)[index] + regression[3]) * DETECTOR_STRIDE
    half_w = torch.exp(regression[0]) * (DETECTOR_STRIDE / 2)
    half_h = torch.exp(regression[1]) * (DETECTOR_STRIDE / 2)
    sx = frame_width / (width * DETECTOR_STRIDE)
    sy = frame_height / (height * DETECTOR_STRIDE)
    x1 = torch.maximum((cx - half_w) * sx, torch.zeros_like(cx))
    y1 = torch.maximum((cy - half_h) * sy, torch.zeros_like(cy))
    x2 = torch.minimum((cx + half_w) * sx, frame_width.expand_as(cx))
    y2 = torch.minimum((cy + half_h) * sy, frame_height.expand_as(cy))
    return torch.stack([x1, y1, x2, y2], dim=1), scores, kind.reshape(-1)[index]


class DetectorStage(nn.Module):
    """The served cell_detector: FRAME (HxWx3 uint8) -> BOXES [K,4], SCORES [K], KINDS [K] int32, CELL_COUNT [1]."""

    def __init__(self, net: CellDetector, threshold: float = DETECTOR_THRESHOLD, field_scale: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.threshold = threshold
        self.side = round(DETECTOR_SIZE * check_field_scale(field_scale))  # the working size (module docstring)

    def forward(self, frame: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pixels = frame.to(torch.float32)
        # Shape of the float copy (the uint8 input feeds only the Cast), on the frame's device
        size = torch._shape_as_tensor(pixels).to(pixels.device, torch.float32)
        x = pixels.permute(2, 0, 1).unsqueeze(0) / 255.0
        x = F.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False)
        boxes, scores, kinds = decode(self.net(x)[0], size[0:1], size[1:2])
        count = (scores >= self.threshold).sum(dim=0, keepdim=True).to(torch.int32)  # a sum is int64 in torch
        return boxes, scores, kinds.to(torch.int32), count

    @torch.no_grad()
    def find_cells(self, image: np.ndarray) -> Cells:
        """The cells of one RGB uint8 image, in-process (the served stage's outputs cut to CELL_COUNT)."""
        return detector_cells(*(t.numpy() for t in self(torch.from_numpy(np.ascontiguousarray(image)))))


def working_view(frame: Tensor) -> Tensor:
    """Training's view of uint8 frames [B,H,W,3] already at the working size -> float [B,3,S,S] in 0..1."""
    return frame.permute(0, 3, 1, 2).to(torch.float32) / 255.0


def load_detector(weights_dir: Path = WEIGHTS_DIR) -> CellDetector:
    path = Path(weights_dir) / DETECTOR_WEIGHTS
    if not path.exists():
        raise UserError(f"no detector weights at {path}; run `leukograph train-detector` first")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    net = CellDetector(**checkpoint.get("config", {}))
    net.load_state_dict(checkpoint["model"])
    return net.eval()


def detector_onnx_path(repository: Path = MODEL_REPOSITORY) -> Path:
    return stage_path(repository, CELL_DETECTOR, MODEL_FILES["onnxruntime"])


def field_scale_of(path: Path) -> float:
    """The field scale an exported detector graph works at: 1 when the file is missing, unreadable (it is then
    exported again, `paths.graph_code_stale`) or does not say; the scale lives in the graph."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        return check_field_scale(float({prop.key: prop.value for prop in model.metadata_props}.get(FIELD_SCALE_KEY,
                                                                                                    1.0)))
    except Exception:  # noqa: BLE001 - a missing or broken graph says nothing
        return 1.0


def export_detector(net: CellDetector, path: Path, opset: int = OPSET, field_scale: float | None = None) -> Path:
    """Export the served detector graph (weights inline, dynamic frame height/width) working at `field_scale`;
    None keeps the scale of the graph already at `path` (`field_scale_of`: 1 without one)."""
    field_scale = field_scale_of(path) if field_scale is None else field_scale
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = DetectorStage(net.eval(), field_scale=field_scale).eval()
    example = torch.randint(0, 256, (480, 640, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(stage, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=CELL_DETECTOR.input_names, output_names=CELL_DETECTOR.output_names,
                          dynamic_axes=CELL_DETECTOR.dynamic_axes, do_constant_folding=True)
    from leukograph.training.export import save_served_graph

    return save_served_graph(path, CELL_DETECTOR.description, {FIELD_SCALE_KEY: f"{field_scale:g}"})


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export the cell detector to ONNX", add_help=add_help)
    parser.add_argument("--weights-dir", default=str(WEIGHTS_DIR), help="folder holding detector.pt")
    parser.add_argument("--repository", default=str(MODEL_REPOSITORY), help="model repository to write into")
    add_field_scale_argument(parser)
    return parser


def add_field_scale_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--field-scale", type=float, default=None, metavar="S",
                        help="the camera's field is S times wider and taller than BCCD's 640x480 frames at the same "
                             "magnification (its white cells S times smaller against the frame): the detector works "
                             f"at S x {DETECTOR_SIZE} a side, S^2 times the compute; 1 to {MAX_FIELD_SCALE:g} in "
                             "steps of 0.125 (default: what the repository's detector was exported with, else 1)")


def main(args: argparse.Namespace) -> int:
    path = export_detector(load_detector(Path(args.weights_dir)), detector_onnx_path(Path(args.repository)),
                           field_scale=args.field_scale)
    scale = field_scale_of(path)
    print(f"wrote {path} (field scale {scale:g}: works at {round(DETECTOR_SIZE * scale)} px a side)")
    return 0
