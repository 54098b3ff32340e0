"""Triton's statistics API: cumulative counters per model, diffed around a run, and the per-frame breakdown."""

from __future__ import annotations

import time

from leukograph.client.contract import PIPELINES, SERVED_STAGES
from leukograph.deploy.bench.constants import STAT_FIELDS, STAT_MODELS

Snapshot = dict[str, dict[str, tuple[int, int]]]


def stats_snapshot(grpc_url: str, interval_s: float = 0.05, timeout_s: float = 2.0) -> Snapshot:
    """{model: {field: (count, ns)}} for the steps and both ensembles (cumulative, from the statistics API), read once
    the counters hold still: two equal readings `interval_s` apart (the last reading after `timeout_s`).

    Triton counts a step's request when it releases it, which can come after the ensemble's response has reached the
    client. Read right after a client's last response, the counters may still lack that request's last step, and the
    next run's difference would count it (5 cell_graph requests for a run of 4 frames)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)

    def read() -> Snapshot:
        out = {}
        for model in STAT_MODELS:
            stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
            out[model] = {f: (int(stats.get(f, {}).get("count", 0)), int(stats.get(f, {}).get("ns", 0)))
                          for f in STAT_FIELDS}
        return out

    try:
        deadline = time.monotonic() + timeout_s
        last = read()
        while time.monotonic() < deadline:
            time.sleep(interval_s)
            now = read()
            if now == last:
                break
            last = now
        return last
    finally:
        client.close()


def stats_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per-request milliseconds per model and field over one run, plus the request count."""
    delta = {}
    for model in STAT_MODELS:
        requests = after[model]["success"][0] - before[model]["success"][0]
        row: dict[str, float] = {"requests": float(requests)}
        for f in STAT_FIELDS:
            ns = after[model][f][1] - before[model][f][1]
            row[f"{f}_ms"] = ns / 1e6 / requests if requests else 0.0
        delta[model] = row
    return delta


def triton_breakdown(row: dict) -> dict[str, float]:
    """Mean ms per frame: localise, encode, transport, server queue, per-step compute, ensemble overhead, decode.

    transport = the client's blocking call minus the ensemble's `success` time. Triton stamps that time's end after
    the response is released, so it overlaps the client's receipt a little: a transport under ~1 ms reads as 0."""
    stages, server = row["stages_ms"], row["server_ms"]
    # the ensemble the run used (bare frames: leukocyte_pipeline; the client's boxes: ..._boxes) and its steps
    ensemble = max((server[p.name] for p in PIPELINES), key=lambda s: s["requests"])
    steps = {s.name: server[s.name] for s in SERVED_STAGES if server[s.name]["requests"] > 0}
    compute = {m: s["compute_input_ms"] + s["compute_infer_ms"] + s["compute_output_ms"] for m, s in steps.items()}
    queue = ensemble["queue_ms"] + sum(s["queue_ms"] for s in steps.values())
    out = {"capture": stages.get("capture", 0.0), "localise": stages.get("localise", 0.0),
           "encode": stages.get("encode", 0.0),
           "transport": max(0.0, stages.get("infer", 0.0) - ensemble["success_ms"]),
           "server_queue": queue}
    for m, value in compute.items():
        out[f"{m}_compute"] = value
        out[f"{m}_infer"] = steps[m]["compute_infer_ms"]
    out["ensemble_other"] = max(0.0, ensemble["success_ms"] - queue - sum(compute.values()))
    out["decode"] = stages.get("decode", 0.0)
    return {k: round(v, 3) for k, v in out.items()}


def server_version(grpc_url: str) -> str:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        meta = client.get_server_metadata(as_json=True)
        return f"{meta.get('name', 'triton')} {meta.get('version', '?')}"
    finally:
        client.close()


