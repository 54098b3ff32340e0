"""Run one serialized TensorRT engine (model.plan) directly: the benchmark's "engine alone" row and build verification.

TensorRT >= 10 name-based I/O API (TensorRT 10 Python API reference: Runtime / ICudaEngine / IExecutionContext):
`trt.Runtime(logger).deserialize_cuda_engine(bytes)`, `engine.create_execution_context()`,
`engine.num_io_tensors` / `get_tensor_name(i)` / `get_tensor_mode(name)` / `get_tensor_dtype(name)`,
`engine.get_tensor_profile_shape(name, profile_index) -> (min, opt, max)`, `context.set_input_shape(name, shape)`,
`context.get_tensor_shape(name)`, `context.set_tensor_address(name, ptr)`, `context.execute_async_v3(stream_handle)`.
Data-dependent output shapes (the classifier stages' rows selected by CELL_COUNT with NonZero): `context.
get_max_output_size(name)` bounds the buffer and a `trt.IOutputAllocator` (`reallocate_output`, `notify_shape`,
set with `context.set_output_allocator`) hands it out and receives the actual shape.

CUDA comes from pycuda, imported lazily (importing this module needs neither TensorRT nor pycuda):

* Context. `pycuda.autoinit` makes a context current only on the thread that imports it; a call from any other
  thread (the benchmark's worker threads) then has no current context and its first `memcpy_htod_async` fails
  (pycuda issue #242). The runner instead retains the device's primary context (`Device.retain_primary_context()`,
  pycuda documentation, pycuda.driver.Device: the context the CUDA runtime API - and so TensorRT - uses) and pushes
  it around every piece of CUDA work, popping it afterwards (`Context.push()` / static `Context.pop()`), so the
  runner works from whichever thread calls it. One lock serialises calls: an execution context must not be used by
  two threads at once (TensorRT 10 Developer Guide, "Thread Safety").
* Host memory. `memcpy_htod_async` / `memcpy_dtoh_async` need page-locked host memory to be asynchronous (pycuda
  documentation, pycuda.driver "Memory transfers", which points to `pagelocked_empty`), so the runner copies through
  pinned host buffers allocated once with `pagelocked_empty`, sized for the profile's max shapes, as NVIDIA's TensorRT
  samples do (`samples/python/common_runtime.py`: `HostDeviceMem` allocates its host side with
  `cudart.cudaMallocHost`).

Not run on a GPU yet: this file follows the documentation named above.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from leukograph.client.errors import UserError

REPORT_FILE = "build_report.json"  # written by build.py beside each plan


class EngineRunnerError(RuntimeError):
    """Any failure of the engine runner (the subclasses say which)."""


class TensorRtUnavailable(UserError, EngineRunnerError):
    """TensorRT, pycuda or a CUDA GPU is missing here: the one error for that condition; `missing` names which."""

    def __init__(self, missing: str, detail: str = "") -> None:
        super().__init__(f"{missing} ({detail})" if detail else missing)
        self.missing = missing


class PlanLoadError(EngineRunnerError):
    """The plan exists but this TensorRT cannot load it (other TensorRT version or GPU, or a damaged file)."""


class EngineInputError(EngineRunnerError):
    """Inputs missing or outside the engine's optimisation profile."""


class EngineExecutionError(EngineRunnerError):
    """TensorRT refused to run the engine."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def import_runtime():
    """(tensorrt, pycuda.driver) with the CUDA driver initialised, or TensorRtUnavailable naming what is missing."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError when libnvinfer / libnvonnxparser is missing
        raise TensorRtUnavailable("tensorrt Python package not importable", _one_line(exc)) from None
    try:
        import pycuda.driver as cuda
    except Exception as exc:
        raise TensorRtUnavailable("pycuda not importable", _one_line(exc)) from None
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # pycuda.driver.Error: no driver, driver too old
        raise TensorRtUnavailable("no usable CUDA driver", _one_line(exc)) from None
    if count == 0:
        raise TensorRtUnavailable("no CUDA GPU", "pycuda.driver.Device.count() is 0")
    return trt, cuda


