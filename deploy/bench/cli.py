"""`leukograph bench`: its options, and the README section rewritten from a bench.json."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from leukograph.client.errors import UserError
from leukograph.deploy.bench.constants import DEFAULT_OUT, QUICK_OUT, README, README_SECTION, SCHEMA, TRANSPORTS
from leukograph.deploy.bench.report import markdown, readme_table, write_outputs
from leukograph.deploy.bench.run import run_benchmark
from leukograph.deploy.paths import shown_path
from leukograph.deploy.readme import replace_section


def _csv_ints(value: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(v) for v in value.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return numbers


def _csv_transports(value: str) -> tuple[str, ...]:
    names = tuple(v for v in value.split(",") if v)
    bad = [n for n in names if n not in TRANSPORTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"transports must be among {', '.join(TRANSPORTS)}, got {value!r}")
    return names


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from leukograph.deploy.model_repository import DEFAULT_ORT_THREADS, INSTANCES, instances_arg, instances_text

    parser = argparse.ArgumentParser(description="Latency benchmark: Triton end to end against alternatives",
                                     add_help=add_help)
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run: 4 frames, concurrency 1, cells 1 and 8 (seconds); output in .cache/")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"where bench.json, PNGs and results.md go (default {shown_path(DEFAULT_OUT)}"
                             f", --quick: {shown_path(QUICK_OUT)})")
    parser.add_argument("--weights", type=Path, default=None,
                        help="checkpoints (default $LEUKOGRAPH_WEIGHTS or training/weights)")
    parser.add_argument("--backend", choices=("onnxruntime", "pytorch"), default="onnxruntime",
                        help="server steps: ONNX Runtime (default) or PyTorch (CUDA if present; deploy/bench_gpu.sh)")
    parser.add_argument("--ort-threads", type=int, default=DEFAULT_ORT_THREADS,
                        help="intra-op threads per server step (and the first in-process ORT row)")
    parser.add_argument("--instances", type=instances_arg, action="append", metavar="STAGE=N",
                        help="instances of a step in the benchmark's own repository (repeatable; default "
                             f"{instances_text(INSTANCES)})")
    parser.add_argument("--torch-threads", type=int, default=None, help="PyTorch threads (default: available cores)")
    parser.add_argument("--torch-device", default="cpu", help="device of the PyTorch eager rows (cpu, cuda)")
    parser.add_argument("--frames-dir", type=Path, default=None,
                        help="read the frames from this folder instead of the BCCD held-out set (GPU machines)")
    parser.add_argument("--transports", type=_csv_transports, default=None,
                        help=f"comma-separated, from {','.join(TRANSPORTS)} (default all)")
    parser.add_argument("--concurrency", type=_csv_ints, default=None, help="default 1,2,4,8")
    parser.add_argument("--cells", type=_csv_ints, default=None, help="cells per frame to sweep (default 1,8,32,128)")
    parser.add_argument("--frames", type=int, default=None, help="frames per run (default 216; quick 4)")
    parser.add_argument("--sweep-reps", type=int, default=None, help="requests per sweep point (default 30)")
    parser.add_argument("--no-video", action="store_true", help="skip the MJPG-video capture row")
    parser.add_argument("--no-baselines", action="store_true", help="Triton rows only (an edge client without torch)")
    parser.add_argument("--grpc-url", default=None, help="measure a running server instead of starting one")
    parser.add_argument("--http-url", default=None, help="its HTTP address (with --grpc-url)")
    parser.add_argument("--model-repository", type=Path, default=None,
                        help="with --grpc-url: the served repository (its ONNX files feed the in-process rows)")
    parser.add_argument("--plans", type=Path, default=None, help="TensorRT plans for the engine-runner row")
    parser.add_argument("--trt-grpc-url", default=None, help="a Triton server with TensorRT plans to measure")
    parser.add_argument("--profile", action="store_true", help="py-spy the server steps and the client (8 s)")
    parser.add_argument("--label", default="", help="free text stored with the results (e.g. which card)")
    parser.add_argument("--readme-from", type=Path, default=None,
                        help="only rewrite the README bench section from this bench.json")
    parser.add_argument("--readme", type=Path, default=README, help="README to update (default README.md)")
    parser.add_argument("--readme-section", default=README_SECTION,
                        help=f"README section to rewrite (default {README_SECTION}; the GPU figures: bench-gpu)")
    parser.add_argument("--int8", action="store_true",
                        help="FP32 vs INT8 only (deploy/bench/int8.py): in-process and Triton rows (boxes given, and "
                             "the detector in the ensemble), per-cell cost at 128 cells, roofline; int8.json in "
                             "--out-dir and, unless --quick, the README table")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.int8:
        return int8_main(args)
    if args.readme_from:
        try:
            result = json.loads(Path(args.readme_from).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {args.readme_from}: {exc}") from None
        if result.get("schema") != SCHEMA:
            raise UserError(f"{args.readme_from} is not a {SCHEMA} file")
        details = os.path.relpath(Path(args.readme_from).resolve().parent / "results.md",
                                  Path(args.readme).resolve().parent)
        changed = replace_section(args.readme_section, readme_table(result, details), Path(args.readme))
        print(f"{args.readme}: {'updated' if changed else 'unchanged'}")
        return 0
    if args.http_url and not args.grpc_url:
        raise UserError("--http-url needs --grpc-url (the statistics come over gRPC)")
    if args.ort_threads < 1:
        raise UserError(f"--ort-threads must be >= 1, got {args.ort_threads}")
    if args.grpc_url and not args.http_url:
        args.transports = tuple(t for t in (args.transports or TRANSPORTS) if t.startswith("grpc"))
    result = run_benchmark(args)
    out_dir = args.out_dir or (QUICK_OUT if args.quick else DEFAULT_OUT)
    text = markdown(result)
    files = write_outputs(result, out_dir)
    print(text)
    print("wrote " + ", ".join(str(p) for p in files))
    return 0


def int8_main(args: argparse.Namespace) -> int:
    from leukograph.deploy.bench import int8

    if args.readme_from:  # only the README table, from an int8.json
        path = Path(args.readme_from)
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {path}: {exc}") from None
    else:
        result = int8.run_int8_bench(args)
        out_dir = args.out_dir or (QUICK_OUT if args.quick else DEFAULT_OUT)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / int8.INT8_JSON
        path.write_text(json.dumps(result, indent=2) + "\n")
    text = int8.markdown(result)
    print(text)
    if args.readme_from or not args.quick:
        changed = replace_section(int8.README_SECTION, text, Path(args.readme))
        print(f"{args.readme}: {'updated' if changed else 'unchanged'}")
    print(f"wrote {path}")
    return 0
