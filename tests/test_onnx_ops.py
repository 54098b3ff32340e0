"""TensorRT ONNX-parser compatibility of the exported graphs (static check against onnx-tensorrt's operator table)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from leukograph.build_engines.onnx_ops import TOPK_MAX_K, check_trt_compat, supported_ops
from leukograph.client.contract import STAGES
from leukograph.deploy.paths import WEIGHTS_DIR


@pytest.fixture(scope="session")
def exported_onnx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both stages exported from $LEUKOGRAPH_WEIGHTS, else the project's training/weights/ (fails when absent)."""
    from leukograph.training.export import export_all

    weights = WEIGHTS_DIR
    return export_all(weights, tmp_path_factory.mktemp("onnx_ops_repo"))


def test_table_records_its_tensorrt_version_and_source() -> None:
    doc = supported_ops()
    assert doc["tensorrt_version"].startswith("10.")
    assert doc["source"]["repository"] == "onnx/onnx-tensorrt" and doc["source"]["path"] == "docs/operators.md"
    ops = doc["operators"]
    assert ops["GridSample"]["supported"] and "4D" in ops["GridSample"]["restrictions"]
    assert "3840" in ops["TopK"]["restrictions"]
    assert "reduction" in ops["ScatterND"]["restrictions"]
    assert not ops["Unique"]["supported"]


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_exported_graphs_are_tensorrt_compatible(exported_onnx: dict[str, Path], stage: str) -> None:
    problems = check_trt_compat(exported_onnx[stage])
    assert problems == [], f"{stage}: " + "\n".join(problems)


def _model(nodes: list, inputs: list, outputs: list, initializers: list = (), opset: int = 18,
           domains: tuple = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports)


def test_checker_catches_scatter_reduction_and_large_topk() -> None:
    n = TOPK_MAX_K + 200
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [3, 1])
    upd = helper.make_tensor_value_info("upd", TensorProto.FLOAT, [3, 4])
    row = helper.make_tensor_value_info("row", TensorProto.FLOAT, [1, n])
    k = onnx.numpy_helper.from_array(np.array([4000], np.int64), "k")
    nodes = [
        helper.make_node("ScatterND", ["x", "idx", "upd"], ["scattered"], reduction="add", name="scatter_add"),
        helper.make_node("TopK", ["row", "k"], ["values", "indices"], axis=1, name="topk_4000"),
    ]
    outs = [helper.make_tensor_value_info("scattered", TensorProto.FLOAT, [8, 4]),
            helper.make_tensor_value_info("values", TensorProto.FLOAT, [1, 4000]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, [1, 4000])]
    model = _model(nodes, [x, idx, upd, row], outs, [k])
    onnx.checker.check_model(model)
    problems = check_trt_compat(model)
    assert any("scatter_add" in p and "reduction='add'" in p for p in problems), problems
    assert any("topk_4000" in p and "K=4000" in p for p in problems), problems
    assert len(problems) == 2, problems


def test_checker_catches_computed_k_scatter_elements_reduction_custom_op_and_uint8() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [8, 4])
    frame = helper.make_tensor_value_info("frame", TensorProto.UINT8, [4, 4, 3])
    nodes = [
        helper.make_node("ScatterElements", ["x", "idx", "x"], ["s"], reduction="max", name="scatter_max"),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["k_computed"], axis=0),
        helper.make_node("TopK", ["x", "k_computed"], ["v", "i"], axis=0, name="topk_dynamic"),
        helper.make_node("Transpose", ["frame"], ["frame_t"], perm=[2, 0, 1], name="uint8_transpose"),
        helper.make_node("Cast", ["frame_t"], ["frame_f"], to=TensorProto.FLOAT),
        helper.make_node("MyPluginOp", ["x"], ["y"], domain="com.example", name="custom"),
    ]
    zero = onnx.numpy_helper.from_array(np.array([0], np.int64), "zero")
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("s", "v", "frame_f", "y")]
    problems = check_trt_compat(_model(nodes, [x, idx, frame], outs, [zero], domains=("com.example",)))
    joined = "\n".join(problems)
    assert "scatter_max" in joined and "plugin" in joined
    assert "topk_dynamic" in joined and "not a build-time constant" in joined
    assert "uint8_transpose" in joined and "uint8" in joined
    assert "custom" in joined and "com.example" in joined


def test_checker_accepts_constant_k_below_limit_and_plain_scatter() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [3, 1])
    upd = helper.make_tensor_value_info("upd", TensorProto.FLOAT, [3, 4])
    nodes = [
        helper.make_node("Constant", [], ["k"], value=onnx.numpy_helper.from_array(np.array([3], np.int64))),
        helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=0),
        helper.make_node("ScatterND", ["x", "idx", "upd"], ["s"]),
    ]
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("v", "s")]
    assert check_trt_compat(_model(nodes, [x, idx, upd], outs)) == []
