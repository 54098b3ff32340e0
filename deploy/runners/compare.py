"""The one comparator: a candidate pipeline against a reference, per node, with tolerances per compute dtype.

Both are runner lists (`run_pipeline`), e.g. ONNX Runtime fp32 against TensorRT FP16 plans, an FP16 ONNX graph, the
PyTorch modules or the served Triton pipeline. Class agreement, the largest probability difference, the embedding
cosine (stage runners only) and accuracy on labelled WBC nodes are compared to the `Tolerance` of the candidate's
compute dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from leukograph.client.contract import CLASSES, EMBEDDINGS, FRAME_SIZE, LABELS, PROBS
from leukograph.deploy.runners.base import BaseRunner, run_pipeline


@dataclass(frozen=True)
class Tolerance:
    """How far a candidate may be from the fp32 reference, over all nodes of all compared frames."""

    min_class_agreement: float  # fraction of nodes whose argmax class is unchanged
    max_accuracy_drop: float  # on labelled WBC nodes (0.003 = 0.3 percentage points)
    max_prob_diff: float  # largest |p_candidate - p_reference| over every node and class
    min_embedding_cosine: float  # per-cell cosine of crop_embedder outputs: a guard against gross errors


TOLERANCES: dict[str, Tolerance] = {
    # the same fp32 graph elsewhere (Triton's python steps, another thread count): differences are summation order
    "fp32": Tolerance(1.0, 0.0, 1e-3, 0.9999),
    # PyTorch on CUDA, whose convolutions may use TF32, against ONNX Runtime fp32 on the CPU
    "tf32": Tolerance(0.995, 0.003, 2e-2, 0.999),
    # TensorRT FP16 engines or an FP16 ONNX graph against ONNX Runtime fp32
    "fp16": Tolerance(0.995, 0.003, 0.05, 0.99),
}


@dataclass
class Sample:
    frame_id: str
    frame: np.ndarray  # uint8 HxWx3 RGB
    boxes: np.ndarray  # float32 [N,4]
    labels: list[int | None]  # CLASSES index of a labelled WBC node, else None
    box_source: str


@dataclass
class Comparison:
    """Candidate vs reference over all samples; `failures()` applies a tolerance."""

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
    labels_not_argmax: int = 0  # frames whose candidate LABELS is not argmax(PROBS)
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

    def failures(self, min_agreement: float = TOLERANCES["fp16"].min_class_agreement,
                 max_accuracy_drop: float = TOLERANCES["fp16"].max_accuracy_drop,
                 max_prob_diff: float = TOLERANCES["fp16"].max_prob_diff,
                 min_cosine: float = TOLERANCES["fp16"].min_embedding_cosine) -> list[str]:
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

    def failures_for(self, tolerance: Tolerance) -> list[str]:
        return self.failures(tolerance.min_class_agreement, tolerance.max_accuracy_drop, tolerance.max_prob_diff,
                             tolerance.min_embedding_cosine)

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


def compare(reference: Sequence[BaseRunner], candidate: Sequence[BaseRunner], samples: Sequence[Sample]) -> Comparison:
    """End to end (and, for stage runners, per stage) comparison of two runner chains on `samples`."""
    result = Comparison(box_source=",".join(sorted({s.box_source for s in samples})))
    for sample in samples:
        ref = run_pipeline(reference, sample.frame, sample.boxes)
        cand = run_pipeline(candidate, sample.frame, sample.boxes)
        ref_cls, cand_cls = ref[PROBS.name].argmax(1), cand[PROBS.name].argmax(1)
        result.frames += 1
        result.nodes += len(sample.boxes)
        result.agreeing_nodes += int((ref_cls == cand_cls).sum())
        last = candidate[-1]
        if len(candidate) > 1 and EMBEDDINGS.name in last.input_names:  # the candidate's cell_graph alone
            graph_only = last.infer(ref)[PROBS.name]
        else:
            graph_only = cand[PROBS.name]
        result.graph_only_agreeing_nodes += int((graph_only.argmax(1) == ref_cls).sum())
        result.graph_only_max_prob_diff = max(result.graph_only_max_prob_diff,
                                              float(np.abs(graph_only - ref[PROBS.name]).max()))
        diff = float(np.abs(cand[PROBS.name] - ref[PROBS.name]).max())
        if diff > result.max_prob_diff:
            result.max_prob_diff, result.max_prob_diff_frame = diff, sample.frame_id
        if EMBEDDINGS.name in ref and EMBEDDINGS.name in cand:
            result.min_embedding_cosine = min(result.min_embedding_cosine,
                                              float(_cosine(ref[EMBEDDINGS.name], cand[EMBEDDINGS.name]).min()))
            result.max_embedding_abs_diff = max(result.max_embedding_abs_diff,
                                                float(np.abs(ref[EMBEDDINGS.name] - cand[EMBEDDINGS.name]).max()))
        if FRAME_SIZE.name in ref and FRAME_SIZE.name in cand:
            result.frame_size_mismatches += int(not np.array_equal(ref[FRAME_SIZE.name], cand[FRAME_SIZE.name]))
        if not np.array_equal(cand[LABELS.name], cand_cls.astype(cand[LABELS.name].dtype)):
            result.labels_not_argmax += 1
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
