"""py-spy profiles of the python-backend steps and of the client under load."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

from leukograph.client.contract import CELL_GRAPH, CROP_EMBEDDER


def stub_pids(server_pid: int) -> dict[str, int]:
    """{model name: pid} of the python-backend stubs under a tritonserver process."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == server_pid and cmdline and cmdline[0].endswith(b"triton_python_backend_stub"):
                for stage in (CROP_EMBEDDER.name, CELL_GRAPH.name):
                    if any(f"/{stage}/".encode() in arg for arg in cmdline):
                        found.setdefault(stage, int(proc.name))
    return found


def start_pyspy(pid: int, duration_s: float, path: Path) -> subprocess.Popen | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(max(1, int(duration_s))),
                             "--rate", "200", "--format", "raw", "--nonblocking", "--threads", "-o", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def summarize_pyspy(path: Path, top: int = 8) -> dict:
    """Collapsed stacks -> samples, and the functions with the most samples (self and inclusive), in %."""
    if not path.exists():
        return {"error": f"no profile written to {path}"}
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")[1:]]  # drop the thread, line numbers
        if not frames:
            continue
        total += n
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + n
        for f in set(frames):
            incl_counts[f] = incl_counts.get(f, 0) + n

    def pct(counts: dict[str, int]) -> list[list]:
        return [[name, round(100.0 * c / total, 1)] for name, c in sorted(counts.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "self_pct": pct(self_counts) if total else [],
            "inclusive_pct": pct(incl_counts) if total else []}


