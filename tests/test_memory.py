"""Bounded client state (issue "Memory over time"): ended tracks are forgotten identically live and on replay, the
latency summary is a fixed-size histogram, and `leukograph soak` measures a real served pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leukograph.client.differential import Differential
from leukograph.client.latency import LatencyHistogram, percentiles
from leukograph.client.records import TRACK_MEMORY_FRAMES, CellRecord, ResultStore
from leukograph.deploy.soak import latency_per_minute, slope_mb_per_hour

LEUKOGRAPH = [sys.executable, "-m", "leukograph.client.cli"]


def _cells(frame: int) -> list[CellRecord]:
    """Two new tracks per frame (a panning stage): one neutrophil, one unidentified that a later frame resolves."""
    cells = [CellRecord((0, 0, 8, 8), "wbc", "neutrophil", track_id=2 * frame),
             CellRecord((10, 0, 18, 8), "wbc", "unidentified", track_id=2 * frame + 1)]
    if frame:
        cells.append(CellRecord((10, 0, 18, 8), "wbc", "monocyte", track_id=2 * frame - 1))  # resolves the last
    return cells


def test_ended_tracks_are_forgotten_live_and_on_replay(tmp_path: Path) -> None:
    frames = 3 * TRACK_MEMORY_FRAMES
    unbounded = Differential(10**6)
    with ResultStore(tmp_path / "r.sqlite") as store:
        state = store.start_sample("S", target=10**6)
        for frame in range(frames):
            store.record_frame("S", None, _cells(frame), source_key=f"k{frame}")
            for cell in _cells(frame):
                unbounded.observe(cell.label, cell.track_id)
        live = state.differential
        assert live.counts == unbounded.counts  # forgetting ended tracks changes no count
        assert live.track_label(0) is None and live.track_label(2 * frames - 2) == "neutrophil"
        remembered = [t for t in range(2 * frames) if live.track_label(t) is not None]
        assert len(remembered) <= 2 * (TRACK_MEMORY_FRAMES + 1)  # bounded by the window, not by the sample
        assert store.differential("S") == live  # the replay forgets exactly the same tracks
        assert len(store.review("S")) == live.n_unidentified == 1
    with ResultStore(tmp_path / "r.sqlite") as store:  # a restarted client resumes with the same state
        assert store.start_sample("S", target=10**6).differential == live


def test_latency_histogram_is_fixed_size_and_within_one_percent() -> None:
    rng = np.random.default_rng(0)
    values = rng.lognormal(np.log(25), 0.5, 20000)
    hist = LatencyHistogram()
    for v in values:
        hist.append(v)
    summary = percentiles(hist)
    for q in (50, 95, 99):
        assert summary[f"p{q}"] == pytest.approx(np.percentile(values, q), rel=0.012)
    assert summary["n"] == values.size and summary["max"] == round(values.max(), 2)
    assert hist.counts.size == LatencyHistogram.BINS + 1  # the same size after 20,000 values as after one


def test_soak_helpers() -> None:
    assert slope_mb_per_hour([0, 1800, 3600], [100, 101, 102]) == pytest.approx(2.0)
    per_minute = latency_per_minute([(1000.0, 10.0), (1030.0, 30.0), (1070.0, 50.0)], start=1000.0)
    assert [(m["minute"], m["n"], m["p50_ms"]) for m in per_minute] == [(0, 2, 20.0), (1, 1, 50.0)]


@pytest.mark.server
@pytest.mark.slow
def test_soak_command_measures_a_served_pipeline(tmp_path: Path) -> None:
    result = subprocess.run([*LEUKOGRAPH, "soak", "--minutes", "0.3", "--sample-s", "1", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "soak.json").read_text())
    assert data["frames_recorded"] > 0 and data["resume"]["frames"] == data["frames_recorded"]
    assert len(data["samples"]) >= 10 and all(s["n_stubs"] >= 2 for s in data["samples"])
    assert set(data["slope_mb_per_hour"]) == {"server", "stubs", "client"}
    assert data["latency_per_minute"][0]["n"] > 0 and data["latency_per_minute"][0]["p50_ms"] > 0
    assert (tmp_path / "soak.png").stat().st_size > 10_000
    assert "RSS slope MB/hour" in result.stdout
    bad = subprocess.run([*LEUKOGRAPH, "soak", "--minutes", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "--minutes" in bad.stderr
