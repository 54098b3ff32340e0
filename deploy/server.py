"""`leukograph serve`: the real Triton Inference Server on CPU, on the model repository (python-backend steps).

The `tritonserver` binary, its python backend and the python-backend stubs come from the nvidia-pytriton wheel
(`nvidia-pytriton` on PyPI). They are copied once to a cache folder (`<repo>/.cache/tritonserver-<version>`,
or $LEUKOGRAPH_CACHE), the stub for the running Python goes to `backends/python/`, and the server runs with
LD_LIBRARY_PATH=<site-packages>/nvidia_pytriton.libs and this venv's bin first on PATH (the stub runs `python3`).

Protocol surface (`leukograph serve`): gRPC only unless --http; the shared-memory, model-repository, model-config,
logging and trace APIs are restricted to requests with the header `leukograph-admin-key` (key from
$LEUKOGRAPH_ADMIN_KEY, else generated and written to the key file local clients read). Triton 2.51 has no limit on
an HTTP request body (1,000,000 `[` crash it with SIGSEGV): keep HTTP off, or on loopback, where untrusted clients
can reach the server.

Supervision (`Supervisor`): every --probe-interval seconds a real inference on a tiny frame; when tritonserver has
exited, or the probe fails --probe-failures times in a row (a wedged python stub answers health checks but not
inference), the server is stopped (SIGKILL for its process group when it does not stop), the python-backend
shared-memory regions no live process uses are removed from /dev/shm, and the server is started again on the same
ports. Clients ride it out as they do any restart (they retry and re-register their shm).

Model control (`reload_pipeline`, what `leukograph adapt` calls after exporting new weights): `serve` runs Triton in
explicit model-control mode with every model loaded at start, so new weights are loaded by the server itself, through
the model-repository API (restricted to the admin key). The pipeline is unloaded, then its steps, then it is loaded
from the repository: no request is ever answered by a mix of old and new steps, and for the few seconds the steps
load, the pipeline answers "unavailable", which clients ride as they ride a restart (they keep their frames and send
them again, and record the weights id served after the answer; `client/stream.py`).

On a GPU machine run NVIDIA's Triton container instead: README section "GPU deployment".
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import numpy as np

from leukograph.client.contract import MIN_FRAME_SIDE, MODEL_FILES, PIPELINES, SERVED_STAGES, stage_path
from leukograph.client.errors import UserError
from leukograph.client.triton_client import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    ADMIN_KEY_FILE,
    GRPC_RESTRICTED_PREFIX,
    admin_key,
)
from leukograph.deploy.paths import CACHE_DIR, MODEL_REPOSITORY, WEIGHTS_DIR, WEIGHTS_ENV, data_root, export_stale

GPU_HINT = "GPU machines: run NVIDIA's Triton container with `tritonserver --model-repository model_repository/` " \
           "after `leukograph generate-repo --backend tensorrt` (README section \"GPU deployment\")."
STOP_GRACE_S = 15.0
RESTRICTED_APIS = ("shared-memory", "model-repository", "model-config", "logging", "trace")
STUB_REGION_GLOB = "triton_python_backend_shm_region_*"
SHM_DIR = Path("/dev/shm")


def _pytriton_paths() -> tuple[Path, Path, str]:
    """(bundled tritonserver folder, its shared-library folder, pytriton version)."""
    from importlib.metadata import version
    from importlib.util import find_spec

    spec = find_spec("pytriton")  # located, not imported: only its bundled server is used, not its Python deps
    if spec is None or spec.origin is None:
        raise UserError("nvidia-pytriton is not installed: pip install 'leukograph[serve]'")
    package = Path(spec.origin).resolve().parent
    bundled, libs = package / "tritonserver", package.parent / "nvidia_pytriton.libs"
    if not (bundled / "bin" / "tritonserver").exists():
        raise UserError(f"no tritonserver binary in {bundled}; reinstall nvidia-pytriton")
    return bundled, libs, version("nvidia-pytriton")


def server_dir() -> Path:
    """The server folder in the cache, made once per pytriton and Python version (atomic, safe to race)."""
    bundled, _, pytriton_version = _pytriton_paths()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = CACHE_DIR / f"tritonserver-{pytriton_version}-py{py}"
    stub = "triton_python_backend_stub"
    if (target / "backends" / "python" / stub).exists():
        return target
    stub_source = bundled / "python_backend_stubs" / py / stub
    if not stub_source.exists():
        raise UserError(f"nvidia-pytriton {pytriton_version} has no python-backend stub for Python {py}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        shutil.copytree(bundled, staging / "server", symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "python_backend_stubs"))
        shutil.copy2(stub_source, staging / "server" / "backends" / "python" / stub)
        (staging / "server" / "caches").mkdir(exist_ok=True)
        with contextlib.suppress(OSError):  # another process won the race: use its copy
            (staging / "server").rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def onnx_stale(repository: Path, weights: Path) -> str | None:
    """Why the repository's ONNX files need (re-)exporting, or None when they are up to date: missing, older than a
    checkpoint, or exported by other code than this (`paths.export_stale`)."""
    checkpoints = sorted(weights.glob("*.pt")) if weights.is_dir() else []
    reasons = (export_stale(stage_path(repository, stage, MODEL_FILES["onnxruntime"]), checkpoints)
               for stage in SERVED_STAGES)
    return next((reason for reason in reasons if reason is not None), None)


def int8_stale(repository: Path) -> str | None:
    """Why a repository serving INT8 needs `export --int8` (again), or None."""
    from leukograph.deploy.model_repository import INT8_ONNX_FILES, precision_of

    if precision_of(repository) != "int8":
        return None
    for name, file in INT8_ONNX_FILES.items():
        path, fp32 = stage_path(repository, name, file), stage_path(repository, name, MODEL_FILES["onnxruntime"])
        if not path.exists():
            return f"{path} is missing"
        if path.stat().st_mtime < fp32.stat().st_mtime:
            return f"{path} is older than {fp32.name}"
    return None


def ensure_exported(repository: Path, weights: Path | None = None, precision: str | None = None) -> bool:
    """Export the three stages when model.onnx is missing or older than the weights, and the INT8 crop_embedder when the
    repository serves it (`precision`, when given, is set first); True when it exported."""
    from leukograph.deploy.model_repository import backend_of, set_precision, write_digest

    if backend_of(repository) != "onnxruntime":
        raise UserError(f"{repository} holds TensorRT configs; the CPU server needs "
                        "`leukograph generate-repo --backend onnxruntime`. " + GPU_HINT)
    if precision is not None and set_precision(repository, precision):
        print(f"serving precision set to {precision} in {repository}", flush=True)
    weights = weights or WEIGHTS_DIR
    reason = onnx_stale(repository, weights)
    if reason is not None:
        print(f"exporting ONNX from {weights}: {reason}", flush=True)
        from leukograph.training.export import export_all  # torch: only when needed

        export_all(weights, repository)
    int8_reason = int8_stale(repository)
    if int8_reason is not None:
        print(f"quantising the crop_embedder to INT8: {int8_reason}", flush=True)
        from leukograph.training.checkpoints import cnn_crop_size
        from leukograph.training.quantize import export_int8

        print(export_int8(repository, data_root(), crop_size=cnn_crop_size(weights), weights_dir=weights)[1],
              flush=True)
    write_digest(repository)
    return reason is not None or int8_reason is not None


def _terminate_with_parent() -> None:
    """In the server's child process: ask Linux to SIGTERM it when the thread that started it dies, even by SIGKILL
    (prctl PR_SET_PDEATHSIG), so a killed `leukograph serve` leaves no tritonserver behind. Start servers from a
    thread that outlives them (the main thread, as every caller here does)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


