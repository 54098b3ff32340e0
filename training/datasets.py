"""The real datasets, their quirks, and deterministic splits.

Torch-free on purpose: the localiser evaluation and the client tests read the same indexes.

* `bccd/`: 364 640x480 frames, VOC boxes (WBC/RBC/Platelets), `labels.csv` with the frame's WBC subtype.
* `blood-cells-4class/`: 12,515 images that are augmented, 320x240 copies of ~342 BCCD frames.
  `derived/provenance.csv` maps each image to its source frame.
* `pbc/`: 2,200 CellaVision single-cell crops (MGG stain), 275 per class; `erythroblast` is our `nrbc`.
* `txl-pbc/`: YOLO WBC/RBC/platelet boxes on Raabin-WBC, PBC and BCDD images (JPEG data named .png, RGBA PNGs,
  duplicated label lines, images without a WBC box). PBC-derived images carry their PBC class.

Split policy (README "Data"):
* BCCD / 4-class: frames behind 4-class TEST/TEST_SIMPLE are the *held-out* frames (the test split). They are
  never trained on nor used for early stopping or model selection. Validation is carved from the remaining
  frames, grouped by frame and stratified by class.
* PBC: per class, files sorted by the SHA-1 of their bytes; the first 15% are test, the next 15% validation, the
  rest train. The split is therefore a function of the content, stratified by class.
* TXL-PBC: an image whose bytes are also a PBC file takes that file's split (content decides); every other image
  keeps TXL-PBC's upstream split. `content_splits` lists every file's split by SHA-1 so that a test can check that
  no content sits in two splits across all sources.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import random
import shutil
import tarfile
import tempfile
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from leukograph.client.errors import UserError
from leukograph.deploy.paths import DATA_ENV, data_root

BCCD_SOURCE_URL = "https://github.com/Shenggan/BCCD_Dataset/archive/refs/heads/master.zip"
LABELS_CSV_URL = "https://raw.githubusercontent.com/dhruvp/wbc-classification/master/labels.csv"

VOC_KIND = {"WBC": "wbc", "RBC": "rbc", "Platelets": "platelet"}
# BCCD has 3 basophil frames (2 with a single box): labelled basophil, but the class is learnt from PBC.
IGNORED_SUBTYPES: set[str] = set()
HELD_OUT_SOURCES = {"TEST", "TEST+TEST_SIMPLE"}
FOUR_CLASS_SPLITS = ("TRAIN", "TEST", "TEST_SIMPLE")


@dataclass
class BoxLabel:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 (pixels, VOC is 1-based inclusive; kept as is)
    kind: str  # wbc | rbc | platelet
    label: str | None  # a CLASSES name, or None when unknown (ambiguous WBC, basophil)


@dataclass
class BccdFrame:
    frame_id: str  # BloodImage_00001
    image_path: Path
    boxes: list[BoxLabel]
    wbc_labels: list[str]  # subtypes from labels.csv (upper case), possibly empty
    four_class_source_of: str  # TRAIN | TEST | TEST+TEST_SIMPLE | none
    notes: list[str] = field(default_factory=list)

    @property
    def held_out(self) -> bool:
        return self.four_class_source_of in HELD_OUT_SOURCES

    @property
    def frame_label(self) -> str | None:
        """The frame's single WBC class, when the frame is unambiguous (else None)."""
        labels = {s for s in self.wbc_labels}
        if len(labels) == 1:
            (only,) = labels
            return None if only in IGNORED_SUBTYPES else only.lower()
        return None


@dataclass
class FourClassImage:
    split: str  # TRAIN | TEST | TEST_SIMPLE
    label: str  # lower-case WBC class
    path: Path
    source_frame: str
    confident: bool


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(
            f"{what} not found at {path}; pass --data-root or set {DATA_ENV} "
            f"(or run `leukograph fetch-data` to download BCCD)")
    return path


