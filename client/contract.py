"""The one definition of the serving contract.

Stage names, tensor names, dtypes, shapes and limits live here and nowhere else. Training's export,
the model-repository generator, the TensorRT builder, the python-backend steps and the client all
import them. This module is deliberately free of torch so the edge client can use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
# `leukograph train`'s calibration from the auto-accept curve on validation cells (training/weights/calibration.json).
UNIDENTIFIED_THRESHOLD = 0.95
CELL_KINDS: tuple[str, ...] = ("wbc", "rbc", "platelet")  # what the localiser says a box is


def white_cell_class(probs: np.ndarray) -> np.ndarray:
    """`classify`'s white-cell answer for each row of class probabilities (index into WBC_CLASSES): the likeliest of
    the five white-cell classes, so an IG or NRBC cell is answered by its likeliest white-cell class."""
    return np.asarray(probs)[..., :len(WBC_CLASSES)].argmax(-1)


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
# Rows [0, CELL_COUNT) of BOXES are cells; the rest is padding (the detector's fixed K rows). Both classifier stages
# take only those rows (in-graph: NonZero + Gather), so padding never changes a cell's result nor joins the kNN graph.
# A client sending its own N boxes sends CELL_COUNT = N.
CELL_COUNT = TensorSpec("CELL_COUNT", "int32", (1,))
EMBEDDINGS = TensorSpec("EMBEDDINGS", "float32", (-1, EMBED_DIM))  # one row per real cell
FRAME_SIZE = TensorSpec("FRAME_SIZE", "float32", (2,))  # height, width
PROBS = TensorSpec("PROBS", "float32", (-1, NUM_CLASSES))  # one row per real cell
LABELS = TensorSpec("LABELS", "int32", (-1,))

CROP_EMBEDDER = StageSpec(
    name="crop_embedder",
    inputs=(FRAME, BOXES, CELL_COUNT),
    outputs=(EMBEDDINGS, FRAME_SIZE),
    description="crop the first CELL_COUNT boxes (+margin) from the frame in-graph, resize, embed with the CNN",
    dynamic_axes={"FRAME": {0: "height", 1: "width"}, "BOXES": {0: "cells"}, "EMBEDDINGS": {0: "cells"}},
)
CELL_GRAPH = StageSpec(
    name="cell_graph",
    inputs=(EMBEDDINGS, BOXES, FRAME_SIZE, CELL_COUNT),
    outputs=(PROBS, LABELS),
    description="kNN graph of the first CELL_COUNT cells built in-graph, dense GNN, per-cell class probabilities",
    dynamic_axes={"EMBEDDINGS": {0: "cells"}, "BOXES": {0: "cells"}, "PROBS": {0: "cells"},
                  "LABELS": {0: "cells"}},
)
STAGES: tuple[StageSpec, ...] = (CROP_EMBEDDER, CELL_GRAPH)  # the classifier: CNN then GNN

# ---- detector stage (frame in, fixed-K padded cells out) -------------------------------------------
# The learned detector sees the frame stretched to DETECTOR_SIZE x DETECTOR_SIZE and predicts, per output pixel
# (stride DETECTOR_STRIDE), a score per kind, the cell's size and its sub-pixel centre. In-graph post-processing:
# 3x3 max-pool peaks, TopK at the constant K = MAX_CELLS, sorted by score. Rows at and after CELL_COUNT (score below
# DETECTOR_THRESHOLD) are padding: their SCORES are kept for AP, but no stage may treat them as cells.
DETECTOR_SIZE = 256
DETECTOR_STRIDE = 4
DETECTOR_THRESHOLD = 0.3
# An FP16 build keeps the post-processing fp32 from this op on (peak extraction compares each score with its 3x3
# max: an fp16 copy of one side breaks the equality; box corners reach MAX_FRAME_SIDE).
DETECTOR_FP32_AFTER = "Sigmoid"
SCORES = TensorSpec("SCORES", "float32", (MAX_CELLS,))
KINDS = TensorSpec("KINDS", "int32", (MAX_CELLS,))  # index into CELL_KINDS
DETECTED_BOXES = TensorSpec("BOXES", "float32", (MAX_CELLS, 4))
CELL_DETECTOR = StageSpec(
    name="cell_detector",
    inputs=(FRAME,),
    outputs=(DETECTED_BOXES, SCORES, KINDS, CELL_COUNT),
    description="learned detector: frame -> MAX_CELLS boxes/scores/kinds sorted by score, CELL_COUNT above threshold",
    dynamic_axes={"FRAME": {0: "height", 1: "width"}},
)
SERVED_STAGES: tuple[StageSpec, ...] = (CELL_DETECTOR, *STAGES)  # every step of the model repository

# ---- the two ensembles -----------------------------------------------------------------------------
# leukocyte_pipeline (the default, `--localizer server`): bare frames in; the detector finds the cells on the server.
# leukocyte_pipeline_boxes (`--localizer client`): frames with the client's own boxes (the classical localiser).
PIPELINE_NAME = "leukocyte_pipeline"
PIPELINE = StageSpec(
    name=PIPELINE_NAME,
    inputs=(FRAME,),
    outputs=(DETECTED_BOXES, SCORES, KINDS, CELL_COUNT, PROBS, LABELS),
    description="ensemble: cell_detector, then crop_embedder and cell_graph on the first CELL_COUNT boxes",
)
BOXES_PIPELINE = StageSpec(
    name=f"{PIPELINE_NAME}_boxes",
    inputs=(FRAME, BOXES, CELL_COUNT),
    outputs=(PROBS, LABELS),
    description="ensemble: crop_embedder then cell_graph on the client's boxes",
)
PIPELINES: tuple[StageSpec, ...] = (PIPELINE, BOXES_PIPELINE)
# Which steps each ensemble chains, in order.
PIPELINE_STEPS: dict[str, tuple[StageSpec, ...]] = {PIPELINE.name: SERVED_STAGES, BOXES_PIPELINE.name: STAGES}
LOCALIZERS = ("server", "client")  # server: the ensemble's detector; client: the classical localiser's boxes
PIPELINE_OF_LOCALIZER = {"server": PIPELINE, "client": BOXES_PIPELINE}


def cell_count(boxes: np.ndarray) -> np.ndarray:
    """CELL_COUNT for a request whose every box row is a cell."""
    return np.array([len(boxes)], dtype=CELL_COUNT.np_dtype)


def boxes_feed(frame: np.ndarray, boxes: np.ndarray) -> dict[str, np.ndarray]:
    """crop_embedder's inputs (the boxes ensemble's) by name, for a frame and its N cells: FRAME, BOXES, CELL_COUNT."""
    return {FRAME.name: frame, BOXES.name: boxes, CELL_COUNT.name: cell_count(boxes)}


def example_feed(stage: StageSpec, rows: int, cells: int, height: int, width: int,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Valid random inputs of `stage`, by name and in its input order, for a height x width frame with `rows` boxes
    of 8-48 px, the first `cells` of them cells (tracing and warming up the served stages)."""
    corner = rng.uniform(0.0, 1.0, (rows, 2)) * (width * 0.7, height * 0.7)
    size = 8 + rng.uniform(0.0, 40.0, (rows, 2))
    feed = {FRAME.name: rng.integers(0, 256, (height, width, 3)),
            BOXES.name: np.concatenate([corner, corner + size], 1),
            CELL_COUNT.name: [cells], EMBEDDINGS.name: rng.standard_normal((cells, EMBED_DIM)),
            FRAME_SIZE.name: [height, width]}
    return {spec.name: np.asarray(feed[spec.name], spec.np_dtype) for spec in stage.inputs}


