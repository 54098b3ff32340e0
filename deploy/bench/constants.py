"""The benchmark's fixed settings: output places, default sweeps, targets, the statistics it reads."""

from __future__ import annotations

from leukograph.client.contract import PIPELINES, SERVED_STAGES
from leukograph.deploy.paths import CACHE_DIR, REPO_ROOT

SCHEMA = "leukograph-bench/1"
DEFAULT_OUT = REPO_ROOT / "docs" / "bench"
QUICK_OUT = CACHE_DIR / "bench-quick"
README = REPO_ROOT / "README.md"
README_SECTION = "bench"  # README text between <!-- bench:start --> and <!-- bench:end -->
CONCURRENCIES = (1, 2, 4, 8)
CELL_COUNTS = (1, 8, 32, 128)
TRANSPORTS = ("grpc", "grpc-shm", "http", "http-shm")
TARGET_FPS, TARGET_P99_MS, TARGET_VS_ORT, TARGET_VS_SEED = 30.0, 50.0, 1.3, 10.0
TARGET_DETECTOR_MS = 10.0  # the cell_detector stage on a 640x480 frame, ONNX Runtime on 2 CPU cores
STAT_MODELS = tuple(m.name for m in (*SERVED_STAGES, *PIPELINES))  # the steps and both ensembles
STAT_FIELDS = ("success", "queue", "compute_input", "compute_infer", "compute_output")

