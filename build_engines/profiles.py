"""TensorRT optimisation profiles (min/opt/max) for the served stages, and the limits a served config advertises.

Pure python: the dynamic dimensions come from `contract.StageSpec.dynamic_axes` ("cells", "height", "width"), so a
new dynamic input needs no change here.

One source for what a deployment accepts: the default profile IS the contract - frames MIN_FRAME_SIDE..MAX_FRAME_SIDE
on both sides and 1..MAX_CELLS cells, the same limits every generated config.pbtxt advertises (its max_cells /
min_frame_side / max_frame_side parameters, from the same contract constants). Triton's TensorRT backend refuses, per
request, any shape outside the engine's optimisation profile, so a profile narrower than the config would make the
config promise frames the engine refuses. Only opt is deployment-specific by default: BCCD's camera, 640 wide x 480
high, and 16 cells (BCCD frames hold a median of ~13 boxes); TensorRT tunes kernels for opt and accepts the whole
range (TensorRT 10 Developer Guide, "Working with Dynamic Shapes" > "Optimization Profiles").

A deployment may narrow the frame range (`--frame-size-range`, e.g. a fixed camera); `Profiles.served_limits()` then
differs from the contract, the build report records both, and `leukograph build-engines --check-plans` reports the
disagreement with the config until the config advertises the same limits (`config_disagreements`).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from leukograph.client.contract import MAX_CELLS, MAX_FRAME_SIDE, MIN_FRAME_SIDE, SERVED_STAGES, StageSpec
from leukograph.client.errors import UserError

TYPICAL_CELLS = 16
DEFAULT_FRAME = (480, 640)  # height, width of BCCD's camera frames: the default opt shape
CONFIG_LIMIT_KEYS = ("max_cells", "min_frame_side", "max_frame_side")  # parameters of every generated config.pbtxt


@dataclass(frozen=True)
class DimRange:
    """One dynamic dimension's min <= opt <= max."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise UserError(f"need 1 <= min <= opt <= max, got {self.min}:{self.opt}:{self.max}")

    @classmethod
    def fixed(cls, value: int) -> DimRange:
        return cls(value, value, value)


@dataclass(frozen=True)
class Profiles:
    """The deployment's ranges for every named dynamic axis of the contract."""

    cells: DimRange
    height: DimRange
    width: DimRange

    def axis(self, axis_name: str) -> DimRange:
        try:
            return {"cells": self.cells, "height": self.height, "width": self.width}[axis_name]
        except KeyError:
            raise UserError(f"no profile range for dynamic axis {axis_name!r}") from None

    @property
    def fixed_frame(self) -> bool:
        return self.height.min == self.height.max and self.width.min == self.width.max

    def shapes(self, stage: StageSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """{input name: (min shape, opt shape, max shape)} for every input of `stage` with a dynamic dimension."""
        out = {}
        for tensor in stage.inputs:
            axes = stage.dynamic_axes.get(tensor.name, {})
            if -1 not in tensor.shape:
                continue
            missing = [i for i, d in enumerate(tensor.shape) if d == -1 and i not in axes]
            if missing:
                raise UserError(f"{stage.name}.{tensor.name}: dynamic dims {missing} have no axis name in the contract")
            ranges = [self.axis(axes[i]) if d == -1 else DimRange.fixed(d) for i, d in enumerate(tensor.shape)]
            out[tensor.name] = tuple(tuple(getattr(r, which) for r in ranges) for which in ("min", "opt", "max"))
        return out

    def served_limits(self) -> dict[str, int]:
        """What an engine built with these profiles accepts, per dimension."""
        return {"min_cells": self.cells.min, "max_cells": self.cells.max, "min_height": self.height.min,
                "max_height": self.height.max, "min_width": self.width.min, "max_width": self.width.max}

    def config_disagreements(self, config_limits: dict[str, int]) -> list[str]:
        """Where an engine with these profiles would accept something other than what a config advertises."""
        return limit_disagreements(self.served_limits(), config_limits)

    @property
    def covers_contract(self) -> bool:
        return not self.config_disagreements(contract_limits())

    def to_json(self) -> dict:
        return {"cells": asdict(self.cells), "height": asdict(self.height), "width": asdict(self.width),
                "per_input": {stage.name: {name: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])}
                                           for name, s in self.shapes(stage).items()} for stage in SERVED_STAGES}}


def limit_disagreements(served: dict[str, int], config_limits: dict[str, int]) -> list[str]:
    """`served` (Profiles.served_limits(), as recorded in a build report) against a config's advertised limits
    (max_cells, min_frame_side, max_frame_side, as in config.pbtxt; a frame's cells always start at 1)."""
    advertised = {"min_cells": 1, "max_cells": config_limits.get("max_cells"),
                  "min_height": config_limits.get("min_frame_side"), "max_height": config_limits.get("max_frame_side"),
                  "min_width": config_limits.get("min_frame_side"), "max_width": config_limits.get("max_frame_side")}
    return [f"{key}: engine profile {served.get(key)}, config {value}" for key, value in advertised.items()
            if served.get(key) != value]


