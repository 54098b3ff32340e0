"""FP16 numerics on CPU (ONNX Runtime), and fp32 parity ONNX Runtime vs PyTorch, on real BCCD held-out frames.

The FP16 graphs are what a strongly typed TensorRT FP16 engine is built from (build_engines/fp16.py), so their
numerics here are the engine's precision choices. Checked at BCCD's 480x640 and at the largest frame the default
profile and the configs admit (MAX_FRAME_SIDE on both sides), where fp16 coordinates would be coarsest.
Boxes: the project's localiser when it imports, else the VOC annotations (see build_engines/verify.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from leukograph.build_engines import fp16, verify
from leukograph.build_engines.frame_samples import largest_frame_samples
from leukograph.build_engines.onnx_ops import check_trt_compat
from leukograph.client.contract import CELL_GRAPH, CROP_EMBEDDER, MAX_CELLS, MAX_FRAME_SIDE, STAGES
from leukograph.deploy.paths import WEIGHTS_DIR
from leukograph.deploy.runners import OrtRunner, run_pipeline

PARITY_ATOL = 1e-4
TYPICAL_CELLS = 16
LARGEST_FRAME_SAMPLES = 8  # held-out frames pasted into the corner of a MAX_FRAME_SIDE x MAX_FRAME_SIDE frame


def _weights() -> Path:
    return WEIGHTS_DIR


@pytest.fixture(scope="session")
def fp32_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both stages exported from $LEUKOGRAPH_WEIGHTS, else training/weights/ (fails loudly when absent)."""
    from leukograph.training.export import export_all

    repository = tmp_path_factory.mktemp("fp16_repo")
    export_all(_weights(), repository)
    return repository


@pytest.fixture(scope="session")
def fp16_paths(fp32_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("fp16_build")
    return {s.name: fp16.convert_file(fp32_repository / s.name / "1" / "model.onnx", out) for s in STAGES}


@pytest.fixture(scope="session")
def samples() -> list[verify.Sample]:
    found = verify.held_out_samples("auto")
    assert len(found) >= 50, f"only {len(found)} held-out frames with cells"
    return found


def test_fp16_graphs_keep_fp32_io_and_uint8_frame(fp32_repository: Path, fp16_paths: dict[str, Path]) -> None:
    for stage in STAGES:
        ref = onnx.load(str(fp32_repository / stage.name / "1" / "model.onnx"))
        half = onnx.load(str(fp16_paths[stage.name]))
        io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in list(m.graph.input) + list(m.graph.output)]  # noqa: E731
        assert io(half) == io(ref)
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in half.graph.initializer), "weights not fp16"
        assert fp16_paths[stage.name].name.endswith(fp16.FP16_SUFFIX)
    frame_type = dict(io(onnx.load(str(fp16_paths[CROP_EMBEDDER.name]))))["FRAME"]
    assert frame_type == onnx.TensorProto.UINT8


def test_fp16_graphs_are_valid_onnx_with_fp32_coordinates(fp16_paths: dict[str, Path]) -> None:
    """Topologically sorted (onnx.checker, as TensorRT's parser reads nodes in order), GridSample and its sampling
    grid in fp32, convolutions and matmuls in fp16."""
    for stage in STAGES:
        model = onnx.load(str(fp16_paths[stage.name]))
        onnx.checker.check_model(model)
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(
            inferred.graph.input)}
        types.update({i.name: i.data_type for i in model.graph.initializer})
        for node in model.graph.node:
            if node.op_type == "GridSample":
                assert [types[name] for name in node.input] == [onnx.TensorProto.FLOAT] * 2, node.name
            if node.op_type in ("Conv", "Gemm", "MatMul"):
                assert types[node.input[1]] == onnx.TensorProto.FLOAT16, node.name
        assert check_trt_compat(fp16_paths[stage.name]) == [], stage.name  # what TensorRT's parser reads
    crop = onnx.load(str(fp16_paths[CROP_EMBEDDER.name]))
    assert any(node.op_type == "GridSample" for node in crop.graph.node)


