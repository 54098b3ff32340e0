"""`leukograph build-engines`: FP16 TensorRT engines for both served stages, verified against ONNX Runtime fp32.

Needs TensorRT >= 10 (Python package `tensorrt`) and, for verification, pycuda and a CUDA GPU: NVIDIA's Triton
container or JetPack. Neither installs from PyPI, so on other machines this command
prints one line naming what is missing and exits non-zero. `--check-only` runs the CPU-side checks (TensorRT ONNX
operator table) without TensorRT.

Per stage it reads `<repository>/<stage>/1/model.onnx` (written by `leukograph export`) and writes
`<repository>/<stage>/1/model.plan` plus `<repository>/<stage>/1/build_report.json`.

TensorRT 10 Python API used (checked against NVIDIA's "TensorRT Python API" reference and "Optimizing Builder
Performance" > "Timing Cache", docs.nvidia.com/deeplearning/tensorrt):
  trt.Builder(logger); builder.create_network(0)  (TRT 10: explicit batch is the only mode, the EXPLICIT_BATCH flag is
  deprecated and ignored); trt.OnnxParser(network, logger).parse_from_file(path), parser.num_errors / get_error(i);
  builder.create_builder_config(); config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, bytes);
  config.set_flag(trt.BuilderFlag.FP16); builder.create_optimization_profile().set_shape(name, min, opt, max);
  config.add_optimization_profile(profile); config.create_timing_cache(blob) + config.set_timing_cache(cache,
  ignore_mismatch=False), cache.serialize() after the build; builder.build_serialized_network(network, config).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from leukograph.build_engines import verify
from leukograph.build_engines.onnx_ops import check_trt_compat, tensorrt_table_version
from leukograph.build_engines.profiles import Profiles, add_profile_arguments, profiles_from_args
from leukograph.build_engines.runner import TensorRtUnavailable
from leukograph.client.contract import MODEL_FILES, STAGES, StageSpec, stage_path
from leukograph.client.errors import UserError
from leukograph.project.paths import MODEL_REPOSITORY, REPO_ROOT

MIN_TENSORRT_MAJOR = 10
PLAN_FILE, REPORT_FILE, REJECTED_SUFFIX = MODEL_FILES["tensorrt"], "build_report.json", ".failed-verification"
DEFAULT_TIMING_CACHE = REPO_ROOT / "build" / "tensorrt" / "timing.cache"
DEFAULT_WORKSPACE_MIB = 2048
VERIFY_EXIT_CODE = 3


# ---- environment ----------------------------------------------------------------------------------------------
def import_tensorrt():
    """The tensorrt module (>= 10), or TensorRtUnavailable with one line naming what is missing."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError when libnvinfer / libnvonnxparser.so is missing
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise TensorRtUnavailable(f"TensorRT Python package not importable: {detail}; run inside NVIDIA's Triton "
                                  f"container (nvcr.io/nvidia/tritonserver:<ver>-py3) or JetPack, where TensorRT "
                                  f">= {MIN_TENSORRT_MAJOR} ships") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        raise TensorRtUnavailable(f"TensorRT {trt.__version__} found; this builder needs TensorRT >= "
                                  f"{MIN_TENSORRT_MAJOR}")
    return trt


