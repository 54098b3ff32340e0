"""INT8: the QDQ crop_embedder (training/quantize.py), its TensorRT Q/DQ check, serving it through Triton.

The graphs are quantised here from the committed (or $LEUKOGRAPH_WEIGHTS) weights, calibrated on training crops of
every source (a handful of training images per dataset, train's smoke mode, to keep the test short), and checked on
the BCCD held-out frames. No figure of the current weights is assumed: the bounds are the issue's (>= 99% labels
agree with FP32, <= 0.5 point accuracy change) and INT8_TOLERANCE.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from leukograph.build_engines import int8, verify
from leukograph.build_engines.onnx_ops import check_qdq, check_trt_compat
from leukograph.client.contract import CELL_GRAPH, CROP_EMBEDDER, CROP_SIZE, STAGES, boxes_feed, stage_path
from leukograph.client.errors import UserError
from leukograph.client.images import read_image
from leukograph.client.localize import localize
from leukograph.deploy import model_repository as repo
from leukograph.deploy.paths import WEIGHTS_DIR, data_root
from leukograph.deploy.runners import TOLERANCES, TritonRunner, compare
from leukograph.deploy.server import TritonServer, ensure_exported, free_port, int8_stale
from leukograph.training import quantize
from leukograph.training.cells import crops_for
from leukograph.training.datasets import load_bccd
from leukograph.training.models import crop_cells

CALIBRATION_IMAGES = 6  # training images per dataset for the test's calibration
CALIBRATION_PER_SOURCE = 32


@pytest.fixture(scope="module")
def calibration() -> quantize.CalibrationSet:
    return quantize.calibration_set(data_root(), CALIBRATION_PER_SOURCE, seed=0, max_images=CALIBRATION_IMAGES)


@pytest.fixture(scope="module")
def int8_repository(calibration: quantize.CalibrationSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated repository with both FP32 graphs and both INT8 crop_embedder graphs."""
    from leukograph.training.export import export_all

    repository = tmp_path_factory.mktemp("int8_repository")
    repo.generate(repository, "onnxruntime")
    export_all(WEIGHTS_DIR, repository)
    fp32 = stage_path(repository, CROP_EMBEDDER, "model.onnx")
    for runtime in quantize.INT8_FILES:
        quantize.quantize_crop_embedder(fp32, quantize.int8_path(repository, runtime), calibration, runtime)
    return repository


@pytest.fixture(scope="module")
def float_graph(int8_repository: Path) -> onnx.ModelProto:
    """The exported FP32 crop_embedder, every node named (as the quantiser names them)."""
    return quantize.named_nodes(onnx.load(str(stage_path(int8_repository, CROP_EMBEDDER, "model.onnx"))))


@pytest.fixture(scope="module")
def samples() -> list[verify.Sample]:
    found = verify.held_out_samples("auto")
    assert len(found) >= 50, f"only {len(found)} held-out frames with cells"
    return found


