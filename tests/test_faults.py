"""`leukograph stream` under faults, with real Triton servers (own instances on free ports where they are killed).

* server down when the client starts, up a few seconds later: the client waits and records every frame;
* server SIGKILLed mid-stream and restarted: every frame recorded exactly once, the failed ones re-sent;
* unopenable sources: one-line error, non-zero exit, no traceback;
* --realtime faster than the server: oldest waiting frames dropped and counted, the queue stays bounded;
* SIGTERM / Ctrl-C: requests in flight finished and recorded, summary printed, exit 0 / 130.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_stream import LEUKOGRAPH, N_FRAMES, write_mjpg_avi, write_png_folder

from leukograph.client import contract
from leukograph.client.contract import stage_path
from leukograph.client.images import read_image
from leukograph.client.records import ResultStore
from leukograph.deploy.paths import MODEL_REPOSITORY
from leukograph.deploy.runners import OrtRunner
from leukograph.deploy.server import TritonServer, free_port

pytestmark = pytest.mark.server
START_TIMEOUT_S = 120.0
CLIENT_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fault_frames") / "frames"
    write_png_folder(folder)
    return folder


SHM = Path("/dev/shm")
STUB_REGION = "triton_python_backend_shm_region_*"


@pytest.fixture()
def own_server(served_repository: Path, tmp_path: Path) -> Iterator[TritonServer]:
    """A server of this test only (not started): free ports, its own log. A SIGKILLed server cannot remove its
    python-backend stubs' shared-memory regions, so the ones it leaves behind are removed here."""
    before = set(SHM.glob(STUB_REGION))
    server = TritonServer(served_repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          log_path=tmp_path / "tritonserver.log")
    try:
        yield server
    finally:
        server.stop()
        for region in set(SHM.glob(STUB_REGION)) - before:
            region.unlink(missing_ok=True)


