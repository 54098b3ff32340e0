"""A short real training run on a handful of frames: checkpoints, resume, release."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from leukograph.training.datasets import load_bccd

CLI = [sys.executable, "-m", "leukograph.client.cli", "train"]
SMOKE = ["--max-images", "16", "--batch-size", "32", "--gnn-epochs", "1", "--baseline-epochs", "1", "--threads", "1"]


def test_smoke_training_and_resume(tmp_path: Path) -> None:
    run, release = tmp_path / "run", tmp_path / "release"
    first = subprocess.run([*CLI, *SMOKE, "--cnn-epochs", "1", "--output-dir", str(run), "--release-dir",
                            str(release)], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    for name in ("cnn", "gnn", "baseline"):
        last = torch.load(run / f"{name}_last.pt", weights_only=True)
        assert set(last) >= {"model", "optimizer", "epoch", "args", "metrics", "config"}
        assert last["epoch"] == 1 and last["optimizer"] is not None
        assert last["metrics"]["history"][0]["epoch"] == 1
        released = torch.load(release / f"{name}.pt", weights_only=True)
        assert released["optimizer"] is None and released["model"].keys() == last["model"].keys()
    # resume the CNN for one more epoch: it continues from epoch 1, not from scratch
    second = subprocess.run([*CLI, *SMOKE, "--stages", "cnn", "--cnn-epochs", "2", "--resume", "--output-dir",
                             str(run), "--release-dir", str(release)], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed cnn_last.pt at epoch 1" in second.stdout
    last = torch.load(run / "cnn_last.pt", weights_only=True)
    assert last["epoch"] == 2 and [h["epoch"] for h in last["metrics"]["history"]] == [1, 2]


def test_gnn_stage_from_a_saved_cnn_equals_the_gnn_after_the_cnn(tmp_path: Path) -> None:
    """`--stages gnn` on a run's saved CNN trains the same GNN, bit for bit, as the run that trained that CNN first:
    the release's GNN is reproduced by `leukograph train` whichever way it was made."""
    full, gnn_only = tmp_path / "full", tmp_path / "gnn-only"
    result = subprocess.run([*CLI, *SMOKE, "--stages", "cnn,gnn", "--cnn-epochs", "1", "--output-dir", str(full),
                             "--release-dir", str(tmp_path / "full-release")], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    gnn_only.mkdir()
    (gnn_only / "cnn_best.pt").write_bytes((full / "cnn_best.pt").read_bytes())
    result = subprocess.run([*CLI, *SMOKE, "--stages", "gnn", "--output-dir", str(gnn_only), "--release-dir",
                             str(tmp_path / "gnn-only-release")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    want = torch.load(full / "gnn_best.pt", weights_only=True)["model"]
    got = torch.load(gnn_only / "gnn_best.pt", weights_only=True)["model"]
    assert want.keys() == got.keys()
    assert all(torch.equal(want[name], got[name]) for name in want)
    assert float(got["cnn_weight"]) == 0.0  # the GNN alone unless --cnn-blend says otherwise
    # the release holds the CNN the GNN was trained and calibrated over, so `evaluate --weights` reads a pair
    cnn = torch.load(full / "cnn_best.pt", weights_only=True)["model"]
    released = torch.load(tmp_path / "gnn-only-release" / "cnn.pt", weights_only=True)["model"]
    assert all(torch.equal(cnn[name], released[name]) for name in cnn)


def test_cnn_blend_pools_the_calibrated_cnn_into_the_same_gnn(tmp_path: Path) -> None:
    """`--cnn-blend 0.4` trains the same GNN, then adds the CNN's logits to it at the weight the two validation
    temperatures give: (1 - a) x GNN / T_gnn + a x CNN / T_cnn, refitted as one temperature."""
    runs = {}
    for blend in ("0", "0.4"):
        run, release = tmp_path / f"run-{blend}", tmp_path / f"release-{blend}"
        result = subprocess.run([*CLI, *SMOKE, "--stages", "cnn,gnn", "--cnn-epochs", "1", "--cnn-blend", blend,
                                 "--output-dir", str(run), "--release-dir", str(release)],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[blend] = release
    plain = torch.load(runs["0"] / "gnn.pt", weights_only=True)["model"]
    blended = torch.load(runs["0.4"] / "gnn.pt", weights_only=True)["model"]
    cnn = torch.load(runs["0.4"] / "cnn.pt", weights_only=True)["model"]
    assert all(torch.equal(plain[name], blended[name]) for name in plain if not name.startswith(("cnn_", "temp")))
    assert torch.equal(blended["cnn_head_weight"], cnn["classifier.weight"])
    calibration = json.loads((runs["0.4"] / "calibration.json").read_text())
    expected = 0.4 * calibration["gnn_alone_temperature"] / (0.6 * calibration["cnn_temperature"])
    assert calibration["cnn_blend"] == 0.4 and float(blended["cnn_weight"]) == pytest.approx(expected, rel=1e-5)
    assert float(blended["temperature"]) == pytest.approx(calibration["gnn_temperature"], rel=1e-5)
    # 16 images per source leave fewer validation IG and NRBC cells than the shift needs (MIN_FLAGGED_CELLS)
    assert calibration["flagged_bias"] == {"ig": 0.0, "nrbc": 0.0} and not blended["class_bias"].any()


def test_bad_cnn_blend_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([*CLI, "--cnn-blend", "1", "--output-dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "leukograph train: error: --cnn-blend must be in [0, 1), got 1.0"


def test_unknown_stage_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([*CLI, "--stages", "cnn,transformer", "--output-dir", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == ("leukograph train: error: unknown stage(s) ['transformer']; use cnn, gnn, "
                                     "baseline, or calibrate alone")


def test_cnn_pack_trains_the_cnn_without_the_datasets(tmp_path: Path) -> None:
    """The pack holds every labelled nucleated crop of the sampled images (JPEG); training from it needs no data."""
    from leukograph.client.localize import WBC
    from leukograph.training.cnn_pack import load_cnn_pack
    from leukograph.training.train import NUM_NUCLEATED, load_cell_sets

    pack = tmp_path / "pack.pt"
    made = subprocess.run([*CLI, *SMOKE, "--save-cnn-pack", str(pack)], capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    train, val = load_cnn_pack(pack)
    cells = load_cell_sets(None, 16, 0)
    for packed, full in ((train, cells.train), (val, cells.val)):
        wanted = sum(int(((f.labels >= 0) & (f.labels < NUM_NUCLEATED)).sum()) for f in full)
        assert sum(int(((f.labels >= 0) & (f.labels < NUM_NUCLEATED)).sum()) for f in packed) == wanted
        unlabelled = sum(int(((f.labels == -1) & (f.kinds == WBC)).sum()) for f in full)  # the consistency term's
        assert sum(int(((f.labels == -1) & (f.kinds == WBC)).sum()) for f in packed) == unlabelled
        assert all(f.crops.dtype.name == "uint8" and f.crops.shape[1:] == full[0].crops.shape[1:] for f in packed)
    trained = subprocess.run([*CLI, *SMOKE, "--stages", "cnn", "--cnn-epochs", "1", "--cnn-pack", str(pack),
                              "--data-root", str(tmp_path / "no-datasets-here"), "--output-dir", str(tmp_path / "run"),
                              "--release-dir", str(tmp_path / "release")], capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert torch.load(tmp_path / "release" / "cnn.pt", weights_only=True)["epoch"] == 1


def test_cnn_pack_refuses_the_gnn_stage(tmp_path: Path) -> None:
    result = subprocess.run([*CLI, "--stages", "cnn,gnn", "--cnn-pack", str(tmp_path / "pack.pt"), "--output-dir",
                             str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == ("leukograph train: error: --cnn-pack trains the CNN only: use --stages cnn "
                                     "(the GNN needs every cell of the datasets)")


def test_crop_size_travels_with_the_cnn(tmp_path: Path) -> None:
    """`--crop-size 96` trains a CNN on 96 px crops (stored at 120); its checkpoint carries the side, and the GNN stage
    run later over that CNN cuts its cells at 96 too."""
    run, release = tmp_path / "run", tmp_path / "release"
    common = [*SMOKE, "--output-dir", str(run), "--release-dir", str(release)]
    cnn = subprocess.run([*CLI, *common, "--stages", "cnn", "--cnn-epochs", "1", "--crop-size", "96"],
                         capture_output=True, text=True, timeout=900)
    assert cnn.returncode == 0, cnn.stderr[-2000:]
    assert torch.load(release / "cnn.pt", weights_only=True)["config"] == {"width": 32, "crop_size": 96, "ibn": True}
    gnn = subprocess.run([*CLI, *common, "--stages", "gnn"], capture_output=True, text=True, timeout=900)
    assert gnn.returncode == 0, gnn.stderr[-2000:]
    assert (release / "gnn.pt").exists()


def test_bad_crop_size_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([*CLI, "--crop-size", "50", "--output-dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "leukograph train: error: --crop-size must be a multiple of 8 and >= 32, got 50"


def test_gnn_class_weights_balance_white_cell_classes() -> None:
    """--gnn-class-balance P: white-cell class c weighs n_c ** -P, averaging 1 over the labelled white-cell nodes;
    P = 0 weighs every white-cell node alike; classes without nodes weigh 0; RBC/platelet keep CONTEXT_LOSS_WEIGHT."""
    from torch_geometric.data import Data

    from leukograph.client.contract import CLASSES
    from leukograph.training.train import CONTEXT_LOSS_WEIGHT, NUM_NUCLEATED, gnn_class_weights

    labels = torch.tensor([0] * 30 + [1] * 10 + [5] * 5 + [CLASSES.index("rbc")] * 50 + [-1] * 3)
    graphs = [Data(y=labels[:40]), Data(y=labels[40:])]
    assert torch.allclose(gnn_class_weights(graphs, 0.0)[[0, 1, 5]], torch.ones(3))
    balanced = gnn_class_weights(graphs, 1.0)
    counts = torch.tensor([30.0, 10.0, 5.0])
    assert torch.allclose(balanced[[0, 1, 5]] * counts, torch.full((3,), float(balanced[0] * 30)))  # equal totals
    assert torch.isclose((balanced[[0, 1, 5]] * counts).sum() / counts.sum(), torch.tensor(1.0))
    assert balanced[2] == 0 and balanced[NUM_NUCLEATED - 1] == 0
    assert balanced[CLASSES.index("rbc")] == CONTEXT_LOSS_WEIGHT


def test_mixstyle_mixes_feature_statistics_in_training_only() -> None:
    """MixStyle hooks change the first blocks' features in training mode (each crop's per-channel mean becomes a mix
    of its own and another crop's) and leave eval mode, the state dict and so the exported graph, untouched."""
    from leukograph.training.models import CropEmbedder
    from leukograph.training.train import MIXSTYLE_BLOCKS, attach_mixstyle

    torch.manual_seed(0)
    model = CropEmbedder()
    keys = set(model.state_dict())
    crops = torch.rand(8, 3, 64, 64)
    crops[:4] *= 0.3  # two groups with different colour statistics
    model.eval()
    with torch.no_grad():
        before = model(crops)[1]
    handles = attach_mixstyle(model, 1.0)
    assert len(handles) == len(MIXSTYLE_BLOCKS) and set(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(crops)[1], before)  # eval: the hooks do nothing
        block = model.features[MIXSTYLE_BLOCKS[0]]
        block.train()
        plain = block[2](block[1](block[0](crops)))  # conv, BatchNorm (batch statistics), ReLU without the hook
        mixed = block(crops)
    assert not torch.allclose(mixed, plain)
    # each crop's per-channel mean and std become convex mixes of two crops' of the batch: within the batch's range
    for stat in (lambda t: t.mean(dim=(2, 3)), lambda t: t.std(dim=(2, 3), unbiased=False)):
        own, got = stat(plain), stat(mixed)
        assert (got >= own.min(0).values - 1e-4).all() and (got <= own.max(0).values + 1e-4).all()
    for handle in handles:
        handle.remove()


def test_unlabelled_loss_follows_confident_weak_views_only() -> None:
    """The consistency term: a weak view's nucleated-class argmax is the strong view's target where its softmax
    reaches the threshold; unconfident cells add nothing; the sum is divided by the whole unlabelled batch."""
    import torch.nn.functional as F

    from leukograph.client.contract import CLASSES
    from leukograph.training.train import unlabelled_loss

    weak = torch.full((3, len(CLASSES)), -10.0)
    weak[0, 1] = 10.0  # confident eosinophil
    weak[1, :2] = 0.0  # neutrophil or eosinophil: unconfident
    weak[2, CLASSES.index("rbc")] = 10.0  # context classes are not targets: the nucleated softmax is unconfident
    weak[2, 3] = 9.0
    strong = torch.randn(3, len(CLASSES))
    expected = F.cross_entropy(strong[:1], torch.tensor([1]), reduction="sum") / 3
    got = unlabelled_loss(weak, strong, 0.95)
    assert torch.isclose(got, expected + F.cross_entropy(strong[2:], torch.tensor([3]), reduction="sum") / 3)
    assert unlabelled_loss(weak, strong, 1.01) == 0


def test_domain_generalisation_options_train(tmp_path: Path) -> None:
    """--mixstyle, --unlabelled-weight, --amplitude-mix, --grey-share, --random-conv and --no-ibn train a CNN whose
    checkpoint loads like any other (with BatchNorm in every block: the CNN before `--ibn` became the default)."""
    run, release = tmp_path / "run", tmp_path / "release"
    result = subprocess.run([*CLI, *SMOKE, "--stages", "cnn", "--cnn-epochs", "1", "--mixstyle", "0.5",
                             "--unlabelled-weight", "1", "--amplitude-mix", "0.5", "--grey-share", "0.5",
                             "--random-conv", "0.5", "--no-ibn",
                             "--output-dir", str(run), "--release-dir", str(release)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unlabelled white cells for the consistency term: " in result.stdout
    from leukograph.training.checkpoints import load_cnn

    cnn = load_cnn(release / "cnn.pt")
    assert cnn.crop_size == 64 and not cnn.ibn


@pytest.fixture(scope="module")
def bccd_stored_crops() -> np.ndarray:
    """Every stored crop of two real BCCD frames (uint8 [N,S,S,3]), for the augmentation options' tests."""
    from leukograph.training.cells import build_cells

    return np.concatenate([f.crops for f in build_cells(load_bccd()[:2], "augmentation-test", cache=False,
                                                        progress=False)])


def _off_draws_nothing(crops: np.ndarray, **off: float) -> None:
    """`augment_batch` with an option at 0 (`off`) gives the same crops and leaves the generator in the same state as
    without the option: every CNN trained without it is unchanged."""
    from leukograph.training.augment import augment_batch
    from leukograph.training.models import STORE_ZOOM

    with_off, default = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(crops, with_off, STORE_ZOOM, 1.5, **off),
                       augment_batch(crops, default, STORE_ZOOM, 1.5))
    assert torch.equal(with_off.get_state(), default.get_state())


def test_grey_share_turns_crops_grey_and_draws_nothing_when_off(bccd_stored_crops: np.ndarray) -> None:
    """On real BCCD crops: --grey-share 0 draws no random number (the augmentation stream, and so every CNN trained
    without it, is unchanged); 1 turns every crop grey (at strength 0, where nothing after it touches the colour);
    0.5 some of them."""
    from leukograph.training.augment import augment_batch
    from leukograph.training.models import STORE_ZOOM

    crops = bccd_stored_crops
    _off_draws_nothing(crops, grey=0.0)
    grey = augment_batch(crops, torch.Generator().manual_seed(0), STORE_ZOOM, 0.0, 1.0)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    some = augment_batch(crops, torch.Generator().manual_seed(0), STORE_ZOOM, 0.0, 0.5)
    is_grey = (some[:, 0] == some[:, 1]).flatten(1).all(1) & (some[:, 1] == some[:, 2]).flatten(1).all(1)
    assert 0 < int(is_grey.sum()) < len(crops)


def test_random_conv_mixes_in_a_random_convolution_and_draws_nothing_when_off(bccd_stored_crops: np.ndarray) -> None:
    """On real BCCD crops: --random-conv 0 draws no random number (every CNN trained without it is unchanged); 1
    changes every crop at strength 0, keeps it in 0..1 and keeps each channel's mean (the convolved crop is given
    the crop's own mean and spread before the mix; only the clamp moves it); 0.5 changes some of them."""
    from leukograph.training.augment import augment_batch, random_convolution, stored_to_served
    from leukograph.training.models import STORE_ZOOM

    crops = bccd_stored_crops
    _off_draws_nothing(crops, random_conv=0.0)
    served = stored_to_served(crops, STORE_ZOOM)
    for seed in range(3):  # each call draws one kernel side
        mixed = random_convolution(served, torch.Generator().manual_seed(seed), 1.0)
        assert mixed.shape == served.shape and float(mixed.min()) >= 0 and float(mixed.max()) <= 1
        assert (mixed != served).flatten(1).any(1).all()
        assert torch.allclose(mixed.mean(dim=(2, 3)), served.mean(dim=(2, 3)), atol=0.03)
    some = augment_batch(crops, torch.Generator().manual_seed(0), STORE_ZOOM, 0.0, 0.0, 0.5)
    unchanged = (some == augment_batch(crops, torch.Generator().manual_seed(0), STORE_ZOOM, 0.0)).flatten(1).all(1)
    assert 0 < int(unchanged.sum()) < len(crops)


@pytest.mark.parametrize("flag", ["--grey-share", "--random-conv"])
def test_bad_share_is_one_line(tmp_path: Path, flag: str) -> None:
    result = subprocess.run([*CLI, *SMOKE, "--stages", "cnn", flag, "1.5", "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"leukograph train: error: {flag} must be in [0, 1], got 1.5"


def test_amplitude_mix_keeps_the_phase_and_mixes_the_amplitude() -> None:
    """On real BCCD crops: p = 0 returns the crops and draws nothing; p = 1 keeps each crop's phase (up to the 0..1
    clip) and mixes its amplitude with one donor's, so each crop's mean colour (the zero-frequency term) moves
    toward the donor's along a straight line."""
    from leukograph.client.images import read_image
    from leukograph.training.augment import amplitude_mix
    from leukograph.training.models import crop_cells

    frame = load_bccd()[0]
    boxes = torch.tensor([b.box for b in frame.boxes], dtype=torch.float32)
    crops = crop_cells(torch.from_numpy(read_image(frame.image_path)), boxes)[:8]  # float 0..1
    donor = crops.flip(1)[:1]  # one donor with other colours: channels reversed
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert amplitude_mix(crops, donor, generator, 0.0) is crops and torch.equal(generator.get_state(), state)
    mixed = amplitude_mix(crops, donor, generator, 1.0)
    assert mixed.shape == crops.shape and mixed.min() >= 0 and mixed.max() <= 1
    unclipped = (mixed > 0.01) & (mixed < 0.99)
    assert unclipped.float().mean() > 0.95
    own, other, got = (t.mean(dim=(2, 3)) for t in (crops, donor.expand_as(crops), mixed))
    weight = ((got - own) * (other - own)).sum(1) / ((other - own) ** 2).sum(1)  # projection on the line
    assert ((weight > 0) & (weight < 1)).all()
    assert torch.allclose(got, own + weight[:, None] * (other - own), atol=0.01)
    phase = torch.fft.fft2(mixed).angle() - torch.fft.fft2(crops).angle()
    low = torch.fft.fft2(crops).abs() > 1.0  # where the phase is defined well
    assert torch.cos(phase[low]).mean() > 0.95


def test_cnn_ema_validates_and_releases_the_average_and_resumes_it(tmp_path: Path) -> None:
    """--cnn-ema keeps a moving average of the CNN's weights: the average, not the last weights, is validated and
    becomes the best (released) checkpoint; --resume carries the average on from where it stopped."""
    run, release = tmp_path / "run", tmp_path / "release"
    common = [*CLI, *SMOKE, "--stages", "cnn", "--cnn-ema", "0.5", "--output-dir", str(run), "--release-dir",
              str(release)]
    first = subprocess.run([*common, "--cnn-epochs", "1"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    raw = torch.load(run / "cnn_last.pt", weights_only=True)
    average = torch.load(run / "cnn_average_last.pt", weights_only=True)
    released = torch.load(release / "cnn.pt", weights_only=True)
    steps = average["metrics"]["n_averaged"]
    assert average["epoch"] == 1 and steps >= 1
    assert all(torch.equal(released["model"][k], average["model"][k]) for k in average["model"])
    assert not all(torch.equal(raw["model"][k], average["model"][k]) for k in raw["model"])
    second = subprocess.run([*common, "--cnn-epochs", "2", "--resume"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    resumed = torch.load(run / "cnn_average_last.pt", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["metrics"]["n_averaged"] > steps


def test_gnn_widen_moves_only_the_frame_relative_geometry() -> None:
    """--gnn-widen reads a training frame as part of a wider field: the kNN graph, labels and the cells-relative
    geometry stay; the centroid / frame and median cell / frame features change; 1 leaves the graph as it was."""
    from leukograph.client.contract import EMBED_DIM
    from leukograph.training.cells import bccd_cells
    from leukograph.training.models import CellGraphNet
    from leukograph.training.train import graph_data

    frame = bccd_cells(load_bccd()[0])
    embedded = [(np.random.default_rng(0).normal(size=(len(frame.labels), EMBED_DIM)).astype(np.float32), None)]
    gnn = CellGraphNet()
    plain, = graph_data([frame], embedded, gnn)
    again, = graph_data([frame], embedded, gnn, widen=1.0, seed=5)
    wide, = graph_data([frame], embedded, gnn, widen=3.0, seed=5)
    assert torch.equal(plain.x, again.x) and torch.equal(plain.edge_index, again.edge_index)
    assert torch.equal(wide.edge_index, plain.edge_index) and torch.equal(wide.y, plain.y)
    cells = EMBED_DIM + 2  # embedding, log size / median cell, log aspect
    assert torch.allclose(wide.x[:, :cells], plain.x[:, :cells], atol=1e-4)  # boxes shifted in float32
    assert not torch.allclose(wide.x[:, cells:], plain.x[:, cells:])
    assert (wide.x[:, -1] <= plain.x[:, -1] + 1e-6).all()  # a wider field: the median cell is smaller against it
