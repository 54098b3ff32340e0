#!/usr/bin/env bash
# `leukograph bench` on a GPU machine that has no TensorRT and no Triton container (Python 3.12, torch CUDA,
# onnxruntime, torch-geometric, numpy 2, grpcio; no package index reachable): Triton from the nvidia-pytriton wheel
# brought along,
# with python-backend steps running the stages in PyTorch on CUDA (`generate-repo --backend pytorch`:
# deploy/python_step_torch.py, TorchScript traced on the GPU, tensors through the stub by DLPack - the stub's numpy
# path returns empty or garbage inputs with numpy 2, measured on the CPU machine with numpy 2.4).
#
# Two steps:
#   deploy/bench_gpu.sh pack   # on a dev machine (registry access): wheels -> .whl/, frames + weights -> .cache/bench-gpu/
#   deploy/bench_gpu.sh run    # on the GPU machine, in the repository root, with .whl and .cache/bench-gpu copied there
#
# What `pack` fetches (cp312, no deps; about 30 MB as packed, frames and weights 3 MB more):
#   nvidia-pytriton 0.7.0 (tritonserver 2.51.0 + python backend + stubs), tritonclient 2.73.0 (gRPC client; its
#   generated code needs grpcio >= 1.81.1 and protobuf >= 6.30 on the GPU machine - `run` checks), python-rapidjson,
#   protobuf 6. Not tritonclient.http's gevent stack (too large to carry): the HTTP rows are reported as not run.
# With EXTRA_WHEELS="onnxruntime-gpu==1.31.1" (built for CUDA 13, whose runtime, cuBLAS and cuDNN come with PyTorch's
# nvidia-* wheels; 256 MB, 70 MB once `pack` keeps only GPU_SM's cubins - still more than a machine that accepts 64
# MiB per call takes with the rest, so it travels in pieces joined there with `cat`) `run` also times ONNX
# Runtime's CUDA provider on the fp32 graphs and on the FP16 graphs TensorRT's fp16 engines are built from, each
# checked against fp32 on the CPU first; without it those rows are listed as not run.
# `run` writes docs/bench/gpu/bench.json (+ PNGs, results.md) and copies them to $RESULTS_COPY_DIR when that is set.
# Environment: PYTHON (default python3), WHEELS (.whl), SITE (/tmp/leukograph-site), BENCH_OUT (docs/bench/gpu),
# BENCH_ARGS (extra `leukograph bench` arguments), EXTRA_WHEELS (pack), LEUKOGRAPH_WEIGHTS (pack: which checkpoints to
# carry), GPU_PYTHON (3.12), GPU_SM (90), BENCH_DEVICE (cuda; `cpu` rehearses the whole script on a CPU machine, as done
# here before any GPU run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/leukograph-site}
CARRY=.cache/bench-gpu
BENCH_OUT=${BENCH_OUT:-docs/bench/gpu}
BENCH_DEVICE=${BENCH_DEVICE:-cuda}
GPU_PYTHON=${GPU_PYTHON:-3.12}  # the GPU machine's Python (its stub is the one kept)
GPU_SM=${GPU_SM:-90}  # the GPU machine's compute capability (H100, H200: 90), for onnxruntime-gpu's cubins

