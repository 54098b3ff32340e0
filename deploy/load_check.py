"""Load a finished model repository in a real tritonserver, wait until every model is ready, stop it.

    python3 -m leukograph.deploy.load_check --model-repository /models [--tritonserver PATH] [--timeout S]
    python3 -m leukograph.deploy.load_check --model-repository model_repository --bundled     (CPU, pytriton)

The Kubernetes initContainer and the edge box's `build-engines` service run it after `leukograph build-engines`,
with the tritonserver of the image itself: a TensorRT plan loads only in the TensorRT build that made it (server
issues #5975, #7613), so a plan the serving image cannot deserialize fails here, before the serving container
starts, instead of leaving a pod that never gets ready. The server listens on 127.0.0.1 only, on free ports,
with --strict-readiness, and is stopped before this returns. Exit 0: every model loaded; 2: it did not (one line
and the log's tail on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from leukograph.client.errors import UserError, run_module
from leukograph.deploy.server import TritonServer, free_port


class ImageTritonServer(TritonServer):
    """The `tritonserver` of NVIDIA's image (its own backends), on loopback; same start/stop as `leukograph serve`."""

    def __init__(self, repository: Path, binary: str, log_path: Path) -> None:
        super().__init__(repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                         host="127.0.0.1", log_path=log_path)
        self.binary = binary

    def command(self) -> tuple[list[str], dict[str, str]]:
        return [self.binary, f"--model-repository={self.repository}", "--strict-readiness=true",
                "--exit-on-error=true", f"--http-address={self.host}", f"--grpc-address={self.host}",
                f"--metrics-address={self.host}", f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}", "--exit-timeout-secs=10"], dict(os.environ)


FAILED_LOAD = re.compile(r"failed to load '([^']+)' version \d+: (.*)")


def load_failures(log_path: Path) -> dict[str, str]:
    """model -> the first line of why it failed to load, from a tritonserver log."""
    failures: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            match = FAILED_LOAD.search(line)
            if match and match.group(1) not in failures:
                failures[match.group(1)] = match.group(2).split("\\n")[0].strip().rstrip('"')[:300]
    return failures


def check(server: TritonServer, timeout: float) -> float:
    """Start `server`, wait for readiness (every model loaded), stop it; seconds to ready. UserError (one line naming
    the models that failed and why) otherwise."""
    try:
        server.start(timeout)
        return float(server.startup_s or 0.0)
    except UserError as exc:
        failures = load_failures(server.log_path)
        if not failures:
            raise UserError(f"{str(exc).splitlines()[0]}") from None
        why = "; ".join(f"{model}: {reason}" for model, reason in failures.items())
        raise UserError(f"{len(failures)} model(s) failed to load (log {server.log_path}): {why}") from None
    finally:
        server.stop()


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Check that tritonserver loads every model of a repository",
                                     add_help=add_help)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--tritonserver", default="tritonserver", help="the server binary (default: on PATH)")
    parser.add_argument("--bundled", action="store_true",
                        help="use the CPU tritonserver bundled with nvidia-pytriton (as `leukograph serve` does)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    return parser


def main(args: argparse.Namespace) -> int:
    repository: Path = args.model_repository
    if not repository.is_dir():
        raise UserError(f"model repository {repository} does not exist")
    log_dir = Path(tempfile.mkdtemp(prefix="load-check-"))
    log_path = log_dir / "tritonserver.log"
    if args.bundled:
        server: TritonServer = TritonServer(repository, http_port=free_port(), grpc_port=free_port(),
                                            metrics_port=free_port(), log_path=log_path)
    else:
        binary = shutil.which(args.tritonserver)
        if binary is None:
            raise UserError(f"{args.tritonserver!r} not found: run inside NVIDIA's Triton image, or pass --bundled")
        server = ImageTritonServer(repository, binary, log_path)
    seconds = check(server, args.timeout)
    shutil.rmtree(log_dir, ignore_errors=True)
    print(f"load check: every model in {repository} loaded and ready in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    run_module(main, get_args_parser(), "load check: error")
