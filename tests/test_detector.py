"""The learned cell detector: served graph (TensorRT-parser ops, fp32 parity with PyTorch, FP16 numerics in ONNX
Runtime), fixed-K padding, AP, training and resume, and `localize-eval` on real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from leukograph.build_engines import fp16
from leukograph.build_engines.onnx_ops import check_trt_compat
from leukograph.client.boxes import box_iou
from leukograph.client.contract import CELL_DETECTOR, CELL_KINDS, DETECTOR_FP32_AFTER, DETECTOR_THRESHOLD, MAX_CELLS
from leukograph.client.images import read_image
from leukograph.client.localize import detector_cells
from leukograph.deploy.paths import REPO_ROOT, WEIGHTS_DIR, graph_code_stale
from leukograph.training.detector import (
    DETECTOR_WEIGHTS,
    FIELD_SCALE_KEY,
    DetectorStage,
    export_detector,
    field_scale_of,
    load_detector,
    standardise,
)
from leukograph.training.localize_eval import (
    BoxSet,
    OnnxDetector,
    average_precision,
    box_sets,
    four_class_images,
    mosaic_set,
    score_box_set,
    select_frames,
    white_cell_found,
)

WBC = CELL_KINDS.index("wbc")


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_detector(load_detector(WEIGHTS_DIR), tmp_path_factory.mktemp("detector") / "model.onnx")


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Held-out BCCD frames (640x480) plus one TXL-PBC test image of each other size (never trained on)."""
    from leukograph.training.datasets import load_txl

    images = [read_image(f.image_path) for f in select_frames("held-out")[:6]]
    seen: set[tuple[int, int]] = set()
    for img in load_txl():
        if img.split == "test" and img.size not in seen:
            seen.add(img.size)
            images.append(read_image(img.path))
    return images


def test_weights_are_small_and_load() -> None:
    path = WEIGHTS_DIR / DETECTOR_WEIGHTS
    assert path.stat().st_size < 8_000_000
    net = load_detector(WEIGHTS_DIR)
    assert sum(p.numel() for p in net.parameters()) <= 2_000_000


def test_graph_passes_op_check_with_constant_topk(onnx_path: Path) -> None:
    model = onnx.load(str(onnx_path))
    assert check_trt_compat(model) == []
    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    assert len(topk) == 1
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                      if n.op_type == "Constant"})
    assert int(np.asarray(constants[topk[0].input[1]]).reshape(-1)[0]) == MAX_CELLS
    assert [o.name for o in model.graph.output] == CELL_DETECTOR.output_names
    assert graph_code_stale(onnx_path) is None  # stamped with the code that exported it


def test_tensorrt_profile_covers_the_frame_range(onnx_path: Path, tmp_path: Path) -> None:
    """build_engines' profiles give the detector's FRAME min/opt/max from the contract; its FP16 graph passes the op
    check too."""
    from leukograph.build_engines.profiles import make_profiles
    from leukograph.client.contract import MAX_FRAME_SIDE, MIN_FRAME_SIDE

    shapes = make_profiles().shapes(CELL_DETECTOR)["FRAME"]
    assert shapes == ((MIN_FRAME_SIDE, MIN_FRAME_SIDE, 3), (480, 640, 3), (MAX_FRAME_SIDE, MAX_FRAME_SIDE, 3))
    assert check_trt_compat(fp16.convert_file(onnx_path, tmp_path, fp32_after=DETECTOR_FP32_AFTER)) == []


def test_fp32_parity_with_pytorch(onnx_path: Path, frames: list[np.ndarray]) -> None:
    detector = OnnxDetector(onnx_path, threads=1)
    stage = DetectorStage(load_detector(WEIGHTS_DIR)).eval()
    for image in frames:
        boxes, scores, kinds, count = detector.outputs(image)
        assert boxes.shape == (MAX_CELLS, 4) and scores.shape == (MAX_CELLS,) and kinds.dtype == np.int32
        with torch.no_grad():
            ref = [t.numpy() for t in stage(torch.from_numpy(image))]
        assert int(count[0]) == int(ref[3][0]) > 0
        n = int(count[0])
        np.testing.assert_allclose(scores[:n], ref[1][:n], atol=1e-4)
        np.testing.assert_allclose(boxes[:n], ref[0][:n], atol=0.05)
        assert (kinds[:n] == ref[2][:n]).all()
        assert int(count[0]) == int((scores >= DETECTOR_THRESHOLD).sum())
        assert (np.diff(scores) <= 1e-7).all()  # sorted: rows at and after CELL_COUNT are the padding


