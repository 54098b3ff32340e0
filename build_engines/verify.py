"""Compare two implementations of the served pipeline on real BCCD held-out frames.

A *stage runner* is any callable `feeds: dict[str, ndarray] -> dict[str, ndarray]` with the contract's tensor names:
an ONNX Runtime session (`OrtStage`), a TensorRT engine (`runner.EngineRunner`). The reference pipeline is ONNX
Runtime fp32; the candidate is an FP16 ONNX graph in ORT (tests) or the built TensorRT engines (after a build).

Boxes come from the project's localiser (`leukograph.client.localize.localize`) when it imports, else from the VOC
annotations. A localised box is a *labelled WBC node* when it overlaps (IoU >= 0.5) a VOC WBC box with a subtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from leukograph.client.boxes import box_iou
from leukograph.client.contract import CELL_GRAPH, CLASSES, CROP_EMBEDDER, MAX_CELLS
from leukograph.client.images import read_image

StageRunner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

# FP16 tolerances (TensorRT engine or FP16 ONNX vs ONNX Runtime fp32), over all nodes of all held-out frames.
MIN_CLASS_AGREEMENT = 0.995  # fraction of nodes whose argmax class is unchanged
MAX_ACCURACY_DROP = 0.003  # 0.3 percentage points on labelled WBC nodes
MAX_PROB_DIFF = 0.05  # largest |p_fp16 - p_fp32| over every node and class
MIN_EMBEDDING_COSINE = 0.99  # per-cell cosine of crop_embedder outputs: a guard against gross errors (wrong crop)
MATCH_IOU = 0.5


@dataclass
class Sample:
    frame_id: str
    frame: np.ndarray  # uint8 HxWx3 RGB
    boxes: np.ndarray  # float32 [N,4]
    labels: list[int | None]  # CLASSES index of a labelled WBC node, else None
    box_source: str


class OrtStage:
    """An ONNX Runtime CPU session as a stage runner (fp32 or fp16 graph, same I/O)."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wanted = {i.name for i in self.session.get_inputs()}
        values = self.session.run(None, {k: v for k, v in feeds.items() if k in wanted})
        return dict(zip(self.output_names, values))


def _localizer() -> Callable | None:
    try:
        from leukograph.client.localize import localize
    except ImportError:
        return None
    return localize


def held_out_samples(box_source: str = "auto", frame_size: tuple[int, int] | None = None,
                     root: Path | None = None) -> list[Sample]:
    """Every BCCD held-out frame (split_frames().held_out present in load_bccd()), with boxes and node labels.

    box_source: "localize", "voc" or "auto" (localize when importable). frame_size (height, width) resizes frames and
    boxes, for engines whose profile fixes another camera size."""
    from leukograph.training.datasets import load_bccd, split_frames

    held = split_frames(root).held_out
    localize = _localizer() if box_source in ("auto", "localize") else None
    if box_source == "localize" and localize is None:
        raise RuntimeError("leukograph.client.localize is not importable")
    samples = []
    for item in load_bccd(root):
        if item.frame_id not in held:
            continue
        frame = read_image(item.image_path)
        voc = np.array([b.box for b in item.boxes], np.float32).reshape(-1, 4)
        voc_labels = [CLASSES.index(b.label) if b.kind == "wbc" and b.label in CLASSES else None for b in item.boxes]
        if localize is not None:
            boxes = np.asarray(localize(frame).boxes, np.float32).reshape(-1, 4)
            labels: list[int | None] = [None] * len(boxes)
            labelled = [i for i, lab in enumerate(voc_labels) if lab is not None]
            if len(boxes) and labelled:
                iou = box_iou(boxes, voc[labelled])
                for j, i_voc in enumerate(labelled):  # each labelled VOC WBC claims its best localised box
                    best = int(np.argmax(iou[:, j]))
                    if iou[best, j] >= MATCH_IOU and labels[best] is None:
                        labels[best] = voc_labels[i_voc]
            source = "localize"
        else:
            boxes, labels, source = voc, voc_labels, "voc"
        boxes, labels = boxes[:MAX_CELLS], labels[:MAX_CELLS]
        if len(boxes) == 0:
            continue
        if frame_size is not None and frame.shape[:2] != tuple(frame_size):
            scale = np.array([frame_size[1] / frame.shape[1], frame_size[0] / frame.shape[0]] * 2, np.float32)
            frame = cv2.resize(frame, (frame_size[1], frame_size[0]), interpolation=cv2.INTER_AREA)
            boxes = boxes * scale
        samples.append(Sample(item.frame_id, np.ascontiguousarray(frame), boxes.astype(np.float32), labels, source))
    return samples


