"""FP16 copies of the served ONNX graphs with fp32 I/O (uint8 FRAME untouched): what a strongly typed TensorRT
FP16 engine is built from, and what ONNX Runtime runs on CPU to measure FP16 numerics before any GPU is involved.

TensorRT builds the FP16 engine from this file, not from the fp32 graph plus `BuilderFlag.FP16`: the flag (and
`IBuilder.platform_has_fast_fp16`) is deprecated in TensorRT 10 and removed in 11 (TensorRT 10.x -> 11 migration
notes), and a *strongly typed* network (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`, TensorRT 10 Developer Guide,
"Strongly Typed Networks") computes every tensor in exactly the type the ONNX graph gives it. So the precision decisions
below are the engine's precision decisions, and the ONNX Runtime tests of this file check the engine's numerics.
These files are build products, written under a build/temp folder, never committed.

Converter: `onnxruntime.transformers.float16.convert_float_to_float16`, the maintained fork of onnxconverter_common's
function with the same signature. Measured here (onnxconverter_common 1.16.0, onnx 1.23, ORT 1.32) on both exported
graphs: `onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)` crashes in
`remove_unnecessary_cast_node` ("AttributeError: 'list' object has no attribute 'input'"), and with
keep_io_types=False ORT refuses the result ("Type (tensor(float16)) of output arg (/Cast_1_output_0) ... does not match
expected type (tensor(float))"). The ORT fork converts both and ORT CPU loads and runs them.

Three things are added after the converter:

* Coordinates stay fp32. Box corners, frame sides and everything computed from them (crop centres, GridSample's
  sampling grid, the GNN's geometry features and kNN distances) are kept in fp32 up to the first learned layer
  (`coordinate_nodes`). fp16 spaces representable values 2 apart between 2048 and 4096, so at the largest frame the
  contract admits (MAX_FRAME_SIDE = 4096) an fp16 grid moves crops by up to ~2 px; measured on held-out frames placed
  in the far corner of a 4096x4096 frame, the all-fp16 graph drifted 0.083 in probability from fp32 (tolerance 0.05).
  Pixels (0..1) and learned layers stay fp16. See tests/test_fp16.py.
* The converter brackets every blocked node with its own Cast pair (fp32 -> fp16 -> fp32 between two blocked nodes),
  which would round the coordinates to fp16 anyway; `fold_round_trips` removes each Cast(fp16) -> Cast(fp32) pair on a
  fp32 value.
* The converter appends its Cast nodes at the end of the node list; the ONNX IR spec requires nodes in topological
  order (`onnx.checker` refuses the converter's output), so `topological_sort` restores it before TensorRT's parser
  or anyone else reads the file.

Op block list: the converter's default (TopK, Range, Min, Max, CumSum, ... stay fp32). Every op of our graphs,
GridSample included, has an fp16 CPU kernel in ORT 1.32 (measured: both graphs load with an empty block list), so
nothing is blocked for want of a kernel.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import onnx
from onnx import TensorProto

FP16_SUFFIX = ".fp16.onnx"
# Graph inputs that carry pixel coordinates or frame sides; Shape outputs (frame sides) are coordinates too.
COORDINATE_INPUTS = ("BOXES", "FRAME_SIZE")
# Ops that hold learned weights: the coordinate region ends at the first of them.
LEARNED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def default_op_block_list() -> list[str]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return list(DEFAULT_OP_BLOCK_LIST)


def coordinate_nodes(model: onnx.ModelProto, coordinate_inputs: tuple[str, ...] = COORDINATE_INPUTS) -> list[str]:
    """Names of the nodes that compute on coordinates: reached from `coordinate_inputs` or from a Shape node, and not
    at or after a learned layer (an op of LEARNED_OPS with an initializer input). Constants feeding only such nodes
    are included, so their values stay fp32 as well. Nodes must be in topological order (as exported)."""
    initializers = {i.name for i in model.graph.initializer}
    coordinates, after_learned = set(coordinate_inputs), set()
    blocked: list[str] = []
    for node in model.graph.node:
        inputs = [name for name in node.input if name]
        learned = node.op_type in LEARNED_OPS and any(name in initializers for name in inputs)
        if learned or any(name in after_learned for name in inputs):
            after_learned.update(node.output)
        elif node.op_type == "Shape":  # integer output: nothing to keep fp32, but what it feeds is a coordinate
            coordinates.update(node.output)
        elif any(name in coordinates for name in inputs):
            coordinates.update(node.output)
            blocked.append(node.name)
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    inside = set(blocked)
    for node in model.graph.node:
        users = [user for output in node.output for user in consumers.get(output, [])]
        if node.op_type == "Constant" and users and all(user in inside for user in users):
            blocked.append(node.name)
    return blocked


def _cast_to(node: onnx.NodeProto) -> int:
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "to")


def fold_round_trips(model: onnx.ModelProto) -> int:
    """Rewire every Cast(to=float) of a Cast(to=float16) of a float32 value to that value; drop nodes left unused.
    Returns the number of round trips removed. The model is changed in place."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    producer = {output: node for node in model.graph.node for output in node.output}
    replace = {}
    for node in model.graph.node:
        if node.op_type != "Cast" or _cast_to(node) != TensorProto.FLOAT:
            continue
        source = producer.get(node.input[0])
        if (source is not None and source.op_type == "Cast" and _cast_to(source) == TensorProto.FLOAT16
                and types.get(source.input[0]) == TensorProto.FLOAT):
            replace[node.output[0]] = source.input[0]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    graph_outputs = {o.name for o in model.graph.output}
    while True:
        used = {name for node in model.graph.node for name in node.input} | graph_outputs
        dead = [node for node in model.graph.node if not any(output in used for output in node.output)]
        if not dead:
            return len(replace)
        for node in dead:
            model.graph.node.remove(node)