def test_calibration_covers_every_training_source(calibration: quantize.CalibrationSet) -> None:
    assert {"bccd", "4class", "pbc"} <= set(calibration.crops)
    assert any(source.startswith("txl-") for source in calibration.crops)
    for crops in calibration.crops.values():
        assert crops.dtype == np.uint8 and crops.shape[1:] == (CROP_SIZE, CROP_SIZE, 3) and len(crops)
    frames = list(calibration.frames())
    cells = sum(len(crops) for crops in calibration.crops.values())
    assert cells % (quantize.MOSAIC_COLUMNS ** 2)  # this set does not fill its last mosaic by itself
    # every calibration frame has one shape, which ONNX Runtime's percentile (histogram) calibration needs
    assert len({frame.shape for frame, _ in frames}) == 1 and len({len(boxes) for _, boxes in frames}) == 1
    assert len(frames) == -(-cells // quantize.MOSAIC_COLUMNS ** 2)


def test_mosaic_frame_gives_back_each_crop_through_the_in_graph_crop() -> None:
    frame_item = load_bccd(data_root())[0]
    image = read_image(frame_item.image_path)
    crops = crops_for(image, localize(image).boxes, size=CROP_SIZE, zoom=1.0)  # the served crops of a real frame
    frame, boxes = quantize.mosaic(crops)
    with torch.no_grad():
        again = crop_cells(torch.from_numpy(frame), torch.from_numpy(boxes))
    again = (again.permute(0, 2, 3, 1) * 255.0).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(again, crops)


def test_tensorrt_graph_passes_the_op_and_qdq_checks(int8_repository: Path, float_graph: onnx.ModelProto) -> None:
    path = quantize.int8_path(int8_repository, "tensorrt")
    assert check_trt_compat(path) == []
    model = onnx.load(str(path))
    front = set(quantize.front_nodes(float_graph))
    convolutions = sum(node.op_type == "Conv" and node.name not in front for node in float_graph.graph.node)
    assert convolutions >= 6  # the --ibn release: 8 convolutions, the first block's two (16 channels) stay FP32
    assert quantize.quantised_nodes(model).get("Conv") == convolutions  # every other one computes on INT8 inputs
    assert int8.network_path(int8_repository, CROP_EMBEDDER, {}) == (path, True)
    assert int8.network_path(int8_repository, CELL_GRAPH, {})[1] is False  # the cell_graph stays FP32


def test_onnxruntime_graph_is_not_tensorrt_s_and_the_check_says_why(int8_repository: Path) -> None:
    problems = check_qdq(onnx.load(str(quantize.int8_path(int8_repository, "onnxruntime"))))
    assert any("zero point is uint8" in p for p in problems)  # ORT's unsigned activations (ACTIVATION_TYPES)
    assert any("int32" in p for p in problems)  # ORT's int32 biases


@pytest.mark.parametrize("runtime", list(quantize.INT8_FILES))
def test_front_of_the_graph_stays_fp32(int8_repository: Path, float_graph: onnx.ModelProto, runtime: str) -> None:
    model = onnx.load(str(quantize.int8_path(int8_repository, runtime)))
    fed_by_dq = set(quantize.quantised_nodes(model))
    assert fed_by_dq <= {*quantize.QUANTISED_OPS, *quantize.FLOAT_BETWEEN_OPS}
    frame_users = [node.op_type for node in model.graph.node if "FRAME" in node.input]
    assert frame_users and set(frame_users) <= {"Cast", "Shape"}  # uint8 FRAME feeds its Cast (and the frame size)
    first_q = next(node for node in model.graph.node if node.op_type == "QuantizeLinear")
    producer = {out: node for node in model.graph.node for out in node.output}
    before_q = producer[first_q.input[0]]
    if before_q.op_type == "Pad":  # the zero channel, padded on in FP32 (onnxruntime only)
        assert quantize.FIRST_CONV_CHANNEL_MULTIPLE[runtime] > 1
        before_q = producer[before_q.input[0]]
    front = quantize.front_nodes(float_graph)
    assert before_q.name == front[-1]  # the last FP32 node: colour standardisation, or the narrow first block
    assert any(node.op_type == "Div" for node in float_graph.graph.node if node.name in front)


def _first_conv_input_channels(model: onnx.ModelProto, quantised: bool = False) -> int:
    """Input channels of the first convolution (with `quantised`, of the first one fed by a DequantizeLinear)."""
    initializers = {i.name: i for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    conv = next(node for node in model.graph.node if node.op_type == "Conv" and (
        not quantised or getattr(producer.get(node.input[0]), "op_type", "") == "DequantizeLinear"))
    weight = conv.input[1]
    if weight not in initializers:  # QDQ: the weight comes through its DequantizeLinear
        weight = producer[weight].input[0]
    return numpy_helper.to_array(initializers[weight]).shape[1]


def test_first_convolution_gets_a_zero_channel_for_onnxruntime_only(int8_repository: Path,
                                                                   float_graph: onnx.ModelProto) -> None:
    """The first INT8 convolution's input channels: a multiple of 4 for ONNX Runtime (3 colour channels padded to 4;
    the --ibn release's first INT8 block reads 32), as exported for TensorRT."""
    front = set(quantize.front_nodes(float_graph))
    first = next(node for node in float_graph.graph.node if node.op_type == "Conv" and node.name not in front)
    initializers = {i.name: i for i in float_graph.graph.initializer}
    exported = initializers[first.input[1]].dims[1]
    ort_channels = _first_conv_input_channels(onnx.load(str(quantize.int8_path(int8_repository, "onnxruntime"))), True)
    assert ort_channels % 4 == 0 and ort_channels - exported in (0, -exported % 4)
    assert _first_conv_input_channels(onnx.load(str(quantize.int8_path(int8_repository, "tensorrt"))), True) == exported


def test_front_keeps_a_narrow_first_block_fp32_and_pads_a_wide_first_convolution(tmp_path: Path) -> None:
    """`front_nodes` and `pad_first_conv_channels` on both CNN forms: an --ibn CNN's first block (two 16-channel
    convolutions on the crop) stays FP32 whole; a CNN without --ibn quantises its 32-channel first convolution,
    padded."""
    from leukograph.training.export import export_stage
    from leukograph.training.models import CropEmbedder, CropEmbedderStage

    torch.manual_seed(0)
    for ibn in (True, False):
        path = export_stage(CropEmbedderStage(CropEmbedder(ibn=ibn)).eval(), CROP_EMBEDDER, tmp_path / f"{ibn}.onnx")
        model = quantize.named_nodes(onnx.load(str(path)))
        front = quantize.front_nodes(model)
        front_convs = [node for node in model.graph.node if node.op_type == "Conv" and node.name in front]
        assert len(front_convs) == (2 if ibn else 0)
        padded = quantize.pad_first_conv_channels(model, 4, fp32=front)
        assert _first_conv_input_channels(padded) == (3 if ibn else 4)  # the FP32 first block is left as it is


def test_zero_channel_leaves_the_fp32_graph_s_outputs_unchanged(int8_repository: Path,
                                                               samples: list[verify.Sample]) -> None:
    import onnxruntime as ort

    fp32 = onnx.load(str(stage_path(int8_repository, CROP_EMBEDDER, "model.onnx")))
    padded = quantize.pad_first_conv_channels(fp32, 4)
    onnx.checker.check_model(padded)
    assert _first_conv_input_channels(padded) == 4 and _first_conv_input_channels(fp32) == 3
    assert quantize.pad_first_conv_channels(padded, 4) is padded  # already a multiple: left alone
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (fp32, padded)]
    for sample in samples[:8]:
        feed = boxes_feed(sample.frame, sample.boxes)
        plain, zero_channel = (session.run(None, feed) for session in sessions)
        for a, b in zip(plain, zero_channel):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def _edited(model: onnx.ModelProto, edit) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    edit(copy)
    return copy


def test_qdq_check_names_each_rule_tensorrt_enforces(int8_repository: Path) -> None:
    model = onnx.load(str(quantize.int8_path(int8_repository, "tensorrt")))
    initializers = {i.name: i for i in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    weight_dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers)

    def nonzero_zero_point(m: onnx.ModelProto) -> None:
        init = next(i for i in m.graph.initializer if i.name == q.input[2])
        init.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), init.name))

    def wrong_axis(m: onnx.ModelProto) -> None:
        node = next(n for n in m.graph.node if n.name == weight_dq.name)
        kept = [a for a in node.attribute if a.name != "axis"]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("axis", 1)])

    def unpaired_q(m: onnx.ModelProto) -> None:
        node = next(n for n in m.graph.node if n.name == q.name)
        user = next(n for n in m.graph.node if node.output[0] in n.input)
        user.op_type = "Identity"
        del user.input[1:]

    assert any("!= 0" in p for p in check_qdq(_edited(model, nonzero_zero_point)))
    assert any("per-channel axis 1" in p for p in check_qdq(_edited(model, wrong_axis)))
    assert any("followed by a DequantizeLinear" in p for p in check_qdq(_edited(model, unpaired_q)))


