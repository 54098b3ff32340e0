"""`leukograph build-engines`: TensorRT engines for both served stages, verified against ONNX Runtime fp32.

Where TensorRT comes from. Needs TensorRT 10.x's Python package (`tensorrt`) and, for verification, pycuda and a CUDA
GPU. pyproject.toml's `[tensorrt]` extra names them (`tensorrt>=10`, `pycuda`, `polygraphy`), but PyPI's `tensorrt`
packages fetch their libraries from NVIDIA's own package index, so the extra installs only where that index is
reachable, and `tensorrt>=10` is not enough anyway: a plan loads only on the exact TensorRT version that built it
(compat.py). Build where the plans will be served - inside the serving Triton container release, with the `tensorrt`
package of exactly the TensorRT version that container ships (`pip install tensorrt==<that version>`) - and check
with `leukograph build-engines --check-plans` before starting Triton. On machines without TensorRT this command prints
one line naming what is missing and exits non-zero; `--check-only` runs the CPU-side checks (TensorRT ONNX operator
table) without TensorRT.

Per stage it reads `<repository>/<stage>/1/model.onnx` (written by `leukograph export`) and writes
`<repository>/<stage>/1/model.plan` plus `<repository>/<stage>/1/build_report.json` (TensorRT version, compute
capability, profiles and the limits they admit, timing-cache outcome, verification).

Precision (`--precision`). Every network is strongly typed (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`, TensorRT 10
Developer Guide "Strongly Typed Networks"): TensorRT computes each tensor in the type the ONNX graph gives it, and no
precision builder flag is set.
  fp16      the FP16 ONNX made by fp16.py (fp32 I/O, coordinates fp32). Not `BuilderFlag.FP16`, which is deprecated in
            TensorRT 10 and removed in 11 (10.x -> 11 migration notes).
  fp32      the fp32 ONNX with `BuilderFlag.TF32` cleared: TF32 is on by default in a builder config (IBuilderConfig /
            BuilderFlag.TF32 reference), so without this an "fp32" engine on Ampere or newer runs TF32 matmuls/convs.
  tf32      the fp32 ONNX with TensorRT's default TF32 left on, and named so.
  int8-qdq  explicit quantisation (int8.py): the QDQ graph `export --int8` wrote
            (crop_embedder/1/model.int8.tensorrt.onnx) or `--qdq-onnx STAGE=PATH`, same I/O as the contract, built
            strongly typed with TF32 off (Developer Guide, "Explicit Quantization"); the Q/DQ placement is checked
            first (onnx_ops.check_qdq). A stage without a QDQ graph (the cell_graph) builds from its FP32 graph.
            Verified against ONNX Runtime FP32 with int8.INT8_TOLERANCE.

TensorRT 10 Python API used (TensorRT 10.x "Python API" reference):
  trt.Builder(logger); builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED));
  trt.OnnxParser(network, logger).parse_from_file(path), parser.num_errors / get_error(i);
  builder.create_builder_config(); config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, bytes);
  config.clear_flag(trt.BuilderFlag.TF32) / config.get_flag(...); builder.create_optimization_profile().set_shape(name,
  min, opt, max); config.add_optimization_profile(profile); config.create_timing_cache(blob),
  config.set_timing_cache(cache, ignore_mismatch=False) -> bool, cache.serialize() (timing_cache.py);
  builder.build_serialized_network(network, config). Not run on a GPU yet.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import onnx

from leukograph.build_engines import fp16, int8, timing_cache, verify
from leukograph.build_engines.compat import check_supported
from leukograph.build_engines.frame_samples import largest_frame_samples
from leukograph.build_engines.onnx_ops import check_trt_compat, tensorrt_table_version
from leukograph.build_engines.plan_check import add_check_arguments, run_check, sha256
from leukograph.build_engines.profiles import Profiles, add_profile_arguments, contract_limits, profiles_from_args
from leukograph.build_engines.runner import REPORT_FILE, TensorRtUnavailable
from leukograph.client.contract import (
    CELL_DETECTOR,
    DETECTOR_FP32_AFTER,
    MODEL_FILES,
    SERVED_STAGES,
    STAGES,
    StageSpec,
    stage_path,
)
from leukograph.client.errors import UserError
from leukograph.deploy.paths import MODEL_REPOSITORY, REPO_ROOT, write_atomically

PLAN_FILE, REJECTED_SUFFIX = MODEL_FILES["tensorrt"], ".failed-verification"
PRECISIONS = ("fp16", "fp32", "tf32", "int8-qdq")
DEFAULT_WORK_DIR = REPO_ROOT / "build" / "tensorrt"  # FP16 ONNX graphs and timing caches (build products)
DEFAULT_WORKSPACE_MIB = 2048
DEFAULT_LARGEST_FRAME_SAMPLES = 8
VERIFY_EXIT_CODE = 3


# ---- environment ----------------------------------------------------------------------------------------------
def import_tensorrt():
    """The tensorrt module, if it is a supported version (compat.check_supported), or UserError with one line."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError when libnvinfer / libnvonnxparser.so is missing
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise TensorRtUnavailable(f"TensorRT Python package not importable: {detail}; run inside the serving Triton "
                                  f"container (nvcr.io/nvidia/tritonserver:<yy.mm>-py3) with `pip install "
                                  f"tensorrt==<its TensorRT version>`, or on JetPack") from None
    check_supported(str(trt.__version__))
    return trt