def read_build_report(plan_path: Path) -> dict | None:
    """The build_report.json written beside `plan_path`, or None."""
    path = Path(plan_path).with_name(REPORT_FILE)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def plan_load_problem(plan_path: Path, runtime_version: str, compute_capability: str | None,
                      deserialized: bool | None = None) -> str | None:
    """Why `plan_path` cannot (or could not) be deserialised here, from its build report; None when nothing is known
    against it. `deserialized=False` (TensorRT returned None) always yields a message."""
    from leukograph.build_engines.compat import plans_match, same_compute_capability

    report = read_build_report(plan_path)
    if report is None:
        if deserialized is False:
            return (f"TensorRT {runtime_version} cannot deserialize {plan_path}, and there is no {REPORT_FILE} beside "
                    f"it to say which TensorRT built it; rebuild it here with `leukograph build-engines`")
        return None
    built = str(report.get("tensorrt_version"))
    built_cc = (report.get("gpu") or {}).get("compute_capability")
    if not plans_match(built, runtime_version):
        return (f"{plan_path} was built with TensorRT {built}, this runtime is TensorRT {runtime_version}: plans load "
                f"only on the TensorRT version that built them; rebuild it here with `leukograph build-engines`")
    if same_compute_capability(built_cc, compute_capability) is False:
        return (f"{plan_path} was built for compute capability {built_cc}, this GPU is {compute_capability}; rebuild "
                f"it on this GPU with `leukograph build-engines`")
    if deserialized is False:
        return (f"TensorRT {runtime_version} cannot deserialize {plan_path} although its {REPORT_FILE} names the same "
                f"TensorRT version and compute capability: the file may be damaged or not this report's plan; "
                f"rebuild it")
    return None


def _fixed_output_allocator(trt, address: int, capacity: int):
    """A `trt.IOutputAllocator` for a data-dependent output: it hands TensorRT one preallocated device buffer of
    `capacity` bytes (the context's `get_max_output_size`) and keeps the shape TensorRT reports in `.shape`."""

    class FixedOutputAllocator(trt.IOutputAllocator):
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.shape: tuple[int, ...] | None = None

        def reallocate_output(self, tensor_name, memory, size, alignment):
            return address if size <= capacity else None

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            return self.reallocate_output(tensor_name, memory, size, alignment)

        def notify_shape(self, tensor_name, shape) -> None:
            self.shape = tuple(shape)

    return FixedOutputAllocator()


