"""`leukograph adapt`: refuses too few verified cells; fine-tunes on signed samples recorded through the real Triton
server and verified through the review store; writes new weights with a new version; and a running stream rides
through the server restart that serves them, each frame keeping the version that labelled it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from leukograph.client.contract import WBC_CLASSES
from leukograph.client.records import ResultStore
from leukograph.client.review_store import SMUDGE, ReviewStore
from leukograph.deploy.model_repository import generate, weights_id, write_digest
from leukograph.deploy.paths import WEIGHTS_DIR, data_root
from leukograph.deploy.server import TritonServer, free_port
from leukograph.training.datasets import load_bccd, split_frames

LEUKOGRAPH = [sys.executable, "-m", "leukograph.client.cli"]
PER_CLASS = 20  # PBC images a class: 80 verified cells over 5 samples (64 to train after holding out one)
N_SAMPLES = 5


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
def test_adapt_fine_tunes_and_a_stream_rides_through_the_swap(verified_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapted"
    done = subprocess.run([*LEUKOGRAPH, "adapt", "--db", str(verified_db), "--out", str(out), "--epochs", "3",
                           "--skip-bccd", "--threads", "2"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    info = json.loads((out / "adapt.json").read_text())
    assert info["train_cells"] >= 50 and info["held_out_cells"] > 0
    assert set(info["held_out_samples"]) < set(info["samples"]) and info["mode"] == "head+gnn"
    assert info["version"] == weights_id(out) != weights_id(WEIGHTS_DIR)
    after = info["metrics"]["after"]["held_out"]["accuracy"]
    assert after >= info["metrics"]["before"]["held_out"]["accuracy"]  # the best epoch (0 = base) is kept
    assert "held-out verified cells" in done.stdout

    # a server on its own repository with the base weights; a stream; the adapted weights exported; a restart
    from leukograph.training.adapt import export_to_repository
    from leukograph.training.export import export_all

    repository = tmp_path / "repository"
    generate(repository, "onnxruntime")
    export_all(WEIGHTS_DIR, repository)
    write_digest(repository)
    frames = tmp_path / "frames"
    frames.mkdir()
    held = split_frames().held_out
    for i, frame in enumerate([f for f in load_bccd() if f.frame_id in held][:12]):
        cv2.imwrite(str(frames / f"{i:03d}.png"), cv2.imread(str(frame.image_path)))
    db = tmp_path / "stream.sqlite"
    with TritonServer(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) as server:
        # adapt exports into the live repository: a server without model polling keeps serving what it loaded
        served = export_to_repository(out, repository)
        stream = subprocess.Popen([*LEUKOGRAPH, "stream", str(frames), "--url", server.grpc_url, "--db", str(db),
                                   "--sample", "SWAP", "--target", "1000", "--max-fps", "1.5"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and _frames_recorded(db) < 3:  # the old model labels a few
                time.sleep(0.2)
            server.restart(120)  # now it serves the adapted weights
            _, stderr = stream.communicate(timeout=300)
        finally:
            if stream.poll() is None:
                stream.kill()
    assert stream.returncode == 0, stderr
    assert "server now serves" in stderr
    with ResultStore(db, create=False) as store:
        recorded = store.frames("SWAP")
        cells = store.cells("SWAP")
    assert [f["frame_index"] for f in recorded] == list(range(12))  # nothing lost, nothing twice
    versions = [f["model_version"] for f in recorded]
    old, new = weights_id(WEIGHTS_DIR), info["version"]
    assert served.startswith("leukocyte_pipeline") and versions[0] == old and versions[-1] == new
    assert versions == sorted(versions, key=lambda v: v == new)  # old ones first, then the new version only
    assert {c["model_version"] for c in cells} == {old, new}
    shutil.rmtree(out, ignore_errors=True)
