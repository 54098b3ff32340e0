"""`leukograph` console entry point.

Each subcommand lives in its own module with `get_args_parser()` and `main(args)`, imported only when
that subcommand runs, so the edge client (no torch) can still run `stream` and `report`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from leukograph.client.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("leukograph.deploy.demo", "main job: start the CPU Triton server, stream sample frames, count"),
    "train": ("leukograph.training.train", "train the CNN crop embedder and the cell-graph GNN"),
    "evaluate": ("leukograph.training.evaluate", "evaluate baseline, CNN-only and CNN+GNN on held-out data"),
    "export": ("leukograph.training.export", "export the three stages to ONNX in the model repository"),
    "train-detector": ("leukograph.training.detector_train", "train the learned cell detector (frames -> boxes)"),
    "export-detector": ("leukograph.training.detector", "export the cell detector to ONNX in the model repository"),
    "classify": ("leukograph.training.classify", "localise and classify every cell in image files"),
    "fetch-data": ("leukograph.training.datasets", "download the public BCCD dataset"),
    "localize-eval": ("leukograph.training.localize_eval", "measure the cell localiser against BCCD boxes"),
    "tradeoff": ("leukograph.training.tradeoff", "accuracy per source against ms per cell, per CNN checkpoint"),
    "framing": ("leukograph.training.framing", "classify's answer on PBC cells framed as other labs frame them"),
    "generate-repo": ("leukograph.deploy.model_repository", "write Triton configs (onnxruntime or tensorrt)"),
    "serve": ("leukograph.deploy.server", "start a real CPU Triton server on the model repository"),
    "build-engines": ("leukograph.build_engines.build", "compile FP16 TensorRT engines (needs TensorRT)"),
    "stream": ("leukograph.client.stream", "stream a camera/video/folder through Triton, count cells"),
    "report": ("leukograph.client.report", "export a sample's results: CSV, JSON, HL7 v2.5.1 or FHIR R4"),
    "review": ("leukograph.client.review.app", "review station: verify, reclassify, sign off in the browser"),
    "adapt": ("leukograph.training.adapt", "fine-tune on signed samples' verified cells (a lab's microscope)"),
    "bench": ("leukograph.deploy.bench.cli", "latency benchmark: Triton end to end against alternatives"),
    "soak": ("leukograph.deploy.soak", "memory and latency over time: stream a loopback camera through a server"),
}


def _usage() -> str:
    lines = ["usage: leukograph COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `leukograph COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"leukograph: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"leukograph {command}: missing dependency ({exc.name or exc}); "
              "install the extra it needs, e.g. pip install 'leukograph[train,serve]'", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"leukograph {command}", description=help_,
                                     parents=[module.get_args_parser(add_help=False)])
    args = parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except UserError as exc:
        print(f"leukograph {command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"leukograph {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