def run_pipeline(embedder: StageRunner, graph: StageRunner, frame: np.ndarray,
                 boxes: np.ndarray) -> dict[str, np.ndarray]:
    """crop_embedder then cell_graph: all four outputs by name."""
    first = embedder({"FRAME": frame, "BOXES": boxes})
    second = graph({"EMBEDDINGS": first["EMBEDDINGS"], "BOXES": boxes, "FRAME_SIZE": first["FRAME_SIZE"]})
    return {**first, **second}


@dataclass
class Comparison:
    """Candidate vs reference over all samples; `failures()` applies the FP16 tolerances."""

    frames: int = 0
    nodes: int = 0
    agreeing_nodes: int = 0
    labelled_nodes: int = 0
    reference_correct: int = 0
    candidate_correct: int = 0
    max_prob_diff: float = 0.0
    max_prob_diff_frame: str = ""
    min_embedding_cosine: float = 1.0
    max_embedding_abs_diff: float = 0.0
    frame_size_mismatches: int = 0
    graph_only_agreeing_nodes: int = 0  # candidate cell_graph fed the reference embeddings
    graph_only_max_prob_diff: float = 0.0
    box_source: str = ""
    disagreements: list[str] = field(default_factory=list)

    @property
    def class_agreement(self) -> float:
        return self.agreeing_nodes / max(self.nodes, 1)

    @property
    def graph_only_agreement(self) -> float:
        return self.graph_only_agreeing_nodes / max(self.nodes, 1)

    @property
    def reference_accuracy(self) -> float:
        return self.reference_correct / max(self.labelled_nodes, 1)

    @property
    def candidate_accuracy(self) -> float:
        return self.candidate_correct / max(self.labelled_nodes, 1)

    @property
    def accuracy_drop(self) -> float:
        return self.reference_accuracy - self.candidate_accuracy

    def failures(self, min_agreement: float = MIN_CLASS_AGREEMENT, max_accuracy_drop: float = MAX_ACCURACY_DROP,
                 max_prob_diff: float = MAX_PROB_DIFF, min_cosine: float = MIN_EMBEDDING_COSINE) -> list[str]:
        out = []
        if self.nodes == 0:
            out.append("no nodes compared")
        if self.class_agreement < min_agreement:
            out.append(f"class agreement {self.class_agreement:.4f} < {min_agreement}")
        if self.accuracy_drop > max_accuracy_drop:
            out.append(f"accuracy drop {100 * self.accuracy_drop:.2f} pt > {100 * max_accuracy_drop:.2f} pt")
        if self.max_prob_diff > max_prob_diff:
            out.append(f"max prob diff {self.max_prob_diff:.4f} > {max_prob_diff} (frame {self.max_prob_diff_frame})")
        if self.min_embedding_cosine < min_cosine:
            out.append(f"min embedding cosine {self.min_embedding_cosine:.5f} < {min_cosine}")
        if self.frame_size_mismatches:
            out.append(f"FRAME_SIZE differs on {self.frame_size_mismatches} frames")
        return out

    def summary(self) -> dict:
        data = asdict(self)
        data["disagreements"] = data["disagreements"][:20]
        data.update(class_agreement=self.class_agreement, graph_only_agreement=self.graph_only_agreement,
                    reference_accuracy=self.reference_accuracy, candidate_accuracy=self.candidate_accuracy,
                    accuracy_drop=self.accuracy_drop)
        return data

    def line(self) -> str:
        return (f"{self.frames} frames, {self.nodes} nodes ({self.box_source} boxes): class agreement "
                f"{100 * self.class_agreement:.2f}% (cell_graph alone {100 * self.graph_only_agreement:.2f}%), "
                f"max prob diff {self.max_prob_diff:.5f} (cell_graph alone {self.graph_only_max_prob_diff:.5f}), "
                f"min embedding cosine {self.min_embedding_cosine:.5f}, labelled WBC accuracy "
                f"{100 * self.reference_accuracy:.2f}% -> {100 * self.candidate_accuracy:.2f}% "
                f"({self.labelled_nodes} nodes)")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)  # ReLU embeddings can be all-zero in both: identical
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-12)
    return np.where(both_zero, 1.0, cos)


