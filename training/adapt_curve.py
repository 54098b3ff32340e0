"""The adapt curve: PBC (a CellaVision DM96 in Barcelona) treated as a new lab.

`python -m leukograph.training.adapt_curve` (writes docs/adapt/adapt_pbc.json)

1. Split each WBC class of `../shared/datasets/pbc` (the contract's WBC classes found there) by a seeded shuffle into
   a pool for verification (200 images a class) and the rest for measuring.
2. Record every image through the real Triton server as the stream does (localiser, `leukocyte_pipeline`, the review
   threshold, `keep_frame_images`, `ResultStore.record_frame`; one image per frame, no tracking since the images are
   unrelated), the pool as samples of 5 images a class.
3. Verify the pool as a reviewer would, through the same `ReviewStore` calls the page makes: the cell nearest the
   image centre gets the folder's class, the other white/unidentified cells of the image are marked
   smudge/unclassifiable (the reviewer knows only the centre cell), then sign off.
4. For k in 0, 25, 50, 100, 200 verified cells a class: `leukograph adapt` on the first k/5 samples (20% of them held
   out by sample, as adapt does), then accuracy on the centre cells of the measuring images, served path.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from leukograph.client.contract import CLASSES, UNIDENTIFIED, WBC_CLASSES
from leukograph.client.differential import DEFAULT_THRESHOLD, label_cells
from leukograph.client.images import read_image
from leukograph.client.localize import localize
from leukograph.client.records import CellRecord, ResultStore
from leukograph.client.review_store import SMUDGE, ReviewStore, keep_frame_images
from leukograph.client.triton_client import TritonPipelineClient
from leukograph.deploy.paths import MODEL_REPOSITORY, WEIGHTS_DIR, data_root

PER_SAMPLE = 5  # images a class in one verified sample
POOL = 200  # images a class that may be verified
CURVE = (0, 25, 50, 100, 200)
REVIEWER = "PBC reference labels"
DEFAULT_OUT = Path("docs/adapt/adapt_pbc.json")


def split_pbc(root: Path, seed: int = 0) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    pool, test = {}, {}
    for name in WBC_CLASSES:
        files = sorted((root / name).glob("*.jpg"))
        if not files:
            continue
        random.Random(f"{seed}-{name}").shuffle(files)
        pool[name], test[name] = files[:POOL], files[POOL:]
    if not pool:
        raise SystemExit(f"no PBC class folders under {root}")
    return pool, test


def record_image(store: ResultStore, client: TritonPipelineClient, sample: str, index: int, path: Path) -> None:
    rgb = read_image(path)
    cells = localize(rgb)
    kinds = [("wbc", "rbc", "platelet")[int(k)] for k in cells.kinds]
    if len(cells):
        probs, _ = client.infer(rgb, cells.boxes.astype(np.float32))
        labels = label_cells(probs, DEFAULT_THRESHOLD, kinds)
    else:
        probs, labels = np.zeros((0, len(CLASSES)), np.float32), []
    records = [CellRecord(tuple(float(v) for v in box), kind, label, [float(p) for p in row])
               for box, kind, label, row in zip(cells.boxes, kinds, labels, probs)]
    keep_frame_images(store.path, sample, index, rgb, records, str(path))
    store.record_frame(sample, index, records, source=str(path), model_version=client.weights_id)


def centre_cell(review: ReviewStore, sample: str, frame_index: int, width: float, height: float):  # noqa: ANN201
    cells = [c for c in review.gallery(sample) if c.frame_index == frame_index]
    if not cells:
        return None, []
    def distance(c):  # noqa: ANN001, ANN202
        x1, y1, x2, y2 = c.box
        return ((x1 + x2) / 2 - width / 2) ** 2 + ((y1 + y2) / 2 - height / 2) ** 2
    cells.sort(key=distance)
    return cells[0], cells[1:]


def curve_markdown(results: dict) -> str:
    """The README table of the curve, from its JSON."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    lines = ["| verified cells a class | trained on (held out) | fine-tuned | PBC rest: accuracy | "
             "held-out verified: before -> after | held-out BCCD frames: before -> after | version |",
             "|---:|---|---|---:|---|---|---|"]
    for p in results["points"]:
        if p["per_class"] == 0:
            lines.append(f"| 0 | - | - (base model) | {pct(p['test']['accuracy'])} | - | - | base |")
            continue
        b, a = p["before"], p["after"]
        lines.append(f"| {p['per_class']} | {p['train_cells']} ({p['held_out_cells']}) | {p['mode']} | "
                     f"{pct(p['test']['accuracy'])} | {pct(b['held_out']['accuracy'])} -> "
                     f"{pct(a['held_out']['accuracy'])} | {pct(b['bccd_held_out'])} -> {pct(a['bccd_held_out'])} | "
                     f"`{p['version'].rsplit('-', 1)[-1]}` |")
    lines.append("")
    lines.append(f"PBC rest: the centre cell of each of the {results['test_images']} measuring images "
                 f"({results['test_images'] // len(WBC_CLASSES)} a class, never verified), served path, argmax over "
                 "the WBC classes. Accuracies in %.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path("runs/adapt_pbc/pbc.sqlite"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON (default %(default)s; only the "
                        "default rewrites the README's table)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--repository", type=Path, default=MODEL_REPOSITORY)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--cnn", choices=("auto", "head", "full"), default="head")
    parser.add_argument("--points", type=int, nargs="+", default=list(CURVE))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--anchor", type=float, default=0.0, help="`leukograph adapt --anchor` (L2-SP strength)")
    parser.add_argument("--readme-only", action="store_true", help="only rewrite the README table from --out")
    args = parser.parse_args()
    if args.readme_only:
        from leukograph.deploy.readme import replace_section

        replace_section("adapt-curve", curve_markdown(json.loads(args.out.read_text())))
        return 0

    from leukograph.deploy.server import TritonServer, ensure_exported, free_port
    from leukograph.training.adapt import Adapter, VerifiedFrame, run, verified_accuracy
    from leukograph.training.checkpoints import load_models

    pool, test = split_pbc(data_root() / "pbc", args.seed)
    args.db.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not args.db.exists():
        ensure_exported(args.repository, args.weights)
        with TritonServer(args.repository, http_port=free_port(), grpc_port=free_port(),
                          metrics_port=free_port()) as server, \
                TritonPipelineClient(server.grpc_url) as client, ResultStore(args.db) as store:
            client.wait_ready(60)
            n_samples = POOL // PER_SAMPLE
            for s in range(n_samples):
                sample = f"PBC-{s:03d}"
                store.start_sample(sample, 10_000, client.weights_id)
                for i, name in enumerate(WBC_CLASSES):
                    for j, path in enumerate(pool[name][s * PER_SAMPLE:(s + 1) * PER_SAMPLE]):
                        record_image(store, client, sample, i * PER_SAMPLE + j, path)
            store.start_sample("PBC-TEST", 10_000, client.weights_id)
            index = 0
            for name in WBC_CLASSES:
                for path in test[name]:
                    record_image(store, client, "PBC-TEST", index, path)
                    index += 1
        print(f"recorded in {time.perf_counter() - started:.0f} s", flush=True)
        with ReviewStore(args.db) as review:  # the reviewer, through the page's calls
            for s in range(POOL // PER_SAMPLE):
                sample = f"PBC-{s:03d}"
                for i, name in enumerate(WBC_CLASSES):
                    for j in range(PER_SAMPLE):
                        frame = i * PER_SAMPLE + j
                        meta = review.frame_image(sample, frame) if review._query(
                            "SELECT 1 FROM frame_images WHERE sample_id = ? AND frame_index = ?",
                            (sample, frame)) else None
                        if meta is None:
                            continue
                        centre, others = centre_cell(review, sample, frame, meta["width"], meta["height"])
                        if centre is not None:
                            review.relabel(sample, [((centre.frame_index, centre.cell_index), centre.version)],
                                           name, REVIEWER)
                        if others:
                            review.relabel(sample, [((c.frame_index, c.cell_index), c.version) for c in others],
                                           SMUDGE, REVIEWER)
                review.sign_off(sample, REVIEWER)

    # the measuring images: the centre cell of each, with its folder class
    test_frames, truth_names = [], [n for n in WBC_CLASSES for _ in test.get(n, [])]
    with ReviewStore(args.db) as review:
        from leukograph.client.review_store import decode_jpeg

        for frame_index, name in enumerate(truth_names):
            try:
                stored = review.frame_image("PBC-TEST", frame_index)
            except Exception:  # noqa: BLE001 - no white/unidentified cell found: counts as missed
                test_frames.append(None)
                continue
            cells = review.frame_cells("PBC-TEST", frame_index)
            boxes = np.array([c["box"] for c in cells], np.float32).reshape(-1, 4)
            centre, _ = centre_cell(review, "PBC-TEST", frame_index, stored["width"], stored["height"])
            labels = np.full(len(cells), -1, np.int64)
            if centre is not None:
                labels[[c["cell_index"] for c in cells].index(centre.cell_index)] = CLASSES.index(name)
            test_frames.append(VerifiedFrame("PBC-TEST", frame_index, decode_jpeg(stored["jpeg"]),
                                             boxes * stored["scale"], labels))
        served = [c for c in review.gallery("PBC-TEST")]
        unidentified = sum(c.pre_label == UNIDENTIFIED for c in served)
    measured = [f for f in test_frames if f is not None and (f.labels >= 0).any()]
    missed = len(truth_names) - len(measured)

    def test_accuracy(weights: Path) -> dict:
        embedder, gnn, _ = load_models(weights)
        score = verified_accuracy(Adapter(embedder, gnn, False), measured)
        return {**score, "images": len(truth_names), "no_centre_cell": missed,
                "accuracy_all_images": score["accuracy"] * score["cells"] / len(truth_names)}

    results = {"dataset": "pbc", "pool_per_class": POOL, "test_images": len(truth_names),
               "test_unidentified_by_threshold": unidentified, "base_weights": str(args.weights),
               "anchor": args.anchor, "points": []}
    for k in args.points:
        t0 = time.perf_counter()
        if k == 0:
            point = {"per_class": 0, "test": test_accuracy(args.weights)}
        else:
            samples = [f"PBC-{s:03d}" for s in range(k // PER_SAMPLE)]
            out = args.db.parent / f"weights-{k}"
            ns = argparse.Namespace(db=str(args.db), samples=samples, weights=args.weights, out=out,
                                    model_repository=None, epochs=args.epochs, lr=1e-3, anchor=args.anchor,
                                    full_cnn=args.cnn == "full",
                                    head_only=args.cnn == "head", holdout=0.2, min_cells=50, seed=args.seed,
                                    data_root=None, skip_bccd=False, threads=None)
            info = run(ns, log=lambda m: print(m, flush=True))
            point = {"per_class": k, "train_cells": info["train_cells"], "held_out_cells": info["held_out_cells"],
                     "mode": info["mode"], "version": info["version"], "before": info["metrics"]["before"],
                     "after": info["metrics"]["after"], "test": test_accuracy(out)}
        point["seconds"] = round(time.perf_counter() - t0, 1)
        results["points"].append(point)
        print(json.dumps(point), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.out == DEFAULT_OUT:  # other runs (--anchor, other points) write their JSON only
        from leukograph.deploy.readme import replace_section

        replace_section("adapt-curve", curve_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
