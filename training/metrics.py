"""Metrics shared by `leukograph train` (validation, model selection, calibration) and `leukograph evaluate`.

* The image-level decision (`image_prediction`): the most white-cell-like cell and its class.
* Classification metrics (scikit-learn), cell-level validation metrics per source.
* Calibration: temperature scaling fitted on validation logits, a class-balanced shift of the flagged classes'
  log-probabilities (`fit_flagged_bias`), expected calibration error (ECE), and the auto-accept curve (share of
  white cells at or above a confidence threshold, accuracy among them).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
)

from leukograph.client.contract import CLASSES, NUCLEATED_CLASSES
from leukograph.client.images import read_image

NUM_NUCLEATED = len(NUCLEATED_CLASSES)
ECE_BINS = 15
TARGET_ACCEPTED_ACCURACY = 0.98  # the auto-accept target: accuracy among cells above the threshold


def to_tensor(crops: np.ndarray) -> torch.Tensor:
    """uint8 [N,S,S,3] -> float [N,3,S,S] in 0..1 (what crop_cells produces in-graph)."""
    return torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).to(torch.float32) / 255.0


def baseline_images(paths: list[Path], size: int = 64) -> torch.Tensor:
    """The seed paper's input: the whole image resized to size x size, RGB in 0..1."""
    images = np.stack([cv2.resize(read_image(p), (size, size), interpolation=cv2.INTER_AREA) for p in paths])
    return to_tensor(images)


def image_prediction(probs: np.ndarray, classes: int = NUM_NUCLEATED) -> tuple[int, int]:
    """An image's white-cell class from its cells' probabilities: the most white-cell-like cell (largest total
    probability over the nucleated classes) and its most likely class among the first `classes` classes (the 7
    nucleated classes, or the 5 WBC classes). Returns (class index or -1 without cells, cell index or -1).
    `leukograph classify` makes the same decision among the localiser's WBC boxes."""
    if len(probs) == 0:
        return -1, -1
    cell = int(np.argmax(probs[:, :NUM_NUCLEATED].sum(1)))
    return int(np.argmax(probs[cell, :classes])), cell


def macro_f1(targets: np.ndarray, predictions: np.ndarray, labels: list[int]) -> float:
    return float(f1_score(targets, predictions, labels=labels, average="macro", zero_division=0))


def classification_metrics(y_true: list[int], y_pred: list[int], class_names: tuple[str, ...]) -> dict:
    """Accuracy, macro-F1 and per-class precision, recall, F1, specificity and support (scikit-learn).
    Predictions outside class_names (e.g. -1, no cell found) count as errors. Classes without support are left out
    of the macro-F1 (a source without IG is not scored on IG)."""
    labels = list(range(len(class_names)))
    y_true_arr, y_pred_arr = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true_arr, y_pred_arr, labels=labels, zero_division=0)
    per_class_cm = multilabel_confusion_matrix(y_true_arr, y_pred_arr, labels=labels)
    specificity = [float(tn / (tn + fp)) if tn + fp else 0.0 for (tn, fp), _ in per_class_cm]
    present = [i for i in labels if support[i] > 0]
    return {
        "n": int(len(y_true_arr)),
        "accuracy": float(accuracy_score(y_true_arr, y_pred_arr)) if len(y_true_arr) else 0.0,
        "macro_f1": macro_f1(y_true_arr, y_pred_arr, present) if present else 0.0,
        "no_cell_found": int((y_pred_arr < 0).sum()),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "specificity": specificity[i], "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion": confusion_matrix(y_true_arr, y_pred_arr, labels=[*labels, -1]).tolist(),
    }


