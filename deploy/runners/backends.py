"""The runners: ONNX Runtime, PyTorch, TensorRT (one stage each) and Triton (the whole served pipeline).

Each backend's library is imported when its runner is made, so importing this module needs none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from leukograph.client.contract import (
    BOXES,
    CELL_COUNT,
    FRAME,
    KINDS,
    LABELS,
    PIPELINE_OF_LOCALIZER,
    PROBS,
    SCORES,
    StageSpec,
    cell_count,
)
from leukograph.client.errors import UserError
from leukograph.deploy.runners.base import BaseRunner, Tensors

ORT_CPU, ORT_CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def ort_cuda_status() -> str | None:
    """None when ONNX Runtime here has its CUDA execution provider, else why not."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return f"onnxruntime not importable: {exc}"
    if ORT_CUDA not in ort.get_available_providers():
        providers = ", ".join(ort.get_available_providers())
        return (f"onnxruntime {ort.__version__} has no {ORT_CUDA} (providers: {providers}; the onnxruntime-gpu "
                "package built for this CUDA is needed)")
    return None


class OrtRunner(BaseRunner):
    """One stage's ONNX file in ONNX Runtime (fp32, fp16 or QDQ int8 graphs: same inputs and outputs), on the CPU or,
    with `provider=ORT_CUDA`, on the GPU (CPU kept as ONNX Runtime's fallback for ops CUDA lacks)."""

    def __init__(self, path: Path, stage: StageSpec, threads: int = 1, name: str | None = None,
                 provider: str = ORT_CPU) -> None:
        super().__init__(stage, name)
        import onnxruntime as ort

        if not Path(path).exists():
            raise UserError(f"{path} is missing: run `leukograph export`")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.path = Path(path)
        self.threads = threads
        providers: list = [ORT_CPU]
        if provider == ORT_CUDA:
            if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels (PyTorch's), when present
                ort.preload_dlls(msvc=False)
            # ONNX Runtime redoes its cuDNN convolution set-up whenever the cell count changes; that costs least with
            # cuDNN's default algorithm (one H100, held-out frames: crop_embedder p50 5.0 ms against 10.7 with the
            # heuristic and 62.9 with the exhaustive search; 0.8-1.2 ms at one fixed count)
            providers = [(ORT_CUDA, {"cudnn_conv_algo_search": "DEFAULT"}), ORT_CPU]
        elif provider != ORT_CPU:
            providers = [provider, ORT_CPU]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        if provider not in self.session.get_providers():  # ONNX Runtime falls back to the CPU with a logged error
            raise UserError(f"{path}: onnxruntime could not start {provider} (session providers: "
                            f"{', '.join(self.session.get_providers())}; its error is logged above)")
        got = [i.name for i in self.session.get_inputs()]
        if got != stage.input_names:
            raise ValueError(f"{path} has inputs {got}, the contract says {stage.input_names}")

    def infer_impl(self, feed: Tensors) -> Tensors:
        values = self.session.run(self.stage.output_names, feed)
        return dict(zip(self.stage.output_names, values))


class TorchRunner(BaseRunner):
    """One stage module (`training.models.CropEmbedderStage` / `CellGraphStage`) in PyTorch eager, on `device`."""

    def __init__(self, module: Any, stage: StageSpec, device: str = "cpu", name: str | None = None) -> None:
        super().__init__(stage, name)
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.module = module.eval().to(self.device)

    def infer_impl(self, feed: Tensors) -> Tensors:
        torch = self.torch
        with torch.no_grad():
            inputs = [torch.from_numpy(np.ascontiguousarray(feed[name])).to(self.device) for name in self.input_names]
            outputs = self.module(*inputs)
            return {spec.name: value.cpu().numpy().astype(spec.np_dtype, copy=False)
                    for spec, value in zip(self.stage.outputs, outputs)}


class TrtRunner(BaseRunner):
    """One stage's TensorRT plan (`build_engines.runner.EngineRunner`: TensorRT and pycuda, imported here)."""

    def __init__(self, plan: Path, stage: StageSpec, name: str | None = None) -> None:
        super().__init__(stage, name)
        from leukograph.build_engines.runner import EngineRunner

        self.plan = Path(plan)
        self.engine = EngineRunner(self.plan)

    def infer_impl(self, feed: Tensors) -> Tensors:
        outputs = self.engine(feed)
        return {spec.name: outputs[spec.name] for spec in self.stage.outputs}


class TritonRunner(BaseRunner):
    """The served `leukocyte_pipeline` through the client's own `TritonPipelineClient` (gRPC or HTTP, optional
    system shared memory), one blocking request per call. Its timing hook splits each call into encode (request
    built, shared memory written), infer (the blocking call) and decode (outputs read)."""

    def __init__(self, url: str, protocol: str = "grpc", shm: bool = False, name: str | None = None,
                 localizer: str = "server", **client_options: Any) -> None:
        super().__init__(PIPELINE_OF_LOCALIZER[localizer], name)
        from leukograph.client.triton_client import TritonPipelineClient

        self._timings: dict[str, float] = {}
        self.client = TritonPipelineClient(url, protocol, localizer=localizer, shm=shm, max_in_flight=1,
                                           timing_hook=self._record, **client_options)

    def _record(self, timings: dict[str, float]) -> None:
        self._timings = timings

    def infer_impl(self, feed: Tensors) -> Tensors:
        """Bare frames (localizer server: the served detector's cells come back) or FRAME + BOXES (client)."""
        outcome = self.client.infer_outcome(feed[FRAME.name], feed.get(BOXES.name))  # the feed holds our inputs only
        outputs = {PROBS.name: outcome.probs, LABELS.name: outcome.labels}
        if outcome.boxes is not None:
            outputs.update({BOXES.name: outcome.boxes, KINDS.name: outcome.kinds.astype(KINDS.np_dtype),
                            SCORES.name: outcome.scores, CELL_COUNT.name: cell_count(outcome.boxes)})
        return outputs

    def stage_timings(self) -> dict[str, float]:
        return dict(self._timings) or super().stage_timings()

    def close(self) -> None:
        self.client.close()

