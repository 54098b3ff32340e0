"""`TritonPipelineClient`: the client side of the two ensembles (gRPC or HTTP, optional system shm): bare frames to
`leukocyte_pipeline` (its detector finds the cells), frames with the client's boxes to `leukocyte_pipeline_boxes`.

Used by `leukograph stream`, and by the benchmark through `leukograph.deploy.runners.TritonRunner` (its timing hook).
Torch-free. Names, dtypes and limits come from `contract`; nothing is restated here.

    client = TritonPipelineClient("127.0.0.1:8001")           # protocol="grpc" (default) or "http"
    client.wait_ready(timeout=60)                               # server live + ensemble ready, with backoff
    client.weights_id                                           # from the server (see `fetch_weights_id`)
    outcome = client.infer_outcome(frame)                       # blocking, one bare frame: the server's detector
    outcome.boxes, outcome.kinds, outcome.scores, outcome.probs # ... finds the cells (`leukocyte_pipeline`)
    probs, labels = client.infer(frame, boxes)                  # blocking, the client's own boxes
                                                                # (`leukocyte_pipeline_boxes`, CELL_COUNT = N)
    client.submit(frame, boxes_or_None, callback)               # async: callback(InferOutcome) on another thread
    client.reconnect(timeout)                                   # after a failure: fresh channel, ready, shm again
    client.close()                                              # unregisters and frees shm regions

Errors come back classified (`classify_error`):
* `ServerUnavailable`: the server is down, restarting, or the ensemble is not (yet) loaded: retry later;
* `RequestRejected`: the server answered that this request is bad (INVALID_ARGUMENT / HTTP 400): retrying won't help;
  its subclass `RequestNotSent`: the client refused to send it (it breaks the contract).

Restricted APIs: a server started by `leukograph serve` restricts shared-memory, model-repository, model-config,
logging and trace to requests carrying the header `leukograph-admin-key`. The client sends it on the calls it makes
there (model config, shm register/unregister); the key comes from $LEUKOGRAPH_ADMIN_KEY, else from the key file
`serve` writes when it generates one (`admin_key()`).

Shared memory (`shm=True`, client and server on the same host): each in-flight request gets its own system shm
slot (FRAME then BOXES at an aligned offset), created and registered lazily, grown when a bigger frame comes, and
re-registered after `reconnect()` (a restarted server has forgotten every registration). Outputs stay on the wire
(they are small: N x (C+1) numbers).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.utils import InferenceServerException

from leukograph.client import contract
from leukograph.client.contract import (
    BOXES,
    BOXES_PIPELINE,
    CELL_COUNT,
    DETECTED_BOXES,
    FRAME,
    KINDS,
    LABELS,
    PIPELINE,
    PIPELINE_OF_LOCALIZER,
    PROBS,
    SCORES,
    cell_count,
)

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
DEFAULT_REQUEST_TIMEOUT_S = 30.0
SHM_ALIGN = 64
ADMIN_HEADER = "leukograph-admin-key"  # the header Triton's restricted APIs check (`leukograph serve`)
ADMIN_KEY_ENV = "LEUKOGRAPH_ADMIN_KEY"
GRPC_RESTRICTED_PREFIX = "triton-grpc-protocol-"  # Triton's gRPC server expects restricted-API headers under it
# Written (0600) by `leukograph serve` when it generated the key; one per user and host, reused by later servers.
ADMIN_KEY_FILE = Path(os.environ.get("LEUKOGRAPH_ADMIN_KEY_FILE")
                      or Path.home() / ".config" / "leukograph" / "admin-key")


def admin_key() -> str | None:
    """The restricted-API key: $LEUKOGRAPH_ADMIN_KEY, else the key file of a local `leukograph serve`, else None."""
    key = os.environ.get(ADMIN_KEY_ENV)
    if key:
        return key
    try:
        return ADMIN_KEY_FILE.read_text().strip() or None
    except OSError:
        return None


class PipelineError(Exception):
    """A request that did not produce results."""


class ServerUnavailable(PipelineError):
    """Server down, restarting or model not loaded: the same request may succeed later."""


class RequestRejected(PipelineError):
    """The request itself is bad (the server said so, or the client refused to send it): retrying it won't help."""


class RequestNotSent(RequestRejected):
    """The client refused the request before sending it: it breaks the contract (`contract.validate_request`)."""


