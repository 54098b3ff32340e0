"""`leukograph framing WEIGHTS...`: `classify`'s white-cell answer on PBC cells framed as other labs frame them.

Other labs' single-cell images differ from PBC's 360x363 CellaVision crops in more than stain: the cell may be smaller
(a lower magnification), larger and cut by the image's edge (a tight crop, a 100x oil field), or small in a wide
field; and another camera or lamp images it differently: a colour cast, less light, stronger compression, a
monochrome sensor. Each framing here is made from PBC images of one split (never test images for choices:
`--split val`), and every weights folder answers each image as `leukograph classify` does (`Classifier.white_cell`,
detector cells, the same views). Per framing and weights folder: accuracy over the five white-cell classes, and how
the cell was found (`found_by`: detector, large cell, zoomed out, fallback). Writes JSON and, with `--readme`, the
README's `framing` section and the model card's framing line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from leukograph.client.contract import WBC_CLASSES
from leukograph.client.errors import UserError
from leukograph.client.images import read_image
from leukograph.client.review_store import decode_jpeg, encode_jpeg
from leukograph.deploy.paths import WEIGHTS_DIR, shown_path
from leukograph.deploy.readme import replace_section
from leukograph.training.classify import Classifier, centred_in_field
from leukograph.training.datasets import load_pbc
from leukograph.training.evaluate import FRAMING_REPORT, write_model_card
from leukograph.training.heap import add_keep_freed_memory_argument, apply_keep_freed_memory
from leukograph.training.views import VIEW_COUNTS, VIEWS

FIELD_SIDE = 1000  # px: the wide field a PBC crop is placed in


def resized(factor: float) -> Callable[[np.ndarray], np.ndarray]:
    def frame(image: np.ndarray) -> np.ndarray:
        return cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    return frame


def magnified(factor: float) -> Callable[[np.ndarray], np.ndarray]:
    """Magnified `factor` times about the centre and cut back to the image's size: the cell fills more of the
    image and is cut by its edges."""
    def frame(image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        big = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
        top, left = (big.shape[0] - height) // 2, (big.shape[1] - width) // 2
        return np.ascontiguousarray(big[top:top + height, left:left + width])
    return frame


def in_field(side: int) -> Callable[[np.ndarray], np.ndarray]:
    """Centred in a side x side field of the image's border colour: the same cell, a wider field of view."""
    def frame(image: np.ndarray) -> np.ndarray:
        return centred_in_field(image, side, side)[0]
    return frame


def lit(gains: tuple[float, float, float]) -> Callable[[np.ndarray], np.ndarray]:
    """Each RGB channel scaled by its gain: a lamp's or camera's colour cast, or less light."""
    def frame(image: np.ndarray) -> np.ndarray:
        return np.clip(image.astype(np.float32) * np.asarray(gains, np.float32), 0, 255).astype(np.uint8)
    return frame


def jpeg(quality: int) -> Callable[[np.ndarray], np.ndarray]:
    """Saved as JPEG at `quality` and read back (a camera's or a network share's compression), with the result
    database's own codec."""
    def frame(image: np.ndarray) -> np.ndarray:
        return decode_jpeg(encode_jpeg(image, quality))
    return frame


def monochrome(image: np.ndarray) -> np.ndarray:
    """A monochrome camera: the image's luminance in all three channels."""
    return np.repeat(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)


FOUND_BY_COUNTED = ("large cell", "zoomed out", "fallback")  # the bracketed counts of the markdown table
FRAMINGS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "as given (360 px)": lambda image: image,
    "a third of the size": resized(1 / 3),
    "magnified 1.5x, cut to the frame": magnified(1.5),
    "magnified 2x, cut to the frame": magnified(2.0),
    f"in a {FIELD_SIDE} px field": in_field(FIELD_SIDE),
    "a sixth of the size (60 px)": resized(1 / 6),
    "yellow lamp (blue x0.6)": lit((1.0, 0.95, 0.6)),
    "blue-grey cast (red x0.75)": lit((0.75, 0.85, 1.0)),
    "half the exposure": lit((0.5, 0.5, 0.5)),
    "JPEG quality 25": jpeg(25),
    "monochrome camera": monochrome,
}


