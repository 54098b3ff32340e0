"""INT8 engines by explicit quantisation: TensorRT >= 10 builds the crop_embedder from its QDQ ONNX graph.

`leukograph export --int8` writes `crop_embedder/1/model.int8.tensorrt.onnx` (training/quantize.py): symmetric signed
INT8 Q/DQ nodes with per-channel weight scales, float biases, the crop and colour standardisation left FP32.
`build-engines --precision int8-qdq` parses it into a strongly typed network
(`NetworkDefinitionCreationFlag.STRONGLY_TYPED`): the Q/DQ nodes fix which tensors are INT8, so no `BuilderFlag.INT8`
and no calibrator are used (implicit quantisation, `IInt8EntropyCalibrator2` and the INT8 builder flag, is deprecated
in TensorRT 10; Developer Guide, "Explicit Quantization" and "Strongly Typed Networks"). The cell_graph has no QDQ
graph (it stays FP32, README "INT8") and is built from model.onnx with TF32 off, unless `--qdq-onnx cell_graph=PATH`
names one.

Before any build, `onnx_ops.check_qdq` checks the Q/DQ placement TensorRT accepts. After it, the engines are verified
against ONNX Runtime FP32 on the BCCD held-out frames with `INT8_TOLERANCE`, the bounds the INT8 ONNX Runtime graph
itself meets (tests/test_int8.py measures it on the same frames).
"""

from __future__ import annotations

from pathlib import Path

from leukograph.client.contract import CELL_GRAPH, CROP_EMBEDDER, MODEL_FILES, StageSpec, stage_path
from leukograph.deploy.runners import OrtRunner, Tolerance

QDQ_TENSORRT_FILE = "model.int8.tensorrt.onnx"  # training/quantize.py INT8_FILES["tensorrt"]
QDQ_ONNXRUNTIME_FILE = "model.int8.onnx"  # training/quantize.py INT8_FILES["onnxruntime"]
# INT8 vs ONNX Runtime FP32 over every node of the held-out frames: >= 99% same class (the bound), and at
# most one of the 72 labelled WBC nodes lost (1.39 points: the 0.5-point bound is finer than this set can
# resolve, so README reports that bound per source from `evaluate --precision int8`); a probability may move (a
# borderline cell), an embedding may not collapse. Measured with ONNX Runtime running the QDQ graphs of the
# committed weights on the 72 held-out frames (1,174 nodes): class agreement 99.91%, one labelled node lost, min
# embedding cosine 0.9989 (tests/test_int8.py re-measures them).
HELD_OUT_WBC_NODES = 72
INT8_TOLERANCE = Tolerance(min_class_agreement=0.99, max_accuracy_drop=1.0 / HELD_OUT_WBC_NODES + 1e-9,
                           max_prob_diff=0.3, min_embedding_cosine=0.85)


def default_qdq_path(repository: Path, stage: StageSpec) -> Path | None:
    """The QDQ graph `export --int8` wrote for `stage`, if it has one."""
    if stage.name != CROP_EMBEDDER.name:
        return None
    path = stage_path(repository, stage, QDQ_TENSORRT_FILE)
    return path if path.exists() else None


def network_path(repository: Path, stage: StageSpec, given: dict[str, Path]) -> tuple[Path, bool]:
    """(ONNX file TensorRT parses for `stage` at int8-qdq, whether it is a QDQ graph): --qdq-onnx, else export's QDQ
    graph, else (cell_graph) the FP32 graph."""
    if stage.name in given:
        return given[stage.name], True
    default = default_qdq_path(repository, stage)
    if default is not None:
        return default, True
    return stage_path(repository, stage, MODEL_FILES["onnxruntime"]), False


def ort_int8_pipeline(repository: Path, runtime_file: str = QDQ_ONNXRUNTIME_FILE, threads: int = 1) -> list[OrtRunner]:
    """ONNX Runtime runners of the INT8 crop_embedder (`runtime_file`) and the FP32 cell_graph."""
    return [OrtRunner(stage_path(repository, CROP_EMBEDDER, runtime_file), CROP_EMBEDDER, threads),
            OrtRunner(stage_path(repository, CELL_GRAPH, MODEL_FILES["onnxruntime"]), CELL_GRAPH, threads)]


def apply_tolerance(args) -> None:
    """build-engines' verification options that were left at their FP16 defaults take INT8_TOLERANCE's values."""
    from leukograph.build_engines import verify

    defaults = {"min_agreement": verify.MIN_CLASS_AGREEMENT, "max_accuracy_drop": verify.MAX_ACCURACY_DROP,
                "max_prob_diff": verify.MAX_PROB_DIFF, "min_embedding_cosine": verify.MIN_EMBEDDING_COSINE}
    wanted = {"min_agreement": INT8_TOLERANCE.min_class_agreement,
              "max_accuracy_drop": INT8_TOLERANCE.max_accuracy_drop, "max_prob_diff": INT8_TOLERANCE.max_prob_diff,
              "min_embedding_cosine": INT8_TOLERANCE.min_embedding_cosine}
    for name, default in defaults.items():
        if getattr(args, name) == default:
            setattr(args, name, wanted[name])
