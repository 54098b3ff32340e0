# CPU Triton for an edge box without a GPU: the leukograph wheel with the `serve` extra (nvidia-pytriton: the real
# tritonserver binary + python backend; ONNX Runtime) and the model repository generated inside the image with the
# three exported ONNX stages. NOT BUILT here. Build context: the folder `python -m leukograph.deploy.builder_context`
# writes. Python 3.11: the python-backend stub links libpython3.11.so.1.0, which the official image ships.
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 LEUKOGRAPH_CACHE=/var/cache/leukograph
SHELL ["/bin/bash", "-o", "pipefail", "-ec"]
COPY dist/ /tmp/dist/
# The local wheel pins what it needs (pyproject.toml extras); nothing here is fetched by a bare name.
# hadolint ignore=DL3013
RUN wheel="$(ls /tmp/dist/leukograph-*.whl)"; pip install "${wheel}[serve]"; rm -rf /tmp/dist; \
    useradd --uid 1000 --user-group --no-create-home --home-dir /var/cache/leukograph leukograph; \
    leukograph generate-repo --backend onnxruntime --model-repository /opt/leukograph/model_repository
COPY model_source/ /opt/leukograph/model_source/
RUN for model in cell_detector crop_embedder cell_graph; do \
      cp "/opt/leukograph/model_source/$model/1/model.onnx" "/opt/leukograph/model_repository/$model/1/model.onnx"; \
    done; \
    mkdir -p /var/cache/leukograph; \
    chown -R 1000:1000 /var/cache/leukograph /opt/leukograph/model_repository
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
USER 1000:1000
ENTRYPOINT ["leukograph"]
