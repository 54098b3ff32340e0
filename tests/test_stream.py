"""`leukograph stream` end to end with the real CPU Triton server: BCCD held-out frames -> client -> ensemble -> SQLite.

Checks the recorded per-cell classes against in-process PyTorch (`Classifier`, what `leukograph classify --json`
prints) on the same PNG frames (lossless, identical pixels), the summary, `leukograph report`, the annotated video,
an idempotent re-run, `--target`, the MJPG .avi camera stand-in, HTTP + shm, and `TritonPipelineClient` itself.
Triton == in-process ONNX Runtime within 1e-4 is tests/test_server.py's job (test_ensemble_matches_onnxruntime).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukograph.client import contract
from leukograph.client.contract import CLASSES
from leukograph.client.differential import DEFAULT_THRESHOLD, Differential, label_cells
from leukograph.client.images import read_image
from leukograph.client.localize import localize
from leukograph.client.records import ResultStore
from leukograph.client.triton_client import RequestNotSent, RequestRejected, TritonPipelineClient
from leukograph.deploy.server import TritonServer
from leukograph.training.datasets import load_bccd, split_frames

pytestmark = pytest.mark.server
LEUKOGRAPH = [sys.executable, "-m", "leukograph.client.cli"]
N_FRAMES = 10
PROB_TOLERANCE = 3e-4  # PyTorch vs Triton (ONNX Runtime) per-class probability (1.3e-4 seen with the CNN blend)
STREAM_TIMEOUT_S = 180


def held_out_bgr(count: int = N_FRAMES) -> list[tuple[str, np.ndarray]]:
    """The first `count` held-out BCCD frames (BGR, as decoded from their JPEGs)."""
    held_out = split_frames().held_out
    frames = [(f.frame_id, cv2.imread(str(f.image_path))) for f in load_bccd() if f.frame_id in held_out]
    assert len(frames) >= count, "not enough held-out BCCD frames"
    return frames[:count]


def write_png_folder(folder: Path, count: int = N_FRAMES) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (frame_id, bgr) in enumerate(held_out_bgr(count)):
        path = folder / f"{i:03d}_{frame_id}.png"  # sorted order == held-out order
        assert cv2.imwrite(str(path), bgr)
        paths.append(path)
    return paths


def write_mjpg_avi(path: Path, count: int = N_FRAMES, fps: float = 10.0) -> Path:
    frames = held_out_bgr(count)
    h, w = frames[0][1].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for _, bgr in frames:
        writer.write(cv2.resize(bgr, (w, h)) if bgr.shape[:2] != (h, w) else bgr)
    writer.release()
    return path


def run_stream(server: TritonServer | None, source: Path | str, db: Path, sample: str, *extra: str,
               protocol: str = "grpc", timeout: float = STREAM_TIMEOUT_S) -> subprocess.CompletedProcess:
    url = [] if server is None else ["--url", server.grpc_url if protocol == "grpc" else server.http_url,
                                     "--protocol", protocol]
    cmd = [*LEUKOGRAPH, "stream", str(source), *url, "--db", str(db), "--sample", sample, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def load_summary(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stream_frames") / "frames"
    write_png_folder(folder)
    return folder


@pytest.fixture(scope="module")
def full_run(triton_server: TritonServer, png_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The PNG folder streamed once (gRPC, annotated video, JSON summary); target 200 is not reached in 10 frames."""
    work = tmp_path_factory.mktemp("stream_run")
    db, summary_path, video = work / "results.sqlite", work / "summary.json", work / "annotated.mp4"
    result = run_stream(triton_server, png_folder, db, "png-sample", "--target", "200", "--save", str(video),
                        "--json-summary", str(summary_path))
    assert result.returncode == 0, result.stderr
    return {"db": db, "sample": "png-sample", "summary": load_summary(summary_path), "stdout": result.stdout,
            "stderr": result.stderr, "video": video, "work": work}


