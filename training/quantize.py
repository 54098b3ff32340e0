"""INT8 crop_embedder: static post-training quantisation to QDQ ONNX graphs (ONNX Runtime's quantisation tools).

One calibration, two QDQ files of the same layers and weight scales, differing only where the two runtimes differ:

* `model.int8.tensorrt.onnx` (`INT8_FILES["tensorrt"]`), what TensorRT >= 10 builds an INT8 engine from (explicit
  quantisation, a strongly typed network; `build_engines.int8`). TensorRT takes signed INT8 Q/DQ with zero point 0
  only, so activations are symmetric. `build_engines.onnx_ops.check_qdq` checks the placement.
* `model.int8.onnx` (`INT8_FILES["onnxruntime"]`), what ONNX Runtime serves on the CPU. ORT fuses DQ -> Conv -> Q
  into one int8 convolution (VNNI on AVX-512 machines), but it has no int8 ReLU: with a symmetric (zero point 0)
  ReLU output the quantiser must keep each ReLU as DQ -> Relu -> Q in float between the int8 convolutions. With an
  asymmetric activation scale the ReLU folds into the convolution's output quantisation (zero point at the type's
  minimum), and the graph is int8 convolutions back to back. Its activations are unsigned (`ACTIVATION_TYPES`): ORT
  computes on uint8 activations, and signed ones left convolutions that share an input in float. ORT's int8
  convolution also multiplies 4 bytes at a
  time (VNNI dot products), and with the crop's 3 colour channels the first convolution runs slower in INT8 than in
  FP32; its input gets a fourth, all-zero channel and its weights a zero slice (`pad_first_conv_channels`), which
  leaves every sum unchanged. `leukograph bench --int8` times both in ORT (README "INT8").

Common to both:
* signed INT8 weights, symmetric, per output channel (axis 0 of Conv and of Gemm with transB=1); activations per
  tensor;
* only the learned layers and what sits between them are quantised (`QUANTISED_OPS`; an `--ibn` CNN's
  InstanceNormalization and Concat compute in float between them, `FLOAT_BETWEEN_OPS`); the front of the graph
  stays FP32 (`front_nodes`): the uint8 FRAME feeds only its Cast, box coordinates, GridSample's sampling grid and
  the per-crop colour standardisation compute in FP32 up to the first quantised Conv, whose input is the first Q/DQ
  pair; where the convolutions reading the crop are narrow (an `--ibn` CNN's first block), that block is front too.

Calibration: crops of the training part of every source (`train.load_cell_sets(...).train`, cached by
`training/cells.py`), never validation or test cells. The served graph takes frames and boxes, so the calibration
crops are laid out as a mosaic frame with one box per tile whose in-graph crop region is exactly that tile
(`mosaic`): the in-graph crop then returns each stored served crop pixel for pixel, and the calibration sees exactly
what serving sees.

The cell_graph stays FP32: it is a few 64-wide matrix products per cell (measured in the README "INT8" section).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from leukograph.client.contract import (
    CROP_EMBEDDER,
    CROP_MARGIN,
    CROP_SIZE,
    MODEL_FILES,
    boxes_feed,
    file_sha256,
    stage_path,
)
from leukograph.client.errors import UserError
from leukograph.deploy.model_repository import INT8_ONNX_FILES
from leukograph.deploy.paths import shown_path

# Beside model.onnx in crop_embedder/1/: `--precision int8` serves the onnxruntime one; build-engines reads the other.
INT8_FILES = {"onnxruntime": INT8_ONNX_FILES[CROP_EMBEDDER.name], "tensorrt": "model.int8.tensorrt.onnx"}
# What differs between the two files (onnxruntime.quantization extra_options). TensorRT dequantises INT8 only, so its
# biases stay float (TensorRT folds them into the INT8 convolution itself); ORT's int8 convolution takes int32 biases.
RUNTIME_OPTIONS = {
    "onnxruntime": {"ActivationSymmetric": False, "CalibTensorRangeSymmetric": False, "QuantizeBias": True},
    "tensorrt": {"ActivationSymmetric": True, "CalibTensorRangeSymmetric": True, "QuantizeBias": False},
}
# Activation type: TensorRT takes signed INT8 only. ONNX Runtime's x86 int8 convolution computes on uint8 activations
# and converts a signed pair into an unsigned one only where a QuantizeLinear feeds one DequantizeLinear: where one
# quantised tensor feeds two convolutions (an --ibn CNN's split blocks), signed activations left those convolutions
# in float (4 of 8 in the --ibn release's graph, slower than FP32), unsigned ones fuse all of them.
ACTIVATION_TYPES = {"onnxruntime": "QUInt8", "tensorrt": "QInt8"}
# Convolutions reading the crop itself with fewer output channels than this stay FP32 with their block: an --ibn
# CNN's first block is two 16-channel convolutions on the 3 (padded: 4) colour channels, which took 20.0 and 22.8 ms
# in INT8 for 128 crops against about 10-16 ms in FP32 (one thread); the 32-channel first convolution of a CNN
# without --ibn pays in INT8 (above).
MIN_INT8_CONV_CHANNELS = 32
# Input channels of the first quantised convolution are padded with zeros to a multiple of this (1: left as they
# are). ORT's int8 convolution with 3 input channels took 13.7 ms for 128 crops of 64x64 (FP32: 9.1 ms), with 4
# channels 8.9 ms (one thread, the first convolution and its max-pool alone).
FIRST_CONV_CHANNEL_MULTIPLE = {"onnxruntime": 4, "tensorrt": 1}
QUANTISED_OPS = ("Conv", "Gemm", "MatMul", "Relu", "MaxPool", "GlobalAveragePool", "Flatten")
# Left in float between INT8 layers (fed by a DequantizeLinear, followed by a QuantizeLinear): an --ibn CNN's
# per-crop normalised half and the join of its two halves (neither runtime has an int8 kernel for the first).
FLOAT_BETWEEN_OPS = ("InstanceNormalization", "Concat")
LEARNED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
MOSAIC_COLUMNS = 8  # tiles per mosaic row: 64 cells per calibration frame, a 512x512 frame
DEFAULT_PER_SOURCE = 128  # calibration crops per source
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# Chosen on every source's validation cells (README "INT8"): CNN+GNN labels of the INT8 graph differ from FP32's on
# 0.06% of the cells with percentile activation ranges (ONNX Runtime's default, 99.999th percentile), 0.12% with
# minmax; entropy gave minmax's labels.
DEFAULT_CALIBRATION_METHOD = "percentile"


def int8_path(repository: Path, runtime: str = "onnxruntime") -> Path:
    return stage_path(repository, CROP_EMBEDDER, INT8_FILES[runtime])


# ---- calibration data ------------------------------------------------------------------------------------------
def mosaic(crops: np.ndarray, columns: int = MOSAIC_COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """uint8 crops [N,S,S,3] (S: the CNN's crop side) -> (frame uint8 [rows*S, columns*S, 3], boxes float32 [N,4]).

    Each box is the square, centred on its tile, whose crop region (side * (1 + 2 * CROP_MARGIN)) is the tile: the
    in-graph crop samples the tile's pixel centres, so it returns the crop unchanged."""
    count, size = len(crops), crops.shape[1]
    if crops.ndim != 4 or crops.shape[2] != size or crops.dtype != np.uint8:
        raise ValueError(f"mosaic takes square uint8 crops [N,S,S,3], got {crops.dtype} {crops.shape}")
    rows = -(-count // columns)
    frame = np.zeros((rows * size, columns * size, 3), np.uint8)
    side = size / (1.0 + 2.0 * CROP_MARGIN)
    boxes = np.zeros((count, 4), np.float32)
    for index, crop in enumerate(crops):
        row, column = divmod(index, columns)
        frame[row * size:(row + 1) * size, column * size:(column + 1) * size] = crop
        cx, cy = (column + 0.5) * size, (row + 0.5) * size
        boxes[index] = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    return frame, boxes


@dataclass
class CalibrationSet:
    """Served-view crops of training cells, by source (uint8 [n,S,S,3] each, S: the CNN's crop side)."""

    crops: dict[str, np.ndarray]

    def frames(self, columns: int = MOSAIC_COLUMNS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Mosaic frames whose tiles interleave the sources, so every frame holds cells of every source. Every frame
        holds columns x columns cells, the last one filled up with the first crops again: ONNX Runtime's histogram
        calibration (percentile, entropy) stacks the batches' tensors, which must then have one shape."""
        rng = np.random.default_rng(0)
        everything = np.concatenate(list(self.crops.values()))
        per_frame = columns * columns
        order = rng.permutation(len(everything))
        order = np.resize(order, len(order) + (-len(order)) % per_frame)  # cyclic: the first crops again
        for start in range(0, len(order), per_frame):
            yield mosaic(everything[order[start:start + per_frame]], columns)

    def summary(self) -> str:
        return ", ".join(f"{source} {len(crops)}" for source, crops in sorted(self.crops.items()))


def calibration_set(data_root: Path | None, per_source: int = DEFAULT_PER_SOURCE, seed: int = 0,
                    max_images: int | None = None, crop_size: int = CROP_SIZE) -> CalibrationSet:
    """Up to `per_source` training cells of every source (labelled or not; the localiser's boxes), drawn at random;
    `max_images`: from that many training images per dataset only (train's smoke mode; tests)."""
    from leukograph.training.cells import use_crop_size
    from leukograph.training.train import load_cell_sets  # heavy (torch, datasets): only when calibrating

    use_crop_size(crop_size)  # the mosaic's tiles are crops of the quantised CNN's side
    cells = load_cell_sets(data_root, max_images, seed).train
    rng = np.random.default_rng(seed)
    by_source: dict[str, list[np.ndarray]] = {}
    for frame in cells:
        if len(frame.boxes):
            by_source.setdefault(frame.source, []).append(frame.served_crops)
    crops = {}
    for source, parts in by_source.items():
        pool = np.concatenate(parts)
        chosen = rng.choice(len(pool), size=min(per_source, len(pool)), replace=False)
        crops[source] = np.ascontiguousarray(pool[np.sort(chosen)])
    return CalibrationSet(crops)


class MosaicReader:
    """onnxruntime.quantization CalibrationDataReader over the calibration mosaics."""

    def __init__(self, calibration: CalibrationSet) -> None:
        self._feeds = iter([boxes_feed(frame, boxes) for frame, boxes in calibration.frames()])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


# ---- quantisation ---------------------------------------------------------------------------------------------
def front_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes before the first learned layer that is worth quantising: the crop, the colour standardisation and, where
    the convolutions reading the crop are narrow (`MIN_INT8_CONV_CHANNELS`), their block. Kept FP32 by name."""
    initializers = {i.name: i for i in model.graph.initializer}
    front, crop = [], None
    for node in model.graph.node:
        weight = next((initializers[name] for name in node.input[1:2] if name in initializers), None)
        if node.op_type in LEARNED_OPS and weight is not None:
            crop = crop or node.input[0]
            reads_crop_narrowly = (node.op_type == "Conv" and node.input[0] == crop
                                   and weight.dims[0] < MIN_INT8_CONV_CHANNELS)
            if not reads_crop_narrowly:
                break
        front.append(node.name)
    return front


def named_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose unnamed nodes are named `<op type>_<index>`, the names `front_nodes` and the quantiser use."""
    model = copy.deepcopy(model)
    for index, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{index}"
    return model


def pad_first_conv_channels(model: onnx.ModelProto, multiple: int, fp32: Collection[str] = ()) -> onnx.ModelProto:
    """The first learned convolution not named in `fp32` (those stay FP32) with its input padded with all-zero
    channels to a multiple of `multiple` (one Pad node before it) and its weights with zero input slices: the same
    outputs, a channel count the int8 kernels suit. Every convolution reading that same input is padded with it."""
    initializers = {i.name: i for i in model.graph.initializer}
    first = next((node for node in model.graph.node
                  if node.op_type == "Conv" and node.input[1] in initializers and node.name not in fp32), None)
    if first is None:
        return model
    siblings = [node.name for node in model.graph.node
                if node.op_type == "Conv" and node.input[0] == first.input[0] and node.input[1] in initializers]
    extra = -numpy_helper.to_array(initializers[first.input[1]]).shape[1] % multiple
    grouped = any(int(next((a.i for a in node.attribute if a.name == "group"), 1)) != 1
                  for node in model.graph.node if node.name in siblings)
    if extra == 0 or grouped:
        return model
    model = copy.deepcopy(model)
    source = first.input[0]
    pads_name, padded_name = f"{first.name}_channel_pads", f"{source}_channel_padded"
    for conv in (node for node in model.graph.node if node.name in siblings):
        weight = next(i for i in model.graph.initializer if i.name == conv.input[1])
        array = numpy_helper.to_array(weight)
        zeros = np.zeros((array.shape[0], extra, *array.shape[2:]), array.dtype)
        weight.CopyFrom(numpy_helper.from_array(np.concatenate([array, zeros], 1), conv.input[1]))
        conv.input[0] = padded_name
    # ONNX Pad: begins of every axis, then ends; NCHW, so `extra` zero channels at the end of axis 1
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, extra, 0, 0], np.int64),
                                                           pads_name))
    index = next(i for i, node in enumerate(model.graph.node) if node.name in siblings)
    model.graph.node.insert(index, helper.make_node("Pad", [source, pads_name], [padded_name],
                                                    name=f"{first.name}_channel_pad", mode="constant"))
    return model


