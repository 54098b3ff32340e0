#!/usr/bin/env bash
# One-shot GPU deployment on a machine WITH TensorRT >= 10, pycuda and tritonserver (NVIDIA's Triton container
# nvcr.io/nvidia/tritonserver:<yy.mm>-py3, or JetPack with Triton): export ONNX if needed, build + verify the FP16
# engines, write the tensorrt model repository, start Triton, stream sample frames through it, stop Triton.
#
#   build_engines/gpu_deploy.sh [FRAMES_DIR] [-- extra build-engines flags, e.g. --frame-size 1080x1920]
#
# FRAMES_DIR defaults to BCCD's JPEGImages under $LEUKOGRAPH_DATA (or ../shared/datasets). Environment:
#   REPO (model repository, default ./model_repository), GRPC_PORT (8001), HTTP_PORT (8000), METRICS_PORT (8002),
#   LEUKOGRAPH (the CLI, default `leukograph`), TRITONSERVER (default `tritonserver`), SAMPLE (gpu-smoke),
#   TARGET (100: WBCs to count before the stream stops).
# Exits non-zero at the first failing step; Triton is always stopped on exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"

LEUKOGRAPH="${LEUKOGRAPH:-leukograph}"
TRITONSERVER="${TRITONSERVER:-tritonserver}"
REPO="${REPO:-$root/model_repository}"
GRPC_PORT="${GRPC_PORT:-8001}"
HTTP_PORT="${HTTP_PORT:-8000}"
METRICS_PORT="${METRICS_PORT:-8002}"
SAMPLE="${SAMPLE:-gpu-smoke}"
TARGET="${TARGET:-100}"
DATA="${LEUKOGRAPH_DATA:-$root/../shared/datasets}"

frames="$DATA/bccd/JPEGImages"
if [[ $# -gt 0 && "$1" != "--" ]]; then frames="$1"; shift; fi
[[ "${1:-}" == "--" ]] && shift
build_flags=("$@")

step() { printf '\n== %s\n' "$*"; }
die() { printf 'gpu_deploy: %s\n' "$*" >&2; exit 1; }

step "0. prerequisites"
command -v "$LEUKOGRAPH" >/dev/null || die "'$LEUKOGRAPH' not found (pip install -e '.[train,serve]')"
command -v "$TRITONSERVER" >/dev/null || die "'$TRITONSERVER' not found: run inside NVIDIA's Triton container"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
python3 -c "import tensorrt, sys; print('tensorrt', tensorrt.__version__)" \
  || die "TensorRT Python package not importable"
python3 -c "import pycuda.driver" || die "pycuda not importable (needed to verify the engines)"
[[ -d "$frames" ]] || die "frames folder $frames not found (pass FRAMES_DIR)"

step "1. ONNX export (skipped when both model.onnx exist)"
if [[ ! -f "$REPO/crop_embedder/1/model.onnx" || ! -f "$REPO/cell_graph/1/model.onnx" ]]; then
  "$LEUKOGRAPH" export --model-repository "$REPO"
fi

step "2. build + verify FP16 engines"
"$LEUKOGRAPH" build-engines --model-repository "$REPO" "${build_flags[@]}"

step "3. Triton configs for the tensorrt backend"
"$LEUKOGRAPH" generate-repo --backend tensorrt --model-repository "$REPO"

step "4. start tritonserver"
log="$(mktemp -t tritonserver.XXXXXX.log)"
"$TRITONSERVER" --model-repository "$REPO" --grpc-port "$GRPC_PORT" --http-port "$HTTP_PORT" \
  --metrics-port "$METRICS_PORT" >"$log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if curl -sf "localhost:$HTTP_PORT/v2/health/ready" >/dev/null; then break; fi
  kill -0 "$server_pid" 2>/dev/null || { tail -n 40 "$log" >&2; die "tritonserver exited (log: $log)"; }
  sleep 1
done
curl -sf "localhost:$HTTP_PORT/v2/health/ready" >/dev/null || { tail -n 40 "$log" >&2; die "not ready in 120 s"; }
echo "ready (log: $log)"

step "5. stream frames from $frames"
"$LEUKOGRAPH" stream "$frames" --url "localhost:$GRPC_PORT" --sample "$SAMPLE" --target "$TARGET"

step "done: engines built, verified and served; Triton stopped on exit"
