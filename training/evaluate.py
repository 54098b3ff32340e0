"""`leukograph evaluate`: the seed baseline, CNN-only and CNN+GNN side by side on every test source.

Reports (JSON, markdown, one confusion-matrix PNG per source):
* 4-class TEST (2,487 augmented images of 70 held-out frames), per image and per source frame;
* TEST_SIMPLE (71 un-augmented images);
* BCCD held-out frames: white-cell nodes and context (RBC, platelet) nodes matched to VOC boxes;
* PBC test (15% of each class, chosen by content hash): every class, per image;
* TXL-PBC test images of PBC origin that are not PBC files (their PBC class is known);
* calibration per source: expected calibration error (ECE) of the calibrated CNN+GNN, and the auto-accept share and
  accuracy at the "unidentified" threshold chosen on validation (training/weights/calibration.json).

Image-level decision (the one `leukograph classify` prints as `white_cell`): among the localiser's WBC boxes (all
cells when there is none), the cell with the largest probability over the nucleated classes; its class among the
five WBC classes (4-class, BCCD) or among the nucleated classes (PBC, which has IG and NRBC). PBC platelet images
are scored on the cell at the image centre. An image where the localiser finds no cell counts as wrong. (Where the
localiser finds no WBC box, `classify` goes on to search a zoomed-out field and then a centred square; here such an
image is scored on its cells as found. `leukograph framing` scores `classify`'s answer itself.)
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
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from leukograph.client.boxes import box_iou, greedy_pairs  # noqa: E402
from leukograph.client.contract import (
    CLASSES,
    LOCALIZERS,  # noqa: E402
    NUCLEATED_CLASSES,
    UNIDENTIFIED_THRESHOLD,
    WBC_CLASSES,
    white_cell_class,
)
from leukograph.client.errors import UserError  # noqa: E402
from leukograph.client.images import read_image  # noqa: E402
from leukograph.client.localize import WBC, localize  # noqa: E402
from leukograph.deploy.paths import MODEL_REPOSITORY, REPO_ROOT, WEIGHTS_DIR  # noqa: E402
from leukograph.deploy.readme import replace_section  # noqa: E402
from leukograph.training.cells import (  # noqa: E402
    DEFAULT_LOCALIZER,
    FrameCells,
    build_cells,
    centre_box_index,
    use_localizer,
)
from leukograph.training.checkpoints import load_baseline, load_models  # noqa: E402
from leukograph.training.datasets import load_bccd, load_four_class, load_pbc, load_txl, split_frames  # noqa: E402
from leukograph.training.embedding import embed_frames  # noqa: E402
from leukograph.training.heap import add_keep_freed_memory_argument, apply_keep_freed_memory  # noqa: E402
from leukograph.training.metrics import (  # noqa: E402
    auto_accept_curve,
    baseline_images,
    classification_metrics,
    expected_calibration_error,
    image_prediction,
    labelled_nucleated,
)
from leukograph.training.models import (  # noqa: E402
    BASELINE_CLASSES,
    CellGraphNet,
    CellGraphStage,
    CropEmbedder,
)
from leukograph.training.views import DIHEDRAL, VIEW_COUNTS, VIEW_SCALES, VIEWS, check_views, viewed_rows  # noqa: E402

NO_CELL = "no cell found"
SINGLE_VIEW_MODELS = ("CNN only", "CNN+GNN")  # the served crop only: what the stream records per cell


def views_model(views: int) -> str:
    """The row of CNN+GNN on embeddings averaged over `views` views (`training/views.py`)."""
    return f"CNN+GNN, {views} views"


VIEWS_MODEL = views_model(VIEWS)  # every flip and quarter-turn at every scale: classify's answer
RESULTS_DIR = REPO_ROOT / "docs" / "results"
FRAMING_REPORT = RESULTS_DIR / "framing.json"  # `leukograph framing --split test`: the model card reads it
NUM_WBC, NUM_NUCLEATED = len(WBC_CLASSES), len(NUCLEATED_CLASSES)
PBC_TEST_CLASSES = (*NUCLEATED_CLASSES, "platelet")


class Models:
    """The three models, loaded once; cell probabilities are calibrated with calibration.json's temperatures.
    With `views` > 1, CNN+GNN is also scored on the embeddings averaged over each crop's first `views` views (its row:
    `views_model(views)`)."""

    def __init__(self, weights_dir: Path, views: int = VIEWS, baseline: bool = True) -> None:
        embedder, gnn, self.meta = load_models(weights_dir)
        self.embedder = embedder
        self.graph = CellGraphStage(gnn).eval()  # gnn.temperature is inside (served PROBS are calibrated)
        self.cnn_temperature = float(self.meta["calibration"].get("cnn_temperature", 1.0))
        self.baseline = load_baseline(weights_dir) if baseline else None
        self.views = check_views(views)

    @property
    def cell_models(self) -> tuple[str, ...]:
        """The cell-level models `cell_probs` answers for."""
        return (*SINGLE_VIEW_MODELS, views_model(self.views)) if self.views > 1 else SINGLE_VIEW_MODELS

    @classmethod
    def of_stages(cls, embedder: CropEmbedder, gnn: CellGraphNet, views: int = 1) -> Models:
        """The two served stages only, uncalibrated CNN (no baseline, no weights folder)."""
        models = cls.__new__(cls)
        models.embedder, models.graph, models.cnn_temperature = embedder.eval(), CellGraphStage(gnn).eval(), 1.0
        models.views = check_views(views)
        return models

    @torch.no_grad()
    def cell_probs(self, frames: list[FrameCells], stain_strength: float = 0.0) -> dict[str, list[np.ndarray]]:
        """Probabilities per frame for each of `cell_models`; the GNN runs in its served dense form."""
        served_embeddings = self.embed(frames, stain_strength)
        rows = [viewed_rows(frame.kinds) for frame in frames]  # only the white-cell candidates, as classify does
        other_views = [self.embed(frames, stain_strength, view, rows) for view in range(1, self.views)]
        out: dict[str, list[np.ndarray]] = {name: [] for name in self.cell_models}
        for index, frame in enumerate(frames):
            served = torch.from_numpy(served_embeddings[index]).float()
            out["CNN only"].append(self._cnn_probs(served))
            out["CNN+GNN"].append(self._graph_probs(frame, served))
            if self.views > 1:
                mean = served.clone()
                mean[rows[index]] = torch.from_numpy(np.mean([served_embeddings[index][rows[index]],
                                                              *(viewed[index] for viewed in other_views)], axis=0))
                out[views_model(self.views)].append(self._graph_probs(frame, mean))
        return out

    def _cnn_probs(self, embeddings: torch.Tensor) -> np.ndarray:
        return torch.softmax(self.embedder.classifier(embeddings) / self.cnn_temperature, 1).numpy()

    def _graph_probs(self, frame: FrameCells, embeddings: torch.Tensor) -> np.ndarray:
        if len(frame.boxes) == 0:
            return self._cnn_probs(embeddings)
        probs, _ = self.graph(embeddings, torch.from_numpy(frame.boxes),
                              torch.tensor(frame.frame_size, dtype=torch.float32),
                              torch.tensor([len(frame.boxes)], dtype=torch.int32))
        return probs.numpy()

    def embed(self, frames: list[FrameCells], stain_strength: float = 0.0, view: int = 0,
              rows: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Each frame's cell embeddings, or those of `rows` (FP32 PyTorch; `quantize.Int8Models` swaps in the INT8
        graph)."""
        return [embeddings for embeddings, _ in embed_frames(self.embedder, frames, stain_strength=stain_strength,
                                                             view=view, rows=rows)]

    @torch.no_grad()
    def baseline_predictions(self, paths: list[Path], batch: int = 256) -> list[str]:
        out: list[str] = []
        for start in range(0, len(paths), batch):
            out += [BASELINE_CLASSES[i] for i in
                    self.baseline(baseline_images(paths[start:start + batch])).argmax(1).tolist()]
        return out


