"""`leukograph tradeoff` on the committed CNN: its accuracy columns are the CNN-only figures `leukograph evaluate`
committed for the same weights (two scoring paths over the same test cells), and bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from leukograph.deploy.paths import REPO_ROOT

CLI = [sys.executable, "-m", "leukograph.client.cli", "tradeoff"]
COMMITTED_CNN = REPO_ROOT / "training" / "weights" / "cnn.pt"
EVALUATION = REPO_ROOT / "docs" / "results" / "evaluation.json"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)


def test_tradeoff_scores_the_committed_cnn_as_evaluate_does(tmp_path: Path) -> None:
    readme = (REPO_ROOT / "README.md").read_bytes()
    out = tmp_path / "tradeoff.json"
    result = run_cli(str(COMMITTED_CNN), "--no-readme", "--json", str(out), "--threads", "1")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(out.read_text())["rows"]
    committed = json.loads(EVALUATION.read_text())
    cnn_only = "CNN only"
    assert row["epoch"] == committed["weights"]["cnn"]["epoch"]  # the evaluation is of this checkpoint
    assert row["four_class_test_images"] == pytest.approx(committed["4class_test"]["images"][cnn_only]["accuracy"])
    # tradeoff's "PBC test, 5 WBC" is the likeliest of the five white-cell classes: `classify`'s answer
    assert row["pbc_test_five_wbc"] == pytest.approx(committed["pbc_test"]["wbc_answer"][cnn_only]["accuracy"])
    assert row["pbc_test_nucleated"] == pytest.approx(committed["pbc_test"]["images"][cnn_only]["accuracy"])
    assert row["bccd_heldout_images"] == pytest.approx(
        committed["bccd_heldout"][cnn_only]["wbc_nodes"]["accuracy"])
    assert (row["crop"], row["width"]) == (64, 32)
    assert row["macs_per_crop"] == 41_296_448  # README "Capacity": 41.3 M multiply-adds per 64 px crop at width 32
    assert row["ms_per_cell_ort_1_thread"]["cpu"] > 0.0
    assert "| 64 | 32 | 296,297 | 41.3 |" in result.stdout
    assert (REPO_ROOT / "README.md").read_bytes() == readme  # --no-readme leaves the README alone


@pytest.mark.parametrize(("args", "message"), [
    (["missing-cnn.pt"], "checkpoint(s) not found: missing-cnn.pt"),
    ([str(COMMITTED_CNN), "--cnn-blend", "1.5"], "--cnn-blend values must be in [0, 1)"),
])
def test_tradeoff_bad_input_is_one_line(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