@pytest.mark.parametrize("runtime", list(quantize.INT8_FILES))
def test_int8_matches_fp32_on_every_held_out_frame(int8_repository: Path, samples: list[verify.Sample],
                                                   runtime: str) -> None:
    reference = verify.ort_pipeline(int8_repository)
    candidate = int8.ort_int8_pipeline(int8_repository, quantize.INT8_FILES[runtime])
    comparison = compare(reference, candidate, samples)
    assert comparison.failures_for(int8.INT8_TOLERANCE) == [], comparison.line()
    assert comparison.graph_only_max_prob_diff == 0.0  # the cell_graph is the FP32 one


def test_generate_repo_precision(tmp_path: Path) -> None:
    repo.generate(tmp_path, "onnxruntime", precision="int8")
    assert repo.served_files(tmp_path) == {"cell_detector": "model.onnx", CROP_EMBEDDER.name: "model.int8.onnx",
                                           CELL_GRAPH.name: "model.onnx"}
    assert repo.precision_of(tmp_path) == "int8"
    assert repo.set_precision(tmp_path, "fp32") and repo.precision_of(tmp_path) == "fp32"
    assert not repo.set_precision(tmp_path, "fp32")
    assert repo.render("onnxruntime", precision="fp32") == repo.render("onnxruntime")  # committed default
    with pytest.raises(UserError, match="onnxruntime backend"):
        repo.render("tensorrt", precision="int8")