def frame_prediction(frame: FrameCells, probs: np.ndarray, classes: int) -> int:
    """The image-level class index (into CLASSES) of one image, as `classify` decides it; -1 without cells."""
    wbc = np.flatnonzero(frame.kinds == WBC)
    candidates = wbc if len(wbc) else np.arange(len(probs))
    cls, _ = image_prediction(probs[candidates], classes)
    return cls


def calibration_of(frames: list[FrameCells], probs: list[np.ndarray], threshold: float) -> dict:
    """ECE and the auto-accept point at `threshold` over the labelled nucleated cells of these frames."""
    y, p, _ = labelled_nucleated(frames, probs)
    if not len(y):
        return {"cells": 0}
    confidence, correct = p.max(1), p.argmax(1) == y
    point = auto_accept_curve(confidence, correct, np.array([threshold]))[0]
    return {"cells": int(len(y)), "ece": expected_calibration_error(confidence, correct),
            "accepted": point["accepted"], "accepted_accuracy": point["accuracy"],
            "accuracy": float(correct.mean())}


def evaluate_four_class(models: Models, split: str, data_root: str | None, threshold: float) -> dict:
    items = load_four_class(data_root, split)
    frames = build_cells(items, f"4class-{split.lower()}")
    probs = models.cell_probs(frames)
    truth = [WBC_CLASSES.index(item.label) for item in items]
    predictions = {"seed baseline": [WBC_CLASSES.index(c) for c in
                                     models.baseline_predictions([item.path for item in items])]}
    for name in models.cell_models:
        predictions[name] = [frame_prediction(f, p, NUM_WBC) for f, p in zip(frames, probs[name])]
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
             "accuracy": acc, "predicted": CLASSES[vote] if vote >= 0 else NO_CELL}
            for (frame, indices), acc, vote in zip(by_frame.items(), per_frame_acc, votes) if acc < 0.5]
    report["calibration"] = {name: calibration_of(frames, probs[name], threshold) for name in models.cell_models}
    return report


def evaluate_bccd(models: Models, data_root: str | None, threshold: float) -> dict:
    """Node accuracy on held-out BCCD frames, for localised cells matched (IoU >= 0.5) to a labelled VOC box."""
    held = split_frames(data_root).held_out
    frames_meta = [f for f in load_bccd(data_root) if f.frame_id in held]
    frames = build_cells(frames_meta, "bccd-heldout")
    probs = models.cell_probs(frames)
    truth: dict[str, list[int]] = {"wbc": [], "context": []}
    preds: dict[str, dict[str, list[int]]] = {m: {"wbc": [], "context": []} for m in models.cell_models}
    for index, (meta, frame) in enumerate(zip(frames_meta, frames)):
        gt_boxes = np.array([b.box for b in meta.boxes], np.float32).reshape(-1, 4)
        for det, gt in greedy_pairs(box_iou(frame.boxes, gt_boxes), 0.5):
            label = meta.boxes[gt].label
            if label not in CLASSES:
                continue
            group = "wbc" if label in WBC_CLASSES else "context"
            truth[group].append(CLASSES.index(label))
            for name in models.cell_models:
                row = probs[name][index][det]
                preds[name][group].append(int(white_cell_class(row)) if group == "wbc" else int(np.argmax(row)))
    report: dict = {"frames": len(frames)}
    for name in models.cell_models:
        context_truth, context_pred = truth["context"], preds[name]["context"]
        report[name] = {
            "wbc_nodes": classification_metrics(truth["wbc"], preds[name]["wbc"], WBC_CLASSES),
            "rbc_node_accuracy": _accuracy_of(context_truth, context_pred, CLASSES.index("rbc")),
            "platelet_node_accuracy": _accuracy_of(context_truth, context_pred, CLASSES.index("platelet")),
            "rbc_nodes": sum(t == CLASSES.index("rbc") for t in context_truth),
            "platelet_nodes": sum(t == CLASSES.index("platelet") for t in context_truth),
        }
    report["calibration"] = {name: calibration_of(frames, probs[name], threshold) for name in models.cell_models}
    return report


def _accuracy_of(truth: list[int], pred: list[int], cls: int) -> float:
    pairs = [(t, p) for t, p in zip(truth, pred) if t == cls]
    return float(np.mean([t == p for t, p in pairs])) if pairs else 0.0


