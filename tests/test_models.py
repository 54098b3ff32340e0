"""The export-friendly dense GNN equals the PyG model; the in-graph crop is the training crop."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from leukograph.client.contract import CROP_SIZE, EMBED_DIM, KNN_K, MAX_CELLS
from leukograph.client.images import read_image
from leukograph.client.localize import localize
from leukograph.deploy.paths import WEIGHTS_DIR
from leukograph.training.checkpoints import load_models
from leukograph.training.datasets import load_bccd, split_frames
from leukograph.training.models import (
    GEOMETRY_FEATURES,
    CellGraphNet,
    CellGraphStage,
    CropEmbedderStage,
    crop_cells,
    dense_mean_adjacency,
    geometry_features,
    knn_edge_index,
    median_1d,
)


@pytest.fixture(scope="module")
def models():
    embedder, gnn, _ = load_models(WEIGHTS_DIR)
    return embedder, gnn


@pytest.fixture(scope="module")
def held_out_images() -> list[np.ndarray]:
    held = split_frames().held_out
    return [read_image(f.image_path) for f in load_bccd() if f.frame_id in held][:12]


def _tiled(boxes: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n boxes made by jittering real ones (for the 256-cell case)."""
    rng = np.random.default_rng(seed)
    picks = boxes[rng.integers(0, len(boxes), n)]
    return np.clip(picks + rng.normal(0, 20, picks.shape), 0, 470).astype(np.float32) + \
        np.array([0, 0, 8, 8], np.float32)


@pytest.mark.parametrize("n_cells", [1, 2, None, MAX_CELLS])
def test_dense_gnn_equals_pyg(models, held_out_images, n_cells) -> None:
    embedder, gnn = models
    stage = CropEmbedderStage(embedder).eval()
    for image in held_out_images[:4]:
        boxes = localize(image).boxes
        if n_cells is not None:
            boxes = boxes[:n_cells] if n_cells <= len(boxes) else _tiled(boxes, n_cells)
        b = torch.from_numpy(boxes)
        count = torch.tensor([len(b)], dtype=torch.int32)
        with torch.no_grad():
            embeddings, frame_size = stage(torch.from_numpy(image), b, count)
            x = gnn.node_inputs(embeddings, b, frame_size)
            pyg = torch.softmax(gnn(x, knn_edge_index(b, frame_size)), 1)
            dense = torch.softmax(gnn.forward_dense(x, dense_mean_adjacency(b, frame_size)), 1)
            served, labels = CellGraphStage(gnn)(embeddings, b, frame_size, count)
        assert torch.allclose(pyg, dense, atol=1e-6), (pyg - dense).abs().max()
        # the served stage is calibrated: softmax(logits / temperature + the flagged classes' shift)
        logits = gnn.forward_dense(x, dense_mean_adjacency(b, frame_size))
        calibrated = torch.softmax(logits / gnn.temperature + gnn.class_bias, 1)
        assert gnn.temperature != 1.0 and torch.allclose(served, calibrated, atol=1e-6)
        assert torch.equal(labels, calibrated.argmax(1).to(torch.int32))


