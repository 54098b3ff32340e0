"""`leukograph train`: the CNN crop embedder, then the cell-graph GNN on its embeddings, and the seed baseline.

Laid out like torchvision's references/classification: `get_args_parser()`, `main(args)`, `train_one_epoch`,
`evaluate`, and checkpoints that carry model, optimizer, epoch, args and metrics (`--resume` continues a run).

Data: BCCD frames, a per-class subset of 4-class TRAIN images whose source frame is in the training split, PBC's
train part and TXL-PBC's train images (datasets.py has the split rules). The CNN also learns from the white cells
that have no subtype label (TXL-PBC's Raabin-WBC and BCDD images, BCCD frames of uncertain label) through a
consistency term (`--unlabelled-weight`, `Unlabelled`): other labs' cells shape its features without labels.
Model selection uses the validation parts (mean per-source macro-F1 over nucleated cells). Test parts (4-class TEST
frames, PBC test, TXL-PBC test) are never read here. After training, temperatures are fitted on validation
(calibration.json), the flagged classes (IG, NRBC) get a class-balanced shift, and the "unidentified" threshold is
chosen from the validation auto-accept curve.

Crops stay uint8 (STORE_SIZE views) and are augmented per batch (augment.py): peak memory stays small.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader as GraphLoader
from tqdm import tqdm

from leukograph.client.contract import CLASSES, CROP_SIZE, FLAGGED_CLASSES, LOCALIZERS, NUCLEATED_CLASSES
from leukograph.client.errors import UserError
from leukograph.deploy.paths import WEIGHTS_DIR
from leukograph.training.augment import amplitude_mix, augment_batch
from leukograph.training.cells import (
    DEFAULT_LOCALIZER,
    IGNORE,
    FrameCells,
    build_cells,
    use_crop_size,
    use_localizer,
)
from leukograph.training.checkpoints import (
    BASELINE_FILE,
    CALIBRATION_FILE,
    CNN_FILE,
    GNN_FILE,
    load_checkpoint,
    load_cnn,
    load_gnn,
    save_checkpoint,
)
from leukograph.training.cnn_pack import load_cnn_pack, save_cnn_pack
from leukograph.training.datasets import (
    frame_split_name,
    load_bccd,
    load_four_class,
    load_pbc,
    load_txl,
    split_frames,
)
from leukograph.training.embedding import embed_frames
from leukograph.training.heap import add_keep_freed_memory_argument, apply_keep_freed_memory, release_freed_memory
from leukograph.training.metrics import (
    auto_accept_curve,
    baseline_images,
    cell_metrics,
    choose_threshold,
    expected_calibration_error,
    fit_flagged_bias,
    fit_temperature,
    labelled_nucleated,
    macro_f1,
)
from leukograph.training.models import (
    BASELINE_CLASSES,
    GEOMETRY_FEATURES,
    STORE_ZOOM,
    CellGraphNet,
    CropEmbedder,
    SeedBaseline,
    check_crop_size,
    knn_edge_index,
    served_size,
)

NUM_NUCLEATED = len(NUCLEATED_CLASSES)
CONTEXT_SHARE = 0.35  # chance that an image gives one RBC/platelet crop to a CNN epoch (they are many and easy)
CONTEXT_LOSS_WEIGHT = 0.2  # GNN loss weight of RBC/platelet nodes relative to white-cell nodes
FOUR_CLASS_PER_CLASS = 600  # 4-class TRAIN images kept per class: ~10k augmented copies of ~270 frames otherwise
CLASS_BALANCE_POWER = 0.5  # CNN epochs draw a crop of class c with weight n_c ** -power (0 = as is, 1 = balanced)
SOURCE_GROUPS = {"bccd": ("bccd", "4class"), "pbc": ("pbc", "txl-pbc")}  # what --exclude-source drops
MIXSTYLE_BLOCKS = (0, 2)  # CropEmbedder.features indices: the first two convolution blocks (64 and 32 px maps)


# ---- data ----------------------------------------------------------------------------------------------------
@dataclass
class CellSets:
    train: list[FrameCells]
    val: list[FrameCells]


def _four_class_subset(data_root, held_out: frozenset[str], seed: int) -> list:
    """Up to FOUR_CLASS_PER_CLASS non-held-out 4-class TRAIN images per class, deterministic."""
    rng = random.Random(seed)
    by_class: dict[str, list] = {}
    for img in load_four_class(data_root, "TRAIN"):
        if img.source_frame not in held_out:
            by_class.setdefault(img.label, []).append(img)
    return [img for name in sorted(by_class) for img in
            sorted(rng.sample(by_class[name], min(len(by_class[name]), FOUR_CLASS_PER_CLASS)), key=lambda i: i.path)]


def exclude(cells: list[FrameCells], source: str | None) -> list[FrameCells]:
    """Leave one source out (SOURCE_GROUPS); None keeps every source."""
    return [c for c in cells if c.source not in SOURCE_GROUPS[source]] if source else cells


def load_cell_sets(data_root: Path | None, max_images: int | None, seed: int,
                   exclude_source: str | None = None) -> CellSets:
    """Training and validation cells of every source (datasets.py has the split rules). Test parts are never read:
    4-class TEST frames, PBC test files and TXL-PBC images whose content or upstream split is test."""
    split = split_frames(data_root, seed=seed)
    bccd = [f for f in load_bccd(data_root) if f.frame_id not in split.held_out]
    four = _four_class_subset(data_root, split.held_out, seed)
    pbc = [img for img in load_pbc(data_root) if img.split != "test"]
    pbc_content = {img.sha1 for img in load_pbc(data_root)}
    txl = [img for img in load_txl(data_root) if img.split != "test" and img.sha1 not in pbc_content]
    if max_images:  # smoke runs: a deterministic handful of each
        rng = random.Random(seed)
        bccd, four, pbc, txl = (rng.sample(items, min(len(items), max_images)) for items in (bccd, four, pbc, txl))
    cells = exclude(build_cells(bccd, "bccd-trainval") + build_cells(four, "4class-trainval")
                    + build_cells(pbc, "pbc-trainval") + build_cells(txl, "txl-trainval"), exclude_source)
    assert not any(c.source_frame in split.held_out for c in cells), "held-out frame in training data"
    split_of = {f"pbc:{img.sha1}": img.split for img in pbc} | {f"txl:{img.sha1}": img.split for img in txl}

    def part(cell: FrameCells) -> str:
        if cell.source_frame in split_of:
            return split_of[cell.source_frame]
        return frame_split_name(cell.source_frame, split)

    return CellSets(train=[c for c in cells if part(c) == "train"], val=[c for c in cells if part(c) == "val"])


class CropSampler:
    """The CNN's crops: every labelled nucleated-cell crop plus a context crop from CONTEXT_SHARE of the images, drawn
    per epoch with class weights n_c ** -CLASS_BALANCE_POWER (PBC's rare classes against BCCD's many neutrophils).
    Also lists the unlabelled white cells (the localiser's WBC boxes without a subtype: TXL-PBC's Raabin-WBC and
    BCDD images, BCCD frames of uncertain label) for the consistency term (`--unlabelled-weight`).
    Holds (frame, cell) indices only: crops stay uint8 in the frames and are converted per batch."""

    def __init__(self, frames: list[FrameCells]) -> None:
        self.frames = frames
        self.nucleated: list[tuple[int, int]] = []
        self.context: list[list[int]] = []
        self.unlabelled: list[tuple[int, int]] = []
        for f, frame in enumerate(frames):
            self.nucleated += [(f, int(i)) for i in np.flatnonzero(frame.labelled_nucleated)]
            self.context.append(np.flatnonzero(frame.labelled_context).tolist())
            self.unlabelled += [(f, int(i)) for i in np.flatnonzero(frame.unlabelled_wbc)]

    def epoch(self, rng: np.random.Generator) -> list[tuple[int, int]]:
        items = list(self.nucleated)
        for f, context in enumerate(self.context):
            if context and rng.random() < CONTEXT_SHARE:
                items.append((f, int(rng.choice(context))))
        labels = np.array([self.frames[f].labels[i] for f, i in items])
        counts = np.bincount(labels, minlength=len(CLASSES)).astype(np.float64)
        weights = counts[labels] ** -CLASS_BALANCE_POWER
        chosen = rng.choice(len(items), size=len(items), replace=True, p=weights / weights.sum())
        return [items[i] for i in chosen]

    def batch(self, items: list[tuple[int, int]]) -> tuple[np.ndarray, torch.Tensor]:
        crops = np.stack([self.frames[f].crops[i] for f, i in items])
        labels = torch.tensor([int(self.frames[f].labels[i]) for f, i in items])
        return crops, labels

    def unlabelled_batch(self, rng: np.random.Generator, size: int) -> np.ndarray:
        chosen = rng.choice(len(self.unlabelled), size=size, replace=True)
        return np.stack([self.frames[f].crops[i] for f, i in (self.unlabelled[c] for c in chosen)])


class MixStyle:
    """Feature-statistics mixing (Zhou et al., "Domain generalization with MixStyle", ICLR 2021), training only.

    A forward hook on an early block: with probability `p` per batch, each crop's per-channel feature mean and
    standard deviation are replaced by a random convex mix (weight ~ Beta(alpha, alpha)) of its own and another
    crop's of the batch. A lab's stain and optics live largely in those statistics, so the CNN learns to classify
    with them scrambled. No parameters, nothing in the exported graph (the hook does nothing in eval mode)."""

    def __init__(self, p: float, alpha: float = 0.1, eps: float = 1e-6) -> None:
        self.p, self.eps = p, eps
        self.beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))

    def __call__(self, module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training or output.shape[0] < 2 or float(torch.rand(())) >= self.p:
            return None
        n = output.shape[0]
        mean = output.mean(dim=(2, 3), keepdim=True).detach()
        std = (output.var(dim=(2, 3), keepdim=True) + self.eps).sqrt().detach()
        weight = self.beta.sample((n, 1, 1, 1)).to(output.device)
        other = torch.randperm(n, device=output.device)
        mixed_mean = weight * mean + (1 - weight) * mean[other]
        mixed_std = weight * std + (1 - weight) * std[other]
        return (output - mean) / std * mixed_std + mixed_mean


def attach_mixstyle(model: CropEmbedder, p: float) -> list:
    """MixStyle after the CNN's first two convolution blocks (hooks, so the state dict and export are unchanged)."""
    if p <= 0:
        return []
    hook = MixStyle(p)
    return [model.features[index].register_forward_hook(hook) for index in MIXSTYLE_BLOCKS]


