"""`leukograph evaluate`'s scoring helpers."""

from __future__ import annotations

import numpy as np
import pytest

from leukograph.client.contract import NUCLEATED_CLASSES, WBC_CLASSES
from leukograph.training.evaluate import TAUGHT_WITHOUT_PBC, accuracy_over
from leukograph.training.metrics import MIN_FLAGGED_CELLS, classification_metrics, fit_flagged_bias


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


def _flagged_case(ig_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated log-probabilities where every true IG cell is called neutrophil by a small margin, and every
    neutrophil is called neutrophil by a wide one."""
    from leukograph.client.contract import CLASSES

    neutrophil, ig = CLASSES.index("neutrophil"), CLASSES.index("ig")
    probs = np.full((40 + ig_cells, len(CLASSES)), 0.01)
    probs[:40, neutrophil] = 0.9
    probs[40:, [neutrophil, ig]] = 0.5, 0.4
    labels = np.array([neutrophil] * 40 + [ig] * ig_cells)
    return np.log(probs / probs.sum(1, keepdims=True)), labels


def test_flagged_shift_raises_a_missed_flagged_class_and_only_the_flagged_classes() -> None:
    from leukograph.client.contract import CLASSES, FLAGGED_CLASSES

    log_probs, labels = _flagged_case(MIN_FLAGGED_CELLS)
    nrbc = CLASSES.index("nrbc")
    called_nrbc = np.full((MIN_FLAGGED_CELLS, len(CLASSES)), 0.01)
    called_nrbc[:, nrbc] = 0.6  # NRBC cells, called NRBC but less surely than the neutrophils are called
    log_probs = np.concatenate([log_probs, np.log(called_nrbc / called_nrbc.sum(1, keepdims=True))])
    labels = np.concatenate([labels, [nrbc] * MIN_FLAGGED_CELLS])
    flagged = [CLASSES.index(name) for name in FLAGGED_CLASSES]
    bias = fit_flagged_bias(log_probs, labels, flagged)
    assert bias[CLASSES.index("ig")] > np.log(0.5 / 0.4)  # every IG cell is now called IG
    assert ((log_probs + bias).argmax(1)[labels == CLASSES.index("neutrophil")] == CLASSES.index("neutrophil")).all()
    assert not np.delete(bias, flagged).any()


def test_flagged_shift_is_zero_without_enough_flagged_cells() -> None:
    from leukograph.client.contract import CLASSES, FLAGGED_CLASSES

    log_probs, labels = _flagged_case(MIN_FLAGGED_CELLS - 1)
    flagged = [CLASSES.index(name) for name in FLAGGED_CLASSES]
    assert not fit_flagged_bias(log_probs, labels, flagged).any()  # and no NRBC cell at all


def test_carried_leave_one_source_out_rows_name_their_file(tmp_path) -> None:
    import json
    import subprocess
    import sys

    from leukograph.training.evaluate import carried_loso_rows

    earlier = tmp_path / "evaluation.json"
    earlier.write_text(json.dumps({"leave_one_source_out": [{"without": "PBC", "CNN+GNN": 0.5}]}))
    assert carried_loso_rows(str(earlier)) == [{"without": "PBC", "CNN+GNN": 0.5, "measured_in": str(earlier)}]
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    for path in (empty, tmp_path / "missing.json"):
        result = subprocess.run([sys.executable, "-m", "leukograph.client.cli", "evaluate", "--loso-report",
                                 str(path), "--output-dir", str(tmp_path / "out")], capture_output=True, text=True)
        assert result.returncode != 0 and "--loso-report" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()


def test_leave_one_source_out_weights_are_checked_before_anything_is_evaluated(tmp_path) -> None:
    """A wrong --loso fails at once with one line (it used to fail after the whole evaluation), and LOSO weights
    need no seed baseline (a `--stages cnn,gnn` run has none)."""
    import shutil
    import subprocess
    import sys

    from leukograph.deploy.paths import WEIGHTS_DIR
    from leukograph.training.checkpoints import CNN_FILE, GNN_FILE
    from leukograph.training.evaluate import Models, loso_models

    for spec in ("pbc=" + str(tmp_path / "missing"), "cells=" + str(WEIGHTS_DIR), "pbc"):
        result = subprocess.run([sys.executable, "-m", "leukograph.client.cli", "evaluate", "--loso", spec,
                                 "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "out").exists()
    two_stages = tmp_path / "no-baseline"
    two_stages.mkdir()
    for name in (CNN_FILE, GNN_FILE):
        shutil.copy2(WEIGHTS_DIR / name, two_stages / name)
    [(source, folder, models)] = loso_models([f"pbc={two_stages}"], views=1)
    assert (source, folder) == ("pbc", str(two_stages)) and isinstance(models, Models) and models.baseline is None


def test_single_cell_report_scores_classifys_white_cell_answer_beside_the_nucleated_label() -> None:
    """A monocyte image whose cell is likeliest IG, then monocyte: wrong by the nucleated label (`wbc_images`), right
    by `classify`'s white-cell answer (`wbc_answer`); IG and NRBC images count in neither."""
    from leukograph.client.contract import CELL_KINDS, CLASSES
    from leukograph.training.cells import FrameCells
    from leukograph.training.evaluate import _single_cell_report

    def frame(label: str) -> FrameCells:
        return FrameCells(image_id=label, source_frame=label, frame_label=CLASSES.index(label), frame_size=(64, 64),
                          boxes=np.array([[16, 16, 48, 48]], np.float32),
                          kinds=np.array([CELL_KINDS.index("wbc")]), labels=np.array([-1]),
                          crops=np.zeros((1, 8, 8, 3), np.uint8), source="pbc")

    probs = np.zeros((1, len(CLASSES)), np.float32)
    probs[0, [CLASSES.index("ig"), CLASSES.index("monocyte")]] = 0.6, 0.4
    ig = np.zeros_like(probs)
    ig[0, CLASSES.index("ig")] = 1.0
    report = _single_cell_report([frame("monocyte"), frame("ig")], {"CNN+GNN": [probs, ig]}, 0.95)
    assert report["wbc_images"]["CNN+GNN"] == {"n": 1, "accuracy": 0.0}
    assert report["wbc_answer"]["CNN+GNN"] == {"n": 1, "accuracy": 1.0}
    assert report["images"]["CNN+GNN"]["per_class"]["ig"]["recall"] == 1.0
