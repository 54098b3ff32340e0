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
    return problems
