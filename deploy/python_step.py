"""Triton python-backend step: one stage's model.onnx in ONNX Runtime on CPU (`leukograph.deploy.runners.OrtRunner`).

`leukograph generate-repo` writes `<stage>/1/model.py`, a shim importing this module, for every stage; the stage comes
from the model name and `leukograph.client.contract`, which also validates every request: a bad request gets an error
response with one clear line and the model keeps serving. Nothing raised here may escape `execute`.
The stub runs the venv's python3, where leukograph (editable), numpy < 2 and onnxruntime are installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from leukograph.client import contract
from leukograph.deploy.runners import OrtRunner
from leukograph.deploy.runners.base import no_cell_outputs


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
        stages = {s.name: s for s in contract.SERVED_STAGES}
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

    def no_cells_response(self, inputs: dict) -> pb_utils.InferenceResponse | None:
        """The answer for CELL_COUNT = 0 (the detector found no cell): empty per-cell outputs, without running a graph
        over zero cells; None when there are cells."""
        outputs = no_cell_outputs(self.stage, inputs)
        if outputs is None:
            return None
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, value)
                                                          for name, value in outputs.items()])

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
        onnx_path = version_dir / params.get("onnx_file", contract.MODEL_FILES["onnxruntime"])
        self.runner = OrtRunner(onnx_path, self.stage, int(params.get("ort_intra_op_threads", "1")))
        self.logger.log_info(f"{self.stage.name}: loaded {onnx_path} ({self.runner.threads} ORT thread(s))")

    def run(self, request) -> pb_utils.InferenceResponse:
        inputs = {name: tensor.as_numpy() for name, tensor in self.input_tensors(request).items()}
        contract.validate_stage(self.stage, inputs)
        empty = self.no_cells_response(inputs)
        if empty is not None:
            return empty
        outputs = self.runner.infer(inputs)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(spec.name, np.ascontiguousarray(outputs[spec.name], dtype=spec.np_dtype))
            for spec in self.stage.outputs])

    def finalize(self) -> None:
        self.runner = None