def _single_cell_report(frames: list[FrameCells], probs: dict[str, list[np.ndarray]], threshold: float) -> dict:
    """Single-cell images (PBC, TXL-PBC of PBC origin): nucleated images by the image-level decision over the
    nucleated classes (`wbc_images`: the five white-cell classes' images so scored, an IG or NRBC answer counting
    wrong); the five white-cell classes' images also by `classify`'s white-cell answer, the likeliest of the five
    (`wbc_answer`); platelet images by the centre cell's argmax over all classes."""
    platelet = CLASSES.index("platelet")
    report: dict = {"images": {}, "wbc_images": {}, "wbc_answer": {}, "platelet_images": {}}
    for name in probs:
        truth, pred, answer, plt_hits = [], [], [], []
        for frame, p in zip(frames, probs[name]):
            if frame.frame_label == platelet:
                centre = centre_box_index(frame.boxes, *frame.frame_size)
                plt_hits.append(bool(centre >= 0 and int(np.argmax(p[centre])) == platelet))
                continue
            truth.append(frame.frame_label)
            pred.append(frame_prediction(frame, p, NUM_NUCLEATED))
            answer.append(frame_prediction(frame, p, NUM_WBC))
        metrics = classification_metrics(truth, pred, NUCLEATED_CLASSES)
        report["images"][name] = metrics
        five = [i for i, t in enumerate(truth) if t < NUM_WBC]
        for key, decided in (("wbc_images", pred), ("wbc_answer", answer)):
            report[key][name] = {"n": len(five), "accuracy": float(np.mean([decided[i] == truth[i] for i in five]))
                                 if five else 0.0}
        report["platelet_images"][name] = {"n": len(plt_hits),
                                           "accuracy": float(np.mean(plt_hits)) if plt_hits else 0.0}
    report["calibration"] = {name: calibration_of(frames, probs[name], threshold) for name in probs}
    return report


def evaluate_pbc(models: Models, data_root: str | None, threshold: float) -> dict:
    items = [img for img in load_pbc(data_root) if img.split == "test"]
    frames = build_cells(items, "pbc-test")
    return {"n_images": len(items), **_single_cell_report(frames, models.cell_probs(frames), threshold)}


def evaluate_txl_pbc(models: Models, data_root: str | None, threshold: float) -> dict:
    """TXL-PBC test images of PBC origin with a known class, minus those that are PBC files (counted there)."""
    pbc_content = {img.sha1 for img in load_pbc(data_root)}
    items = [img for img in load_txl(data_root) if img.split == "test" and img.source == "PBC"
             and img.sha1 not in pbc_content and any(b.label in CLASSES for b in img.boxes if b.kind == "wbc")]
    frames = build_cells(items, "txl-pbc-test")
    return {"n_images": len(items), **_single_cell_report(frames, models.cell_probs(frames), threshold)}


STAIN_SHIFTS = (0.0, 0.5, 1.0, 1.5, 2.0)


def stain_shift_robustness(models: Models, data_root: str | None) -> dict:
    """CNN-only vs CNN+GNN image accuracy under synthetic stain shifts of growing strength (training/augment.stain:
    HED, hue, saturation, gain, contrast, gamma; strength 1 = the training augmentation's range, 2 = twice it),
    applied to every crop of an image alike, on PBC test (7 nucleated classes) and TEST_SIMPLE (4 classes)."""
    pbc = build_cells([img for img in load_pbc(data_root) if img.split == "test"], "pbc-test")
    pbc = [f for f in pbc if f.frame_label < NUM_NUCLEATED]
    simple_items = load_four_class(data_root, "TEST_SIMPLE")
    simple = build_cells(simple_items, "4class-test_simple")
    out: dict = {"strengths": list(STAIN_SHIFTS), "pbc_test": {m: [] for m in models.cell_models},
                 "4class_test_simple": {m: [] for m in models.cell_models}}
    for strength in STAIN_SHIFTS:
        for key, frames, classes in (("pbc_test", pbc, NUM_NUCLEATED), ("4class_test_simple", simple, NUM_WBC)):
            probs = models.cell_probs(frames, stain_strength=strength)
            for name in models.cell_models:
                hits = [frame_prediction(f, p, classes) == f.frame_label for f, p in zip(frames, probs[name])]
                out[key][name].append(float(np.mean(hits)))
    return out


