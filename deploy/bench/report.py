"""The run as markdown (results.md, the README section) and the files written beside it."""

from __future__ import annotations

import json
from pathlib import Path

from leukograph.deploy.bench.plots import plot


def _f(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    """Every table: end to end, breakdown, cells per frame, targets, rows not run, machine."""
    lines = [f"### End to end per frame (capture -> labels), {result['frames']['count']} BCCD held-out frames, "
             f"{result['frames']['cells_per_frame']['mean']:.1f} cells on average", "",
             "| configuration | conc. | frames | p50 ms | p95 ms | p99 ms | frames/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lat = r["latency_ms"]
        lines.append(f"| {r['name']} | {r['concurrency']} | {r['frames']} | {_f(lat['p50'])} | {_f(lat['p95'])} | "
                     f"{_f(lat['p99'])} | {_f(r['fps'])} |")
    broken = [r for r in result["runs"] if "breakdown_ms" in r]
    if broken:
        keys = list(dict.fromkeys(k for r in broken for k in r["breakdown_ms"]))  # detector rows add its step
        lines += ["", "### Where the time goes (mean ms per frame; server split from Triton's statistics API)", "",
                  "| configuration | conc. | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
                  "|---|---:|" + "---:|" * len(keys)]
        for r in broken:
            lines.append(f"| {r['name']} | {r['concurrency']} | "
                         + " | ".join(_f(r["breakdown_ms"].get(k, 0.0), 2) for k in keys) + " |")
    inproc = [r for r in result["runs"] if r["kind"] != "triton" and r["concurrency"] == 1]
    if inproc:
        lines += ["", "### In-process rows, mean ms per frame by stage", "",
                  "| configuration | stages |", "|---|---|"]
        for r in inproc:
            lines.append(f"| {r['name']} | " + ", ".join(f"{k} {_f(v, 2)}" for k, v in r["stages_ms"].items()) + " |")
    if result["cell_sweep"]:
        names = list(dict.fromkeys(s["name"] for s in result["cell_sweep"]))
        counts = list(dict.fromkeys(s["cells_requested"] for s in result["cell_sweep"]))
        lines += ["", "### Cells per frame (model path only, boxes given; p50 / p99 ms)", "",
                  "| cells | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for n in counts:
            cells = []
            for name in names:
                s = next((x for x in result["cell_sweep"] if x["name"] == name and x["cells_requested"] == n), None)
                cells.append(f"{_f(s['latency_ms']['p50'])} / {_f(s['latency_ms']['p99'])}" if s else "-")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    targets = result["analysis"].get("targets", [])
    if targets:
        lines += ["", "### Targets", "", "| target | reached | met |", "|---|---|---|"]
        lines += [f"| {t['name']} | {t['value']} | {'yes' if t['met'] else 'no'} |" for t in targets]
    if result["not_run"]:
        lines += ["", "### Not run", "", "| row | reason |", "|---|---|"]
        lines += [f"| {r['name']} | {r['reason']} |" for r in result["not_run"]]
    if result["analysis"].get("notes"):
        lines += ["", "### Notes", ""] + [f"- {n}" for n in result["analysis"]["notes"]]
    lines += ["", _machine_line(result), "", f"Command: `{result['command']}`"]
    return "\n".join(lines) + "\n"


def _machine_line(result: dict) -> str:
    m = result["machine"]
    v = m["versions"]
    return (f"Machine: {m['cpu_model']}, {m['available_cores']} cores, GPU {m['gpu']}; {m.get('tritonserver', '')}; "
            f"torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, tritonclient {v.get('tritonclient')}, "
            f"numpy {v.get('numpy')}, opencv {v.get('opencv')}; load average {result['load_avg_start'][0]:.2f} at "
            f"start, {result['load_avg_end'][0]:.2f} at end; {result['created_utc']}"
            + (f"; {result['label']}" if result.get("label") else "") + ".")


def readme_table(result: dict, details: str = "docs/bench/results.md") -> str:
    """The README's results section, from a bench JSON: each configuration at concurrency 1 and at its best
    sustained frames/s, and the targets. `details`: link to the full tables, relative to the README."""
    lines = [f"Latency of one frame from capture to labels, BCCD held-out frames "
             f"({result['frames']['cells_per_frame']['mean']:.1f} cells per frame on average), each configuration "
             "at concurrency 1 and at its best sustained frames/s. Generated from the benchmark's JSON by "
             f"`leukograph bench --readme-from`; breakdown, cell sweep and plots: [{details}]({details}).", "",
             "| configuration | conc. | p50 ms | p95 ms | p99 ms | frames/s |", "|---|---:|---:|---:|---:|---:|"]
    shown = [r for r in result["runs"]
             if r["concurrency"] == 1 or r["fps"] == max(x["fps"] for x in result["runs"] if x["name"] == r["name"])]
    for r in shown:
        lat = r["latency_ms"]
        lines.append(f"| {r['name']} | {r['concurrency']} | {_f(lat['p50'])} | {_f(lat['p95'])} | {_f(lat['p99'])} | "
                     f"{_f(r['fps'])} |")
    targets = result.get("analysis", {}).get("targets", [])
    if targets:
        lines += ["", "| target | reached | met |", "|---|---|---|"]
        lines += [f"| {t['name']} | {t['value']} | {'yes' if t['met'] else 'no'} |" for t in targets]
    if result.get("not_run"):
        lines += [""] + [f"- Not run: {r['name']}: {r['reason']}" for r in result["not_run"]]
    lines += ["", _machine_line(result), "", f"Command: `{result['command']}`"]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        written += plot(result, out_dir)
    except ImportError as exc:  # matplotlib is not part of the edge client
        result["analysis"].setdefault("notes", []).append(f"no plots: {exc}")
    result["files"] = [p.name for p in written] + ["bench.json", "results.md"]
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "results.md").write_text("# leukograph bench results (generated)\n\n" + markdown(result))
    return [out_dir / "bench.json", out_dir / "results.md", *written]