def test_fp16_numerics_in_onnx_runtime(onnx_path: Path, frames: list[np.ndarray], tmp_path: Path) -> None:
    half_path = fp16.convert_file(onnx_path, tmp_path, fp32_after=DETECTOR_FP32_AFTER)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(str(half_path)).graph.initializer)
    half = OnnxDetector(half_path, threads=1)
    full = OnnxDetector(onnx_path, threads=1)
    for image in frames:
        a, b = full.ranked_and_accepted(image)[1], half.ranked_and_accepted(image)[1]
        confident = a.scores >= DETECTOR_THRESHOLD + 0.1  # cells clear of the threshold must all survive fp16
        assert confident.any() and len(b)
        iou = box_iou(a.boxes[confident], b.boxes)
        assert (iou.max(axis=1) >= 0.9).all()
        best = iou.argmax(axis=1)
        assert (b.kinds[best] == a.kinds[confident]).all()
        assert np.abs(b.scores[best] - a.scores[confident]).max(initial=0) < 0.05
        assert abs(len(a) - len(b)) <= max(2, len(a) // 10)


def test_padding_rows_are_dropped() -> None:
    boxes = np.array([[10, 10, 50, 50], [60, 60, 90, 90], [0, 0, 0, 0]], np.float32)
    scores = np.array([0.9, 0.5, 0.01], np.float32)
    kinds = np.array([0, 1, 0], np.int32)
    cells = detector_cells(boxes, scores, kinds, np.array([2], np.int32))
    assert len(cells) == 2 and cells.kinds.dtype == np.int64
    every = detector_cells(boxes, scores, kinds, np.array([2], np.int32), keep_padding=True)
    assert len(every) == 2  # the degenerate padding box is never a cell
    assert len(detector_cells(boxes, scores, kinds, np.array([0], np.int32))) == 0


def test_average_precision_known_cases() -> None:
    truth = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)]
    perfect = [(truth[0], np.array([0.9, 0.8]))]
    assert average_precision(perfect, truth) == pytest.approx(1.0)
    # a false positive ranked first: precision 1/2 at recall 0.5 and 2/3 at recall 1 -> AP = 2/3
    with_fp = [(np.array([[100, 100, 110, 110], [0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([0.95, 0.9, 0.8]))]
    assert average_precision(with_fp, truth) == pytest.approx(2 / 3)
    assert average_precision([(np.zeros((0, 4)), np.zeros(0))], truth) == 0.0
    assert np.isnan(average_precision(perfect, [np.zeros((0, 4))]))


def _voc_white_cells_found(detector: OnnxDetector, frames: list, prepare=lambda image: image) -> tuple[int, int]:
    """(VOC white cells found at IoU >= 0.5 by the detector's accepted WBC boxes, VOC white cells) over `frames`,
    each image passed through `prepare` first."""
    hits = total = 0
    for frame in frames:
        cells = detector.ranked_and_accepted(prepare(read_image(frame.image_path)))[1]
        wbc = cells.boxes[cells.kinds == WBC]
        for box in frame.boxes:
            if box.kind == "wbc":
                total += 1
                hits += bool(len(wbc)) and box_iou(wbc, np.array([box.box], np.float32)).max() >= 0.5
    return hits, total


def test_detector_finds_the_white_cell_on_held_out_frames(onnx_path: Path) -> None:
    """Every held-out BCCD frame's VOC white cell is found at IoU >= 0.5 (frames never trained on)."""
    hits, total = _voc_white_cells_found(OnnxDetector(onnx_path, threads=1), select_frames("held-out")[::6])
    assert total >= 10 and hits / total >= 0.9


def test_standardise_reads_the_smear_only() -> None:
    """Black fill (a rotated image's corners, a field stop) is left out of the per-image statistics: the smear is
    standardised as if the fill were not there, the fill reads as the mean (0); a frame without dark pixels is
    standardised over all its pixels, exactly as before the fill rule."""
    generator = torch.Generator().manual_seed(0)
    smear = 0.2 + 0.7 * torch.rand(2, 3, 40, 60, generator=generator)
    whole = smear - smear.mean(dim=(2, 3), keepdim=True)
    whole = whole / whole.pow(2).mean(dim=(1, 2, 3), keepdim=True).add(1e-4).sqrt()
    torch.testing.assert_close(standardise(smear), whole, rtol=0, atol=0)

    framed = torch.nn.functional.pad(smear, (25, 15, 10, 30))  # black on every side
    out = standardise(framed)
    torch.testing.assert_close(out[:, :, 10:50, 25:85], whole, rtol=1e-5, atol=1e-5)
    assert out[:, :, :10].abs().max() == 0 and out[:, :, 50:].abs().max() == 0
    assert torch.isfinite(standardise(torch.zeros(1, 3, 8, 8))).all()  # an all-black frame


def test_white_cell_found_in_rotated_four_class_images(onnx_path: Path) -> None:
    """4-class validation images (BCCD validation frames rotated and cropped, black corners): a WBC box in >= 99%.
    With the statistics over the whole image (black corners included) it was 94.2% of all 1,437."""
    detector = OnnxDetector(onnx_path, threads=1)
    paths = four_class_images(split="val")[::10]
    assert len(paths) >= 140
    found = white_cell_found([read_image(path) for path in paths], detector.ranked_and_accepted, centred=False)
    assert found["wbc"]["found"] >= 0.99


def test_white_cells_found_behind_a_round_field_stop(onnx_path: Path) -> None:
    """Held-out BCCD frames seen through a round field stop as wide as the frame (black corners): every VOC white
    cell is still found at IoU >= 0.5 (with the statistics over the whole frame: 68 of 72)."""

    def behind_field_stop(image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        rows, cols = np.mgrid[:height, :width]
        image[(cols - width / 2) ** 2 + (rows - height / 2) ** 2 > (width / 2) ** 2] = 0
        return image

    hits, total = _voc_white_cells_found(OnnxDetector(onnx_path, threads=1), select_frames("held-out")[::2],
                                         behind_field_stop)
    assert total >= 30 and hits == total


@pytest.fixture(scope="module")
def wide_fields() -> BoxSet:
    """2x2 mosaics of BCCD validation frames (1280x960: the same cells in a field twice as wide and tall) with their
    VOC boxes."""
    return mosaic_set(box_sets(split="val")[1], 2)


def _white_cells_found(stage: DetectorStage, fields: BoxSet) -> int:
    """VOC white cells found at IoU >= 0.5 by the stage in-process, as `localize-eval` scores them."""
    def localizer(image: np.ndarray):
        with torch.no_grad():
            outputs = [t.numpy() for t in stage(torch.from_numpy(image))]
        return detector_cells(*outputs, keep_padding=True), detector_cells(*outputs)

    wbc = score_box_set(fields, localizer)["wbc"]
    return round(wbc["recall"] * wbc["gt"])


def test_field_scale_finds_the_white_cells_of_a_wider_field(wide_fields) -> None:
    """Stretched to 256 px, a field twice as wide draws its white cells at half their trained size: 33 of 45 found
    (IoU >= 0.5). Working at field scale 2 (512 px a side), 44 of 45, as in the frames themselves (45 of 45)."""
    net = load_detector(WEIGHTS_DIR)
    assert sum(int((kinds == WBC).sum()) for _, _, kinds in wide_fields.items) == 45
    assert _white_cells_found(DetectorStage(net).eval(), wide_fields) <= 38
    assert _white_cells_found(DetectorStage(net, field_scale=2.0).eval(), wide_fields) >= 43


def test_field_scale_is_exported_kept_and_checked(wide_fields, tmp_path: Path) -> None:
    """The scale is in the graph (its Resize, its metadata), ONNX Runtime matches PyTorch there, the TensorRT op check
    passes, `export` keeps a repository's scale, and a scale the graph cannot work at is one line."""
    from leukograph.client.contract import MODEL_FILES, stage_path
    from leukograph.training.export import export_all

    repository = tmp_path / "repository"
    path = stage_path(repository, CELL_DETECTOR, MODEL_FILES["onnxruntime"])
    net = load_detector(WEIGHTS_DIR)
    export_detector(net, path, field_scale=2.0)
    model = onnx.load(str(path))
    assert {p.key: p.value for p in model.metadata_props}[FIELD_SCALE_KEY] == "2" and field_scale_of(path) == 2.0
    assert check_trt_compat(model) == []
    image = wide_fields.items[0][0]
    boxes, scores, kinds, count = OnnxDetector(path, threads=1).outputs(image)
    with torch.no_grad():
        ref = [t.numpy() for t in DetectorStage(net, field_scale=2.0).eval()(torch.from_numpy(image))]
    n = int(count[0])
    assert n == int(ref[3][0]) > 40
    np.testing.assert_allclose(scores[:n], ref[1][:n], atol=1e-4)
    np.testing.assert_allclose(boxes[:n], ref[0][:n], atol=0.05)
    export_all(WEIGHTS_DIR, repository)  # re-exported (an upgrade, new weights): the scale stays
    assert field_scale_of(path) == 2.0
    assert field_scale_of(tmp_path / "missing.onnx") == 1.0
    (tmp_path / "broken.onnx").write_bytes(b"not a graph")
    assert field_scale_of(tmp_path / "broken.onnx") == 1.0  # exported again, at scale 1 (serve's rule for it)
    cli = Path(sys.executable).parent / "leukograph"
    for bad in ("3.3", "0.5", "nan"):
        proc = subprocess.run([str(cli), "export-detector", "--field-scale", bad, "--repository", str(repository)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--field-scale" in proc.stderr, proc.stderr
    assert field_scale_of(path) == 2.0


def test_train_two_steps_then_resume(tmp_path: Path) -> None:
    cli = Path(sys.executable).parent / "leukograph"
    args = [str(cli), "train-detector", "--limit", "8", "--steps", "3", "--batch-size", "2", "--threads", "1",
            "--checkpoint-every", "5", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "d.pt")]
    first = subprocess.run(args + ["--max-minutes", "0"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "stopped at step 1 of 3" in first.stdout and not (tmp_path / "d.pt").exists()
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 1" in resumed.stdout
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["step"] == 3
    assert (tmp_path / "d.pt").exists()


def test_bad_arguments_are_one_line(tmp_path: Path) -> None:
    cli = Path(sys.executable).parent / "leukograph"
    proc = subprocess.run([str(cli), "train-detector", "--steps", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    proc = subprocess.run([str(cli), "localize-eval", "--detector", str(tmp_path / "missing.onnx"), "--json"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "export-detector" in proc.stderr


def test_localize_eval_prints_both_localisers(onnx_path: Path) -> None:
    cli = Path(sys.executable).parent / "leukograph"
    proc = subprocess.run([str(cli), "localize-eval", "--four-class", "20", "--pbc", "20", "--detector",
                           str(onnx_path), "--json"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    sets = result["sets"]
    assert {"bccd-held-out-relabelled", "bccd-held-out-voc", "txl-test-pbc", "txl-test-raabin-wbc",
            "txl-test-bcdd", "four-class-test", "pbc"} <= set(sets)
    assert sets["bccd-held-out-relabelled"]["detector"]["images"] == 37
    for name in ("classical", "detector"):
        for kind in CELL_KINDS:
            metrics = sets["bccd-held-out-voc"][name][kind]
            assert {"ap50", "recall", "precision"} <= set(metrics) and 0 <= metrics["ap50"] <= 1
        assert sets["four-class-test"][name]["images"] == 20 and sets["pbc"][name]["images"] == 20
        assert result["frames_per_s"][name] > 0
