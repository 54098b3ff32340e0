"""`leukograph evaluate`: the seed baseline, CNN-only and CNN+GNN side by side on held-out data.

Reports (JSON, markdown, confusion-matrix PNGs):
* 4-class TEST (2,487 augmented images of 70 held-out frames), per image and per source frame;
* TEST_SIMPLE (71 un-augmented images);
* BCCD held-out frames: node accuracy of WBC, RBC and platelet nodes matched to VOC boxes.

The image-level decision of our models is `train.image_prediction`: the most WBC-like cell's WBC class.
An image where the localiser finds no cell counts as wrong ("no cell found").
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
)

from leukograph.client.boxes import box_iou, greedy_pairs  # noqa: E402
from leukograph.client.contract import CLASSES, WBC_CLASSES  # noqa: E402
from leukograph.deploy.paths import REPO_ROOT, WEIGHTS_DIR  # noqa: E402
from leukograph.deploy.readme import replace_section  # noqa: E402
from leukograph.training.cells import FrameCells, build_cells  # noqa: E402
from leukograph.training.checkpoints import load_baseline, load_models  # noqa: E402
from leukograph.training.datasets import load_bccd, load_four_class, split_frames  # noqa: E402
from leukograph.training.models import CellGraphStage  # noqa: E402
from leukograph.training.train import baseline_images, embed_frames, image_prediction  # noqa: E402

NO_CELL = "no cell found"
MODELS = ("seed baseline", "CNN only", "CNN+GNN")
RESULTS_DIR = REPO_ROOT / "docs" / "results"


def classification_metrics(y_true: list[int], y_pred: list[int], class_names: tuple[str, ...]) -> dict:
    """Accuracy, macro-F1 and per-class precision, recall, F1, specificity and support (scikit-learn).
    Predictions outside class_names (e.g. -1, no cell found) count as errors."""
    labels = list(range(len(class_names)))
    y_true_arr, y_pred_arr = np.asarray(y_true), np.asarray(y_pred)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true_arr, y_pred_arr, labels=labels, zero_division=0)
    per_class_cm = multilabel_confusion_matrix(y_true_arr, y_pred_arr, labels=labels)
    specificity = [float(tn / (tn + fp)) if tn + fp else 0.0 for (tn, fp), _ in per_class_cm]
    return {
        "n": int(len(y_true_arr)),
        "accuracy": float(accuracy_score(y_true_arr, y_pred_arr)) if len(y_true_arr) else 0.0,
        "macro_f1": float(f1_score(y_true_arr, y_pred_arr, labels=labels, average="macro", zero_division=0)),
        "no_cell_found": int((y_pred_arr < 0).sum()),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "specificity": specificity[i], "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion": confusion_matrix(y_true_arr, y_pred_arr, labels=[*labels, -1]).tolist(),
    }


class Models:
    """The three models, loaded once."""

    def __init__(self, weights_dir: Path) -> None:
        embedder, gnn, self.meta = load_models(weights_dir)
        self.embedder = embedder
        self.graph = CellGraphStage(gnn).eval()
        self.baseline = load_baseline(weights_dir)

    @torch.no_grad()
    def cell_probs(self, frames: list[FrameCells]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(CNN-only probs, CNN+GNN probs) per frame; the GNN runs in its served dense form."""
        cnn, gnn = [], []
        for frame, (embeddings, probs) in zip(frames, embed_frames(self.embedder, frames)):
            cnn.append(probs)
            if len(frame.boxes) == 0:
                gnn.append(probs)
                continue
            graph_probs, _ = self.graph(torch.from_numpy(embeddings).float(), torch.from_numpy(frame.boxes),
                                        torch.tensor(frame.frame_size, dtype=torch.float32))
            gnn.append(graph_probs.numpy())
        return cnn, gnn

    @torch.no_grad()
    def baseline_predictions(self, paths: list[Path], batch: int = 256) -> list[int]:
        out: list[int] = []
        for start in range(0, len(paths), batch):
            out += self.baseline(baseline_images(paths[start:start + batch])).argmax(1).tolist()
        return out


def evaluate_four_class(models: Models, split: str, data_root: str | None) -> dict:
    items = load_four_class(data_root, split)
    frames = build_cells(items, f"4class-{split.lower()}")
    cnn, gnn = models.cell_probs(frames)
    truth = [CLASSES.index(item.label) for item in items]
    predictions = {
        "seed baseline": models.baseline_predictions([item.path for item in items]),
        "CNN only": [image_prediction(p)[0] for p in cnn],
        "CNN+GNN": [image_prediction(p)[0] for p in gnn],
    }
    report: dict = {"images": {name: classification_metrics(truth, pred, WBC_CLASSES)
                               for name, pred in predictions.items()}}
    # Per source frame: the majority vote of the frame's images against the frame's label.
    by_frame: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_frame[item.source_frame].append(index)
    frame_truth = [truth[indices[0]] for indices in by_frame.values()]
    report["frames"] = {}
    report["wrong_frames"] = {}
    for name, pred in predictions.items():
        votes = [Counter(pred[i] for i in indices).most_common(1)[0][0] for indices in by_frame.values()]
        metrics = classification_metrics(frame_truth, votes, WBC_CLASSES)
        per_frame_acc = [float(np.mean([pred[i] == truth[i] for i in indices])) for indices in by_frame.values()]
        metrics["mean_per_frame_accuracy"] = float(np.mean(per_frame_acc))
        report["frames"][name] = metrics
        report["wrong_frames"][name] = [
            {"frame": frame, "label": WBC_CLASSES[truth[indices[0]]], "images": len(indices),
             "accuracy": acc, "predicted": WBC_CLASSES[vote] if vote >= 0 else NO_CELL}
            for (frame, indices), acc, vote in zip(by_frame.items(), per_frame_acc, votes) if acc < 0.5]
    return report