class EngineRunner:
    """`EngineRunner(plan_path)(feeds) -> outputs`, numpy in and out, one engine, profile 0, callable from any thread.

    Device buffers and pinned host buffers are allocated once, sized for the profile's max shapes; each call sets the
    input shapes, copies inputs into the pinned buffers and on to the device, runs `execute_async_v3` on one stream,
    copies the outputs (cut to their actual shapes) back and returns copies of them. `close()` (or `with`) frees
    everything and releases the primary context.
    """

    def __init__(self, plan_path: str | Path, device: int = 0) -> None:
        trt, cuda = import_runtime()
        self._trt, self._cuda = trt, cuda
        self.plan_path = Path(plan_path)
        self._lock = threading.Lock()
        self._device = cuda.Device(device)
        major, minor = self._device.compute_capability()
        self.compute_capability = f"{major}.{minor}"
        problem = plan_load_problem(self.plan_path, trt.__version__, self.compute_capability)
        if problem:  # known before TensorRT logs "Version tag does not match" and returns None
            raise PlanLoadError(problem)
        self._context = self._device.retain_primary_context()
        self._closed = False
        with self._current():
            self.logger = trt.Logger(trt.Logger.WARNING)
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
            if self.engine is None:
                raise PlanLoadError(plan_load_problem(self.plan_path, trt.__version__, self.compute_capability,
                                                      deserialized=False))
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
            # With every input at its max, outputs are at their max too, except data-dependent ones (-1: the classifier
            # stages' rows after CELL_COUNT's NonZero): those get TensorRT's upper bound and an output allocator that
            # hands out that buffer and records the shape TensorRT reports.
            self.allocators: dict[str, object] = {}
            counts = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                if -1 in shape:
                    counts[name] = max(int(self.context.get_max_output_size(name)) // self.dtypes[name].itemsize, 1)
                else:
                    self.max_shapes[name] = shape
            counts.update({name: max(int(np.prod(shape)), 1) for name, shape in self.max_shapes.items()})
            self.buffers, self.host = {}, {}
            for name, count in counts.items():
                self.buffers[name] = cuda.mem_alloc(count * self.dtypes[name].itemsize)
                self.host[name] = cuda.pagelocked_empty(count, self.dtypes[name])
                if name in self.max_shapes:
                    self.context.set_tensor_address(name, int(self.buffers[name]))
                else:
                    capacity = count * self.dtypes[name].itemsize
                    allocator = _fixed_output_allocator(trt, int(self.buffers[name]), capacity)
                    self.context.set_output_allocator(name, allocator)
                    self.allocators[name] = allocator

    @contextmanager
    def _current(self):
        """The primary context current on the calling thread for the duration (push ... pop)."""
        self._context.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise EngineInputError(f"{self.plan_path}: missing inputs {sorted(missing)}")
        arrays = {name: np.asarray(feeds[name], dtype=self.dtypes[name]) for name in self.input_names}
        for name, array in arrays.items():
            limit = self.max_shapes[name]
            if array.ndim != len(limit) or any(d > m for d, m in zip(array.shape, limit)):
                raise EngineInputError(f"{name} shape {array.shape} outside the engine profile (max {limit})")
        with self._lock, self._current():
            return self._run(arrays)

    def _run(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda = self._cuda
        for name, array in arrays.items():
            if not self.context.set_input_shape(name, array.shape):
                raise EngineInputError(f"{name} shape {array.shape} rejected by the engine profile")
            pinned = self.host[name][:array.size].reshape(array.shape)
            np.copyto(pinned, array)
            cuda.memcpy_htod_async(self.buffers[name], pinned, self.stream)
        if not self.context.execute_async_v3(self.stream.handle):
            raise EngineExecutionError(f"{self.plan_path}: execute_async_v3 failed (see the TensorRT log)")
        pinned_out = {}
        for name in self.output_names:  # a data-dependent shape is known once execute_async_v3 has returned
            allocator = self.allocators.get(name)
            shape = allocator.shape if allocator is not None else tuple(self.context.get_tensor_shape(name))
            if shape is None or -1 in shape:
                raise EngineExecutionError(f"{self.plan_path}: TensorRT reported no shape for output {name}")
            pinned_out[name] = self.host[name][:int(np.prod(shape))].reshape(shape)
        for name, pinned in pinned_out.items():
            if pinned.size:
                cuda.memcpy_dtoh_async(pinned, self.buffers[name], self.stream)
        self.stream.synchronize()
        return {name: pinned.copy() for name, pinned in pinned_out.items()}  # the pinned buffers are reused

    def close(self) -> None:
        """Free device and pinned memory and the TensorRT objects, then release the primary context."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        with self._lock, self._current():
            for buffer in getattr(self, "buffers", {}).values():
                buffer.free()
            for name in list(getattr(self, "host", {})):
                self.host[name].base.free()
            self.buffers, self.host = {}, {}
            for attribute in ("context", "engine", "runtime", "stream"):
                if hasattr(self, attribute):
                    delattr(self, attribute)
        self._context.detach()

    def __enter__(self) -> EngineRunner:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        with suppress(Exception):  # interpreter shutdown: pycuda may already be gone
            self.close()
