"""Triton python-backend step running one stage in PyTorch (CUDA when present, else CPU): the `pytorch` variant.

For GPU machines without TensorRT and without NVIDIA's Triton container (see `deploy/bench_gpu.sh`): the
nvidia-pytriton wheel's `tritonserver` with python-backend steps, each running its stage module from
`leukograph.training.models` on the GPU. `leukograph generate-repo --backend pytorch` copies this file to
`<stage>/1/model.py`; beside it, `model.pt` is the stage module (`leukograph.training.models`, from the checkpoints)
traced to TorchScript on the serving device by `model_repository.write_torchscript`. TorchScript, because the stub
must not import torch_geometric: it imports `ssl`, and the CPU machines' stub links Debian's libpython3.11 while the
venv's stdlib is pyenv's 3.11.7 (`_ssl` fails with "undefined symbol: _PyModule_Add").
Requests are validated against the contract exactly as in `python_step.py`.

Tensors cross the stub through DLPack (`to_dlpack` / `Tensor.from_dlpack`), not numpy: with numpy 2 in the stub's
Python the numpy path returned empty outputs (shared notes, platform.md), and DLPack avoids a copy.
The instance group is KIND_CPU on purpose: the step itself moves inputs to the GPU and results back, which works with
any build of the python backend (GPU tensors through the stub need its CUDA support).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from leukograph.client import contract
from leukograph.deploy.python_step import _error, validate


def _device(wanted: str) -> torch.device:
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        name = args["model_name"]
        stages = {s.name: s for s in contract.STAGES}
        if name not in stages:
            raise ValueError(f"model {name!r} is not a contract stage ({', '.join(stages)})")
        self.stage = stages[name]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        for key, value in (("max_cells", contract.MAX_CELLS), ("max_frame_side", contract.MAX_FRAME_SIDE)):
            if key in params and int(params[key]) != value:
                raise ValueError(f"config parameter {key}={params[key]} differs from the contract ({value}): "
                                 "run `leukograph generate-repo`")
        threads = int(params.get("torch_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = _device(params.get("torch_device", "auto"))  # the device the module was traced on
        checkpoint = Path(args["model_repository"]) / args["model_version"] / params.get("checkpoint_file", "model.pt")
        self.module = torch.jit.load(str(checkpoint), map_location=self.device).eval()
        self.logger = pb_utils.Logger
        self.logger.log_info(f"{name}: loaded {checkpoint} on {self.device}")

    @torch.no_grad()
    def _run(self, request) -> pb_utils.InferenceResponse:
        inputs = {}
        for spec in self.stage.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is None:
                raise contract.ContractError(f"input {spec.name} is missing")
            inputs[spec.name] = from_dlpack(tensor.to_dlpack())
        # Validation reads small tensors (boxes, sizes) on the CPU; FRAME only needs its shape and dtype.
        validate(self.stage, {k: v.numpy() if k != "FRAME" else _shape_proxy(v) for k, v in inputs.items()})
        feeds = [inputs[name].to(self.device, non_blocking=True) for name in self.stage.input_names]
        outputs = self.module(*feeds)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor.from_dlpack(spec.name, to_dlpack(value.to("cpu", getattr(torch, spec.dtype))
                                                             .contiguous()))
            for spec, value in zip(self.stage.outputs, outputs)])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                responses.append(self._run(request))
            except contract.ContractError as exc:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=_error(f"{self.stage.name}: bad request: {exc}", "INVALID_ARG")))
            except Exception as exc:  # never let one request take the model down
                message = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
                self.logger.log_error(f"{self.stage.name}: {message}")
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=_error(f"{self.stage.name}: internal error: {message}", "INTERNAL")))
        return responses

    def finalize(self) -> None:
        self.module = None


def _shape_proxy(frame: torch.Tensor) -> np.ndarray:
    """A zero-stride numpy view with FRAME's shape and dtype: the contract checks only those (no copy)."""
    dtype = np.dtype(str(frame.dtype).removeprefix("torch."))
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=tuple(frame.shape), strides=(0,) * frame.dim())
