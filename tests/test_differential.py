"""Differential counts, percentages and Wilson intervals; the confidence rule of label_cell."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from leukograph.client.contract import CLASSES, NUM_CLASSES, UNIDENTIFIED, WBC_CLASSES
from leukograph.client.differential import (
    DEFAULT_THRESHOLD,
    Differential,
    label_cell,
    label_cells,
    wilson_interval,
)


def _wilson_closed_form(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Independent reference: the Wilson score interval from its textbook formula."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def _probs(label: str, top: float) -> np.ndarray:
    p = np.full(NUM_CLASSES, (1.0 - top) / (NUM_CLASSES - 1))
    p[CLASSES.index(label)] = top
    return p


def test_wilson_interval_matches_known_values() -> None:
    # The lab's sanity figure: n = 100, p = 5% gives roughly 2-11%.
    low, high = wilson_interval(5, 100)
    assert low == pytest.approx(0.02154, abs=1e-5) and high == pytest.approx(0.11175, abs=1e-5)
    for k, n in [(0, 100), (1, 100), (30, 100), (60, 200), (100, 100), (7, 13)]:
        assert wilson_interval(k, n) == pytest.approx(_wilson_closed_form(k, n), abs=1e-9)
    assert wilson_interval(0, 0) is None
    # a 99% interval is wider
    low99, high99 = wilson_interval(5, 100, confidence=0.99)
    assert low99 < low and high99 > high


def test_summary_percentages_exclude_unidentified_and_report_platelets_per_100() -> None:
    labels = (["neutrophil"] * 60 + ["lymphocyte"] * 30 + ["monocyte"] * 5 + ["eosinophil"] * 5
              + [UNIDENTIFIED] * 4 + ["platelet"] * 13 + ["rbc"] * 50)
    diff = Differential.from_labels(labels, target=100)
    s = diff.summary()
    assert s.n_wbc == 100 and s.n_unidentified == 4 and s.complete and diff.is_complete
    assert sum(r.percent for r in s.rows) == pytest.approx(100.0)
    assert [r.name for r in s.rows] == list(WBC_CLASSES)
    eos = s.row("eosinophil")
    assert eos.percent == pytest.approx(5.0)
    assert (eos.ci_low, eos.ci_high) == pytest.approx((2.154, 11.175), abs=1e-3)
    for r in s.rows:
        ref = binomtest(r.count, 100).proportion_ci(method="wilson")
        assert (r.ci_low, r.ci_high) == pytest.approx((100 * ref.low, 100 * ref.high))
    # platelets per 100 WBC over identified + review WBCs
    assert s.platelets_per_100_wbc == pytest.approx(100 * 13 / 104)
    assert s.n_rbc == 50
    d = s.to_dict()
    assert d["ci_method"] == "wilson" and d["rows"][0]["name"] == "neutrophil"


def test_empty_and_target_200() -> None:
    s = Differential(target=200).summary()
    assert s.n_wbc == 0 and s.platelets_per_100_wbc is None
    assert all(r.percent is None and r.ci_low is None for r in s.rows)
    diff = Differential.from_labels(["lymphocyte"] * 150, target=200)
    assert not diff.is_complete and diff.remaining == 50
    with pytest.raises(ValueError):
        Differential(target=0)
    with pytest.raises(ValueError):
        Differential().add("smudge")


def test_label_cell_threshold_rule() -> None:
    assert label_cell(_probs("monocyte", 0.9), 0.6, kind="wbc") == "monocyte"
    assert label_cell(_probs("monocyte", 0.5), 0.6, kind="wbc") == UNIDENTIFIED
    assert label_cell(_probs("monocyte", 0.6), 0.6, kind="wbc") == "monocyte"  # at threshold: confident
    # kind unknown: the classifier's argmax decides whether it is a WBC
    assert label_cell(_probs("monocyte", 0.5), 0.6) == UNIDENTIFIED
    # non-WBC cells always keep their argmax, even when unsure
    assert label_cell(_probs("platelet", 0.3), 0.6, kind="platelet") == "platelet"
    assert label_cell(_probs("platelet", 0.3), 0.6) == "platelet"
    # a WBC box the classifier calls a red cell: localiser and classifier disagree -> review
    assert label_cell(_probs("rbc", 0.99), 0.6, kind="wbc") == UNIDENTIFIED
    assert label_cells(np.stack([_probs("neutrophil", 0.99), _probs("eosinophil", 0.4)]), DEFAULT_THRESHOLD,
                       ["wbc", "wbc"]) == ["neutrophil", UNIDENTIFIED]
    with pytest.raises(ValueError):
        label_cell(np.ones(NUM_CLASSES - 1) / 5, 0.6)
    with pytest.raises(ValueError):
        label_cell(_probs("monocyte", 0.9), 0.6, kind="nucleus")


def test_observe_counts_each_track_once_and_upgrades_unidentified() -> None:
    diff = Differential(target=3)
    assert diff.observe(UNIDENTIFIED, track_id=1)  # first seen unsure: review bucket
    assert not diff.observe(UNIDENTIFIED, track_id=1)
    assert diff.observe("neutrophil", track_id=1)  # first confident class replaces review
    assert diff.counts["neutrophil"] == 1 and diff.n_unidentified == 0
    assert not diff.observe("lymphocyte", track_id=1)  # a WBC class is final
    assert diff.track_label(1) == "neutrophil"
    assert diff.observe("platelet", track_id=2) and not diff.observe("platelet", track_id=2)
    assert diff.observe("lymphocyte")  # untracked: counted every time
    assert diff.observe("lymphocyte")
    assert diff.is_complete and diff.n_wbc == 3
    assert not diff.observe("monocyte", track_id=9)  # complete: nothing more is counted
    assert diff.n_wbc == 3 and diff.n_platelets == 1


def test_markdown_table_is_readable() -> None:
    diff = Differential.from_labels(["neutrophil"] * 95 + ["eosinophil"] * 5 + [UNIDENTIFIED] * 2
                                    + ["platelet"] * 10)
    text = diff.to_markdown()
    assert "| Eosinophil | 5 | 5.0 | 2.2-11.2 |" in text
    assert "NOT in the percentages): 2" in text
    assert "Platelets: 10 (9.8 per 100 WBC" in text
    assert "complete" in text
    assert "incomplete: 100 more" in Differential().to_markdown()


def test_localiser_and_classifier_disagreement_goes_to_review() -> None:
    lymphocyte = np.zeros(len(CLASSES))
    lymphocyte[CLASSES.index("lymphocyte")] = 0.95
    lymphocyte[CLASSES.index("rbc")] = 0.05
    assert label_cell(lymphocyte, 0.6, kind="wbc") == "lymphocyte"
    assert label_cell(lymphocyte, 0.6, kind="rbc") == UNIDENTIFIED  # an RBC box is never counted as a WBC unseen
    rbc = np.zeros(len(CLASSES))
    rbc[CLASSES.index("rbc")] = 1.0
    assert label_cell(rbc, 0.6, kind="rbc") == "rbc"
    assert label_cell(rbc, 0.6, kind="wbc") == UNIDENTIFIED


def test_ig_and_nrbc_are_reported_beside_the_hundred() -> None:
    """Five classes count to 100; IG is a % of white cells, NRBC per 100 WBC, neither in the 100."""
    labels = (["neutrophil"] * 55 + ["eosinophil"] * 3 + ["basophil"] * 2 + ["lymphocyte"] * 32 + ["monocyte"] * 8
              + ["ig"] * 4 + ["nrbc"] * 6 + [UNIDENTIFIED] * 3)
    diff = Differential.from_labels(labels, target=100)
    s = diff.summary()
    assert [r.name for r in s.rows] == ["neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte"]
    assert s.n_wbc == 100 and s.complete and diff.remaining == 0
    assert sum(r.count for r in s.rows) == 100 and sum(r.percent for r in s.rows) == pytest.approx(100.0)
    assert s.n_ig == 4 and s.ig_percent == pytest.approx(100 * 4 / 104)
    ref = binomtest(4, 104).proportion_ci(method="wilson")
    assert (s.ig_ci_low, s.ig_ci_high) == pytest.approx((100 * ref.low, 100 * ref.high))
    assert s.n_nrbc == 6 and s.nrbc_per_100_wbc == pytest.approx(6.0)
    assert s.n_unidentified == 3
    d = s.to_dict()
    assert d["n_ig"] == 4 and d["nrbc_per_100_wbc"] == pytest.approx(6.0)
    text = diff.to_markdown()
    assert "Immature granulocytes (IG, not in the 100): 4, 3.8% of white cells" in text
    assert "NRBC (not in the 100): 6, 6.0 per 100 WBC" in text
    # IG and NRBC never complete a sample
    flagged_only = Differential.from_labels(["ig"] * 150 + ["nrbc"] * 150, target=100)
    assert flagged_only.n_wbc == 0 and not flagged_only.is_complete
    # a confident IG / NRBC on a WBC box is counted under its class; unsure goes to review
    assert label_cell(_probs("ig", 0.9), 0.6, kind="wbc") == "ig"
    assert label_cell(_probs("nrbc", 0.9), 0.6, kind="wbc") == "nrbc"
    assert label_cell(_probs("nrbc", 0.4), 0.6, kind="wbc") == UNIDENTIFIED
    assert label_cell(_probs("ig", 0.9), 0.6, kind="rbc") == UNIDENTIFIED


def test_unidentified_threshold_is_the_validation_choice() -> None:
    """The contract's threshold is the one `leukograph train` chose on the validation auto-accept curve."""
    import json

    from leukograph.client.contract import UNIDENTIFIED_THRESHOLD
    from leukograph.deploy.paths import WEIGHTS_DIR

    calibration = json.loads((WEIGHTS_DIR / "calibration.json").read_text())
    assert pytest.approx(calibration["threshold"]["threshold"]) == UNIDENTIFIED_THRESHOLD
    assert DEFAULT_THRESHOLD == UNIDENTIFIED_THRESHOLD
    point = next(p for p in calibration["auto_accept_curve"] if p["threshold"] == calibration["threshold"]["threshold"])
    assert point["accepted"] == calibration["threshold"]["accepted"]


def test_released_flagged_shift_is_the_calibration_s() -> None:
    """gnn.pt's shift of the flagged classes is the one `leukograph train` fitted on validation (calibration.json)."""
    import json

    import torch

    from leukograph.client.contract import CLASSES, FLAGGED_CLASSES
    from leukograph.deploy.paths import WEIGHTS_DIR

    calibration = json.loads((WEIGHTS_DIR / "calibration.json").read_text())
    released = torch.load(WEIGHTS_DIR / "gnn.pt", weights_only=True)["model"]["class_bias"]
    for name in FLAGGED_CLASSES:
        assert float(released[CLASSES.index(name)]) == pytest.approx(calibration["flagged_bias"][name], rel=1e-6)
    assert float(released.abs().sum()) == pytest.approx(sum(abs(v) for v in calibration["flagged_bias"].values()))
