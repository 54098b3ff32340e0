"""`leukograph generate-repo`: the Triton model repository, generated from the one contract.

Layout (both backends)::

    <repository>/crop_embedder/config.pbtxt       + 1/model.py (python step) & model.onnx  | 1/model.plan
    <repository>/cell_graph/config.pbtxt          + 1/model.py (python step) & model.onnx  | 1/model.plan
    <repository>/leukocyte_pipeline/config.pbtxt  + 1/ (empty version folder the ensemble needs)

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
little to gain. Throughput comes from instances (below) and from the ensemble pipelining the two steps.

Instances: on the 2-core CPU box one instance per step with one ORT intra-op thread each (config parameter
``ort_intra_op_threads``): the ensemble runs crop_embedder on frame t+1 while cell_graph runs on frame t, which keeps
both cores busy without oversubscribing them. On a GPU, two crop_embedder instances (the heavy step: in-graph crop
and CNN) let one request's copies overlap another's compute on separate CUDA streams; cell_graph is a small dense
GNN over at most MAX_CELLS nodes, one instance suffices.

Model version: ``model_version(repository)`` hashes the served model files (sha256) into one string; ``write_version``
stores it with the per-file hashes in ``<repository>/leukocyte_pipeline/1/version.json`` (gitignored) so a client on
the host can record which models produced a result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from leukograph.client import contract
from leukograph.client.contract import PIPELINE, STAGES, StageSpec, TensorSpec
from leukograph.client.errors import UserError
from leukograph.client.paths import MODEL_REPOSITORY, WEIGHTS_DIR

BACKENDS = ("onnxruntime", "tensorrt")
EXTRA_BACKENDS = ("pytorch",)  # python-backend steps in PyTorch (deploy/bench_gpu.sh); not for the committed repo
VERSION_DIR = "1"
VERSION_FILE = "version.json"
DEFAULT_ORT_THREADS = 1
GPU_INSTANCES = {contract.CROP_EMBEDDER.name: 2, contract.CELL_GRAPH.name: 1}
# CPU: two crop_embedder instances (the CNN is ~75% of a frame's server time) let two frames' CNNs overlap on the two
# cores: measured +15-40% sustained frames/s at concurrency 2-4, same latency at 1 (docs/bench/experiments/).
CPU_INSTANCES = {contract.CROP_EMBEDDER.name: 2, contract.CELL_GRAPH.name: 1}
# Kept with the committed repository: ONNX files, plans and version.json are build products.
REPOSITORY_GITIGNORE = "*/1/model.onnx\n*/1/model.onnx.data\n*/1/model.plan\n*/1/version.json\n"
GITKEEP = ".gitkeep"


def model_file(backend: str) -> str:
    return {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "pytorch": "model.pt"}[backend]


def _dims(spec: TensorSpec) -> str:
    return "[ " + ", ".join(str(d) for d in spec.shape) + " ]"


def _tensor_block(kind: str, tensors: tuple[TensorSpec, ...]) -> str:
    items = [f"  {{\n    name: \"{t.name}\"\n    data_type: {t.triton_dtype}\n    dims: {_dims(t)}\n  }}"
             for t in tensors]
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _parameters(values: dict[str, object]) -> str:
    return "".join(f"parameters {{\n  key: \"{k}\"\n  value: {{ string_value: \"{v}\" }}\n}}\n"
                   for k, v in values.items())


def _limits() -> dict[str, object]:
    """The contract's limits, visible in every config (and checked against the contract by the python step)."""
    return {"max_cells": contract.MAX_CELLS, "min_frame_side": contract.MIN_FRAME_SIDE,
            "max_frame_side": contract.MAX_FRAME_SIDE}