def gpu_info() -> dict:
    """GPU name and compute capability from nvidia-smi, else pycuda, else torch; {} fields None without a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()
        if out:
            name, cc, driver = (part.strip() for part in out[0].split(","))
            return {"name": name, "compute_capability": cc, "driver": driver, "source": "nvidia-smi"}
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        import pycuda.autoinit  # noqa: F401
        import pycuda.driver as cuda

        device = cuda.Device(0)
        major, minor = device.compute_capability()
        return {"name": device.name(), "compute_capability": f"{major}.{minor}", "driver": None, "source": "pycuda"}
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}", "driver": None,
                    "source": "torch"}
    except Exception:
        pass
    return {"name": None, "compute_capability": None, "driver": None, "source": None}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stage_dir(repository: Path, stage: StageSpec) -> Path:
    return stage_path(repository, stage)


# ---- report -----------------------------------------------------------------------------------------------------
def build_report(stage: StageSpec, onnx_path: Path, plan_path: Path, profiles: Profiles, *, tensorrt_version: str,
                 gpu: dict, precision: str, workspace_bytes: int, build_seconds: float,
                 timing_cache: Path | None) -> dict:
    return {
        "stage": stage.name,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tensorrt_version": tensorrt_version,
        "gpu": gpu,
        "host": platform.node(),
        "precision": precision,
        "workspace_bytes": workspace_bytes,
        "profiles": {name: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])}
                     for name, s in profiles.shapes(stage).items()},
        "profile_ranges": {k: v for k, v in profiles.to_json().items() if k != "per_input"},
        "build_seconds": round(build_seconds, 3),
        "engine_bytes": plan_path.stat().st_size if plan_path.exists() else None,
        "onnx": str(onnx_path),
        "onnx_sha256": sha256(onnx_path),
        "timing_cache": str(timing_cache) if timing_cache else None,
        "operator_table": f"onnx-tensorrt docs/operators.md for TensorRT {tensorrt_table_version()}",
        "verification": None,
    }


def write_report(report: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


# ---- build ------------------------------------------------------------------------------------------------------
def build_engine(trt, stage: StageSpec, onnx_path: Path, plan_path: Path, profiles: Profiles, *, fp16: bool = True,
                 workspace_bytes: int = DEFAULT_WORKSPACE_MIB << 20, timing_cache: Path | None = DEFAULT_TIMING_CACHE,
                 verbose: bool = False) -> float:
    """Parse, configure, build and write one plan; return the build seconds."""
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors))
        raise UserError(f"{stage.name}: TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    if sorted(inputs) != sorted(stage.input_names):
        raise UserError(f"{stage.name}: network inputs {sorted(inputs)} != contract {sorted(stage.input_names)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        if not builder.platform_has_fast_fp16:
            print(f"{stage.name}: warning: this GPU has no fast FP16; building FP16 anyway")
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shapes = profiles.shapes(stage)
    for name, tensor in inputs.items():
        if -1 in tuple(tensor.shape):
            if name not in shapes:
                raise UserError(f"{stage.name}: dynamic input {name} {tuple(tensor.shape)} has no profile")
            profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)

    cache = None
    if timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.exists() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise UserError(f"{stage.name}: build_serialized_network failed (see TensorRT log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    if cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return seconds


def verification_samples(profiles: Profiles, box_source: str, data_root: str | None) -> list[verify.Sample]:
    """Held-out frames at a frame size the engine accepts, with no more cells than the profile's max."""
    h, w = profiles.height, profiles.width
    fits = h.min <= 480 <= h.max and w.min <= 640 <= w.max  # BCCD frames are 640 wide, 480 high
    root = Path(data_root) if data_root else None
    samples = verify.held_out_samples(box_source, None if fits else (h.opt, w.opt), root)
    kept = []
    for sample in samples:
        n = min(len(sample.boxes), profiles.cells.max)
        if n >= profiles.cells.min:
            sample.boxes, sample.labels = sample.boxes[:n], sample.labels[:n]
            kept.append(sample)
    return kept


def verify_engines(repository: Path, built: dict[str, Path], profiles: Profiles, args: argparse.Namespace) -> dict:
    """Engines vs ONNX Runtime fp32 on every held-out frame; stages not built this run use their existing plan if
    one exists, else ORT (so a single stage can be verified alone)."""
    from leukograph.build_engines.runner import EngineRunnerError
    from leukograph.runners import TrtRunner

    reference = verify.ort_pipeline(repository)
    candidate = []
    for stage, ort_stage in zip(STAGES, reference):
        plan = built.get(stage.name) or stage_dir(repository, stage) / PLAN_FILE
        try:
            candidate.append(TrtRunner(plan, stage) if plan.exists() else ort_stage)
        except EngineRunnerError as exc:
            raise UserError(f"plans built but not verified: {exc}; install pycuda or rerun with --no-verify",
                            exit_code=VERIFY_EXIT_CODE) from None
    samples = verification_samples(profiles, args.box_source, args.data_root)
    comparison = verify.compare(reference, tuple(candidate), samples)
    failures = comparison.failures(args.min_agreement, args.max_accuracy_drop, args.max_prob_diff,
                                   args.min_embedding_cosine)
    return {"reference": "onnxruntime fp32 CPU", "candidate": {s.name: type(c).__name__
                                                                for s, c in zip(STAGES, candidate)},
            "tolerances": {"min_class_agreement": args.min_agreement, "max_accuracy_drop": args.max_accuracy_drop,
                           "max_prob_diff": args.max_prob_diff, "min_embedding_cosine": args.min_embedding_cosine},
            "result": comparison.summary(), "line": comparison.line(), "failures": failures, "passed": not failures}


