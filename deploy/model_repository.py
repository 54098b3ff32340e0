"""`leukograph generate-repo`: the Triton model repository, generated from the one contract.

Layout (both backends)::

    <repository>/cell_detector/config.pbtxt       + 1/model.py (python step) & model.onnx  | 1/model.plan
    <repository>/crop_embedder/config.pbtxt       + 1/model.py (python step) & model.onnx  | 1/model.plan
    <repository>/cell_graph/config.pbtxt          + 1/model.py (python step) & model.onnx  | 1/model.plan
    <repository>/leukocyte_pipeline/config.pbtxt  + 1/ (empty version folder the ensemble needs)
    <repository>/leukocyte_pipeline_boxes/config.pbtxt  + 1/

Two ensembles share the steps: ``leukocyte_pipeline`` takes a bare FRAME, runs cell_detector, then crop_embedder and
cell_graph on the detector's first CELL_COUNT boxes, and returns the detector's BOXES / SCORES / KINDS / CELL_COUNT
with PROBS / LABELS (the client's default, ``--localizer server``); ``leukocyte_pipeline_boxes`` takes FRAME, the
client's BOXES and CELL_COUNT (the classical localiser, ``--localizer client``).

Backends:

* ``onnxruntime`` (default; CPU, dev, CI): ``backend: "python"``; the version folder holds ``model.py``, a shim onto
  ``leukograph.deploy.python_step``, which runs ``model.onnx`` (same folder) with ONNX Runtime and validates every
  request against the contract. This is what the committed ``model_repository/`` holds.
* ``tensorrt`` (NVIDIA's Triton container, GPU): ``platform: "tensorrt_plan"``, ``1/model.plan`` built on the target
  by ``leukograph build-engines`` (its optimisation profiles carry MAX_CELLS and MAX_FRAME_SIDE).
* ``pytorch`` (GPU machines with no TensorRT and no Triton container; used by ``deploy/bench_gpu.sh``):
  ``backend: "python"`` steps running ``deploy/python_step_torch.py``, i.e. the stage modules in PyTorch on CUDA (or
  CPU), traced to TorchScript beside it as ``1/model.pt`` (``write_torchscript``, on the serving machine, since the
  trace records the device). Not in ``BACKENDS``: an extra variant.

Batching: ``max_batch_size: 0`` - one request is one frame with its own number of cells N, so tensors keep their
natural shapes (FRAME [H,W,3], BOXES [N,4]). Batching frames would need padding to a common N and H,W plus masks,
or ragged batching, which needs a batch-index input through both graphs so that the kNN graph never joins cells of
different frames; neither exported graph has that, and a microscope sends a few frames per second, so there is
little to gain. Throughput comes from instances (below) and from the ensemble pipelining its steps.

Instances come from one setting, ``INSTANCES`` (``generate-repo --instances STAGE=N`` and ``bench --instances``
override it): two crop_embedder instances and one cell_graph, each with one ORT intra-op thread (config parameter
``ort_intra_op_threads``). crop_embedder (in-graph crop and CNN) is ~75% of a frame's server time: on a 2-core CPU two
instances let two frames' CNNs overlap (measured +15-40% sustained frames/s at concurrency 2-4, same latency at 1;
docs/bench/experiments/), while the ensemble runs cell_graph on frame t beside crop_embedder on frame t+1. On a GPU
two instances let one request's copies overlap another's compute on separate CUDA streams; cell_graph is a small
dense GNN over at most MAX_CELLS nodes, one instance suffices.

Precision (``--precision``, onnxruntime backend): ``fp32`` serves ``model.onnx`` in every step; ``int8`` serves the
crop_embedder's INT8 QDQ graph ``model.int8.onnx`` (``leukograph export --int8``, training/quantize.py) through the
step's ``onnx_file`` parameter, and the cell_graph stays FP32 (README "INT8"). ``DEFAULT_PRECISION`` is what the
committed repository holds.

Configs are built as data: ``ModelConfig`` protobuf messages (tritonclient's bundled ``model_config_pb2``) written
with ``google.protobuf.text_format``; nothing edits config text.

Version identifiers (named apart in ``leukograph.client.contract``): ``weights_id`` - which trained weights the
models come from - is an ensemble config parameter, so every client reads it from the server and records it;
``repository_digest(repository)`` hashes the served model files (sha256) into one string, and ``write_digest`` stores
it with the per-file hashes in ``<repository>/leukocyte_pipeline/1/version.json`` (gitignored).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from leukograph.client import contract
from leukograph.client.contract import (
    CONFIG_FILE,
    MODEL_FILES,
    PIPELINE,
    PIPELINE_STEPS,
    PIPELINES,
    SERVED_STAGES,
    STAGES,
    VERSION_DIR,
    VERSION_FILE,
    StageSpec,
    TensorSpec,
    stage_path,
)
from leukograph.client.errors import UserError
from leukograph.deploy.paths import DETECTOR_WEIGHTS, MODEL_REPOSITORY, WEIGHTS_DIR, detector_weights_dir

BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "int8")
DEFAULT_PRECISION = "fp32"
# The INT8 ONNX Runtime graph of each stage that has one (training/quantize.py INT8_FILES["onnxruntime"]).
INT8_ONNX_FILES = {contract.CROP_EMBEDDER.name: "model.int8.onnx"}
EXTRA_BACKENDS = ("pytorch",)  # python-backend steps in PyTorch (deploy/bench_gpu.sh); not for the committed repo
DEFAULT_ORT_THREADS = 1
# see the module docstring
INSTANCES = {contract.CELL_DETECTOR.name: 1, contract.CROP_EMBEDDER.name: 2, contract.CELL_GRAPH.name: 1}
# Kept with the committed repository: ONNX files, plans and version.json are build products.
REPOSITORY_GITIGNORE = "".join(f"*/{VERSION_DIR}/{name}\n" for name in (
    MODEL_FILES["onnxruntime"], MODEL_FILES["onnxruntime"] + ".data", MODEL_FILES["tensorrt"], VERSION_FILE,
    "model.int8*.onnx"))
GITKEEP = ".gitkeep"


def model_file(backend: str) -> str:
    return MODEL_FILES[backend]
STEP_FILE = "model.py"  # the python backend's entry point in a version folder


def _header(backend: str) -> str:
    return (f"# Generated by `leukograph generate-repo --backend {backend}` from leukograph.client.contract; "
            "do not edit.\n# One request = one frame with N cells (max_batch_size 0); instance counts: INSTANCES in "
            "deploy/model_repository.py.\n")


def _tensors(field, specs: tuple[TensorSpec, ...]) -> None:
    for spec in specs:
        field.add(name=spec.name, data_type=pb.DataType.Value(spec.triton_dtype), dims=list(spec.shape))


def _set_parameters(config: pb.ModelConfig, values: dict[str, object]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def _limits() -> dict[str, object]:
    """The contract's limits, visible in every config (and checked against the contract by the python step)."""
    return {"max_cells": contract.MAX_CELLS, "min_frame_side": contract.MIN_FRAME_SIDE,
            "max_frame_side": contract.MAX_FRAME_SIDE}


