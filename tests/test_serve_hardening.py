"""`leukograph serve` against requests that crashed or wedged tritonserver 2.51 (issue cases 1-3), on the real server.

One supervised `serve` (HTTP on, a fixed admin key, a probe every second) is attacked in turn:
1. an HTTP infer body of 1,000,000 `[` (still a SIGSEGV in Triton 2.51: serve restarts it);
2. a registered shm region truncated under the server (SIGBUS): refused without the admin key; with it, serve
   restarts the crashed server;
3. the cell_graph stub's own shm region written as an output (a wedge that health checks do not see): refused
   without the key; with it, the liveness probe (a real inference) fails and serve restarts the server.
After each: a real inference answers again and the dead server's stub regions are gone from /dev/shm.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from leukograph.client import contract
from leukograph.client.triton_client import ADMIN_HEADER, ADMIN_KEY_ENV, GRPC_RESTRICTED_PREFIX, TritonPipelineClient
from leukograph.deploy.server import STUB_REGION_GLOB, free_port, probe_frame

pytestmark = [pytest.mark.server, pytest.mark.slow]
LEUKOGRAPH = [sys.executable, "-m", "leukograph.client.cli"]
KEY = "test-admin-key-1234"
RECOVERY_S = 120.0


class Serve:
    """A running `leukograph serve` with its output collected line by line."""

    def __init__(self, repository: Path, log: Path, *extra: str) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.grpc_url, self.http_url = f"127.0.0.1:{self.grpc_port}", f"127.0.0.1:{self.http_port}"
        env = dict(os.environ, **{ADMIN_KEY_ENV: KEY})
        self.process = subprocess.Popen(
            [*LEUKOGRAPH, "serve", "--model-repository", str(repository), "--grpc-port", str(self.grpc_port),
             "--http-port", str(self.http_port), "--metrics-port", str(free_port()), "--log-file", str(log), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self._queue.put(line) for line in self.process.stdout], daemon=True).start()

    def wait_for(self, needle: str, timeout: float = RECOVERY_S, start: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[start:]:
                if needle in line:
                    return line
            start = len(self.lines)
            assert self.process.poll() is None or not self._queue.empty(), "serve exited:\n" + "".join(self.lines)
            assert time.monotonic() < deadline, f"no {needle!r} from serve:\n" + "".join(self.lines)
            with contextlib.suppress(queue.Empty):
                self.lines.append(self._queue.get(timeout=0.5))

    @property
    def server_pid(self) -> int:
        line = [x for x in self.lines if "pid " in x][-1]
        return int(line.split("pid ")[1].split()[0].rstrip(";)"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def serve(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    log = tmp_path_factory.mktemp("serve") / "tritonserver.log"
    server = Serve(served_repository, log, "--http", "--probe-interval", "1", "--probe-timeout", "3",
                   "--probe-failures", "2")
    try:
        server.wait_for("GPU machines")
        yield server
    finally:
        server.stop()


def group_regions(pgid: int) -> dict[int, list[str]]:
    """pid -> stub shared-memory region names on its command line, for the processes of a process group."""
    found: dict[int, list[str]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError, ValueError):
            continue
        found[int(proc.name)] = [a for a in args if a.startswith(STUB_REGION_GLOB.rstrip("*"))]
    return found


def stub_regions(pgid: int) -> set[Path]:
    return {Path("/dev/shm") / name for names in group_regions(pgid).values() for name in names}


def infers(serve: Serve) -> bool:
    frame, boxes = probe_frame()
    try:
        with TritonPipelineClient(serve.grpc_url, "grpc", request_timeout_s=5) as client:
            return client.infer(frame, boxes)[0].shape == (1, contract.NUM_CLASSES)
    except Exception:  # noqa: BLE001 - not (yet) answering
        return False


def recovered(serve: Serve, mark: int, dead_regions: set[Path]) -> str:
    """Wait for serve's restart after line `mark`, then a real inference; the dead server's regions are gone."""
    line = serve.wait_for("tritonserver restarted", start=mark)
    deadline = time.monotonic() + RECOVERY_S
    while not infers(serve):
        assert time.monotonic() < deadline, "no inference after the restart"
        time.sleep(0.5)
    assert serve.process.poll() is None
    assert dead_regions and not any(region.exists() for region in dead_regions), dead_regions
    return line


def grpc_admin(key: str | None) -> dict[str, str] | None:
    return {GRPC_RESTRICTED_PREFIX + ADMIN_HEADER: key} if key else None


def test_restricted_apis_need_the_admin_key(serve: Serve) -> None:
    """Shared memory, model config and logging are refused without the key (gRPC and HTTP); the client sends it."""
    grpc = grpcclient.InferenceServerClient(serve.grpc_url)
    http = httpclient.InferenceServerClient(serve.http_url)
    calls = {
        "grpc shm": lambda h: grpc.register_system_shared_memory("x", "/x", 64, headers=h),
        "grpc config": lambda h: grpc.get_model_config(contract.PIPELINE_NAME, headers=h),
        "grpc logging": lambda h: grpc.get_log_settings(headers=h),
        "http shm": lambda h: http.register_system_shared_memory("x", "/x", 64, headers=h),
        "http repository": lambda h: http.get_model_repository_index(headers=h),
    }
    for name, call in calls.items():
        for key in (None, "wrong-key"):
            headers = grpc_admin(key) if name.startswith("grpc") else ({ADMIN_HEADER: key} if key else None)
            with pytest.raises(InferenceServerException, match="restricted"):
                call(headers)
    assert grpc.get_model_config(contract.PIPELINE_NAME, headers=grpc_admin(KEY))
    assert http.get_model_repository_index(headers={ADMIN_HEADER: KEY})
    assert grpc.is_server_ready() and grpc.is_model_ready(contract.PIPELINE_NAME)  # health stays open
    frame, boxes = probe_frame()
    os.environ[ADMIN_KEY_ENV] = KEY
    try:
        with TritonPipelineClient(serve.grpc_url, "grpc", shm=True) as client:  # registers shm with the key
            assert client.infer(frame, boxes)[0].shape == (1, contract.NUM_CLASSES)
            assert client.weights_id.startswith(contract.PIPELINE_NAME)
    finally:
        del os.environ[ADMIN_KEY_ENV]
    grpc.close()
    http.close()


def test_case1_huge_http_body(serve: Serve) -> None:
    """1,000,000 `[` as an HTTP infer body. Triton 2.51 still dies (SIGSEGV); serve restarts it and it answers."""
    assert infers(serve)
    mark, dead = len(serve.lines), stub_regions(serve.server_pid)
    request = urllib.request.Request(f"http://{serve.http_url}/v2/models/{contract.PIPELINE_NAME}/infer",
                                     data=b"[" * 1_000_000, method="POST")
    try:
        urllib.request.urlopen(request, timeout=30).close()
        crashed = False
    except urllib.error.HTTPError:
        crashed = False  # a clean error answer
    except (urllib.error.URLError, ConnectionError):
        crashed = True
    if not crashed:
        assert infers(serve)
        return
    line = recovered(serve, mark, dead)
    assert any("exited with code -11" in x for x in serve.lines[mark:]), "".join(serve.lines[mark:])
    assert "restarted" in line


def test_case2_truncated_shm_region(serve: Serve) -> None:
    """A registered region truncated to 4 KiB, then a 4096x4096 FRAME read from it: SIGBUS in tritonserver.
    Without the admin key the registration is refused; with it, serve restarts the crashed server."""
    name = f"leukograph_test_bus_{os.getpid()}"
    region = shm.create_shared_memory_region(name, "/" + name, 64 << 20)
    grpc = grpcclient.InferenceServerClient(serve.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            grpc.register_system_shared_memory(name, "/" + name, 64 << 20)
        grpc.register_system_shared_memory(name, "/" + name, 64 << 20, headers=grpc_admin(KEY))
        os.truncate(f"/dev/shm/{name}", 4096)
        side = contract.MAX_FRAME_SIDE
        frame = grpcclient.InferInput(contract.FRAME.name, [side, side, 3], contract.FRAME.client_dtype)
        frame.set_shared_memory(name, side * side * 3)
        mark, dead = len(serve.lines), stub_regions(serve.server_pid)
        with pytest.raises(InferenceServerException):  # the bare-frame pipeline: FRAME is its only input
            grpc.infer(contract.PIPELINE_NAME, [frame], client_timeout=30)
        recovered(serve, mark, dead)
        assert any("exited with code -7" in x for x in serve.lines[mark:]), "".join(serve.lines[mark:])
    finally:
        grpc.close()
        shm.destroy_shared_memory_region(region)


def cell_graph_stub(pgid: int) -> tuple[int, str]:
    """(pid, shm region name) of the cell_graph python stub of the server whose process group is pgid."""
    for pid, names in group_regions(pgid).items():
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        if names and "cell_graph" in args:
            return pid, names[0]
    raise AssertionError(f"no cell_graph stub in {group_regions(pgid)}")


def test_case3_stub_region_written_as_output(serve: Serve) -> None:
    """The cell_graph stub's own region registered as a client region and written as an output: refused without
    the admin key. With it, the server breaks (here it crashed; the issue saw a wedge) and serve restarts it."""
    _, region = cell_graph_stub(serve.server_pid)
    grpc = grpcclient.InferenceServerClient(serve.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            grpc.register_system_shared_memory("wedge", "/" + region, 1 << 16)
        grpc.register_system_shared_memory("wedge", "/" + region, 1 << 16, headers=grpc_admin(KEY))
        frame, boxes = probe_frame()
        inputs = []
        for name, array in contract.boxes_feed(frame, boxes).items():
            dtype = contract.BOXES_PIPELINE.input(name).client_dtype
            inputs.append(grpcclient.InferInput(name, list(array.shape), dtype))
            inputs[-1].set_data_from_numpy(array)
        output = grpcclient.InferRequestedOutput(contract.PROBS.name)
        output.set_shared_memory("wedge", 1 << 16)
        mark, dead = len(serve.lines), stub_regions(serve.server_pid)
        with contextlib.suppress(InferenceServerException):  # may answer: the damage shows in later requests
            grpc.infer(contract.BOXES_PIPELINE.name, inputs, outputs=[output], client_timeout=5)
        assert "restarted" in recovered(serve, mark, dead)
    finally:
        grpc.close()


def test_case3_wedged_stub_is_found_by_a_real_inference(serve: Serve) -> None:
    """A stub that stops answering (SIGSTOP: the wedge of case 3, made deterministic): Triton's health and model
    readiness still say yes, inference times out; the liveness probe notices and serve restarts the server."""
    pid, _ = cell_graph_stub(serve.server_pid)
    mark, dead = len(serve.lines), stub_regions(serve.server_pid)
    os.kill(pid, signal.SIGSTOP)
    grpc = grpcclient.InferenceServerClient(serve.grpc_url)
    try:
        assert grpc.is_server_ready() and grpc.is_model_ready(contract.PIPELINE_NAME)
        urllib.request.urlopen(f"http://{serve.http_url}/v2/health/ready", timeout=5).close()  # 200
        line = recovered(serve, mark, dead)
    finally:
        grpc.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    after = "".join(serve.lines[mark:])
    assert "liveness probe failed" in after and "answers no inference" in after, after
    assert "exited" not in after  # a wedge, not a crash: only a real inference shows it
    assert "restarted" in line


def test_http_is_off_unless_asked(served_repository: Path, tmp_path: Path) -> None:
    server = Serve(served_repository, tmp_path / "log.txt", "--probe-interval", "0")
    try:
        assert "HTTP off" in server.wait_for("ready in")
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=5)
        assert infers(server)
    finally:
        server.stop()
