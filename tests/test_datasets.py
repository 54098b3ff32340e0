"""Real-data checks of the loaders and the frame-grouped splits."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from leukograph.client.images import read_image
from leukograph.training.datasets import (
    PBC_FOLDER_CLASS,
    content_splits,
    fetch_bccd,
    held_out_frames,
    load_bccd,
    load_four_class,
    load_pbc,
    load_txl,
    parse_labels_csv,
    parse_yolo,
    pbc_split,
    sha1_of,
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
    # the empty row has a WBC box with an unknown label; BCCD's 3 basophil frames are labelled basophil
    assert frames["BloodImage_00117"].frame_label is None
    assert frames["BloodImage_00171"].wbc_labels == ["BASOPHIL"]
    assert frames["BloodImage_00171"].frame_label == "basophil"


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
    # no PBC or TXL-PBC test content either, by content hash
    test_content = {digest for digest, part, _ in content_splits() if part == "test"}
    used = {c.source_frame.split(":", 1)[1] for c in sets.train + sets.val if c.source in ("pbc", "txl-pbc",
                                                                                           "txl-raabin-wbc",
                                                                                           "txl-bcdd")}
    assert used and not used & test_content
    assert {c.source for c in sets.train} >= {"bccd", "4class", "pbc"}


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


def test_pbc_loader_and_content_split() -> None:
    images = load_pbc()
    assert len(images) == 2200
    by_class: dict[str, dict[str, int]] = {}
    for img in images:
        by_class.setdefault(img.label, {}).setdefault(img.split, 0)
        by_class[img.label][img.split] += 1
    assert set(by_class) == set(PBC_FOLDER_CLASS.values()) == {"neutrophil", "eosinophil", "basophil", "lymphocyte",
                                                               "monocyte", "ig", "nrbc", "platelet"}
    for counts in by_class.values():  # stratified: the same 41 / 41 / 193 in each class of 275
        assert counts == {"test": 41, "val": 41, "train": 193}
    assert all(img.path.parent.name == "erythroblast" for img in images if img.label == "nrbc")
    # the recorded hashes are the bytes' hashes (checked on a sample: the split is decided by them)
    for img in images[::97]:
        assert sha1_of(img.path) == img.sha1
    # deterministic and decided by content alone: the same hashes in any order give the same split
    digests = {name: [img.sha1 for img in images if img.label == name] for name in by_class}
    shuffled = {name: list(reversed(values)) for name, values in digests.items()}
    assert pbc_split(digests) == pbc_split(shuffled) == {img.sha1: img.split for img in images}


def test_txl_quirks() -> None:
    images = load_txl()
    assert len(images) == 1046
    by_name = {img.path.stem: img for img in images}
    # JPEG data behind a .png name, and RGBA PNGs: both read as RGB
    raabin = next(img for img in images if img.source == "Raabin-WBC")
    assert raabin.path.suffix == ".png" and raabin.path.read_bytes()[:3] == b"\xff\xd8\xff"
    assert read_image(raabin.path).shape == (575, 575, 3)
    bcdd = next(img for img in images if img.source == "BCDD")
    assert bcdd.path.read_bytes()[:4] == b"\x89PNG" and read_image(bcdd.path).shape == (256, 256, 3)
    # duplicated label lines are dropped: LY_10361 has 6 raw WBC lines for one box
    wbc_counts = [sum(b.kind == "wbc" for b in img.boxes) for img in images]
    assert max(wbc_counts) == 2 and wbc_counts.count(0) == 5
    # boxes are in pixels, inside the image
    for img in images[::50]:
        height, width = img.size
        assert all(0 <= b.box[0] < b.box[2] <= width and 0 <= b.box[1] < b.box[3] <= height
                   for b in img.boxes)
    # PBC-derived white cells carry their PBC class; others have none
    assert all(b.label in PBC_FOLDER_CLASS.values() for img in images if img.source == "PBC" for b in img.boxes
               if b.kind == "wbc")
    assert all(b.label is None for img in images if img.source != "PBC" for b in img.boxes if b.kind == "wbc")
    assert by_name  # names are unique


def test_parse_yolo_drops_duplicate_lines(tmp_path: Path) -> None:
    label = tmp_path / "x.txt"
    label.write_text("0 0.5 0.5 0.2 0.4\n0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.1 0.1\n\n")
    boxes = parse_yolo(label, height=100, width=200)
    assert [kind for kind, _ in boxes] == ["wbc", "rbc"]
    assert np.allclose(boxes[0][1], (80.0, 30.0, 120.0, 70.0))


def test_every_content_hash_is_in_one_split_across_sources() -> None:
    """BCCD, 4-class, PBC and TXL-PBC: identical bytes never sit in two splits (test never meets train/val)."""
    rows = content_splits()
    splits_of: dict[str, set[str]] = {}
    for digest, part, _ in rows:
        splits_of.setdefault(digest, set()).add(part)
    crossing = {digest: parts for digest, parts in splits_of.items() if len(parts - {"unused"}) > 1}
    assert not crossing
    # the overlap is real: 83 PBC files are also TXL-PBC images, and each pair shares its split
    pbc = {img.sha1: img.split for img in load_pbc()}
    shared = [img for img in load_txl() if img.sha1 in pbc]
    assert len(shared) == 83 and all(img.split == pbc[img.sha1] for img in shared)
    assert sum(img.split != img.upstream_split for img in shared) > 0  # the content rule overrode upstream splits


def test_cell_cache_round_trip_reads_the_crops_from_its_file(tmp_path: Path) -> None:
    """A cached cell set comes back identical to an uncached build, both when it has just been cut and written and
    when it is read again; its crops stay in the cache's crops file, read when indexed: never mapped, never held
    whole. A truncated crops file or a cache from before the crops file is cut again, not read."""
    script = (
        "import sys\nfrom pathlib import Path\nimport numpy as np\nimport torch\n"
        "from leukograph.training.cells import StoredCrops, build_cells\n"
        "from leukograph.training.datasets import load_pbc\n"
        "items = [i for i in load_pbc(None) if i.split == 'test'][:12]\n"
        "fresh = build_cells(items, 't', cache=False, progress=False)\n"
        "built, again = build_cells(items, 't', progress=False), build_cells(items, 't', progress=False)\n"
        "assert all(isinstance(c.crops, StoredCrops) for c in built + again)\n"
        "assert all(np.array_equal(f.crops, a.crops) and np.array_equal(a.crops, b.crops)"
        " and np.array_equal(a.boxes, b.boxes) and f.image_id == a.image_id == b.image_id"
        " and np.asarray(b.crops).dtype == np.uint8 for f, a, b in zip(fresh, built, again))\n"
        "# the indexing the training code uses reads what numpy indexing of the uncached crops gives\n"
        "f, a = next((f, a) for f, a in zip(fresh, built) if len(f.crops) >= 3)\n"
        "n = len(f.crops)\n"
        "for key in (0, -1, slice(1, 3), slice(None, None, -2), np.array([2, 0]), np.arange(n) % 2 == 0,"
        " (slice(None), slice(8, 40), slice(8, 40)), (1, 5)):\n"
        "    assert np.array_equal(f.crops[key], a.crops[key]), key\n"
        "assert np.array_equal(f.served_crops, a.served_crops) and a.crops.shape == f.crops.shape\n"
        "(path,) = Path(sys.argv[1]).glob('t-*.pt')\n"
        "crops_file = path.with_suffix('.crops')\n"
        "assert crops_file.stat().st_size == sum(f.crops.nbytes for f in fresh)\n"
        "assert not any(line.rstrip().endswith(crops_file.name) for line in open('/proc/self/maps'))\n"
        "# a truncated crops file: the set is cut again and its cache rewritten whole\n"
        "crops_file.write_bytes(crops_file.read_bytes()[:-1])\n"
        "redone = build_cells(items, 't', progress=False)\n"
        "assert crops_file.stat().st_size == sum(f.crops.nbytes for f in fresh)\n"
        "assert all(np.array_equal(f.crops, r.crops) for f, r in zip(fresh, redone))\n"
        "# a cache from before the crops file (records holding the crops): cut again\n"
        "crops_file.unlink()\n"
        "torch.save([{**vars(r), 'crops': torch.from_numpy(r.crops)} for r in fresh], path)\n"
        "assert all(np.array_equal(f.crops, r.crops) for f, r in zip(fresh, build_cells(items, 't', progress=False)))\n"
        "assert crops_file.exists()\n"
    )
    env = {**os.environ, "LEUKOGRAPH_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
