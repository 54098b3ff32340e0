"""Run one serialized TensorRT engine (model.plan) directly: the benchmark's "engine alone" row and build verification.

TensorRT >= 10 name-based I/O API (docs: "TensorRT Python API", Runtime / ICudaEngine / IExecutionContext):
`trt.Runtime(logger).deserialize_cuda_engine(bytes)`, `engine.create_execution_context()`,
`engine.num_io_tensors` / `get_tensor_name(i)` / `get_tensor_mode(name)` / `get_tensor_dtype(name)`,
`engine.get_tensor_profile_shape(name, profile_index) -> (min, opt, max)`, `context.set_input_shape(name, shape)`,
`context.get_tensor_shape(name)`, `context.set_tensor_address(name, ptr)`, `context.execute_async_v3(stream_handle)`.
Device memory and the stream come from pycuda. Both are imported lazily: importing this module needs neither.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leukograph.client.errors import UserError


class EngineRunnerError(RuntimeError):
    pass


class TensorRtUnavailable(UserError, EngineRunnerError):
    """TensorRT, pycuda or a CUDA GPU is missing here: the one error for that condition (the message names which)."""


def import_runtime():
    """(tensorrt, pycuda.driver) or TensorRtUnavailable naming exactly what is missing."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError when libnvinfer / libnvonnxparser is missing
        raise TensorRtUnavailable(f"tensorrt Python package not importable ({exc})") from None
    try:
        import pycuda.autoinit  # noqa: F401  (creates the CUDA context on device 0)
        import pycuda.driver as cuda
    except Exception as exc:
        raise TensorRtUnavailable(f"pycuda not importable or no CUDA GPU ({exc})") from None
    return trt, cuda


class EngineRunner:
    """`EngineRunner(plan_path)(feeds) -> outputs`, numpy in and out, one engine, profile 0.

    Device buffers are allocated once, sized for the profile's max shapes; each call sets the input shapes,
    copies inputs in, runs `execute_async_v3` on one stream and copies the outputs (cut to their actual shapes) back.
    """

    def __init__(self, plan_path: str | Path) -> None:
        trt, cuda = import_runtime()
        self._trt, self._cuda = trt, cuda
        self.plan_path = Path(plan_path)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise EngineRunnerError(f"cannot deserialize {self.plan_path} "
                                    "(built with another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.max_shapes: dict[str, tuple[int, ...]] = {}
        for name in self.input_names:
            shape = tuple(self.engine.get_tensor_shape(name))
            if -1 in shape:
                _, _, max_shape = self.engine.get_tensor_profile_shape(name, 0)
                shape = tuple(max_shape)
            self.max_shapes[name] = shape
            self.context.set_input_shape(name, shape)
        for name in self.output_names:  # with every input at its max, outputs are at their max too
            self.max_shapes[name] = tuple(self.context.get_tensor_shape(name))
        self.buffers = {}
        for name, shape in self.max_shapes.items():
            nbytes = max(int(np.prod(shape)) * self.dtypes[name].itemsize, 1)
            self.buffers[name] = cuda.mem_alloc(nbytes)
            self.context.set_tensor_address(name, int(self.buffers[name]))

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda = self._cuda
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise EngineRunnerError(f"{self.plan_path}: missing inputs {sorted(missing)}")
        hosts = {}
        for name in self.input_names:
            array = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            if any(d > m for d, m in zip(array.shape, self.max_shapes[name])) or array.ndim != len(
                    self.max_shapes[name]):
                raise EngineRunnerError(f"{name} shape {array.shape} outside the engine profile "
                                        f"(max {self.max_shapes[name]})")
            if not self.context.set_input_shape(name, array.shape):
                raise EngineRunnerError(f"{name} shape {array.shape} rejected by the engine profile")
            hosts[name] = array  # keep alive until the stream is synchronised
            cuda.memcpy_htod_async(self.buffers[name], array, self.stream)
        outputs = {name: np.empty(tuple(self.context.get_tensor_shape(name)), self.dtypes[name])
                   for name in self.output_names}
        if not self.context.execute_async_v3(self.stream.handle):
            raise EngineRunnerError(f"{self.plan_path}: execute_async_v3 failed")
        for name, array in outputs.items():
            if array.size:
                cuda.memcpy_dtoh_async(array, self.buffers[name], self.stream)
        self.stream.synchronize()
        return outputs
