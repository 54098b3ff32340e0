"""The one definition of the serving contract.

Stage names, tensor names, dtypes, shapes and limits live here and nowhere else. Training's export,
the model-repository generator, the TensorRT builder, the python-backend steps and the client all
import them. This module is deliberately free of torch so the edge client can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# ---- classes -------------------------------------------------------------------------------------
# The five white-cell classes of a differential (they count to 100/200), the flagged nucleated cells reported
# beside it (IG as % of WBC, NRBC per 100 WBC), and the context cells of the smear. Order is the output order.
WBC_CLASSES: tuple[str, ...] = ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte")
FLAGGED_CLASSES: tuple[str, ...] = ("ig", "nrbc")  # immature granulocyte; nucleated red cell (erythroblast)
CONTEXT_CLASSES: tuple[str, ...] = ("rbc", "platelet")
NUCLEATED_CLASSES: tuple[str, ...] = WBC_CLASSES + FLAGGED_CLASSES  # what a WBC-kind box may be
CLASSES: tuple[str, ...] = NUCLEATED_CLASSES + CONTEXT_CLASSES
NUM_CLASSES = len(CLASSES)
UNIDENTIFIED = "unidentified"
# Calibrated top probability below which a WBC-kind cell goes to review (UNIDENTIFIED). Chosen by
# `leukograph evaluate` from the auto-accept curve on validation cells (docs/results/evaluation.json).
UNIDENTIFIED_THRESHOLD = 0.96
CELL_KINDS: tuple[str, ...] = ("wbc", "rbc", "platelet")  # what the localiser says a box is

# ---- limits --------------------------------------------------------------------------------------
MAX_CELLS = 256  # cells per frame the engines and configs accept
MIN_FRAME_SIDE = 16
MAX_FRAME_SIDE = 4096  # frame height/width accepted by the served graph (configs, TRT profiles)
MAX_IMAGE_SIDE = 8192  # largest image `classify` accepts from disk before refusing it

# ---- geometry shared by training crops and the in-graph crop ----------------------------------------
CROP_SIZE = 64  # side of the square crop fed to the CNN
CROP_MARGIN = 0.15  # context margin added on each side, as a fraction of the box's longer side
EMBED_DIM = 64
KNN_K = 5  # neighbours per cell in the frame graph (histocartography uses k = 5)
GEOMETRY_FEATURES = 5  # log relative size, log aspect, cx, cy, log relative area


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a served stage. -1 marks a dynamic dimension."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def triton_dtype(self) -> str:
        """The dtype as config.pbtxt spells it (TYPE_FP32 ...)."""
        return "TYPE_" + {"float32": "FP32", "float16": "FP16", "uint8": "UINT8", "int32": "INT32",
                          "int64": "INT64"}[self.dtype]

    @property
    def client_dtype(self) -> str:
        """The dtype as tritonclient spells it (FP32 ...)."""
        return self.triton_dtype.removeprefix("TYPE_")


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str = ""
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


FRAME = TensorSpec("FRAME", "uint8", (-1, -1, 3))  # H x W x RGB
BOXES = TensorSpec("BOXES", "float32", (-1, 4))  # x1, y1, x2, y2 in frame pixels
EMBEDDINGS = TensorSpec("EMBEDDINGS", "float32", (-1, EMBED_DIM))
FRAME_SIZE = TensorSpec("FRAME_SIZE", "float32", (2,))  # height, width
PROBS = TensorSpec("PROBS", "float32", (-1, NUM_CLASSES))
LABELS = TensorSpec("LABELS", "int32", (-1,))

CROP_EMBEDDER = StageSpec(
    name="crop_embedder",
    inputs=(FRAME, BOXES),
    outputs=(EMBEDDINGS, FRAME_SIZE),
    description="crop every box (+margin) from the frame in-graph, resize, embed with the CNN",
    dynamic_axes={"FRAME": {0: "height", 1: "width"}, "BOXES": {0: "cells"}, "EMBEDDINGS": {0: "cells"}},
)
CELL_GRAPH = StageSpec(
    name="cell_graph",
    inputs=(EMBEDDINGS, BOXES, FRAME_SIZE),
    outputs=(PROBS, LABELS),
    description="kNN graph of the cells built in-graph, dense GNN, per-cell class probabilities",
    dynamic_axes={"EMBEDDINGS": {0: "cells"}, "BOXES": {0: "cells"}, "PROBS": {0: "cells"},
                  "LABELS": {0: "cells"}},
)
PIPELINE_NAME = "leukocyte_pipeline"
PIPELINE = StageSpec(
    name=PIPELINE_NAME,
    inputs=(FRAME, BOXES),
    outputs=(PROBS, LABELS),
    description="ensemble: crop_embedder then cell_graph",
)
STAGES: tuple[StageSpec, ...] = (CROP_EMBEDDER, CELL_GRAPH)


class ContractError(ValueError):
    """A request that breaks the contract (shape, dtype, limits, values)."""


def validate_request(frame: np.ndarray, boxes: np.ndarray) -> None:
    """Check one (frame, boxes) request against the contract; raise ContractError with one clear line."""
    if frame.dtype != np.uint8:
        raise ContractError(f"FRAME must be uint8, got {frame.dtype}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ContractError(f"FRAME must be HxWx3, got shape {tuple(frame.shape)}")
    h, w = frame.shape[:2]
    if min(h, w) < MIN_FRAME_SIDE or max(h, w) > MAX_FRAME_SIDE:
        raise ContractError(f"FRAME side must be in [{MIN_FRAME_SIDE}, {MAX_FRAME_SIDE}], got {h}x{w}")
    if boxes.dtype != np.float32:
        raise ContractError(f"BOXES must be float32, got {boxes.dtype}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ContractError(f"BOXES must be Nx4, got shape {tuple(boxes.shape)}")
    n = boxes.shape[0]
    if n == 0:
        raise ContractError("BOXES is empty: send no request for a frame without cells")
    if n > MAX_CELLS:
        raise ContractError(f"BOXES has {n} cells, more than MAX_CELLS={MAX_CELLS}")
    if not np.isfinite(boxes).all():
        raise ContractError("BOXES contains NaN or infinity")
    if (boxes[:, 2] <= boxes[:, 0]).any() or (boxes[:, 3] <= boxes[:, 1]).any():
        raise ContractError("BOXES must have x2 > x1 and y2 > y1")
    if (boxes[:, :2] < -0.5).any() or (boxes[:, 2] > w + 0.5).any() or (boxes[:, 3] > h + 0.5).any():
        raise ContractError(f"BOXES reach outside the {w}x{h} frame")
