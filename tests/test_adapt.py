"""`leukograph adapt`: refuses too few verified cells; fine-tunes on signed samples recorded through the real Triton
server and verified through the review store; writes new weights with a new version; and a running stream rides
through the server restart that serves them, each frame keeping the version that labelled it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leukograph.client.contract import WBC_CLASSES
from leukograph.client.records import ResultStore
from leukograph.client.review_store import SMUDGE, ReviewStore
from leukograph.client.triton_client import ADMIN_KEY_ENV, TritonPipelineClient
from leukograph.deploy.model_repository import generate, weights_id, write_digest
from leukograph.deploy.paths import WEIGHTS_DIR, data_root
from leukograph.deploy.server import ReloadFailed, TritonServer, free_port, reload_pipeline
from leukograph.training.datasets import load_bccd, split_frames

LEUKOGRAPH = [sys.executable, "-m", "leukograph.client.cli"]
PER_CLASS = 20  # PBC images a class: 80 verified cells over 5 samples (64 to train after holding out one)
N_SAMPLES = 5
N_STREAM_FRAMES = 600  # at 1 frame/s: more than the stream needs to outlast adapt (it is stopped after the reload)


def _pbc_files() -> dict[str, list[Path]]:
    root = data_root() / "pbc"
    if not root.is_dir():
        pytest.skip(f"PBC not found at {root}")
    return {name: sorted((root / name).glob("*.jpg"))[:PER_CLASS] for name in WBC_CLASSES}


@pytest.fixture(scope="module")
def verified_db(triton_server: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PBC images recorded through the served pipeline as 5 samples, verified (centre cell = folder class) and
    signed through ReviewStore, the calls the review page makes."""
    from leukograph.client.triton_client import TritonPipelineClient
    from leukograph.training.adapt_curve import centre_cell, record_image

    files = _pbc_files()
    db = tmp_path_factory.mktemp("adapt") / "lab.sqlite"
    per_sample = PER_CLASS // N_SAMPLES
    with TritonPipelineClient(triton_server.grpc_url) as client, ResultStore(db) as store:
        for s in range(N_SAMPLES):
            store.start_sample(f"LAB-{s}", 10_000, client.weights_id)
            for i, name in enumerate(WBC_CLASSES):
                for j, path in enumerate(files[name][s * per_sample:(s + 1) * per_sample]):
                    record_image(store, client, f"LAB-{s}", i * per_sample + j, path)
    with ReviewStore(db) as review:
        for s in range(N_SAMPLES):
            sample = f"LAB-{s}"
            for i, name in enumerate(WBC_CLASSES):
                for j in range(per_sample):
                    frame = i * per_sample + j
                    cells = [c for c in review.gallery(sample) if c.frame_index == frame]
                    if not cells:
                        continue
                    meta = review.frame_image(sample, frame)
                    centre, others = centre_cell(review, sample, frame, meta["width"], meta["height"])
                    review.relabel(sample, [((centre.frame_index, centre.cell_index), 0)], name, "ref")
                    if others:
                        review.relabel(sample, [((c.frame_index, c.cell_index), c.version) for c in others],
                                       SMUDGE, "ref")
            review.sign_off(sample, "ref")
    return db


def _frames_recorded(db: Path) -> int:
    if not db.exists():
        return 0
    with ResultStore(db, create=False) as store:
        return store.sample("SWAP")["n_frames"] if "SWAP" in store.samples() else 0


