# The plan builder: the Kubernetes initContainer (deploy/k8s/deployment.yaml) and the edge box's `build-engines`
# service (deploy/edge/docker-compose.yaml). NOT BUILT: written from NVIDIA's docs, never run here (no Docker
# engine, no GPU, no NGC access). Build context: the folder `python -m leukograph.deploy.builder_context` writes
# (the wheel, both ONNX stages, the verification subset):
#
#   python -m leukograph.deploy.builder_context build/builder-context
#   docker build -f deploy/k8s/builder.Dockerfile -t <registry>/leukograph/tensorrt-builder:26.02-py3 \
#     build/builder-context
#
# FROM the Triton release the server runs, and built with THAT image's TensorRT: the Python bindings installed here
# are the `tensorrt-cu<N>-bindings` wheel of exactly the libnvinfer version in the image, WITHOUT the wheel's own
# libraries, so the builder loads the image's libnvinfer - the one Triton's tensorrt backend loads. The image build
# fails when the bindings' version or the library they load is not the image's (plans load only in the TensorRT
# build that made them: server issues #5975, #7613). The version is recorded in /opt/leukograph/tensorrt-version
# and, per plan, in <stage>/1/build_report.json.
# pycuda (build-engines runs the plans with it to verify them) has no binary wheels: it is compiled here against
# the CUDA headers of the image's own CUDA version from NVIDIA's CUDA apt repository; if the image cannot provide
# them, the build fails here rather than in a pod.
# Jetson: --build-arg TRITON_TAG=26.02-py3-igpu (JetPack 6 images carry the -igpu suffix), on the device.
ARG TRITON_TAG=26.02-py3
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}
SHELL ["/bin/bash", "-o", "pipefail", "-ec"]
USER 0:0
ENV PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1 PYTHONDONTWRITEBYTECODE=1 \
    LEUKOGRAPH_DATA=/opt/leukograph/verification-data

# TensorRT: bindings of the image's own libnvinfer version.
RUN lib="$(find /usr/lib /usr/local -name 'libnvinfer.so.*.*.*' -print -quit)"; \
    test -n "$lib" || { echo "no libnvinfer.so.X.Y.Z in this image" >&2; exit 1; }; \
    trt_version="${lib##*.so.}"; cuda_major="${CUDA_VERSION%%.*}"; \
    test -n "$cuda_major" || { echo "CUDA_VERSION is not set in this image" >&2; exit 1; }; \
    python3 -m pip install --no-deps --extra-index-url https://pypi.nvidia.com \
        "tensorrt-cu${cuda_major}-bindings==${trt_version}.*"; \
    python3 -c 'import sys, tensorrt; expected = sys.argv[1]; \
libs = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libnvinfer.so" in line}); \
print("tensorrt", tensorrt.__version__, "loads", libs); \
same = tensorrt.__version__.startswith(expected + ".") and libs and not any("-packages/" in p for p in libs); \
sys.exit(0 if same else f"tensorrt bindings {tensorrt.__version__} ({libs}) are not the image libnvinfer {expected}")' \
        "$trt_version"
RUN mkdir -p /opt/leukograph && python3 -c "import tensorrt; print(tensorrt.__version__)" \
      > /opt/leukograph/tensorrt-version

# pycuda against the image's CUDA version; the compilers and headers are removed again.
# apt versions are not pinned: the CUDA packages' names carry the image's CUDA version, which the base tag pins.
# hadolint ignore=DL3008
RUN cuda_mm="$(echo "${CUDA_VERSION}" | cut -d. -f1,2 | tr . -)"; \
    apt-get update; \
    apt-get install -y --no-install-recommends g++ python3-dev \
        "cuda-driver-dev-${cuda_mm}" "cuda-cudart-dev-${cuda_mm}" "libcurand-dev-${cuda_mm}"; \
    CUDA_ROOT=/usr/local/cuda python3 -m pip install "pycuda==2025.1.*"; \
    apt-get purge -y g++ python3-dev; apt-get autoremove -y; rm -rf /var/lib/apt/lists/*; \
    python3 -c "import pycuda.driver"

# leukograph (base: numpy<2, OpenCV headless, tritonclient) + ONNX Runtime, the reference of the verification.
COPY dist/ /tmp/dist/
RUN python3 -m pip install /tmp/dist/leukograph-*.whl "onnx>=1.15,<2" "onnxruntime>=1.17,<2"; \
    rm -rf /tmp/dist; \
    python3 -c "import leukograph.build_engines.build, leukograph.deploy.load_check, onnxruntime"
COPY model_source/ /opt/leukograph/model_source/
COPY verification-data/ /opt/leukograph/verification-data/
# /models: the named volume of the edge box takes this owner; Kubernetes mounts an emptyDir there (fsGroup 1000).
RUN mkdir -p /models && chown 1000:1000 /models

# One-shot job: it exits when the plans are built, verified and loaded; there is nothing to health-check.
HEALTHCHECK NONE
USER 1000:1000
WORKDIR /tmp
