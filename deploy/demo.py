"""`leukograph demo`: the main job in one command.

Starts the real CPU Triton server on the project's model repository (exporting the committed weights first if the
ONNX files are missing or stale), streams the BCCD held-out frames through `leukograph stream` as a sample, prints the
differential with 95% confidence intervals and the latency summary, and stops the server.
"""

from __future__ import annotations

import argparse
import tempfile
from datetime import datetime
from pathlib import Path

from leukograph.client import stream
from leukograph.client.contract import LOCALIZERS
from leukograph.client.errors import UserError
from leukograph.deploy.paths import MODEL_REPOSITORY
from leukograph.deploy.server import TritonServer, ensure_exported, free_port


def sample_frames(folder: Path, data_root: str | None, limit: int | None) -> int:
    """Link the held-out BCCD frames (never trained on) into `folder` as a stand-in for a camera; returns the count."""
    from leukograph.training.datasets import load_bccd, split_frames

    held = split_frames(data_root).held_out
    frames = [f for f in load_bccd(data_root) if f.frame_id in held][:limit]
    for index, frame in enumerate(frames):
        (folder / f"{index:04d}_{frame.image_path.name}").symlink_to(frame.image_path)
    return len(frames)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Start the CPU Triton server and stream sample frames through the "
                                     "client", add_help=add_help)
    parser.add_argument("--data-root", default=None, help="datasets (default $LEUKOGRAPH_DATA, ../shared/datasets)")
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    parser.add_argument("--frames", type=int, default=None, help="stream only the first N held-out frames")
    parser.add_argument("--sample", default=None, help="sample id (default demo-<timestamp>)")
    parser.add_argument("--target", type=int, default=100, help="stop at this many identified WBCs")
    parser.add_argument("--db", default="leukograph-demo.sqlite", help="result database")
    parser.add_argument("--save", default=None, metavar="VIDEO", help="also write the annotated video")
    parser.add_argument("--localizer", choices=LOCALIZERS, default="server",
                        help="server: bare frames, the ensemble's detector finds the cells (default); client: the "
                        "classical localiser on the client")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server")
    return parser


def main(args: argparse.Namespace) -> int:
    if not args.model_repository.is_dir():
        raise UserError(f"model repository {args.model_repository} not found")
    ensure_exported(args.model_repository)
    sample = args.sample or datetime.now().strftime("demo-%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory(prefix="leukograph-demo-") as tmp:
        count = sample_frames(Path(tmp), args.data_root, args.frames)
        server = TritonServer(args.model_repository, http_port=free_port(), grpc_port=free_port(),
                              metrics_port=free_port())
        print(f"starting Triton (CPU, python backend + ONNX Runtime) on {server.grpc_url} ...", flush=True)
        server.start(args.timeout)
        try:
            print(f"Triton ready in {server.startup_s:.1f} s; streaming {count} held-out BCCD frames as sample "
                  f"{sample}", flush=True)
            stream_args = ["--url", server.grpc_url, "--sample", sample, "--target", str(args.target),
                           "--db", args.db, "--localizer", args.localizer]
            if args.save:
                stream_args += ["--save", args.save]
            code = stream.main(stream.get_args_parser().parse_args([tmp, *stream_args]))
        finally:
            server.stop()
    print(f"results: {args.db} (sample {sample}); export with `leukograph report {sample} --db {args.db} --csv -`")
    return code