def test_cnn_blend_is_a_log_linear_pool_of_the_two_calibrated_models(models, held_out_images) -> None:
    """After `pool_with_cnn`, the served PROBS (PyG and dense alike) are softmax((GNN + w x CNN) / T) with
    w = a T_gnn / ((1 - a) T_cnn) and T = T_gnn / (1 - a): the log-linear pool
    (1 - a) x GNN / T_gnn + a x CNN / T_cnn."""
    embedder, trained = models
    gnn = copy.deepcopy(trained)
    t_gnn, t_cnn, a = 1.3, 0.8, 0.4
    image = held_out_images[0]
    b = torch.from_numpy(localize(image).boxes)
    count = torch.tensor([len(b)], dtype=torch.int32)
    with torch.no_grad():
        embeddings, frame_size = CropEmbedderStage(embedder)(torch.from_numpy(image), b, count)
        x = gnn.node_inputs(embeddings, b, frame_size)
        gnn.set_cnn_blend(embedder.classifier, 0.0)
        alone = gnn.forward_dense(x, dense_mean_adjacency(b, frame_size))
        weight = gnn.pool_with_cnn(embedder.classifier, a, t_gnn, t_cnn)
        served, _ = CellGraphStage(gnn)(embeddings, b, frame_size, count)
        pyg = gnn.calibrated_probs(gnn(x, knn_edge_index(b, frame_size)))
    pooled = torch.softmax((1 - a) * alone / t_gnn + a * embedder.classifier(embeddings) / t_cnn + gnn.class_bias, 1)
    assert torch.allclose(served, pooled, atol=1e-5) and torch.allclose(pyg, pooled, atol=1e-5)
    assert weight == pytest.approx(a * t_gnn / ((1 - a) * t_cnn)) and float(gnn.cnn_weight) == pytest.approx(weight)
    assert torch.equal(gnn.cnn_head_weight, embedder.classifier.weight)


def test_a_gnn_saved_before_the_cnn_blend_loads_as_the_gnn_alone(models, tmp_path) -> None:
    from leukograph.training.checkpoints import CNN_FILE, GNN_FILE

    embedder, _ = models
    for name in (CNN_FILE, GNN_FILE):
        (tmp_path / name).write_bytes((WEIGHTS_DIR / name).read_bytes())
    old = torch.load(tmp_path / GNN_FILE, weights_only=True)
    old["model"] = {k: v for k, v in old["model"].items() if not k.startswith("cnn_")}
    torch.save(old, tmp_path / GNN_FILE)
    _, gnn, _ = load_models(tmp_path)
    assert float(gnn.cnn_weight) == 0.0


def test_a_gnn_saved_before_the_flagged_shift_loads_without_one(models, tmp_path) -> None:
    from leukograph.training.checkpoints import CNN_FILE, GNN_FILE

    for name in (CNN_FILE, GNN_FILE):
        (tmp_path / name).write_bytes((WEIGHTS_DIR / name).read_bytes())
    old = torch.load(tmp_path / GNN_FILE, weights_only=True)
    del old["model"]["class_bias"]
    torch.save(old, tmp_path / GNN_FILE)
    _, gnn, _ = load_models(tmp_path)
    assert not gnn.class_bias.any() and float(models[1].class_bias.abs().sum()) > 0


def test_the_flagged_shift_leaves_the_white_cell_answer_and_moves_only_the_flagged_classes(models,
                                                                                         held_out_images) -> None:
    """The released shift raises IG and NRBC against every other class; `classify`'s white-cell answer (the likeliest
    of the five white-cell classes) and the order among the other classes are those of the unshifted model."""
    from leukograph.client.contract import CLASSES, FLAGGED_CLASSES, white_cell_class

    embedder, trained = models
    unshifted = copy.deepcopy(trained)
    unshifted.class_bias.zero_()
    flagged = [CLASSES.index(name) for name in FLAGGED_CLASSES]
    assert (trained.class_bias[flagged] > 0).all()
    assert not trained.class_bias[[i for i in range(len(CLASSES)) if i not in flagged]].any()
    stage = CropEmbedderStage(embedder).eval()
    for image in held_out_images[:4]:
        b = torch.from_numpy(localize(image).boxes)
        count = torch.tensor([len(b)], dtype=torch.int32)
        with torch.no_grad():
            embeddings, frame_size = stage(torch.from_numpy(image), b, count)
            shifted, _ = CellGraphStage(trained)(embeddings, b, frame_size, count)
            plain, _ = CellGraphStage(unshifted)(embeddings, b, frame_size, count)
        assert np.array_equal(white_cell_class(shifted.numpy()), white_cell_class(plain.numpy()))
        assert (shifted[:, flagged] >= plain[:, flagged] - 1e-7).all()
        others = [i for i in range(len(CLASSES)) if i not in flagged]
        ratio = shifted[:, others] / plain[:, others]  # the others keep their proportions
        assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)


