"""Will TensorRT's ONNX parser take this graph? A static check against onnx-tensorrt's operator table.

The table (`trt_onnx_supported_ops.json`) is transcribed from onnx-tensorrt `docs/operators.md` for TensorRT 10.15
(source and version recorded in the file). Beyond "is the op in the table", we check the restrictions that have bitten
GNN exports (measured):

* ScatterND with a reduction: unsupported ("`reduction` other than `none` is not supported").
* ScatterElements with a reduction: handled by a TensorRT plugin we do not ship; TensorRT 8.6 silently ignored scatter
  reductions. Any reduction is a violation.
* TopK: "`K` input must be less than 3840", "`sorted` must be 1"; K must be a build-time constant (initializer or
  Constant node): a computed K is a violation.
* Ops outside the default ONNX domain need a plugin: violation.
* "`axes` must be an initializer / resolvable to a constant" for Reduce*, Squeeze, Unsqueeze.
* GridSample: "Input must be 4D" (checked when shape inference knows the rank).
* UINT8 is "only supported as network input or output tensor types" (table); TensorRT's DataType docs: "Use the
  IdentityLayer to convert uint8 network-level inputs to {float32, float16} prior to use with other TensorRT layers";
  NVIDIA/TensorRT#3985 (maintainer, 2025-02): "All UINT8 inputs must directly feed into a cast layer ... No other
  layers support UINT8 inputs, even just data-movement ops like reshape / transpose." So a uint8 tensor may feed only
  Cast (we also flag Shape: the maintainer's rule names no exception).

Q/DQ graphs (INT8, explicit quantisation): `check_qdq` checks the placement TensorRT accepts (symmetric signed INT8,
per-tensor activations, per-channel weights along the output-channel axis, Q/DQ pairs).

Restrictions relevant to our graphs (from the same table): ArgMax FP32/FP16/BF16/INT32/INT64, no restriction;
GridSample FP32/FP16 only, 4D input; Softmax, MatMul, Gemm, Conv, MaxPool (2D/3D, no Indices output) unrestricted
for our use; Range supports FP32 and INT32/INT64.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

TOPK_MAX_K = 3840  # exclusive: "`K` input must be less than 3840"
DEFAULT_DOMAINS = {"", "ai.onnx"}
AXES_MUST_BE_CONSTANT = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                         "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze"}
OPS_FILE = "trt_onnx_supported_ops.json"


@cache
def supported_ops() -> dict:
    """The whole JSON document: version, source, operator table."""
    return json.loads(resources.files("leukograph.build_engines").joinpath(OPS_FILE).read_text())


def tensorrt_table_version() -> str:
    return supported_ops()["tensorrt_version"]


def _constants(graph: onnx.GraphProto, outer: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Values known at build time: initializers and Constant-node outputs (plus those of enclosing graphs)."""
    values = dict(outer or {})
    for init in graph.initializer:
        values[init.name] = numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name in ("value_int", "value_float"):
                    values[node.output[0]] = np.array(attr.i if attr.name == "value_int" else attr.f)
                elif attr.name in ("value_ints", "value_floats"):
                    values[node.output[0]] = np.array(attr.ints if attr.name == "value_ints" else attr.floats)
    return values


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _ranks(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """Tensor name -> rank and -> elem_type where shape inference knows them."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an unparseable graph is reported by the op checks; ranks are a bonus
        inferred = model
    ranks, types = {}, {}
    graph = inferred.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor_type = value.type.tensor_type
        types[value.name] = tensor_type.elem_type
        if tensor_type.HasField("shape"):
            ranks[value.name] = len(tensor_type.shape.dim)
    return ranks, types


def _check_graph(graph: onnx.GraphProto, table: dict, opset: int, ranks: dict[str, int], types: dict[str, int],
                 outer: dict[str, np.ndarray] | None, where: str) -> list[str]:
    problems: list[str] = []
    constants = _constants(graph, outer)
    for node in graph.node:
        label = f"{where}{node.op_type} '{node.name or node.output[0]}'"
        if node.domain not in DEFAULT_DOMAINS:
            problems.append(f"{label}: custom domain {node.domain!r} needs a TensorRT plugin")
            continue
        entry = table.get(node.op_type)
        if entry is None or not entry["supported"]:
            problems.append(f"{label}: not supported by TensorRT {tensorrt_table_version()}'s ONNX parser")
            continue
        if node.op_type in ("ScatterND", "ScatterElements", "Scatter"):
            reduction = _attr(node, "reduction", b"none")
            reduction = reduction.decode() if isinstance(reduction, bytes) else str(reduction)
            if reduction != "none":
                why = ("unsupported by the parser" if node.op_type == "ScatterND"
                       else "needs a TensorRT plugin we do not ship (TensorRT 8.6 silently ignored it)")
                problems.append(f"{label}: reduction={reduction!r} {why}")
        if node.op_type == "TopK":
            k_name = node.input[1] if len(node.input) > 1 else None
            k_value = constants.get(k_name) if k_name else None
            if k_name is None:  # opset < 10: K is an attribute
                k_value = np.array(_attr(node, "k", 0))
            if k_value is None:
                problems.append(f"{label}: K ({k_name}) is not a build-time constant")
            elif int(np.max(k_value)) >= TOPK_MAX_K:
                problems.append(f"{label}: K={int(np.max(k_value))} must be less than {TOPK_MAX_K}")
            if _attr(node, "sorted", 1) != 1:
                problems.append(f"{label}: sorted must be 1")
        if (node.op_type in AXES_MUST_BE_CONSTANT and len(node.input) > 1 and node.input[1]
                and node.input[1] not in constants):
            problems.append(f"{label}: axes ({node.input[1]}) must be a build-time constant")
        if node.op_type == "GridSample" and ranks.get(node.input[0], 4) != 4:
            problems.append(f"{label}: input must be 4D, got rank {ranks[node.input[0]]}")
        if node.op_type != "Cast" and any(types.get(name) == onnx.TensorProto.UINT8 for name in node.input):
            problems.append(f"{label}: consumes a uint8 tensor (TensorRT takes UINT8 only as network I/O)")
        for attr in node.attribute:  # If / Loop / Scan bodies
            if attr.type == onnx.AttributeProto.GRAPH:
                problems += _check_graph(attr.g, table, opset, ranks, types, constants, f"{label} > ")
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    problems += _check_graph(sub, table, opset, ranks, types, constants, f"{label} > ")
    return problems


# ---- explicit quantisation (Q/DQ) ------------------------------------------------------------------------------
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
QDQ_MIN_OPSET = 13  # per-channel scales (`axis`) on QuantizeLinear/DequantizeLinear
QUANTISED_COMPUTE = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _weight_axis(consumer: onnx.NodeProto, rank: int) -> int | None:
    """The output-channel axis of a learned op's weight, which a per-channel scale must follow."""
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        return 0 if _attr(consumer, "transB", 0) else 1
    if consumer.op_type == "MatMul":
        return rank - 1
    return None


def check_qdq(model: onnx.ModelProto) -> list[str]:
    """Q/DQ placement TensorRT's explicit quantisation accepts (TensorRT 10 Developer Guide, "Explicit Quantization";
    IQuantizeLayer / IDequantizeLayer reference); [] when the graph has none or all is well:

    * opset >= 13; scales and zero points are build-time constants; scales positive and finite;
    * signed INT8 only, symmetric: a zero point must be given (without one, QuantizeLinear outputs UINT8, which
      TensorRT takes only as network I/O), be INT8 and be all zeros ("only symmetric quantization is supported");
    * per-tensor scales for activations; a per-channel scale only on a constant weight, along the output-channel
      axis of the op it feeds (Conv 0, ConvTranspose 1, Gemm 0 with transB=1 else 1, MatMul the last axis);
    * every QuantizeLinear feeds DequantizeLinear nodes only, with the same scale and zero point (a Q/DQ pair);
    * a Conv/Gemm/MatMul with a dequantised weight also has a dequantised data input, or TensorRT runs it in float.
    """
    graph = model.graph
    if not any(node.op_type in QDQ_OPS for node in graph.node):
        return []
    constants = _constants(graph)
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
    if opset < QDQ_MIN_OPSET:
        problems.append(f"opset {opset}: per-channel Q/DQ needs opset >= {QDQ_MIN_OPSET}")
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        label = f"{node.op_type} '{node.name or node.output[0]}'"
        scale = constants.get(node.input[1])
        zero = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            problems.append(f"{label}: scale {node.input[1]} is not a build-time constant")
            continue
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            problems.append(f"{label}: scales must be positive and finite")
        if zero is None and node.op_type == "QuantizeLinear":
            problems.append(f"{label}: no INT8 zero point, so it outputs UINT8 (TensorRT takes UINT8 only as I/O)")
        elif zero is not None and zero.dtype != np.int8:
            problems.append(f"{label}: zero point is {zero.dtype}; TensorRT quantises to signed INT8")
        elif zero is not None and np.any(zero != 0):
            problems.append(f"{label}: zero point {int(np.max(np.abs(zero)))} != 0; TensorRT's explicit "
                            "quantisation is symmetric only")
        if (node.op_type == "DequantizeLinear" and node.input[0] in constants
                and constants[node.input[0]].dtype != np.int8):
            problems.append(f"{label}: weight {node.input[0]} is {constants[node.input[0]].dtype}, not INT8")
        if scale.size > 1:
            weight = constants.get(node.input[0])
            if weight is None:
                problems.append(f"{label}: per-channel scale on an activation; TensorRT takes per-tensor only")
            else:
                axis = _attr(node, "axis", 1) % weight.ndim
                for user in consumers.get(node.output[0], []):
                    want = _weight_axis(user, weight.ndim)
                    if want is not None and axis != want:
                        problems.append(f"{label}: per-channel axis {axis}, but {user.op_type} "
                                        f"'{user.name}' needs its output-channel axis {want}")
        if node.op_type == "QuantizeLinear":
            for user in consumers.get(node.output[0], []):
                if user.op_type != "DequantizeLinear":
                    problems.append(f"{label}: feeds {user.op_type} '{user.name}'; TensorRT wants each Q followed "
                                    "by a DequantizeLinear")
                    continue
                same_scale = np.array_equal(constants.get(user.input[1]), scale)
                user_zero = constants.get(user.input[2]) if len(user.input) > 2 and user.input[2] else None
                same_zero = (user_zero is None and zero is None) or (
                    user_zero is not None and zero is not None and np.array_equal(user_zero, zero))
                if not (same_scale and same_zero):
                    problems.append(f"{label}: its DequantizeLinear '{user.name}' uses another scale or zero point")
    for node in graph.node:
        if node.op_type not in QUANTISED_COMPUTE or len(node.input) < 2:
            continue
        dequantised = [producer.get(name) is not None and producer[name].op_type == "DequantizeLinear"
                       for name in node.input[:2]]
        if dequantised[1] and not dequantised[0]:
            problems.append(f"{node.op_type} '{node.name}': INT8 weight but a float data input: TensorRT runs it in "
                            "float")
    return problems


def check_trt_compat(model: onnx.ModelProto | str | Path) -> list[str]:
    """Every reason TensorRT's ONNX parser (per the recorded table) would reject or mis-handle `model`; [] if none."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    doc = supported_ops()
    low, high = doc["opset_range"]
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
    if not low <= opset <= high:
        problems.append(f"opset {opset} outside TensorRT {doc['tensorrt_version']}'s range {low}..{high}")
    problems += [f"opset import of custom domain {o.domain!r} needs a TensorRT plugin"
                 for o in model.opset_import if o.domain not in DEFAULT_DOMAINS and o.domain != "ai.onnx.ml"]
    ranks, types = _ranks(model)
    problems += _check_graph(model.graph, doc["operators"], opset, ranks, types, None, "")
    return problems + check_qdq(model)