def onnx_file(stage: StageSpec | str, precision: str = DEFAULT_PRECISION) -> str:
    """The ONNX file a python-backend step serves at `precision` (stages without an INT8 graph stay FP32)."""
    name = stage if isinstance(stage, str) else stage.name
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return INT8_ONNX_FILES.get(name, MODEL_FILES["onnxruntime"]) if precision == "int8" else MODEL_FILES["onnxruntime"]


def stage_config(stage: StageSpec, backend: str, ort_threads: int = DEFAULT_ORT_THREADS,
                 instances: dict[str, int] | None = None, precision: str = DEFAULT_PRECISION) -> pb.ModelConfig:
    """The ModelConfig of one step."""
    config = pb.ModelConfig(name=stage.name, max_batch_size=0)
    _tensors(config.input, stage.inputs)
    _tensors(config.output, stage.outputs)
    count = {**INSTANCES, **(instances or {})}[stage.name]
    if backend == "tensorrt":
        config.platform = "tensorrt_plan"
        config.default_model_filename = MODEL_FILES[backend]
        config.instance_group.add(count=count, kind=pb.ModelInstanceGroup.KIND_GPU)
        _set_parameters(config, _limits())
        return config
    # python-backend steps; KIND_CPU for pytorch too: the step moves tensors to CUDA itself (any python-backend build)
    config.backend = "python"
    config.instance_group.add(count=count, kind=pb.ModelInstanceGroup.KIND_CPU)
    if backend == "onnxruntime":
        _set_parameters(config, {"onnx_file": onnx_file(stage, precision), "ort_intra_op_threads": ort_threads,
                                 **_limits()})
    else:  # pytorch: CUDA when present (torch_device auto, fixed by write_torchscript), else the CPU
        _set_parameters(config, {"checkpoint_file": MODEL_FILES[backend], "torch_device": "auto",
                                 "torch_threads": ort_threads, **_limits()})
    return config