def drop_duplicate_casts(model: onnx.ModelProto) -> int:
    """Keep one of several identical Cast nodes writing the same tensor (onnxruntime < 1.32's converter adds one per
    consumer of a blocked node's input, all named `<input>_cast_to_fp32`, which breaks SSA form), and one value_info
    per name. Returns the number of nodes dropped; a name written by two different nodes raises RuntimeError."""
    producers: dict[str, onnx.NodeProto] = {}
    duplicates = []
    for node in model.graph.node:
        for output in node.output:
            first = producers.setdefault(output, node)
            if first is node:
                continue
            same = (node.op_type == first.op_type == "Cast" and list(node.input) == list(first.input)
                    and _cast_to(node) == _cast_to(first))
            if not same:
                raise RuntimeError(f"fp16 conversion: {output} is written by {first.name} and {node.name}")
            duplicates.append(node)
    for node in duplicates:
        model.graph.node.remove(node)
    seen: set[str] = set()
    for info in list(model.graph.value_info):
        if info.name in seen:
            model.graph.value_info.remove(info)
        seen.add(info.name)
    return len(duplicates)


def topological_sort(model: onnx.ModelProto) -> None:
    """Reorder the nodes so each comes after the producers of its inputs (stable otherwise); in place."""
    available = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            raise RuntimeError(f"graph has a cycle or a dangling input near node {pending[0].name!r}")
        ready_ids = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in ready_ids]
        for node in ready:
            ordered.append(node)
            available.update(node.output)
    copies = [onnx.NodeProto() for _ in ordered]
    for duplicate, node in zip(copies, ordered):
        duplicate.CopyFrom(node)
    del model.graph.node[:]
    model.graph.node.extend(copies)


def nodes_after(model: onnx.ModelProto, op_type: str) -> list[str]:
    """Names of the nodes at or after the first `op_type` node (topological order): e.g. a detector's post-processing
    from its Sigmoid on, kept fp32 so that peak extraction compares values of one precision."""
    start = next((i for i, node in enumerate(model.graph.node) if node.op_type == op_type), len(model.graph.node))
    region: set[str] = set()
    names: list[str] = []
    for index, node in enumerate(model.graph.node):
        if index == start or any(name in region for name in node.input):
            region.update(node.output)
            names.append(node.name)
    return names


def convert_model_to_fp16(model: onnx.ModelProto, op_block_list: list[str] | None = None,
                          keep_coordinates_fp32: bool = True, fp32_after: str | None = None) -> onnx.ModelProto:
    """fp16 weights and activations; float inputs/outputs stay fp32, integer ones (uint8 FRAME, int32 LABELS) as is;
    coordinate arithmetic stays fp32 unless `keep_coordinates_fp32` is False (the plain converter, for comparison)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = copy.deepcopy(model)  # the converter and the naming below change the model they are given
    for index, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{index}"  # the block list works by node name
    node_block_list = coordinate_nodes(model) if keep_coordinates_fp32 else None
    if fp32_after is not None:
        node_block_list = (node_block_list or []) + nodes_after(model, fp32_after)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number ... will be truncated to 1e-07/65504" per constant
        converted = convert_float_to_float16(model, keep_io_types=True,
                                             op_block_list=default_op_block_list() if op_block_list is None
                                             else op_block_list, node_block_list=node_block_list)
    drop_duplicate_casts(converted)
    topological_sort(converted)
    if keep_coordinates_fp32:
        fold_round_trips(converted)
    for original, new in zip(list(model.graph.input) + list(model.graph.output),
                             list(converted.graph.input) + list(converted.graph.output)):
        if original.type.tensor_type.elem_type != new.type.tensor_type.elem_type or original.name != new.name:
            raise RuntimeError(f"fp16 conversion changed I/O {original.name}: {original.type} -> {new.type}")
    onnx.checker.check_model(converted)
    return converted


def fp16_path(fp32_path: Path, out_dir: Path) -> Path:
    """<out_dir>/<stage>/model.fp16.onnx for <repo>/<stage>/1/model.onnx."""
    return out_dir / fp32_path.parent.parent.name / (fp32_path.stem + FP16_SUFFIX)


def convert_file(fp32_path: Path, out_dir: Path, op_block_list: list[str] | None = None,
                 keep_coordinates_fp32: bool = True, fp32_after: str | None = None) -> Path:
    """Write the fp16 copy of `fp32_path` under `out_dir` (weights inline) and return its path."""
    model = onnx.load(str(fp32_path))
    converted = convert_model_to_fp16(model, op_block_list, keep_coordinates_fp32, fp32_after)
    path = fp16_path(fp32_path, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(path), save_as_external_data=False)
    return path