# ---- CNN -----------------------------------------------------------------------------------------------------
@dataclass
class Unlabelled:
    """The consistency term on unlabelled white cells (FixMatch, Sohn et al. 2020): the CNN's own label of a weakly
    augmented view (rotation, flip, resolution), where its confidence reaches `threshold`, is the target of a
    strongly augmented view of the same crop, weighted `weight` against the labelled loss. Targets are the
    nucleated classes only (the localiser called these cells white)."""
    weight: float = 0.0
    threshold: float = 0.95
    share: float = 0.5  # unlabelled crops per labelled crop in a batch


def unlabelled_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor, threshold: float) -> torch.Tensor:
    probs = torch.softmax(logits_weak.detach()[:, :NUM_NUCLEATED], 1)
    confidence, target = probs.max(1)
    keep = (confidence >= threshold).float()
    losses = F.cross_entropy(logits_strong, target, reduction="none")
    return (losses * keep).sum() / max(len(keep), 1)


def train_one_epoch(model: nn.Module, sampler: CropSampler, optimizer: torch.optim.Optimizer, scheduler, epoch: int,
                    batch_size: int, seed: int, label_smoothing: float = 0.1, strength: float = 1.0,
                    unlabelled: Unlabelled | None = None, average: AveragedModel | None = None,
                    amplitude: float = 0.0, grey: float = 0.0, random_conv: float = 0.0) -> float:
    """One epoch; crops are augmented on the CPU (seeded) and the model runs where its parameters are. `average`:
    a moving average of the weights, updated after every step (`--cnn-ema`). `amplitude`: share of labelled crops
    given another crop's Fourier amplitude in part (`--amplitude-mix`), drawn from the batch and its lightly
    augmented unlabelled cells. `grey`: share of crops of every view turned grey after the stain jitter
    (`--grey-share`). `random_conv`: share of labelled crops and of the unlabelled cells' strong view mixed with a
    random convolution of themselves (`--random-conv`; never the weak view, whose pseudo-label is read)."""
    model.train()
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed + epoch)
    generator = torch.Generator().manual_seed(seed + epoch)
    items = sampler.epoch(rng)
    use_unlabelled = unlabelled is not None and unlabelled.weight > 0 and len(sampler.unlabelled) > 0
    total, count = 0.0, 0
    for start in tqdm(range(0, len(items), batch_size), desc=f"cnn epoch {epoch}", leave=False):
        crops, labels = sampler.batch(items[start:start + batch_size])
        views = [augment_batch(crops, generator, STORE_ZOOM, strength, grey, random_conv)]
        if use_unlabelled:  # unlabelled white cells, lightly (weak) and fully (strong) augmented
            extra = sampler.unlabelled_batch(rng, max(1, round(len(labels) * unlabelled.share)))
            views += [augment_batch(extra, generator, STORE_ZOOM, 0.0, grey),
                      augment_batch(extra, generator, STORE_ZOOM, strength, grey, random_conv)]
        if amplitude > 0:  # donors: the batch and its lightly augmented unlabelled cells
            views[0] = amplitude_mix(views[0], torch.cat(views[:2]), generator, amplitude)
        _, logits_all = model(torch.cat(views).to(device))  # one pass: BatchNorm sees every view together
        logits, *weak_and_strong = logits_all.split([len(view) for view in views])
        loss = F.cross_entropy(logits, labels.to(device), label_smoothing=label_smoothing)
        if weak_and_strong:
            loss = loss + unlabelled.weight * unlabelled_loss(*weak_and_strong, unlabelled.threshold)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update_parameters(model)
        total += loss.item() * len(labels)
        count += len(labels)
    return total / max(count, 1)