def test_client_modules_do_not_import_torch() -> None:
    code = ("import sys, leukograph.client.stream, leukograph.client.triton_client, leukograph.client.sources, "
            "leukograph.client.overlay; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_stream_records_what_in_process_pytorch_classifies(full_run: dict, png_folder: Path) -> None:
    """Same PNG pixels -> same boxes, same probabilities (1e-4), same classes as `leukograph classify`."""
    from leukograph.training.classify import Classifier

    classifier = Classifier(threads=1)
    images = sorted(png_folder.iterdir())
    with ResultStore(full_run["db"], create=False) as store:
        frames = store.frames(full_run["sample"])
        cells = store.cells(full_run["sample"])
    assert [f["frame_index"] for f in frames] == list(range(N_FRAMES))
    checked = 0
    assert [Path(f["source"]) for f in frames] == images  # recorded in folder order, each under its file
    for index, path in enumerate(images):
        expected = classifier.classify_path(path)["cells"]  # the objects `leukograph classify --json` prints
        got = [c for c in cells if c["frame_index"] == index]
        assert len(got) == len(expected) == frames[index]["n_cells"], path.name
        if not got:
            continue
        want_probs = np.array([[e["probs"][name] for name in contract.CLASSES] for e in expected])
        got_probs = np.array([[c["probs"][name] for name in contract.CLASSES] for c in got])
        np.testing.assert_allclose([[c["x1"], c["y1"], c["x2"], c["y2"]] for c in got],
                                   [e["box"] for e in expected], atol=0.051, err_msg=path.name)  # classify rounds
        assert [c["kind"] for c in got] == [e["kind"] for e in expected], path.name
        # classify --json rounds probabilities to 5 decimals.
        np.testing.assert_allclose(got_probs, want_probs, atol=PROB_TOLERANCE + 5e-6, rtol=0, err_msg=path.name)
        for c, e, p in zip(got, expected, got_probs):
            top2 = np.sort(p)[-2:]
            if top2[1] - top2[0] > 2 * PROB_TOLERANCE:  # not a near tie: the class must agree
                assert contract.CLASSES[int(np.argmax(p))] == e["label"], (path.name, c["cell_index"])
            checked += 1
        # The recorded label applies the review threshold to the localiser kind (differential.label_cells).
        assert [c["label"] for c in got] == label_cells(got_probs, DEFAULT_THRESHOLD, [c["kind"] for c in got])
    assert checked >= N_FRAMES  # BCCD frames hold ~15-25 cells each


def test_summary_report_and_video(full_run: dict) -> None:
    summary = full_run["summary"]
    frames = summary["frames"]
    assert frames["recorded"] == frames["read"] == N_FRAMES
    assert frames["dropped"] == frames["failed"] == frames["retried"] == frames["unrecorded"] == 0
    assert summary["stop_reason"] == "end of folder"
    lat = summary["latency_ms"]
    assert lat["n"] == N_FRAMES and 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert summary["frames_per_s"] > 0
    assert summary["queue"]["max_depth"] <= summary["queue"]["capacity"]
    # Printed: the differential table with CIs, the review list size, frame counts and latency percentiles.
    out = full_run["stdout"]
    assert "| Cell class | Count | % | 95% CI (Wilson) |" in out
    assert f"Review list: {summary['review']} cell(s)" in out
    assert f"Frames: {N_FRAMES} recorded" in out and "p50" in out and "p99" in out
    assert "Traceback" not in full_run["stderr"]
    # The report export agrees with the store and the summary.
    report = subprocess.run([*LEUKOGRAPH, "report", full_run["sample"], "--db", str(full_run["db"]), "--json", "-"],
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert data["sample"]["n_frames"] == N_FRAMES
    assert data["sample"]["model_version"] == summary["model_version"]
    assert data["differential"] == summary["differential"]
    assert len(data["review"]) == summary["review"]
    assert len(data["cells"]) == summary["cells_recorded"]
    # Annotated video: written and readable back, one frame per recorded frame.
    video = summary["video"]
    assert video["frames_written"] == N_FRAMES and video["frames_readable"] == N_FRAMES
    capture = cv2.VideoCapture(str(full_run["video"]))
    ok, first = capture.read()
    capture.release()
    assert ok and first.shape[:2] == (480, 640)


def test_rerun_of_the_same_folder_records_nothing_twice(triton_server: TritonServer, full_run: dict,
                                                        png_folder: Path) -> None:
    with ResultStore(full_run["db"], create=False) as store:
        before = (store.frames(full_run["sample"]), store.cells(full_run["sample"]),
                  store.differential(full_run["sample"]))
    summary_path = full_run["work"] / "rerun.json"
    result = run_stream(triton_server, png_folder, full_run["db"], full_run["sample"], "--target", "200",
                        "--json-summary", str(summary_path))
    assert result.returncode == 0, result.stderr
    assert "resuming sample" in result.stderr
    summary = load_summary(summary_path)
    assert summary["resumed"] and summary["frames"]["recorded"] == 0
    assert summary["frames"]["already_recorded"] == N_FRAMES
    with ResultStore(full_run["db"], create=False) as store:
        after = (store.frames(full_run["sample"]), store.cells(full_run["sample"]),
                 store.differential(full_run["sample"]))
    assert len(after[0]) == len(before[0]) == N_FRAMES
    assert after[1] == before[1]
    assert after[2] == before[2]
    assert summary["differential"] == full_run["summary"]["differential"]


TARGET_THRESHOLD = 0.5


def test_target_stops_the_stream(triton_server: TritonServer, full_run: dict, png_folder: Path) -> None:
    """--target T stops right after the frame whose cells bring the identified WBC count to T."""
    with ResultStore(full_run["db"], create=False) as store:
        cells = store.cells(full_run["sample"])
    # A lenient review threshold, so that these ten frames hold enough identified WBCs to stop part-way; the labels
    # are those the stream gives at that threshold, from the recorded probabilities.
    diff = Differential(target=10**6)
    cumulative = []
    for index in range(N_FRAMES):
        frame_cells = [c for c in cells if c["frame_index"] == index]
        probs = np.array([[c["probs"][name] for name in CLASSES] for c in frame_cells]).reshape(-1, len(CLASSES))
        labels = label_cells(probs, TARGET_THRESHOLD, [c["kind"] for c in frame_cells])
        for c, label in zip(frame_cells, labels):
            diff.observe(label, c["track_id"])
        cumulative.append(diff.n_wbc)
    if cumulative[-1] < 2:
        pytest.skip(f"the served model identifies {cumulative[-1]} WBC in {N_FRAMES} frames; need >= 2")
    target = max(1, cumulative[-1] // 2)
    stop_index = next(i for i, n in enumerate(cumulative) if n >= target)
    assert stop_index < N_FRAMES - 1 or cumulative[-2] < target
    summary_path = full_run["work"] / "target.json"
    result = run_stream(triton_server, png_folder, full_run["db"], "target-sample", "--target", str(target),
                        "--max-in-flight", "1", "--threshold", str(TARGET_THRESHOLD), "--json-summary",
                        str(summary_path))
    assert result.returncode == 0, result.stderr
    summary = load_summary(summary_path)
    assert summary["stop_reason"].startswith("target reached")
    assert summary["differential"]["complete"] and summary["differential"]["n_wbc"] == target
    assert summary["frames"]["recorded"] == stop_index + 1
    # A second run of a complete sample stops at once.
    again = run_stream(triton_server, png_folder, full_run["db"], "target-sample", "--target", str(target),
                       "--threshold", str(TARGET_THRESHOLD))
    assert again.returncode == 0, again.stderr
    assert "sample already complete" in again.stdout


def test_mjpg_avi_over_http_with_shm_records_every_frame(triton_server: TritonServer, tmp_path: Path) -> None:
    """The camera stand-in: an MJPG .avi through OpenCV's FFMPEG backend (JPEG: only 'it runs and records all')."""
    avi = write_mjpg_avi(tmp_path / "camera.avi")
    shm_before = {p.name for p in Path("/dev/shm").glob("leukograph_*")}
    db, summary_path = tmp_path / "avi.sqlite", tmp_path / "avi.json"
    result = run_stream(triton_server, avi, db, "avi-sample", "--shm", "--target", "200", "--json-summary",
                        str(summary_path), protocol="http")
    assert result.returncode == 0, result.stderr
    summary = load_summary(summary_path)
    assert summary["protocol"] == "http" and summary["shm"]
    assert summary["frames"]["recorded"] == N_FRAMES and summary["stop_reason"] == "end of video"
    with ResultStore(db, create=False) as store:
        frames = store.frames("avi-sample")
    assert [f["frame_index"] for f in frames] == list(range(N_FRAMES))
    assert all(f["n_cells"] > 0 for f in frames)
    assert {p.name for p in Path("/dev/shm").glob("leukograph_*")} <= shm_before  # regions freed at exit


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_pipeline_client_infer_submit_shm_agree(triton_server: TritonServer, png_folder: Path, protocol: str) -> None:
    """The benchmark's API: blocking infer, async submit and shm give the same answers; bad requests are classified."""
    frame = read_image(sorted(png_folder.iterdir())[0])
    boxes = localize(frame).boxes
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    with TritonPipelineClient(url, protocol) as plain, TritonPipelineClient(url, protocol, shm=True) as shm:
        assert plain.wait_ready(10) and shm.reconnect(10)
        assert plain.weights_id == shm.weights_id and plain.weights_id.startswith(contract.PIPELINE_NAME)
        probs, labels = plain.infer(frame, boxes)
        assert probs.shape == (len(boxes), contract.NUM_CLASSES) and labels.dtype == np.int32
        np.testing.assert_array_equal(labels, probs.argmax(1))
        outcomes = []
        done = threading.Event()

        def collect(outcome) -> None:
            outcomes.append(outcome)
            if len(outcomes) == 3:
                done.set()

        for client in (plain, shm, shm):
            client.submit(frame, boxes, collect)
        assert done.wait(60)
        for outcome in outcomes:
            assert outcome.ok, outcome.error
            np.testing.assert_array_equal(outcome.probs, probs)
        np.testing.assert_array_equal(shm.infer(frame, boxes)[0], probs)
        # A bare frame (the server's detector): the same cells and labels over the wire and through shm
        bare, bare_shm = plain.infer_outcome(frame), shm.infer_outcome(frame)
        assert bare.ok and len(bare.boxes) == len(bare.kinds) == len(bare.probs) > len(boxes) // 2
        np.testing.assert_array_equal(bare_shm.boxes, bare.boxes)
        np.testing.assert_array_equal(bare_shm.probs, bare.probs)
        # Rejected before sending, and (validate=False) by the server itself: RequestRejected either way.
        empty = np.zeros((0, 4), np.float32)
        with pytest.raises(RequestNotSent, match="not sent"):
            plain.infer(frame, empty)
        with pytest.raises(RequestRejected, match="BOXES is empty"):
            plain.infer(frame, empty, validate=False)
        assert plain.is_ready()