# ---- CLI --------------------------------------------------------------------------------------------------------
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Build FP16 TensorRT engines (needs TensorRT >= 10 and a GPU)",
                                     add_help=add_help)
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY,
                        help="reads <stage>/1/model.onnx, writes <stage>/1/model.plan and build_report.json")
    parser.add_argument("--stages", nargs="+", choices=[s.name for s in STAGES], default=[s.name for s in STAGES])
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--workspace-mib", type=int, default=DEFAULT_WORKSPACE_MIB, help="builder workspace pool")
    parser.add_argument("--timing-cache", type=Path, default=DEFAULT_TIMING_CACHE,
                        help="read and updated on every build (per GPU and TensorRT version)")
    parser.add_argument("--no-timing-cache", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="TensorRT VERBOSE log")
    parser.add_argument("--check-only", action="store_true",
                        help="only check the ONNX graphs against TensorRT's ONNX operator table (no TensorRT needed)")
    add_profile_arguments(parser)
    check = parser.add_argument_group("verification against ONNX Runtime fp32 on BCCD held-out frames")
    check.add_argument("--no-verify", action="store_true", help="skip it (the plans are then unchecked)")
    check.add_argument("--box-source", choices=("auto", "localize", "voc"), default="auto",
                       help="boxes: the project's localiser (auto: when importable) or the VOC annotations")
    check.add_argument("--data-root", default=None)
    check.add_argument("--min-agreement", type=float, default=verify.MIN_CLASS_AGREEMENT,
                       help="fraction of nodes whose class must match (default %(default)s)")
    check.add_argument("--max-prob-diff", type=float, default=verify.MAX_PROB_DIFF,
                       help="largest allowed |p_engine - p_onnx| (default %(default)s)")
    check.add_argument("--max-accuracy-drop", type=float, default=verify.MAX_ACCURACY_DROP,
                       help="on labelled WBC nodes, as a fraction (default %(default)s = 0.3 pt)")
    check.add_argument("--min-embedding-cosine", type=float, default=verify.MIN_EMBEDDING_COSINE)
    return parser


def _onnx_paths(repository: Path, stages: list[StageSpec]) -> dict[str, Path]:
    paths = {}
    for stage in stages:
        path = stage_dir(repository, stage) / MODEL_FILES["onnxruntime"]
        if not path.exists():
            raise UserError(f"{path} not found: run `leukograph export --model-repository {repository}` first")
        paths[stage.name] = path
    return paths


def main(args: argparse.Namespace) -> int:
    profiles = profiles_from_args(args)
    stages = [s for s in STAGES if s.name in args.stages]
    if args.check_only:
        problems = {name: check_trt_compat(path) for name, path in _onnx_paths(args.model_repository, stages).items()}
        for name, found in problems.items():
            print(f"{name}: {'OK' if not found else f'{len(found)} problem(s)'} against TensorRT "
                  f"{tensorrt_table_version()}'s ONNX operator table")
            for line in found:
                print(f"  {line}")
        return 1 if any(problems.values()) else 0

    trt = import_tensorrt()  # one line and exit 2 when missing
    onnx_paths = _onnx_paths(args.model_repository, stages)
    for name, path in onnx_paths.items():
        found = check_trt_compat(path)
        if found:
            raise UserError(f"{name}: {len(found)} TensorRT incompatibilities, first: {found[0]} "
                            f"(see `leukograph build-engines --check-only`)")
    gpu = gpu_info()
    print(f"TensorRT {trt.__version__} on {gpu['name'] or 'unknown GPU'} (compute {gpu['compute_capability']}); "
          f"frame {profiles.height.min}..{profiles.height.max} x {profiles.width.min}..{profiles.width.max}, "
          f"cells {profiles.cells.min}:{profiles.cells.opt}:{profiles.cells.max}")
    built: dict[str, Path] = {}
    reports: dict[str, tuple[dict, Path]] = {}
    timing_cache = None if args.no_timing_cache else args.timing_cache
    for stage in stages:
        plan = stage_dir(args.model_repository, stage) / PLAN_FILE
        seconds = build_engine(trt, stage, onnx_paths[stage.name], plan, profiles, fp16=args.precision == "fp16",
                               workspace_bytes=args.workspace_mib << 20, timing_cache=timing_cache,
                               verbose=args.verbose)
        report = build_report(stage, onnx_paths[stage.name], plan, profiles, tensorrt_version=trt.__version__,
                              gpu=gpu, precision=args.precision, workspace_bytes=args.workspace_mib << 20,
                              build_seconds=seconds, timing_cache=timing_cache)
        report_path = write_report(report, plan.parent / REPORT_FILE)
        built[stage.name], reports[stage.name] = plan, (report, report_path)
        print(f"{stage.name}: {plan} ({report['engine_bytes'] / 1e6:.2f} MB) in {seconds:.1f} s")
    if args.no_verify:
        print("verification skipped (--no-verify): the plans are unchecked")
        return 0

    result = verify_engines(args.model_repository, built, profiles, args)
    for report, report_path in reports.values():
        report["verification"] = result
        write_report(report, report_path)
    print(f"verification: {result['line']}")
    if not result["passed"]:
        for plan in built.values():  # never leave an engine Triton would serve that failed its check
            shutil.move(plan, plan.with_name(plan.name + REJECTED_SUFFIX))
        raise UserError(f"engines out of tolerance vs ONNX Runtime fp32: {'; '.join(result['failures'])}; plans "
                        f"renamed to *{REJECTED_SUFFIX}", exit_code=VERIFY_EXIT_CODE)
    print("verification passed")
    return 0
