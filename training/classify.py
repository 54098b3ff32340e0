"""`leukograph classify PATH... [--json]`: find and classify every cell in image files, in-process (PyTorch).

The same three stages Triton's `leukocyte_pipeline` serves (learned cell detector, in-graph crop + CNN, dense GNN),
chained by `leukograph.deploy.runners.run_pipeline` over `TorchRunner`s; `--localizer client` finds the cells with
the classical localiser instead (as `leukograph stream --localizer client`).
Python API: `Classifier().classify_image(rgb)` and `Classifier().classify_path(path)` return the JSON objects.

Every image also gets one image-level answer, `white_cell`: the class of its most white-cell-like cell (the cell
with the largest probability over the nucleated classes among the localiser's WBC boxes). `class` is one of the
five WBC classes; `label` is the nucleated class (it may be `ig` or `nrbc`, flagged beside the differential).
`white_cell` reads each cell's embeddings averaged over its 24 views: eight flips and quarter-turns, each with the
cell at 1, 0.8 and 1.25 times its size in the crop (`--views 24`, the default; `--views 8` the flips and turns only;
`training/views.py`), the steadier answer `leukograph evaluate` scores as "CNN+GNN, 24 views"; `cells` are what the
served pipeline says of the one served view, exactly as `leukograph stream` records them.
When the answering WBC box is LARGE_CELL or more of the image's shorter side, the cell fills the image (a tight
crop, a 100x oil field: more than any training lab's images show) and is often cut by its edge: the image is placed
in a field LARGE_CELL_FIELD times its size, filled with its border's colour, and the answer is read there, so the
crop and the cell's geometry look as they do in the training labs' images (`found_by` "large cell"; the box is
mapped back).
When the localiser finds no WBC box, the cell may be too large for it (a tight crop, a higher magnification): the
image is shrunk into a field ZOOM_OUT times its size, filled with its border's colour, and searched again; the WBC
boxes found there, mapped back, answer (`found_by` "zoomed out"). When that finds none either: the image's cells
plus a centred square (CENTRE_FALLBACK of the shorter side: single-cell images are centred on their cell) are
classified together, and the most white-cell-like of them answers; `found_by` says "fallback".

`--db PATH` also records the results in a result database, as `leukograph stream` does and through the same writer
(`review_store.record_classified_frame`): one sample (`--sample`, resumed when it exists), one frame per image keyed
by its path and content hash (classifying the same files again records nothing twice), the localiser's cells with
the review threshold's labels (`--threshold`), the thumbnails and frame images `leukograph review` shows, and the
version id of the weights that labelled them. Each image is its own field (no tracking between images). Recording
stops when the sample's differential reaches `--target` identified white cells, as a stream does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from leukograph.client.contract import (
    CELL_GRAPH,
    CELL_KINDS,
    CLASSES,
    CROP_EMBEDDER,
    EMBEDDINGS,
    LOCALIZERS,
    NUCLEATED_CLASSES,
    NUM_CLASSES,
    PROBS,
    WBC_CLASSES,
    boxes_feed,
    white_cell_class,
)
from leukograph.client.differential import DEFAULT_TARGET, DEFAULT_THRESHOLD, TARGETS, label_cells
from leukograph.client.errors import UserError
from leukograph.client.images import ImageError, content_hash, list_images, read_image, safe_name
from leukograph.client.localize import WBC, Cells, localize
from leukograph.client.records import DEFAULT_DB, ResultStore
from leukograph.client.review_store import cell_records, record_classified_frame, require_unsigned
from leukograph.client.sources import image_file_key
from leukograph.deploy.paths import WEIGHTS_DIR, detector_weights_dir
from leukograph.deploy.runners import TorchRunner, run_pipeline
from leukograph.training.checkpoints import load_models
from leukograph.training.heap import add_keep_freed_memory_argument, apply_keep_freed_memory
from leukograph.training.models import CellGraphStage, CropEmbedderStage
from leukograph.training.views import DIHEDRAL, VIEW_COUNTS, VIEW_SCALES, VIEWS, check_views, frame_views, viewed_rows

CENTRE_FALLBACK = 0.6  # side of the fallback box, as a fraction of the image's shorter side
# Fields (times the image's size) searched in turn when the image itself shows no WBC box: a cell twice as large as
# the detector saw in training fills a 2x field as it was trained on (README "Other microscopes' framing").
ZOOM_OUT = (1.5, 2.0, 3.0)
# A WBC box at least this share of the image's shorter side: the cell fills the image. The training labs' white
# cells sit below it: 0.44 in the median and 0.54 at the 90th percentile on PBC validation images, 0.43 / 0.55 on
# 4-class and 0.44 / 0.50 on BCCD validation images (README "Other microscopes' framing").
LARGE_CELL = 0.6
LARGE_CELL_FIELD = 2.0  # such an image is answered in a field this many times its size


def centred_in_field(image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(the image centred in a height x width field filled with the median colour of the image's border; the
    image's offset in it as [x, y, x, y], to map boxes back)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    field = np.empty((height, width, 3), np.uint8)
    field[:] = np.median(border, axis=0).astype(np.uint8)
    top, left = (height - image.shape[0]) // 2, (width - image.shape[1]) // 2
    field[top:top + image.shape[0], left:left + image.shape[1]] = image
    return field, np.array([left, top, left, top], np.float32)


def zoomed_out(image: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """The image centred in a field `factor` times its size (`centred_in_field`)."""
    return centred_in_field(image, round(image.shape[0] * factor), round(image.shape[1] * factor))


@dataclass
class Prediction:
    cells: Cells
    probs: np.ndarray  # [N, C] CNN+GNN
    cnn_probs: np.ndarray  # [N, C] CNN alone
    served: dict[str, np.ndarray]  # every tensor of the served run (empty without cells): other views reuse it


class Classifier:
    """In-process CNN+GNN inference on RGB images, with the serving localiser."""

    def __init__(self, weights_dir: Path = WEIGHTS_DIR, threads: int | None = None,
                 localizer: str = "server", views: int = VIEWS) -> None:
        from leukograph.training.detector import DetectorStage, load_detector

        self.views = check_views(views)
        if threads:
            torch.set_num_threads(threads)
        embedder, gnn, self.meta = load_models(weights_dir)
        self.localizer = localizer
        self.crop_stage = CropEmbedderStage(embedder).eval()
        self.graph_stage = CellGraphStage(gnn).eval()
        self.runners = [TorchRunner(self.crop_stage, CROP_EMBEDDER), TorchRunner(self.graph_stage, CELL_GRAPH)]
        if localizer == "server":  # adapted weights folders hold no detector: the released one finds the cells
            self.detector = DetectorStage(load_detector(detector_weights_dir(weights_dir))).eval()

    def find_cells(self, image: np.ndarray) -> Cells:
        """The cells of an image: the learned detector (localizer server, as served) or the classical localiser."""
        return localize(image) if self.localizer == "client" else self.detector.find_cells(image)

    @torch.no_grad()
    def predict(self, image: np.ndarray, cells: Cells | None = None) -> Prediction:
        cells = self.find_cells(image) if cells is None else cells
        if len(cells) == 0:
            empty = np.zeros((0, NUM_CLASSES), np.float32)
            return Prediction(cells, empty, empty, {})
        outputs = run_pipeline(self.runners, np.ascontiguousarray(image), cells.boxes.astype(np.float32))
        cnn_logits = self.crop_stage.embedder.classifier(torch.from_numpy(outputs[EMBEDDINGS.name]))
        return Prediction(cells, outputs[PROBS.name], torch.softmax(cnn_logits, 1).numpy(), outputs)

    @torch.no_grad()
    def viewed_probs(self, image: np.ndarray, cells: Cells, served: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """CNN+GNN probabilities [N, C] with the white-cell candidates' embeddings averaged over `views` views of
        the frame (`views.viewed_rows`; the crop_embedder runner cuts each view's crops itself); the graph joins
        the cells where they are. `served`: the served run's tensors for these cells (`Prediction.served`), so the
        served view is not embedded again."""
        crop_runner, graph_runner = self.runners
        tensors = dict(served) if served else run_pipeline([crop_runner], np.ascontiguousarray(image),
                                                           cells.boxes.astype(np.float32))
        rows = viewed_rows(cells.kinds)
        total = tensors[EMBEDDINGS.name][rows].astype(np.float64)
        for _, frame, boxes in frame_views(image, cells.boxes[rows], self.views):
            viewed = crop_runner.infer(boxes_feed(frame, boxes))[EMBEDDINGS.name]
            total += viewed.reshape(-1, len(rows), viewed.shape[-1]).sum(axis=0)
        tensors[EMBEDDINGS.name] = tensors[EMBEDDINGS.name].copy()
        tensors[EMBEDDINGS.name][rows] = total / self.views
        return graph_runner.infer(tensors)[PROBS.name]

    def classify_image(self, image: np.ndarray) -> list[dict]:
        prediction = self.predict(image)
        return cells_json(prediction.cells, prediction.probs)

    def answer_probs(self, image: np.ndarray, cells: Cells, prediction: Prediction | None = None) -> np.ndarray:
        """The probabilities the image-level answer reads: the served view's (`--views 1`; `prediction`'s when it
        holds these cells) or the white-cell candidates' averaged over the views."""
        if self.views > 1:
            return self.viewed_probs(image, cells, prediction.served if prediction is not None else None)
        return prediction.probs if prediction is not None else self.predict(image, cells).probs

    def zoomed_out_cells(self, image: np.ndarray) -> Cells | None:
        """The cells found in the first ZOOM_OUT field that shows a WBC box, mapped back into the image (clipped),
        or None."""
        for factor in ZOOM_OUT:
            field, offset = zoomed_out(image, factor)
            found = self.find_cells(field)
            boxes = field_boxes_in_image(found.boxes, offset, image.shape)
            keep = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= 2.0  # still inside the image
            if (found.kinds[keep] == WBC).any():
                return Cells(boxes[keep], found.kinds[keep], found.scores[keep])
        return None

    def white_cell(self, image: np.ndarray, prediction: Prediction) -> dict:
        """The image-level answer: the most white-cell-like WBC box of the image, else of a zoomed-out field, else
        of the image's cells and a centred square."""
        found_by = "detector" if self.localizer == "server" else "localiser"
        answer = self.wbc_box_answer(image, prediction.cells, found_by, prediction)
        if answer is not None:
            if fills_image(answer["box"], image.shape):
                return self.answer_in_field(image, LARGE_CELL_FIELD) or answer
            return answer
        zoomed = self.zoomed_out_cells(image)
        if zoomed is not None:
            return {**self.wbc_box_answer(image, zoomed, "zoomed out"), "cell_index": None}  # not a listed cell
        return self.centre_answer(image, prediction)

    def wbc_box_answer(self, image: np.ndarray, cells: Cells, found_by: str,
                       prediction: Prediction | None = None) -> dict | None:
        """The white-cell answer from the WBC boxes of `cells` (`white_cell_json`; `prediction`: the served run of
        these cells, reused as in `answer_probs`), or None where there is none."""
        candidates = np.flatnonzero(cells.kinds == WBC)
        if len(candidates) == 0:
            return None
        return white_cell_json(cells, self.answer_probs(image, cells, prediction), candidates, found_by, self.views)

    def answer_in_field(self, image: np.ndarray, factor: float) -> dict | None:
        """The white-cell answer read in the image centred in a field `factor` times its size (`zoomed_out`), its
        box mapped back into the image (clipped); None where the field shows no WBC box."""
        field, offset = zoomed_out(image, factor)
        prediction = self.predict(field)
        answer = self.wbc_box_answer(field, prediction.cells, "large cell", prediction)
        if answer is None:
            return None
        box = field_boxes_in_image(np.asarray([answer["box"]], np.float32), offset, image.shape)[0]
        return {**answer, "box": [round(float(v), 1) for v in box], "cell_index": None}  # not one of the listed cells

    def centre_answer(self, image: np.ndarray, prediction: Prediction) -> dict:
        """The last resort: the most white-cell-like of the image's cells and a centred square."""
        height, width = image.shape[:2]
        side = CENTRE_FALLBACK * min(height, width)
        centre = np.array([[(width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2]],
                          np.float32)
        cells = Cells(np.concatenate([prediction.cells.boxes, centre]),
                      np.concatenate([prediction.cells.kinds, [WBC]]).astype(np.int64),
                      np.concatenate([prediction.cells.scores, [0.0]]).astype(np.float32))
        result = white_cell_json(cells, self.answer_probs(image, cells), np.arange(len(cells)), "fallback",
                                 self.views)
        if result["cell_index"] == len(prediction.cells):
            result["cell_index"] = None  # the centred square, not one of the listed cells
        return result

    def classify_path(self, path: str | Path) -> dict:
        return self.classify_file(path)[0]

    def classify_file(self, path: str | Path) -> tuple[dict, np.ndarray, Prediction]:
        """(the image's JSON object, its RGB pixels, the prediction)."""
        image = read_image(path)
        prediction = self.predict(image)
        result = {"path": str(path), "white_cell": self.white_cell(image, prediction),
                  "cells": cells_json(prediction.cells, prediction.probs)}
        return result, image, prediction


def field_boxes_in_image(boxes: np.ndarray, offset: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Boxes [N,4] found in a `zoomed_out` field, mapped back into the image and clipped to it."""
    height, width = shape[:2]
    return np.clip(boxes - offset, 0.0, np.array([width, height, width, height], np.float32))


def fills_image(box: list[float], shape: tuple[int, ...]) -> bool:
    """Whether a box's longer side is LARGE_CELL or more of the image's shorter side."""
    return max(box[2] - box[0], box[3] - box[1]) >= LARGE_CELL * min(shape[0], shape[1])


def white_cell_json(cells: Cells, probs: np.ndarray, candidates: np.ndarray, found_by: str, views: int) -> dict:
    """The candidate with the largest nucleated-class probability: its WBC class (5 classes), nucleated label."""
    nucleated = probs[candidates, :len(NUCLEATED_CLASSES)].sum(1)
    index = int(candidates[int(np.argmax(nucleated))])
    p = probs[index]
    wbc = int(white_cell_class(p))
    label = int(np.argmax(p[:len(NUCLEATED_CLASSES)]))
    return {"class": WBC_CLASSES[wbc], "probability": round(float(p[wbc]), 5), "label": NUCLEATED_CLASSES[label],
            "label_probability": round(float(p[label]), 5), "cell_index": index,
            "box": [round(float(v), 1) for v in cells.boxes[index]], "found_by": found_by, "views": views}


def cells_json(cells: Cells, probs: np.ndarray) -> list[dict]:
    """The documented per-cell JSON: box, localiser kind, label (argmax class) and all class probabilities."""
    return [
        {
            "box": [round(float(v), 1) for v in box],
            "kind": CELL_KINDS[int(kind)],
            "label": CLASSES[int(np.argmax(p))],
            "probs": {name: round(float(v), 5) for name, v in zip(CLASSES, p)},
        }
        for box, kind, p in zip(cells.boxes, cells.kinds, probs)
    ]


class SampleRecorder:
    """`classify --db`: the images' results recorded as one sample of a result database, as `stream` records."""

    def __init__(self, store: ResultStore, sample: str, target: int, threshold: float, model_version: str) -> None:
        self.store, self.sample, self.threshold, self.model_version = store, sample, threshold, model_version
        require_unsigned(store.path, sample)
        self.state = store.start_sample(sample, target, model_version, {"threshold": threshold, "source": "classify"})
        self.recorded = self.already = self.cells = self.after_target = 0

    def record(self, path: Path, image: np.ndarray, prediction: Prediction, latency_ms: float) -> None:
        if self.state.differential.is_complete:
            self.after_target += 1
            return
        key = image_file_key(str(path.resolve()), content_hash(path))
        cells = prediction.cells
        kinds = [CELL_KINDS[int(k)] for k in cells.kinds]
        labels = label_cells(prediction.probs, self.threshold, kinds) if len(cells) else []
        records = cell_records(cells.boxes, kinds, labels, prediction.probs)
        outcome = record_classified_frame(self.store, self.sample, image, records, source_key=key,
                                          source=str(path.resolve()), captured_at=time.time(),
                                          received_at=time.time(), latency_ms=round(latency_ms, 3),
                                          model_version=self.model_version)
        if outcome.new:
            self.recorded += 1
            self.cells += len(records)
        else:
            self.already += 1

    def summary(self) -> str:
        diff = self.state.differential
        stopped = f"; target reached, {self.after_target} image(s) not recorded" if self.after_target else ""
        return (f"sample {self.sample} in {self.store.path}: {self.recorded} image(s) recorded ({self.cells} cells), "
                f"{self.already} already recorded{stopped}; {diff.n_wbc}/{diff.target} WBC identified, "
                f"{diff.n_unidentified} to review (leukograph review --db {self.store.path})")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Localise and classify every cell in images", add_help=add_help)
    parser.add_argument("paths", nargs="+", help="image files (JPEG, PNG, BMP, TIFF, WebP, JPEG 2000) or directories")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--views", type=int, choices=VIEW_COUNTS, default=VIEWS,
                        help=f"white_cell from each cell's embeddings averaged over {VIEWS} views: its {DIHEDRAL} "
                        f"flips and quarter-turns at each of the scales {VIEW_SCALES} (default), over the {DIHEDRAL} "
                        "flips and turns alone, or from the served view only (1)")
    parser.add_argument("--localizer", choices=LOCALIZERS, default="server",
                        help="server: the learned cell detector the served ensemble runs (default); client: the "
                        "classical localiser")
    parser.add_argument("--db", default=None, metavar="PATH",
                        help="also record the results, with the thumbnails `leukograph review` shows, in this result "
                        f"database (e.g. {DEFAULT_DB})")
    parser.add_argument("--sample", default=None,
                        help="with --db: sample id (default: sample-<timestamp>); an existing sample is resumed")
    parser.add_argument("--target", type=int, default=DEFAULT_TARGET,
                        help="with --db: stop recording when this many WBC are identified (usually "
                        f"{' or '.join(map(str, TARGETS))}; default {DEFAULT_TARGET})")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"with --db: WBC below this top probability go to the review list (default "
                        f"{DEFAULT_THRESHOLD})")
    add_keep_freed_memory_argument(parser)
    return parser