def test_serve_precision_int8_needs_and_names_the_int8_graph(int8_repository: Path, tmp_path: Path) -> None:
    served = tmp_path / "repository"
    shutil.copytree(int8_repository, served)
    stage_path(served, CROP_EMBEDDER, "model.int8.onnx").unlink()
    repo.set_precision(served, "int8")
    assert "model.int8.onnx is missing" in int8_stale(served)
    shutil.copy2(quantize.int8_path(int8_repository), stage_path(served, CROP_EMBEDDER, "model.int8.onnx"))
    assert int8_stale(served) is None
    assert ensure_exported(served, WEIGHTS_DIR, "int8") is False  # up to date: nothing exported
    assert "model.int8.onnx" in (served / "leukocyte_pipeline" / "1" / "version.json").read_text()


def test_int8_served_through_triton_matches_in_process_int8(int8_repository: Path, samples: list[verify.Sample],
                                                            tmp_path: Path) -> None:
    served = tmp_path / "repository"
    shutil.copytree(int8_repository, served)
    repo.set_precision(served, "int8")
    repo.write_digest(served)
    server = TritonServer(served, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          log_path=tmp_path / "tritonserver.log")
    triton = []
    try:
        server.start(120.0)
        triton.append(TritonRunner(server.grpc_url, "grpc", localizer="client"))
        in_process = int8.ort_int8_pipeline(int8_repository)
        comparison = compare(in_process, triton, samples[:12])
        assert comparison.failures_for(TOLERANCES["fp32"]) == [], comparison.line()
        assert comparison.agreeing_nodes == comparison.nodes
        fp32 = verify.ort_pipeline(int8_repository)  # and it is the INT8 graph that answered, not the FP32 one
        assert compare(fp32, triton, samples[:12]).max_prob_diff > 0.0
    finally:
        for runner in triton:
            runner.close()
        server.stop()


def test_stage_files_of_both_precisions_exist(int8_repository: Path) -> None:
    for stage in STAGES:
        for precision in repo.PRECISIONS:
            assert stage_path(int8_repository, stage, repo.onnx_file(stage, precision)).exists()


def test_roofline_peak_and_multiply_adds() -> None:
    from leukograph.deploy.bench.int8 import core_peak, macs_per_crop
    from leukograph.training.checkpoints import load_models

    peak = core_peak()
    assert peak["clock_ghz"] > 0 and peak["fp32_macs_per_s"] > 0 and peak["how"]
    if peak["vnni"]:
        assert peak["int8_macs_per_s"] == 4 * peak["fp32_macs_per_s"]  # 8-bit lanes are 4x as many as 32-bit ones
    embedder, _, _ = load_models(WEIGHTS_DIR)
    convs = [m for m in embedder.features.modules() if isinstance(m, torch.nn.Conv2d)]
    weights = sum(m.weight.numel() for m in convs)
    macs = macs_per_crop(WEIGHTS_DIR)
    # every conv weight is used at >= 8x8 output positions and at most at CROP_SIZE x CROP_SIZE of them
    assert weights * 64 < macs < weights * CROP_SIZE * CROP_SIZE + embedder.embed[1].weight.numel()


def test_bench_report_keeps_the_detector_rows_apart_from_the_given_boxes() -> None:
    """The committed `bench --int8` result (docs/bench/int8.json): the rows where the ensemble's detector found the
    cells get their own table, with the cells it found per frame; the boxes-given table keeps its 16 cells."""
    from leukograph.deploy.bench.int8 import DETECTOR_BOXES, markdown
    from leukograph.deploy.paths import REPO_ROOT

    result = json.loads((REPO_ROOT / "docs" / "bench" / "int8.json").read_text())
    detected = [row for row in result["triton"] if row["boxes"] == DETECTOR_BOXES]
    assert {row["precision"] for row in detected} == {"fp32", "int8"} and all(row["fps"] > 0 for row in detected)
    text = markdown(result)
    given_table, _, detector_table = text.partition("| Triton, bare frames, the detector in the ensemble |")
    assert detector_table.count("| grpc-shm |") == len(detected)
    assert f"| {detected[0]['cells']['mean']:.1f} |" in detector_table
    given = [row for row in result["triton"] if row["boxes"] != DETECTOR_BOXES]
    assert given_table.count("| grpc-shm |") == sum(row["transport"] == "grpc-shm" for row in given)


