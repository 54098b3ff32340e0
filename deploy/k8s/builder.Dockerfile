# The plan builder used by deployment.yaml's initContainer and by deploy/edge (service build-engines).
# FROM the same Triton release the server runs, so the TensorRT that builds the plans is the TensorRT whose
# backend loads them. NOT BUILT: written from NVIDIA's docs, never run here (no GPU, no NGC access).
#
#   pip wheel --no-deps -w dist .          # the leukograph wheel, from the repository root
#   docker build -f deploy/k8s/builder.Dockerfile \
#     --build-arg TENSORRT_VERSION=<the TensorRT of this Triton release> \
#     -t registry.example.org/leukograph/tensorrt-builder:26.02-py3 .
# TENSORRT_VERSION: the TensorRT listed for the release in NVIDIA's Frameworks Support Matrix; check inside
# the image with `ls /usr/lib/*/libnvinfer.so.*`. The `tensorrt` wheel bundles its own libnvinfer: a different
# version would build plans that Triton's backend refuses to deserialize. build-engines records the version it
# used in <stage>/1/build_report.json.
# Jetson: --build-arg TRITON_TAG=26.02-py3-igpu (JetPack 6 images carry the -igpu suffix), on the device.
ARG TRITON_TAG=26.02-py3
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}
ARG TENSORRT_VERSION
RUN test -n "${TENSORRT_VERSION}" || { echo "--build-arg TENSORRT_VERSION=... is required" >&2; exit 1; }
COPY dist/leukograph-*.whl /tmp/
# --break-system-packages: the image's Python is the distribution's (PEP 668); this image is single-purpose.
# pycuda compiles against the CUDA headers (cuda.h) and is what build-engines verifies the plans with; if the
# image lacks the headers, this step fails here rather than at the first build.
RUN python3 -m pip install --no-cache-dir --break-system-packages \
        "tensorrt==${TENSORRT_VERSION}" pycuda onnx onnxruntime /tmp/leukograph-*.whl \
 && python3 -c "import tensorrt, leukograph.build_engines.build; print('tensorrt', tensorrt.__version__)"
