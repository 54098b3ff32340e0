"""`leukograph train`: the CNN crop embedder, then the cell-graph GNN on its embeddings, and the seed baseline.

Laid out like torchvision's references/classification: `get_args_parser()`, `main(args)`, `train_one_epoch`,
`evaluate`, and checkpoints that carry model, optimizer, epoch, args and metrics (`--resume` continues a run).

Data: BCCD frames and 4-class TRAIN images whose source frame is in the training split. Model selection uses the
validation frames (carved from training frames, grouped by frame). Held-out frames (4-class TEST sources) are
never read here.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader as GraphLoader
from tqdm import tqdm

from leukograph.client.contract import CLASSES, WBC_CLASSES
from leukograph.client.errors import UserError
from leukograph.client.images import read_image
from leukograph.deploy.paths import WEIGHTS_DIR
from leukograph.training.cells import IGNORE, FrameCells, build_cells
from leukograph.training.checkpoints import (
    BASELINE_FILE,
    CNN_FILE,
    GNN_FILE,
    load_checkpoint,
    save_checkpoint,
)
from leukograph.training.datasets import load_bccd, load_four_class, split_frames
from leukograph.training.models import CellGraphNet, CropEmbedder, SeedBaseline, knn_edge_index, node_inputs

NUM_WBC = len(WBC_CLASSES)
CONTEXT_PER_IMAGE = 1  # RBC/platelet crops drawn per image per CNN epoch (they are many and easy)
CONTEXT_LOSS_WEIGHT = 0.2  # GNN loss weight of RBC/platelet nodes relative to WBC nodes


def crop_augmentation() -> A.Compose:
    """Smear-appropriate augmentation of 64x64 crops: any orientation, small scale/shift, stain and colour jitter."""
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-20, 20), border_mode=cv2.BORDER_CONSTANT,
                 fill=0, p=0.7),
        A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=20, val_shift_limit=12, p=0.7),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
        A.RandomGamma(gamma_limit=(85, 115), p=0.3),
        A.GaussianBlur(blur_limit=(3, 3), p=0.1),
    ])


def to_tensor(crops: np.ndarray) -> torch.Tensor:
    """uint8 [N,S,S,3] -> float [N,3,S,S] in 0..1 (what crop_cells produces in-graph)."""
    return torch.from_numpy(crops).permute(0, 3, 1, 2).to(torch.float32) / 255.0


def macro_f1_wbc(targets: np.ndarray, predictions: np.ndarray) -> float:
    return float(f1_score(targets, predictions, labels=list(range(NUM_WBC)), average="macro", zero_division=0))


def image_prediction(probs: np.ndarray) -> tuple[int, int]:
    """An image's WBC class from its cells' probabilities: the most WBC-like cell (largest total WBC probability)
    and its most likely WBC class. Returns (class index or -1 without cells, cell index or -1)."""
    if len(probs) == 0:
        return -1, -1
    cell = int(np.argmax(probs[:, :NUM_WBC].sum(1)))
    return int(np.argmax(probs[cell, :NUM_WBC])), cell


# ---- data ----------------------------------------------------------------------------------------------------
@dataclass
class CellSets:
    train: list[FrameCells]
    val: list[FrameCells]


def load_cell_sets(data_root: Path | None, max_images: int | None, seed: int) -> CellSets:
    split = split_frames(data_root, seed=seed)
    bccd = [f for f in load_bccd(data_root) if f.frame_id not in split.held_out]
    four = [img for img in load_four_class(data_root, "TRAIN") if img.source_frame not in split.held_out]
    if max_images:  # smoke runs: a deterministic handful of each
        rng = random.Random(seed)
        bccd = rng.sample(bccd, min(len(bccd), max_images))
        four = rng.sample(four, min(len(four), max_images))
    cells = build_cells(bccd, "bccd-trainval") + build_cells(four, "4class-trainval")
    assert not any(c.source_frame in split.held_out for c in cells), "held-out frame in training data"
    return CellSets(train=[c for c in cells if c.source_frame in split.train],
                    val=[c for c in cells if c.source_frame in split.val])


class CropDataset(torch.utils.data.Dataset):
    """Labelled crops for one CNN epoch: every labelled WBC crop, plus a few context crops per image."""

    def __init__(self, frames: list[FrameCells], augment: bool, rng: np.random.Generator) -> None:
        self.items: list[tuple[np.ndarray, int]] = []
        for frame in frames:
            wbc = np.flatnonzero((frame.labels >= 0) & (frame.labels < NUM_WBC))
            context = np.flatnonzero(frame.labels >= NUM_WBC)
            chosen = rng.choice(context, min(CONTEXT_PER_IMAGE, len(context)), replace=False) if len(context) else []
            self.items += [(frame.crops[i], int(frame.labels[i])) for i in (*wbc, *chosen)]
        self.transform = crop_augmentation() if augment else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        crop, label = self.items[index]
        if self.transform is not None:
            crop = self.transform(image=crop)["image"]
        return to_tensor(crop[None])[0], label


# ---- CNN -----------------------------------------------------------------------------------------------------
def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler, epoch: int,
                    label_smoothing: float = 0.1) -> float:
    model.train()
    total, count = 0.0, 0
    for crops, labels in tqdm(loader, desc=f"cnn epoch {epoch}", leave=False):
        _, logits = model(crops)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(labels)
        count += len(labels)
    return total / max(count, 1)


@torch.no_grad()
def embed_frames(model: CropEmbedder, frames: list[FrameCells], augment: bool = False,
                 batch: int = 512) -> list[tuple[np.ndarray, np.ndarray]]:
    """(embeddings, CNN probabilities) per frame, in eval mode; optionally on augmented crops."""
    model.eval()
    transform = crop_augmentation() if augment else None
    crops = np.concatenate([f.crops for f in frames]) if frames else np.zeros((0, 64, 64, 3), np.uint8)
    if transform is not None:
        crops = np.stack([transform(image=c)["image"] for c in crops]) if len(crops) else crops
    embeddings, probs = [], []
    for start in range(0, len(crops), batch):
        emb, logits = model(to_tensor(crops[start:start + batch]))
        embeddings.append(emb.numpy())
        probs.append(torch.softmax(logits, 1).numpy())
    embeddings_all = np.concatenate(embeddings) if embeddings else np.zeros((0, model.classifier.in_features))
    probs_all = np.concatenate(probs) if probs else np.zeros((0, len(CLASSES)))
    out, start = [], 0
    for frame in frames:
        n = len(frame.labels)
        out.append((embeddings_all[start:start + n], probs_all[start:start + n]))
        start += n
    return out


def evaluate(frames: list[FrameCells], probs_per_frame: list[np.ndarray]) -> dict[str, float]:
    """Validation metrics on WBC classes: per labelled WBC cell, and per image (the image-level decision)."""
    cell_true, cell_pred, image_true, image_pred = [], [], [], []
    for frame, probs in zip(frames, probs_per_frame):
        wbc = (frame.labels >= 0) & (frame.labels < NUM_WBC)
        cell_true += frame.labels[wbc].tolist()
        cell_pred += probs[wbc][:, :NUM_WBC].argmax(1).tolist()
        if frame.frame_label >= 0:
            image_true.append(frame.frame_label)
            image_pred.append(image_prediction(probs)[0])
    return {
        "cell_accuracy": float(accuracy_score(cell_true, cell_pred)) if cell_true else 0.0,
        "cell_macro_f1": macro_f1_wbc(np.array(cell_true), np.array(cell_pred)) if cell_true else 0.0,
        "image_accuracy": float(accuracy_score(image_true, image_pred)) if image_true else 0.0,
        "image_macro_f1": macro_f1_wbc(np.array(image_true), np.array(image_pred)) if image_true else 0.0,
        "cells": len(cell_true),
        "images": len(image_true),
    }


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
         run_dir: Path, args: argparse.Namespace, config: dict, run_epoch, validate) -> dict:
    """The shared epoch loop: train, validate, keep last and best (by validation macro-F1) checkpoints."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(epochs * steps_per_epoch, 1),
                                                    pct_start=0.15)
    last, best_path = run_dir / f"{name}_last.pt", run_dir / f"{name}_best.pt"
    start_epoch, metrics = (_resume_state(last, model, optimizer, scheduler) if args.resume else (0, {}))
    best = metrics.get("best_score", -1.0)
    for epoch in range(start_epoch, epochs):
        started = time.time()
        loss = run_epoch(model, optimizer, scheduler, epoch)
        val = validate(model)
        score = val["image_macro_f1"] if val["images"] else val["cell_macro_f1"]
        line = {"epoch": epoch + 1, "loss": round(loss, 4), **{k: round(v, 4) for k, v in val.items()},
                "seconds": round(time.time() - started, 1)}
        print(f"{name} " + json.dumps(line))
        history = [*metrics.get("history", []), line]
        if score > best:
            best = score
            save_checkpoint(best_path, model, None, epoch + 1, args, {"val": val, "history": history}, config)
        metrics = {"history": history, "best_score": best, "scheduler": scheduler.state_dict()}
        save_checkpoint(last, model, optimizer, epoch + 1, args, metrics, config)
    if not best_path.exists():  # zero epochs requested after resume: keep what we have
        shutil.copy(last, best_path)
    return load_checkpoint(best_path)