def evaluate_bccd(models: Models, data_root: str | None) -> dict:
    """Node accuracy on held-out BCCD frames, for localised cells matched (IoU >= 0.5) to a labelled VOC box."""
    held = split_frames(data_root).held_out
    frames_meta = [f for f in load_bccd(data_root) if f.frame_id in held]
    frames = build_cells(frames_meta, "bccd-heldout")
    cnn, gnn = models.cell_probs(frames)
    truth: dict[str, list[int]] = {"wbc": [], "context": []}
    preds: dict[str, dict[str, list[int]]] = {m: {"wbc": [], "context": []} for m in ("CNN only", "CNN+GNN")}
    for meta, frame, cnn_p, gnn_p in zip(frames_meta, frames, cnn, gnn):
        gt_boxes = np.array([b.box for b in meta.boxes], np.float32).reshape(-1, 4)
        for det, gt in greedy_pairs(box_iou(frame.boxes, gt_boxes), 0.5):
            label = meta.boxes[gt].label
            if label not in CLASSES:
                continue
            group = "wbc" if label in WBC_CLASSES else "context"
            truth[group].append(CLASSES.index(label))
            for name, probs in (("CNN only", cnn_p), ("CNN+GNN", gnn_p)):
                row = probs[det]
                preds[name][group].append(int(np.argmax(row[:len(WBC_CLASSES)])) if group == "wbc"
                                          else int(np.argmax(row)))
    report = {"frames": len(frames)}
    for name in preds:
        context_truth, context_pred = truth["context"], preds[name]["context"]
        report[name] = {
            "wbc_nodes": classification_metrics(truth["wbc"], preds[name]["wbc"], WBC_CLASSES),
            "rbc_node_accuracy": _accuracy_of(context_truth, context_pred, CLASSES.index("rbc")),
            "platelet_node_accuracy": _accuracy_of(context_truth, context_pred, CLASSES.index("platelet")),
            "rbc_nodes": sum(t == CLASSES.index("rbc") for t in context_truth),
            "platelet_nodes": sum(t == CLASSES.index("platelet") for t in context_truth),
        }
    return report


def _accuracy_of(truth: list[int], pred: list[int], cls: int) -> float:
    pairs = [(t, p) for t, p in zip(truth, pred) if t == cls]
    return float(np.mean([t == p for t, p in pairs])) if pairs else 0.0


