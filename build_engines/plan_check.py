"""Before Triton loads the plans: were they built by the TensorRT the server runs, for this GPU, and do their
optimisation profiles accept exactly what the served configs advertise?

    leukograph build-engines --check-plans [--model-repository R] [--serving-tensorrt-version V]
                             [--serving-compute-capability X.Y]
    python -m leukograph.build_engines.plan_check  (same flags)

Exit 0 and one OK line per stage, or one line naming every problem and exit code 4. Reads only files: each stage's
`1/model.plan`, the `1/build_report.json` written with it (TensorRT version, compute capability, profile limits, plan
sha256) and `config.pbtxt` (parsed with protobuf's text_format into Triton's ModelConfig). Why versions must match:
see compat.py (TensorRT "Version Compatibility"; triton-inference-server/server issue #7613).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from leukograph.build_engines.compat import plans_match, same_compute_capability, serving_tensorrt_version
from leukograph.build_engines.profiles import CONFIG_LIMIT_KEYS, limit_disagreements
from leukograph.build_engines.runner import REPORT_FILE, read_build_report
from leukograph.client.contract import STAGES, StageSpec
from leukograph.client.errors import UserError, run_module
from leukograph.deploy.paths import MODEL_REPOSITORY

PLAN_FILE = "model.plan"
CHECK_EXIT_CODE = 4


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def config_limits(config_path: Path) -> dict[str, int]:
    """The advertised limits (max_cells, min_frame_side, max_frame_side) of a config.pbtxt."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    return {key: int(config.parameters[key].string_value) for key in CONFIG_LIMIT_KEYS if key in config.parameters}


def check_stage(repository: Path, stage: StageSpec, serving_version: str,
                serving_compute_capability: str | None) -> tuple[list[str], str]:
    """(problems, summary) for one stage."""
    plan = repository / stage.name / "1" / PLAN_FILE
    if not plan.exists():
        return [f"{stage.name}: no {plan}"], ""
    report = read_build_report(plan)
    if report is None:
        return [f"{stage.name}: no readable {REPORT_FILE} beside {plan}, so which TensorRT built it is unknown; "
                f"rebuild with `leukograph build-engines`"], ""
    problems = []
    if report.get("plan_sha256") != sha256(plan):
        problems.append(f"{stage.name}: {REPORT_FILE} describes another plan (sha256 differs); rebuild")
    built = str(report.get("tensorrt_version"))
    if not plans_match(built, serving_version):
        problems.append(f"{stage.name}: plan built with TensorRT {built}, the server runs TensorRT {serving_version} "
                        f"(a plan loads only on the TensorRT that built it); rebuild in the serving container")
    built_cc = report.get("compute_capability") or (report.get("gpu") or {}).get("compute_capability")
    if same_compute_capability(built_cc, serving_compute_capability) is False:
        problems.append(f"{stage.name}: plan built for compute capability {built_cc}, the serving GPU is "
                        f"{serving_compute_capability}; rebuild on the serving GPU")
    verification = report.get("verification") or {}
    if verification.get("passed") is False:
        problems.append(f"{stage.name}: the plan failed verification against ONNX Runtime")
    config = repository / stage.name / "config.pbtxt"
    limits_note = "config.pbtxt not generated yet: limits not compared"
    if config.exists():
        for line in limit_disagreements(report.get("served_limits") or {}, config_limits(config)):
            problems.append(f"{stage.name}: {line}")
        limits_note = "profile = config limits"
    summary = (f"{stage.name}: OK, TensorRT {built} (server {serving_version}), compute {built_cc}, {limits_note}, "
               f"verification {'passed' if verification.get('passed') else 'not run'}")
    return problems, summary


def check_repository(repository: Path, serving_version: str, serving_compute_capability: str | None = None,
                     stages: tuple[StageSpec, ...] = STAGES) -> tuple[list[str], list[str]]:
    """(problems, OK summaries) over `stages`."""
    problems, summaries = [], []
    for stage in stages:
        found, summary = check_stage(repository, stage, serving_version, serving_compute_capability)
        problems += found
        if not found:
            summaries.append(summary)
    return problems, summaries


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--check-plans: may Triton load these plans?")
    group.add_argument("--serving-tensorrt-version", default=None, metavar="VERSION",
                       help="the TensorRT version of the serving Triton (default: $TRT_VERSION, else the libnvinfer "
                            "found on the library path)")
    group.add_argument("--serving-compute-capability", default=None, metavar="X.Y",
                       help="the serving GPU's compute capability (default: this machine's GPU, when there is one)")


def run_check(repository: Path, serving_version: str | None, serving_compute_capability: str | None) -> int:
    """The CLI action: print OK lines, or raise UserError (exit CHECK_EXIT_CODE) naming every problem."""
    version, source = serving_tensorrt_version(serving_version)
    if version is None:
        raise UserError(f"cannot tell which TensorRT the server runs: {source}", exit_code=CHECK_EXIT_CODE)
    if serving_compute_capability is None:
        from leukograph.build_engines.build import gpu_info

        serving_compute_capability = gpu_info()["compute_capability"]
    problems, summaries = check_repository(repository, version, serving_compute_capability)
    if problems:
        raise UserError(f"plans in {repository} must not be served: {'; '.join(problems)}",
                        exit_code=CHECK_EXIT_CODE)
    for line in summaries:
        print(line)
    print(f"server TensorRT {version} from {source}")
    return 0


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Check that Triton may load the TensorRT plans of a repository",
                                     add_help=add_help)
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    add_check_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    return run_check(args.model_repository, args.serving_tensorrt_version, args.serving_compute_capability)


if __name__ == "__main__":
    run_module(main, get_args_parser(), "plan_check")