def test_fp16_matches_fp32_on_every_held_out_frame(fp32_repository: Path, fp16_paths: dict[str, Path],
                                                    samples: list[verify.Sample]) -> None:
    reference = verify.ort_pipeline(fp32_repository)
    candidate = [OrtRunner(fp16_paths[stage.name], stage) for stage in (CROP_EMBEDDER, CELL_GRAPH)]
    result = verify.compare(reference, candidate, samples)
    print(f"\nFP16 ORT vs fp32 ORT: {result.line()}")
    print(f"largest probability difference: {result.max_prob_diff:.6f} (frame {result.max_prob_diff_frame}); "
          f"largest embedding difference {result.max_embedding_abs_diff:.6f}")
    for line in result.disagreements[:10]:
        print(f"  {line}")
    assert result.frames == len(samples)
    assert result.class_agreement >= verify.MIN_CLASS_AGREEMENT, result.line()
    assert result.labelled_nodes > 0
    assert result.accuracy_drop <= verify.MAX_ACCURACY_DROP, result.line()
    assert result.frame_size_mismatches == 0


@pytest.fixture(scope="session")
def plain_fp16_paths(fp32_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The converter alone (coordinates in fp16 too), for comparison."""
    out = tmp_path_factory.mktemp("fp16_plain")
    return {s.name: fp16.convert_file(fp32_repository / s.name / "1" / "model.onnx", out,
                                      keep_coordinates_fp32=False) for s in STAGES}


@pytest.mark.slow
def test_fp16_matches_fp32_at_the_largest_admitted_frame(fp32_repository: Path, fp16_paths: dict[str, Path],
                                                         plain_fp16_paths: dict[str, Path],
                                                         samples: list[verify.Sample]) -> None:
    """Held-out frames pasted into the bottom-right corner of a MAX_FRAME_SIDE x MAX_FRAME_SIDE frame: the cells keep
    their size while their coordinates reach 4096, where fp16 values are 2 apart."""
    big = largest_frame_samples(samples, MAX_FRAME_SIDE, MAX_FRAME_SIDE, LARGEST_FRAME_SAMPLES)
    assert len(big) == LARGEST_FRAME_SAMPLES and big[0].frame.shape == (MAX_FRAME_SIDE, MAX_FRAME_SIDE, 3)
    reference = verify.ort_pipeline(fp32_repository)
    result = verify.compare(reference, [OrtRunner(fp16_paths[stage.name], stage)
                                        for stage in (CROP_EMBEDDER, CELL_GRAPH)], big)
    plain = verify.compare(reference, [OrtRunner(plain_fp16_paths[stage.name], stage)
                                       for stage in (CROP_EMBEDDER, CELL_GRAPH)], big)
    print(f"\nat {MAX_FRAME_SIDE}x{MAX_FRAME_SIDE}, FP16 (coordinates fp32) vs fp32: {result.line()}")
    print(f"at {MAX_FRAME_SIDE}x{MAX_FRAME_SIDE}, FP16 converter alone vs fp32: {plain.line()}")
    assert result.failures() == [], result.line()
    assert result.frame_size_mismatches == 0


# ---- fp32 parity: ONNX Runtime vs PyTorch ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def torch_stages():
    from leukograph.training.checkpoints import load_models
    from leukograph.training.models import CellGraphStage, CropEmbedderStage

    embedder, gnn, _ = load_models(_weights())
    return CropEmbedderStage(embedder).eval(), CellGraphStage(gnn).eval()


def _boxes_for(sample: verify.Sample, n: int, seed: int = 0) -> np.ndarray:
    """n boxes from the frame's real boxes: the first n, or tiled with a random sub-pixel-to-8px jitter up to n."""
    boxes = sample.boxes
    if n <= len(boxes):
        return boxes[:n].copy()
    rng = np.random.default_rng(seed)
    h, w = sample.frame.shape[:2]
    tiled = np.concatenate([boxes] * (n // len(boxes) + 1))[:n].copy()
    tiled[len(boxes):] += rng.uniform(-8, 8, size=(n - len(boxes), 4)).astype(np.float32)
    tiled[:, [0, 2]] = np.clip(tiled[:, [0, 2]], 0, w)
    tiled[:, [1, 3]] = np.clip(tiled[:, [1, 3]], 0, h)
    tiled[:, 2:] = np.maximum(tiled[:, 2:], tiled[:, :2] + 2.0)
    tiled[:, [0, 2]] = np.clip(tiled[:, [0, 2]], 0, w)
    tiled[:, [1, 3]] = np.clip(tiled[:, [1, 3]], 0, h)
    return tiled.astype(np.float32)


@pytest.mark.parametrize("cells", [1, 2, TYPICAL_CELLS, MAX_CELLS])
def test_fp32_onnxruntime_matches_pytorch(fp32_repository: Path, torch_stages, samples: list[verify.Sample],
                                          cells: int) -> None:
    embedder_t, graph_t = torch_stages
    embedder_o, graph_o = verify.ort_pipeline(fp32_repository)
    worst = 0.0
    for sample in samples[:3]:
        boxes = _boxes_for(sample, cells)
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        ort_out = run_pipeline([embedder_o, graph_o], sample.frame, boxes)
        with torch.no_grad():
            count = torch.tensor([len(boxes)], dtype=torch.int32)
            emb, size = embedder_t(torch.from_numpy(sample.frame), torch.from_numpy(boxes), count)
            probs, labels = graph_t(emb, torch.from_numpy(boxes), size, count)
        diff = float(np.abs(ort_out["PROBS"] - probs.numpy()).max())
        worst = max(worst, diff)
        assert ort_out["PROBS"].shape == (cells, probs.shape[1])
        assert diff <= PARITY_ATOL, f"{sample.frame_id}, {cells} cells: max |p_ort - p_torch| = {diff:.2e}"
        assert np.array_equal(ort_out["FRAME_SIZE"], size.numpy())
        assert np.array_equal(ort_out["LABELS"], labels.numpy())
    print(f"\n{cells} cells: max |p_ort - p_torch| = {worst:.2e} over 3 frames")


def test_duplicate_casts_of_older_converters_are_folded() -> None:
    """onnxruntime < 1.32's fp16 converter writes one `<x>_cast_to_fp32` Cast per blocked consumer of x (the
    detector's box decoding has two): one is kept, so the graph is in SSA form again; anything else is refused."""
    from onnx import TensorProto, helper

    def cast(name: str, to: int = TensorProto.FLOAT) -> onnx.NodeProto:
        return helper.make_node("Cast", ["x"], ["x_cast_to_fp32"], to=to, name=name)

    def graph(*nodes: onnx.NodeProto) -> onnx.ModelProto:
        consumers = [helper.make_node("Neg", ["x_cast_to_fp32"], [f"y{i}"], name=f"neg{i}") for i in range(2)]
        return helper.make_model(helper.make_graph(
            [*nodes, *consumers], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
            [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2]) for i in range(2)],
            value_info=[helper.make_tensor_value_info("x_cast_to_fp32", TensorProto.FLOAT, [2])] * len(nodes)))

    model = graph(cast("c0"), cast("c1"))
    assert fp16.drop_duplicate_casts(model) == 1
    assert [n.name for n in model.graph.node] == ["c0", "neg0", "neg1"] and len(model.graph.value_info) == 1
    onnx.checker.check_model(model)
    with pytest.raises(RuntimeError, match="written by c0 and c1"):
        fp16.drop_duplicate_casts(graph(cast("c0"), cast("c1", TensorProto.DOUBLE)))
