"""SQLite result store: idempotent frames, resume, atomic frames, schema version, survival of SIGKILL."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from leukograph.client.contract import CLASSES, NUM_CLASSES, UNIDENTIFIED
from leukograph.client.errors import UserError
from leukograph.client.records import DEFAULT_DB, SCHEMA_VERSION, CellRecord, ResultStore


def _cell(i: int, label: str, track: int | None, kind: str = "wbc", top: float = 0.9) -> CellRecord:
    probs = np.full(NUM_CLASSES, (1 - top) / (NUM_CLASSES - 1))
    probs[CLASSES.index(label if label != UNIDENTIFIED else "monocyte")] = top
    return CellRecord((10.0 * i, 0.0, 10.0 * i + 8, 8.0), kind, label, probs.tolist(), track)


def _frame(frame_index: int) -> list[CellRecord]:
    """Three still cells seen in every frame (tracks 0-2) and one new neutrophil per frame."""
    return [_cell(0, "lymphocyte", 0), _cell(1, "platelet", 1, kind="platelet"),
            _cell(2, UNIDENTIFIED if frame_index < 3 else "monocyte", 2, top=0.4 if frame_index < 3 else 0.8),
            _cell(3, "neutrophil", 1000 + frame_index)]


def test_default_db_is_in_current_directory() -> None:
    assert DEFAULT_DB == "leukograph.sqlite"


def test_record_is_idempotent_and_counts_each_cell_once(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "r.sqlite")
    state = store.start_sample("S1", target=100, model_version="m1", settings={"threshold": 0.6})
    assert not state.resumed and state.last_frame_index is None and state.next_track_id == 0
    first = store.record_frame("S1", 0, _frame(0), source="cam0", captured_at=1.0e9, latency_ms=12.5)
    assert first and first.counted == (True, True, True, True)
    again = store.record_frame("S1", 0, _frame(0))  # a client retry
    assert not again and again.counted == (False,) * 4
    for index in range(1, 6):
        assert store.record_frame("S1", index, _frame(index))
    diff = state.differential  # live, updated by record_frame
    assert diff.counts["lymphocyte"] == 1 and diff.counts["monocyte"] == 1 and diff.n_platelets == 1
    assert diff.counts["neutrophil"] == 6 and diff.n_unidentified == 0  # track 2 upgraded at frame 3
    assert store.differential("S1") == diff
    cells = store.cells("S1")
    assert len(cells) == 6 * 4 and len(store.frames("S1")) == 6
    assert sum(c["counted"] for c in cells) == 1 + 1 + 2 + 6  # track 2: review at frame 0, monocyte at 3
    assert cells[0]["probs"]["lymphocyte"] == pytest.approx(0.9) and cells[0]["confidence"] == pytest.approx(0.9)
    assert store.frames("S1")[0]["captured_at"].startswith("2001-09-09T01:46:40")
    with pytest.raises(sqlite3.IntegrityError):  # the database itself refuses duplicates
        store._db.execute("INSERT INTO frames (sample_id, frame_index, n_cells, model_version) "
                          "VALUES ('S1', 0, 0, 'm1')")


def test_review_list_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    with ResultStore(path) as store:
        store.start_sample("S1", target=100, model_version="m1")
        for index in range(3):
            store.record_frame("S1", index, _frame(index))
        assert [(c["frame_index"], c["track_id"]) for c in store.review("S1")] == [(0, 2)]
        live = store.differential("S1")
    with ResultStore(path) as store:  # a restarted client
        state = store.start_sample("S1", target=100, model_version="m2")
        assert state.resumed and state.last_frame_index == 2 and state.n_frames == 3
        assert state.differential == live and state.next_track_id == 1003
        assert state.model_version == "m1"  # the sample keeps its first version; frames record theirs
        assert not store.record_frame("S1", 2, _frame(2))  # re-sent last frame: no double count
        assert store.record_frame("S1", 3, _frame(3))
        assert state.differential.n_unidentified == 0 and state.differential.counts["monocyte"] == 1
        assert store.review("S1") == []
        assert store.sample("S1")["model_versions"] == ["m1", "m2"]
        with pytest.raises(UserError, match="target 100"):
            store.start_sample("S1", target=200)
        with pytest.raises(UserError, match="unknown sample"):
            store.record_frame("nope", 0, _frame(0))


def test_frame_is_atomic(tmp_path: Path) -> None:
    """A failure in the middle of a frame's cells leaves neither the frame nor any cell nor any count."""
    store = ResultStore(tmp_path / "r.sqlite")
    state = store.start_sample("S1")
    store._db.execute("CREATE TEMP TRIGGER fail_third BEFORE INSERT ON cells WHEN NEW.cell_index = 2 "
                      "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    with pytest.raises(sqlite3.IntegrityError, match="disk says no"):
        store.record_frame("S1", 0, _frame(0))
    assert store.frames("S1") == [] and store.cells("S1") == [] and state.differential.n_wbc == 0
    store._db.execute("DROP TRIGGER fail_third")
    assert store.record_frame("S1", 0, _frame(0))  # the retry is new
    assert len(store.cells("S1")) == 4 and state.differential.n_wbc == 2
    with pytest.raises(ValueError, match="unknown label"):
        store.record_frame("S1", 1, [CellRecord((0, 0, 5, 5), "wbc", "smudge")])
    assert len(store.frames("S1")) == 1


def test_schema_version_wal_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    ResultStore(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(UserError, match="newer"):
        ResultStore(path)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(UserError, match="not a leukograph"):
        ResultStore(other)
    with pytest.raises(UserError, match="no result database"):
        ResultStore(tmp_path / "missing.sqlite", create=False)
    (tmp_path / "junk.sqlite").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(UserError, match="cannot open"):
        ResultStore(tmp_path / "junk.sqlite")


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_records import _frame
    from leukograph.client.records import ResultStore
    store = ResultStore({path!r})
    state = store.start_sample("S1", target=100000, model_version="m1")
    start = 0 if state.last_frame_index is None else state.last_frame_index + 1
    for index in range(start, start + 100000):
        store.record_frame("S1", index, _frame(index))
        print(index, flush=True)
""")


def test_sigkill_mid_stream_loses_nothing_committed_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite"
    script = WRITER.format(tests=str(Path(__file__).parent), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    committed = -1
    for line in proc.stdout:  # each line is printed after its frame committed
        committed = int(line)
        if committed >= 40:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with ResultStore(path) as store:
        frames = [f["frame_index"] for f in store.frames("S1")]
        assert frames == list(range(len(frames))) and len(frames) >= committed + 1  # all there, once each
        cells = store.cells("S1")
        assert len(cells) == 4 * len(frames)  # no half-written frame
        state = store.start_sample("S1", target=100000)
        assert state.last_frame_index == len(frames) - 1
        assert state.differential.counts["neutrophil"] == len(frames)
        assert state.differential.counts["lymphocyte"] == 1
    # the restarted writer continues after the last committed frame
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    resumed_first = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert resumed_first == len(frames)
    with ResultStore(path) as store:
        frames = [f["frame_index"] for f in store.frames("S1")]
        assert frames == list(range(len(frames)))
        assert store.differential("S1").counts["neutrophil"] == len(frames)


def test_concurrent_creation_of_a_new_database(tmp_path: Path) -> None:
    """Several processes opening the same new database at once: one creates the schema, none fails."""
    path = tmp_path / "race.sqlite"
    code = "import sys; from leukograph.client.records import ResultStore; ResultStore(sys.argv[1]).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