_ISSUED_PORTS: set[int] = set()  # ports free_port handed out in this process


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now and not handed out before by this process (the OS may offer the port it just
    gave back, so three calls for one server's HTTP, gRPC and metrics ports could otherwise collide; another process
    may still take it)."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _ISSUED_PORTS:
            _ISSUED_PORTS.add(port)
            return port
    raise OSError("no free port left that this process has not handed out already")


def _tail(path: Path, lines: int = 15, errors: int = 10) -> str:
    """The server log's error lines (Triton's `E` lines: why a model failed to load), then its last lines."""
    try:
        with path.open(errors="replace") as f:
            text = f.readlines()
    except OSError:
        return "(no log)"
    error_lines = [line for line in text if line.startswith("E")][-errors:]
    tail = list(deque(text, maxlen=lines))
    return "".join([line for line in error_lines if line not in tail] + tail)


class TritonServer:
    """One `tritonserver` process on a model repository. Use as a context manager or start()/stop()."""

    def __init__(self, repository: Path = MODEL_REPOSITORY, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, host: str = "127.0.0.1", log_path: Path | None = None,
                 model_control_mode: str = "none", extra_args: tuple[str, ...] = (), http: bool = True,
                 admin_key: str | None = None) -> None:
        """http: also serve HTTP (gRPC always). admin_key: restrict RESTRICTED_APIS to requests whose
        `leukograph-admin-key` header carries it (None: unrestricted)."""
        self.repository = Path(repository).resolve()
        self.http = http
        self.admin_key = admin_key
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.host = host
        self.model_control_mode = model_control_mode
        self.extra_args = tuple(extra_args)
        self.log_path = Path(log_path) if log_path else CACHE_DIR / "logs" / f"tritonserver-{http_port}.log"
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    def command(self) -> tuple[list[str], dict[str, str]]:
        root = server_dir()
        _, libs, _ = _pytriton_paths()
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH")) if p)
        env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH")) if p)
        cmd = [str(root / "bin" / "tritonserver"), f"--model-repository={self.repository}",
               f"--backend-directory={root / 'backends'}", f"--cache-directory={root / 'caches'}",
               f"--http-address={self.host}", f"--grpc-address={self.host}", f"--metrics-address={self.host}",
               f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
               f"--metrics-port={self.metrics_port}", f"--model-control-mode={self.model_control_mode}",
               "--allow-gpu-metrics=false", "--exit-timeout-secs=10", f"--allow-http={str(self.http).lower()}"]
        if self.admin_key:
            restriction = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_key}"
            cmd.append(f"--grpc-restricted-protocol={restriction}")
            if self.http:
                cmd.append(f"--http-restricted-api={restriction}")
        if self.model_control_mode == "explicit" and not any(a.startswith("--load-model") for a in self.extra_args):
            cmd.append("--load-model=*")  # explicit control, everything loaded at start (reload_pipeline swaps)
        cmd += self.extra_args
        return cmd, env

    def is_ready(self) -> bool:
        """Triton's own readiness over gRPC, and over HTTP too when it is on (Triton starts HTTP after gRPC).
        Says nothing about a wedged stub: see `Supervisor`."""
        import tritonclient.grpc as grpcclient

        if self.http:
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1.0) as response:
                    if response.status != 200:
                        return False
            except (urllib.error.URLError, OSError):
                return False
        try:
            client = grpcclient.InferenceServerClient(self.grpc_url)
            try:
                return bool(client.is_server_ready(client_timeout=1.0))
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    def start(self, timeout: float = 60.0) -> TritonServer:
        """Launch and wait until every model is ready; UserError (one line + log tail) otherwise."""
        if self.process is not None and self.process.poll() is None:
            return self
        if not self.repository.is_dir():
            raise UserError(f"model repository {self.repository} does not exist")
        cmd, env = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self.log_path.open("w") as log:
            # Own process group: stop() signals the server and its python-backend stubs together.
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_terminate_with_parent)
        while time.monotonic() - started < timeout:
            code = self.process.poll()
            if code is not None:
                self.process = None
                raise UserError(f"tritonserver exited with code {code} before becoming ready "
                                f"(log {self.log_path}):\n{_tail(self.log_path)}")
            if self.is_ready():
                self.startup_s = time.monotonic() - started
                return self
            time.sleep(0.1)
        self.stop()
        raise UserError(f"tritonserver not ready after {timeout:g} s (log {self.log_path}):\n{_tail(self.log_path)}")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM the server's process group, wait, SIGKILL after `grace` s. Returns the server's exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        with contextlib.suppress(ProcessLookupError):  # leftover stubs, if any
            os.killpg(process.pid, signal.SIGKILL)
        _wait_until_group_exits(process.pid)  # a dying stub still maps its shm region: stale-region cleanup waits
        return process.returncode

    def restart(self, timeout: float = 60.0) -> TritonServer:
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _live_group_members(pgid: int) -> list[int]:
    """Pids of the process group's members that still run (zombies have released their memory and do not count)."""
    live = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
            if int(fields[2]) == pgid and fields[0] != "Z":
                live.append(int(proc.name))
    return live


