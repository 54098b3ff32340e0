# The edge client: `pip install leukograph` (base dependencies only: OpenCV headless, tritonclient, numpy, scipy;
# no torch). NOT BUILT here. From the repository root: pip wheel --no-deps -w dist . && docker build -f ...
FROM python:3.11-slim-bookworm
COPY dist/leukograph-*.whl /tmp/
RUN pip install --no-cache-dir /tmp/leukograph-*.whl \
 && python -c "import leukograph.client.stream" \
 && if python -c "import torch" 2>/dev/null; then echo "torch must not be in the client image" >&2; exit 1; fi
WORKDIR /data
ENTRYPOINT ["leukograph"]