def ensemble_config(backend: str, pipeline: StageSpec = PIPELINE) -> pb.ModelConfig:
    """An ensemble: its steps (`contract.PIPELINE_STEPS`) in order, e.g. cell_detector(FRAME) -> crop_embedder(FRAME,
    BOXES, CELL_COUNT) -> cell_graph(EMBEDDINGS, BOXES, FRAME_SIZE, CELL_COUNT)."""
    config = pb.ModelConfig(name=pipeline.name, platform="ensemble", max_batch_size=0)
    _tensors(config.input, pipeline.inputs)
    _tensors(config.output, pipeline.outputs)
    for stage in PIPELINE_STEPS[pipeline.name]:
        step = config.ensemble_scheduling.step.add(model_name=stage.name, model_version=-1)
        # Every tensor keeps its contract name across steps, so each map is the identity.
        for name in stage.input_names:
            step.input_map[name] = name
        for name in stage.output_names:
            step.output_map[name] = name
    _set_parameters(config, {"backend_variant": backend, contract.WEIGHTS_ID_KEY: weights_id(), **_limits()})
    return config


def config_text(config: pb.ModelConfig, backend: str) -> str:
    return _header(backend) + text_format.MessageToString(config)


def read_config(path: Path) -> pb.ModelConfig:
    """A config.pbtxt parsed into a ModelConfig message."""
    return text_format.Parse(Path(path).read_text(), pb.ModelConfig())


def write_config(path: Path, config: pb.ModelConfig, backend: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = config_text(config, backend)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def weights_id(weights_dir: Path | None = None) -> str:
    """`contract.weights_id` of the checkpoints the repository is exported from: the CNN, the GNN and the detector
    that finds the cells (the released one when the folder has none, as `export` does). It goes into the ensemble
    config, so a remote client records which trained models found and labelled each cell; `generate-repo` after new
    weights updates it, and the no-drift test catches a config left behind."""
    directory = Path(weights_dir or WEIGHTS_DIR)
    return contract.weights_id([directory / "cnn.pt", directory / "gnn.pt",
                                detector_weights_dir(directory) / DETECTOR_WEIGHTS])


def render(backend: str = "onnxruntime", ort_threads: int = DEFAULT_ORT_THREADS,
           instances: dict[str, int] | None = None, precision: str = DEFAULT_PRECISION) -> dict[str, str]:
    """Every generated text file, by path relative to the repository (the no-drift test compares these)."""
    if backend not in BACKENDS + EXTRA_BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS + EXTRA_BACKENDS)}")
    unknown = set(instances or {}) - {s.name for s in SERVED_STAGES}
    if unknown or any(count < 1 for count in (instances or {}).values()):
        raise UserError("instances must be STAGE=N with N >= 1 and STAGE among "
                        f"{', '.join(s.name for s in SERVED_STAGES)}")
    if precision != "fp32" and backend != "onnxruntime":
        raise UserError(f"--precision {precision} is for the onnxruntime backend; TensorRT's INT8 engine comes from "
                        "`leukograph build-engines --precision int8-qdq`")
    files = {f"{s.name}/{CONFIG_FILE}": config_text(stage_config(s, backend, ort_threads, instances, precision),
                                                    backend) for s in SERVED_STAGES}
    for pipeline in PIPELINES:
        files[f"{pipeline.name}/{CONFIG_FILE}"] = config_text(ensemble_config(backend, pipeline), backend)
        files[f"{pipeline.name}/{VERSION_DIR}/{GITKEEP}"] = ""
    files[".gitignore"] = REPOSITORY_GITIGNORE
    if backend in ("onnxruntime", "pytorch"):
        files.update({f"{s.name}/{VERSION_DIR}/{STEP_FILE}": step_shim(backend) for s in SERVED_STAGES})
    return files


