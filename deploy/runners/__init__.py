"""Runners: one protocol, `infer(feed) -> outputs` by contract tensor name, as Polygraphy's `BaseRunner`.

`OrtRunner`, `TorchRunner` and `TrtRunner` run one stage; `TritonRunner` runs the served pipeline through the
client's `TritonPipelineClient`. `run_pipeline(runners, frame, boxes)` chains them; `compare` checks one chain
against another with a `Tolerance` per compute dtype. Used by `classify`, engine verification and the benchmark.
"""

from leukograph.deploy.runners.backends import (
    ORT_CPU,
    ORT_CUDA,
    OrtRunner,
    TorchRunner,
    TritonRunner,
    TrtRunner,
    ort_cuda_status,
)
from leukograph.deploy.runners.base import BaseRunner, Tensors, run_pipeline
from leukograph.deploy.runners.compare import TOLERANCES, Comparison, Sample, Tolerance, compare

__all__ = ["ORT_CPU", "ORT_CUDA", "TOLERANCES", "BaseRunner", "Comparison", "OrtRunner", "Sample", "Tensors",
           "Tolerance", "TorchRunner", "TritonRunner", "TrtRunner", "compare", "ort_cuda_status", "run_pipeline"]