def contract_limits() -> dict[str, int]:
    """The limits every generated config advertises, from the contract."""
    return dict(zip(CONFIG_LIMIT_KEYS, (MAX_CELLS, MIN_FRAME_SIDE, MAX_FRAME_SIDE)))


# ---- parsing of the CLI values -----------------------------------------------------------------------------
def parse_cells(text: str) -> DimRange:
    """`min:opt:max` (e.g. 1:16:256), each in 1..MAX_CELLS."""
    parts = text.split(":")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"--cells wants MIN:OPT:MAX, e.g. 1:{TYPICAL_CELLS}:{MAX_CELLS}; got {text!r}")
    cells = DimRange(*(int(p) for p in parts))
    if cells.max > MAX_CELLS:
        raise UserError(f"--cells max {cells.max} is above the contract's MAX_CELLS={MAX_CELLS}")
    return cells


def parse_hw(text: str, flag: str = "--frame-size") -> tuple[int, int]:
    """`HEIGHTxWIDTH` (e.g. 480x640) within the contract's frame limits."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"{flag} wants HEIGHTxWIDTH, e.g. 480x640; got {text!r}")
    height, width = (int(p) for p in parts)
    for side in (height, width):
        if not MIN_FRAME_SIDE <= side <= MAX_FRAME_SIDE:
            raise UserError(f"{flag}: frame side {side} outside [{MIN_FRAME_SIDE}, {MAX_FRAME_SIDE}]")
    return height, width


def parse_frame_range(text: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """`MIN_HxMIN_W:MAX_HxMAX_W`, or `full` for MIN_FRAME_SIDE..MAX_FRAME_SIDE on both sides."""
    if text.strip().lower() == "full":
        return (MIN_FRAME_SIDE, MIN_FRAME_SIDE), (MAX_FRAME_SIDE, MAX_FRAME_SIDE)
    parts = text.split(":")
    if len(parts) != 2:
        raise UserError(f"--frame-size-range wants MIN_HxMIN_W:MAX_HxMAX_W (e.g. 240x320:2160x3840) or 'full'; "
                        f"got {text!r}")
    return parse_hw(parts[0], "--frame-size-range"), parse_hw(parts[1], "--frame-size-range")


def make_profiles(cells: str = f"1:{TYPICAL_CELLS}:{MAX_CELLS}", frame_size: str | None = None,
                  frame_size_range: str | None = None) -> Profiles:
    """Profiles from the CLI strings. The frame range is the contract's (`full`) unless `frame_size_range` narrows
    it; `frame_size` is the opt shape (default 480x640, clamped into a narrowed range)."""
    opt = parse_hw(frame_size) if frame_size else DEFAULT_FRAME
    (min_h, min_w), (max_h, max_w) = parse_frame_range(frame_size_range or "full")
    if frame_size is None:
        opt = (min(max(opt[0], min_h), max_h), min(max(opt[1], min_w), max_w))
    if not (min_h <= opt[0] <= max_h and min_w <= opt[1] <= max_w):
        raise UserError(f"--frame-size {opt[0]}x{opt[1]} is outside --frame-size-range {frame_size_range}")
    return Profiles(cells=parse_cells(cells), height=DimRange(min_h, opt[0], max_h),
                    width=DimRange(min_w, opt[1], max_w))


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation profiles (default: exactly the contract's limits, which every "
                                      "config.pbtxt advertises)")
    group.add_argument("--frame-size", default=None, metavar="HxW",
                       help="the camera frame HEIGHTxWIDTH the engine is tuned for (the profile's opt shape; default "
                            f"480x640, BCCD's camera). Frames {MIN_FRAME_SIDE}..{MAX_FRAME_SIDE} on each side are "
                            "still accepted")
    group.add_argument("--frame-size-range", default=None, metavar="MIN_HxMIN_W:MAX_HxMAX_W",
                       help=f"narrow the accepted frames (default 'full': {MIN_FRAME_SIDE}..{MAX_FRAME_SIDE} on both "
                            "sides), e.g. 480x640:480x640 for one fixed camera; the served config must then advertise "
                            "the same limits (checked by --check-plans)")
    group.add_argument("--cells", default=f"1:{TYPICAL_CELLS}:{MAX_CELLS}", metavar="MIN:OPT:MAX",
                       help=f"cells per frame (default 1:{TYPICAL_CELLS}:{MAX_CELLS}; max <= MAX_CELLS={MAX_CELLS})")


def profiles_from_args(args: argparse.Namespace) -> Profiles:
    return make_profiles(args.cells, args.frame_size, args.frame_size_range)
