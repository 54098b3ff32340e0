"""`leukograph bench`: per-frame latency and throughput of the served pipeline, against in-process alternatives.

What one frame costs, from capture to labels in hand, on BCCD held-out frames (decoded once up front; "capture" takes
the decoded frame from memory, or reads it from an MJPG video made from them for the `video` row):

    capture -> localise (OpenCV) -> encode -> [transport -> server queue -> crop_embedder -> cell_graph] -> decode

Rows (all in one run, on the same frames):

* Triton `leukocyte_pipeline` over gRPC and HTTP, each with and without system shared memory for the inputs, at
  concurrency 1, 2, 4 and 8 (closed loop: N client threads, each localising and sending its own frames), through the
  product's own client (`TritonPipelineClient`, the same one `leukograph stream` uses). The server side is split with
  Triton's statistics API (diffed around each run): queue and compute per step and the ensemble; "transport" is the
  client's blocking infer call minus the ensemble's server time.
* ONNX Runtime in-process (the two exported ONNX files, no server): with the server steps' intra-op thread count,
  and with 2 threads. The floor for the CPU path.
* PyTorch eager, batched per frame (the two stage modules `classify` runs).
* PyTorch eager, seed-paper style: every cell's crop embedded by its own forward call (the seed classified one
  image at a time), then the GNN once. The frame is converted to float once per frame, not per cell.
* TensorRT: the standalone engine runner (`--plans`) and Triton with TensorRT plans (`--trt-grpc-url`) where a GPU
  with TensorRT exists; otherwise the rows say exactly why they were not run. Nothing is estimated.

A sweep over cells per frame (1, 8, 32, 128; real boxes of a real held-out frame, tiled with jitter) times the model
path alone (boxes given, no localisation) for Triton and the in-process rows.

Outputs (default `docs/bench/`; `--quick`: `.cache/bench-quick/`): `bench.json` (every figure, the machine, library
versions, load averages, the exact command), `latency_cdf.png`, `throughput.png`, `cells.png`, `results.md`, and the
same markdown on stdout. `--readme-from docs/bench/bench.json` rewrites the README section between
`<!-- bench:start -->` and `<!-- bench:end -->` from that JSON (`report.readme_table`).

Modules: `cli` (options) -> `run` (the rows) -> `loop` (closed load loop) over `engines`, with `statistics` (Triton's
statistics API), `machine`, `repository` (the served repository), `profile` (py-spy); then `analysis`, `report`,
`plots`. torch, onnxruntime and matplotlib are imported inside the functions that need them, so a machine with only
the client installed can run the Triton rows (`--grpc-url/--http-url --no-baselines`).
"""
