"""The Docker build context of the TensorRT builder image (deploy/k8s/builder.Dockerfile).

    python -m leukograph.deploy.builder_context build/builder-context [--data-root D] [--model-repository R]
    docker build -f deploy/k8s/builder.Dockerfile -t <registry>/leukograph/tensorrt-builder:26.02-py3 \
        build/builder-context

The image carries everything the Kubernetes initContainer and the edge box's `build-engines` service need, so no
volume has to be filled before the first start:

    dist/leukograph-<version>-py3-none-any.whl      the package (`pip wheel` of this repository)
    model_source/<stage>/1/model.onnx               every stage, as `leukograph export` writes them
    verification-data/                              what `leukograph build-engines` verification reads:
      bccd/labels.csv                                 WBC subtypes per frame
      bccd/derived/frame_summary.csv                  which 4-class split each frame feeds (held-out = TEST sources)
      bccd/JPEGImages/<held-out frame>.jpg            the frames the plans are checked on (pixels are read)
      bccd/Annotations/<held-out frame>.xml           their boxes and WBC labels
      blood-cells-4class/derived/provenance.csv       4-class image -> source frame
      blood-cells-4class/TEST/, TEST_SIMPLE/          listed (not read) to name the remaining held-out frames
      blood-cells-4class/TRAIN/<class>/               empty: the loaders list TRAIN for the train/val split only,
                                                      which verification does not use

`held_out_samples()` on this subset yields exactly the frames, boxes and labels it yields on the full datasets
(tests/test_deploy_manifests.py checks it). Size: about 30 MB, 36 MB with the wheel.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from leukograph.client.contract import SERVED_STAGES
from leukograph.client.errors import UserError, run_module
from leukograph.deploy.paths import DATA_ENV, MODEL_REPOSITORY, REPO_ROOT, data_root

BCCD_FILES = ("labels.csv", "derived/frame_summary.csv", "LICENSE", "README.md")
FOUR_CLASS_LISTED = ("TEST", "TEST_SIMPLE")  # their file names name held-out frames (provenance.csv)
FOUR_CLASS_EMPTY = ("TRAIN",)


def verification_subset(source_root: Path, dest: Path) -> dict[str, int]:
    """Copy what build-engines verification reads from `source_root` into `dest` (a new folder)."""
    from leukograph.training.datasets import held_out_frames

    held = held_out_frames(source_root)
    bccd, four = source_root / "bccd", source_root / "blood-cells-4class"
    counts = {"frames": 0, "four_class_listed": 0}
    for name in BCCD_FILES:
        if (bccd / name).exists():
            _copy(bccd / name, dest / "bccd" / name)
    for frame_id in sorted(held):
        image, xml = bccd / "JPEGImages" / f"{frame_id}.jpg", bccd / "Annotations" / f"{frame_id}.xml"
        if image.exists() and xml.exists():  # a held-out 4-class source frame BCCD lacks is not a sample
            _copy(image, dest / "bccd" / "JPEGImages" / image.name)
            _copy(xml, dest / "bccd" / "Annotations" / xml.name)
            counts["frames"] += 1
    _copy(four / "derived" / "provenance.csv", dest / "blood-cells-4class" / "derived" / "provenance.csv")
    for split in FOUR_CLASS_LISTED:
        shutil.copytree(four / split, dest / "blood-cells-4class" / split)
        counts["four_class_listed"] += sum(1 for p in (four / split).rglob("*") if p.is_file())
    for split in FOUR_CLASS_EMPTY:
        for class_dir in sorted(p for p in (four / split).iterdir() if p.is_dir()):
            (dest / "blood-cells-4class" / split / class_dir.name).mkdir(parents=True, exist_ok=True)
    return counts


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def stage_onnx(repository: Path, dest: Path) -> list[Path]:
    """Copy `<repository>/<stage>/1/model.onnx` of every stage to `dest/<stage>/1/model.onnx`."""
    copied = []
    for stage in SERVED_STAGES:
        source = repository / stage.name / "1" / "model.onnx"
        if not source.exists():
            raise UserError(f"{source} not found: run `leukograph export --model-repository {repository}` first")
        _copy(source, dest / stage.name / "1" / "model.onnx")
        copied.append(dest / stage.name / "1" / "model.onnx")
    return copied


def build_wheel(dest: Path) -> Path:
    """`pip wheel --no-deps` of this repository into `dest`; the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dest), str(REPO_ROOT)],
                            capture_output=True, text=True)
    wheels = sorted(dest.glob("leukograph-*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"pip wheel failed: {last[0]}")
    return wheels[-1]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write the build context of the TensorRT builder image",
                                     add_help=add_help)
    parser.add_argument("output", type=Path, help="a new (or empty) folder, e.g. build/builder-context")
    parser.add_argument("--data-root", default=None, help=f"datasets (default ${DATA_ENV} or ../shared/datasets)")
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY,
                        help="where `leukograph export` wrote the two model.onnx files")
    parser.add_argument("--no-wheel", action="store_true", help="skip `pip wheel` (put your own wheel in dist/)")
    return parser


def main(args: argparse.Namespace) -> int:
    out: Path = args.output
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty; remove it or name a new folder")
    root = data_root(args.data_root)
    if not (root / "bccd").is_dir() or not (root / "blood-cells-4class").is_dir():
        raise UserError(f"{root} lacks bccd/ or blood-cells-4class/; pass --data-root or set {DATA_ENV}")
    onnx = stage_onnx(args.model_repository, out / "model_source")
    counts = verification_subset(root, out / "verification-data")
    wheel = None if args.no_wheel else build_wheel(out / "dist")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {len(onnx)} ONNX stages, {counts['frames']} held-out BCCD frames, "
          f"{counts['four_class_listed']} 4-class files listed, wheel {wheel.name if wheel else 'skipped'}; "
          f"{size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    run_module(main, get_args_parser(), "builder_context: error")