def step_shim(backend: str) -> str:
    """The python backend's model.py: a two-line shim onto the installed package (the stub runs the environment's
    python3, where leukograph is installed), so the step's code exists once."""
    module = "python_step" if backend == "onnxruntime" else "python_step_torch"
    return (f'"""Generated by `leukograph generate-repo --backend {backend}`; the step is '
            f'leukograph.deploy.{module}."""\n\n'
            f'from leukograph.deploy.{module} import TritonPythonModel  # noqa: F401\n')


def generate(repository: Path = MODEL_REPOSITORY, backend: str = "onnxruntime",
             ort_threads: int = DEFAULT_ORT_THREADS, instances: dict[str, int] | None = None,
             precision: str = DEFAULT_PRECISION) -> list[Path]:
    """Write the configs (and python steps); keep model files; drop the other backend's step files."""
    if ort_threads < 1:
        raise UserError(f"--ort-threads must be >= 1, got {ort_threads}")
    written = []
    for rel, text in render(backend, ort_threads, instances, precision).items():
        path = repository / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    if backend == "tensorrt":  # a stale model.py would be confusing next to a plan
        for stage in SERVED_STAGES:
            stage_path(repository, stage, STEP_FILE).unlink(missing_ok=True)
    return written


def backend_of(repository: Path) -> str:
    """Which variant a repository holds, read from the crop_embedder config."""
    path = repository / contract.CROP_EMBEDDER.name / CONFIG_FILE
    if not path.exists():
        raise UserError(f"{repository} is not a leukograph model repository (no {path.relative_to(repository)})")
    config = read_config(path)
    if config.platform == "tensorrt_plan":
        return "tensorrt"
    return "pytorch" if "torch_device" in config.parameters else "onnxruntime"


def served_files(repository: Path) -> dict[str, str]:
    """{step: the model file its config serves} (onnx_file of python steps; the plan / TorchScript file otherwise)."""
    backend = backend_of(repository)
    files = {}
    for stage in SERVED_STAGES:
        parameters = read_config(repository / stage.name / CONFIG_FILE).parameters
        files[stage.name] = (parameters["onnx_file"].string_value if backend == "onnxruntime"
                             and "onnx_file" in parameters else MODEL_FILES[backend])
    return files


def precision_of(repository: Path) -> str:
    """`int8` when a step serves its INT8 graph, else `fp32` (of an onnxruntime repository)."""
    files = served_files(repository)
    return "int8" if any(files[name] == file for name, file in INT8_ONNX_FILES.items()) else "fp32"