def localizer_recall(data_root: str | None) -> dict:
    """Does the localiser find the white cell on every source? (targets: >= 99% of PBC white-cell images and of
    4-class TEST images, 1.000 on BCCD held-out frames)
    * PBC, every image of the 7 nucleated classes: a WBC box holds the image centre (the cell is centred);
    * 4-class TEST: at least one WBC box;
    * BCCD held-out frames and TXL-PBC per source: recall of the labelled WBC boxes at IoU >= 0.5 and IoU >= 0.1
      (a box on the right cell, however loose), and the share of images with a WBC box."""
    def wbc_boxes(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        image = read_image(path)
        found = localize(image)
        return found.boxes[found.kinds == WBC], image.shape[:2]

    out: dict = {}
    hits: dict[str, list[bool]] = defaultdict(list)
    for img in load_pbc(data_root):
        if img.label in NUCLEATED_CLASSES:
            boxes, size = wbc_boxes(img.path)
            hits[img.label].append(centre_box_index(boxes, *size) >= 0)
    every = [h for values in hits.values() for h in values]
    out["pbc_centre_wbc_found"] = {"images": len(every), "rate": float(np.mean(every)),
                                   "per_class": {k: float(np.mean(v)) for k, v in hits.items()}}
    four = [len(wbc_boxes(img.path)[0]) > 0 for img in load_four_class(data_root, "TEST")]
    out["4class_test_wbc_found"] = {"images": len(four), "rate": float(np.mean(four))}
    held = split_frames(data_root).held_out
    groups: dict[str, list] = {"bccd-heldout": [(f.image_path, [b.box for b in f.boxes if b.kind == "wbc"])
                                                for f in load_bccd(data_root) if f.frame_id in held]}
    for img in load_txl(data_root):
        groups.setdefault(f"txl-{img.source.lower()}", []).append(
            (img.path, [b.box for b in img.boxes if b.kind == "wbc"]))
    for name, items in groups.items():
        found_any, matched50, matched10, total = 0, 0, 0, 0
        for path, gt in items:
            boxes, _ = wbc_boxes(path)
            found_any += len(boxes) > 0
            if gt:
                gt_arr = np.array(gt, np.float32)
                total += len(gt)
                matched50 += len(greedy_pairs(box_iou(boxes, gt_arr), 0.5)) if len(boxes) else 0
                matched10 += len(greedy_pairs(box_iou(boxes, gt_arr), 0.1)) if len(boxes) else 0
        out[name] = {"images": len(items), "wbc_boxes": total, "recall_iou50": matched50 / max(total, 1),
                     "recall_iou10": matched10 / max(total, 1), "images_with_wbc": found_any / max(len(items), 1)}
    return out


def plot_confusion(metrics: dict, class_names: tuple[str, ...], title: str, path: Path) -> None:
    matrix = np.array(metrics["confusion"])
    has_missing = matrix[:, -1].sum() > 0
    present = [i for i in range(len(class_names)) if matrix[i].sum() > 0 or matrix[:, i].sum() > 0]
    rows = matrix[present][:, [*present, len(class_names)] if has_missing else present]
    names = [class_names[i] for i in present]
    fig, ax = plt.subplots(figsize=(1.2 * len(present) + 3, 1.0 * len(present) + 2.5))
    display = ConfusionMatrixDisplay(rows, display_labels=[*names, NO_CELL] if has_missing else names)
    display.plot(ax=ax, colorbar=False, values_format="d", xticks_rotation=45)
    if has_missing:
        ax.set_yticks(range(len(names)), names)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_stain_shift(report: dict, path: Path) -> None:
    """Image accuracy against synthetic stain-shift strength, CNN only (dashed) and CNN+GNN (solid), for this run and
    every --seed-report run: does the graph's context (its red cells) steady the answer as the stain drifts?"""
    runs = {"this run": report["stain_shift"], **{name: r["stain_shift"] for name, r in report.get("seeds", {}).items()
                                                  if name != "committed"}}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (key, title) in zip(axes, (("pbc_test", "PBC test (7 nucleated classes)"),
                                       ("4class_test_simple", "4-class TEST_SIMPLE"))):
        for colour, (name, shift) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], runs.items()):
            for model, style in (("CNN only", "--"), ("CNN+GNN", "-")):
                ax.plot(shift["strengths"], [100 * v for v in shift[key][model]], style, color=colour, marker="o",
                        label=f"{name}: {model}")
        ax.set_title(title)
        ax.set_xlabel("stain shift strength (1 = the training augmentation's range)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("image accuracy, %")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _shifts(report: dict) -> str:
    """The flagged classes' shift of the report's weights, e.g. "IG +1.33, NRBC +2.00"; "" without one."""
    shift = report.get("flagged_bias") or {}
    return ", ".join(f"{name.upper()} {value:+.2f}" for name, value in shift.items()) if any(shift.values()) else ""


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def markdown(report: dict) -> str:
    four, simple, bccd, pbc = (report["4class_test"], report["4class_test_simple"], report["bccd_heldout"],
                               report["pbc_test"])
    txl = report.get("txl_pbc_test")
    scored = list(pbc["images"])  # the cell models this report scored (its views row included), in order
    lines = [
        "| model | 4-class TEST images (2,487) | macro-F1 | per source frame (frames) | macro-F1 | TEST_SIMPLE (71) "
        "| BCCD held-out WBC nodes | PBC test, 5 WBC classes | PBC 5 WBC, `classify`'s answer "
        "| PBC test, all 7 nucleated | IG recall | NRBC recall | PBC platelet images |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("seed baseline", *scored):
        img, frm, sim = four["images"][name], four["frames"][name], simple["images"][name]
        wbc = bccd.get(name, {}).get("wbc_nodes")
        wbc_text = f"{wbc['accuracy']:.1%} ({wbc['n']})" if wbc else "n/a (whole-image model)"
        if name in scored:
            p_all, p_five = pbc["images"][name], pbc["wbc_images"][name]
            answered = pbc.get("wbc_answer", {}).get(name, {}).get("accuracy")
            pbc_text = (f"{p_five['accuracy']:.1%} ({p_five['n']}) | {_pct(answered)} | "
                        f"{p_all['accuracy']:.1%} ({p_all['n']}) | "
                        f"{p_all['per_class']['ig']['recall']:.1%} | {p_all['per_class']['nrbc']['recall']:.1%} | "
                        f"{pbc['platelet_images'][name]['accuracy']:.1%} ({pbc['platelet_images'][name]['n']})")
        else:
            pbc_text = "n/a (4 classes) | n/a | n/a | n/a | n/a | n/a"
        lines.append(f"| {name} | {img['accuracy']:.1%} | {img['macro_f1']:.3f} | {frm['accuracy']:.1%} ({frm['n']}) "
                     f"| {frm['macro_f1']:.3f} | {sim['accuracy']:.1%} | {wbc_text} | {pbc_text} |")
    if txl and txl["n_images"]:
        lines += ["", "TXL-PBC test images of PBC origin that are not PBC files (white-cell class known): "
                  + ", ".join(f"{name} {txl['images'][name]['accuracy']:.1%}" for name in scored)
                  + f" of {txl['images']['CNN+GNN']['n']} images"
                  + ("; by `classify`'s white-cell answer " + ", ".join(
                      f"{name} {txl['wbc_answer'][name]['accuracy']:.1%}" for name in scored)
                     + f" of {txl['wbc_answer']['CNN+GNN']['n']} white-cell images" if "wbc_answer" in txl else "")
                  + "."]
    threshold = report["threshold"]
    shifts = _shifts(report)
    shift_text = (f", then the flagged classes' log-probabilities shifted by {shifts} (class-balanced, fitted on "
                  "validation)" if shifts else "")
    lines += ["", f"Calibration (CNN+GNN, temperature {report['temperatures'].get('gnn', 1.0):.2f} fitted on "
              f"validation{shift_text}) and auto-accept at the \"unidentified\" threshold {threshold:.2f} (chosen on "
              "the validation auto-accept curve for 98% accuracy among accepted cells); target: >= 90% accepted at "
              ">= 98%:",
              "", "| test source | model | labelled nucleated cells | accuracy | ECE | auto-accepted "
              "| accuracy of accepted |", "|---|---|---|---|---|---|---|"]
    for key, title in (("4class_test", "4-class TEST"), ("4class_test_simple", "TEST_SIMPLE"),
                       ("bccd_heldout", "BCCD held-out"), ("pbc_test", "PBC test"), ("txl_pbc_test", "TXL-PBC test")):
        for name in scored[1:]:
            cal = report.get(key, {}).get("calibration", {}).get(name)
            if cal and cal.get("cells"):
                lines.append(f"| {title} | {name} | {cal['cells']} | {cal['accuracy']:.1%} | {cal['ece']:.3f} | "
                             f"{cal['accepted']:.1%} | {_pct(cal['accepted_accuracy'])} |")
    lines += ["", "Per class on PBC test images (CNN+GNN):", "",
              "| class | precision | recall | F1 | specificity | support |", "|---|---|---|---|---|---|"]
    for cls, m in pbc["images"]["CNN+GNN"]["per_class"].items():
        lines.append(f"| {cls} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['specificity']:.3f} "
                     f"| {m['support']} |")
    lines += ["", "Per class on 4-class TEST images (CNN+GNN):", "",
              "| class | precision | recall | F1 | specificity | support |", "|---|---|---|---|---|---|"]
    for cls, m in four["images"]["CNN+GNN"]["per_class"].items():
        if m["support"]:
            lines.append(f"| {cls} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
                         f"{m['specificity']:.3f} | {m['support']} |")
    wrong = four.get("wrong_frames", {}).get("CNN+GNN", [])
    if wrong:
        total = four["images"]["CNN+GNN"]["n"]
        lines += ["", f"Source frames of 4-class TEST that CNN+GNN gets wrong on most of their images ({len(wrong)} of "
                  f"{four['frames']['CNN+GNN']['n']}); each costs its share of the 2,487 images:", "",
                  "| frame | class | images | share of TEST | image accuracy | majority prediction |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {w['frame']} | {w['label']} | {w['images']} | {w['images'] / total:.1%} | {w['accuracy']:.0%} "
                  f"| {w['predicted']} |" for w in sorted(wrong, key=lambda w: -w["images"])]
    for name in scored:
        b = bccd[name]
        lines.append("")
        lines.append(f"BCCD held-out context nodes, {name}: RBC {b['rbc_node_accuracy']:.1%} ({b['rbc_nodes']}), "
                     f"platelet {b['platelet_node_accuracy']:.1%} ({b['platelet_nodes']}).")
    shift = report.get("stain_shift")
    if shift:
        lines += ["", "Synthetic stain shift of growing strength (1 = the training augmentation's range), image "
                  "accuracy (one seed):", "",
                  "| test set | model | " + " | ".join(f"{s:g}" for s in shift["strengths"]) + " |",
                  "|---|---|" + "---|" * len(shift["strengths"])]
        for key, title in (("pbc_test", "PBC test"), ("4class_test_simple", "TEST_SIMPLE")):
            lines += [f"| {title} | {name} | " + " | ".join(f"{v:.1%}" for v in shift[key][name]) + " |"
                      for name in scored]
    loc = report.get("localizer")
    if loc:
        lines += ["", "Localiser (does it find the white cell? targets: >= 99% PBC and 4-class TEST, 1.000 BCCD "
                  "held-out):",
                  "", f"- PBC, white cell at the image centre found: {loc['pbc_centre_wbc_found']['rate']:.1%} of "
                  f"{loc['pbc_centre_wbc_found']['images']} images (IG and NRBC included).",
                  f"- 4-class TEST, a WBC found: {loc['4class_test_wbc_found']['rate']:.1%} of "
                  f"{loc['4class_test_wbc_found']['images']} images.", "",
                  "| source | images | labelled WBC boxes | recall IoU>=0.5 | recall IoU>=0.1 "
                  "| images with a WBC box |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {v['images']} | {v['wbc_boxes']} | {v['recall_iou50']:.3f} | {v['recall_iou10']:.3f} | "
                  f"{v['images_with_wbc']:.1%} |" for name, v in loc.items() if "recall_iou50" in v]
    seeds = report.get("seeds")
    if seeds:
        lines += ["", "Does the graph help? CNN-only against CNN+GNN for this run's weights (first) and each "
                  "`--seed-report` run:", "", seed_table(seeds).rstrip()]
    found_by = report.get("cells_found_by", "client")
    lines += ["", "Cells found by: " + ("the learned cell detector (`--localizer server`, the served ensemble's first "
                                        "step)." if found_by == "server" else
                                        "the classical localiser (`--localizer client`).")]
    loso = report.get("leave_one_source_out")
    if loso:
        lines += ["", "Leave one source out (trained without the source, tested on it; target >= 75%):", "",
                  "| trained without | weights | tested on | " + " | ".join(scored) + " |",
                  "|---|---|---|" + "---|" * len(scored)]
        lines += [f"| {row['without']} | `{row['weights']}`"
                  + (f" (rows of `{row['measured_in']}`)" if row.get("measured_in") else "")
                  + f" | {row['tested_on']} | "
                  + " | ".join(_pct(row.get(name)) for name in scored) + " |" for row in loso]
    return "\n".join(lines) + "\n"


SEED_COLUMNS = (
    ("4-class TEST images", lambda r, m: r["4class_test"]["images"][m]["accuracy"]),
    ("per source frame", lambda r, m: r["4class_test"]["frames"][m]["accuracy"]),
    ("TEST_SIMPLE", lambda r, m: r["4class_test_simple"]["images"][m]["accuracy"]),
    ("BCCD held-out WBC nodes", lambda r, m: r["bccd_heldout"][m]["wbc_nodes"]["accuracy"]),
    ("PBC test, 5 WBC", lambda r, m: r["pbc_test"]["wbc_images"][m]["accuracy"]),
    ("PBC test, 7 nucleated", lambda r, m: r["pbc_test"]["images"][m]["accuracy"]),
    ("PBC under stain shift 1", lambda r, m: r["stain_shift"]["pbc_test"][m][r["stain_shift"]["strengths"].index(1.0)]),
    ("PBC under stain shift 2", lambda r, m: r["stain_shift"]["pbc_test"][m][r["stain_shift"]["strengths"].index(2.0)]),
)


def seed_table(reports: dict[str, dict]) -> str:
    """CNN-only against CNN+GNN for each seed's evaluation, and the GNN's gain per seed (percentage points)."""
    header = "| seed | model | " + " | ".join(title for title, _ in SEED_COLUMNS) + " |"
    lines = [header, "|---|---|" + "---|" * len(SEED_COLUMNS)]
    for seed, report in reports.items():
        values = {m: [get(report, m) for _, get in SEED_COLUMNS] for m in SINGLE_VIEW_MODELS}
        for m in SINGLE_VIEW_MODELS:
            lines.append(f"| {seed} | {m} | " + " | ".join(f"{v:.1%}" for v in values[m]) + " |")
        gains = [(g - c) * 100 for c, g in zip(values["CNN only"], values["CNN+GNN"])]
        lines.append(f"| {seed} | GNN gain (points) | " + " | ".join(f"{v:+.1f}" for v in gains) + " |")
    return "\n".join(lines) + "\n"


def model_card(report: dict, train_summary: dict | None) -> str:
    """training/weights/MODEL_CARD.md: what the committed weights are, how they were made and how they measure."""
    val = {name: meta.get("metrics", {}).get("val") or {} for name, meta in report["weights"].items()}
    seconds = f"{train_summary['seconds']:.0f} s" if train_summary else "unknown"
    cnn_args = (train_summary or {}).get("cnn_args") or (train_summary or {}).get("args") or {}
    strength = cnn_args.get("aug_strength", "1.0")
    ibn = str(cnn_args.get("ibn")) == "True"
    widen = float((train_summary or {}).get("args", {}).get("gnn_widen") or 1.0)
    widened = (f"Trained on graphs read as part of a field up to {widen:g} times wider and taller (`--gnn-widen`): the "
               "frame-relative features see more framings than the training labs' own. " if widen > 1 else "")
    blend = report.get("cnn_blend", 0.0)
    shifts = _shifts(report)
    detector_cells = report.get("cells_found_by") == "server"
    cells_by = "the learned detector" if detector_cells else "the classical localiser"
    other_results = "docs/results/evaluation.md" if detector_cells else "docs/results/detector/evaluation.md"
    return "\n".join([
        "# Model card: leukograph CNN crop embedder + cell-graph GNN (and the seed baseline)", "",
        "Generated by `leukograph evaluate` from the committed weights (the framing line: `leukograph framing "
        "--readme`); do not edit by hand.", "",
        "## What", "",
        "- Classes: white cells neutrophil, eosinophil, basophil, lymphocyte, monocyte; flagged ig (immature "
        "granulocyte) and nrbc (nucleated red cell, PBC's erythroblast); context rbc and platelet.",
        "- `cnn.pt`: `CropEmbedder`, a 6-conv VGG-style CNN on 64x64 RGB crops (box + 15% margin, square, cut in-graph "
        "by `crop_cells`). Each crop's colour is standardised per channel inside the served graph (mean 0, "
        "standard deviation 1 for R, G and B), so a lab's white balance, lamp or stain cast cancels before the "
        "first convolution. " + (
            "In the first two conv blocks half of the channels are normalised per crop (InstanceNorm, learnt affine) "
            "and half per batch (IBN-a, `leukograph train --ibn`: a crop's own contrast and texture statistics, "
            "which carry its lab's look, do not pass onward; README \"Other labs' white cells without labels\"); "
            "BatchNorm after the other convs" if ibn else "BatchNorm after every conv") +
        " (GroupNorm was tried and did not start learning within the CPU budget). 64-d embedding, 9-class logits.",
        "- `gnn.pt`: `CellGraphNet`, GraphSAGE (mean, 2 layers) over each frame's 5-nearest-neighbour cell graph; node "
        "input = CNN embedding + geometry (size relative to the frame's median cell, mostly red cells; aspect; "
        "position in the frame; median cell against the frame: `geometry` \"frame\", README \"Node geometry\"). "
        f"{widened}Its `temperature` buffer calibrates the served probabilities (fitted on validation)"
        + (f", and its `class_bias` buffer then raises the flagged classes' log-probabilities ({shifts}), fitted "
           "on validation with every class weighing the same: fewer IG and NRBC cells are missed, at the cost of "
           "more cells flagged that are not (README \"Flagged classes\"); `classify`'s white-cell answer (the "
           "likeliest of the five white-cell classes) does not depend on it." if shifts else ".")
        + (f" Its logits add the CNN's own (`cnn_weight` x the CNN's classifier, copied in as `cnn_head_weight` and "
           "`cnn_head_bias`): the "
           f"calibrated GNN and CNN pooled log-linearly at {1 - blend:g} : {blend:g} (`leukograph train --cnn-blend`, "
           "chosen on validation; README \"The CNN's own vote\")." if blend else ""),
        "- `baseline.pt`: the seed paper's model (whole image at 64x64, 4 classes), reproduced for comparison; "
        "trained earlier on 4-class TRAIN and kept unchanged.",
        "- `calibration.json`: temperatures, the flagged classes' shift, validation ECE and the validation "
        "auto-accept curve behind the \"unidentified\" threshold in `client/contract.py`.",
        "- `detector.pt`: the learned cell detector, the served ensemble's first step (`leukograph train-detector`, "
        "README \"Detector\"). Each frame is standardised over its smear: black pixels (a rotated image's fill, a "
        "field stop's corners) are left out of the statistics, which the released weights were trained without; on "
        "frames without such pixels its outputs are unchanged. The CNN and GNN were trained on the classical "
        "localiser's cells; a GNN retrained on the detector's graphs was no better (README \"Detector\", "
        "docs/results/detector).",
        f"- The results below are on {cells_by}'s cells (`leukograph evaluate --localizer`); the other localiser's "
        f"are in {other_results}.",
        f"- \"{VIEWS_MODEL}\": the white-cell candidates' embeddings averaged over the crop's {DIHEDRAL} flips and "
        f"quarter-turns, each with the cell at {', '.join(f'{s:g}' for s in VIEW_SCALES)} times its size in the crop, "
        "before the GNN (`training/views.py`), the image-level answer `leukograph classify` gives; the "
        "served pipeline and the stream label every cell from the one served view (the CNN+GNN rows).",
        "",
        "## Data and split", "",
        "- BCCD frames and a per-class subset (600 per class) of blood-cells-4class TRAIN whose source frame is not "
        "held out. Held out: the frames behind 4-class TEST/TEST_SIMPLE (never trained on, never used for model "
        "selection). Validation frames are carved from the rest, grouped by frame and stratified by class.",
        "- PBC (CellaVision DM96, MGG stain, Barcelona): per class, files sorted by the SHA-1 of their bytes; "
        "15% test, 15% validation, 70% train.",
        "- TXL-PBC: images whose bytes are PBC files take the PBC file's split; others keep the upstream split. "
        "Raabin-WBC and BCDD images give context (RBC, platelet) nodes to the GNN; their white cells have no subtype "
        "here and teach the CNN through the consistency term only (with BCCD's white cells of uncertain label: "
        "`--unlabelled-weight`, README \"Other labs' white cells without labels\").",
        "- **BCCD has no IG or NRBC labels and only 3 basophil frames: basophil, IG and NRBC are learnt from PBC "
        "(one lab, one stain, normal donors only).** Expect them to be the least reliable classes on other labs.", "",
        "## Training", "",
        *([f"- {line}" for line in train_summary.get("recipe", [])] + [""] if train_summary else []),
        f"The last `leukograph train` run behind these weights took {seconds} wall time (the recipe above says which "
        "stages ran where). Augmentation per batch (training/augment.py; ranges at strength 1, these weights' CNN "
        f"at strength {strength}): any rotation/flip, "
        "box scale 0.8-1.25 and "
        "shift, resolution 30-100%, HED stain jitter, hue, saturation, per-channel gain, brightness/contrast, gamma, "
        "grayscale, blur, noise, JPEG, vignetting. Model selection: best mean per-source validation macro-F1 "
        f"(CNN {val.get('cnn', {}).get('score', 0):.3f}, CNN+GNN {val.get('gnn', {}).get('score', 0):.3f}).", "",
        "## Held-out results (`leukograph evaluate`)", "", markdown(report),
        "## Limits", "",
        "- 4-class TEST has 2,487 images but only ~70 independent source frames (4 monocyte frames), so one frame can "
        "move the image accuracy by several points; the per-frame column is the honest sample size.",
        "- Two labs in training (BCCD, PBC) plus context cells from Raabin-WBC and BCDD. Other labs were not seen; "
        "the stain and scale augmentation and the in-graph colour standardisation are the defence, not a guarantee.",
        "- Low-confidence cells go to the review list (\"unidentified\"); a technologist verifies every result.",
        *framing_limits(FRAMING_REPORT), ""])


def write_model_card(weights: Path, report: dict | None = None) -> None:
    """`weights`/MODEL_CARD.md from an evaluation report (default: the committed docs/results/evaluation.json), the
    weights' train_summary.json and the framing report."""
    report = report if report is not None else json.loads((RESULTS_DIR / "evaluation.json").read_text())
    summary_path = weights / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    (weights / "MODEL_CARD.md").write_text(model_card(report, summary))


def framing_limits(path: Path) -> list[str]:
    """The model card's line on other framings, from `leukograph framing --split test` (none before it has run)."""
    if not path.exists():
        return []
    report = json.loads(path.read_text())
    rows = next(iter(report["weights"].values()))
    figures = "; ".join(f"{name}: {100 * row['accuracy']:.1f}%" for name, row in rows.items())
    return [f"- Framing (`{report['command']}`: PBC {report['split']} white cells framed and imaged as other labs' "
            f"microscopes frame and image them, `classify`'s answer): {figures}. A cell cut by the image's edge (a "
            "tight crop, a higher magnification) or small in a wide field costs accuracy, and a monochrome camera "
            "much more (the cytoplasm's and granules' colour is gone); where the white cell fills the image, "
            "`classify` answers in a field twice the image's size, and where the detector finds no white cell, it "
            "searches a zoomed-out field before it answers from the image's centre."]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate the models on every test source", add_help=add_help)
    parser.add_argument("--data-root", default=None, help="datasets (default $LEUKOGRAPH_DATA, ../shared/datasets)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR,
                        help="where results go; the README table is rewritten only for the default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--views", type=int, choices=VIEW_COUNTS, default=VIEWS,
                        help=f"the last CNN+GNN row reads each white cell in this many views, as `leukograph classify "
                        f"--views` does (default {VIEWS}; training/views.py)")
    parser.add_argument("--localizer", choices=LOCALIZERS, default=DEFAULT_LOCALIZER,
                        help="who finds the cells: server, the learned detector the served ensemble runs first; "
                        "client, the classical localiser (default %(default)s)")
    parser.add_argument("--seed-report", action="append", default=[], metavar="NAME=EVALUATION_JSON",
                        help="another seed's evaluation.json (evaluate --weights ITS_DIR --output-dir ...): adds the "
                             "CNN-only vs CNN+GNN table across seeds")
    parser.add_argument("--loso", action="append", default=[], metavar="SOURCE=WEIGHTS_DIR",
                        help="leave-one-source-out weights trained without SOURCE (bccd or pbc); repeatable")
    parser.add_argument("--loso-report", action="append", default=[], metavar="EVALUATION_JSON",
                        help="an earlier evaluation.json whose leave-one-source-out rows to carry, for weights not "
                             "at hand (each row names the file it comes from); repeatable")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                        help="int8: FP32 vs INT8 crop_embedder rows on every source (training/quantize.py)")
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY,
                        help="with --precision int8: where `export --int8` wrote crop_embedder/1/model.int8.onnx")
    parser.add_argument("--int8-images", type=int, default=300,
                        help="with --precision int8: test images per image-level source, a seeded sample (0: all)")
    add_keep_freed_memory_argument(parser)
    return parser