def _summary_line(result: dict) -> str:
    white = result["white_cell"]
    flag = f", flagged {white['label']} ({white['label_probability']:.2f})" if white["label"] != white["class"] else ""
    fallback = {"fallback": ", no WBC box found: fallback",
                "zoomed out": ", WBC box found in a zoomed-out field",
                "large cell": ", the cell fills the image: answered in a zoomed-out field"}.get(white["found_by"], "")
    wbc = [c for c in result["cells"] if c["kind"] == "wbc"]
    labels = ", ".join(f"{c['label']} ({max(c['probs'].values()):.2f})" for c in wbc) or "none"
    return (f"{safe_name(result['path'])}: white cell: {white['class']} ({white['probability']:.2f}){flag}{fallback}; "
            f"{len(result['cells'])} cells; WBC boxes: {labels}")


def main(args: argparse.Namespace) -> int:
    apply_keep_freed_memory(args)
    if args.db is None and (args.sample is not None or args.target != DEFAULT_TARGET
                            or args.threshold != DEFAULT_THRESHOLD):
        raise UserError("--sample, --target and --threshold are for recording: add --db PATH")
    if args.target < 1:
        raise UserError("--target must be >= 1")
    if not 0.0 <= args.threshold <= 1.0:
        raise UserError("--threshold must be in [0, 1]")
    images, problems = list_images(args.paths)
    if not images and not problems:
        raise UserError("no images given")
    classifier = Classifier(args.weights, args.threads, args.localizer, args.views) if images else None
    total = len(images) + len(problems)
    with ResultStore(args.db) if args.db and images else contextlib.nullcontext() as store:
        recorder = None
        if store is not None:
            from leukograph.deploy.model_repository import weights_id

            sample = args.sample or datetime.now().strftime("sample-%Y%m%d-%H%M%S")
            recorder = SampleRecorder(store, sample, args.target, args.threshold, weights_id(args.weights))
        for path in images:
            started = time.perf_counter()
            try:
                result, image, prediction = classifier.classify_file(path)
                if recorder is not None:
                    recorder.record(path, image, prediction, 1e3 * (time.perf_counter() - started))
            except ImageError as exc:
                problems.append((path, exc.problem))
                continue
            except OSError as exc:  # removed or made unreadable between decoding and hashing
                problems.append((path, exc.strerror or str(exc)))
                continue
            print(json.dumps(result) if args.json else _summary_line(result), flush=True)
        if recorder is not None:
            print(f"leukograph classify: {recorder.summary()}", file=sys.stderr, flush=True)
    for path, problem in problems:
        print(f"leukograph classify: error: {safe_name(path)}: {problem}", file=sys.stderr)
    if problems:
        print(f"leukograph classify: {len(problems)} of {total} inputs failed", file=sys.stderr)
        return 1
    return 0