def test_knn_graph_shape_and_degree(held_out_images) -> None:
    boxes = torch.from_numpy(localize(held_out_images[0]).boxes)
    frame_size = torch.tensor([480.0, 640.0])
    edges = knn_edge_index(boxes, frame_size)
    n = len(boxes)
    assert edges.shape == (2, n * min(KNN_K, n - 1))
    assert not (edges[0] == edges[1]).any()  # no self loops
    adjacency = dense_mean_adjacency(boxes, frame_size)
    assert torch.allclose(adjacency.sum(1), torch.ones(n))
    # a single cell has no neighbours, and its aggregation is zero rather than NaN
    assert dense_mean_adjacency(boxes[:1], frame_size).sum() == 0


@pytest.mark.parametrize("n", [1, 2, 3, 8, 13, 256])
def test_median_matches_torch(n: int) -> None:
    values = torch.rand(n, generator=torch.Generator().manual_seed(n)) * 300
    assert median_1d(values) == torch.median(values)
    assert median_1d(torch.full((n,), 7.0)) == 7.0


def test_in_graph_crop_matches_opencv_resize(held_out_images) -> None:
    """A box-aligned square crop equals OpenCV's bilinear resize of the same region (no antialias)."""
    import cv2

    image = held_out_images[0]
    side = 128
    box = torch.tensor([[100.0, 100.0, 100.0 + side, 100.0 + side]])
    crop = crop_cells(torch.from_numpy(image), box, size=CROP_SIZE, margin=0.0)[0]
    ours = (crop.permute(1, 2, 0).numpy() * 255)
    region = image[100:100 + side, 100:100 + side]
    reference = cv2.resize(region, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    assert np.abs(ours - reference).mean() < 1.0


def test_crop_outside_frame_is_black(held_out_images) -> None:
    image = held_out_images[0]
    crop = crop_cells(torch.from_numpy(image), torch.tensor([[-200.0, -200.0, -100.0, -100.0]]))
    assert crop.abs().max() == 0


def test_stored_training_crop_centre_is_the_served_crop(held_out_images) -> None:
    """Training keeps a wider STORE_SIZE view on the served sampling grid: its centre is exactly the served crop."""
    from leukograph.training.cells import crops_for
    from leukograph.training.models import STORE_PAD, STORE_SIZE

    image = held_out_images[1]
    boxes = localize(image).boxes
    stored = crops_for(image, boxes)
    served = crops_for(image, boxes, size=CROP_SIZE, zoom=1.0)
    assert stored.shape == (len(boxes), STORE_SIZE, STORE_SIZE, 3)
    centre = stored[:, STORE_PAD:STORE_PAD + CROP_SIZE, STORE_PAD:STORE_PAD + CROP_SIZE].astype(int)
    assert np.abs(centre - served.astype(int)).max() <= 1  # the same samples; at most a rounding step apart


def test_colour_standardisation_cancels_gain_and_offset_and_matches_onnx(held_out_images, tmp_path) -> None:
    """The per-crop colour standardisation runs in the exported graph: ONNX Runtime equals PyTorch, and a per-channel
    gain and offset of the whole frame (another lamp, camera or stain cast) barely moves the embedding."""
    import onnxruntime as ort

    from leukograph.client.contract import CROP_EMBEDDER
    from leukograph.training.export import export_stage
    from leukograph.training.models import CropEmbedder, standardise_colour

    crops = torch.rand(5, 3, CROP_SIZE, CROP_SIZE, generator=torch.Generator().manual_seed(0))
    shifted = crops * torch.tensor([0.8, 1.1, 0.9]).view(1, 3, 1, 1) + torch.tensor([0.05, -0.02, 0.1]).view(1, 3, 1, 1)
    assert torch.allclose(standardise_colour(crops), standardise_colour(shifted), atol=1e-3)
    standard = standardise_colour(crops)
    assert torch.allclose(standard.mean((2, 3)), torch.zeros(5, 3), atol=1e-5)
    assert torch.allclose(standard.std((2, 3), unbiased=False), torch.ones(5, 3), atol=1e-3)

    embedder = CropEmbedder().eval()
    stage = CropEmbedderStage(embedder).eval()
    path = export_stage(stage, CROP_EMBEDDER, tmp_path / "crop_embedder.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = held_out_images[2]
    boxes = localize(image).boxes
    count = np.array([len(boxes)], np.int32)
    onnx_embeddings, _ = session.run(None, {"FRAME": image, "BOXES": boxes, "CELL_COUNT": count})
    with torch.no_grad():
        torch_embeddings, _ = stage(torch.from_numpy(image), torch.from_numpy(boxes), torch.from_numpy(count))
    assert np.abs(onnx_embeddings - torch_embeddings.numpy()).max() < 1e-4
    # whole-frame colour cast (inside the valid range): the embedding moves far less than between cells
    cast = np.clip(image.astype(np.float32) * np.array([0.85, 1.0, 1.1]) + np.array([10.0, 0.0, -10.0]), 0, 255)
    cast_embeddings, _ = session.run(None, {"FRAME": cast.astype(np.uint8), "BOXES": boxes, "CELL_COUNT": count})
    between_cells = np.abs(onnx_embeddings[:, None] - onnx_embeddings[None]).mean()
    assert np.abs(cast_embeddings - onnx_embeddings).mean() < 0.1 * between_cells


def test_a_cnn_of_another_crop_side_is_served_its_own_crops(held_out_images, tmp_path) -> None:
    """The crop side is the CNN's (its checkpoint carries it): a 96 px CNN's exported crop_embedder cuts 96 px crops
    in-graph, equal to what training embeds from the 120 px stored crops; cells cut for 64 px are refused."""
    from leukograph.client.contract import CROP_EMBEDDER, boxes_feed
    from leukograph.deploy.runners import OrtRunner
    from leukograph.training.cells import FrameCells, crops_for, use_crop_size
    from leukograph.training.embedding import embed_frames
    from leukograph.training.export import export_stage
    from leukograph.training.models import CropEmbedder, store_size

    torch.manual_seed(0)
    embedder = CropEmbedder(crop_size=96).eval()
    image = held_out_images[2]
    boxes = localize(image).boxes
    path = export_stage(CropEmbedderStage(embedder), CROP_EMBEDDER, tmp_path / "crop_embedder.onnx")
    served = OrtRunner(path, CROP_EMBEDDER, threads=1).infer(boxes_feed(image, boxes))["EMBEDDINGS"]

    def frame(crops: np.ndarray) -> FrameCells:
        return FrameCells("x", "x", -1, image.shape[:2], boxes, np.zeros(len(boxes), np.int64),
                          np.zeros(len(boxes), np.int64), crops)

    stored = crops_for(image, boxes, size=store_size(96))
    assert stored.shape[1:] == (120, 120, 3)
    trained, _ = embed_frames(embedder, [frame(stored)])[0]
    assert np.abs(trained - served).max() < 2e-3 * np.abs(served).max()  # uint8 storage rounding only
    try:
        use_crop_size(64)
        with pytest.raises(ValueError, match="cut for a 64 px crop, the CNN takes 96 px"):
            embed_frames(embedder, [frame(crops_for(image, boxes))])
    finally:
        use_crop_size(CROP_SIZE)


def test_an_ibn_cnn_exports_and_serves_what_it_computes(held_out_images, tmp_path) -> None:
    """`--ibn`: the checkpoint's config rebuilds the same network, and its exported crop_embedder (the served form:
    the batch-normalised half folded into its own convolution, beside InstanceNormalization) gives in ONNX Runtime
    what the trained network computes in PyTorch, with ops TensorRT's parser takes. In eval mode the per-crop half
    depends on the crop alone, not on the batch."""
    from leukograph.build_engines.onnx_ops import check_trt_compat
    from leukograph.client.contract import CROP_EMBEDDER, boxes_feed
    from leukograph.deploy.runners import OrtRunner
    from leukograph.training.export import export_stage
    from leukograph.training.models import CropEmbedder, InstanceBatchNorm, ServedInstanceBatchBlock, crop_cells

    torch.manual_seed(0)
    embedder = CropEmbedder(ibn=True).eval()
    assert [type(embedder.features[i][1]) for i in (0, 2, 4)] == [InstanceBatchNorm, InstanceBatchNorm,
                                                                  torch.nn.BatchNorm2d]
    assert sorted(CropEmbedder(**{"width": 32, "crop_size": CROP_SIZE, "ibn": True}).state_dict()) == sorted(
        embedder.state_dict())
    with torch.no_grad():  # statistics and affine parameters as training leaves them, not the identity
        for norm in embedder.modules():
            if isinstance(norm, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
                if norm.running_mean is not None:
                    norm.running_mean.uniform_(-0.5, 0.5)
                    norm.running_var.uniform_(0.5, 2.0)
    image = held_out_images[1]
    boxes = localize(image).boxes
    crops = crop_cells(torch.from_numpy(image), torch.from_numpy(boxes))
    stage = CropEmbedderStage(embedder)
    assert [type(layer) for layer in stage.embedder.features[:2]] == [ServedInstanceBatchBlock] * 2
    assert isinstance(embedder.features[0][1], InstanceBatchNorm)  # the trained network is left as it was
    with torch.no_grad():
        expected = embedder(crops)[0].numpy()
        alone = embedder(crops[:1])[0].numpy()
        assert np.abs(stage.embedder(crops)[0].numpy() - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
    assert np.abs(alone - expected[:1]).max() < 1e-4
    path = export_stage(stage, CROP_EMBEDDER, tmp_path / "crop_embedder.onnx")
    op_types = {node.op_type for node in onnx.load(path).graph.node}
    assert "InstanceNormalization" in op_types and "BatchNormalization" not in op_types
    assert check_trt_compat(path) == []
    served = OrtRunner(path, CROP_EMBEDDER, threads=1).infer(boxes_feed(image, boxes))["EMBEDDINGS"]
    assert np.abs(served - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


def test_cells_geometry_ignores_the_frame_and_the_released_gnn_reads_the_frame(models, held_out_images) -> None:
    """`--gnn-geometry cells` reads each cell against the other cells only: the same cells in a frame twice as large
    give the same node inputs; "frame" (the release) also reads the place and scale in the frame."""
    _, gnn = models
    boxes = torch.from_numpy(localize(held_out_images[0]).boxes)
    frame, wider = torch.tensor([480.0, 640.0]), torch.tensor([960.0, 1280.0])
    assert gnn.geometry == "frame" and gnn.input[0].in_features == EMBED_DIM + GEOMETRY_FEATURES["frame"]
    assert torch.equal(geometry_features(boxes, frame, "cells"), geometry_features(boxes, wider, "cells"))
    assert torch.equal(geometry_features(boxes, frame, "frame")[:, :2], geometry_features(boxes, frame, "cells"))
    assert not torch.allclose(geometry_features(boxes, frame, "frame"), geometry_features(boxes, wider, "frame"))
    cells_gnn = CellGraphNet(geometry="cells").eval()
    embeddings = torch.randn(len(boxes), EMBED_DIM)
    with torch.no_grad():
        assert torch.equal(CellGraphStage(cells_gnn)(embeddings, boxes, frame, torch.tensor([len(boxes)]))[0],
                           CellGraphStage(cells_gnn)(embeddings, boxes, wider, torch.tensor([len(boxes)]))[0])
    with pytest.raises(ValueError, match="geometry"):
        CellGraphNet(geometry="field")