def stage_config(stage: StageSpec, backend: str, ort_threads: int = DEFAULT_ORT_THREADS) -> str:
    """config.pbtxt of one step."""
    head = f"# Generated by `leukograph generate-repo --backend {backend}` from leukograph.client.contract; " \
           "do not edit.\n"
    head += "# max_batch_size 0: one request = one frame with N cells (see deploy/model_repository.py docstring).\n"
    lines = [head, f"name: \"{stage.name}\"\n"]
    if backend in ("onnxruntime", "pytorch"):
        lines.append("backend: \"python\"\n")
    else:
        lines.append("platform: \"tensorrt_plan\"\n")
        lines.append(f"default_model_filename: \"{model_file(backend)}\"\n")
    lines.append("max_batch_size: 0\n")
    lines.append(_tensor_block("input", stage.inputs))
    lines.append(_tensor_block("output", stage.outputs))
    if backend == "onnxruntime":
        count = CPU_INSTANCES[stage.name]
        lines.append(f"# {count} instance(s) on a 2-core CPU: see CPU_INSTANCES in deploy/model_repository.py.\n")
        lines.append(f"instance_group [\n  {{\n    count: {count}\n    kind: KIND_CPU\n  }}\n]\n")
        params = {"onnx_file": model_file(backend), "ort_intra_op_threads": ort_threads, **_limits()}
    elif backend == "pytorch":
        # KIND_CPU: the step moves tensors to CUDA itself (works with any python-backend build).
        lines.append("# The step runs PyTorch on CUDA when present (torch_device auto), else on the CPU.\n")
        lines.append("instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n")
        params = {"checkpoint_file": model_file(backend), "torch_device": "auto", "torch_threads": ort_threads,
                  **_limits()}
    else:
        count = GPU_INSTANCES[stage.name]
        lines.append(f"# {count} instance(s) on the GPU: see deploy/model_repository.py docstring.\n")
        lines.append(f"instance_group [\n  {{\n    count: {count}\n    kind: KIND_GPU\n  }}\n]\n")
        params = _limits()
    lines.append(_parameters(params))
    return "".join(lines)


def ensemble_config(backend: str) -> str:
    """config.pbtxt of the ensemble: crop_embedder(FRAME, BOXES) -> cell_graph(EMBEDDINGS, BOXES, FRAME_SIZE)."""
    head = f"# Generated by `leukograph generate-repo --backend {backend}` from leukograph.client.contract; " \
           "do not edit.\n"
    lines = [head, f"name: \"{PIPELINE.name}\"\n", "platform: \"ensemble\"\n", "max_batch_size: 0\n",
             _tensor_block("input", PIPELINE.inputs), _tensor_block("output", PIPELINE.outputs)]
    steps = []
    for stage in STAGES:
        # Every tensor keeps its contract name across steps, so each map is the identity.
        inputs = "".join(f"      input_map {{\n        key: \"{n}\"\n        value: \"{n}\"\n      }}\n"
                         for n in stage.input_names)
        outputs = "".join(f"      output_map {{\n        key: \"{n}\"\n        value: \"{n}\"\n      }}\n"
                          for n in stage.output_names)
        steps.append(f"    {{\n      model_name: \"{stage.name}\"\n      model_version: -1\n{inputs}{outputs}    }}")
    lines.append("ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n")
    lines.append(_parameters({"backend_variant": backend, "model_version": weights_version(), **_limits()}))
    return "".join(lines)


def weights_version(weights_dir: Path | None = None) -> str:
    """`leukocyte_pipeline-weights-<sha256[:12]>` of the CNN and GNN checkpoints the repository is exported from.
    It goes into the ensemble config, so a remote client records which trained models labelled each cell;
    `generate-repo` after new weights updates it, and the no-drift test catches a config left behind."""
    directory = weights_dir or WEIGHTS_DIR
    digest = hashlib.sha256()
    for name in ("cnn.pt", "gnn.pt"):
        path = directory / name
        if not path.exists():
            return f"{PIPELINE.name}-weights-unknown"
        digest.update(path.read_bytes())
    return f"{PIPELINE.name}-weights-{digest.hexdigest()[:12]}"


