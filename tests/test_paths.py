"""Atomic writes: what the cell caches, CNN packs, checkpoints, engine plans and README sections are written with."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from leukograph.deploy.paths import write_atomically


def test_two_writers_of_one_file_at_once_both_succeed(tmp_path: Path) -> None:
    """Two trainings filling the same cell cache: both have written their temporary before either renames it (the
    barrier), then both rename. With a shared temporary name the second rename found nothing and crashed."""
    path = tmp_path / "cache" / "cells.pt"
    both_written = threading.Barrier(2, timeout=30)

    def writer(value: int) -> Path:
        def write(tmp: Path) -> None:
            torch.save({"value": value, "crops": torch.full((64, 80, 80, 3), value, dtype=torch.uint8)}, tmp)
            both_written.wait()

        return write_atomically(path, write)

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(writer, (1, 2))) == [path, path]
    saved = torch.load(path, weights_only=True)
    assert saved["value"] in (1, 2) and bool((saved["crops"] == saved["value"]).all())  # one whole file, not a mix
    assert [p.name for p in path.parent.iterdir()] == ["cells.pt"]  # no temporary left behind


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text("old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["README.md"]
