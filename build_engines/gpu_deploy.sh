#!/usr/bin/env bash
# One-shot GPU deployment on a machine WITH TensorRT >= 10, pycuda and tritonserver (NVIDIA's Triton container
# nvcr.io/nvidia/tritonserver:<yy.mm>-py3, or JetPack with Triton): take the three ONNX stages, write a SEPARATE
# tensorrt model repository, build + verify the FP16 engines there, start Triton on 127.0.0.1, stream sample frames
# through it, stop Triton. The committed model_repository/ (onnxruntime configs for `leukograph serve`) is only
# read, never written: its configs stay what `leukograph generate-repo` writes, so the drift test and serve keep
# working.
#
#   build_engines/gpu_deploy.sh [FRAMES_DIR] [-- extra build-engines flags, e.g. --frame-size 1080x1920]
#
# FRAMES_DIR defaults to BCCD's JPEGImages under $LEUKOGRAPH_DATA (or ../shared/datasets). Environment:
#   TRT_REPOSITORY (the tensorrt repository written here, default ./build/gpu_model_repository),
#   SOURCE (where the ONNX stages come from, default ./model_repository; exported there with torch when missing,
#   older than the weights or exported by other code),
#   GRPC_PORT (8001), HTTP_PORT (8000), METRICS_PORT (8002), LEUKOGRAPH (the CLI, default `leukograph`),
#   PYTHON (the Python that has leukograph, default python3), TRITONSERVER (default `tritonserver`),
#   SAMPLE (gpu-smoke), TARGET (100: WBCs to count before the stream stops).
# Exits non-zero at the first failing step (one line saying why); Triton is always stopped on exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"

LEUKOGRAPH="${LEUKOGRAPH:-leukograph}"
PYTHON="${PYTHON:-python3}"
TRITONSERVER="${TRITONSERVER:-tritonserver}"
SOURCE="${SOURCE:-$root/model_repository}"
TRT_REPOSITORY="${TRT_REPOSITORY:-$root/build/gpu_model_repository}"
GRPC_PORT="${GRPC_PORT:-8001}"
HTTP_PORT="${HTTP_PORT:-8000}"
METRICS_PORT="${METRICS_PORT:-8002}"
SAMPLE="${SAMPLE:-gpu-smoke}"
TARGET="${TARGET:-100}"
DATA="${LEUKOGRAPH_DATA:-$root/../shared/datasets}"
STAGES=(cell_detector crop_embedder cell_graph)

