"""`leukograph report`: CSV and JSON from a recorded sample, through the installed script and cli.main."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from leukograph.client.cli import main as cli_main
from leukograph.client.contract import CLASSES, NUM_CLASSES, UNIDENTIFIED
from leukograph.client.differential import label_cell
from leukograph.client.records import DEFAULT_DB, CellRecord, ResultStore
from leukograph.client.report import CSV_COLUMNS
from leukograph.client.tracking import CellTracker
from leukograph.training.datasets import held_out_frames, load_bccd

LEUKOGRAPH = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "leukograph"
THRESHOLD = 0.6


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two held-out BCCD fields, 4 jittered frames each, tracked and labelled like the stream client does.
    The WBCs of the first field are unsure at first (review), the second field's are unsure throughout."""
    path = tmp_path_factory.mktemp("report") / DEFAULT_DB
    held = held_out_frames()
    fields = [f for f in load_bccd() if f.frame_id in held and f.frame_label][:2]
    rng = np.random.default_rng(0)
    tracker = CellTracker()
    with ResultStore(path) as store:
        store.start_sample("SMEAR-1", target=100, model_version="test-1", settings={"threshold": THRESHOLD})
        index = 0
        for field_no, field in enumerate(fields):
            boxes = np.array([b.box for b in field.boxes])
            for repeat in range(4):
                jittered = boxes + rng.normal(0, 1.5, boxes.shape)
                ids = tracker.update(jittered, index)
                cells = []
                for box, b, track in zip(jittered, field.boxes, ids, strict=True):
                    name = field.frame_label if b.kind == "wbc" else b.kind
                    top = 0.9 if b.kind != "wbc" or (field_no == 0 and repeat >= 2) else 0.45
                    probs = np.full(NUM_CLASSES, (1 - top) / (NUM_CLASSES - 1))
                    probs[CLASSES.index(name)] = top
                    cells.append(CellRecord(tuple(box), b.kind, label_cell(probs, THRESHOLD, b.kind),
                                            probs.tolist(), track))
                store.record_frame("SMEAR-1", index, cells, source="test", latency_ms=20.0)
                index += 1
    return path


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(LEUKOGRAPH), "report", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_json_report_via_script(db: Path) -> None:
    result = _run("SMEAR-1", "--db", str(db), "--json", "-")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sample"]["sample_id"] == "SMEAR-1" and report["sample"]["target"] == 100
    assert report["sample"]["settings"] == {"threshold": THRESHOLD} and report["sample"]["n_frames"] == 8
    diff = report["differential"]
    with ResultStore(db, create=False) as store:
        cells = store.cells("SMEAR-1")
        assert diff == json.loads(json.dumps(store.differential("SMEAR-1").summary().to_dict()))
    wbc_tracks = {c["track_id"] for c in cells if c["kind"] == "wbc"}
    first_field_wbc = {c["track_id"] for c in cells if c["kind"] == "wbc" and c["frame_index"] < 4}
    # field 1's WBCs were upgraded from review; field 2's stay in review
    assert diff["n_wbc"] == len(first_field_wbc) >= 1
    assert diff["n_unidentified"] == len(wbc_tracks - first_field_wbc) >= 1
    review = report["review"]
    assert len(review) == diff["n_unidentified"] and all(c["label"] == UNIDENTIFIED for c in review)
    assert {c["track_id"] for c in review} == wbc_tracks - first_field_wbc
    assert len(report["cells"]) == len(cells)
    for row in diff["rows"]:
        if row["count"]:
            assert row["ci_low"] < row["percent"] <= row["ci_high"]


def test_csv_report_via_script_and_cli_main(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "cells.csv"
    result = _run("SMEAR-1", "--db", str(db), "--csv", str(out))
    assert result.returncode == 0 and result.stdout == "", result.stderr
    rows = list(csv.DictReader(out.open()))
    assert tuple(rows[0]) == CSV_COLUMNS
    with ResultStore(db, create=False) as store:
        cells = store.cells("SMEAR-1")
    assert len(rows) == len(cells)
    assert [int(r["track_id"]) for r in rows] == [c["track_id"] for c in cells]
    assert float(rows[0][f"p_{CLASSES[0]}"]) == pytest.approx(cells[0]["probs"][CLASSES[0]])
    assert sum(int(r["counted"]) for r in rows) == sum(c["counted"] for c in cells)
    # the same through cli.main, to stdout
    out2 = tmp_path / "cells2.csv"
    assert cli_main(["report", "SMEAR-1", "--db", str(db), "--csv", str(out2)]) == 0
    assert out2.read_text() == out.read_text()


def test_cli_main_json_to_stdout(db: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["report", "SMEAR-1", "--db", str(db), "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"sample", "differential", "review", "cells", "verification"}


def test_default_db_is_current_directory(db: Path, tmp_path: Path) -> None:
    (tmp_path / DEFAULT_DB).write_bytes(db.read_bytes())  # closed store: the WAL was checkpointed
    result = _run("SMEAR-1", "--csv", "-", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list(csv.DictReader(io.StringIO(result.stdout)))) > 10


def test_bad_input_gives_one_line_error(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for args, message in [
        (["NOPE", "--db", str(db), "--json", "-"], "unknown sample 'NOPE'"),
        (["SMEAR-1", "--db", str(tmp_path / "missing.sqlite"), "--csv", "-"], "no result database"),
        (["SMEAR-1", "--db", str(db), "--csv", str(tmp_path / "no" / "dir.csv")], "cannot write"),
    ]:
        result = _run(*args)
        assert result.returncode != 0 and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and lines[0].startswith("leukograph report: error:")
        assert cli_main(["report", *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "missing.sqlite").exists()  # reporting never creates a database
    # format: exactly one of --csv / --json (argparse usage error)
    assert _run("SMEAR-1", "--db", str(db)).returncode == 2
    assert _run("SMEAR-1", "--db", str(db), "--csv", "-", "--json", "-").returncode == 2
    with pytest.raises(SystemExit):
        cli_main(["report", "SMEAR-1", "--db", str(db)])
