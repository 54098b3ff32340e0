"""`leukograph soak --minutes N`: memory and latency of the whole system over time, on loopback only.

It starts its own tritonserver (127.0.0.1, free ports, gRPC only), serves a live MJPEG camera stand-in over loopback
HTTP (held-out BCCD JPEGs, looped, at --fps) and runs the real `leukograph stream` client on it (with --shm by
default) into a fresh database. Every --sample-s seconds it reads the resident memory (VmRSS) of tritonserver, of
each python-backend stub and of the client. At the end it stops the client (SIGTERM: it records what is in flight),
reads each recorded frame's capture->labels latency from the database, and times a resume of the sample (open the
store and start the sample again, in a fresh process: what a restarted client pays).

Output (--out folder): soak.json (samples, per-minute latency percentiles, RSS slopes in MB/hour from a least-squares
line over the samples after the warm-up) and soak.png (RSS over time, latency percentiles per minute).
`leukograph soak --readme-from soak.json` writes the README's soak figures from such a file (never typed by hand).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from leukograph.client.errors import UserError
from leukograph.deploy.paths import MODEL_REPOSITORY
from leukograph.deploy.server import TritonServer, ensure_exported, free_port

LOOPBACK = "127.0.0.1"
MAX_MINUTES = 24 * 60
MJPEG_BOUNDARY = b"leukographframe"
STOP_TIMEOUT_S = 60.0


def held_out_jpegs(count: int) -> list[bytes]:
    """JPEG bytes of held-out BCCD frames (never trained on), as a camera would send them."""
    from leukograph.training.datasets import held_out_frames, load_bccd

    held = held_out_frames()
    paths = [f.image_path for f in load_bccd() if f.frame_id in held][:count]
    if not paths:
        raise UserError("no held-out BCCD frames found (see README \"Data\")")
    return [p.read_bytes() for p in paths]


class MjpegCamera:
    """A live camera stand-in: multipart/x-mixed-replace JPEG frames at `fps` on a loopback HTTP port."""

    def __init__(self, jpegs: list[bytes], fps: float) -> None:
        frames, period = itertools.cycle(jpegs), 1.0 / fps

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(200)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY.decode()}")
                self.end_headers()
                next_at = time.monotonic()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    for data in frames:
                        self.wfile.write(b"--" + MJPEG_BOUNDARY + b"\r\nContent-Type: image/jpeg\r\n"
                                         + f"Content-Length: {len(data)}\r\n\r\n".encode() + data + b"\r\n")
                        next_at += period
                        time.sleep(max(0.0, next_at - time.monotonic()))

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{LOOPBACK}:{self.httpd.server_address[1]}/camera.mjpg"
        threading.Thread(target=self.httpd.serve_forever, name="mjpeg-camera", daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MB (VmRSS), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def group_members(pgid: int) -> list[int]:
    """The processes of a process group (tritonserver and its python-backend stubs)."""
    members = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    members.append(int(proc.name))
    return sorted(members)


def slope_mb_per_hour(times_s: list[float], values: list[float]) -> float | None:
    if len(values) < 3:
        return None
    slope, _ = np.polyfit(np.asarray(times_s) / 3600.0, np.asarray(values), 1)
    return round(float(slope), 2)


def latency_per_minute(frames: list[tuple[float, float]], start: float) -> list[dict[str, Any]]:
    """[(epoch received, latency ms)] -> per-minute n, p50, p95, p99."""
    by_minute: dict[int, list[float]] = {}
    for received, latency in frames:
        by_minute.setdefault(int((received - start) // 60), []).append(latency)
    out = []
    for minute in sorted(by_minute):
        values = np.asarray(by_minute[minute])
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        out.append({"minute": minute, "n": int(values.size), "p50_ms": round(float(p50), 1),
                    "p95_ms": round(float(p95), 1), "p99_ms": round(float(p99), 1)})
    return out


def recorded_latencies(db: Path, sample: str) -> list[tuple[float, float]]:
    from datetime import datetime

    from leukograph.client.records import ResultStore

    with ResultStore(db, create=False) as store:
        return [(datetime.fromisoformat(f["received_at"]).timestamp(), float(f["latency_ms"]))
                for f in store.frames(sample) if f["latency_ms"] is not None]


RESUME_PROBE = """
import resource, sys, time
from leukograph.client.records import ResultStore
started = time.perf_counter()
with ResultStore(sys.argv[1]) as store:
    state = store.start_sample(sys.argv[2], target=int(sys.argv[3]))
    n = state.n_frames
