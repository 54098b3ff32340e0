"""Triton python-backend step: runs one stage's model.onnx with ONNX Runtime on CPU.

`leukograph generate-repo` copies this file to `<stage>/1/model.py` for both stages; the stage comes from the model
name and `leukograph.client.contract`. Every request is validated against the contract; a bad request gets an error
response with one clear line and the model keeps serving. Nothing raised here may escape `execute`.
The stub runs the venv's python3, where leukograph (editable), numpy < 2 and onnxruntime are installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from leukograph.client import contract


def _check_tensor(spec: contract.TensorSpec, array: np.ndarray) -> None:
    """dtype, rank and fixed dimensions of one tensor."""
    if array.dtype != spec.np_dtype:
        raise contract.ContractError(f"{spec.name} must be {spec.dtype}, got {array.dtype}")
    if array.ndim != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, array.shape)):
        shape = "x".join("N" if d == -1 else str(d) for d in spec.shape)
        raise contract.ContractError(f"{spec.name} must have shape {shape}, got {tuple(array.shape)}")


def validate_cell_graph(embeddings: np.ndarray, boxes: np.ndarray, frame_size: np.ndarray) -> None:
    """cell_graph's inputs: the crop_embedder's outputs plus the request's boxes."""
    for spec, array in zip(contract.CELL_GRAPH.inputs, (embeddings, boxes, frame_size)):
        _check_tensor(spec, array)
    n = boxes.shape[0]
    if not 1 <= n <= contract.MAX_CELLS:
        raise contract.ContractError(f"BOXES has {n} cells; must be 1..MAX_CELLS={contract.MAX_CELLS}")
    if embeddings.shape[0] != n:
        raise contract.ContractError(f"EMBEDDINGS has {embeddings.shape[0]} rows for {n} BOXES")
    for spec, array in zip(contract.CELL_GRAPH.inputs, (embeddings, boxes, frame_size)):
        if not np.isfinite(array).all():
            raise contract.ContractError(f"{spec.name} contains NaN or infinity")
    h, w = (float(v) for v in frame_size)
    if min(h, w) < contract.MIN_FRAME_SIDE or max(h, w) > contract.MAX_FRAME_SIDE:
        raise contract.ContractError(
            f"FRAME_SIZE must be in [{contract.MIN_FRAME_SIDE}, {contract.MAX_FRAME_SIDE}], got {h:g}x{w:g}")
    # Same box rules as the crop_embedder's, checked by the contract against a frame of that size.
    contract.validate_request(np.empty((int(h), int(w), 3), np.uint8), boxes)


def validate(stage: contract.StageSpec, inputs: dict[str, np.ndarray]) -> None:
    if stage is contract.CROP_EMBEDDER:
        contract.validate_request(inputs["FRAME"], inputs["BOXES"])
    else:
        validate_cell_graph(inputs["EMBEDDINGS"], inputs["BOXES"], inputs["FRAME_SIZE"])


def _error(message: str, code: str) -> pb_utils.TritonError:
    """A TritonError with a status code where this python backend supports codes."""
    status = getattr(pb_utils.TritonError, code, None)
    return pb_utils.TritonError(message) if status is None else pb_utils.TritonError(message, status)


class StepModel:
    """What every python-backend step shares: its stage from the model name, the contract's limits checked against
    the config, the inputs read by contract name, and one clear error per bad request (the model never goes down).
    Subclasses load their runtime in `load` and compute outputs in `run`."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        name = args["model_name"]
        stages = {s.name: s for s in contract.STAGES}
        if name not in stages:
            raise ValueError(f"model {name!r} is not a contract stage ({', '.join(stages)})")
        self.stage = stages[name]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # The config mirrors the contract's limits; refuse to serve if it was generated from another contract.
        for key, value in (("max_cells", contract.MAX_CELLS), ("max_frame_side", contract.MAX_FRAME_SIDE)):
            if key in params and int(params[key]) != value:
                raise ValueError(f"config parameter {key}={params[key]} differs from the contract ({value}): "
                                 "run `leukograph generate-repo`")
        self.logger = pb_utils.Logger
        self.load(params, Path(args["model_repository"]) / args["model_version"])

    def load(self, params: dict[str, str], version_dir: Path) -> None:
        raise NotImplementedError

    def run(self, request) -> pb_utils.InferenceResponse:
        raise NotImplementedError

    def input_tensors(self, request) -> dict:
        """The request's Triton tensors by contract input name; a missing one is the client's fault."""
        tensors = {}
        for name in self.stage.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise contract.ContractError(f"input {name} is missing")
            tensors[name] = tensor
        return tensors

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                responses.append(self.run(request))
            except contract.ContractError as exc:  # the client's fault: INVALID_ARG (HTTP 400)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=_error(f"{self.stage.name}: bad request: {exc}", "INVALID_ARG")))
            except Exception as exc:  # never let one request take the model down
                message = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
                self.logger.log_error(f"{self.stage.name}: {message}")
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=_error(f"{self.stage.name}: internal error: {message}", "INTERNAL")))
        return responses


class TritonPythonModel(StepModel):
    """ONNX Runtime step (CPU): runs the stage's model.onnx."""

    def load(self, params: dict[str, str], version_dir: Path) -> None:
        onnx_path = version_dir / params.get("onnx_file", "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("ort_intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        got = [i.name for i in self.session.get_inputs()]
        if got != self.stage.input_names:
            raise ValueError(f"{onnx_path} has inputs {got}, the contract says {self.stage.input_names}")
        self.logger.log_info(f"{self.stage.name}: loaded {onnx_path} ({options.intra_op_num_threads} ORT thread(s))")

    def run(self, request) -> pb_utils.InferenceResponse:
        inputs = {name: tensor.as_numpy() for name, tensor in self.input_tensors(request).items()}
        validate(self.stage, inputs)
        outputs = self.session.run(self.stage.output_names, inputs)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(spec.name, np.ascontiguousarray(value, dtype=spec.np_dtype))
            for spec, value in zip(self.stage.outputs, outputs)])

    def finalize(self) -> None:
        self.session = None
