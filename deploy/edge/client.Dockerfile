# The edge client: the leukograph wheel with its base dependencies only (OpenCV headless, tritonclient, numpy,
# scipy; no torch). NOT BUILT here. Build context: the folder `python -m leukograph.deploy.builder_context` writes
# (deploy/README.md, "Edge box"); docker compose builds it as the service `client`.
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
COPY dist/ /tmp/dist/
SHELL ["/bin/bash", "-o", "pipefail", "-ec"]
RUN pip install /tmp/dist/leukograph-*.whl; rm -rf /tmp/dist; \
    python -c "import leukograph.client.stream, leukograph.client.endpoints"; \
    if python -c "import torch" 2>/dev/null; then echo "torch must not be in the client image" >&2; exit 1; fi; \
    useradd --uid 1000 --user-group --groups video --no-create-home --home-dir /data leukograph; \
    mkdir -p /data; chown 1000:1000 /data
# A command-line run (`leukograph stream ...`) that ends with its sample: no long-running service to health-check.
HEALTHCHECK NONE
USER 1000:1000
WORKDIR /data
ENTRYPOINT ["leukograph"]