@torch.no_grad()
def _resume_state(path: Path, model: nn.Module, optimizer, scheduler) -> tuple[int, dict]:
    if not path.exists():
        return 0, {}
    ckpt = load_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    if ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt["metrics"].get("scheduler"):
        # keep the step count; the schedule length follows this run's --*-epochs (it may extend the run)
        state = {**ckpt["metrics"]["scheduler"], "total_steps": scheduler.total_steps}
        scheduler.load_state_dict(state)
    print(f"resumed {path.name} at epoch {ckpt['epoch']}")
    return int(ckpt["epoch"]), ckpt["metrics"]


def _fit(name: str, model: nn.Module, epochs: int, steps_per_epoch: int, lr: float, weight_decay: float,
         run_dir: Path, args: argparse.Namespace, config: dict, run_epoch, validate,
         average: AveragedModel | None = None) -> dict:
    """The shared epoch loop: train, validate, keep last and best (by validation macro-F1) checkpoints. With
    `average` (a moving average of `model`'s weights), the average is validated and kept as the best checkpoint,
    and its last state is saved beside the model's for `--resume`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(epochs * steps_per_epoch, 1),
                                                    pct_start=0.15)
    last, best_path = run_dir / f"{name}_last.pt", run_dir / f"{name}_best.pt"
    average_last = run_dir / f"{name}_average_last.pt"
    start_epoch, metrics = (_resume_state(last, model, optimizer, scheduler) if args.resume else (0, {}))
    if average is not None and start_epoch:
        saved = load_checkpoint(average_last)
        average.module.load_state_dict(saved["model"])
        average.n_averaged.fill_(saved["metrics"]["n_averaged"])
    kept = average.module if average is not None else model  # what is validated and released
    best = metrics.get("best_score", -1.0)
    for epoch in range(start_epoch, epochs):
        started = time.time()
        loss = run_epoch(model, optimizer, scheduler, epoch)
        val = validate(kept)
        release_freed_memory()
        score = val["score"]
        line = {"epoch": epoch + 1, "loss": round(loss, 4), **{k: round(v, 4) for k, v in val.items()},
                "seconds": round(time.time() - started, 1)}
        print(f"{name} " + json.dumps(line))
        history = [*metrics.get("history", []), line]
        if score > best:
            best = score
            save_checkpoint(best_path, kept, None, epoch + 1, args, {"val": val, "history": history}, config)
        metrics = {"history": history, "best_score": best, "scheduler": scheduler.state_dict()}
        if average is not None:  # first: a resumed run never finds the model's epoch ahead of its average
            save_checkpoint(average_last, average.module, None, epoch + 1, args,
                            {"n_averaged": int(average.n_averaged)}, config)
        save_checkpoint(last, model, optimizer, epoch + 1, args, metrics, config)
    if not best_path.exists():  # zero epochs requested after resume: keep what we have
        shutil.copy(last, best_path)
    return load_checkpoint(best_path)


def train_cnn(cells: CellSets, args: argparse.Namespace, run_dir: Path) -> CropEmbedder:
    crop_sides = {served_size(frame.crops.shape[1]) for frame in cells.train + cells.val if len(frame.crops)}
    if len(crop_sides) != 1:
        raise UserError(f"the training cells' crops have sides {sorted(crop_sides)}; build them for one crop size")
    crop_size = crop_sides.pop()
    if args.crop_size and args.crop_size != crop_size:
        raise UserError(f"--crop-size {args.crop_size}, but the training crops are for {crop_size} px (the CNN pack's)")
    config = {"width": args.cnn_width, "crop_size": crop_size, "ibn": args.ibn}
    model = CropEmbedder(**config).to(args.device)
    attach_mixstyle(model, args.mixstyle)
    sampler = CropSampler(cells.train)
    unlabelled = Unlabelled(args.unlabelled_weight, args.pseudo_threshold)
    if unlabelled.weight > 0:
        print(f"unlabelled white cells for the consistency term: {len(sampler.unlabelled)}"
              + ("" if sampler.unlabelled else " (the term is off; a CNN pack written before it held none)"))
    # an epoch's size varies with the context draw: schedule for the largest possible epoch
    steps = -(-(len(sampler.nucleated) + sum(bool(c) for c in sampler.context)) // args.batch_size)

    average = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.cnn_ema), use_buffers=True)
               if args.cnn_ema > 0 else None)

    def run_epoch(model, optimizer, scheduler, epoch):
        return train_one_epoch(model, sampler, optimizer, scheduler, epoch, args.batch_size, args.seed,
                               strength=args.aug_strength, unlabelled=unlabelled, average=average,
                               amplitude=args.amplitude_mix, grey=args.grey_share,
                               random_conv=args.random_conv)

    def validate(model):
        return cell_metrics(cells.val, [probs for _, probs in embed_frames(model, cells.val)])

    best = _fit("cnn", model, args.cnn_epochs, steps, args.lr, args.weight_decay, run_dir, args, config, run_epoch,
                validate, average)
    model.load_state_dict(best["model"])
    return model.eval()


def graph_data(frames: list[FrameCells], embedded: list[tuple[np.ndarray, np.ndarray]], gnn: CellGraphNet,
               widen: float = 1.0, seed: int = 0) -> list[Data]:
    """One PyG graph per frame with labels: node inputs as `gnn` reads them, kNN edges, node labels.

    `widen` > 1 (training graphs, `--gnn-widen`): each frame is read as part of a field up to `widen` times wider and
    taller (log-uniform), at a random place in it, as another camera's field of view would show the same cells. Only
    the frame-relative node geometry changes (centroid / frame, median cell / frame); the kNN graph does not."""
    rng = np.random.default_rng(seed)
    graphs = []
    for frame, (embeddings, _) in zip(frames, embedded):
        if len(frame.labels) == 0:
            continue
        boxes = torch.from_numpy(frame.boxes)
        frame_size = torch.tensor(frame.frame_size, dtype=torch.float32)
        if widen > 1.0:
            field = frame_size * float(np.exp(rng.uniform(0.0, np.log(widen))))
            offset = torch.from_numpy(rng.uniform(0.0, 1.0, 2).astype(np.float32)) * (field - frame_size)
            boxes, frame_size = boxes + offset.flip(0).repeat(2), field  # offset is (y, x); boxes are x1, y1, x2, y2
        x = gnn.node_inputs(torch.from_numpy(embeddings).float(), boxes, frame_size)
        graphs.append(Data(x=x, edge_index=knn_edge_index(boxes, frame_size), y=torch.from_numpy(frame.labels)))
    return graphs


def gnn_class_weights(graphs: list[Data], power: float) -> torch.Tensor:
    """Loss weight per class: white-cell classes n_c ** -power over the training nodes, scaled to a mean of 1 over
    the labelled white-cell nodes (IG and NRBC come from PBC alone and are outnumbered by BCCD's neutrophils); RBC
    and platelet nodes CONTEXT_LOSS_WEIGHT."""
    labels = torch.cat([g.y for g in graphs])
    counts = torch.bincount(labels[labels >= 0], minlength=len(CLASSES)).double()
    weights = torch.full((len(CLASSES),), CONTEXT_LOSS_WEIGHT, dtype=torch.float64)
    present = counts[:NUM_NUCLEATED] > 0
    nucleated = torch.where(present, counts[:NUM_NUCLEATED].clamp(min=1) ** -power, torch.zeros(()))
    weights[:NUM_NUCLEATED] = nucleated * counts[:NUM_NUCLEATED].sum() / (nucleated * counts[:NUM_NUCLEATED]).sum()
    return weights.float()


def _gnn_loss(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    known = labels != IGNORE
    weights = class_weights[labels[known]]
    losses = F.cross_entropy(logits[known], labels[known], reduction="none", label_smoothing=0.05)
    return (losses * weights).sum() / weights.sum().clamp(min=1e-6)


@torch.no_grad()
def gnn_probs(model: CellGraphNet, graphs: list[Data]) -> list[np.ndarray]:
    model.eval()
    return [torch.softmax(model(g.x, g.edge_index), 1).numpy() for g in graphs]


def train_gnn(cells: CellSets, embedder: CropEmbedder, args: argparse.Namespace, run_dir: Path) -> CellGraphNet:
    """GNN on frozen CNN embeddings. Training graphs use embeddings of augmented crops, so the GNN does not learn
    to trust the CNN's over-confident view of crops it was trained on."""
    train_frames = [f for f in cells.train if len(f.labels)]
    val_frames = [f for f in cells.val if len(f.labels)]
    config = {"hidden": args.gnn_hidden, "layers": args.gnn_layers, "geometry": args.gnn_geometry}
    torch.manual_seed(args.seed)  # the same initial GNN after a CNN stage in this run or from a saved CNN
    model = CellGraphNet(**config)
    train_graphs = [g for view in range(args.gnn_views)
                    for g in graph_data(train_frames, embed_frames(embedder, train_frames, augment=True,
                                                                   seed=args.seed + view), model,
                                        args.gnn_widen, args.seed + view)]
    val_graphs = graph_data(val_frames, embed_frames(embedder, val_frames), model)
    class_weights = gnn_class_weights(train_graphs, args.gnn_class_balance)
    print("gnn class weights: " + ", ".join(f"{name} {w:.2f}" for name, w in zip(CLASSES, class_weights.tolist())))
    steps = -(-len(train_graphs) // args.graph_batch)

    def run_epoch(model, optimizer, scheduler, epoch):
        model.train()
        torch.manual_seed(args.seed + epoch)
        total, count = 0.0, 0
        for batch in tqdm(GraphLoader(train_graphs, batch_size=args.graph_batch, shuffle=True),
                          desc=f"gnn epoch {epoch}", leave=False):
            loss = _gnn_loss(model(batch.x, batch.edge_index), batch.y, class_weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, count = total + loss.item(), count + 1
        return total / max(count, 1)

    def validate(model):
        return cell_metrics(val_frames, gnn_probs(model, val_graphs))

    best = _fit("gnn", model, args.gnn_epochs, steps, args.gnn_lr, args.weight_decay, run_dir, args, config,
                run_epoch, validate)
    model.load_state_dict(best["model"])
    return model.eval()


@torch.no_grad()
def calibrate(cells: CellSets, embedder: CropEmbedder, gnn: CellGraphNet, run_dir: Path, release_dir: Path,
              cnn_blend: float = 0.0) -> dict:
    """Temperatures for the CNN-only and CNN+GNN logits fitted on validation cells, the flagged classes' shift of
    the CNN+GNN's (`fit_flagged_bias`), ECE before/after, and the "unidentified" threshold chosen from the validation
    auto-accept curve of the calibrated CNN+GNN.

    `cnn_blend` = a pools the two calibrated models log-linearly, (1 - a) x GNN + a x CNN: the served logits become
    GNN + cnn_weight x CNN, cnn_weight = a T_gnn / ((1 - a) T_cnn), and the served temperature is fitted on those."""
    val_frames = [f for f in cells.val if len(f.labels)]
    embedded = embed_frames(embedder, val_frames)
    graphs = graph_data(val_frames, embedded, gnn)
    gnn.eval()
    gnn.set_cnn_blend(embedder.classifier, 0.0)
    gnn_logits = [gnn(g.x, g.edge_index).numpy() for g in graphs]
    cnn_logits = [embedder.classifier(torch.from_numpy(e).float()).numpy() for e, _ in embedded]
    out: dict = {"validation_cells": 0}
    truth, cnn_stacked, _ = labelled_nucleated(val_frames, cnn_logits)
    cnn_temperature = fit_temperature(cnn_stacked, truth)
    if cnn_blend > 0.0:
        _, gnn_stacked, _ = labelled_nucleated(val_frames, gnn_logits)
        out["gnn_alone_temperature"] = fit_temperature(gnn_stacked, truth)
        out["cnn_blend"] = cnn_blend
        out["cnn_weight"] = gnn.pool_with_cnn(embedder.classifier, cnn_blend, out["gnn_alone_temperature"],
                                              cnn_temperature)
        gnn_logits = [gnn(g.x, g.edge_index).numpy() for g in graphs]
    _, gnn_stacked, _ = labelled_nucleated(val_frames, gnn_logits)  # the served logits (pooled when blended)
    gnn_temperature = fit_temperature(gnn_stacked, truth)
    scaled = torch.log_softmax(torch.from_numpy(gnn_stacked) / gnn_temperature, 1).numpy()
    flagged_bias = fit_flagged_bias(scaled, truth, [CLASSES.index(name) for name in FLAGGED_CLASSES])
    no_shift = np.zeros_like(flagged_bias)
    out["flagged_bias"] = {name: float(flagged_bias[CLASSES.index(name)]) for name in FLAGGED_CLASSES}
    for tag, shift in (("unshifted", no_shift), ("shifted", flagged_bias)):  # the served CNN+GNN, without and with
        probs = [torch.softmax(torch.from_numpy(logits) / gnn_temperature + torch.from_numpy(shift), 1).numpy()
                 for logits in gnn_logits]
        out.setdefault("validation_score", {})[tag] = cell_metrics(val_frames, probs)["score"]  # the selection rule
        predicted = labelled_nucleated(val_frames, probs)[1].argmax(1)
        out.setdefault("validation_recall", {})[tag] = {
            name: float((predicted == truth)[truth == index].mean())
            for index, name in enumerate(NUCLEATED_CLASSES) if (truth == index).any()}
    for name, stacked, temperature, bias in (("cnn", cnn_stacked, cnn_temperature, no_shift),
                                             ("gnn", gnn_stacked, gnn_temperature, flagged_bias)):
        out[f"{name}_temperature"] = temperature
        for tag, t, shift in (("raw", 1.0, no_shift), ("calibrated", temperature, bias)):
            probs = torch.softmax(torch.from_numpy(stacked) / t + torch.from_numpy(shift), 1).numpy()
            confidence, correct = probs.max(1), probs.argmax(1) == truth
            out[f"{name}_ece_{tag}"] = expected_calibration_error(confidence, correct)
            if name == "gnn" and tag == "calibrated":
                curve = auto_accept_curve(confidence, correct)
                out["auto_accept_curve"] = curve
                out["threshold"] = choose_threshold(curve)
    out["validation_cells"] = int(len(truth))
    gnn.temperature.fill_(out["gnn_temperature"])  # served PROBS are calibrated: the buffers travel in gnn.pt
    gnn.class_bias.copy_(torch.from_numpy(flagged_bias))
    best = load_checkpoint(run_dir / "gnn_best.pt")
    best["model"] = gnn.state_dict()
    torch.save(best, run_dir / "gnn_best.pt")
    release_dir.mkdir(parents=True, exist_ok=True)
    (release_dir / CALIBRATION_FILE).write_text(json.dumps(out, indent=2) + "\n")
    chosen = out["threshold"]
    accuracy = "n/a" if chosen["accuracy"] is None else f"{chosen['accuracy']:.1%}"
    shifts = ", ".join(f"{name} {value:+.2f}" for name, value in out["flagged_bias"].items())
    print(f"calibration: T_cnn {out['cnn_temperature']:.2f}, T_gnn {out['gnn_temperature']:.2f}, {shifts}, threshold "
          f"{chosen['threshold']:.2f} accepts {chosen['accepted']:.1%} of validation cells at {accuracy}")
    return out


# ---- seed baseline --------------------------------------------------------------------------------------------
def train_baseline(args: argparse.Namespace, run_dir: Path) -> SeedBaseline:
    split = split_frames(args.data_root, seed=args.seed)
    items = [img for img in load_four_class(args.data_root, "TRAIN") if img.source_frame not in split.held_out]
    if args.max_images:
        items = random.Random(args.seed).sample(items, min(len(items), args.max_images))
    train_items = [i for i in items if i.source_frame in split.train]
    val_items = [i for i in items if i.source_frame in split.val]
    x_train, x_val = baseline_images([i.path for i in train_items]), baseline_images([i.path for i in val_items])
    y_train = torch.tensor([BASELINE_CLASSES.index(i.label) for i in train_items])
    y_val = np.array([BASELINE_CLASSES.index(i.label) for i in val_items])
    model = SeedBaseline()
    steps = -(-len(x_train) // args.batch_size)

    def run_epoch(model, optimizer, scheduler, epoch):
        model.train()
        generator = torch.Generator().manual_seed(args.seed + epoch)
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for start in range(0, len(order), args.batch_size):
            index = order[start:start + args.batch_size]
            loss = F.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
        return total / max(len(order), 1)

    @torch.no_grad()
    def validate(model):
        model.eval()
        predictions = model(x_val).argmax(1).numpy() if len(x_val) else np.array([], int)
        acc = float(accuracy_score(y_val, predictions)) if len(y_val) else 0.0
        f1 = macro_f1(y_val, predictions, list(range(len(BASELINE_CLASSES)))) if len(y_val) else 0.0
        return {"image_accuracy": acc, "image_macro_f1": f1, "images": len(y_val), "score": f1}

    best = _fit("baseline", model, args.baseline_epochs, steps, 1e-3, 0.0, run_dir, args, {}, run_epoch, validate)
    model.load_state_dict(best["model"])
    return model.eval()


# ---- entry point ----------------------------------------------------------------------------------------------
def release(run_dir: Path, release_dir: Path, names: list[tuple[str, str]]) -> None:
    """Copy best checkpoints without optimizer state into the release folder (committed weights)."""
    release_dir.mkdir(parents=True, exist_ok=True)
    for run_name, file_name in names:
        ckpt = load_checkpoint(run_dir / f"{run_name}_best.pt")
        ckpt["optimizer"] = None
        torch.save(ckpt, release_dir / file_name)
        print(f"released {release_dir / file_name} (epoch {ckpt['epoch']})")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train leukograph's models (CPU; the CNN also on CUDA)",
                                     add_help=add_help)
    parser.add_argument("--data-root", default=None, help="datasets (default $LEUKOGRAPH_DATA, ../shared/datasets)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/train"), help="full checkpoints (for --resume)")
    parser.add_argument("--release-dir", type=Path, default=WEIGHTS_DIR, help="where the best weights are released")
    parser.add_argument("--stages", default="cnn,gnn,baseline",
                        help="comma list of cnn, gnn, baseline; or calibrate: fit the temperatures, --cnn-blend and "
                        "the threshold again for --output-dir's trained CNN and GNN, without training")
    parser.add_argument("--resume", action="store_true", help="continue from --output-dir's last checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="where the CNN trains: cpu (default) or cuda; augmentation "
                        "runs on the CPU either way")
    parser.add_argument("--save-cnn-pack", type=Path, default=None, metavar="PACK",
                        help="write the CNN's training crops (JPEG) to PACK and stop, for a machine without the data")
    parser.add_argument("--cnn-pack", type=Path, default=None, metavar="PACK",
                        help="train the CNN (--stages cnn) from PACK instead of the datasets")
    parser.add_argument("--max-images", type=int, default=None, help="smoke run: use only this many images per set")
    parser.add_argument("--exclude-source", choices=sorted(SOURCE_GROUPS), default=None,
                        help="leave one source out: bccd (BCCD + 4-class) or pbc (PBC + TXL-PBC's PBC images)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--cnn-epochs", type=int, default=40)
    parser.add_argument("--cnn-width", type=int, default=32)
    parser.add_argument("--crop-size", type=int, default=None,
                        help=f"side of the square crop the CNN takes, a multiple of 8 (default {CROP_SIZE}; with "
                        "--cnn-pack, the pack's)")
    parser.add_argument("--pack-quality", type=int, default=95, help="JPEG quality of --save-cnn-pack's crops")
    parser.add_argument("--aug-strength", type=float, default=1.5,
                        help="scales every augmentation range of the CNN's crops (training/augment.py)")
    parser.add_argument("--mixstyle", type=float, default=0.0, metavar="P",
                        help="MixStyle after the CNN's first two blocks with probability P per batch (0 = off)")
    parser.add_argument("--amplitude-mix", type=float, default=0.0, metavar="P",
                        help="give a share P of the labelled crops another crop's Fourier amplitude in part, often "
                        "an unlabelled lab's (0 = off, the default)")
    parser.add_argument("--grey-share", type=float, default=0.0, metavar="P",
                        help="turn a share P of the CNN's crops grey after the stain jitter, in every view (the "
                        "consistency term's light view too; 0 = off, the default; README \"Other labs' white cells "
                        "without labels\")")
    parser.add_argument("--random-conv", type=float, default=0.0, metavar="P",
                        help="mix a share P of the labelled crops and of the unlabelled cells' strong view with a "
                        "random convolution of themselves (RandConv; 0 = off, the default)")
    parser.add_argument("--ibn", action=argparse.BooleanOptionalAction, default=True,
                        help="normalise half of the channels of the CNN's first two blocks per crop (IBN-a; on by "
                        "default, as in the release; --no-ibn: BatchNorm after every conv, the CNN before it; README "
                        "\"Other labs' white cells without labels\")")
    parser.add_argument("--unlabelled-weight", type=float, default=1.0,
                        help="weight of the consistency term on unlabelled white cells (0 = off; default %(default)s)")
    parser.add_argument("--pseudo-threshold", type=float, default=0.95,
                        help="confidence a weak view needs to be a target for the consistency term")
    parser.add_argument("--cnn-ema", type=float, default=0.0, metavar="DECAY",
                        help="validate and release an exponential moving average of the CNN's weights and BatchNorm "
                        "statistics, updated every step with this decay (0.99: about the last 100 optimiser "
                        "steps; 0 = off, the default)")
    parser.add_argument("--gnn-epochs", type=int, default=25)
    parser.add_argument("--gnn-lr", type=float, default=3e-3)
    parser.add_argument("--gnn-hidden", type=int, default=64)
    parser.add_argument("--gnn-layers", type=int, default=2)
    parser.add_argument("--gnn-views", type=int, default=2, help="augmented embedding views per training graph")
    parser.add_argument("--gnn-widen", type=float, default=3.0, metavar="W",
                        help="read each training graph as part of a field up to W times wider and taller (default "
                        "%(default)s; 1 = off; README \"Node geometry\")")
    parser.add_argument("--gnn-geometry", choices=sorted(GEOMETRY_FEATURES), default="frame",
                        help="node geometry: frame, each cell against the other cells and the frame (default); "
                        "cells, against the other cells only (README \"Node geometry\")")
    parser.add_argument("--gnn-class-balance", type=float, default=0.0, metavar="POWER",
                        help="GNN loss weight of white-cell class c: n_c ** -POWER (0 = every node alike, 1 = "
                        "balanced classes; default %(default)s)")
    parser.add_argument("--cnn-blend", type=float, default=0.0, metavar="A",
                        help="served cell probabilities pool the calibrated GNN and CNN log-linearly, (1 - A) x GNN "
                        "+ A x CNN, 0 <= A < 1 (default %(default)s: the GNN alone; README \"The CNN's own vote\")")
    parser.add_argument("--localizer", choices=LOCALIZERS, default=DEFAULT_LOCALIZER,
                        help="who finds the training graphs' cells: client, the classical localiser; server, the "
                        "learned detector the served ensemble runs first (default %(default)s)")
    add_keep_freed_memory_argument(parser)
    parser.add_argument("--graph-batch", type=int, default=32)
    parser.add_argument("--baseline-epochs", type=int, default=15)
    return parser


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def train_classifier(args: argparse.Namespace, stages: list[str], run_dir: Path,
                     started: float) -> list[tuple[str, str]]:
    """The CNN and/or GNN stages on the datasets' cells (freed when it returns)."""
    released: list[tuple[str, str]] = []
    embedder = None
    if "cnn" not in stages:  # the GNN over a trained CNN: its cells are cut at that CNN's crop size
        embedder = load_cnn(run_dir / "cnn_best.pt")
        use_crop_size(embedder.crop_size)
    cells = load_cell_sets(args.data_root, args.max_images, args.seed, args.exclude_source)
    print(f"cells: {len(cells.train)} training images, {len(cells.val)} validation images "
          f"({time.time() - started:.0f} s)")
    if embedder is None:
        embedder = train_cnn(cells, args, run_dir).cpu()
    released.append(("cnn", CNN_FILE))  # also beside a GNN trained or calibrated over an earlier CNN: the pair
    if "gnn" in stages or "calibrate" in stages:
        gnn = train_gnn(cells, embedder, args, run_dir) if "gnn" in stages else load_gnn(run_dir / "gnn_best.pt")
        released.append(("gnn", GNN_FILE))
        calibrate(cells, embedder, gnn, run_dir, args.release_dir, args.cnn_blend)
    return released


def main(args: argparse.Namespace) -> int:
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - {"cnn", "gnn", "baseline", "calibrate"}
    if unknown:
        raise UserError(f"unknown stage(s) {sorted(unknown)}; use cnn, gnn, baseline, or calibrate alone")
    if "calibrate" in stages and stages != ["calibrate"]:
        raise UserError("--stages calibrate runs alone (the gnn stage calibrates after training)")
    _seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    apply_keep_freed_memory(args)
    use_localizer(args.localizer)
    run_dir = args.output_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    released: list[tuple[str, str]] = []
    if args.cnn_pack and stages != ["cnn"]:
        raise UserError("--cnn-pack trains the CNN only: use --stages cnn (the GNN needs every cell of the datasets)")
    if args.device != "cpu" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device visible to torch {torch.__version__}")
    if not 0.0 <= args.cnn_blend < 1.0:
        raise UserError(f"--cnn-blend must be in [0, 1), got {args.cnn_blend}")
    for flag, share in (("--grey-share", args.grey_share), ("--random-conv", args.random_conv)):
        if not 0.0 <= share <= 1.0:
            raise UserError(f"{flag} must be in [0, 1], got {share}")
    if args.gnn_widen < 1.0:
        raise UserError(f"--gnn-widen must be >= 1 (1 = off), got {args.gnn_widen}")
    if args.crop_size is not None:
        try:
            check_crop_size(args.crop_size, "--crop-size")
        except ValueError as exc:
            raise UserError(str(exc)) from None
    use_crop_size(args.crop_size or CROP_SIZE)
    if args.save_cnn_pack:
        cells = load_cell_sets(args.data_root, args.max_images, args.seed)
        save_cnn_pack(args.save_cnn_pack, cells.train, cells.val, args.seed, args.pack_quality)
        return 0
    if args.cnn_pack:
        train, val = load_cnn_pack(args.cnn_pack)
        cells = CellSets(train=exclude(train, args.exclude_source), val=exclude(val, args.exclude_source))
        print(f"cells: {len(cells.train)} training images, {len(cells.val)} validation images from {args.cnn_pack}")
        train_cnn(cells, args, run_dir)
        released.append(("cnn", CNN_FILE))
    else:
        if "baseline" in stages:  # first: its images are freed before the cell sets are built
            train_baseline(args, run_dir)
            released.append(("baseline", BASELINE_FILE))
        if {"cnn", "gnn", "calibrate"} & set(stages):
            _seed_everything(args.seed)  # the classifier starts from the same random state with or without a baseline
            released += train_classifier(args, stages, run_dir, started)
    release(run_dir, args.release_dir, released)
    summary = {"seconds": round(time.time() - started, 1), "stages": stages, "args": {k: str(v) for k, v in
                                                                                       vars(args).items()}}
    (args.release_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done in {summary['seconds']:.0f} s")
    return 0
