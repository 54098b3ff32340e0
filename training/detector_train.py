"""`leukograph train-detector`: train the CenterNet-style cell detector on BCCD training frames and TXL-PBC.

Fixed seed, a fixed number of steps (cosine learning rate), a checkpoint every `--checkpoint-every` steps that
`--resume` continues from, and `--device` (cpu / cuda) so the same command runs on a GPU. Loss: CenterNet's
penalty-reduced focal loss on the kind heatmaps (negatives of untrusted kinds masked, see `detector_data`), L1 on
log size and centre offset at each box centre. The released weights go to `training/weights/detector.pt`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from leukograph.client.errors import UserError
from leukograph.deploy.paths import WEIGHTS_DIR
from leukograph.training.augment import optics, stain
from leukograph.training.detector import DETECTOR_WEIGHTS, NUM_KINDS, CellDetector, working_view
from leukograph.training.detector_data import DetectionSample, make_targets, random_view, training_samples

# Share of each batch per source: the full frames (BCCD, BCDD) carry the RBC/platelet context, the single-cell crops
# (PBC, Raabin-WBC) the white-cell variety.
SOURCE_SHARE = {"BCCD": 0.4, "BCDD": 0.15, "PBC": 0.2, "Raabin-WBC": 0.25}
SIZE_WEIGHT = 1.0
OFFSET_WEIGHT = 1.0
AUGMENT_STRENGTH = 0.8


def focal_loss(logits: torch.Tensor, heat: torch.Tensor, trusted: torch.Tensor) -> torch.Tensor:
    """CenterNet focal loss (alpha 2, beta 4), normalised by the number of centres; untrusted negatives masked."""
    prob = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    positive = heat.eq(1).float()
    pos_loss = -torch.log(prob) * (1 - prob) ** 2 * positive
    neg_loss = -torch.log(1 - prob) * prob ** 2 * (1 - heat) ** 4 * (1 - positive)
    neg_loss = neg_loss * trusted[:, :, None, None]
    return (pos_loss.sum() + neg_loss.sum()) / positive.sum().clamp(min=1)


def detection_loss(head: torch.Tensor, targets, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    heat = torch.from_numpy(targets.heat).to(device)
    trusted = torch.from_numpy(targets.trusted.astype(np.float32)).to(device)
    focal = focal_loss(head[:, :NUM_KINDS], heat, trusted)
    if len(targets.batch_index):
        regression = head[:, NUM_KINDS:].flatten(2)  # [B, 4, h*w]
        picked = regression[torch.from_numpy(targets.batch_index).to(device), :,
                            torch.from_numpy(targets.pixel_index).to(device)]  # [n, 4]
        wanted = torch.from_numpy(targets.regression).to(device)
        size = torch.nn.functional.l1_loss(picked[:, :2], wanted[:, :2])
        offset = torch.nn.functional.l1_loss(picked[:, 2:], wanted[:, 2:])
    else:
        size = offset = head.sum() * 0
    loss = focal + SIZE_WEIGHT * size + OFFSET_WEIGHT * offset
    return loss, {"focal": focal.item(), "size": size.item(), "offset": offset.item()}


class BatchMaker:
    """Random batches by source share; uint8 views stacked, converted to float and stain/optics-augmented per batch."""

    def __init__(self, samples: list[DetectionSample], seed: int) -> None:
        self.samples = samples
        sources = sorted({s.source for s in samples})
        share = np.array([SOURCE_SHARE.get(s, 0.1) for s in sources])
        count = {src: sum(s.source == src for s in samples) for src in sources}
        self.weights = np.array([share[sources.index(s.source)] / count[s.source] for s in samples])
        self.weights /= self.weights.sum()
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "generator": self.generator.get_state()}

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])

    def batch(self, size: int) -> tuple[torch.Tensor, object]:
        chosen = self.rng.choice(len(self.samples), size=size, p=self.weights)
        views, boxes, kinds = zip(*(random_view(self.samples[i], self.rng) for i in chosen))
        trusted = np.stack([self.samples[i].trusted for i in chosen])
        x = working_view(torch.from_numpy(np.stack(views)))
        x = optics(stain(x, self.generator, AUGMENT_STRENGTH), self.generator, AUGMENT_STRENGTH)
        return x, make_targets(list(boxes), list(kinds), trusted)


def _save(path: Path, model: CellDetector, extra: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}, path)


def train(args: argparse.Namespace) -> Path | None:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda given, but torch sees no CUDA device")
    samples = training_samples(args.data_root, args.limit)
    if not samples:
        raise UserError("no training samples found")
    sources = {src: sum(s.source == src for s in samples) for src in sorted({s.source for s in samples})}
    print(f"training samples: {len(samples)} {sources}")
    model = CellDetector().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps,
                                                    pct_start=0.05)
    maker = BatchMaker(samples, args.seed)
    run_dir = Path(args.run_dir)
    checkpoint = run_dir / "last.pt"
    start, history = 0, []
    if args.resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        maker.load_state(state["batches"])
        start, history = state["step"], state["history"]
        print(f"resumed at step {start}")
    model.train()
    began = time.perf_counter()
    progress = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="detector", mininterval=5)
    running: dict[str, float] = {}
    for step in progress:
        x, targets = maker.batch(args.batch_size)
        loss, parts = detection_loss(model(x.to(device)), targets, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        scheduler.step()
        for key, value in parts.items():
            running[key] = 0.95 * running.get(key, value) + 0.05 * value
        progress.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
        out_of_time = args.max_minutes is not None and time.perf_counter() - began > args.max_minutes * 60
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps or out_of_time:
            history.append({"step": step + 1, **running})
            _save(checkpoint, model, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                      "batches": maker.state(), "step": step + 1, "history": history})
        if out_of_time and step + 1 < args.steps:
            progress.close()
            print(f"stopped at step {step + 1} of {args.steps} (--max-minutes); continue with --resume")
            return None
    minutes = (time.perf_counter() - began) / 60
    out = Path(args.out)
    _save(out, model, {"config": {}, "meta": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                                               "seed": args.seed, "samples": sources}})
    summary = {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "device": str(device),
               "minutes_this_run": round(minutes, 2), "samples": sources, "history": history}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out} ({minutes:.1f} min this run)")
    return out


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the learned cell detector", add_help=add_help)
    parser.add_argument("--data-root", default=None, help="datasets folder (default $LEUKOGRAPH_DATA)")
    parser.add_argument("--steps", type=int, default=750, help="optimiser steps (the released weights: 750)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--limit", type=int, default=None, help="use only this many training images (smoke test)")
    parser.add_argument("--run-dir", default="runs/detector", help="checkpoints and summary")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true", help="continue from run-dir/last.pt")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="time box: checkpoint and stop after this many minutes (continue with --resume)")
    parser.add_argument("--out", default=str(WEIGHTS_DIR / DETECTOR_WEIGHTS), help="released weights")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.batch_size < 1:
        raise UserError("--steps and --batch-size must be positive")
    torch.set_num_threads(args.threads)
    train(args)
    return 0
