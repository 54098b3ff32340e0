# CPU Triton for an edge box without a GPU: `pip install 'leukograph[serve]'` brings nvidia-pytriton (the real
# tritonserver binary + python backend) and ONNX Runtime; `leukograph serve` copies the server to
# $LEUKOGRAPH_CACHE once and runs it. Python 3.11: the python-backend stub links libpython3.11.so.1.0, which the
# official python:3.11 image ships in /usr/local/lib. NOT BUILT here.
FROM python:3.11-slim-bookworm
COPY dist/leukograph-*.whl /tmp/
RUN pip install --no-cache-dir "$(ls /tmp/leukograph-*.whl)[serve]"
ENV LEUKOGRAPH_CACHE=/var/cache/leukograph
ENTRYPOINT ["leukograph"]