def calibrate_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[name]


def _tensors_to_calibrate(model: onnx.ModelProto, excluded: list[str]) -> set[str]:
    """The activations the quantiser needs ranges for: inputs and outputs of the quantised nodes."""
    initializers = {i.name for i in model.graph.initializer}
    return {name for node in model.graph.node if node.op_type in QUANTISED_OPS and node.name not in excluded
            for name in (*node.input, *node.output) if name and name not in initializers}


def calibration_text(calibration: CalibrationSet | None, method: str) -> str:
    return f"{method}, {calibration.summary()} training crops" if calibration is not None else method


def quantize_crop_embedder(fp32_path: Path, out_path: Path, calibration: CalibrationSet | None,
                           runtime: str = "onnxruntime", method: str = DEFAULT_CALIBRATION_METHOD,
                           keep_fp32: tuple[str, ...] = (), ranges: Path | None = None,
                           source: str | None = None) -> Path:
    """Write the QDQ INT8 crop_embedder for `runtime` (weights inline) and return its path. `keep_fp32`: further node
    names to leave in FP32 (e.g. a layer whose quantisation breaks accuracy).

    Activation ranges: calibrated on `calibration` (and, with `ranges`, saved there as ONNX Runtime's calibration
    cache), or with `calibration` None read from the saved `ranges` (no data needed). `source`: how the saved ranges
    were calibrated (`calibration_text`), for the graph's description, so both ways write the same file."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    if calibration is None and (ranges is None or not ranges.is_file()):
        raise UserError(f"no calibration crops and no saved INT8 activation ranges at {ranges}")
    model = named_nodes(onnx.load(str(fp32_path)))
    model = pad_first_conv_channels(model, FIRST_CONV_CHANNEL_MULTIPLE[runtime], fp32=front_nodes(model))
    excluded = front_nodes(model) + list(keep_fp32)
    if calibration is None:
        try:
            saved = set(load_tensors_data(ranges))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # not ORT's calibration cache format
            raise UserError(f"{ranges} is not a readable INT8 activation ranges file ({exc})") from None
        missing = _tensors_to_calibrate(model, excluded) - saved
        if missing:  # ranges saved for another export's tensor names
            raise UserError(f"the INT8 activation ranges in {ranges} do not cover this crop_embedder's tensors "
                            f"({len(missing)} missing, e.g. {sorted(missing)[0]}); calibrate again where the training "
                            "data is (`leukograph export --int8 --calibrate`)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        named_path = Path(scratch) / "named.onnx"
        onnx.save(model, str(named_path))
        # ORT reads a cache that exists and writes one that does not: calibrating, it writes a fresh one here
        cache = ranges if calibration is None else Path(scratch) / "ranges.json"
        quantize_static(
            str(named_path), str(out_path), MosaicReader(calibration) if calibration is not None else None,
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType[ACTIVATION_TYPES[runtime]], weight_type=QuantType.QInt8,
            op_types_to_quantize=list(QUANTISED_OPS), nodes_to_exclude=excluded,
            calibrate_method=calibrate_method(method), calibration_cache_path=str(cache),
            extra_options={**RUNTIME_OPTIONS[runtime], "WeightSymmetric": True, "CalibMovingAverage": False},
        )
        if calibration is not None and ranges is not None:
            ranges.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cache, ranges)
    quantised = onnx.load(str(out_path))
    quantised.doc_string = (f"{CROP_EMBEDDER.description} (INT8 QDQ for {runtime}: static PTQ, per-channel weights, "
                            f"activation ranges: {source or calibration_text(calibration, method)})")
    onnx.checker.check_model(quantised)
    onnx.save(quantised, str(out_path), save_as_external_data=False)
    return out_path


def quantised_nodes(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> count of nodes fed by a DequantizeLinear (computed on INT8 inputs by TensorRT / ORT)."""
    producers = {output: node.op_type for node in model.graph.node for output in node.output}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(producers.get(name) == "DequantizeLinear" for name in node.input):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# A weights folder's saved INT8 activation ranges (ONNX Runtime calibration caches, one per runtime) and what they