def set_precision(repository: Path, precision: str) -> bool:
    """Point an onnxruntime repository's steps at their `precision` ONNX files (configs edited as data, every other
    setting kept); True when a config changed."""
    if backend_of(repository) != "onnxruntime":
        raise UserError(f"--precision is for an onnxruntime repository; {repository} holds {backend_of(repository)}")
    changed = False
    for stage in STAGES:
        path = repository / stage.name / CONFIG_FILE
        config = read_config(path)
        wanted = onnx_file(stage, precision)
        if config.parameters["onnx_file"].string_value != wanted:
            config.parameters["onnx_file"].string_value = wanted
            write_config(path, config, "onnxruntime")
            changed = True
    return changed


def instance_counts(repository: Path) -> dict[str, int]:
    """{step: instances} as the repository's configs say (what the server will run)."""
    return {stage.name: sum(group.count for group in read_config(repository / stage.name / CONFIG_FILE)
                            .instance_group) for stage in SERVED_STAGES}


def write_torchscript(weights_dir: Path, repository: Path = MODEL_REPOSITORY, device: str = "auto") -> dict[str, Path]:
    """The `pytorch` variant's model files: each stage module traced to TorchScript on `device` (auto: CUDA if present).

    Sets the configs' torch_device to the traced device. Traced with two different frame sizes and cell counts and
    checked against eager, since a trace silently freezes anything that is not a tensor operation. The detector works
    at the field scale of the repository's ONNX detector (`detector.field_scale_of`; 1 without one)."""
    import warnings

    import torch  # heavy: only here

    from leukograph.training.checkpoints import load_models
    from leukograph.training.detector import DetectorStage, detector_onnx_path, field_scale_of, load_detector
    from leukograph.training.models import CellGraphStage, CropEmbedderStage

    target = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    embedder, gnn, _ = load_models(Path(weights_dir))
    crop_stage = CropEmbedderStage(embedder).eval().to(target)
    graph_stage = CellGraphStage(gnn).eval().to(target)
    scale = field_scale_of(detector_onnx_path(repository))
    detector_stage = DetectorStage(load_detector(detector_weights_dir(Path(weights_dir))),
                                   field_scale=scale).eval().to(target)
    rng = np.random.default_rng(0)

    def example(height: int, width: int, rows: int, cells: int) -> list:  # crop_embedder's FRAME, BOXES, CELL_COUNT
        feed = contract.example_feed(contract.CROP_EMBEDDER, rows, cells, height, width, rng)
        return [torch.from_numpy(value).to(target) for value in feed.values()]

    written = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: the second-size check below is what counts
        frame, boxes, count = example(240, 320, 6, 6)
        traced_detector = torch.jit.trace(detector_stage, (frame,), check_trace=False)
        traced_crop = torch.jit.trace(crop_stage, (frame, boxes, count), check_trace=False)
        embeddings, frame_size = crop_stage(frame, boxes, count)
        traced_graph = torch.jit.trace(graph_stage, (embeddings, boxes, frame_size, count), check_trace=False)
        # Other sizes: the trace must not have frozen them, nor the cell count (the last 3 rows are padding).
        frame, boxes, count = example(300, 410, 17, 14)
        want_b, *_ = detector_stage(frame)
        got_b, *_ = traced_detector(frame)
        want_e, want_s = crop_stage(frame, boxes, count)
        got_e, got_s = traced_crop(frame, boxes, count)
        want_p, _ = graph_stage(want_e, boxes, want_s, count)
        got_p, _ = traced_graph(want_e, boxes, want_s, count)
        if not (torch.allclose(want_b, got_b, atol=1e-3) and torch.allclose(want_e, got_e, atol=1e-4)
                and torch.equal(want_s, got_s) and torch.allclose(want_p, got_p, atol=1e-5) and len(got_p) == 14):
            raise UserError("TorchScript trace of the stages differs from eager on a second input size")
    for stage, module in ((contract.CELL_DETECTOR, traced_detector), (contract.CROP_EMBEDDER, traced_crop),
                          (contract.CELL_GRAPH, traced_graph)):
        path = stage_path(repository, stage, MODEL_FILES["pytorch"])
        path.parent.mkdir(parents=True, exist_ok=True)
        module.save(str(path))
        config_path = repository / stage.name / CONFIG_FILE
        config = read_config(config_path)
        config.parameters["torch_device"].string_value = target.type  # the device the trace recorded
        write_config(config_path, config, "pytorch")
        written[stage.name] = path
    return written


