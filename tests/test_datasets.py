"""Real-data checks of the loaders and the frame-grouped splits."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from leukograph.training.datasets import (
    fetch_bccd,
    held_out_frames,
    load_bccd,
    load_four_class,
    parse_labels_csv,
    split_frames,
)


def test_bccd_counts_and_quirks() -> None:
    frames = {f.frame_id: f for f in load_bccd()}
    assert len(frames) == 364
    # zero-area RBC "points" are dropped
    assert all(b.box[2] > b.box[0] and b.box[3] > b.box[1] for f in frames.values() for b in f.boxes)
    # a frame whose labelled WBC has no box keeps its context cells and says so
    assert "labelled WBC has no box" in frames["BloodImage_00133"].notes
    assert frames["BloodImage_00133"].boxes
    # two different subtypes: no box can be labelled
    mixed = frames["BloodImage_00242"]
    assert mixed.frame_label is None
    assert all(b.label is None for b in mixed.boxes if b.kind == "wbc")
    # the empty row has a WBC box with an unknown label; basophils are unlabelled (documented choice)
    assert frames["BloodImage_00117"].frame_label is None
    assert frames["BloodImage_00171"].wbc_labels == ["BASOPHIL"] and frames["BloodImage_00171"].frame_label is None


def test_labels_csv_multi_label_spacing(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text(",Image,Category\n,1,\"NEUTROPHIL,NEUTROPHIL\"\n,2,\"NEUTROPHIL, EOSINOPHIL\"\n,3,\n")
    assert parse_labels_csv(csv) == {"BloodImage_00001": ["NEUTROPHIL", "NEUTROPHIL"],
                                     "BloodImage_00002": ["NEUTROPHIL", "EOSINOPHIL"], "BloodImage_00003": []}


def test_four_class_counts() -> None:
    assert len(load_four_class(split="TRAIN")) == 9957
    assert len(load_four_class(split="TEST")) == 2487
    assert len(load_four_class(split="TEST_SIMPLE")) == 71


def test_no_test_frame_in_training_or_validation() -> None:
    split = split_frames()
    held = held_out_frames()
    assert split.held_out == held
    assert len(held) >= 70
    assert not (split.train & held) and not (split.val & held) and not (split.train & split.val)
    test_sources = {img.source_frame for s in ("TEST", "TEST_SIMPLE") for img in load_four_class(split=s)}
    assert test_sources <= held
    # every validation class present, grouped by frame
    frame_class = {f.frame_id: f.frame_label for f in load_bccd()}
    assert {frame_class.get(f) for f in split.val} >= {"neutrophil", "eosinophil", "lymphocyte", "monocyte"}


def test_training_cell_sets_exclude_held_out_frames() -> None:
    from leukograph.training.train import load_cell_sets

    sets = load_cell_sets(None, max_images=25, seed=0)
    held = held_out_frames()
    assert sets.train and sets.val
    assert not any(c.source_frame in held for c in sets.train + sets.val)


def test_fetch_bccd_from_local_archive(tmp_path: Path) -> None:
    """The download path works from a file:// source shaped like the public BCCD repository archive."""
    source = Path(load_bccd()[0].image_path).parent.parent
    archive = tmp_path / "BCCD_Dataset-master.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for frame in load_bccd()[:3]:
            zf.write(frame.image_path, f"BCCD_Dataset-master/BCCD/JPEGImages/{frame.image_path.name}")
            xml = source / "Annotations" / f"{frame.frame_id}.xml"
            zf.write(xml, f"BCCD_Dataset-master/BCCD/Annotations/{xml.name}")
    target = fetch_bccd(tmp_path / "data", archive.as_uri(), (source / "labels.csv").as_uri())
    assert len(list((target / "JPEGImages").glob("*.jpg"))) == 3
    assert (target / "labels.csv").read_text().startswith(",Image,Category")


def test_fetch_bccd_unreachable_source_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "leukograph.client.cli", "fetch-data", "--data-root",
                             str(tmp_path), "--source", (tmp_path / "missing.zip").as_uri()],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "cannot download BCCD" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("split", ["NOPE"])
def test_unknown_split_is_refused(split: str) -> None:
    from leukograph.client.errors import UserError

    with pytest.raises(UserError):
        load_four_class(split=split)