def _wait_until_group_exits(pgid: int, timeout: float = 10.0) -> bool:
    """Wait (at most `timeout` s) until no member of the killed process group runs; True when none does."""
    deadline = time.monotonic() + timeout
    while _live_group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _regions_in_use() -> set[str]:
    """Names of /dev/shm files some live process has mapped or open (from /proc/*/maps and /proc/*/fd)."""
    used: set[str] = set()
    prefix = str(SHM_DIR) + "/"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for line in (proc / "maps").read_text().splitlines():
                parts = line.split(maxsplit=5)
                path = parts[5] if len(parts) == 6 else ""
                if path.startswith(prefix):
                    used.add(path[len(prefix):].removesuffix(" (deleted)"))
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith(prefix):
                        used.add(target[len(prefix):])
    return used


def remove_stale_stub_regions() -> list[Path]:
    """Remove the python-backend shared-memory regions (this user's) that no live process maps or holds open: what
    a killed or crashed tritonserver's stubs leave behind (up to hundreds of MB each). Live servers keep theirs."""
    candidates = [p for p in SHM_DIR.glob(STUB_REGION_GLOB) if p.is_file() and p.stat().st_uid == os.getuid()]
    if not candidates:
        return []
    used = _regions_in_use()
    removed = []
    for region in candidates:
        if region.name not in used:
            with contextlib.suppress(FileNotFoundError):
                region.unlink()
                removed.append(region)
    return removed