# The white-cell classes that BCCD and 4-class label (BCCD's 3 basophil frames aside): all that weights trained
# without PBC have been taught; basophil, IG and NRBC come from PBC alone.
TAUGHT_WITHOUT_PBC = ("neutrophil", "eosinophil", "lymphocyte", "monocyte")


def accuracy_over(metrics: dict, classes: tuple[str, ...]) -> float:
    """Image accuracy over the images of `classes` only (their recall weighted by support; the prediction is still
    over every class)."""
    per_class = [metrics["per_class"][name] for name in classes]
    support = sum(c["support"] for c in per_class)
    return sum(c["recall"] * c["support"] for c in per_class) / support if support else 0.0


LOSO_SOURCES = ("bccd", "pbc")


def loso_models(specs: list[str], views: int = VIEWS) -> list[tuple[str, str, Models]]:
    """(source, folder, models) for each --loso SOURCE=WEIGHTS_DIR, loaded before anything is evaluated (so a wrong
    folder fails at once); no seed baseline is needed."""
    loaded = []
    for spec in specs:
        source, _, folder = spec.partition("=")
        if source not in LOSO_SOURCES or not folder:
            raise UserError(f"--loso {spec}: expected SOURCE=WEIGHTS_DIR with SOURCE one of {', '.join(LOSO_SOURCES)}")
        loaded.append((source, folder, Models(Path(folder), views, baseline=False)))
    return loaded