def score(classifier: Classifier, images: list, framing: Callable[[np.ndarray], np.ndarray]) -> dict:
    """Accuracy of the white-cell answer, per `found_by`; for images answered from a zoomed-out field, also what the
    centred square (the answer before the zoomed-out search) would have said."""
    right: dict[str, list[bool]] = {}
    centre_right = []
    for item in images:
        image = framing(read_image(item.path))
        prediction = classifier.predict(image)
        answer = classifier.white_cell(image, prediction)
        right.setdefault(answer["found_by"], []).append(answer["class"] == item.label)
        if answer["found_by"] == "zoomed out":
            centre_right.append(classifier.centre_answer(image, prediction)["class"] == item.label)
    every = [ok for oks in right.values() for ok in oks]
    found_by = {how: {"images": len(oks), "accuracy": float(np.mean(oks))} for how, oks in right.items()}
    if centre_right:
        found_by["zoomed out"]["centred_square_accuracy"] = float(np.mean(centre_right))
    return {"images": len(every), "accuracy": float(np.mean(every)), "found_by": found_by}


def markdown(report: dict) -> str:
    names = list(report["weights"])
    lines = [f"Generated by `{report['command']}` ({report['seconds']:.0f} s).", "",
             f"PBC {report['split']} white cells ({report['images']} images, five classes), framed and imaged as "
             f"other labs' microscopes frame and image them; `classify`'s white-cell answer ({report['views']} "
             "views). In brackets: images whose WBC box fills the image and that were answered in a field twice "
             "their size / where the detector found no WBC box and the cell was found in a zoomed-out field / "
             "answered by the centred square. Last column: the images found in a zoomed-out field, right from there "
             "/ right from the centred square (the answer without the zoomed-out search).", "",
             "| framing | " + " | ".join(names) + " | zoomed out / centred square |",
             "|---|" + "---:|" * (len(names) + 1)]
    for framing in FRAMINGS:
        cells = []
        for name in names:
            row = report["weights"][name][framing]
            found = row["found_by"]
            extra = "/".join(str(found.get(how, {}).get("images", 0)) for how in FOUND_BY_COUNTED)
            cells.append(f"{100 * row['accuracy']:.1f}% ({extra})")
        zoomed = [report["weights"][name][framing]["found_by"].get("zoomed out") for name in names]
        comparison = "; ".join(f"{z['accuracy'] * z['images']:.0f} / {z['centred_square_accuracy'] * z['images']:.0f} "
                               f"of {z['images']}" for z in zoomed if z)
        lines.append(f"| {framing} | " + " | ".join(cells) + f" | {comparison or '-'} |")
    return "\n".join(lines) + "\n"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="classify's white-cell answer on PBC cells in other framings",
                                     add_help=add_help)
    parser.add_argument("weights", nargs="*", type=Path, default=[WEIGHTS_DIR],
                        help="weights folders (cnn.pt + gnn.pt; default: the release)")
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="PBC split the images come from (choose on val; default %(default)s)")
    parser.add_argument("--views", type=int, choices=VIEW_COUNTS, default=VIEWS)
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="the first N images of the split only (a quick check; not for figures)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--readme", action="store_true",
                        help="the release's test figures: also write docs/results/framing.json, the README's framing "
                             "section and the model card's framing line (with --split test, the release first)")
    add_keep_freed_memory_argument(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    for folder in args.weights:
        if not (folder / "gnn.pt").exists():
            raise UserError(f"{folder} is not a weights folder (no gnn.pt)")
    if args.readme and (args.split != "test" or args.limit is not None
                        or args.weights[0].resolve() != WEIGHTS_DIR.resolve()):
        raise UserError("--readme writes the release's test figures: use --split test, no --limit, and the release "
                        f"({shown_path(WEIGHTS_DIR)}) as the first weights folder")
    apply_keep_freed_memory(args)
    started = time.time()
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    images = [item for item in load_pbc() if item.split == args.split and item.label in WBC_CLASSES][:args.limit]
    report: dict = {"split": args.split, "images": len(images), "views": args.views, "weights": {}}
    for folder in args.weights:
        classifier = Classifier(folder, args.threads, "server", args.views)
        rows = {}
        for name, framing in FRAMINGS.items():
            rows[name] = score(classifier, images, framing)
            print(f"{shown_path(folder)}: {name}: {100 * rows[name]['accuracy']:.1f}%", flush=True)
        report["weights"][shown_path(folder)] = rows
    report["seconds"] = round(time.time() - started, 1)
    report["command"] = ("leukograph framing " + " ".join(shown_path(f) for f in args.weights)
                         + f" --split {args.split}" + (f" --views {args.views}" if args.views != VIEWS else "")
                         + (f" --limit {args.limit}" if args.limit else ""))
    text = markdown(report)
    print(text)
    outputs = ([args.json] if args.json else []) + ([FRAMING_REPORT] if args.readme else [])
    for path in {path.resolve() for path in outputs}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    if args.readme:
        replace_section("framing", text)
        write_model_card(WEIGHTS_DIR)  # its framing line reads FRAMING_REPORT
    return 0
