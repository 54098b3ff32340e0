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

import time
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from leukograph.client import contract
from leukograph.deploy.python_step import StepModel

# Shapes the warm-up runs before serving: every cell count up to 16, then steps up to 128, on a 480x640 frame.
WARM_UP_CELLS = (*range(1, 17), 20, 24, 32, 48, 64, 96, 128)
WARM_UP_FRAME = (480, 640)


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
        started = time.perf_counter()
        self.warm_up()
        self.logger.log_info(f"{self.stage.name}: loaded {checkpoint} on {self.device}, warmed up in "
                             f"{time.perf_counter() - started:.1f} s")

    @torch.no_grad()
    def warm_up(self) -> None:
        """Run the module on a synthetic WARM_UP_FRAME for every cell count in WARM_UP_CELLS before serving.

        TorchScript's optimising executor profiles and compiles fused kernels for each new input shape, and CUDA
        loads kernels on first use; cell counts and box rows (the detector pads to MAX_CELLS) are both shapes.
        Without this, the first frames of a stream paid up to 0.8 s each on a GPU (p99 761 ms over 120 frames on
        an H100, against 17.6 ms once warm)."""
        rng = np.random.default_rng(0)
        height, width = WARM_UP_FRAME
        # The compile and kernel-loading costs are a GPU's; on the CPU two counts only check the path.
        counts = WARM_UP_CELLS if self.device.type == "cuda" else WARM_UP_CELLS[:2]
        if contract.BOXES.name not in self.stage.input_names:  # the frame is the only shape
            counts = counts[:1]
        for cells in counts:
            for rows in (cells, contract.MAX_CELLS):  # the client's boxes, and the detector's padded rows
                feed = contract.example_feed(self.stage, rows, cells, height, width, rng)
                self.module(*[torch.from_numpy(value).to(self.device) for value in feed.values()])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

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
