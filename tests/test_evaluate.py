"""`leukograph evaluate`'s scoring helpers."""

from __future__ import annotations

import numpy as np
import pytest

from leukograph.client.contract import NUCLEATED_CLASSES, WBC_CLASSES
from leukograph.training.evaluate import TAUGHT_WITHOUT_PBC, accuracy_over
from leukograph.training.metrics import classification_metrics


def test_accuracy_over_scores_only_the_images_of_the_named_classes() -> None:
    names = list(NUCLEATED_CLASSES)
    truth = [names.index(n) for n in ("neutrophil", "neutrophil", "eosinophil", "lymphocyte", "ig", "nrbc")]
    predicted = [names.index(n) for n in ("neutrophil", "ig", "eosinophil", "lymphocyte", "lymphocyte", "nrbc")]
    metrics = classification_metrics(truth, predicted, NUCLEATED_CLASSES)
    # a neutrophil called IG is wrong: the prediction is over every class, only the images are chosen
    assert accuracy_over(metrics, TAUGHT_WITHOUT_PBC) == pytest.approx(3 / 4)
    assert accuracy_over(metrics, ("ig",)) == 0.0 and accuracy_over(metrics, ("nrbc",)) == 1.0
    assert accuracy_over(metrics, ("basophil",)) == 0.0  # no images of the class: nothing to score
    assert accuracy_over(metrics, tuple(NUCLEATED_CLASSES)) == pytest.approx(metrics["accuracy"])


def test_classes_taught_without_pbc_are_white_cell_classes_without_basophils() -> None:
    assert set(TAUGHT_WITHOUT_PBC) < set(WBC_CLASSES) and "basophil" not in TAUGHT_WITHOUT_PBC


def test_validation_scores_count_classifys_class_beside_the_nucleated_label() -> None:
    """A neutrophil whose largest probability is IG: wrong as a nucleated label (`five_wbc`), right as the white-cell
    class `classify` answers (`five_wbc_answer`, the largest of the five white-cell probabilities)."""
    from leukograph.client.contract import CLASSES
    from leukograph.client.localize import Cells
    from leukograph.training.classify import white_cell_json
    from leukograph.training.tradeoff import _validation_scores

    probs = np.zeros((3, len(CLASSES)), np.float32)
    probs[0, [CLASSES.index("ig"), CLASSES.index("neutrophil")]] = 0.6, 0.4  # answered neutrophil, labelled IG
    probs[1, CLASSES.index("monocyte")] = 1.0
    probs[2, CLASSES.index("ig")] = 1.0  # a true IG: no five-class answer is counted for it
    truth = np.array([CLASSES.index("neutrophil"), CLASSES.index("lymphocyte"), CLASSES.index("ig")])
    scores = _validation_scores("x", 64, truth, probs, ["pbc"] * 3)["sources"]["pbc"]
    assert scores == {"cells": 3, "nucleated": pytest.approx(1 / 3), "five_wbc_cells": 2, "five_wbc": 0.0,
                      "five_wbc_answer": 0.5}
    cells = Cells(np.zeros((1, 4), np.float32), np.zeros(1, np.int64), np.ones(1, np.float32))
    assert white_cell_json(cells, probs[:1], np.array([0]), "detector", 24)["class"] == "neutrophil"