def parse_labels_csv(path: Path) -> dict[str, list[str]]:
    """labels.csv -> {frame_id: [SUBTYPE, ...]}. Handles multi-label rows with or without spaces and
    empty rows (empty list)."""
    out: dict[str, list[str]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            image = (row.get("Image") or "").strip()
            if not image:
                continue
            category = (row.get("Category") or "").strip()
            labels = [part.strip().upper() for part in category.split(",") if part.strip()]
            out[f"BloodImage_{int(image):05d}"] = labels
    return out


def parse_voc(path: Path) -> list[tuple[str, tuple[float, float, float, float]]]:
    """VOC XML -> [(kind, box)], dropping zero-area boxes (two RBC 'points' in BCCD)."""
    root = ET.parse(path).getroot()
    boxes = []
    for obj in root.iter("object"):
        kind = VOC_KIND.get((obj.findtext("name") or "").strip())
        bnd = obj.find("bndbox")
        if kind is None or bnd is None:
            continue
        x1, y1, x2, y2 = (float(bnd.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax"))
        if x2 <= x1 or y2 <= y1:
            continue
        boxes.append((kind, (x1, y1, x2, y2)))
    return boxes


def _frame_summary(root: Path) -> dict[str, str]:
    path = root / "bccd" / "derived" / "frame_summary.csv"
    with open(_require(path, "BCCD frame summary"), newline="") as fh:
        return {row["frame"]: row["blood_cells_4class_source_of"] for row in csv.DictReader(fh)}


@cache
def load_bccd(root: Path | None = None) -> tuple[BccdFrame, ...]:
    """All BCCD frames with boxes and node labels.

    WBC node labels: a frame's subtype is given to its WBC box(es) only when it is certain: one subtype
    (possibly repeated, e.g. NEUTROPHIL, NEUTROPHIL) and not basophil. Two different subtypes on one frame
    (no box link), empty rows and basophils give label None. Frames with 0 WBC boxes keep their RBCs and
    platelets (context nodes) and are noted.
    """
    root = data_root(root)
    bccd = _require(root / "bccd", "BCCD dataset")
    labels = parse_labels_csv(_require(bccd / "labels.csv", "BCCD labels.csv"))
    source_of = _frame_summary(root)
    frames = []
    for image_path in sorted((bccd / "JPEGImages").glob("BloodImage_*.jpg")):
        frame_id = image_path.stem
        xml = bccd / "Annotations" / f"{frame_id}.xml"
        if not xml.exists():
            continue
        wbc_labels = labels.get(frame_id, [])
        frame = BccdFrame(frame_id, image_path, [], wbc_labels, source_of.get(frame_id, "none"))
        subtype = frame.frame_label
        voc = parse_voc(xml)
        n_wbc = sum(kind == "wbc" for kind, _ in voc)
        if n_wbc == 0:
            frame.notes.append("labelled WBC has no box")
        if n_wbc != max(len(wbc_labels), 1):
            frame.notes.append(f"{len(wbc_labels)} labels for {n_wbc} WBC boxes")
        for kind, box in voc:
            label = subtype if kind == "wbc" else kind
            frame.boxes.append(BoxLabel(box, kind, label))
        frames.append(frame)
    if not frames:
        raise UserError(f"no BCCD frames under {bccd}")
    return tuple(frames)


@cache
def load_four_class(root: Path | None = None, split: str = "TEST") -> tuple[FourClassImage, ...]:
    """One 4-class split with each image's source frame (from derived/provenance.csv)."""
    if split not in FOUR_CLASS_SPLITS:
        raise UserError(f"unknown 4-class split {split!r}; expected one of {FOUR_CLASS_SPLITS}")
    base = _require(data_root(root) / "blood-cells-4class", "blood-cells-4class dataset")
    provenance: dict[tuple[str, str, str], tuple[str, bool]] = {}
    with open(_require(base / "derived" / "provenance.csv", "4-class provenance"), newline="") as fh:
        for row in csv.DictReader(fh):
            provenance[(row["split"], row["class"], row["file"])] = (row["source_frame"], row["confident"] == "1")
    images = []
    for class_dir in sorted((base / split).iterdir()):
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.glob("*.jpeg")):
            source, confident = provenance.get((split, class_dir.name, path.name), ("unknown", False))
            images.append(FourClassImage(split, class_dir.name.lower(), path, source, confident))
    return tuple(images)


@cache
def held_out_frames(root: Path | None = None) -> frozenset[str]:
    """Source frames behind 4-class TEST and TEST_SIMPLE: never trained on, never used for selection."""
    frames = {frame for frame, source in _frame_summary(data_root(root)).items() if source in HELD_OUT_SOURCES}
    for split in ("TEST", "TEST_SIMPLE"):
        frames.update(img.source_frame for img in load_four_class(root, split))
    return frozenset(frames)


@dataclass(frozen=True)
class FrameSplit:
    train: frozenset[str]
    val: frozenset[str]
    held_out: frozenset[str]


def split_frames(root: Path | None = None, val_fraction: float = 0.15, seed: int = 0) -> FrameSplit:
    """Train/val from the non-held-out frames, grouped by frame and stratified by the frame's class.

    Frames are BCCD frames plus the 4-class TRAIN source frames that BCCD lacks (00280, 00329)."""
    held = held_out_frames(root)
    frame_class: dict[str, str] = {}
    for frame in load_bccd(root):
        if frame.frame_id not in held:
            frame_class[frame.frame_id] = frame.frame_label or "unlabelled"
    for img in load_four_class(root, "TRAIN"):
        if img.source_frame not in held:
            frame_class.setdefault(img.source_frame, img.label)
    rng = random.Random(seed)
    val: set[str] = set()
    by_class: dict[str, list[str]] = {}
    for frame_id, cls in sorted(frame_class.items()):
        by_class.setdefault(cls, []).append(frame_id)
    for members in by_class.values():
        rng.shuffle(members)
        val.update(members[: max(1, round(len(members) * val_fraction))])
    train = frozenset(frame_class) - val
    return FrameSplit(train=train, val=frozenset(val), held_out=held)


# ---- download for users without the data ------------------------------------------------------------
def fetch_bccd(dest: Path, source: str = BCCD_SOURCE_URL, labels_source: str = LABELS_CSV_URL) -> Path:
    """Download the public BCCD repository archive (zip or tar, any URL urllib reads, file:// included)
    into dest/bccd with the layout the loaders expect. The frame_summary.csv split file is derived data:
    without it, the 4-class held-out frames cannot be identified and loaders refuse to run."""
    target = dest / "bccd"
    if (target / "JPEGImages").exists():
        raise UserError(f"{target} already holds BCCD; remove it first to fetch again")
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "bccd_archive"
        try:
            urllib.request.urlretrieve(source, archive)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot download BCCD from {source}: {exc}") from None
        unpacked = Path(tmp) / "unpacked"
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(unpacked)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                tf.extractall(unpacked, filter="data")
        else:
            raise UserError(f"{source} is neither a zip nor a tar archive")
        voc_dirs = [p.parent for p in unpacked.rglob("JPEGImages") if (p.parent / "Annotations").is_dir()]
        if not voc_dirs:
            raise UserError(f"{source} holds no VOC folder (JPEGImages + Annotations)")
        target.mkdir(parents=True)
        for name in ("JPEGImages", "Annotations", "ImageSets"):
            if (voc_dirs[0] / name).exists():
                shutil.copytree(voc_dirs[0] / name, target / name)
    try:
        urllib.request.urlretrieve(labels_source, target / "labels.csv")
    except (OSError, ValueError) as exc:
        raise UserError(f"BCCD frames saved, but labels.csv could not be downloaded from {labels_source}: {exc}") \
            from None
    return target


# ---- PBC and TXL-PBC ----------------------------------------------------------------------------------------
SPLITS = ("train", "val", "test")
PBC_FOLDER_CLASS = {"neutrophil": "neutrophil", "eosinophil": "eosinophil", "basophil": "basophil",
                    "lymphocyte": "lymphocyte", "monocyte": "monocyte", "ig": "ig", "erythroblast": "nrbc",
                    "platelet": "platelet"}
PBC_TEST_FRACTION = 0.15
PBC_VAL_FRACTION = 0.15
TXL_KINDS = {0: "wbc", 1: "rbc", 2: "platelet"}  # classes.txt


@dataclass(frozen=True)
class PbcImage:
    path: Path
    label: str  # a contract.CLASSES name (erythroblast -> nrbc)
    pbc_label: str  # file-name prefix: SNE, BNE, MY, ...
    sha1: str  # of the file's bytes
    split: str  # train | val | test


@dataclass(frozen=True)
class TxlImage:
    path: Path
    source: str  # Raabin-WBC | PBC | BCDD
    upstream_split: str  # TXL-PBC's own split
    split: str  # ours: the PBC split for content shared with pbc/, else upstream_split
    sha1: str
    size: tuple[int, int]  # height, width
    boxes: tuple[BoxLabel, ...]  # de-duplicated label lines in pixels; WBC label = PBC class or None


def sha1_of(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def pbc_split(sha1s_by_class: dict[str, list[str]]) -> dict[str, str]:
    """sha1 -> split: per class, sorted by sha1, first 15% test, next 15% validation, the rest train."""
    out: dict[str, str] = {}
    for digests in sha1s_by_class.values():
        ordered = sorted(digests)
        n_test = round(len(ordered) * PBC_TEST_FRACTION)
        n_val = round(len(ordered) * PBC_VAL_FRACTION)
        for i, digest in enumerate(ordered):
            out[digest] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


@cache
def load_pbc(root: Path | None = None) -> tuple[PbcImage, ...]:
    """All staged PBC files with their class and content-decided split (derived/files.csv gives the sha1)."""
    base = _require(data_root(root) / "pbc", "PBC dataset")
    with open(_require(base / "derived" / "files.csv", "PBC files.csv"), newline="") as fh:
        rows = [row for row in csv.DictReader(fh) if row["class"] in PBC_FOLDER_CLASS]
    by_class: dict[str, list[str]] = {}
    for row in rows:
        by_class.setdefault(row["class"], []).append(row["sha1"])
    split = pbc_split(by_class)
    return tuple(PbcImage(base / row["file"], PBC_FOLDER_CLASS[row["class"]], row["pbc_label"], row["sha1"],
                          split[row["sha1"]]) for row in sorted(rows, key=lambda r: r["file"]))


def parse_yolo(path: Path, height: int, width: int) -> list[tuple[str, tuple[float, float, float, float]]]:
    """YOLO label lines -> [(kind, x1, y1, x2, y2 pixels)], exact duplicate lines dropped, order kept."""
    seen: set[tuple[str, ...]] = set()
    out = []
    for line in path.read_text().splitlines():
        parts = tuple(line.split())
        if len(parts) != 5 or parts in seen:
            continue
        seen.add(parts)
        kind = TXL_KINDS.get(int(parts[0]))
        cx, cy, bw, bh = (float(v) for v in parts[1:])
        if kind is None or bw <= 0 or bh <= 0:
            continue
        # clamped to the image: 6-decimal YOLO values land a hair outside at the edges
        out.append((kind, (max((cx - bw / 2) * width, 0.0), max((cy - bh / 2) * height, 0.0),
                           min((cx + bw / 2) * width, float(width)), min((cy + bh / 2) * height, float(height)))))
    return out


@cache
def load_txl(root: Path | None = None) -> tuple[TxlImage, ...]:
    """All staged TXL-PBC images with de-duplicated boxes and our split (PBC's for content shared with pbc/)."""
    base = _require(data_root(root) / "txl-pbc", "TXL-PBC dataset")
    pbc_splits = {img.sha1: img.split for img in load_pbc(root)}
    images = []
    with open(_require(base / "derived" / "images.csv", "TXL-PBC images.csv"), newline="") as fh:
        for row in csv.DictReader(fh):
            path = base / row["file"]
            height, width = int(row["height"]), int(row["width"])
            label_path = base / "labels" / row["split"] / f"{path.stem}.txt"
            pbc_class = PBC_FOLDER_CLASS.get(row["pbc_class"]) if row["pbc_class"] else None
            boxes = tuple(BoxLabel(box, kind, (pbc_class if kind == "wbc" else kind))
                          for kind, box in parse_yolo(label_path, height, width))
            images.append(TxlImage(path, row["source"], row["split"], pbc_splits.get(row["sha1"], row["split"]),
                                   row["sha1"], (height, width), boxes))
    return tuple(images)


def frame_split_name(frame_id: str, split: FrameSplit) -> str:
    """A BCCD / 4-class source frame's split in the common vocabulary (held-out frames are test)."""
    if frame_id in split.held_out:
        return "test"
    return "val" if frame_id in split.val else "train" if frame_id in split.train else "unused"


def content_splits(root: Path | None = None) -> list[tuple[str, str, str]]:
    """(sha1 of bytes, split, "source:path") for every image of every source, to check that no content is in two
    splits. BCCD and 4-class images hash their files; PBC and TXL-PBC hashes come from derived/ CSVs (their
    bytes are checked against those in the tests)."""
    frames = split_frames(root)
    out = [(sha1_of(f.image_path), frame_split_name(f.frame_id, frames), f"bccd:{f.frame_id}") for f in load_bccd(root)]
    for name in FOUR_CLASS_SPLITS:
        out += [(sha1_of(img.path), "test" if name != "TRAIN" else frame_split_name(img.source_frame, frames),
                 f"4class:{img.path}") for img in load_four_class(root, name)]
    out += [(img.sha1, img.split, f"pbc:{img.path}") for img in load_pbc(root)]
    out += [(img.sha1, img.split, f"txl:{img.path}") for img in load_txl(root)]
    return out


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Download the public BCCD dataset", add_help=add_help)
    parser.add_argument("--data-root", default=None, help=f"destination (default ${DATA_ENV} or ../shared/datasets)")
    parser.add_argument("--source", default=BCCD_SOURCE_URL, help="archive URL (https:// or file://)")
    parser.add_argument("--labels-source", default=LABELS_CSV_URL, help="labels.csv URL (https:// or file://)")
    return parser


def main(args: argparse.Namespace) -> int:
    target = fetch_bccd(data_root(args.data_root), args.source, args.labels_source)
    n = len(list((target / "JPEGImages").glob("*.jpg")))
    print(f"BCCD: {n} frames in {target}")
    return 0