def leave_one_source_out(loaded: list[tuple[str, str, Models]], data_root: str | None,
                         threshold: float) -> list[dict]:
    """Weights trained without a source, scored on that source's test part (image level). Without PBC, also over
    the images of the classes the other labs label (TAUGHT_WITHOUT_PBC)."""
    rows = []
    for source, folder, models in loaded:
        if source == "pbc":
            result = evaluate_pbc(models, data_root, threshold)
            rows.append({"without": "PBC (+ TXL-PBC's PBC images)", "tested_on": "PBC test, 7 nucleated classes",
                         "weights": folder, **{m: result["images"][m]["accuracy"] for m in models.cell_models},
                         "five_class": {m: result["wbc_images"][m]["accuracy"] for m in models.cell_models}})
            rows.append({"without": "PBC (+ TXL-PBC's PBC images)",
                         "tested_on": f"PBC test, the {len(TAUGHT_WITHOUT_PBC)} classes the other labs label",
                         "weights": folder, **{m: accuracy_over(result["images"][m], TAUGHT_WITHOUT_PBC)
                                               for m in models.cell_models}})
        else:
            result = evaluate_bccd(models, data_root, threshold)
            rows.append({"without": "BCCD + 4-class", "tested_on": "BCCD held-out WBC nodes", "weights": folder,
                         **{m: result[m]["wbc_nodes"]["accuracy"] for m in models.cell_models}})
    return rows


