"""`leukograph evaluate`'s scoring helpers."""

from __future__ import annotations

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