pack() {
  local py=.venv/bin/python
  [ -x "$py" ] || py=$PYTHON
  mkdir -p "$WHEELS" "$CARRY/frames" "$CARRY/weights"
  # shellcheck disable=SC2086  # EXTRA_WHEELS is a list of words
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" \
    nvidia-pytriton==0.7.0 tritonclient==2.73.0 python-rapidjson==1.25 "protobuf>=6.30,<7" ${EXTRA_WHEELS:-}
  # Only the GPU machine's Python stub travels: drop the other stubs and the bundled libpython3.13 that only the
  # 3.13 stub links (13 MB), and store the rest LZMA-compressed (pip reads it like any zip; 39.5 -> 27.4 MB), so
  # wheels, frames and the repository fit the 64 MiB such a machine accepts (deploy/bench/wheels.py).
  "$py" -m leukograph.deploy.bench.wheels pytriton "$WHEELS"/nvidia_pytriton-*.whl "$GPU_PYTHON"
  # onnxruntime-gpu's CUDA provider, cut to GPU_SM's cubins and LZMA-compressed (256 -> 70 MB for sm_90).
  local ort_wheel
  for ort_wheel in "$WHEELS"/onnxruntime_gpu-*.whl; do
    [ -e "$ort_wheel" ] || continue
    "$py" -m leukograph.deploy.bench.wheels onnxruntime-gpu "$ort_wheel" "$GPU_SM"
  done
  # The BCCD held-out frames (the GPU machine has no ../shared) and the checkpoints to serve.
  "$py" - "$CARRY/frames" <<'EOF'
import shutil, sys
from pathlib import Path
from leukograph.deploy.bench.frames import held_out_paths
for frame_id, path in held_out_paths():
    shutil.copy2(path, Path(sys.argv[1]) / f"{frame_id}{path.suffix}")
EOF
  local weights=${LEUKOGRAPH_WEIGHTS:-training/weights}
  cp "$weights/cnn.pt" "$weights/gnn.pt" "$CARRY/weights/"
  du -ch "$WHEELS"/*.whl "$CARRY" | tail -1
  echo "next, on the GPU machine: bash deploy/bench_gpu.sh run   (carry: $WHEELS $CARRY)"
}

run() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl
  # leukograph without installing it: the four packages under one namespace folder (paths resolve to this repo).
  mkdir -p "$SITE/leukograph"
  for part in client:client training:training build_engines:build_engines deploy:deploy; do
    ln -sfn "$PWD/${part#*:}" "$SITE/leukograph/${part%%:*}"
  done
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  # The python-backend stub embeds libpython and ignores PYTHONPATH: a .pth file in the interpreter's own and its
  # base installation's site-packages shows it $SITE and the venv's packages (removed again on exit).
  local pth_files
  pth_files=$("$PYTHON" - "$SITE" <<'EOF'
import site, sys, sysconfig
from pathlib import Path
lines = [sys.argv[1], *site.getsitepackages()]
base = sysconfig.get_path("purelib", vars={"base": sys.base_prefix, "platbase": sys.base_prefix})
for folder in dict.fromkeys([*site.getsitepackages(), base]):
    if Path(folder).is_dir():
        pth = Path(folder) / "zz-leukograph-bench.pth"
        pth.write_text("\n".join(lines) + "\n")
        print(pth)
EOF
)
  # shellcheck disable=SC2064  # expand now: the list is fixed
  trap "rm -f $(echo "$pth_files" | tr '\n' ' ')" EXIT
  "$PYTHON" - "$BENCH_DEVICE" <<'EOF'
import sys
import grpc, google.protobuf, numpy, onnxruntime, torch
print(f"python ok: torch {torch.__version__} cuda={torch.cuda.is_available()}, numpy {numpy.__version__}, "
      f"grpcio {grpc.__version__}, protobuf {google.protobuf.__version__}, onnxruntime {onnxruntime.__version__} "
      f"({', '.join(onnxruntime.get_available_providers())})")
import tritonclient.grpc  # raises when grpcio/protobuf are older than its generated code needs
assert sys.argv[1] != "cuda" or torch.cuda.is_available(), "no CUDA GPU visible to torch"
EOF
  # The python-backend stub links libpython3.X.so: make the interpreter's own library folder visible.
  local libdir
  libdir=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')")
  export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local py_version stub
  py_version=$("$PYTHON" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
  stub="$SITE/pytriton/tritonserver/python_backend_stubs/$py_version/triton_python_backend_stub"
  if ldd "$stub" | grep "not found"; then
    echo "the python-backend stub for Python $py_version misses the libraries above" >&2
    exit 1
  fi
  local card="no GPU (BENCH_DEVICE=$BENCH_DEVICE rehearsal)"
  if [ "$BENCH_DEVICE" = cuda ]; then
    card="GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 || echo unknown)"
  fi
  export LEUKOGRAPH_CACHE=${LEUKOGRAPH_CACHE:-/tmp/leukograph-cache}
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
  PYTHONUNBUFFERED=1 "$PYTHON" -m leukograph.client.cli bench --backend pytorch --torch-device "$BENCH_DEVICE" \
    --frames-dir "$CARRY/frames" --weights "$CARRY/weights" \
    --out-dir "$BENCH_OUT" --label "$card (python-backend PyTorch steps, no TensorRT)" ${BENCH_ARGS:-}
  if [ -n "${RESULTS_COPY_DIR:-}" ]; then
    cp "$BENCH_OUT"/* "$RESULTS_COPY_DIR"/
  fi
}

case "${1:-}" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: deploy/bench_gpu.sh pack|run" >&2; exit 2 ;;
esac
