"""FP16 copies of the served ONNX graphs with fp32 I/O (uint8 FRAME untouched), for checking FP16 numerics on CPU.

TensorRT builds FP16 engines from the fp32 graph itself (BuilderFlag.FP16); these files let ONNX Runtime on a CPU
machine measure what fp16 arithmetic does to our outputs before any GPU is involved. They are build products, written
under a build/temp folder, never committed.

Converter: `onnxruntime.transformers.float16.convert_float_to_float16`, the maintained fork of onnxconverter_common's
function with the same signature. Measured here (onnxconverter_common 1.16.0, onnx 1.23, ORT 1.32) on both exported
graphs: `onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)` crashes in
`remove_unnecessary_cast_node` ("AttributeError: 'list' object has no attribute 'input'"), and with
keep_io_types=False ORT refuses the result ("Type (tensor(float16)) of output arg (/Cast_1_output_0) ... does not match
expected type (tensor(float))"). The ORT fork converts both and ORT CPU loads and runs them.

Op block list: the converter's default (TopK, Range, Min, Max, CumSum, ... stay fp32). Every op of our graphs,
GridSample included, has an fp16 CPU kernel in ORT 1.32 (measured: both graphs load with an empty block list), so
nothing is blocked for want of a kernel. TopK stays fp32 by default; that only keeps the sort in fp32 - the distances
feeding it are still computed in fp16, as in a TensorRT FP16 engine. See tests/test_fp16.py for the measured effect.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx

FP16_SUFFIX = ".fp16.onnx"


def default_op_block_list() -> list[str]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return list(DEFAULT_OP_BLOCK_LIST)


def convert_model_to_fp16(model: onnx.ModelProto, op_block_list: list[str] | None = None) -> onnx.ModelProto:
    """fp16 weights and activations; float inputs/outputs stay fp32, integer ones (uint8 FRAME, int32 LABELS) as is."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number ... will be truncated to 1e-07/65504" per constant
        converted = convert_float_to_float16(model, keep_io_types=True,
                                             op_block_list=default_op_block_list() if op_block_list is None
                                             else op_block_list)
    for original, new in zip(list(model.graph.input) + list(model.graph.output),
                             list(converted.graph.input) + list(converted.graph.output)):
        if original.type.tensor_type.elem_type != new.type.tensor_type.elem_type or original.name != new.name:
            raise RuntimeError(f"fp16 conversion changed I/O {original.name}: {original.type} -> {new.type}")
    return converted


def fp16_path(fp32_path: Path, out_dir: Path) -> Path:
    """<out_dir>/<stage>/model.fp16.onnx for <repo>/<stage>/1/model.onnx."""
    return out_dir / fp32_path.parent.parent.name / (fp32_path.stem + FP16_SUFFIX)


def convert_file(fp32_path: Path, out_dir: Path, op_block_list: list[str] | None = None) -> Path:
    """Write the fp16 copy of `fp32_path` under `out_dir` (weights inline) and return its path."""
    model = onnx.load(str(fp32_path))
    converted = convert_model_to_fp16(model, op_block_list)
    path = fp16_path(fp32_path, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(path), save_as_external_data=False)
    return path