def carried_loso_rows(path: str) -> list[dict]:
    """The leave-one-source-out rows of an earlier evaluation.json, each marked with the file (`measured_in`)."""
    try:
        rows = json.loads(Path(path).read_text()).get("leave_one_source_out") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"--loso-report {path}: cannot read its leave-one-source-out rows: {exc}") from None
    if not rows:
        raise UserError(f"--loso-report {path}: it has no leave-one-source-out rows")
    return [{**row, "measured_in": row.get("measured_in", path)} for row in rows]


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    apply_keep_freed_memory(args)
    if args.precision == "int8":
        from leukograph.training.quantize import evaluate_int8

        return evaluate_int8(args)
    started = time.time()
    carried = [row for path in args.loso_report for row in carried_loso_rows(path)]  # read first: fail early
    loso = loso_models(args.loso, args.views)
    use_localizer(args.localizer)
    models = Models(args.weights, args.views)
    calibration = models.meta["calibration"]
    threshold = UNIDENTIFIED_THRESHOLD
    report = {
        "threshold": threshold,
        "threshold_on_validation": calibration.get("threshold"),
        "temperatures": {"cnn": calibration.get("cnn_temperature", 1.0), "gnn": calibration.get("gnn_temperature",
                                                                                              1.0)},
        "cnn_blend": calibration.get("cnn_blend", 0.0),
        "flagged_bias": calibration.get("flagged_bias", {}),
        "4class_test": evaluate_four_class(models, "TEST", args.data_root, threshold),
        "4class_test_simple": evaluate_four_class(models, "TEST_SIMPLE", args.data_root, threshold),
        "bccd_heldout": evaluate_bccd(models, args.data_root, threshold),
        "pbc_test": evaluate_pbc(models, args.data_root, threshold),
        "txl_pbc_test": evaluate_txl_pbc(models, args.data_root, threshold),
        "localizer": localizer_recall(args.data_root),
        "stain_shift": stain_shift_robustness(models, args.data_root),
        "weights": {k: {"epoch": v["epoch"], "metrics": {"val": v["metrics"].get("val")}}
                    for k, v in models.meta.items() if k in ("cnn", "gnn")},
        "command": "leukograph evaluate" + (f" --views {args.views}" if args.views != VIEWS else ""),
        "views": args.views,
        "cells_found_by": args.localizer,
    }
    if loso:
        report["leave_one_source_out"] = leave_one_source_out(loso, args.data_root, threshold)
    if carried:
        report.setdefault("leave_one_source_out", []).extend(carried)
    if args.seed_report:
        report["seeds"] = {"committed": {k: report[k] for k in ("4class_test", "4class_test_simple", "bccd_heldout",
                                                                "pbc_test", "stain_shift")}}
        for spec in args.seed_report:
            name, _, path = spec.partition("=")
            try:
                other = json.loads(Path(path).read_text())
            except (OSError, ValueError) as exc:
                raise UserError(f"--seed-report {spec}: cannot read {path}: {exc}") from None
            report["seeds"][name] = {k: other[k] for k in report["seeds"]["committed"]}
    report["seconds"] = round(time.time() - started, 1)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "evaluation.md").write_text(markdown(report))
    for name in ("seed baseline", *models.cell_models):
        slug = name.lower().replace(",", "").replace(" ", "_").replace("+", "_")
        plot_confusion(report["4class_test"]["images"][name], WBC_CLASSES, f"{name}: 4-class TEST images",
                       out / f"confusion_4class_test_{slug}.png")
    plot_confusion(report["4class_test_simple"]["images"]["CNN+GNN"], WBC_CLASSES, "CNN+GNN: TEST_SIMPLE images",
                   out / "confusion_4class_test_simple_cnn_gnn.png")
    plot_confusion(report["bccd_heldout"]["CNN+GNN"]["wbc_nodes"], WBC_CLASSES, "CNN+GNN: BCCD held-out WBC nodes",
                   out / "confusion_bccd_heldout_cnn_gnn.png")
    plot_confusion(report["pbc_test"]["images"]["CNN+GNN"], NUCLEATED_CLASSES, "CNN+GNN: PBC test images",
                   out / "confusion_pbc_test_cnn_gnn.png")
    plot_stain_shift(report, out / "stain_shift.png")
    print(markdown(report))
    if args.output_dir.resolve() == RESULTS_DIR.resolve():
        write_model_card(args.weights, report)
        replace_section("eval", "Generated by `leukograph evaluate` from `docs/results/evaluation.json`.\n\n"
                        + markdown(report))
    print(f"wrote {out}/evaluation.json, evaluation.md and confusion PNGs ({report['seconds']:.0f} s)")
    return 0