def compare(reference: tuple[StageRunner, StageRunner], candidate: tuple[StageRunner, StageRunner],
            samples: list[Sample]) -> Comparison:
    """End-to-end and per-stage comparison of two (crop_embedder, cell_graph) pairs on `samples`."""
    result = Comparison(box_source=",".join(sorted({s.box_source for s in samples})))
    for sample in samples:
        ref = run_pipeline(*reference, sample.frame, sample.boxes)
        cand = run_pipeline(*candidate, sample.frame, sample.boxes)
        graph_only = candidate[1]({"EMBEDDINGS": ref["EMBEDDINGS"], "BOXES": sample.boxes,
                                   "FRAME_SIZE": ref["FRAME_SIZE"]})
        ref_cls, cand_cls = ref["PROBS"].argmax(1), cand["PROBS"].argmax(1)
        result.frames += 1
        result.nodes += len(sample.boxes)
        result.agreeing_nodes += int((ref_cls == cand_cls).sum())
        result.graph_only_agreeing_nodes += int((graph_only["PROBS"].argmax(1) == ref_cls).sum())
        result.graph_only_max_prob_diff = max(result.graph_only_max_prob_diff,
                                              float(np.abs(graph_only["PROBS"] - ref["PROBS"]).max()))
        diff = float(np.abs(cand["PROBS"] - ref["PROBS"]).max())
        if diff > result.max_prob_diff:
            result.max_prob_diff, result.max_prob_diff_frame = diff, sample.frame_id
        result.min_embedding_cosine = min(result.min_embedding_cosine,
                                          float(_cosine(ref["EMBEDDINGS"], cand["EMBEDDINGS"]).min()))
        result.max_embedding_abs_diff = max(result.max_embedding_abs_diff,
                                            float(np.abs(ref["EMBEDDINGS"] - cand["EMBEDDINGS"]).max()))
        result.frame_size_mismatches += int(not np.array_equal(ref["FRAME_SIZE"], cand["FRAME_SIZE"]))
        if not np.array_equal(cand["LABELS"], cand_cls.astype(cand["LABELS"].dtype)):
            result.disagreements.append(f"{sample.frame_id}: LABELS is not argmax(PROBS)")
        for i in np.flatnonzero(ref_cls != cand_cls):
            result.disagreements.append(f"{sample.frame_id} node {i}: {CLASSES[ref_cls[i]]} -> {CLASSES[cand_cls[i]]}")
        for i, label in enumerate(sample.labels):
            if label is None:
                continue
            result.labelled_nodes += 1
            result.reference_correct += int(ref_cls[i] == label)
            result.candidate_correct += int(cand_cls[i] == label)
    return result


def ort_pipeline(repository: Path) -> tuple[OrtStage, OrtStage]:
    """ONNX Runtime fp32 sessions for `<repository>/<stage>/1/model.onnx`."""
    return (OrtStage(repository / CROP_EMBEDDER.name / "1" / "model.onnx"),
            OrtStage(repository / CELL_GRAPH.name / "1" / "model.onnx"))