frames="$DATA/bccd/JPEGImages"
if [[ $# -gt 0 && "$1" != "--" ]]; then frames="$1"; shift; fi
[[ "${1:-}" == "--" ]] && shift
build_flags=("$@")

step() { printf '\n== %s\n' "$*"; }
die() { printf 'gpu_deploy: %s\n' "$*" >&2; exit 1; }
# Why the ONNX stages in $1 need (re-)exporting: missing, older than the weights, or exported by other code than this
# checkout's (`leukograph serve`'s own rule, deploy/server.onnx_stale); empty when they are up to date.
export_reason() {
  "$PYTHON" -c 'import sys; from pathlib import Path; from leukograph.deploy.paths import WEIGHTS_DIR
from leukograph.deploy.server import onnx_stale; print(onnx_stale(Path(sys.argv[1]), WEIGHTS_DIR) or "")' "$1"
}

step "0. prerequisites"
mkdir -p "$(dirname "$TRT_REPOSITORY")"
out_abs="$(cd "$(dirname "$TRT_REPOSITORY")" && pwd)/$(basename "$TRT_REPOSITORY")"
committed="$(cd "$root/model_repository" && pwd)"
[[ "$out_abs" != "$committed" ]] || die "TRT_REPOSITORY must not be the committed model_repository/ (it holds the CPU configs)"
command -v "$LEUKOGRAPH" >/dev/null || die "'$LEUKOGRAPH' not found (pip install -e '.[train,serve]')"
command -v "$TRITONSERVER" >/dev/null || die "'$TRITONSERVER' not found: run inside NVIDIA's Triton container"
command -v curl >/dev/null || die "curl not found (used to wait for Triton's readiness)"
[[ -d "$frames" ]] || die "frames folder $frames not found (pass FRAMES_DIR)"
stale="$(export_reason "$SOURCE")" || die "cannot check the ONNX stages in $SOURCE with $PYTHON (pip install -e '.[serve]')"
if [[ -n "$stale" ]]; then
  "$PYTHON" -c "import torch" 2>/dev/null \
    || die "$stale, and torch is not importable to export the stages (pip install -e '.[train]')"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
trt_python="$("$PYTHON" -c "import tensorrt; print(tensorrt.__version__)" 2>/dev/null)" \
  || die "TensorRT Python package not importable with $PYTHON"
"$PYTHON" -c "import pycuda.driver" 2>/dev/null || die "pycuda not importable (needed to verify the engines)"
# The plans must load in the server's TensorRT: compare with the libnvinfer next to tritonserver's backends.
server_lib="$(find /opt/tritonserver /usr/lib /usr/local -name 'libnvinfer.so.*.*.*' -print -quit 2>/dev/null || true)"
if [[ -n "$server_lib" ]]; then
  trt_server="${server_lib##*.so.}"
  [[ "$trt_python" == "$trt_server" || "$trt_python" == "$trt_server".* ]] \
    || die "TensorRT mismatch: Python bindings $trt_python, server library $trt_server ($server_lib)"
  echo "TensorRT $trt_python (server library $server_lib)"
else
  echo "TensorRT $trt_python (no libnvinfer.so.X.Y.Z found to compare with; the server start in step 3 decides)"
fi

step "1. ONNX stages from $SOURCE into $TRT_REPOSITORY"
if [[ -n "$stale" ]]; then
  echo "exporting the ONNX stages: $stale"
  "$LEUKOGRAPH" export --model-repository "$SOURCE"  # only writes model.onnx files, which are gitignored
fi
if [[ -n "$stale" || ! -f "$SOURCE/crop_embedder/1/model.int8.tensorrt.onnx" ]]; then
  # the INT8 QDQ graph for step 2b, from the activation ranges saved with the weights: no training data needed
  "$LEUKOGRAPH" export --int8 --model-repository "$SOURCE" || echo "no INT8 QDQ graph: step 2b will be skipped"
fi
"$LEUKOGRAPH" generate-repo --backend tensorrt --model-repository "$TRT_REPOSITORY"
for model in "${STAGES[@]}"; do
  cp "$SOURCE/$model/1/model.onnx" "$TRT_REPOSITORY/$model/1/model.onnx"
done

step "2. build + verify FP16 engines"
"$LEUKOGRAPH" build-engines --model-repository "$TRT_REPOSITORY" "${build_flags[@]}"

step "2b. build + verify the INT8 crop_embedder engine (explicit quantisation) into $TRT_REPOSITORY-int8"
qdq="$SOURCE/crop_embedder/1/model.int8.tensorrt.onnx"
if [[ -f "$qdq" ]]; then
  "$LEUKOGRAPH" generate-repo --backend tensorrt --model-repository "$TRT_REPOSITORY-int8"
  for model in "${STAGES[@]}"; do
    cp "$SOURCE/$model/1/model.onnx" "$TRT_REPOSITORY-int8/$model/1/model.onnx"
  done
  cp "$qdq" "$TRT_REPOSITORY-int8/crop_embedder/1/"
  "$LEUKOGRAPH" build-engines --model-repository "$TRT_REPOSITORY-int8" "${build_flags[@]}" --precision int8-qdq
else
  echo "INT8 skipped: $qdq is missing (\`leukograph export --int8\` writes it from the ranges saved with the weights, or where the training data is)"
fi

step "3. start tritonserver on 127.0.0.1"
log="$(mktemp -t tritonserver.XXXXXX.log)"
"$TRITONSERVER" --model-repository "$TRT_REPOSITORY" --grpc-port "$GRPC_PORT" --http-port "$HTTP_PORT" \
  --metrics-port "$METRICS_PORT" --http-address 127.0.0.1 --grpc-address 127.0.0.1 --metrics-address 127.0.0.1 \
  >"$log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if curl -sf "127.0.0.1:$HTTP_PORT/v2/health/ready" >/dev/null; then break; fi
  kill -0 "$server_pid" 2>/dev/null || { tail -n 40 "$log" >&2; die "tritonserver exited (log: $log)"; }
  sleep 1
done
curl -sf "127.0.0.1:$HTTP_PORT/v2/health/ready" >/dev/null || { tail -n 40 "$log" >&2; die "not ready in 120 s"; }
echo "ready (log: $log)"

step "4. stream frames from $frames"
"$LEUKOGRAPH" stream "$frames" --url "127.0.0.1:$GRPC_PORT" --sample "$SAMPLE" --target "$TARGET"

step "done: engines built, verified and served from $TRT_REPOSITORY; Triton stopped on exit"