def render(backend: str = "onnxruntime", ort_threads: int = DEFAULT_ORT_THREADS) -> dict[str, str]:
    """Every generated text file, by path relative to the repository (the no-drift test compares these)."""
    if backend not in BACKENDS + EXTRA_BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS + EXTRA_BACKENDS)}")
    files = {f"{s.name}/config.pbtxt": stage_config(s, backend, ort_threads) for s in STAGES}
    files[f"{PIPELINE.name}/config.pbtxt"] = ensemble_config(backend)
    files[f"{PIPELINE.name}/{VERSION_DIR}/{GITKEEP}"] = ""
    files[".gitignore"] = REPOSITORY_GITIGNORE
    if backend in ("onnxruntime", "pytorch"):
        files.update({f"{s.name}/{VERSION_DIR}/model.py": step_shim(backend) for s in STAGES})
    return files


def step_shim(backend: str) -> str:
    """The python backend's model.py: a two-line shim onto the installed package (the stub runs the environment's
    python3, where leukograph is installed), so the step's code exists once."""
    module = "python_step" if backend == "onnxruntime" else "python_step_torch"
    return (f'"""Generated by `leukograph generate-repo --backend {backend}`; the step is '
            f'leukograph.deploy.{module}."""\n\n'
            f'from leukograph.deploy.{module} import TritonPythonModel  # noqa: F401\n')


def generate(repository: Path = MODEL_REPOSITORY, backend: str = "onnxruntime",
             ort_threads: int = DEFAULT_ORT_THREADS) -> list[Path]:
    """Write the configs (and python steps); keep model files; drop the other backend's step files."""
    if ort_threads < 1:
        raise UserError(f"--ort-threads must be >= 1, got {ort_threads}")
    written = []
    for rel, text in render(backend, ort_threads).items():
        path = repository / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    if backend == "tensorrt":  # a stale model.py would be confusing next to a plan
        for stage in STAGES:
            (repository / stage.name / VERSION_DIR / "model.py").unlink(missing_ok=True)
    return written


def backend_of(repository: Path) -> str:
    """Which variant a repository holds, read from the crop_embedder config."""
    config = repository / contract.CROP_EMBEDDER.name / "config.pbtxt"
    if not config.exists():
        raise UserError(f"{repository} is not a leukograph model repository (no {config.relative_to(repository)})")
    text = config.read_text()
    if "tensorrt_plan" in text:
        return "tensorrt"
    return "pytorch" if 'key: "torch_device"' in text else "onnxruntime"