def digest_info(repository: Path = MODEL_REPOSITORY) -> dict:
    """Per-stage model file and sha256, plus the combined `repository_digest`."""
    backend = backend_of(repository)
    files = served_files(repository)
    models = {}
    for stage in SERVED_STAGES:
        path = stage_path(repository, stage, files[stage.name])
        if not path.exists():
            raise UserError(f"{path} is missing: run `leukograph export`{' --int8' if 'int8' in path.name else ''} "
                            "(or build-engines for tensorrt)")
        models[stage.name] = {"file": str(path.relative_to(repository)), "sha256": contract.file_sha256(path)}
    digest = contract.repository_digest(backend, [m["sha256"] for m in models.values()])
    return {contract.REPOSITORY_DIGEST_KEY: digest, "backend": backend, "models": models}


def repository_digest(repository: Path = MODEL_REPOSITORY) -> str:
    """One string naming exactly the served model files, e.g. 'leukocyte_pipeline-onnxruntime-3f2a9c01b7de'."""
    return digest_info(repository)[contract.REPOSITORY_DIGEST_KEY]


def write_digest(repository: Path = MODEL_REPOSITORY) -> Path:
    """Store digest_info as <repository>/leukocyte_pipeline/1/version.json (gitignored)."""
    path = stage_path(repository, PIPELINE, VERSION_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(digest_info(repository), indent=2) + "\n")
    return path


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write the Triton model repository configs", add_help=add_help)
    parser.add_argument("--backend", choices=BACKENDS + EXTRA_BACKENDS, default="onnxruntime",
                        help="onnxruntime: python-backend steps on CPU (default); tensorrt: plans on GPU; "
                             "pytorch: python-backend steps in PyTorch (CUDA if present; deploy/bench_gpu.sh)")
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    parser.add_argument("--ort-threads", type=int, default=DEFAULT_ORT_THREADS,
                        help="ONNX Runtime intra-op threads per python-backend instance")
    parser.add_argument("--instances", type=instances_arg, action="append", metavar="STAGE=N",
                        help=f"instances of a step (repeatable; default {instances_text(INSTANCES)})")
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help="onnxruntime backend: int8 serves the crop_embedder's INT8 graph (`leukograph export "
                             "--int8`); the cell_graph stays fp32 (default %(default)s)")
    return parser


def instances_arg(value: str) -> tuple[str, int]:
    """`STAGE=N` of `--instances` (generate-repo and bench)."""
    stage, _, count = value.partition("=")
    if stage not in INSTANCES or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"expected STAGE=N with STAGE among {', '.join(INSTANCES)} and N >= 1, "
                                         f"got {value!r}")
    return stage, int(count)


def instances_text(instances: dict[str, int]) -> str:
    return ", ".join(f"{stage}={count}" for stage, count in instances.items())


def main(args: argparse.Namespace) -> int:
    repository: Path = args.model_repository
    for path in generate(repository, args.backend, args.ort_threads, dict(args.instances or []), args.precision):
        print(path)
    if args.backend == "tensorrt":
        print("next: build the plans on the target GPU with `leukograph build-engines`")
    elif args.backend == "pytorch":
        for path in write_torchscript(WEIGHTS_DIR, repository).values():
            print(path)
        print(f"repository digest: {repository_digest(repository)}")
        write_digest(repository)
    elif all(stage_path(repository, name, file).exists() for name, file in served_files(repository).items()):
        print(f"repository digest: {repository_digest(repository)}")
        write_digest(repository)
    else:
        print(f"next: `leukograph export{' --int8' if args.precision == 'int8' else ''}` writes the model files "
              "(`leukograph serve` does it when missing)")
    return 0