def train_cnn(cells: CellSets, args: argparse.Namespace, run_dir: Path) -> CropEmbedder:
    config = {"width": args.cnn_width}
    model = CropEmbedder(**config)
    rng = np.random.default_rng(args.seed)
    steps = -(-len(CropDataset(cells.train, False, rng)) // args.batch_size)

    def run_epoch(model, optimizer, scheduler, epoch):
        dataset = CropDataset(cells.train, augment=True, rng=np.random.default_rng(args.seed + epoch))
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=False,
                                             num_workers=args.workers, persistent_workers=False)
        return train_one_epoch(model, loader, optimizer, scheduler, epoch)

    def validate(model):
        return evaluate(cells.val, [probs for _, probs in embed_frames(model, cells.val)])

    best = _fit("cnn", model, args.cnn_epochs, steps, args.lr, args.weight_decay, run_dir, args, config, run_epoch,
                validate)
    model.load_state_dict(best["model"])
    return model.eval()


def graph_data(frames: list[FrameCells], embedded: list[tuple[np.ndarray, np.ndarray]]) -> list[Data]:
    graphs = []
    for frame, (embeddings, _) in zip(frames, embedded):
        if len(frame.labels) == 0:
            continue
        boxes = torch.from_numpy(frame.boxes)
        frame_size = torch.tensor(frame.frame_size, dtype=torch.float32)
        x = node_inputs(torch.from_numpy(embeddings).float(), boxes, frame_size)
        graphs.append(Data(x=x, edge_index=knn_edge_index(boxes, frame_size), y=torch.from_numpy(frame.labels)))
    return graphs