def write_torchscript(weights_dir: Path, repository: Path = MODEL_REPOSITORY, device: str = "auto") -> dict[str, Path]:
    """The `pytorch` variant's model files: each stage module traced to TorchScript on `device` (auto: CUDA if present).

    Sets the configs' torch_device to the traced device. Traced with two different frame sizes and cell counts and
    checked against eager, since a trace silently freezes anything that is not a tensor operation."""
    import warnings

    import torch  # heavy: only here

    from leukograph.training.checkpoints import load_models
    from leukograph.training.models import CellGraphStage, CropEmbedderStage

    target = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    embedder, gnn, _ = load_models(Path(weights_dir))
    crop_stage = CropEmbedderStage(embedder).eval().to(target)
    graph_stage = CellGraphStage(gnn).eval().to(target)
    generator = torch.Generator().manual_seed(0)

    def example(height: int, width: int, cells: int) -> tuple:
        frame = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
        corner = torch.rand(cells, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
        size = 8 + torch.rand(cells, 2, generator=generator) * 40
        boxes = torch.cat([corner, corner + size], 1).to(torch.float32)
        return frame.to(target), boxes.to(target)

    written = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: the second-size check below is what counts
        frame, boxes = example(240, 320, 6)
        traced_crop = torch.jit.trace(crop_stage, (frame, boxes), check_trace=False)
        embeddings, frame_size = crop_stage(frame, boxes)
        traced_graph = torch.jit.trace(graph_stage, (embeddings, boxes, frame_size), check_trace=False)
        frame, boxes = example(300, 410, 17)  # other sizes: the trace must not have frozen them
        want_e, want_s = crop_stage(frame, boxes)
        got_e, got_s = traced_crop(frame, boxes)
        want_p, _ = graph_stage(want_e, boxes, want_s)
        got_p, _ = traced_graph(want_e, boxes, want_s)
        if not (torch.allclose(want_e, got_e, atol=1e-4) and torch.equal(want_s, got_s)
                and torch.allclose(want_p, got_p, atol=1e-5)):
            raise UserError("TorchScript trace of the stages differs from eager on a second input size")
    for stage, module in ((contract.CROP_EMBEDDER, traced_crop), (contract.CELL_GRAPH, traced_graph)):
        path = repository / stage.name / VERSION_DIR / model_file("pytorch")
        path.parent.mkdir(parents=True, exist_ok=True)
        module.save(str(path))
        config = repository / stage.name / "config.pbtxt"
        config.write_text(config.read_text().replace('string_value: "auto"', f'string_value: "{target.type}"'))
        written[stage.name] = path
    return written


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_info(repository: Path = MODEL_REPOSITORY) -> dict:
    """Per-stage file and sha256, plus the combined version string."""
    backend = backend_of(repository)
    models = {}
    for stage in STAGES:
        path = repository / stage.name / VERSION_DIR / model_file(backend)
        if not path.exists():
            raise UserError(f"{path} is missing: run `leukograph export` (or build-engines for tensorrt)")
        models[stage.name] = {"file": str(path.relative_to(repository)), "sha256": _sha256(path)}
    combined = hashlib.sha256("".join(m["sha256"] for m in models.values()).encode()).hexdigest()
    return {"version": f"{PIPELINE.name}-{backend}-{combined[:12]}", "backend": backend, "models": models}


def model_version(repository: Path = MODEL_REPOSITORY) -> str:
    """One string naming exactly the served model files, e.g. 'leukocyte_pipeline-onnxruntime-3f2a9c01b7de'."""
    return version_info(repository)["version"]


def write_version(repository: Path = MODEL_REPOSITORY) -> Path:
    """Store version_info as <repository>/leukocyte_pipeline/1/version.json (gitignored)."""
    path = repository / PIPELINE.name / VERSION_DIR / VERSION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(version_info(repository), indent=2) + "\n")
    return path


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write the Triton model repository configs", add_help=add_help)
    parser.add_argument("--backend", choices=BACKENDS + EXTRA_BACKENDS, default="onnxruntime",
                        help="onnxruntime: python-backend steps on CPU (default); tensorrt: plans on GPU; "
                             "pytorch: python-backend steps in PyTorch (CUDA if present; deploy/bench_gpu.sh)")
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    parser.add_argument("--ort-threads", type=int, default=DEFAULT_ORT_THREADS,
                        help="ONNX Runtime intra-op threads per python-backend instance")
    return parser


def main(args: argparse.Namespace) -> int:
    repository: Path = args.model_repository
    for path in generate(repository, args.backend, args.ort_threads):
        print(path)
    if args.backend == "tensorrt":
        print("next: build the plans on the target GPU with `leukograph build-engines`")
    elif args.backend == "pytorch":
        from leukograph.client.paths import WEIGHTS_DIR

        for path in write_torchscript(WEIGHTS_DIR, repository).values():
            print(path)
        print(f"model version: {model_version(repository)}")
        write_version(repository)
    elif all((repository / s.name / VERSION_DIR / "model.onnx").exists() for s in STAGES):
        print(f"model version: {model_version(repository)}")
        write_version(repository)
    else:
        print("next: `leukograph export` writes the model.onnx files (`leukograph serve` does it when missing)")
    return 0