def start_client(server: TritonServer, source: Path, db: Path, sample: str, summary: Path,
                 *extra: str) -> subprocess.Popen:
    cmd = [*LEUKOGRAPH, "stream", str(source), "--url", server.grpc_url, "--db", str(db), "--sample", sample,
           "--target", "200", "--json-summary", str(summary), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def recorded_frames(db: Path, sample: str) -> int:
    """Frames recorded so far, read-only with plain sqlite3 (opening a ResultStore here could race the client's
    schema creation on a fresh file)."""
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            return conn.execute("SELECT count(*) FROM frames WHERE sample_id = ?", (sample,)).fetchone()[0]
    except sqlite3.OperationalError:  # no schema yet
        return 0


def wait_for_frames(db: Path, sample: str, count: int, client: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while recorded_frames(db, sample) < count:
        assert client.poll() is None, f"client exited early: {client.communicate()}"
        assert time.monotonic() < deadline, f"fewer than {count} frames recorded after {timeout} s"
        time.sleep(0.02)


def finish(client: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = client.communicate(timeout=CLIENT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        client.kill()
        out, err = client.communicate()
        pytest.fail(f"client did not finish:\n{out}\n{err}")
    return client.returncode, out, err


def kill_server(server: TritonServer) -> None:
    """SIGKILL the server and its python-backend stubs (its own process group): no graceful shutdown."""
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait()


@functools.cache
def served_detector() -> OrtRunner:
    """The cell_detector graph the servers here serve, in-process."""
    path = stage_path(MODEL_REPOSITORY, contract.CELL_DETECTOR, contract.MODEL_FILES["onnxruntime"])
    return OrtRunner(path, contract.CELL_DETECTOR)


def assert_every_frame_once(db: Path, sample: str, png_folder: Path) -> None:
    """Frames 0..N-1 each recorded once, with as many cells as the served detector finds in that frame."""
    expected_cells = [int(served_detector().infer({contract.FRAME.name: read_image(p)})[contract.CELL_COUNT.name][0])
                      for p in sorted(png_folder.iterdir())]
    with ResultStore(db, create=False) as store:
        frames = store.frames(sample)
        cells = store.cells(sample)
    assert [f["frame_index"] for f in frames] == list(range(N_FRAMES))
    assert [f["n_cells"] for f in frames] == expected_cells
    keys = [(c["frame_index"], c["cell_index"]) for c in cells]
    assert len(keys) == len(set(keys)) == sum(expected_cells)


def test_server_down_at_start(own_server: TritonServer, png_folder: Path, tmp_path: Path) -> None:
    db, summary_path = tmp_path / "r.sqlite", tmp_path / "s.json"
    client = start_client(own_server, png_folder, db, "late-server", summary_path, "--retry-timeout", "120")
    time.sleep(3.0)
    assert client.poll() is None, "the client must wait for the server"
    own_server.start(START_TIMEOUT_S)
    code, out, err = finish(client)
    assert code == 0, err
    assert "not ready" in err and "waiting up to 120 s" in err
    summary = json.loads(summary_path.read_text())
    assert summary["frames"]["recorded"] == N_FRAMES
    assert_every_frame_once(db, "late-server", png_folder)


def test_server_killed_and_restarted_mid_stream(own_server: TritonServer, png_folder: Path, tmp_path: Path) -> None:
    db, summary_path = tmp_path / "r.sqlite", tmp_path / "s.json"
    own_server.start(START_TIMEOUT_S)
    # 4 frames/s: the stream lasts ~2.5 s, long enough to kill the server in the middle of it.
    client = start_client(own_server, png_folder, db, "killed-server", summary_path, "--max-fps", "4",
                          "--retry-timeout", "120")
    wait_for_frames(db, "killed-server", 3, client)
    kill_server(own_server)
    killed_at = recorded_frames(db, "killed-server")
    assert killed_at < N_FRAMES, "the stream ended before the kill; slow it down"
    time.sleep(1.0)
    own_server.start(START_TIMEOUT_S)  # same ports
    code, out, err = finish(client)
    assert code == 0, err
    assert "server unavailable" in err and "server back; re-sending" in err
    summary = json.loads(summary_path.read_text())
    frames = summary["frames"]
    assert frames["recorded"] == N_FRAMES and frames["retried"] >= 1
    assert frames["failed"] == frames["unrecorded"] == frames["dropped"] == 0
    assert_every_frame_once(db, "killed-server", png_folder)


def test_gives_up_after_retry_timeout_and_resumes_later(own_server: TritonServer, png_folder: Path,
                                                        tmp_path: Path) -> None:
    """Server gone for longer than --retry-timeout: one-line error, exit 1, frames so far kept; a re-run completes."""
    db, summary_path = tmp_path / "r.sqlite", tmp_path / "s.json"
    own_server.start(START_TIMEOUT_S)
    client = start_client(own_server, png_folder, db, "gone", summary_path, "--max-fps", "4", "--retry-timeout", "2")
    wait_for_frames(db, "gone", 2, client)
    kill_server(own_server)
    code, out, err = finish(client)
    assert code == 1, err
    assert "server unavailable for 2 s" in err and "Traceback" not in err
    partial = recorded_frames(db, "gone")
    assert 2 <= partial < N_FRAMES
    own_server.start(START_TIMEOUT_S)
    rerun = start_client(own_server, png_folder, db, "gone", summary_path)
    code, out, err = finish(rerun)
    assert code == 0, err
    summary = json.loads(summary_path.read_text())
    assert summary["frames"]["already_recorded"] == partial
    assert summary["frames"]["recorded"] == N_FRAMES - partial
    assert_every_frame_once(db, "gone", png_folder)


@pytest.mark.parametrize("source, message", [
    ("missing.avi", "no such file or directory"),
    ("not_a_video.avi", "cannot open video"),
    ("9", "cannot open camera 9"),
    ("ftp://example.invalid/x", "unsupported source URL scheme"),
    ("rtsp://127.0.0.1:9/stream", "cannot open stream rtsp://127.0.0.1:9/stream"),
])
def test_unopenable_source_is_one_line_error(tmp_path: Path, source: str, message: str) -> None:
    (tmp_path / "not_a_video.avi").write_text("this is not a video\n")
    result = subprocess.run([*LEUKOGRAPH, "stream", source, "--url", f"127.0.0.1:{free_port()}",
                             "--db", str(tmp_path / "r.sqlite")], capture_output=True, text=True, cwd=tmp_path,
                            timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("leukograph stream: error:") and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r.sqlite").exists()  # nothing started


def test_realtime_drops_oldest_frames(triton_server: TritonServer, tmp_path: Path) -> None:
    """A simulated 200 fps camera outruns the server: frames are dropped (oldest first) and the queue stays bounded."""
    avi = write_mjpg_avi(tmp_path / "fast.avi", count=20, fps=200)
    db, summary_path = tmp_path / "r.sqlite", tmp_path / "s.json"
    client = start_client(triton_server, avi, db, "fast", summary_path, "--realtime", "200")
    code, out, err = finish(client)
    assert code == 0, err
    summary = json.loads(summary_path.read_text())
    frames, q = summary["frames"], summary["queue"]
    assert frames["read"] == 20 and frames["dropped"] > 0
    assert frames["recorded"] + frames["dropped"] == 20
    assert q["drop_oldest"] and q["max_depth"] <= q["capacity"] == q["max_in_flight"]
    with ResultStore(db, create=False) as store:
        recorded = store.frames("fast")
    assert [f["frame_index"] for f in recorded] == list(range(frames["recorded"]))  # recording order
    positions = [int(f["source"].rsplit("#", 1)[1]) for f in recorded]
    assert positions == sorted(positions) and positions[-1] == 19  # the newest frame is kept: drops take the oldest
    assert f"{frames['dropped']} dropped" in out


@pytest.mark.parametrize("signum, exit_code, reason", [(signal.SIGTERM, 0, "terminated"),
                                                       (signal.SIGINT, 130, "interrupted")])
def test_signal_finishes_in_flight_and_prints_summary(triton_server: TritonServer, png_folder: Path,
                                                      tmp_path: Path, signum: int, exit_code: int,
                                                      reason: str) -> None:
    db, summary_path = tmp_path / "r.sqlite", tmp_path / "s.json"
    client = start_client(triton_server, png_folder, db, "stopped", summary_path, "--max-fps", "4")
    wait_for_frames(db, "stopped", 2, client)
    client.send_signal(signum)
    code, out, err = finish(client)
    assert code == exit_code, err
    assert "Traceback" not in err
    summary = json.loads(summary_path.read_text())
    assert summary["stop_reason"].startswith(reason)
    assert "| Cell class |" in out and "Frames:" in out
    with ResultStore(db, create=False) as store:
        indices = [f["frame_index"] for f in store.frames("stopped")]
    assert indices == list(range(len(indices))) and 2 <= len(indices) < N_FRAMES
    assert summary["frames"]["recorded"] == len(indices) and summary["frames"]["unrecorded"] == 0


def test_bad_files_and_frames_are_reported_and_skipped(triton_server: TritonServer, png_folder: Path,
                                                       tmp_path: Path) -> None:
    """A corrupt image is reported and skipped; a frame the contract refuses (wider than MAX_FRAME_SIDE) is logged,
    nothing is recorded for it, and the stream goes on."""
    import cv2

    from leukograph.client.contract import MAX_FRAME_SIDE

    good = sorted(png_folder.iterdir())
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "0_good.png").write_bytes(good[0].read_bytes())
    (folder / "1_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bgr = cv2.imread(str(good[1]))
    wide = np.tile(bgr, (1, MAX_FRAME_SIDE // bgr.shape[1] + 1, 1))
    assert wide.shape[1] > MAX_FRAME_SIDE
    assert cv2.imwrite(str(folder / "2_too_wide.png"), wide)
    (folder / "3_good.png").write_bytes(good[2].read_bytes())
    db, summary_path = tmp_path / "r.sqlite", tmp_path / "s.json"
    code, out, err = finish(start_client(triton_server, folder, db, "mixed", summary_path))
    assert code == 0, err
    assert "skipped" in err and "1_corrupt.png" in err
    assert "frame " in err and "2_too_wide.png" in err and "nothing recorded" in err and "Traceback" not in err
    summary = json.loads(summary_path.read_text())
    assert summary["frames"]["recorded"] == 2 and summary["frames"]["failed"] == 1
    with ResultStore(db, create=False) as store:
        recorded = store.frames("mixed")
    assert [f["frame_index"] for f in recorded] == [0, 1]  # recording order; the source names the file
    assert [Path(f["source"]).name for f in recorded] == ["0_good.png", "3_good.png"]
