"""`leukograph adapt --db PATH [--samples ...]`: learn a lab's microscope from the cells its technologists verified.

Data: the signed samples of the result database (or the signed ones among --samples). Each verified white cell
(a gallery cell whose label after review is a WBC class) is a training node, in its stored frame image
(`review_store.frame_images`) with every other recorded cell of that frame as graph context, exactly as the served
pipeline sees it (in-graph crop, CNN, kNN graph, GNN). Context cells the model called red cell or platelet keep that
label at a low weight (so the context classes are not forgotten); every other cell is unlabelled.

Training: 20% of the verified cells are held out by sample (whole samples, so a sample's cells never sit on both
sides); fewer than `MIN_VERIFIED` training cells is refused. The CNN's convolutional features stay frozen (their
BatchNorm statistics too) and the embedding layer plus the GNN are fine-tuned; with at least `FULL_CNN_MIN` training
cells (or --full-cnn) the whole CNN is fine-tuned as well. The best epoch on the held-out cells is kept. `--anchor A`
pulls the trained weights towards the base ones (L2-SP), for a lab that also runs the base model's microscope.

Report: accuracy before and after on the held-out verified cells and on the project's held-out BCCD frames (so that
forgetting is visible). Output: `cnn.pt`, `gnn.pt` and `adapt.json` in --out; the version id is the served one
(`leukocyte_pipeline-weights-<sha256>` of the two files). `--model-repository DIR` also exports them there (ONNX,
configs, version.json) and makes the server at --server (a `leukograph serve` on DIR) load them itself, through
Triton's model control (`deploy.server.reload_pipeline`): no restart. A running `leukograph stream` keeps its frames
while the pipeline loads, sends them again, and records for each frame the weights id that labelled it; cells already
recorded keep theirs. Without a server listening there, the next `leukograph serve` serves them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leukograph.client.contract import CLASSES, CONTEXT_CLASSES, NUCLEATED_CLASSES
from leukograph.client.errors import UserError
from leukograph.client.review_store import ReviewStore, decode_jpeg
from leukograph.deploy.paths import REPO_ROOT, WEIGHTS_DIR, WEIGHTS_ENV
from leukograph.training.cells import IGNORE
from leukograph.training.checkpoints import CNN_FILE, GNN_FILE, load_checkpoint, load_models, save_checkpoint
from leukograph.training.models import (
    CellGraphNet,
    CropEmbedder,
    crop_cells,
    dense_mean_adjacency,
    standardise_colour,
)
from leukograph.training.train import CONTEXT_LOSS_WEIGHT

MIN_VERIFIED = 50  # training cells below which adapt refuses
FULL_CNN_MIN = 400  # training cells from which the whole CNN is fine-tuned
HOLDOUT_FRACTION = 0.2
NUM_VERIFIED = len(NUCLEATED_CLASSES)  # the nucleated classes a reviewer verifies (5 WBC, IG, NRBC)


@dataclass
class VerifiedFrame:
    """One stored frame of a signed sample: image, every recorded box (image pixels), node labels."""

    sample_id: str
    frame_index: int
    image: np.ndarray  # uint8 RGB, as stored (scaled)
    boxes: np.ndarray  # float32 [N, 4] in stored-image pixels
    labels: np.ndarray  # int64 [N]: WBC class index (verified), context class index, or IGNORE

    @property
    def n_verified(self) -> int:
        return int(((self.labels >= 0) & (self.labels < NUM_VERIFIED)).sum())


def load_verified_frames(db: Path, samples: list[str] | None = None) -> list[VerifiedFrame]:
    """The frames holding verified white cells of the signed samples (all signed ones when samples is None)."""
    with ReviewStore(db) as review:
        signed = {r["sample_id"] for r in review.samples() if r["status"] == "signed"}
        if samples:
            unsigned = [s for s in samples if s not in signed]
            if unsigned:
                raise UserError(f"not signed off (only signed samples are verified): {', '.join(unsigned)}")
            chosen = list(dict.fromkeys(samples))
        else:
            chosen = sorted(signed)
        frames = []
        for sample_id in chosen:
            verified: dict[int, dict[int, int]] = {}
            for cell in review.gallery(sample_id):
                if cell.label in NUCLEATED_CLASSES:
                    verified.setdefault(cell.frame_index, {})[cell.cell_index] = CLASSES.index(cell.label)
            for frame_index, by_cell in sorted(verified.items()):
                try:
                    stored = review.frame_image(sample_id, frame_index)
                except UserError:
                    continue  # over the storage bound: no image kept for this frame
                cells = review.frame_cells(sample_id, frame_index)
                boxes = np.array([c["box"] for c in cells], np.float32).reshape(-1, 4) * stored["scale"]
                labels = np.array([by_cell.get(c["cell_index"], CLASSES.index(c["pre_label"])
                                               if c["pre_label"] in CONTEXT_CLASSES else IGNORE) for c in cells],
                                  np.int64)
                frames.append(VerifiedFrame(sample_id, frame_index, decode_jpeg(stored["jpeg"]), boxes, labels))
    return frames


def split_by_sample(frames: list[VerifiedFrame], fraction: float = HOLDOUT_FRACTION,
                    seed: int = 0) -> tuple[list[VerifiedFrame], list[VerifiedFrame]]:
    """(train, held out): whole samples, shuffled with the seed, held out until about `fraction` of the cells."""
    per_sample: dict[str, int] = {}
    for f in frames:
        per_sample[f.sample_id] = per_sample.get(f.sample_id, 0) + f.n_verified
    if len(per_sample) < 2:
        raise UserError("adapt holds out whole samples for validation: it needs at least 2 signed samples")
    order = sorted(per_sample)
    np.random.default_rng(seed).shuffle(order)
    total, held, held_out = sum(per_sample.values()), 0, set()
    for sample_id in order:
        if held >= fraction * total or len(held_out) == len(order) - 1:
            break
        held_out.add(sample_id)
        held += per_sample[sample_id]
    return [f for f in frames if f.sample_id not in held_out], [f for f in frames if f.sample_id in held_out]


class Adapter(nn.Module):
    """The served CNN+GNN path with trainable parts chosen by mode ('head': embedding layer + GNN; 'full': all)."""

    def __init__(self, embedder: CropEmbedder, gnn: CellGraphNet, full: bool) -> None:
        super().__init__()
        self.embedder, self.gnn, self.full = embedder, gnn, full
        for p in self.embedder.features.parameters():
            p.requires_grad_(full)

    def train(self, mode: bool = True) -> Adapter:
        super().train(mode)
        for m in self.embedder.features.modules():  # BatchNorm statistics stay those of the base model
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def features(self, frame: VerifiedFrame) -> torch.Tensor:
        crops = crop_cells(torch.from_numpy(frame.image), torch.from_numpy(frame.boxes), size=self.embedder.crop_size)
        e = self.embedder
        with torch.set_grad_enabled(self.full and torch.is_grad_enabled()):
            return e.features(standardise_colour(crops))

    def logits(self, frame: VerifiedFrame, features: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.features(frame) if features is None else features
        embeddings = self.embedder.embed(feats)
        boxes = torch.from_numpy(frame.boxes)
        size = torch.tensor(frame.image.shape[:2], dtype=torch.float32)
        return self.gnn.forward_dense(self.gnn.node_inputs(embeddings, boxes, size), dense_mean_adjacency(boxes, size))


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    known = labels != IGNORE
    weights = torch.where(labels[known] < NUM_VERIFIED, 1.0, CONTEXT_LOSS_WEIGHT)
    losses = nn.functional.cross_entropy(logits[known], labels[known], reduction="none", label_smoothing=0.05)
    return (losses * weights).sum() / weights.sum().clamp(min=1e-6)


@torch.no_grad()
def verified_accuracy(model: Adapter, frames: list[VerifiedFrame]) -> dict[str, float | int]:
    """Accuracy (argmax over the verified classes of the served, calibrated probabilities, as the differential
    counts) on the verified cells, served path."""
    model.eval()
    truth, pred = [], []
    for frame in frames:
        verified = (frame.labels >= 0) & (frame.labels < NUM_VERIFIED)
        if not verified.any():
            continue
        probs = model.gnn.calibrated_probs(model.logits(frame)).numpy()
        truth += frame.labels[verified].tolist()
        pred += probs[verified][:, :NUM_VERIFIED].argmax(1).tolist()
    correct = sum(int(t == p) for t, p in zip(truth, pred))
    return {"cells": len(truth), "accuracy": correct / len(truth) if truth else 0.0}


def bccd_accuracy(embedder: CropEmbedder, gnn: CellGraphNet, data_root: str | None) -> float | None:
    """WBC node accuracy (CNN+GNN) on the project's held-out BCCD frames; None without the BCCD data."""
    from leukograph.client.contract import UNIDENTIFIED_THRESHOLD
    from leukograph.training.evaluate import Models, evaluate_bccd

    try:  # only the CNN+GNN row is read
        report = evaluate_bccd(Models.of_stages(embedder, gnn), data_root, UNIDENTIFIED_THRESHOLD)
    except UserError:
        return None
    return float(report["CNN+GNN"]["wbc_nodes"]["accuracy"])