def labelled_nucleated(frames, probs_per_frame: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(true class [M], probabilities [M,C], source [M]) of every labelled nucleated cell."""
    truth, probs, sources = [], [], []
    for frame, p in zip(frames, probs_per_frame):
        wanted = frame.labelled_nucleated
        truth.append(frame.labels[wanted])
        probs.append(p[wanted])
        sources += [frame.source] * int(wanted.sum())
    if not truth:
        return np.zeros(0, np.int64), np.zeros((0, len(CLASSES))), []
    return np.concatenate(truth), np.concatenate(probs), sources


def cell_metrics(frames, probs_per_frame: list[np.ndarray]) -> dict[str, float]:
    """Validation on labelled nucleated cells (5 WBC classes, IG, NRBC) of every source. `score` (model selection)
    is the mean over sources of each source's macro-F1 over the classes it has."""
    truth, probs, sources = labelled_nucleated(frames, probs_per_frame)
    if len(truth) == 0:
        return {"cell_accuracy": 0.0, "cell_macro_f1": 0.0, "score": 0.0, "cells": 0}
    pred = probs[:, :NUM_NUCLEATED].argmax(1)
    source_arr = np.array(sources)
    per_source = {}
    for source in sorted(set(sources)):
        chosen = source_arr == source
        present = sorted(set(truth[chosen].tolist()))
        per_source[source] = macro_f1(truth[chosen], pred[chosen], present)
    return {
        "cell_accuracy": float(accuracy_score(truth, pred)),
        "cell_macro_f1": macro_f1(truth, pred, sorted(set(truth.tolist()))),
        "score": float(np.mean(list(per_source.values()))),
        "cells": int(len(truth)),
        **{f"f1_{source}": value for source, value in per_source.items()},
    }


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T > 0 minimising the negative log-likelihood of softmax(logits / T) (Guo et al. 2017)."""
    if len(labels) == 0:
        return 1.0
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    labels_t = torch.as_tensor(labels, dtype=torch.int64)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits_t / torch.exp(log_t), labels_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(torch.exp(log_t).clamp(0.05, 20.0))


# Fewest validation cells of each flagged class for `fit_flagged_bias` to fit a shift (weights trained without PBC
# have none: their shift stays 0).
MIN_FLAGGED_CELLS = 20


def fit_flagged_bias(log_probs: np.ndarray, labels: np.ndarray, flagged: list[int]) -> np.ndarray:
    """A shift of the `flagged` classes' calibrated log-probabilities (the others stay 0) minimising the
    class-balanced negative log-likelihood: every class weighs as much as any other, as it would if the flagged
    classes were as common as the rest. Zeros where a flagged class has fewer than MIN_FLAGGED_CELLS labels."""
    bias = np.zeros(log_probs.shape[1])
    counts = np.bincount(labels, minlength=log_probs.shape[1])
    if len(labels) == 0 or any(counts[i] < MIN_FLAGGED_CELLS for i in flagged):
        return bias
    x = torch.as_tensor(log_probs, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.int64)
    weight = torch.as_tensor(np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0), dtype=torch.float64)
    free = torch.zeros(len(flagged), dtype=torch.float64, requires_grad=True)
    where = torch.as_tensor(flagged)
    optimizer = torch.optim.LBFGS([free], lr=0.1, max_iter=200)

    def closure():
        optimizer.zero_grad()
        shift = torch.zeros(x.shape[1], dtype=torch.float64).index_put((where,), free)
        loss = torch.nn.functional.cross_entropy(x + shift, y, weight=weight)
        loss.backward()
        return loss

    optimizer.step(closure)
    bias[flagged] = free.detach().numpy()
    return bias


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the share-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    if len(confidence) == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        chosen = which == b
        if chosen.any():
            ece += chosen.mean() * abs(correct[chosen].mean() - confidence[chosen].mean())
    return float(ece)


def auto_accept_curve(confidence: np.ndarray, correct: np.ndarray,
                      thresholds: np.ndarray | None = None) -> list[dict[str, float]]:
    """For each threshold: the share of cells whose confidence is at or above it, and the accuracy among them (None
    when no cell is accepted)."""
    thresholds = np.round(np.linspace(0.3, 0.99, 70), 2) if thresholds is None else thresholds
    out = []
    for t in thresholds:
        accepted = confidence >= t
        out.append({"threshold": float(t), "accepted": float(accepted.mean()) if len(confidence) else 0.0,
                    "accuracy": float(correct[accepted].mean()) if accepted.any() else None})
    return out


def choose_threshold(curve: list[dict[str, float]], target: float = TARGET_ACCEPTED_ACCURACY) -> dict[str, float]:
    """The lowest threshold whose accepted cells reach `target` accuracy (most cells auto-accepted at that
    accuracy); the highest threshold when none does."""
    usable = [point for point in curve if point["accuracy"] is not None]
    if not usable:
        return dict(curve[0], target_accuracy=target, target_met=False)
    meeting = [point for point in usable if point["accuracy"] >= target]
    best = meeting[0] if meeting else max(usable, key=lambda point: (point["accuracy"], point["accepted"]))
    return dict(best, target_accuracy=target, target_met=bool(meeting))