print(n, time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def time_resume(db: Path, sample: str, target: int) -> dict[str, float]:
    """A fresh process opens the store and resumes the sample (nothing new): seconds and peak RSS."""
    done = subprocess.run([sys.executable, "-c", RESUME_PROBE, str(db), sample, str(target)], capture_output=True,
                          text=True, timeout=600, check=True)
    n, seconds, peak = done.stdout.split()
    return {"frames": int(n), "seconds": round(float(seconds), 3), "peak_rss_mb": round(float(peak), 1)}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_lat) = plt.subplots(2, 1, figsize=(9, 7), constrained_layout=True)
    samples = result["samples"]
    minutes = [s["t_s"] / 60 for s in samples]
    for role in ("server", "stubs", "client"):
        ax_rss.plot(minutes, [s[f"{role}_mb"] for s in samples],
                    label=f"{role} ({result['slope_mb_per_hour'][role]} MB/h)")
    ax_rss.set_xlabel("minutes")
    ax_rss.set_ylabel("RSS (MB)")
    ax_rss.set_title(f"leukograph soak: {result['frames_recorded']} frames, {result['minutes']:g} min, "
                     f"{result['fps']:g} fps{' shm' if result['shm'] else ''}")
    ax_rss.legend()
    per_minute = result["latency_per_minute"]
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        ax_lat.plot([m["minute"] for m in per_minute], [m[key] for m in per_minute], marker="o", label=key)
    ax_lat.set_xlabel("minute")
    ax_lat.set_ylabel("capture -> labels latency (ms)")
    ax_lat.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def readme_body(result: dict[str, Any], json_path: str) -> str:
    """The README's soak figures, from a soak.json."""
    slopes, resume = result["slope_mb_per_hour"], result["resume"]
    steady = [x for x in result["samples"] if x["t_s"] >= result["warm_up_s"]] or result["samples"]
    per_minute = result["latency_per_minute"]
    command = f"leukograph soak --minutes {result['minutes']:g}" + (f" --fps {result['fps']:g}" if result["fps"] != 15
                                                                     else "") + ("" if result["shm"] else " --no-shm")
    full = [m for m in per_minute if m["n"] >= 0.5 * 60 * result["fps"]] or per_minute  # whole minutes only
    p50 = [m["p50_ms"] for m in full]
    p99 = [m["p99_ms"] for m in full]
    rows = ["| process | RSS after warm-up -> at the end (MB) | slope after warm-up (MB/hour) |", "|---|---:|---:|"]
    for role, name in (("server", "tritonserver"), ("stubs", "python-backend stubs (all)"),
                       ("client", "`leukograph stream` client")):
        first, last = steady[0][f"{role}_mb"], steady[-1][f"{role}_mb"]
        rows.append(f"| {name} | {first:.0f} -> {last:.0f} | {slopes[role]:+.2f} |")
    return "\n".join([
        f"Measured with `{command}` ({result['minutes']:g} min, a {result['fps']:g} fps loopback camera, "
        f"{'shared memory' if result['shm'] else 'gRPC'}; {result['frames_recorded']} frames recorded; memory "
        f"sampled every few seconds, slopes fitted after a {result['warm_up_s']:g} s warm-up; file "
        f"[{json_path}]({json_path}), plot beside it):",
        "",
        *rows,
        "",
        f"Capture -> labels latency per minute: p50 {min(p50):.1f}-{max(p50):.1f} ms, p99 {min(p99):.1f}-"
        f"{max(p99):.1f} ms over {len(full)} whole minutes. Resuming the sample afterwards with nothing new "
        f"({resume['frames']} frames recorded): {resume['seconds']:.2f} s, peak {resume['peak_rss_mb']:.0f} MB.",
    ])


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Soak test on loopback: stream a live MJPEG stand-in through a "
                                     "served pipeline, sample memory and latency", add_help=add_help)
    parser.add_argument("--minutes", type=float, help=f"how long to stream (at most {MAX_MINUTES})")
    parser.add_argument("--fps", type=float, default=15.0, help="camera frame rate (default 15)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between memory samples (default 5)")
    parser.add_argument("--no-shm", dest="shm", action="store_false", help="send frames over gRPC, not shm")
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    parser.add_argument("--out", type=Path, default=Path("soak"), help="folder for soak.json, soak.png, the db")
    parser.add_argument("--readme-from", type=Path, default=None, metavar="SOAK_JSON",
                        help="write the README's soak figures from this soak.json (runs nothing)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.readme_from is not None:
        from leukograph.deploy.paths import shown_path
        from leukograph.deploy.readme import replace_section

        try:
            result = json.loads(args.readme_from.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {args.readme_from}: {exc}") from None
        changed = replace_section("soak", readme_body(result, shown_path(args.readme_from)))
        print(f"README soak figures {'updated' if changed else 'unchanged'} from {args.readme_from}")
        return 0
    if args.minutes is None or not 0 < args.minutes <= MAX_MINUTES:
        raise UserError(f"--minutes must be in (0, {MAX_MINUTES}]")
    if not 0 < args.fps <= 60 or not 0.5 <= args.sample_s <= 600:
        raise UserError("--fps must be in (0, 60] and --sample-s in [0.5, 600]")
    ensure_exported(args.model_repository)
    args.out.mkdir(parents=True, exist_ok=True)
    db = args.out / "soak.sqlite"
    for stale in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        stale.unlink(missing_ok=True)
    key = os.environ.get("LEUKOGRAPH_ADMIN_KEY") or secrets.token_urlsafe(24)
    env = dict(os.environ, LEUKOGRAPH_ADMIN_KEY=key)
    server = TritonServer(args.model_repository, http_port=free_port(), grpc_port=free_port(),
                          metrics_port=free_port(), host=LOOPBACK, log_path=args.out / "tritonserver.log",
                          http=False, admin_key=key)
    camera = MjpegCamera(held_out_jpegs(50), args.fps)
    sample, target = "soak", 10**9
    samples: list[dict[str, Any]] = []
    client = None
    try:
        server.start(120)
        command = [sys.executable, "-m", "leukograph.client.cli", "stream", camera.url, "--url", server.grpc_url,
                   "--db", str(db), "--sample", sample, "--target", str(target),
                   "--json-summary", str(args.out / "stream-summary.json"), *(["--shm"] if args.shm else [])]
        client = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                  stderr=(args.out / "stream.log").open("w"))
        print(f"soak: {args.minutes:g} min at {args.fps:g} fps; server pid {server.pid}, client pid {client.pid}; "
              f"output {args.out}", flush=True)
        started_wall, started = time.time(), time.monotonic()
        end = started + 60 * args.minutes
        while time.monotonic() < end:
            if client.poll() is not None:
                raise UserError(f"the stream client exited early with code {client.returncode} "
                                f"(log {args.out / 'stream.log'})")
            stubs = [p for p in group_members(server.pid) if p != server.pid]
            samples.append({"t_s": round(time.monotonic() - started, 1), "server_mb": rss_mb(server.pid),
                            "stubs_mb": round(sum(rss_mb(p) or 0 for p in stubs), 1), "n_stubs": len(stubs),
                            "client_mb": rss_mb(client.pid)})
            time.sleep(min(args.sample_s, max(0.0, end - time.monotonic())))
        client.send_signal(signal.SIGTERM)
        client.wait(STOP_TIMEOUT_S)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        camera.close()
        server.stop()
    latencies = recorded_latencies(db, sample)
    warm_up_s = min(60.0, 0.2 * 60 * args.minutes)
    steady = [s for s in samples if s["t_s"] >= warm_up_s]
    result = {
        "command": "leukograph soak " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["soak"] else sys.argv[1:]),
        "minutes": args.minutes, "fps": args.fps, "shm": args.shm, "frames_recorded": len(latencies),
        "warm_up_s": warm_up_s,
        "slope_mb_per_hour": {role: slope_mb_per_hour([s["t_s"] for s in steady], [s[f"{role}_mb"] for s in steady])
                              for role in ("server", "stubs", "client")},
        "rss_mb_first_last": {role: [samples[0][f"{role}_mb"], samples[-1][f"{role}_mb"]] if samples else None
                              for role in ("server", "stubs", "client")},
        "latency_per_minute": latency_per_minute(latencies, started_wall),
        "resume": time_resume(db, sample, target),
        "samples": samples,
    }
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "soak.png")
    slopes = result["slope_mb_per_hour"]
    print(f"soak: {len(latencies)} frames recorded; RSS slope MB/hour after {warm_up_s:g} s: server "
          f"{slopes['server']}, stubs {slopes['stubs']}, client {slopes['client']}; resume "
          f"{result['resume']['seconds']} s, peak {result['resume']['peak_rss_mb']} MB; "
          f"{args.out / 'soak.json'}, {args.out / 'soak.png'}", flush=True)
    return 0