def test_adapt_refuses_too_few_cells(tmp_path: Path) -> None:
    db = tmp_path / "few.sqlite"
    with ResultStore(db) as store:
        store.start_sample("ONE", 100, "m")
    done = subprocess.run([*LEUKOGRAPH, "adapt", "--db", str(db)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "needs at least 50" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([*LEUKOGRAPH, "adapt", "--db", str(db), "--samples", "ONE"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "not signed off" in done.stderr


@pytest.mark.server
@pytest.mark.slow
def test_adapt_fine_tunes_and_the_running_server_loads_it_under_a_stream(verified_db: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A server (explicit model control, restricted APIs) serves the base weights; a stream runs; `leukograph adapt
    --model-repository` fine-tunes, exports and makes that server load the new weights without a restart; the stream
    goes on: every frame recorded once, in order, each with the weights id that labelled it."""
    from leukograph.training.export import export_all

    repository = tmp_path / "repository"
    generate(repository, "onnxruntime")
    export_all(WEIGHTS_DIR, repository)
    write_digest(repository)
    frames = tmp_path / "frames"
    frames.mkdir()
    held = split_frames().held_out
    bccd = [f for f in load_bccd() if f.frame_id in held][:12]
    for i in range(N_STREAM_FRAMES):  # distinct files (a frame's identity is its path and content)
        (frames / f"{i:03d}.jpg").write_bytes(bccd[i % len(bccd)].image_path.read_bytes())
    key = "adapt-test-admin-key-0123456789"
    monkeypatch.setenv(ADMIN_KEY_ENV, key)
    env = {**os.environ}
    db, out = tmp_path / "stream.sqlite", tmp_path / "adapted"
    with TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                      model_control_mode="explicit", http=False, admin_key=key) as server:
        pid = server.pid
        with pytest.raises(ReloadFailed, match="restricted"):  # model control is the admin's: a wrong key changes
            reload_pipeline(server.grpc_url, key="not-the-admin-key")  # nothing
        with TritonPipelineClient(server.grpc_url) as client:
            assert client.is_ready() and client.fetch_weights_id() == weights_id(WEIGHTS_DIR)
        stream = subprocess.Popen([*LEUKOGRAPH, "stream", str(frames), "--url", server.grpc_url, "--db", str(db),
                                   "--sample", "SWAP", "--target", "100000", "--max-fps", "1"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and _frames_recorded(db) < 3:  # the base model labels a few
                time.sleep(0.2)
            done = subprocess.run([*LEUKOGRAPH, "adapt", "--db", str(verified_db), "--out", str(out), "--epochs", "3",
                                   "--skip-bccd", "--threads", "1", "--model-repository", str(repository),
                                   "--server", server.grpc_url], capture_output=True, text=True, timeout=900, env=env)
            assert done.returncode == 0, done.stderr
            assert stream.poll() is None, "the stream ended before the new weights were served"
            at_reload = _frames_recorded(db)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and _frames_recorded(db) < at_reload + 3 and stream.poll() is None:
                time.sleep(0.2)
            stream.send_signal(signal.SIGTERM)  # stop capturing, finish the frames in flight
            _, stderr = stream.communicate(timeout=120)
        finally:
            if stream.poll() is None:
                stream.kill()
        with TritonPipelineClient(server.grpc_url) as client:
            served = client.fetch_weights_id()
        same_process = server.pid == pid and server.process.poll() is None

    info = json.loads((out / "adapt.json").read_text())
    assert info["train_cells"] >= 50 and info["held_out_cells"] > 0
    assert set(info["held_out_samples"]) < set(info["samples"]) and info["mode"] == "head+gnn"
    old, new = weights_id(WEIGHTS_DIR), info["version"]
    assert new == weights_id(out) != old
    after = info["metrics"]["after"]["held_out"]["accuracy"]
    assert after >= info["metrics"]["before"]["held_out"]["accuracy"]  # the best epoch (0 = base) is kept
    assert "held-out verified cells" in done.stdout and f"now serves {new}" in done.stdout
    assert served == new and same_process  # the same server process loaded the new weights

    assert stream.returncode == 0, stderr
    assert f"server now serves {new}" in stderr
    with ResultStore(db, create=False) as store:
        recorded = store.frames("SWAP")
        cells = store.cells("SWAP")
        assert store.verify("SWAP") == []
    n = len(recorded)
    assert n >= at_reload + 1
    assert [f["frame_index"] for f in recorded] == list(range(n))  # nothing lost, nothing twice
    assert sorted(f["source"] for f in recorded) == [str((frames / f"{i:03d}.jpg").resolve()) for i in range(n)]
    versions = [f["model_version"] for f in recorded]
    assert versions[0] == old and versions[-1] == new
    assert versions == sorted(versions, key=lambda v: v == new)  # old ones first, then the new version only
    by_frame = {f["frame_index"]: f["model_version"] for f in recorded}
    assert all(c["model_version"] == by_frame[c["frame_index"]] for c in cells)
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.server
def test_anchor_keeps_the_fine_tuned_weights_nearer_the_base(verified_db: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """--anchor (L2-SP) pulls the trained parameters towards the base weights: after the same epochs on the same
    verified cells they are closer to them than without it; a negative anchor is refused with one line. (The
    held-out score is made to rise each epoch so that the last epoch is the one kept in both runs: the committed
    weights may already be best on these cells.)"""
    from leukograph.training import adapt
    from leukograph.training.adapt import fine_tune, load_verified_frames, split_by_sample
    from leukograph.training.checkpoints import load_models

    epochs_scored = iter(range(1000))
    monkeypatch.setattr(adapt, "verified_accuracy", lambda *_: {"cells": 1, "accuracy": next(epochs_scored) / 1000})
    base_embedder, base_gnn, _ = load_models(WEIGHTS_DIR)
    base = {**{f"cnn.{k}": v for k, v in base_embedder.state_dict().items()},
            **{f"gnn.{k}": v for k, v in base_gnn.state_dict().items()}}
    train, val = split_by_sample(load_verified_frames(verified_db))

    def distance(anchor: float) -> float:
        embedder, gnn, history = fine_tune(WEIGHTS_DIR, train, val, False, 2, 1e-3, 0, lambda _: None, anchor)
        assert len(history) == 3
        tuned = {**{f"cnn.{k}": v for k, v in embedder.state_dict().items()},
                 **{f"gnn.{k}": v for k, v in gnn.state_dict().items()}}
        return sum(float(((tuned[k].float() - v.float()) ** 2).sum()) for k, v in base.items())

    free, anchored = distance(0.0), distance(1.0)
    assert 0 < anchored < free
    done = subprocess.run([*LEUKOGRAPH, "adapt", "--db", str(verified_db), "--anchor", "-1", "--out",
                           str(tmp_path / "w")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["leukograph adapt: error: --anchor must be >= 0"]
    assert not (tmp_path / "w").exists()


def test_bccd_accuracy_of_the_committed_weights_is_a_share() -> None:
    """adapt's forgetting check (held-out BCCD WBC nodes, CNN+GNN) runs on real weights and data."""
    from leukograph.deploy.paths import WEIGHTS_DIR
    from leukograph.training.adapt import bccd_accuracy
    from leukograph.training.checkpoints import load_models

    embedder, gnn, _ = load_models(WEIGHTS_DIR)
    accuracy = bccd_accuracy(embedder, gnn, None)
    assert accuracy is not None and 0.5 < accuracy <= 1.0