def gpu_info() -> dict:
    """GPU name and compute capability from nvidia-smi, else pycuda, else torch; fields None without a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()
        if out:
            name, cc, driver = (part.strip() for part in out[0].split(","))
            return {"name": name, "compute_capability": cc, "driver": driver, "source": "nvidia-smi"}
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        import pycuda.driver as cuda

        cuda.init()  # no context needed to read device attributes
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


def stage_dir(repository: Path, stage: StageSpec) -> Path:
    return stage_path(repository, stage)


# ---- the ONNX graph each precision builds from -------------------------------------------------------------------
def parse_qdq_arguments(values: list[str] | None) -> dict[str, Path]:
    """`STAGE=PATH` pairs of --qdq-onnx."""
    out = {}
    names = [s.name for s in STAGES]
    for value in values or []:
        stage, sep, path = value.partition("=")
        if not sep or stage not in names or not path:
            raise UserError(f"--qdq-onnx wants STAGE=PATH with STAGE one of {', '.join(names)}; got {value!r}")
        out[stage] = Path(path)
    return out


def check_qdq_graph(path: Path, reference: Path) -> None:
    """A QDQ graph for explicit quantisation: Q and DQ nodes, and the reference graph's inputs and outputs."""
    if not path.exists():
        raise UserError(f"--qdq-onnx {path} not found")
    model, ref = onnx.load(str(path), load_external_data=False), onnx.load(str(reference), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    if not {"QuantizeLinear", "DequantizeLinear"} <= ops:
        raise UserError(f"{path} has no QuantizeLinear/DequantizeLinear pair: not a QDQ graph for int8-qdq")

    def io(m: onnx.ModelProto) -> list[tuple[str, int]]:
        return [(v.name, v.type.tensor_type.elem_type) for v in list(m.graph.input) + list(m.graph.output)]

    if io(model) != io(ref):
        raise UserError(f"{path}: inputs/outputs {io(model)} differ from {reference}'s {io(ref)}")


def network_onnx(stage: StageSpec, onnx_path: Path, precision: str, work_dir: Path,
                 qdq_paths: dict[str, Path]) -> Path:
    """The ONNX file TensorRT parses for `precision` (see the module docstring)."""
    if precision == "fp16":  # the detector keeps its peak extraction and box decoding fp32
        return fp16.convert_file(onnx_path, work_dir / "onnx",
                                 fp32_after=DETECTOR_FP32_AFTER if stage is CELL_DETECTOR else None)
    if precision == "int8-qdq":
        path, is_qdq = int8.network_path(onnx_path.parent.parent.parent, stage, qdq_paths)
        if is_qdq:
            check_qdq_graph(path, onnx_path)
        return path
    return onnx_path


# ---- report -----------------------------------------------------------------------------------------------------
@dataclass
class EngineBuild:
    """What one build did, for the report."""

    seconds: float
    timing_cache: timing_cache.TimingCacheUse
    tf32: bool
    network_onnx: Path


def build_report(stage: StageSpec, onnx_path: Path, plan_path: Path, profiles: Profiles, *, tensorrt_version: str,
                 gpu: dict, precision: str, workspace_bytes: int, build: EngineBuild) -> dict:
    return {
        "stage": stage.name,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tensorrt_version": tensorrt_version,
        "compute_capability": gpu.get("compute_capability"),
        "gpu": gpu,
        "host": platform.node(),
        "precision": precision,
        "strongly_typed": True,
        "tf32": build.tf32,
        "workspace_bytes": workspace_bytes,
        "profiles": {name: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])}
                     for name, s in profiles.shapes(stage).items()},
        "profile_ranges": {k: v for k, v in profiles.to_json().items() if k != "per_input"},
        "served_limits": profiles.served_limits(),
        "contract_limits": contract_limits(),
        "covers_contract": profiles.covers_contract,
        "build_seconds": round(build.seconds, 3),
        "engine_bytes": plan_path.stat().st_size if plan_path.exists() else None,
        "plan_sha256": sha256(plan_path) if plan_path.exists() else None,
        "onnx": str(onnx_path),
        "onnx_sha256": sha256(onnx_path),
        "network_onnx": str(build.network_onnx),
        "network_onnx_sha256": sha256(build.network_onnx),
        "timing_cache": build.timing_cache.to_json(),
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
def build_engine(trt, stage: StageSpec, onnx_path: Path, plan_path: Path, profiles: Profiles, *,
                 precision: str = "fp16", workspace_bytes: int = DEFAULT_WORKSPACE_MIB << 20,
                 timing_cache_path: Path | None = None, timing_cache_off_reason: str = "",
                 verbose: bool = False) -> EngineBuild:
    """Parse `onnx_path` (already the graph for `precision`) into a strongly typed network, configure, build and
    write one plan. Raises only before the plan is written; after that, problems become report notes."""
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors))
        raise UserError(f"{stage.name}: TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    if sorted(inputs) != sorted(stage.input_names):
        raise UserError(f"{stage.name}: network inputs {sorted(inputs)} != contract {sorted(stage.input_names)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision in ("fp32", "int8-qdq"):  # int8-qdq: the layers left in float are FP32
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: "fp32" would otherwise be TF32 on Ampere+
    tf32 = bool(config.get_flag(trt.BuilderFlag.TF32))
    profile = builder.create_optimization_profile()
    shapes = profiles.shapes(stage)
    for name, tensor in inputs.items():
        if -1 in tuple(tensor.shape):
            if name not in shapes:
                raise UserError(f"{stage.name}: dynamic input {name} {tuple(tensor.shape)} has no profile")
            profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)
    cache_use = timing_cache.attach(config, timing_cache_path, timing_cache_off_reason)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise UserError(f"{stage.name}: build_serialized_network failed (see TensorRT log above)")
    write_atomically(plan_path, lambda tmp: tmp.write_bytes(bytes(serialized)))
    # From here on nothing raises: the caller writes the report next.
    return EngineBuild(seconds, timing_cache.save(cache_use), tf32, onnx_path)


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


def verification_error(exc: Exception) -> UserError:
    """One accurate line for an engine-runner failure during verification (exit VERIFY_EXIT_CODE)."""
    from leukograph.build_engines.runner import PlanLoadError, TensorRtUnavailable

    if isinstance(exc, TensorRtUnavailable):
        remedy = {"tensorrt Python package not importable": "install TensorRT's Python package",
                  "pycuda not importable": "install pycuda"}.get(exc.missing, "run on a machine with a CUDA GPU")
        return UserError(f"plans built but not verified: {exc}; {remedy}, or rerun with --no-verify",
                         exit_code=VERIFY_EXIT_CODE)
    if isinstance(exc, PlanLoadError):
        return UserError(f"plans built but cannot be loaded for verification: {exc}", exit_code=VERIFY_EXIT_CODE)
    return UserError(f"plans built but verification could not run them: {exc}", exit_code=VERIFY_EXIT_CODE)


def verify_engines(repository: Path, built: dict[str, Path], profiles: Profiles, args: argparse.Namespace) -> dict:
    """Engines vs ONNX Runtime fp32 on every held-out frame, and on some of them in the corner of the largest frame
    the profile admits; stages not built this run use their existing plan if one exists, else ORT (so a single stage
    can be verified alone)."""
    from leukograph.deploy.runners import TrtRunner

    reference = verify.ort_pipeline(repository)
    candidate = []
    detector = None
    try:
        if CELL_DETECTOR.name in built:  # the detector alone: its cells against ONNX Runtime's on the frames
            detector_engine = TrtRunner(built[CELL_DETECTOR.name], CELL_DETECTOR)
            try:
                detector = verify.detector_agreement(repository, detector_engine,
                                                     verification_samples(profiles, args.box_source, args.data_root))
            finally:
                detector_engine.engine.close()
        for stage, ort_stage in zip(STAGES, reference):
            plan = built.get(stage.name) or stage_dir(repository, stage) / PLAN_FILE
            candidate.append(TrtRunner(plan, stage) if plan.exists() else ort_stage)
        tolerances = (args.min_agreement, args.max_accuracy_drop, args.max_prob_diff, args.min_embedding_cosine)
        samples = verification_samples(profiles, args.box_source, args.data_root)
        comparison = verify.compare(reference, tuple(candidate), samples)
        failures = comparison.failures(*tolerances)
        largest = None
        big = largest_frame_samples(samples, profiles.height.max, profiles.width.max, args.largest_frame_samples)
        if big:
            at_max = verify.compare(reference, tuple(candidate), big)
            largest = {"frame": [profiles.height.max, profiles.width.max], "result": at_max.summary(),
                       "line": at_max.line(), "failures": at_max.failures(*tolerances)}
            failures += [f"at {profiles.height.max}x{profiles.width.max}: {f}" for f in largest["failures"]]
    finally:
        for runner in candidate:
            if isinstance(runner, TrtRunner):
                runner.engine.close()
    return {"reference": "onnxruntime fp32 CPU", "candidate": {s.name: type(c).__name__
                                                                for s, c in zip(STAGES, candidate)},
            "tolerances": {"min_class_agreement": args.min_agreement, "max_accuracy_drop": args.max_accuracy_drop,
                           "max_prob_diff": args.max_prob_diff, "min_embedding_cosine": args.min_embedding_cosine},
            "result": comparison.summary(), "line": comparison.line(), "largest_frame": largest,
            "detector": detector, "failures": failures + (detector or {}).get("failures", []),
            "passed": not failures and not (detector or {}).get("failures")}


# ---- CLI --------------------------------------------------------------------------------------------------------
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Build TensorRT engines (needs TensorRT 10.x and a GPU), or check "
                                                 "built plans against the serving Triton (--check-plans)",
                                     add_help=add_help)
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY,
                        help="reads <stage>/1/model.onnx, writes <stage>/1/model.plan and build_report.json")
    parser.add_argument("--stages", nargs="+", choices=[s.name for s in SERVED_STAGES],
                        default=[s.name for s in SERVED_STAGES])
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16",
                        help="fp16: FP16 ONNX, strongly typed; fp32: TF32 off; tf32: TF32 on (TensorRT's default); "
                             "int8-qdq: a QDQ ONNX per stage (--qdq-onnx)")
    parser.add_argument("--qdq-onnx", action="append", metavar="STAGE=PATH",
                        help="the QuantizeLinear/DequantizeLinear graph of a stage, for --precision int8-qdq")
    parser.add_argument("--workspace-mib", type=int, default=DEFAULT_WORKSPACE_MIB, help="builder workspace pool")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="FP16 ONNX graphs and timing caches (default %(default)s)")
    parser.add_argument("--no-timing-cache", action="store_true",
                        help="build without a timing cache (default: <work-dir>/timing-cache/"
                             "timing-trt<version>-sm<compute capability>.cache)")
    parser.add_argument("--verbose", action="store_true", help="TensorRT VERBOSE log")
    parser.add_argument("--check-only", action="store_true",
                        help="only check the ONNX graphs against TensorRT's ONNX operator table (no TensorRT needed)")
    parser.add_argument("--check-plans", action="store_true",
                        help="build nothing: check that the repository's plans were built by the server's TensorRT "
                             "version for this GPU and admit exactly the configs' limits (exit 4 if not)")
    add_check_arguments(parser)
    add_profile_arguments(parser)
    check = parser.add_argument_group("verification against ONNX Runtime fp32 on BCCD held-out frames")
    check.add_argument("--no-verify", action="store_true", help="skip it (the plans are then unchecked)")
    check.add_argument("--box-source", choices=("auto", "localize", "voc"), default="auto",
                       help="boxes: the project's localiser (auto: when importable) or the VOC annotations")
    check.add_argument("--data-root", default=None)
    check.add_argument("--largest-frame-samples", type=int, default=DEFAULT_LARGEST_FRAME_SAMPLES,
                       help="held-out frames also checked in the corner of the largest admitted frame "
                            "(default %(default)s; 0: none)")
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
    if args.check_plans:
        return run_check(args.model_repository, args.serving_tensorrt_version, args.serving_compute_capability)
    profiles = profiles_from_args(args)
    stages = [s for s in SERVED_STAGES if s.name in args.stages]
    if args.check_only:
        qdq_paths = parse_qdq_arguments(args.qdq_onnx) if args.precision == "int8-qdq" else {}
        graphs = {name: int8.network_path(args.model_repository, next(s for s in SERVED_STAGES if s.name == name),
                                          qdq_paths)[0] if args.precision == "int8-qdq" else path
                  for name, path in _onnx_paths(args.model_repository, stages).items()}
        problems = {name: check_trt_compat(path) for name, path in graphs.items()}
        for name, found in problems.items():
            print(f"{name}: {'OK' if not found else f'{len(found)} problem(s)'} against TensorRT "
                  f"{tensorrt_table_version()}'s ONNX operator table and Q/DQ rules ({graphs[name].name})")
            for line in found:
                print(f"  {line}")
        return 1 if any(problems.values()) else 0

    trt = import_tensorrt()  # one line and exit 2 when missing or unsupported
    qdq_paths = parse_qdq_arguments(args.qdq_onnx)
    if args.precision == "int8-qdq":
        int8.apply_tolerance(args)
    onnx_paths = _onnx_paths(args.model_repository, stages)
    networks = {}
    for stage in stages:
        networks[stage.name] = network_onnx(stage, onnx_paths[stage.name], args.precision, args.work_dir, qdq_paths)
        found = check_trt_compat(networks[stage.name])
        if found:
            raise UserError(f"{stage.name}: {len(found)} TensorRT incompatibilities in {networks[stage.name]}, first: "
                            f"{found[0]} (see `leukograph build-engines --check-only`)")
    gpu = gpu_info()
    cache_path = None if args.no_timing_cache else timing_cache.cache_file(
        args.work_dir / "timing-cache", str(trt.__version__), gpu["compute_capability"])
    cache_off = "--no-timing-cache" if args.no_timing_cache else "compute capability unknown: cache not keyed"
    print(f"TensorRT {trt.__version__} on {gpu['name'] or 'unknown GPU'} (compute {gpu['compute_capability']}), "
          f"{args.precision} strongly typed; frame {profiles.height.min}..{profiles.height.max} x "
          f"{profiles.width.min}..{profiles.width.max}, cells {profiles.cells.min}:{profiles.cells.opt}:"
          f"{profiles.cells.max}")
    if not profiles.covers_contract:
        print("note: the profiles are narrower than the configs advertise (" + "; ".join(
            profiles.config_disagreements(contract_limits())) + "); --check-plans fails until the configs agree")
    built: dict[str, Path] = {}
    reports: dict[str, tuple[dict, Path]] = {}
    for stage in stages:
        plan = stage_dir(args.model_repository, stage) / PLAN_FILE
        result = build_engine(trt, stage, networks[stage.name], plan, profiles, precision=args.precision,
                              workspace_bytes=args.workspace_mib << 20, timing_cache_path=cache_path,
                              timing_cache_off_reason=cache_off, verbose=args.verbose)
        report = build_report(stage, onnx_paths[stage.name], plan, profiles, tensorrt_version=str(trt.__version__),
                              gpu=gpu, precision=args.precision, workspace_bytes=args.workspace_mib << 20,
                              build=result)
        report_path = write_report(report, plan.parent / REPORT_FILE)
        built[stage.name], reports[stage.name] = plan, (report, report_path)
        cache = result.timing_cache
        print(f"{stage.name}: {plan} ({report['engine_bytes'] / 1e6:.2f} MB) in {result.seconds:.1f} s; timing "
              f"cache {cache.status}{' (saved)' if cache.saved else ''}{f': {cache.note}' if cache.note else ''}")
    if args.no_verify:
        print("verification skipped (--no-verify): the plans are unchecked")
        return 0

    from leukograph.build_engines.runner import EngineRunnerError

    try:
        result = verify_engines(args.model_repository, built, profiles, args)
    except EngineRunnerError as exc:
        error = verification_error(exc)
        for report, report_path in reports.values():
            report["verification"] = {"passed": None, "error": str(error)}
            write_report(report, report_path)
        raise error from None
    for report, report_path in reports.values():
        report["verification"] = result
        write_report(report, report_path)
    print(f"verification: {result['line']}")
    if result["largest_frame"]:
        print(f"at the largest frame {result['largest_frame']['frame']}: {result['largest_frame']['line']}")
    if not result["passed"]:
        for plan in built.values():  # never leave an engine Triton would serve that failed its check
            shutil.move(plan, plan.with_name(plan.name + REJECTED_SUFFIX))
        raise UserError(f"engines out of tolerance vs ONNX Runtime fp32: {'; '.join(result['failures'])}; plans "
                        f"renamed to *{REJECTED_SUFFIX}", exit_code=VERIFY_EXIT_CODE)
    print("verification passed")
    return 0