def probe_frame() -> tuple[np.ndarray, np.ndarray]:
    """The liveness probe's request: a tiny frame with one cell box (it runs both python steps)."""
    side = 2 * MIN_FRAME_SIDE
    frame = np.full((side, side, 3), 200, np.uint8)
    frame[side // 4: 3 * side // 4, side // 4: 3 * side // 4] = (120, 60, 160)
    return frame, np.array([[side / 4, side / 4, 3 * side / 4, 3 * side / 4]], np.float32)


class Supervisor:
    """Keeps a TritonServer answering: a real tiny inference every `interval_s`; restart on exit or wedge."""

    def __init__(self, server: TritonServer, interval_s: float = 10.0, probe_timeout_s: float = 10.0,
                 failures_to_restart: int = 2, start_timeout_s: float = 60.0,
                 report: Callable[[str], None] = print) -> None:
        self.server = server
        self.interval_s = interval_s
        self.probe_timeout_s = probe_timeout_s
        self.failures_to_restart = failures_to_restart
        self.start_timeout_s = start_timeout_s
        self.report = report
        self.failures = 0
        self.restarts = 0
        self.next_probe = time.monotonic() + interval_s
        self._frame, self._boxes = probe_frame()

    def probe(self) -> str | None:
        """None when a real inference succeeded within the timeout, else why not."""
        from leukograph.client.triton_client import PipelineError, TritonPipelineClient

        try:
            client = TritonPipelineClient(self.server.grpc_url, "grpc", request_timeout_s=self.probe_timeout_s)
        except Exception as exc:  # noqa: BLE001 - cannot even connect
            return f"no connection: {exc}"
        try:  # both ensembles: the client's boxes, and a bare frame through the detector
            probs, _ = client.infer(self._frame, self._boxes)
            detected = client.infer_outcome(self._frame)
            well_formed = probs.shape[0] == 1 and np.isfinite(probs).all() and np.isfinite(detected.probs).all()
            return None if well_formed else "malformed probe answer"
        except PipelineError as exc:
            return str(exc)
        finally:
            client.close()

    def tick(self) -> None:
        """Call often (every ~0.2 s): restarts at once on exit, probes every interval_s."""
        process = self.server.process
        if process is None or process.poll() is not None:
            code = None if process is None else process.returncode
            self.restart(f"tritonserver exited with code {code}")
            return
        if time.monotonic() < self.next_probe:
            return
        problem = self.probe()
        self.next_probe = time.monotonic() + self.interval_s
        if problem is None:
            self.failures = 0
            return
        self.failures += 1
        self.report(f"liveness probe failed ({self.failures}/{self.failures_to_restart}): {problem}")
        if self.failures >= self.failures_to_restart:
            self.restart(f"tritonserver answers no inference ({problem})")

    def restart(self, reason: str) -> None:
        self.restarts += 1
        self.report(f"{reason}; restarting it (restart {self.restarts}, log {self.server.log_path})")
        self.server.stop(grace=5.0)
        removed = remove_stale_stub_regions()
        if removed:
            self.report(f"removed {len(removed)} stale shared-memory region(s) of the dead server from {SHM_DIR}")
        self.server.start(self.start_timeout_s)
        self.failures = 0
        self.next_probe = time.monotonic() + self.interval_s
        self.report(f"tritonserver restarted in {self.server.startup_s:.1f} s (pid {self.server.pid})")


class ReloadFailed(UserError):
    """The server could not load the repository's pipeline (model control off, key refused, a model failed)."""


def reload_pipeline(grpc_url: str, key: str | None = None, timeout: float = 300.0) -> float:
    """Make a running server (explicit model control) serve what its repository now holds: unload the pipeline,
    then its steps, wait until all are gone, load the pipeline (Triton loads its steps from the files first).
    Returns the seconds the pipeline was unavailable. Restricted API: the admin key ($LEUKOGRAPH_ADMIN_KEY or the
    local key file)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    key = key or admin_key()
    headers = {GRPC_RESTRICTED_PREFIX + ADMIN_HEADER: key} if key else {}
    client = grpcclient.InferenceServerClient(grpc_url)
    names = [*(pipeline.name for pipeline in PIPELINES), *(stage.name for stage in SERVED_STAGES)]
    try:
        started = time.monotonic()
        for name in names:  # the pipeline first: from here on no request reaches a step
            client.unload_model(name, headers=headers)
        while any(client.is_model_ready(name) for name in names):  # unloading ends when in-flight requests end
            if time.monotonic() - started > timeout:
                raise ReloadFailed(f"{grpc_url}: the pipeline did not unload within {timeout:g} s")
            time.sleep(0.05)
        for pipeline in PIPELINES:
            client.load_model(pipeline.name, headers=headers, client_timeout=timeout)
        if not all(client.is_model_ready(pipeline.name) for pipeline in PIPELINES):
            raise ReloadFailed(f"{grpc_url}: the pipeline is not ready after loading")
        return time.monotonic() - started
    except InferenceServerException as exc:
        message = " ".join(str(exc.message() or exc).split())[:300]
        raise ReloadFailed(f"{grpc_url}: model control refused or failed: {message} (the server must run "
                           "`leukograph serve`, explicit model control, and the admin key must match)") from None
    finally:
        client.close()


def resolve_admin_key() -> tuple[str, str]:
    """(key, where it came from): $LEUKOGRAPH_ADMIN_KEY, else the key in ADMIN_KEY_FILE, else a new random key written
    (0600) there for the clients on this host (later servers on the host reuse it)."""
    if os.environ.get(ADMIN_KEY_ENV):
        return os.environ[ADMIN_KEY_ENV], f"${ADMIN_KEY_ENV}"
    key = admin_key()
    if key:
        return key, f"from {ADMIN_KEY_FILE}"
    key = secrets.token_urlsafe(24)
    ADMIN_KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(ADMIN_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(key + "\n")
    return key, f"generated, in {ADMIN_KEY_FILE} (clients on this host read it)"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Start a real CPU Triton server", add_help=add_help)
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    parser.add_argument("--weights", type=Path, default=None,
                        help=f"checkpoints to export from when model.onnx is missing or stale "
                             f"(default ${WEIGHTS_ENV} or training/weights)")
    parser.add_argument("--host", default="127.0.0.1", help="address for gRPC, HTTP and metrics (0.0.0.0: all)")
    parser.add_argument("--http", action="store_true",
                        help="also serve HTTP (off by default: Triton 2.51 has no HTTP body size limit)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--model-control-mode", choices=("none", "poll", "explicit"), default="explicit",
                        help="explicit (default): every model loaded at start; `leukograph adapt` loads new weights "
                        "through the admin-key API")
    parser.add_argument("--precision", choices=("fp32", "int8"), default=None,
                        help="serve the FP32 graphs or the INT8 crop_embedder (`export --int8`, run here when "
                             "missing); default: as the repository's configs say (`generate-repo --precision`)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness")
    parser.add_argument("--probe-interval", type=float, default=10.0,
                        help="seconds between liveness probes (a real tiny inference); 0: no supervision")
    parser.add_argument("--probe-timeout", type=float, default=10.0, help="seconds a probe may take")
    parser.add_argument("--probe-failures", type=int, default=2,
                        help="failed probes in a row that make serve restart tritonserver (default 2)")
    parser.add_argument("--log-file", type=Path, default=None, help="server log (default .cache/logs/)")
    return parser


def main(args: argparse.Namespace) -> int:
    repository: Path = args.model_repository
    if not repository.is_dir():
        raise UserError(f"model repository {repository} does not exist (run `leukograph generate-repo`)")
    if args.probe_interval < 0 or args.probe_timeout <= 0 or args.probe_failures < 1:
        raise UserError("--probe-interval must be >= 0, --probe-timeout > 0 and --probe-failures >= 1")
    ensure_exported(repository, args.weights, args.precision)
    key, key_source = resolve_admin_key()
    server = TritonServer(repository, args.http_port, args.grpc_port, args.metrics_port, args.host, args.log_file,
                          args.model_control_mode, http=args.http, admin_key=key)
    stop_requested: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop_requested.append(signum)

    def report(message: str) -> None:
        print(f"leukograph serve: {message}", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        removed = remove_stale_stub_regions()
        if removed:
            report(f"removed {len(removed)} stale shared-memory region(s) a dead server left in {SHM_DIR}")
        server.start(args.timeout)
        from leukograph.deploy.model_repository import repository_digest

        http = f"HTTP {server.http_url}" if args.http else "HTTP off"
        print(f"ready in {server.startup_s:.1f} s: model {repository_digest(repository)}; "
              f"gRPC {server.grpc_url}, {http}, metrics {server.metrics_url}; pid {server.pid}; "
              f"log {server.log_path}", flush=True)
        print(f"restricted APIs ({', '.join(RESTRICTED_APIS)}) need header {ADMIN_HEADER}; key {key_source}",
              flush=True)
        if args.probe_interval > 0:
            print(f"supervising: a real inference every {args.probe_interval:g} s; restart on exit or "
                  f"{args.probe_failures} failed probe(s) in a row", flush=True)
        print(GPU_HINT, flush=True)
        supervisor = Supervisor(server, args.probe_interval, args.probe_timeout, args.probe_failures,
                                args.timeout, report) if args.probe_interval > 0 else None
        while not stop_requested:
            if supervisor is not None:
                supervisor.tick()
            elif server.process is None or server.process.poll() is not None:
                code = server.process.returncode if server.process else None
                raise UserError(f"tritonserver exited with code {code} (log {server.log_path}):\n"
                                f"{_tail(server.log_path)}")
            time.sleep(0.2)
        print("stopping tritonserver", flush=True)
        code = server.stop()
        if code not in (0, None, -signal.SIGTERM):
            print(f"tritonserver exited with code {code} (log {server.log_path})", file=sys.stderr)
            return 1
        return 0
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