# The status a server gives a request it rejects: gRPC INVALID_ARGUMENT, HTTP 400 (tritonclient's `status()`).
# Everything else (UNAVAILABLE, NOT_FOUND for a model still loading or a shm region a restarted server forgot,
# deadlines, internal errors) means the same request may succeed later.
REJECTED_STATUSES = frozenset({"StatusCode.INVALID_ARGUMENT", "400"})


class AccessDenied(RequestRejected):
    """A restricted API (model config, shared memory) refused the call: the admin key is missing or wrong."""


@dataclass
class InferOutcome:
    """What a request produced: probs/labels (one row per cell), or an error (classified). For a bare frame (the
    server's detector) also the cells it found: boxes [N,4], kinds [N] (index into CELL_KINDS), scores [N]."""

    probs: np.ndarray | None
    labels: np.ndarray | None
    error: PipelineError | None
    latency_s: float  # submit -> callback
    boxes: np.ndarray | None = None
    kinds: np.ndarray | None = None
    scores: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def classify_error(exc: BaseException) -> PipelineError:
    """Map a tritonclient / transport exception to RequestRejected or ServerUnavailable by its status code."""
    if isinstance(exc, PipelineError):
        return exc
    status = ""
    message = str(exc)
    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        message = str(exc.message() or message)
    text = f"{status} {message}".strip().replace("\n", " ")
    return RequestRejected(text) if status in REJECTED_STATUSES else ServerUnavailable(text)