# ---- model repository layout ---------------------------------------------------------------------
VERSION_DIR = "1"  # every step serves one version
CONFIG_FILE = "config.pbtxt"
MODEL_FILES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "pytorch": "model.pt"}  # by backend


def stage_path(repository: Path, stage: StageSpec | str, filename: str = "") -> Path:
    """`<repository>/<stage>/1/<filename>`: a step's version folder, or a file in it (e.g. MODEL_FILES[backend])."""
    name = stage if isinstance(stage, str) else stage.name
    folder = Path(repository) / name / VERSION_DIR
    return folder / filename if filename else folder


# ---- version identifiers, named apart -----------------------------------------------------------
# weights_id: which trained weights the served models were exported from (sha256 of the checkpoints). Set as an
#   ensemble config parameter, so any client reads it from the server and records it with each result.
# repository_digest: which model files a repository serves (sha256 of each ONNX file / plan / TorchScript file),
#   stored beside the ensemble in VERSION_FILE. Triton's own "model version" is only the folder VERSION_DIR.
WEIGHTS_ID_KEY = "weights_id"
REPOSITORY_DIGEST_KEY = "repository_digest"
VERSION_FILE = "version.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_id(checkpoints: Sequence[Path]) -> str:
    """`leukocyte_pipeline-weights-<sha256[:12]>` of the checkpoint files; `...-weights-unknown` when one is missing."""
    digest = hashlib.sha256()
    for path in checkpoints:
        if not Path(path).exists():
            return f"{PIPELINE_NAME}-weights-unknown"
        digest.update(Path(path).read_bytes())
    return f"{PIPELINE_NAME}-weights-{digest.hexdigest()[:12]}"


def repository_digest(backend: str, file_digests: Sequence[str]) -> str:
    """`leukocyte_pipeline-<backend>-<sha256[:12]>` over the sha256 of each served model file, in stage order."""
    combined = hashlib.sha256("".join(file_digests).encode()).hexdigest()
    return f"{PIPELINE_NAME}-{backend}-{combined[:12]}"


class ContractError(ValueError):
    """A request that breaks the contract (shape, dtype, limits, values)."""


def _check_tensor(spec: TensorSpec, array: np.ndarray) -> None:
    """dtype, rank and fixed dimensions of one tensor."""
    if array.dtype != spec.np_dtype:
        raise ContractError(f"{spec.name} must be {spec.dtype}, got {array.dtype}")
    if array.ndim != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, array.shape)):
        shape = "x".join("N" if d == -1 else str(d) for d in spec.shape)
        raise ContractError(f"{spec.name} must have shape {shape}, got {tuple(array.shape)}")


