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
Python the numpy path returned empty outputs (measured with numpy 2.4), and DLPack avoids a copy.
The instance group is KIND_CPU on purpose: the step itself moves inputs to the GPU and results back, which works with
any build of the python backend (GPU tensors through the stub need its CUDA support).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from leukograph.client import contract
from leukograph.deploy.python_step import StepModel


def _device(wanted: str) -> torch.device:
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


class TritonPythonModel(StepModel):
    """PyTorch step (CUDA when present): runs the stage's TorchScript module, tensors passed through DLPack."""

    def load(self, params: dict[str, str], version_dir: Path) -> None:
        threads = int(params.get("torch_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = _device(params.get("torch_device", "auto"))  # the device the module was traced on
        checkpoint = version_dir / params.get("checkpoint_file", contract.MODEL_FILES["pytorch"])
        self.module = torch.jit.load(str(checkpoint), map_location=self.device).eval()
        self.logger.log_info(f"{self.stage.name}: loaded {checkpoint} on {self.device}")

    @torch.no_grad()
    def run(self, request) -> pb_utils.InferenceResponse:
        inputs = {name: from_dlpack(t.to_dlpack()) for name, t in self.input_tensors(request).items()}
        # Validation reads small tensors (boxes, sizes) on the CPU; FRAME only needs its shape and dtype.
        on_host = {k: v.numpy() if k != contract.FRAME.name else _shape_proxy(v) for k, v in inputs.items()}
        contract.validate_stage(self.stage, on_host)
        empty = self.no_cells_response(on_host)
        if empty is not None:
            return empty
        feeds = [inputs[name].to(self.device, non_blocking=True) for name in self.stage.input_names]
        outputs = self.module(*feeds)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor.from_dlpack(spec.name, to_dlpack(value.to("cpu", getattr(torch, spec.dtype))
                                                             .contiguous()))
            for spec, value in zip(self.stage.outputs, outputs)])

    def finalize(self) -> None:
        self.module = None


def _shape_proxy(frame: torch.Tensor) -> np.ndarray:
    """A zero-stride numpy view with FRAME's shape and dtype: the contract checks only those (no copy)."""
    dtype = np.dtype(str(frame.dtype).removeprefix("torch."))
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=tuple(frame.shape), strides=(0,) * frame.dim())