# were calibrated for: `export --int8` then needs no training data for these weights.
RANGES_DIR = "int8_ranges"
RANGES_MANIFEST = "manifest.json"


def ranges_files(folder: Path) -> dict[str, Path]:
    """Runtime -> the file in `folder` holding the activation ranges of that runtime's INT8 graph."""
    return {runtime: folder / f"{runtime}.json" for runtime in INT8_FILES}


def ranges_key(weights_dir: Path, method: str, per_source: int, seed: int, keep_fp32: tuple[str, ...]) -> dict:
    """What saved activation ranges depend on: the CNN's weights and the calibration's settings."""
    return {"cnn_sha256": file_sha256(weights_dir / "cnn.pt"), "method": method, "per_source": per_source,
            "seed": seed, "keep_fp32": list(keep_fp32)}


def saved_ranges(weights_dir: Path, key: dict) -> tuple[dict[str, Path], dict] | None:
    """(the saved ranges per runtime, the manifest) when `weights_dir` holds ranges calibrated for `key`, else None."""
    folder = weights_dir / RANGES_DIR
    try:
        manifest = json.loads((folder / RANGES_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    paths = ranges_files(folder)
    if manifest.get("key") != key or not all(path.is_file() for path in paths.values()):
        return None
    return paths, manifest


def export_int8(repository: Path, data_root: Path | None, per_source: int = DEFAULT_PER_SOURCE, seed: int = 0,
                method: str = DEFAULT_CALIBRATION_METHOD, keep_fp32: tuple[str, ...] = (),
                crop_size: int = CROP_SIZE, weights_dir: Path | None = None,
                calibrate: bool = False) -> tuple[dict[str, Path], str]:
    """crop_embedder/1/model.onnx (a CNN of `crop_size`) -> both INT8 files beside it, and a line saying where their
    activation ranges came from. With `weights_dir` (the weights model.onnx was exported from), ranges saved there for
    the same weights and settings are used without the training data (unless `calibrate`); otherwise both files are
    calibrated on the same training crops, and the ranges are saved there for the next export."""
    import onnxruntime

    fp32_path = stage_path(repository, CROP_EMBEDDER, MODEL_FILES["onnxruntime"])
    key = ranges_key(weights_dir, method, per_source, seed, keep_fp32) if weights_dir is not None else None
    saved = saved_ranges(weights_dir, key) if key is not None and not calibrate else None
    if saved is not None:
        ranges, manifest = saved
        paths = {runtime: quantize_crop_embedder(fp32_path, int8_path(repository, runtime), None, runtime, method,
                                                 keep_fp32, ranges[runtime], manifest["calibration"])
                 for runtime in INT8_FILES}
        return paths, (f"activation ranges saved in {shown_path(ranges['onnxruntime'].parent)} "
                       f"({manifest['calibration']}); no calibration data read")
    calibration = calibration_set(data_root, per_source, seed, crop_size=crop_size)
    line = f"calibrated on training crops: {calibration.summary()}"
    with tempfile.TemporaryDirectory() as scratch:
        fresh = ranges_files(Path(scratch))
        paths = {runtime: quantize_crop_embedder(fp32_path, int8_path(repository, runtime), calibration, runtime,
                                                 method, keep_fp32, fresh[runtime]) for runtime in INT8_FILES}
        if weights_dir is None:
            return paths, line
        folder = weights_dir / RANGES_DIR
        manifest = {"key": key, "calibration": calibration_text(calibration, method),
                    "onnxruntime": onnxruntime.__version__}
        try:
            folder.mkdir(exist_ok=True)
            for runtime, target in ranges_files(folder).items():
                shutil.copyfile(fresh[runtime], target)
            (folder / RANGES_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        except OSError as exc:  # e.g. weights installed read-only: the INT8 files are written all the same
            return paths, f"{line}; activation ranges not saved ({shown_path(folder)}: {exc.strerror or exc})"
    return paths, f"{line}; activation ranges saved in {shown_path(folder)}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`export --int8`'s options."""
    parser.add_argument("--calibration-per-source", type=int, default=DEFAULT_PER_SOURCE,
                        help="training crops per source for INT8 calibration")
    parser.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default=DEFAULT_CALIBRATION_METHOD,
                        help="how activation ranges are set from the calibration crops (default: %(default)s)")
    parser.add_argument("--keep-fp32", action="append", default=[], metavar="NODE",
                        help="an ONNX node name of the crop_embedder to leave in FP32 (repeatable; none by default)")
    parser.add_argument("--data-root", default=None, help="datasets folder (default: $LEUKOGRAPH_DATA or "
                                                          "../shared/datasets)")
    parser.add_argument("--seed", type=int, default=0, help="training/validation split seed (as `train`)")
    parser.add_argument("--calibrate", action="store_true",
                        help="calibrate on the training data even where the weights folder holds saved INT8 "
                             "activation ranges for these weights and settings")


# ---- accuracy: FP32 vs INT8 on every test source -------------------------------------------------------------
def embed_cells_onnx(session, crops: np.ndarray, batch: int = 128) -> np.ndarray:
    """Embeddings [N, D] of served-view crops through a crop_embedder ONNX graph (mosaic frames of `batch` cells)."""
    out = []
    for start in range(0, len(crops), batch):
        frame, boxes = mosaic(crops[start:start + batch], columns=16)
        out.append(session.run([CROP_EMBEDDER.outputs[0].name], boxes_feed(frame, boxes))[0])
    return np.concatenate(out) if out else np.zeros((0, CROP_EMBEDDER.outputs[0].shape[1]), np.float32)


def _recording(base: type) -> type:
    """A `evaluate.Models` subclass that keeps every `cell_probs` answer (to compare FP32 and INT8 labels)."""

    class Recording(base):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.answers: list[dict[str, list[np.ndarray]]] = []

        def cell_probs(self, frames, stain_strength: float = 0.0):
            answer = super().cell_probs(frames, stain_strength)
            self.answers.append(answer)
            return answer

    return Recording


def int8_models(weights_dir: Path, onnx_path: Path, threads: int):
    """`evaluate.Models` whose cell embeddings come from the INT8 crop_embedder in ONNX Runtime."""
    import onnxruntime as ort

    from leukograph.training.evaluate import Models

    class Int8Models(_recording(Models)):
        def __init__(self) -> None:
            super().__init__(weights_dir, views=1)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

        def embed(self, frames, stain_strength: float = 0.0, view: int = 0, rows=None) -> list[np.ndarray]:
            if stain_strength or view or rows is not None:
                raise ValueError("the INT8 rows are measured on the served view without synthetic stain shifts")
            counts = [len(frame.labels) for frame in frames]
            crops = [frame.served_crops for frame in frames if len(frame.labels)]
            side = self.embedder.crop_size
            embeddings = embed_cells_onnx(self.session, np.concatenate(crops) if crops
                                          else np.zeros((0, side, side, 3), np.uint8))
            return np.split(embeddings, np.cumsum(counts)[:-1]) if frames else []

    return Int8Models()


def _agreement(fp32: list[dict], int8: list[dict], model: str = "CNN+GNN") -> dict:
    """Per-cell label agreement (argmax over all classes) and largest probability change, FP32 vs INT8."""
    same, cells, drift = 0, 0, 0.0
    for a, b in zip(fp32, int8):
        for p, q in zip(a[model], b[model]):
            same += int((p.argmax(1) == q.argmax(1)).sum()) if len(p) else 0
            cells += len(p)
            drift = max(drift, float(np.abs(p - q).max())) if len(p) else drift
    return {"cells": cells, "label_agreement": same / cells if cells else float("nan"), "max_prob_change": drift}


def _test_items(data_root: str | None) -> dict[str, tuple[list, str]]:
    """Test images of the image-level sources (evaluate.py's selections), by row name: (items, scoring)."""
    from leukograph.client.contract import CLASSES
    from leukograph.training.datasets import load_four_class, load_pbc, load_txl

    pbc = load_pbc(data_root)
    pbc_content = {img.sha1 for img in pbc}
    txl = [img for img in load_txl(data_root) if img.split == "test" and img.source == "PBC"
           and img.sha1 not in pbc_content and any(b.label in CLASSES for b in img.boxes if b.kind == "wbc")]
    return {"4-class TEST images": (list(load_four_class(data_root, "TEST")), "wbc"),
            "4-class TEST_SIMPLE images": (list(load_four_class(data_root, "TEST_SIMPLE")), "wbc"),
            "PBC test images": ([img for img in pbc if img.split == "test"], "single"),
            "TXL-PBC test images": (txl, "single")}


def _image_accuracy(frames: list, probs: dict[str, list[np.ndarray]], scoring: str, threshold: float) -> dict:
    """Image accuracy per model, as `evaluate` scores that source."""
    from leukograph.training import evaluate as ev

    if scoring == "single":
        report = ev._single_cell_report(frames, probs, threshold)
        return {model: report["images"][model]["accuracy"] for model in probs}
    return {model: float(np.mean([ev.frame_prediction(f, p, ev.NUM_WBC) == f.frame_label
                                  for f, p in zip(frames, probs[model])])) for model in probs}


INT8_RESULTS = "int8_evaluation.json"
MAX_ACCURACY_LOSS = 0.005  # the bound: <= 0.5 point per source
MIN_AGREEMENT = 0.99


def evaluate_int8(args: argparse.Namespace) -> int:
    """`leukograph evaluate --precision int8`: CNN-only and CNN+GNN accuracy per test source with the FP32 and the
    INT8 crop_embedder, and per-cell label agreement; JSON under --output-dir and the README "int8-eval" table."""
    import json
    import time

    from leukograph.client.contract import UNIDENTIFIED_THRESHOLD, file_sha256
    from leukograph.client.errors import UserError
    from leukograph.deploy.readme import replace_section
    from leukograph.training.cells import build_cells
    from leukograph.training.evaluate import RESULTS_DIR, SINGLE_VIEW_MODELS, Models, evaluate_bccd

    if args.int8_images < 0:
        raise UserError(f"--int8-images must be >= 0 (0: every test image), got {args.int8_images}")
    onnx_path = int8_path(args.model_repository)
    if not onnx_path.exists():
        raise UserError(f"{onnx_path} is missing: run `leukograph export --int8`")
    started = time.time()
    fp32_models = _recording(Models)(args.weights, views=1)  # INT8 is measured on the served view
    quantised = int8_models(args.weights, onnx_path, args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for name, (items, scoring) in _test_items(args.data_root).items():
        if args.int8_images and len(items) > args.int8_images:  # a seeded sample of the source's test images
            items = [items[i] for i in sorted(rng.choice(len(items), args.int8_images, replace=False))]
        frames = build_cells(items, f"int8-{name}", cache=False, progress=False)
        accuracy = {precision: _image_accuracy(frames, models.cell_probs(frames), scoring, UNIDENTIFIED_THRESHOLD)
                    for precision, models in (("fp32", fp32_models), ("int8", quantised))}
        rows.append(_row(name, len(items), accuracy, fp32_models, quantised))
    bccd = {precision: evaluate_bccd(models, args.data_root, UNIDENTIFIED_THRESHOLD)
            for precision, models in (("fp32", fp32_models), ("int8", quantised))}
    rows.append(_row("BCCD held-out WBC nodes", bccd["fp32"]["frames"],
                     {p: {m: r[m]["wbc_nodes"]["accuracy"] for m in SINGLE_VIEW_MODELS} for p, r in bccd.items()},
                     fp32_models, quantised))
    command = "leukograph evaluate --precision int8" + (f" --int8-images {args.int8_images}" if args.int8_images
                                                         else "")
    report = {"command": command, "int8_file": str(onnx_path.name), "images_per_source": args.int8_images or "all",
              "int8_sha256": file_sha256(onnx_path),
              "rows": rows, "seconds": round(time.time() - started, 1)}
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / INT8_RESULTS).write_text(json.dumps(report, indent=2) + "\n")
    print(int8_markdown(report))
    if out.resolve() == RESULTS_DIR.resolve():
        replace_section("int8-eval", int8_markdown(report))
    print(f"wrote {out / INT8_RESULTS} ({report['seconds']:.0f} s)")
    return 0


def _row(name: str, images: int, accuracy: dict[str, dict[str, float]], fp32_models, quantised) -> dict:
    """One source: accuracy per model and precision, label agreement of its last cell_probs calls, the bounds."""
    row = {"source": name, "images": images}
    for model in accuracy["fp32"]:
        row[model] = {precision: accuracy[precision][model] for precision in ("fp32", "int8")}
    row["agreement"] = _agreement(fp32_models.answers[-1:], quantised.answers[-1:])
    row["within_bounds"] = bool(row["CNN+GNN"]["fp32"] - row["CNN+GNN"]["int8"] <= MAX_ACCURACY_LOSS
                                and row["agreement"]["label_agreement"] >= MIN_AGREEMENT)
    print(int8_row_text(row), flush=True)
    return row


def int8_row_text(row: dict) -> str:
    gnn = row["CNN+GNN"]
    return (f"{row['source']}: CNN+GNN {gnn['fp32']:.4f} -> {gnn['int8']:.4f}, "
            f"label agreement {row['agreement']['label_agreement']:.4f} over {row['agreement']['cells']} cells")


def int8_markdown(report: dict) -> str:
    sampled = report["images_per_source"]
    lines = [f"Generated by `{report['command']}` from `docs/results/{INT8_RESULTS}`. Accuracy with the FP32 and the "
             "INT8 crop_embedder (the same FP32 cell_graph after both), scored as `leukograph evaluate` scores each "
             "source" + (f", on a seeded sample of at most {sampled} test images per source" if sampled != "all"
                         else "") + "; label agreement: cells whose CNN+GNN label is the same in both; bounds: "
             f"<= {100 * MAX_ACCURACY_LOSS:.1f} point loss and >= {100 * MIN_AGREEMENT:.0f}% agreement.", "",
             "| source | images | CNN only FP32 | CNN only INT8 | CNN+GNN FP32 | CNN+GNN INT8 | change (points) | "
             "label agreement | cells | within bounds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        cnn, gnn, agree = row["CNN only"], row["CNN+GNN"], row["agreement"]
        lines.append(f"| {row['source']} | {row['images']} | {cnn['fp32']:.4f} | {cnn['int8']:.4f} | "
                     f"{gnn['fp32']:.4f} | {gnn['int8']:.4f} | {100 * (gnn['int8'] - gnn['fp32']):+.2f} | "
                     f"{agree['label_agreement']:.4f} | {agree['cells']} | {'yes' if row['within_bounds'] else 'no'} |")
    return "\n".join(lines) + "\n"
