"""The LIS result lines: the five WBC classes to 100, IG (% of white cells) and NRBC (per 100 WBC) beside them."""

from __future__ import annotations

import pytest

from leukograph.client.contract import WBC_CLASSES
from leukograph.client.differential import Differential
from leukograph.client.lis_export import result_lines


def test_flagged_cells_are_reported_beside_the_100() -> None:
    diff = Differential(100)
    for label in ["neutrophil"] * 8 + ["lymphocyte"] * 2 + ["ig"] + ["nrbc"] * 2:
        diff.add(label)
    lines = {line.name: line for line in result_lines(diff.summary().to_dict())}
    assert sum(lines[name].value for name in WBC_CLASSES if name in lines) == pytest.approx(100.0)
    assert lines["ig"].code == "71695-1" and lines["ig"].value == pytest.approx(round(100 / 11, 1))
    assert lines["ig"].ci_low is not None and lines["ig"].ci_low < lines["ig"].value < lines["ig"].ci_high
    assert lines["nrbc"].code == "58413-6" and lines["nrbc"].value == pytest.approx(20.0)
    assert lines["nrbc"].unit == "/100{WBCs}"


def test_no_flagged_line_without_flagged_cells() -> None:
    diff = Differential(100)
    diff.add("monocyte", 3)
    assert [line.name for line in result_lines(diff.summary().to_dict())] == list(WBC_CLASSES)  # every class, 0 too
