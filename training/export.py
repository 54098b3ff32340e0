"""`leukograph export`: the three served stages to ONNX (opset >= 17, weights inline, dynamic cells and frame size).

Names, dtypes and dynamic axes come from `leukograph.client.contract`; the files land where the model-repository
generator and Triton expect them: `model_repository/<stage>/1/model.onnx`.

`--int8` also writes the INT8 crop_embedder beside it (`training/quantize.py`: static post-training quantisation,
calibrated on training crops of every source): `model.int8.onnx` for ONNX Runtime (`serve --precision int8`) and
`model.int8.tensorrt.onnx` for `build-engines --precision int8`. The cell_graph stays FP32.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import onnx
import torch

from leukograph.client.contract import (
    CELL_DETECTOR,
    CELL_GRAPH,
    CROP_EMBEDDER,
    EMBED_DIM,
    MODEL_FILES,
    StageSpec,
    stage_path,
)
from leukograph.client.errors import UserError
from leukograph.deploy.paths import (
    GRAPH_CODE_KEY,
    MODEL_REPOSITORY,
    WEIGHTS_DIR,
    data_root,
    detector_weights_dir,
    graph_code_digest,
)
from leukograph.training import quantize
from leukograph.training.checkpoints import cnn_crop_size, load_models
from leukograph.training.detector import add_field_scale_argument
from leukograph.training.models import CellGraphStage, CropEmbedderStage

OPSET = 17


def onnx_path(stage: StageSpec, repository: Path = MODEL_REPOSITORY) -> Path:
    return stage_path(repository, stage, MODEL_FILES["onnxruntime"])


def _example_inputs(stage: StageSpec) -> tuple[torch.Tensor, ...]:
    """Six rows of which five are cells (the last is padding), so no count or row number is frozen into the graph."""
    generator = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[10.0, 12.0, 90.0, 95.0], [120.0, 40.0, 200.0, 110.0], [30.0, 150.0, 70.0, 190.0],
                          [220.0, 160.0, 300.0, 230.0], [150.0, 150.0, 170.0, 168.0], [5.0, 200.0, 60.0, 236.0]])
    count = torch.tensor([len(boxes) - 1], dtype=torch.int32)
    if stage is CROP_EMBEDDER:
        return torch.randint(0, 256, (240, 320, 3), dtype=torch.uint8, generator=generator), boxes, count
    return torch.randn(len(boxes) - 1, EMBED_DIM, generator=generator), boxes, torch.tensor([240.0, 320.0]), count


def export_stage(module: torch.nn.Module, stage: StageSpec, path: Path, opset: int = OPSET) -> Path:
    """Export one stage with the contract's names and dynamic axes; weights stay inside the .onnx file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, _example_inputs(stage), str(path), dynamo=False, opset_version=opset,
            input_names=stage.input_names, output_names=stage.output_names,
            dynamic_axes=stage.dynamic_axes, do_constant_folding=True,
        )
    return save_served_graph(path, stage.description)


def save_served_graph(path: Path, description: str, properties: dict[str, str] | None = None) -> Path:
    """Finish an exported graph: its description, the digest of the code that built it (`graph_code_digest`, read by
    `leukograph serve` to re-export after an upgrade) and `properties` in its metadata, the ONNX checker, weights
    inline."""
    model = onnx.load(str(path))
    model.doc_string = description
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        GRAPH_CODE_KEY: graph_code_digest(), **(properties or {})})
    onnx.checker.check_model(model)
    onnx.save(model, str(path), save_as_external_data=False)
    return path


def export_all(weights_dir: Path = WEIGHTS_DIR, repository: Path = MODEL_REPOSITORY,
               opset: int = OPSET, field_scale: float | None = None) -> dict[str, Path]:
    """Export cell_detector, crop_embedder and cell_graph from the committed (or given) checkpoints; a weights folder
    without detector.pt (e.g. `leukograph adapt`'s, which adapts only the classifier) keeps the committed detector.
    The detector keeps the field scale the repository's detector was exported with, unless `field_scale` is given."""
    from leukograph.training.detector import export_detector, load_detector

    embedder, gnn, _ = load_models(weights_dir)
    detector = load_detector(detector_weights_dir(weights_dir))
    return {
        CELL_DETECTOR.name: export_detector(detector, onnx_path(CELL_DETECTOR, repository), opset, field_scale),
        CROP_EMBEDDER.name: export_stage(CropEmbedderStage(embedder), CROP_EMBEDDER,
                                         onnx_path(CROP_EMBEDDER, repository), opset),
        CELL_GRAPH.name: export_stage(CellGraphStage(gnn), CELL_GRAPH, onnx_path(CELL_GRAPH, repository), opset),
    }


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export the three stages to ONNX", add_help=add_help)
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="folder with cnn.pt and gnn.pt")
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument("--int8", action="store_true",
                        help="also write the INT8 (QDQ) crop_embedder, calibrated on training crops of every source "
                             "(or from the activation ranges saved with the weights: no data needed)")
    quantize.add_arguments(parser)
    add_field_scale_argument(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    if args.opset < 17:
        raise UserError(f"--opset must be >= 17 (GridSample and TensorRT 10 parsing), got {args.opset}")
    if args.int8 and args.calibration_per_source < 1:
        raise UserError(f"--calibration-per-source must be >= 1, got {args.calibration_per_source}")
    for name, path in export_all(args.weights, args.model_repository, args.opset, args.field_scale).items():
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if args.int8:
        paths, ranges = quantize.export_int8(args.model_repository, data_root(args.data_root),
                                             args.calibration_per_source, args.seed, args.calibration_method,
                                             tuple(args.keep_fp32), cnn_crop_size(args.weights), args.weights,
                                             args.calibrate)
        print(ranges)
        for runtime, path in paths.items():
            print(f"{CROP_EMBEDDER.name} INT8 for {runtime}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0