def test_op_profile_names_where_the_time_goes(served_repository: Path) -> None:
    """`bench --int8`'s op-type profile, from ONNX Runtime's own profiler, on the served FP32 crop_embedder."""
    from leukograph.client.contract import boxes_feed
    from leukograph.deploy.bench.frames import load_frames, localise_boxes
    from leukograph.deploy.bench.int8 import op_profile_ms

    image = load_frames(limit=1).images[0]
    profile = op_profile_ms(stage_path(served_repository, CROP_EMBEDDER, "model.onnx"),
                            boxes_feed(image, localise_boxes(image)), reps=2)
    assert profile["Conv"] > 0 and profile["GridSample"] > 0
    assert list(profile.values()) == sorted(profile.values(), reverse=True)


def test_saved_activation_ranges_rebuild_both_int8_graphs_without_the_data(
        int8_repository: Path, calibration: quantize.CalibrationSet, tmp_path: Path) -> None:
    """Ranges saved while calibrating give the same INT8 files byte for byte where no training data is (a lab PC
    running `serve --precision int8`)."""
    fp32 = stage_path(int8_repository, CROP_EMBEDDER, "model.onnx")
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copyfile(WEIGHTS_DIR / "cnn.pt", weights / "cnn.pt")
    folder = weights / quantize.RANGES_DIR
    for runtime in quantize.INT8_FILES:
        quantize.quantize_crop_embedder(fp32, tmp_path / f"{runtime}.onnx", calibration, runtime,
                                        ranges=quantize.ranges_files(folder)[runtime])
    method = quantize.DEFAULT_CALIBRATION_METHOD
    key = quantize.ranges_key(weights, method, CALIBRATION_PER_SOURCE, 0, ())
    (folder / quantize.RANGES_MANIFEST).write_text(json.dumps(
        {"key": key, "calibration": quantize.calibration_text(calibration, method)}))
    repository = tmp_path / "repository"
    shutil.copytree(int8_repository, repository)
    for runtime in quantize.INT8_FILES:
        quantize.int8_path(repository, runtime).unlink()
    no_data = tmp_path / "no-datasets"
    paths, line = quantize.export_int8(repository, no_data, CALIBRATION_PER_SOURCE, weights_dir=weights)
    assert "no calibration data read" in line
    for runtime, path in paths.items():
        assert path.read_bytes() == quantize.int8_path(int8_repository, runtime).read_bytes()
    # other settings, or --calibrate, need the data: one line naming what is missing
    for kwargs in ({"method": "minmax"}, {"calibrate": True}):
        with pytest.raises(UserError):
            quantize.export_int8(repository, no_data, CALIBRATION_PER_SOURCE, weights_dir=weights, **kwargs)


def test_ranges_of_another_graph_are_refused(int8_repository: Path, calibration: quantize.CalibrationSet,
                                             tmp_path: Path) -> None:
    fp32 = stage_path(int8_repository, CROP_EMBEDDER, "model.onnx")
    ranges = tmp_path / "ranges.json"
    quantize.quantize_crop_embedder(fp32, tmp_path / "first.onnx", calibration, ranges=ranges)
    cache = json.loads(ranges.read_text())
    assert "/embedder/" in json.dumps(cache)
    ranges.write_text(json.dumps(cache).replace("/embedder/", "/another/"))  # the tensors of some other export
    out = tmp_path / "second.onnx"
    with pytest.raises(UserError, match="do not cover"):
        quantize.quantize_crop_embedder(fp32, out, None, ranges=ranges, source="test")
    assert not out.exists()
    ranges.write_text("{not json")
    with pytest.raises(UserError, match="not a readable"):
        quantize.quantize_crop_embedder(fp32, out, None, ranges=ranges, source="test")
    ranges.write_text(json.dumps(cache))  # the same ranges, unmangled: accepted
    assert quantize.quantize_crop_embedder(fp32, out, None, ranges=ranges, source="test").is_file()


def test_committed_weights_carry_ranges_for_their_cnn() -> None:
    """The release can serve INT8 without the training data: its saved ranges are for the committed cnn.pt."""
    from leukograph.deploy.paths import RELEASE_WEIGHTS_DIR

    key = quantize.ranges_key(RELEASE_WEIGHTS_DIR, quantize.DEFAULT_CALIBRATION_METHOD, quantize.DEFAULT_PER_SOURCE,
                              0, ())
    assert quantize.saved_ranges(RELEASE_WEIGHTS_DIR, key) is not None