def _check_frame_side(height: float, width: float, what: str) -> None:
    if min(height, width) < MIN_FRAME_SIDE or max(height, width) > MAX_FRAME_SIDE:
        raise ContractError(f"{what} must be in [{MIN_FRAME_SIDE}, {MAX_FRAME_SIDE}], got {height:g}x{width:g}")


def _check_cell_count(count: np.ndarray | None, rows: int) -> int:
    """CELL_COUNT (int32 [1], 0..rows) as an int; None means every row is a cell."""
    if count is None:
        return rows
    _check_tensor(CELL_COUNT, count)
    n = int(count[0])
    if not 0 <= n <= rows:
        raise ContractError(f"{CELL_COUNT.name} is {n}, outside [0, {rows}] (the rows of {BOXES.name})")
    return n


def _check_boxes(boxes: np.ndarray, height: float, width: float, count: np.ndarray | None = None) -> int:
    """BOXES of a frame of that size: dtype, shape, 1..MAX_CELLS rows; the first CELL_COUNT rows (the cells) finite,
    ordered corners, inside the frame. Padding rows after them are not looked at. Returns the number of cells."""
    if boxes.dtype != BOXES.np_dtype:
        raise ContractError(f"{BOXES.name} must be {BOXES.dtype}, got {boxes.dtype}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ContractError(f"{BOXES.name} must be Nx4, got shape {tuple(boxes.shape)}")
    rows = boxes.shape[0]
    if rows == 0:
        raise ContractError(f"{BOXES.name} is empty: send no request for a frame without cells")
    if rows > MAX_CELLS:
        raise ContractError(f"{BOXES.name} has {rows} cells, more than MAX_CELLS={MAX_CELLS}")
    n = _check_cell_count(count, rows)
    cells = boxes[:n]
    if not np.isfinite(cells).all():
        raise ContractError(f"{BOXES.name} contains NaN or infinity")
    if (cells[:, 2] <= cells[:, 0]).any() or (cells[:, 3] <= cells[:, 1]).any():
        raise ContractError(f"{BOXES.name} must have x2 > x1 and y2 > y1")
    if (cells[:, :2] < -0.5).any() or (cells[:, 2] > width + 0.5).any() or (cells[:, 3] > height + 0.5).any():
        raise ContractError(f"{BOXES.name} reach outside the {width:g}x{height:g} frame")
    return n


def validate_frame(frame: np.ndarray) -> None:
    """Check one bare FRAME (the detector pipeline's only input)."""
    if frame.dtype != FRAME.np_dtype:
        raise ContractError(f"{FRAME.name} must be {FRAME.dtype}, got {frame.dtype}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ContractError(f"{FRAME.name} must be HxWx3, got shape {tuple(frame.shape)}")
    _check_frame_side(frame.shape[0], frame.shape[1], f"{FRAME.name} side")


def validate_request(frame: np.ndarray, boxes: np.ndarray, count: np.ndarray | None = None) -> None:
    """Check one (frame, boxes[, CELL_COUNT]) request, i.e. crop_embedder's inputs; raise ContractError with one
    clear line. Without `count` every row of `boxes` is a cell."""
    validate_frame(frame)
    _check_boxes(boxes, *frame.shape[:2], count)


def validate_cell_graph(embeddings: np.ndarray, boxes: np.ndarray, frame_size: np.ndarray,
                        count: np.ndarray | None = None) -> None:
    """cell_graph's inputs: the crop_embedder's outputs plus the request's boxes and CELL_COUNT."""
    for spec, array in zip(CELL_GRAPH.inputs, (embeddings, boxes, frame_size)):
        _check_tensor(spec, array)
    for spec, array in ((EMBEDDINGS, embeddings), (FRAME_SIZE, frame_size)):
        if not np.isfinite(array).all():
            raise ContractError(f"{spec.name} contains NaN or infinity")
    height, width = (float(v) for v in frame_size)
    _check_frame_side(height, width, FRAME_SIZE.name)
    n = _check_boxes(boxes, height, width, count)
    if embeddings.shape[0] != n:
        raise ContractError(f"{EMBEDDINGS.name} has {embeddings.shape[0]} rows for {n} cells")


def validate_stage(stage: StageSpec, inputs: dict[str, np.ndarray]) -> None:
    """Check one stage's inputs (by contract name) against the contract; ContractError names the first problem."""
    missing = [name for name in stage.input_names if name not in inputs]
    if missing:
        raise ContractError(f"input {missing[0]} is missing")
    if stage.name == CELL_DETECTOR.name:
        validate_frame(inputs[FRAME.name])
    elif stage.name == CROP_EMBEDDER.name:
        validate_request(inputs[FRAME.name], inputs[BOXES.name], inputs[CELL_COUNT.name])
    elif stage.name == CELL_GRAPH.name:
        validate_cell_graph(inputs[EMBEDDINGS.name], inputs[BOXES.name], inputs[FRAME_SIZE.name],
                            inputs[CELL_COUNT.name])
    else:
        raise ValueError(f"{stage.name} is not a stage with inputs to validate")