def _gnn_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    known = labels != IGNORE
    weights = torch.where(labels[known] < NUM_WBC, 1.0, CONTEXT_LOSS_WEIGHT)
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
    train_graphs = [g for _ in range(args.gnn_views)
                    for g in graph_data(train_frames, embed_frames(embedder, train_frames, augment=True))]
    val_graphs = graph_data(val_frames, embed_frames(embedder, val_frames))
    config = {"hidden": args.gnn_hidden, "layers": args.gnn_layers}
    model = CellGraphNet(**config)
    steps = -(-len(train_graphs) // args.graph_batch)

    def run_epoch(model, optimizer, scheduler, epoch):
        model.train()
        torch.manual_seed(args.seed + epoch)
        total, count = 0.0, 0
        for batch in tqdm(GraphLoader(train_graphs, batch_size=args.graph_batch, shuffle=True),
                          desc=f"gnn epoch {epoch}", leave=False):
            loss = _gnn_loss(model(batch.x, batch.edge_index), batch.y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, count = total + float(loss), count + 1
        return total / max(count, 1)

    def validate(model):
        return evaluate(val_frames, gnn_probs(model, val_graphs))

    best = _fit("gnn", model, args.gnn_epochs, steps, args.gnn_lr, args.weight_decay, run_dir, args, config,
                run_epoch, validate)
    model.load_state_dict(best["model"])
    return model.eval()


# ---- seed baseline --------------------------------------------------------------------------------------------
def baseline_images(paths: list[Path], size: int = 64) -> torch.Tensor:
    """The seed paper's input: the whole image resized to size x size, RGB in 0..1."""
    images = np.stack([cv2.resize(read_image(p), (size, size), interpolation=cv2.INTER_AREA) for p in paths])
    return to_tensor(images)


def train_baseline(args: argparse.Namespace, run_dir: Path) -> SeedBaseline:
    split = split_frames(args.data_root, seed=args.seed)
    items = [img for img in load_four_class(args.data_root, "TRAIN") if img.source_frame not in split.held_out]
    if args.max_images:
        items = random.Random(args.seed).sample(items, min(len(items), args.max_images))
    train_items = [i for i in items if i.source_frame in split.train]
    val_items = [i for i in items if i.source_frame in split.val]
    x_train, x_val = baseline_images([i.path for i in train_items]), baseline_images([i.path for i in val_items])
    y_train = torch.tensor([CLASSES.index(i.label) for i in train_items])
    y_val = np.array([CLASSES.index(i.label) for i in val_items])
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
            total += float(loss) * len(index)
        return total / max(len(order), 1)

    @torch.no_grad()
    def validate(model):
        model.eval()
        predictions = model(x_val).argmax(1).numpy() if len(x_val) else np.array([], int)
        acc = float(accuracy_score(y_val, predictions)) if len(y_val) else 0.0
        f1 = macro_f1_wbc(y_val, predictions) if len(y_val) else 0.0
        return {"image_accuracy": acc, "image_macro_f1": f1, "images": len(y_val), "cell_macro_f1": f1}

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
    parser = argparse.ArgumentParser(description="Train leukograph's models on CPU", add_help=add_help)
    parser.add_argument("--data-root", default=None, help="datasets (default $LEUKOGRAPH_DATA, ../shared/datasets)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/train"), help="full checkpoints (for --resume)")
    parser.add_argument("--release-dir", type=Path, default=WEIGHTS_DIR, help="where the best weights are released")
    parser.add_argument("--stages", default="cnn,gnn,baseline", help="comma list of cnn, gnn, baseline")
    parser.add_argument("--resume", action="store_true", help="continue from --output-dir's last checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--workers", type=int, default=1, help="augmentation worker processes")
    parser.add_argument("--max-images", type=int, default=None, help="smoke run: use only this many images per set")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--cnn-epochs", type=int, default=6)
    parser.add_argument("--cnn-width", type=int, default=32)
    parser.add_argument("--gnn-epochs", type=int, default=25)
    parser.add_argument("--gnn-lr", type=float, default=3e-3)
    parser.add_argument("--gnn-hidden", type=int, default=64)
    parser.add_argument("--gnn-layers", type=int, default=2)
    parser.add_argument("--gnn-views", type=int, default=1, help="augmented embedding views per training graph")
    parser.add_argument("--graph-batch", type=int, default=32)
    parser.add_argument("--baseline-epochs", type=int, default=15)
    return parser


def main(args: argparse.Namespace) -> int:
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - {"cnn", "gnn", "baseline"}
    if unknown:
        raise UserError(f"unknown stage(s) {sorted(unknown)}; use cnn, gnn, baseline")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    run_dir = args.output_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    released: list[tuple[str, str]] = []
    if "cnn" in stages or "gnn" in stages:
        cells = load_cell_sets(args.data_root, args.max_images, args.seed)
        print(f"cells: {len(cells.train)} training images, {len(cells.val)} validation images "
              f"({time.time() - started:.0f} s)")
        if "cnn" in stages:
            embedder = train_cnn(cells, args, run_dir)
            released.append(("cnn", CNN_FILE))
        else:
            ckpt = load_checkpoint(run_dir / "cnn_best.pt")
            embedder = CropEmbedder(**ckpt["config"])
            embedder.load_state_dict(ckpt["model"])
            embedder.eval()
        if "gnn" in stages:
            train_gnn(cells, embedder, args, run_dir)
            released.append(("gnn", GNN_FILE))
    if "baseline" in stages:
        train_baseline(args, run_dir)
        released.append(("baseline", BASELINE_FILE))
    release(run_dir, args.release_dir, released)
    summary = {"seconds": round(time.time() - started, 1), "stages": stages, "args": {k: str(v) for k, v in
                                                                                       vars(args).items()}}
    (args.release_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done in {summary['seconds']:.0f} s")
    return 0