def fine_tune(base: Path, train: list[VerifiedFrame], val: list[VerifiedFrame], full: bool, epochs: int,
              lr: float, seed: int, log=print,  # noqa: ANN001
              anchor: float = 0.0) -> tuple[CropEmbedder, CellGraphNet, list[dict]]:
    """Fine-tune a copy of the base weights; the epoch with the best held-out accuracy is kept. `anchor` > 0 pulls
    the trained weights towards the base ones (L2-SP: `anchor` times the summed squared distance, in place of weight
    decay), which keeps more of the base microscope's accuracy and learns less of the new one."""
    torch.manual_seed(seed)
    embedder, gnn, _ = load_models(base)
    model = Adapter(embedder, gnn, full)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0 if anchor else 1e-4)
    cached = None if full else [model.features(f).detach() for f in train]  # frozen features: computed once
    history = [{"epoch": 0, "val": verified_accuracy(model, val)}]
    best = (history[0]["val"]["accuracy"], {k: v.clone() for k, v in model.state_dict().items()})
    rng = np.random.default_rng(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        total = 0.0
        for i in rng.permutation(len(train)):
            logits = model.logits(train[i], None if cached is None else cached[i])
            loss = _loss(logits, torch.from_numpy(train[i].labels))
            if anchor:
                loss = loss + anchor * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        score = verified_accuracy(model, val)
        history.append({"epoch": epoch, "loss": total / max(len(train), 1), "val": score})
        log(f"epoch {epoch}: loss {total / max(len(train), 1):.3f}, held-out accuracy {score['accuracy']:.3f}")
        if score["accuracy"] > best[0]:
            best = (score["accuracy"], {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[1])
    return model.embedder.eval(), model.gnn.eval(), history


def save_weights(embedder: CropEmbedder, gnn: CellGraphNet, base: Path, out: Path, info: dict) -> str:
    """cnn.pt + gnn.pt (same configs as the base) and adapt.json; returns the served version id."""
    from leukograph.deploy.model_repository import weights_id

    out.mkdir(parents=True, exist_ok=True)
    for model, name in ((embedder, CNN_FILE), (gnn, GNN_FILE)):
        ckpt = load_checkpoint(base / name)
        save_checkpoint(out / name, model, None, int(ckpt.get("epoch", 0)), {"adapted_from": str(base), **info},
                        {"adapt": info.get("metrics", {})}, ckpt["config"])
    version = weights_id(out)
    (out / "adapt.json").write_text(json.dumps({"version": version, **info}, indent=2) + "\n")
    return version


def export_to_repository(weights: Path, repository: Path) -> str:
    """Export the weights into a model repository (ONNX + configs + version.json) as `leukograph export` and
    `generate-repo` do, with $LEUKOGRAPH_WEIGHTS naming them so the ensemble config carries their version."""
    from leukograph.deploy.model_repository import backend_of, weights_id

    env = {**os.environ, WEIGHTS_ENV: str(weights.resolve())}
    cli = [sys.executable, "-m", "leukograph.client.cli"]
    for args in (["export", "--weights", str(weights), "--model-repository", str(repository)],
                 ["generate-repo", "--backend", backend_of(repository), "--model-repository", str(repository)]):
        done = subprocess.run([*cli, *args], env=env, capture_output=True, text=True, cwd=REPO_ROOT)
        if done.returncode:
            raise UserError(f"`leukograph {args[0]}` failed: {done.stderr.strip().splitlines()[-1:]}")
    return weights_id(weights)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from leukograph.client.records import DEFAULT_DB

    parser = argparse.ArgumentParser(description="Fine-tune on the verified white cells of signed samples",
                                     add_help=add_help)
    parser.add_argument("--db", default=DEFAULT_DB, help=f"result database (default ./{DEFAULT_DB})")
    parser.add_argument("--samples", nargs="+", default=None, help="signed samples to use (default: all signed)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="base weights (cnn.pt, gnn.pt)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the new weights (default runs/adapt/<time>)")
    parser.add_argument("--model-repository", type=Path, default=None,
                        help="also export the new weights into this Triton model repository and make the server "
                        "at --server load them")
    parser.add_argument("--server", default="127.0.0.1:8001",
                        help="gRPC address of the `leukograph serve` running on --model-repository "
                        "(default 127.0.0.1:8001)")
    parser.add_argument("--no-reload", action="store_true",
                        help="export only; the server keeps serving the weights it has loaded")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--full-cnn", action="store_true",
                        help=f"fine-tune the whole CNN even below {FULL_CNN_MIN} training cells")
    parser.add_argument("--head-only", action="store_true",
                        help="fine-tune only the CNN embedding layer and the GNN, whatever the cell count")
    parser.add_argument("--anchor", type=float, default=0.0,
                        help="pull the weights towards the base ones (L2-SP strength; default 0: learn this "
                        "microscope as well as possible). A lab that also runs the base model's microscope can keep "
                        "more of its accuracy, at a cost on its own (README, \"Measured on PBC as a new lab\")")
    parser.add_argument("--holdout", type=float, default=HOLDOUT_FRACTION, help="fraction of cells held out")
    parser.add_argument("--min-cells", type=int, default=MIN_VERIFIED)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None, help="datasets root (for the held-out BCCD check)")
    parser.add_argument("--skip-bccd", action="store_true", help="skip the held-out BCCD check")
    parser.add_argument("--threads", type=int, default=None)
    return parser


def run(args: argparse.Namespace, log=print) -> dict:  # noqa: ANN001
    if not 0 < args.holdout < 1:
        raise UserError("--holdout must be in (0, 1)")
    if args.epochs < 1:
        raise UserError("--epochs must be >= 1")
    if args.anchor < 0:
        raise UserError("--anchor must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    db = Path(args.db)
    frames = load_verified_frames(db, args.samples)
    total = sum(f.n_verified for f in frames)
    if total < args.min_cells:
        raise UserError(f"{total} verified white cells in signed samples; adapt needs at least {args.min_cells}")
    train, val = split_by_sample(frames, args.holdout, args.seed)
    n_train, n_val = sum(f.n_verified for f in train), sum(f.n_verified for f in val)
    if n_train < args.min_cells:
        raise UserError(f"{n_train} verified training cells after holding out {n_val}; adapt needs at least "
                        f"{args.min_cells}")
    full = not getattr(args, "head_only", False) and (args.full_cnn or n_train >= FULL_CNN_MIN)
    log(f"adapt: {n_train} training and {n_val} held-out verified cells from {len({f.sample_id for f in frames})} "
        f"samples; fine-tuning {'the whole CNN and the GNN' if full else 'the CNN embedding layer and the GNN'}")
    started = time.perf_counter()
    base_embedder, base_gnn, _ = load_models(args.weights)
    before = {"held_out": verified_accuracy(Adapter(base_embedder, base_gnn, False), val)}
    embedder, gnn, history = fine_tune(args.weights, train, val, full, args.epochs, args.lr, args.seed, log,
                                       args.anchor)
    after = {"held_out": verified_accuracy(Adapter(embedder, gnn, False), val)}
    if not args.skip_bccd:
        before["bccd_held_out"] = bccd_accuracy(base_embedder, base_gnn, args.data_root)
        after["bccd_held_out"] = bccd_accuracy(embedder, gnn, args.data_root)
    from leukograph.deploy.model_repository import weights_id

    info = {"base_version": weights_id(args.weights), "samples": sorted({f.sample_id for f in frames}),
            "held_out_samples": sorted({f.sample_id for f in val}), "train_cells": n_train, "held_out_cells": n_val,
            "mode": "full" if full else "head+gnn", "epochs": args.epochs, "lr": args.lr, "anchor": args.anchor,
            "seed": args.seed,
            "metrics": {"before": before, "after": after}, "history": history,
            "seconds": round(time.perf_counter() - started, 1)}
    out = args.out or REPO_ROOT / "runs" / "adapt" / time.strftime("%Y%m%d-%H%M%S")
    info["version"] = save_weights(embedder, gnn, args.weights, out, info)
    info["weights"] = str(out)
    if args.model_repository is not None:
        info["served_version"] = export_to_repository(out, args.model_repository)
        if not args.no_reload:
            info["reload"] = reload_server(args.server, info["served_version"])
    return info


def reload_server(url: str, version: str) -> dict:
    """Make the server at url load the exported weights (`deploy.server.reload_pipeline`) and check it serves
    `version`. {"server": None} when no server listens there."""
    from leukograph.client.triton_client import PipelineError, TritonPipelineClient
    from leukograph.deploy.server import reload_pipeline

    try:
        client = TritonPipelineClient(url, "grpc", request_timeout_s=5.0)
    except Exception:  # noqa: BLE001 - nothing to connect to
        return {"server": None}
    try:
        if not client.is_ready():
            return {"server": None}
        unavailable_s = reload_pipeline(url)
        try:
            served = client.fetch_weights_id()
        except PipelineError as exc:
            raise UserError(f"{url} reloaded but its served weights id cannot be read: {exc}") from None
    finally:
        client.close()
    if served != version:
        raise UserError(f"{url} now serves {served}, not the exported {version}: is it serving the repository "
                        "given as --model-repository?")
    return {"server": url, "unavailable_s": round(unavailable_s, 2), "serves": served}


def main(args: argparse.Namespace) -> int:
    info = run(args)
    b, a = info["metrics"]["before"], info["metrics"]["after"]
    print(f"held-out verified cells ({a['held_out']['cells']}): accuracy {b['held_out']['accuracy']:.3f} -> "
          f"{a['held_out']['accuracy']:.3f}")
    if "bccd_held_out" in a and a["bccd_held_out"] is not None:
        print(f"held-out BCCD frames (WBC nodes): accuracy {b['bccd_held_out']:.3f} -> {a['bccd_held_out']:.3f}")
    print(f"new weights {info['version']} in {info['weights']}")
    reload = info.get("reload") or {}
    if reload.get("server"):
        print(f"exported to {args.model_repository}; the server at {reload['server']} now serves {reload['serves']} "
              f"(pipeline unavailable for {reload['unavailable_s']:.1f} s while it loaded)")
    elif "served_version" in info:
        print(f"exported to {args.model_repository} ({info['served_version']}); no server ready at {args.server}: "
              "the next `leukograph serve` serves them")
    else:
        print(f"serve them: leukograph adapt ... --model-repository DIR, or LEUKOGRAPH_WEIGHTS={info['weights']} "
              "leukograph serve")
    return 0
