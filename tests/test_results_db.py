"""The results database under misuse (issue cases 4-6): two writers, a folder that changes between runs, damaged
and edited files, formula cells in CSV, and databases of the previous schema. Real files, real server, real CLI."""

from __future__ import annotations

import csv
import io
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_records import _frame

from leukograph.client.contract import UNIDENTIFIED
from leukograph.client.records import _SCHEMA_V1, SCHEMA_VERSION, CellRecord, ResultStore, SampleBusy
from leukograph.client.report import csv_text
from leukograph.deploy.server import TritonServer
from leukograph.training.datasets import load_bccd

LEUKOGRAPH = [sys.executable, "-m", "leukograph.client.cli"]
TIMEOUT_S = 300


def build_db(path: Path, frames: int = 200, sample: str = "S1") -> Path:
    with ResultStore(path) as store:
        store.start_sample(sample, target=100000, model_version="m1")
        for index in range(frames):
            store.record_frame(sample, None, _frame(index), source_key=f"test#{index}")
    return path  # closing the last connection checkpoints the WAL into the file


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LEUKOGRAPH, *args], capture_output=True, text=True, timeout=TIMEOUT_S)


def assert_one_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- case 6: damaged, emptied and edited files ---------------------------------------------------
@pytest.mark.parametrize("where", ["middle", "end"])
def test_garbage_in_the_file_is_one_line_naming_it(tmp_path: Path, where: str) -> None:
    db = build_db(tmp_path / "r.sqlite")
    data = bytearray(db.read_bytes())
    page = 4096
    start = (len(data) // page // 2) * page if where == "middle" else len(data) - 2 * page
    data[start:start + 2 * page] = (b"garbage!" * (2 * page // 8))
    db.write_bytes(bytes(data))
    line = assert_one_line(cli("report", "S1", "--db", str(db), "--json", "-"), str(db))
    assert "damaged" in line or "malformed" in line
    with pytest.raises(Exception) as caught:
        ResultStore(db)
    assert str(db) in str(caught.value) and type(caught.value).__name__ == "DatabaseProblem"


def test_zero_byte_database_is_refused(tmp_path: Path) -> None:
    db = build_db(tmp_path / "r.sqlite")
    db.write_bytes(b"")
    assert_one_line(cli("report", "S1", "--db", str(db), "--json", "-"), str(db), "empty file")
    with pytest.raises(Exception, match="empty file"):
        ResultStore(db)  # also for a writer: the sample is not silently started again
    assert db.stat().st_size == 0


def test_edited_label_fails_its_frame_checksum(tmp_path: Path) -> None:
    """`neutrophil` -> `eosinophil` in place passes integrity_check but not the frame checksum."""
    db = build_db(tmp_path / "r.sqlite", frames=20)
    data = db.read_bytes()
    offset = data.index(b"neutrophil", data.index(b"neutrophil") + 1)
    db.write_bytes(data[:offset] + b"eosinophil" + data[offset + len(b"neutrophil"):])
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with ResultStore(db, create=False) as store:
        failing = store.verify("S1")
    assert len(failing) == 1
    assert_one_line(cli("report", "S1", "--db", str(db), "--csv", "-"), str(db),
                    f"frame(s) {failing[0]} do not match their checksum")
    # An untouched database exports.
    clean = build_db(tmp_path / "clean.sqlite", frames=5)
    assert cli("report", "S1", "--db", str(clean), "--csv", "-").returncode == 0


def test_foreign_and_non_database_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database " * 1000)
    assert_one_line(cli("report", "S1", "--db", str(junk), "--json", "-"), str(junk))
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (text)")
    assert_one_line(cli("report", "S1", "--db", str(other), "--json", "-"), str(other), "not a leukograph")


def test_csv_export_escapes_formula_cells(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.start_sample("=HYPERLINK(\"http://x\")", target=100, model_version="+cmd|' /C calc'!A0")
        store.record_frame("=HYPERLINK(\"http://x\")", None, [CellRecord((1, 1, 9, 9), "wbc", UNIDENTIFIED)],
                           source_key="@SUM(1+1)")
        cells = store.cells("=HYPERLINK(\"http://x\")")
    rows = list(csv.DictReader(io.StringIO(csv_text(cells))))
    assert rows[0]["sample_id"] == "'=HYPERLINK(\"http://x\")"
    assert rows[0]["model_version"] == "'+cmd|' /C calc'!A0"
    assert rows[0]["x1"] == "1.0" and rows[0]["label"] == UNIDENTIFIED


def test_previous_schema_opens_and_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "v1.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript(_SCHEMA_V1)
        conn.execute("INSERT INTO samples VALUES ('OLD', '2026-01-01T00:00:00+00:00', 100, 'm0', '{}')")
        conn.execute("INSERT INTO frames (sample_id, frame_index, source, n_cells, model_version) "
                     "VALUES ('OLD', 0, 'cam#0', 1, 'm0')")
        conn.execute("INSERT INTO cells VALUES ('OLD', 0, 0, 1, 1, 9, 9, 'wbc', 'neutrophil', 0.9, NULL, 0, 1, "
                     "'m0', '2026-01-01T00:00:00+00:00')")
        conn.execute("PRAGMA user_version=1")
    with ResultStore(db) as store:
        assert store.verify("OLD") == []
        assert store.differential("OLD").counts["neutrophil"] == 1
        state = store.start_sample("OLD", target=100)
        assert state.resumed and state.last_frame_index == 0
        assert store.record_frame("OLD", None, _frame(1), source_key="new#1").frame_index == 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


# ---- case 4 (store level): one live writer per sample --------------------------------------------
def test_second_writer_is_refused_and_a_dead_ones_lease_is_taken_over(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    first = ResultStore(db)
    first.start_sample("S1", target=100)
    second = ResultStore(db)
    with pytest.raises(SampleBusy, match="being recorded by another writer"):
        second.start_sample("S1", target=100)
    with pytest.raises(SampleBusy):
        second.record_frame("S1", None, _frame(0), source_key="k0")
    second.start_sample("S2", target=100)  # another sample is free
    first.close()
    assert second.start_sample("S1", target=100).n_frames == 0  # released: taken
    second.close()
    # A writer SIGKILLed while holding the lease: its process is gone, so the lease is taken at once.
    code = ("import sys, time; from leukograph.client.records import ResultStore; "
            "s = ResultStore(sys.argv[1]); s.start_sample('S1', target=100); print('held', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with ResultStore(db) as third, pytest.raises(SampleBusy):
            third.start_sample("S1", target=100)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    with ResultStore(db) as third:
        assert not third.start_sample("S1", target=100).differential.n_wbc


# ---- cases 4 and 5 with the stream client and the real server -------------------------------------
def _jpeg_folder(folder: Path, names: list[str], sources: list[Path]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in zip(names, sources, strict=True):
        shutil.copy(source, folder / name)


def _recorded(db: Path, sample: str) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM frames WHERE sample_id = ?", (sample,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _wait_recorded(db: Path, sample: str, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _recorded(db, sample) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _stream(server: TritonServer, folder: Path, db: Path, sample: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*LEUKOGRAPH, "stream", str(folder), "--url", server.grpc_url, "--db", str(db),
                             "--sample", sample, "--target", "100000", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.server
def test_two_stream_writers_on_one_sample(triton_server: TritonServer, tmp_path: Path) -> None:
    """Case 4: the second client is refused with one line; the sample holds each frame once."""
    jpegs = [f.image_path for f in load_bccd()[:10]]
    folder, db = tmp_path / "frames", tmp_path / "r.sqlite"
    _jpeg_folder(folder, [f"{i:02d}.jpg" for i in range(10)], jpegs)
    first = _stream(triton_server, folder, db, "twice", "--max-fps", "4")
    _wait_recorded(db, "twice", 2, first)
    second = _stream(triton_server, folder, db, "twice")
    out, err = second.communicate(timeout=TIMEOUT_S)
    assert second.returncode != 0 and "Traceback" not in err, err
    refusals = [line for line in err.splitlines() if "error:" in line]
    assert len(refusals) == 1 and "being recorded by another writer" in refusals[0]
    out, err = first.communicate(timeout=TIMEOUT_S)
    assert first.returncode == 0, err
    with ResultStore(db, create=False) as store:
        frames = store.frames("twice")
    assert len(frames) == 10 and len({f["source_key"] for f in frames}) == 10


@pytest.mark.server
def test_folder_that_changed_after_a_kill(triton_server: TritonServer, tmp_path: Path) -> None:
    """Case 5: 20 images, SIGKILL after 10 frames, an image that sorts first is added: the re-run records the 10
    left plus the new one, and no image twice."""
    jpegs = [f.image_path for f in load_bccd()[:21]]
    folder, db = tmp_path / "frames", tmp_path / "r.sqlite"
    _jpeg_folder(folder, [f"{i + 1:02d}.jpg" for i in range(20)], jpegs[:20])
    client = _stream(triton_server, folder, db, "shifted", "--max-fps", "4")
    _wait_recorded(db, "shifted", 10, client)
    client.send_signal(signal.SIGKILL)
    client.wait(30)
    killed_at = _recorded(db, "shifted")
    assert 10 <= killed_at < 20
    shutil.copy(jpegs[20], folder / "00.jpg")  # sorts first
    rerun = _stream(triton_server, folder, db, "shifted", "--json-summary", str(tmp_path / "s.json"))
    out, err = rerun.communicate(timeout=TIMEOUT_S)
    assert rerun.returncode == 0, err
    assert f"{20 - killed_at + 1} recorded" in out and f"{killed_at} already recorded" in out
    with ResultStore(db, create=False) as store:
        frames = store.frames("shifted")
        assert store.verify("shifted") == []
    names = [Path(f["source"]).name for f in frames]
    assert sorted(names) == [f"{i:02d}.jpg" for i in range(21)]  # every image once, the new one too
    assert [f["frame_index"] for f in frames] == list(range(21))


@pytest.mark.server
def test_stream_on_a_damaged_or_emptied_database_is_one_line(triton_server: TritonServer, tmp_path: Path) -> None:
    """Case 6 for the writer: `stream` refuses a damaged or zero-byte database by name, records nothing."""
    folder = tmp_path / "frames"
    _jpeg_folder(folder, ["a.jpg"], [load_bccd()[0].image_path])
    damaged = build_db(tmp_path / "damaged.sqlite")
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2: len(data) // 2 + 8192] = b"garbage!" * 1024
    damaged.write_bytes(bytes(data))
    emptied = build_db(tmp_path / "emptied.sqlite")
    emptied.write_bytes(b"")
    for db in (damaged, emptied):
        proc = _stream(triton_server, folder, db, "S1")
        out, err = proc.communicate(timeout=TIMEOUT_S)
        assert_one_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), str(db))
    assert emptied.stat().st_size == 0
