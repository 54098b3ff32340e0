"""The allocator settings (`training/heap.py`): a large tensor freed and allocated again reuses the heap's pages
instead of faulting in fresh ones, and `release_freed_memory` hands freed pages back. Each case runs in a fresh
interpreter, so the test process keeps glibc's defaults. The commands that run the CNN over many crops set it by
default."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from leukograph.client.cli import COMMANDS

# Allocate, write and free a 100 MB tensor (a CNN step's activation size) ten times to settle, then ten times more;
# report the minor page faults of the last ten, and the resident set after freeing it, before and after
# release_freed_memory.
PROBE = """
import json, resource, sys
import torch
from leukograph.training.heap import keep_freed_memory, release_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss_kb():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])
def step():
    x = torch.empty(25 * 2**20, dtype=torch.float32)
    x.fill_(1.0)
    del x
for _ in range(10):  # the heap settles
    step()
before = faults()
for _ in range(10):
    step()
after = faults()
freed_rss = rss_kb()
release_freed_memory()
print(json.dumps({"kept": kept, "faults": after - before, "freed_rss_kb": freed_rss, "released_rss_kb": rss_kb()}))
"""
PAGES_PER_TENSOR = 100 * 2**20 // 4096


def _probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_memory_is_reused_and_released() -> None:
    default, kept = _probe("default"), _probe("keep")
    assert kept["kept"] is True
    # glibc's default maps each 100 MB tensor afresh: every page of every one of the ten faults in
    assert default["faults"] >= 10 * PAGES_PER_TENSOR
    # kept in the heap: the settled heap's pages are reused
    assert kept["faults"] < PAGES_PER_TENSOR // 10
    # the freed tensor stays resident until released, then goes back
    assert kept["freed_rss_kb"] - kept["released_rss_kb"] > 90 * 1024


@pytest.mark.parametrize("command", ["train", "evaluate", "classify", "tradeoff", "framing"])
def test_commands_that_run_the_cnn_keep_freed_memory_unless_told_not_to(command: str) -> None:
    module = importlib.import_module(COMMANDS[command][0])
    parser = module.get_args_parser()
    assert parser.get_default("keep_freed_memory") is True
    required = {"tradeoff": ["cnn.pt"], "classify": ["cell.png"]}.get(command, [])
    assert parser.parse_args([*required, "--no-keep-freed-memory"]).keep_freed_memory is False