def plot_confusion(metrics: dict, title: str, path: Path) -> None:
    matrix = np.array(metrics["confusion"])
    has_missing = matrix[:, -1].sum() > 0
    names = [*WBC_CLASSES, NO_CELL]
    shown = matrix[:len(WBC_CLASSES), :] if has_missing else matrix[:len(WBC_CLASSES), :len(WBC_CLASSES)]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    display = ConfusionMatrixDisplay(shown, display_labels=names[:shown.shape[1]])
    display.plot(ax=ax, colorbar=False, values_format="d")
    if has_missing:
        ax.set_yticks(range(len(WBC_CLASSES)), WBC_CLASSES)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    four, simple, bccd = report["4class_test"], report["4class_test_simple"], report["bccd_heldout"]
    lines = [
        "| model | 4-class TEST acc (2,487 images) | macro-F1 | per source frame acc (frames) | macro-F1 "
        "| TEST_SIMPLE acc (71) | BCCD held-out WBC node acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        img, frm, sim = four["images"][name], four["frames"][name], simple["images"][name]
        wbc = bccd.get(name, {}).get("wbc_nodes")
        wbc_text = f"{wbc['accuracy']:.1%} ({wbc['n']})" if wbc else "n/a (whole-image model)"
        lines.append(f"| {name} | {img['accuracy']:.1%} | {img['macro_f1']:.3f} | {frm['accuracy']:.1%} ({frm['n']}) "
                     f"| {frm['macro_f1']:.3f} | {sim['accuracy']:.1%} | {wbc_text} |")
    lines += ["", "Per class on 4-class TEST images (CNN+GNN):", "",
              "| class | precision | recall | F1 | specificity | support |", "|---|---|---|---|---|---|"]
    for cls, m in four["images"]["CNN+GNN"]["per_class"].items():
        lines.append(f"| {cls} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['specificity']:.3f} "
                     f"| {m['support']} |")
    wrong = four.get("wrong_frames", {}).get("CNN+GNN", [])
    if wrong:
        total = four["images"]["CNN+GNN"]["n"]
        lines += ["", f"Source frames of 4-class TEST that CNN+GNN gets wrong on most of their images ({len(wrong)} of "
                  f"{four['frames']['CNN+GNN']['n']}); each costs its share of the 2,487 images:", "",
                  "| frame | class | images | share of TEST | image accuracy | majority prediction |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {w['frame']} | {w['label']} | {w['images']} | {w['images'] / total:.1%} | {w['accuracy']:.0%} "
                  f"| {w['predicted']} |" for w in sorted(wrong, key=lambda w: -w["images"])]
    for name in ("CNN only", "CNN+GNN"):
        b = bccd[name]
        lines.append("")
        lines.append(f"BCCD held-out context nodes, {name}: RBC {b['rbc_node_accuracy']:.1%} ({b['rbc_nodes']}), "
                     f"platelet {b['platelet_node_accuracy']:.1%} ({b['platelet_nodes']}).")
    return "\n".join(lines) + "\n"


def model_card(report: dict, train_summary: dict | None) -> str:
    """training/weights/MODEL_CARD.md: what the committed weights are, how they were made and how they measure."""
    val = {name: meta.get("val") or {} for name, meta in report["weights"].items()}
    seconds = f"{train_summary['seconds']:.0f} s" if train_summary else "unknown"
    return "\n".join([
        "# Model card: leukograph CNN crop embedder + cell-graph GNN (and the seed baseline)", "",
        "Generated by `leukograph evaluate` from the committed weights; do not edit by hand.", "",
        "## What", "",
        "- `cnn.pt`: `CropEmbedder`, a 6-conv VGG-style CNN on 64x64 RGB crops (box + 15% margin, square, cut in-graph "
        "by `crop_cells`) -> 64-d embedding and 6-class logits.",
        "- `gnn.pt`: `CellGraphNet`, GraphSAGE (mean, 2 layers) over each frame's 5-nearest-neighbour cell graph; node "
        "input = CNN embedding + geometry (size relative to the frame's median cell, aspect, position). Classes: "
        "neutrophil, eosinophil, lymphocyte, monocyte, rbc, platelet. No basophil class (3 BCCD frames).",
        "- `baseline.pt`: the seed paper's model (whole image at 64x64, conv32-pool-conv64-pool + dense side branch, "
        "dense 128, 4 classes), reproduced for comparison.", "",
        "## Data and split", "",
        "BCCD frames and blood-cells-4class TRAIN images whose source frame is not held out. Held out: the 73 frames "
        "behind 4-class TEST/TEST_SIMPLE (never trained on, never used for model selection). Validation: 44 frames "
        "carved from the training frames, grouped by frame and stratified by class; model selection = best validation "
        "macro-F1 over epochs.", "",
        "## Training", "",
        f"`leukograph train` (seed 0, CPU) took {seconds} wall time in the run that produced these weights. "
        f"Validation at the selected epochs: CNN image accuracy {val.get('cnn', {}).get('image_accuracy', 0):.1%}, "
        f"CNN+GNN {val.get('gnn', {}).get('image_accuracy', 0):.1%}.", "",
        "## Held-out results (`leukograph evaluate`)", "", markdown(report),
        "## Limits", "",
        "- 4-class TEST has 2,487 images but only ~70 independent source frames (4 monocyte frames), so one frame can "
        "move the image accuracy by several points; the per-frame column is the honest sample size.",
        "- One microscope and stain (BCCD). Expect lower accuracy on other cameras and stains until re-trained.",
        "- Low-confidence WBCs go to the review list (`--threshold`); a technologist verifies every result.", ""])


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate the three models on held-out data", add_help=add_help)
    parser.add_argument("--data-root", default=None, help="datasets (default $LEUKOGRAPH_DATA, ../shared/datasets)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR,
                        help="where results go; the README table is rewritten only for the default")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    started = time.time()
    models = Models(args.weights)
    report = {
        "4class_test": evaluate_four_class(models, "TEST", args.data_root),
        "4class_test_simple": evaluate_four_class(models, "TEST_SIMPLE", args.data_root),
        "bccd_heldout": evaluate_bccd(models, args.data_root),
        "weights": {k: {"epoch": v["epoch"], "val": v["metrics"].get("val")} for k, v in models.meta.items()},
        "command": "leukograph evaluate",
        "seconds": round(time.time() - started, 1),
    }
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "evaluation.md").write_text(markdown(report))
    for name in MODELS:
        slug = name.lower().replace(" ", "_").replace("+", "_")
        plot_confusion(report["4class_test"]["images"][name], f"{name}: 4-class TEST images",
                       out / f"confusion_{slug}.png")
    print(markdown(report))
    if args.output_dir.resolve() == RESULTS_DIR.resolve():
        summary_path = args.weights / "train_summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        (args.weights / "MODEL_CARD.md").write_text(model_card(report, summary))
        replace_section("eval", "Generated by `leukograph evaluate` from `docs/results/evaluation.json`.\n\n"
                        + markdown(report))
    print(f"wrote {out}/evaluation.json, evaluation.md and confusion PNGs ({report['seconds']:.0f} s)")
    return 0