class _ShmSlot:
    """One system shared-memory region holding FRAME then BOXES of one in-flight request."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.name = f"leukograph_{os.getpid()}_{uuid.uuid4().hex[:8]}_{index}"
        self.key = "/" + self.name
        self.handle: Any = None
        self.byte_size = 0
        self.registered = False

    def ensure_capacity(self, byte_size: int) -> None:
        import tritonclient.utils.shared_memory as shm

        if self.handle is not None and self.byte_size >= byte_size:
            return
        self.destroy()
        self.byte_size = max(byte_size, 1 << 20)
        self.handle = shm.create_shared_memory_region(self.name, self.key, self.byte_size)
        self.registered = False

    def destroy(self) -> None:
        import tritonclient.utils.shared_memory as shm

        if self.handle is not None:
            with contextlib.suppress(shm.SharedMemoryException):
                shm.destroy_shared_memory_region(self.handle)
        self.handle = None
        self.byte_size = 0
        self.registered = False


def _aligned(n: int) -> int:
    return (n + SHM_ALIGN - 1) // SHM_ALIGN * SHM_ALIGN


class TritonPipelineClient:
    """The `leukocyte_pipeline` ensemble over gRPC (async_infer with callbacks) or HTTP, optionally via system shm.

    Thread-safety: `submit` and `infer` may be called from one producer thread while callbacks run on the
    transport's threads. At most `max_in_flight` async requests should be outstanding (shm slots are per request).
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", *, localizer: str = "server",
                 shm: bool = False, max_in_flight: int = 2,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, verbose: bool = False,
                 timing_hook: Callable[[dict[str, float]], None] | None = None) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if localizer not in PIPELINE_OF_LOCALIZER:
            raise ValueError(f"localizer must be one of {tuple(PIPELINE_OF_LOCALIZER)}, got {localizer!r}")
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.localizer = localizer
        # The ensemble this client waits for and reads the weights id from; each request goes to the ensemble that
        # takes its inputs (`_model`): bare frames to leukocyte_pipeline, frames with boxes to ..._boxes.
        self.model_name = PIPELINE_OF_LOCALIZER[localizer].name
        self.use_shm = shm
        self.max_in_flight = max_in_flight
        self.request_timeout_s = request_timeout_s
        self.verbose = verbose
        self.timing_hook = timing_hook  # called after each blocking `infer` with its encode/infer/decode seconds
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module = module
        self._client: Any = None
        self._executor: ThreadPoolExecutor | None = None  # HTTP async: blocking calls on worker threads
        self._worker_clients: list[Any] = []  # HTTP: one client per worker thread (gevent is per thread)
        self._local = threading.local()
        self._lock = threading.RLock()
        self._slots = [_ShmSlot(i) for i in range(max_in_flight)] if shm else []
        self._free_slots: queue.Queue[int] = queue.Queue()
        for slot in self._slots:
            self._free_slots.put(slot.index)
        self._weights_id: str | None = None
        self._connect()

    # ---- connection ----------------------------------------------------------------------------
    def _connect(self) -> None:
        """(Re)create the transport client. A fresh gRPC channel skips grpc's own reconnect backoff."""
        with self._lock:
            self._close_transport()
            if self.protocol == "grpc":
                self._client = self._module.InferenceServerClient(self.url, verbose=self.verbose)
            else:
                self._client = self._module.InferenceServerClient(
                    self.url, verbose=self.verbose, concurrency=self.max_in_flight,
                    connection_timeout=self.request_timeout_s, network_timeout=self.request_timeout_s)
                self._executor = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="triton-http")
            for slot in self._slots:
                slot.registered = False

    def _close_transport(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for client in self._worker_clients:
            with contextlib.suppress(Exception):  # best effort
                client.close()
        self._worker_clients.clear()
        self._local = threading.local()
        if self._client is not None:
            with contextlib.suppress(Exception):  # best effort
                self._client.close()
            self._client = None

    def is_ready(self) -> bool:
        """Server ready and the ensemble loaded (False on any transport error)."""
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model_name))
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    def wait_ready(self, timeout: float = 60.0, should_stop: Callable[[], bool] | None = None,
                   on_wait: Callable[[float, str], None] | None = None) -> bool:
        """Wait with exponential backoff (0.25 s doubling, at most 4 s) until `is_ready`; False on timeout/stop.

        Each failed attempt opens a fresh connection (a restarted server is found at once)."""
        deadline = time.monotonic() + timeout
        delay = 0.25
        while True:
            if self.is_ready():
                return True
            left = deadline - time.monotonic()
            if left <= 0 or (should_stop and should_stop()):
                return False
            if on_wait:
                on_wait(min(delay, left), f"{self.protocol}://{self.url} not ready")
            end = time.monotonic() + min(delay, left)
            while time.monotonic() < end:
                if should_stop and should_stop():
                    return False
                time.sleep(min(0.05, max(end - time.monotonic(), 0)))
            delay = min(delay * 2, 4.0)
            self._connect()

    def reconnect(self, timeout: float = 60.0, should_stop: Callable[[], bool] | None = None) -> bool:
        """Fresh connection, wait until ready, re-register shm (a restarted server forgot it). True when ready."""
        self._connect()
        if not self.wait_ready(timeout, should_stop):
            return False
        try:
            self._register_slots()
        except PipelineError:
            return False
        return True

    # ---- weights id ----------------------------------------------------------------------------
    @property
    def weights_id(self) -> str:
        """Which trained weights the served models come from (`fetch_weights_id`, asked once)."""
        if self._weights_id is None:
            self._weights_id = self.fetch_weights_id()
        return self._weights_id

    def fetch_weights_id(self) -> str:
        """The served weights' identifier, asked from the server.

        The ensemble config's parameter `contract.WEIGHTS_ID_KEY` when the repository sets one; otherwise
        `<ensemble>-<backend_variant parameter>-v<highest loaded version>` from the model's version list."""
        try:
            config = self._client.get_model_config(self.model_name, **self._json_kwargs())
            metadata = self._client.get_model_metadata(self.model_name, **self._json_kwargs())
        except Exception as exc:  # noqa: BLE001
            raise self._restricted_call_error(exc) from None
        config = config.get("config", config)
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        if params.get(contract.WEIGHTS_ID_KEY):
            return params[contract.WEIGHTS_ID_KEY]
        versions = sorted((str(v) for v in metadata.get("versions") or []), key=lambda v: (len(v), v))
        parts = [self.model_name, params.get("backend_variant", ""), f"v{versions[-1]}" if versions else ""]
        return "-".join(p for p in parts if p)

    def _json_kwargs(self) -> dict[str, Any]:
        return {"as_json": True, **self._admin_kwargs()} if self.protocol == "grpc" else self._admin_kwargs()

    def _restricted_call_error(self, exc: BaseException) -> PipelineError:
        """The error of a failed call to a restricted API (model config, shared memory). Triton refuses a call without
        the admin key with the same gRPC status as a server that is down (UNAVAILABLE), so the two are told apart by
        state: a refusal while the pipeline answers ready is AccessDenied, not an outage to wait out."""
        error = classify_error(exc)
        if isinstance(error, ServerUnavailable) and self.is_ready():
            return AccessDenied(f"{error} (the server is up but refuses this call: set ${ADMIN_KEY_ENV} to its "
                                f"admin key)")
        return error

    def _admin_kwargs(self) -> dict[str, Any]:
        """`headers=` with $LEUKOGRAPH_ADMIN_KEY for restricted APIs (model config, shared memory), if set."""
        key = admin_key()
        if not key:
            return {}
        return {"headers": {(GRPC_RESTRICTED_PREFIX if self.protocol == "grpc" else "") + ADMIN_HEADER: key}}

    # ---- shared memory -------------------------------------------------------------------------
    def _register_slots(self) -> None:
        for slot in self._slots:
            if slot.handle is not None and not slot.registered:
                self._register(slot)

    def _register(self, slot: _ShmSlot) -> None:
        try:
            with contextlib.suppress(Exception):  # best effort
                self._client.unregister_system_shared_memory(slot.name, **self._admin_kwargs())
            self._client.register_system_shared_memory(slot.name, slot.key, slot.byte_size, **self._admin_kwargs())
        except Exception as exc:  # noqa: BLE001
            raise self._restricted_call_error(exc) from None
        slot.registered = True

    def _inputs(self, frame: np.ndarray, boxes: np.ndarray | None, slot: _ShmSlot | None) -> list[Any]:
        """FRAME (and BOXES) through the shm slot or on the wire; CELL_COUNT (4 bytes) always on the wire."""
        arrays = [np.ascontiguousarray(frame)] + ([] if boxes is None else [np.ascontiguousarray(boxes)])
        specs = [FRAME] if boxes is None else [FRAME, BOXES]
        inputs = [self._module.InferInput(spec.name, list(array.shape), spec.client_dtype)
                  for spec, array in zip(specs, arrays)]
        if slot is None:
            for tensor, array in zip(inputs, arrays):
                tensor.set_data_from_numpy(array)
        else:
            import tritonclient.utils.shared_memory as shm

            offsets = [0, _aligned(arrays[0].nbytes)][:len(arrays)]
            needed = offsets[-1] + arrays[-1].nbytes
            if slot.handle is None or slot.byte_size < needed:
                slot.ensure_capacity(needed)
            if not slot.registered:
                self._register(slot)
            for tensor, array, offset in zip(inputs, arrays, offsets):
                shm.set_shared_memory_region(slot.handle, [array], offset=offset)
                tensor.set_shared_memory(slot.name, array.nbytes, offset=offset)
        if boxes is not None:
            count = self._module.InferInput(CELL_COUNT.name, [1], CELL_COUNT.client_dtype)
            count.set_data_from_numpy(cell_count(boxes))
            inputs.append(count)
        return inputs

    # ---- inference -----------------------------------------------------------------------------
    @staticmethod
    def _pipeline(boxes: np.ndarray | None):
        return PIPELINE if boxes is None else BOXES_PIPELINE

    def _outputs(self, boxes: np.ndarray | None) -> list[Any]:
        return [self._module.InferRequestedOutput(name) for name in self._pipeline(boxes).output_names]

    @staticmethod
    def _validate(frame: np.ndarray, boxes: np.ndarray | None) -> None:
        if boxes is None:
            contract.validate_frame(frame)
        else:
            contract.validate_request(frame, boxes)

    def _parse(self, result: Any, boxes: np.ndarray | None, latency_s: float) -> InferOutcome:
        """The answer as an InferOutcome; a bare frame's padded detector rows are cut to its CELL_COUNT cells."""
        if boxes is None:
            count = result.as_numpy(CELL_COUNT.name)
            arrays = {spec.name: result.as_numpy(spec.name) for spec in (DETECTED_BOXES, SCORES, KINDS)}
            if count is None or count.shape != (1,) or any(a is None for a in arrays.values()):
                raise RequestRejected("malformed answer: the detector's outputs are missing")
            n = int(count[0])
            found = {"boxes": arrays[DETECTED_BOXES.name][:n].astype(np.float32, copy=False),
                     "kinds": arrays[KINDS.name][:n].astype(np.int64), "scores": arrays[SCORES.name][:n]}
        else:
            n, found = len(boxes), {}
        probs = result.as_numpy(PROBS.name)
        labels = result.as_numpy(LABELS.name)
        if probs is None or labels is None or probs.shape != (n, contract.NUM_CLASSES) or labels.shape != (n,):
            got = None if probs is None else probs.shape
            raise RequestRejected(f"malformed answer: PROBS {got} for {n} cells")
        return InferOutcome(probs.astype(PROBS.np_dtype, copy=False), labels.astype(LABELS.np_dtype, copy=False),
                            None, latency_s, **found)

    def infer(self, frame: np.ndarray, boxes: np.ndarray | None, validate: bool = True) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
        """One blocking request: (PROBS [N,C] float32, LABELS [N] int32). Raises PipelineError (classified)."""
        outcome = self.infer_outcome(frame, boxes, validate)
        return outcome.probs, outcome.labels

    def infer_outcome(self, frame: np.ndarray, boxes: np.ndarray | None = None,
                      validate: bool = True) -> InferOutcome:
        """One blocking request; raises PipelineError (classified). boxes None: a bare frame, the server's detector
        finds the cells (the outcome carries them); else the client's boxes, one PROBS row each.

        validate: check the request against the contract first; a bad one raises RequestNotSent ("not sent: ...")
        without reaching the server. validate=False sends it as it is."""
        slot = self._take_slot() if self._slots else None
        try:
            try:
                started = time.perf_counter()
                if validate:
                    self._validate(frame, boxes)
                inputs = self._inputs(frame, boxes, slot)
                encoded = time.perf_counter()
                result = self._client.infer(self._pipeline(boxes).name, inputs, outputs=self._outputs(boxes),
                                            **self._timeout_kwargs())
                answered = time.perf_counter()
            except contract.ContractError as exc:
                raise RequestNotSent(f"not sent: {exc}") from None
            except Exception as exc:  # noqa: BLE001
                raise classify_error(exc) from None
            outcome = self._parse(result, boxes, answered - started)
            if self.timing_hook is not None:
                self.timing_hook({"encode": encoded - started, "infer": answered - encoded,
                                  "decode": time.perf_counter() - answered})
            return outcome
        finally:
            if slot is not None:
                self._free_slots.put(slot.index)

    def _timeout_kwargs(self) -> dict[str, Any]:
        return {"client_timeout": self.request_timeout_s} if self.protocol == "grpc" else {}

    def _take_slot(self) -> _ShmSlot:
        try:
            return self._slots[self._free_slots.get(timeout=self.request_timeout_s)]
        except queue.Empty:
            raise ServerUnavailable("no free shared-memory slot: too many requests in flight") from None

    def submit(self, frame: np.ndarray, boxes: np.ndarray | None, callback: Callable[[InferOutcome], None],
               validate: bool = True) -> None:
        """Send one request without waiting; `callback(InferOutcome)` runs on a transport thread when it ends.
        boxes None: a bare frame (the server's detector), as in `infer_outcome`.

        Never raises for request failures: they reach the callback (possibly before submit returns).
        validate: as in `infer_outcome`."""
        started = time.perf_counter()
        slot: _ShmSlot | None = None

        def finish(result: Any, error: BaseException | None) -> None:
            if slot is not None:
                self._free_slots.put(slot.index)
            latency = time.perf_counter() - started
            if error is None:
                try:
                    outcome = self._parse(result, boxes, latency)
                except PipelineError as exc:
                    outcome = InferOutcome(None, None, exc, latency)
            else:
                outcome = InferOutcome(None, None, classify_error(error), latency)
            callback(outcome)

        try:
            if validate:
                self._validate(frame, boxes)
        except contract.ContractError as exc:
            finish(None, RequestNotSent(f"not sent: {exc}"))
            return
        try:
            slot = self._take_slot() if self._slots else None
            inputs = self._inputs(frame, boxes, slot)
            name, outputs = self._pipeline(boxes).name, self._outputs(boxes)
            if self.protocol == "grpc":
                self._client.async_infer(name, inputs, callback=finish, outputs=outputs,
                                         client_timeout=self.request_timeout_s)
            else:
                future = self._executor.submit(self._http_worker_infer, self._local, name, inputs, outputs)
                future.add_done_callback(lambda f: finish(None if f.exception() else f.result(), f.exception()))
        except Exception as exc:  # noqa: BLE001 - transport failures go to the callback
            finish(None, exc)

    def _http_worker_infer(self, local: threading.local, name: str, inputs: list[Any], outputs: list[Any]) -> Any:
        """Runs on an executor thread with that thread's own HTTP client (geventhttpclient can't share)."""
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = self._module.InferenceServerClient(
                self.url, verbose=self.verbose, connection_timeout=self.request_timeout_s,
                network_timeout=self.request_timeout_s)
            with self._lock:
                self._worker_clients.append(client)
        return client.infer(name, inputs, outputs=outputs)

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Unregister and free shm regions (best effort on a dead server), close the connection."""
        with self._lock:
            for slot in self._slots:
                if slot.registered and self._client is not None:
                    with contextlib.suppress(Exception):  # best effort
                        self._client.unregister_system_shared_memory(slot.name, **self._admin_kwargs())
                slot.destroy()
            self._close_transport()

    def __enter__(self) -> TritonPipelineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
