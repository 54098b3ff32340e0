"""glibc's allocator, set for the commands that run the CNN over many crops on the CPU (train, evaluate, classify,
tradeoff, framing).

By default glibc maps every allocation above its mmap threshold (at most 32 MB) afresh and unmaps it on free. A CNN
training step on the CPU allocates and frees activations of ~100 MB every step, so each step faults in and zeroes
gigabytes of new pages: a third of the training's CPU time was kernel time (`/usr/bin/time -v`, README "Training of
the committed weights"). `keep_freed_memory` makes glibc serve every allocation from its heap and keep what is
freed there for the next step; `release_freed_memory`, called once an epoch, hands the heap's free pages back, so
that what one epoch freed is not kept resident into the next. Results are bit-identical; only where the memory comes
from changes. The evaluation runs batches of crops through the CNN the same way and gained as much (README
"Training of the committed weights").
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

TOP_PAD_BYTES = 256 << 20  # grow the heap in steps of at least this much
NEVER_TRIM_BYTES = 2**31 - 1  # the largest value mallopt takes (an int)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    libc_name = ctypes.util.find_library("c")  # may start a subprocess: looked up once
    return None if libc_name is None else ctypes.CDLL(libc_name)


def _libc_function(name: str):
    libc = _libc()
    return None if libc is None else getattr(libc, name, None)


def keep_freed_memory() -> bool:
    """No mmap for allocations, the heap's top trimmed only when 2 GB of it are free. False (nothing changed) where
    the C library is not glibc (no `mallopt`)."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM_BYTES), (M_TOP_PAD, TOP_PAD_BYTES))
    applied = [mallopt(param, value) == 1 for param, value in settings]  # every setting tried, whichever fails
    return all(applied)


def release_freed_memory() -> None:
    """Return the heap's wholly free pages to the system (glibc `malloc_trim`; nothing elsewhere)."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim.argtypes, malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
        malloc_trim(0)


def add_keep_freed_memory_argument(parser: argparse.ArgumentParser) -> None:
    """`--keep-freed-memory` (the default) / `--no-keep-freed-memory`, for the commands that run the CNN over many
    crops: train, evaluate, classify, tradeoff, framing."""
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="serve every allocation from the heap and keep freed memory there for the next step "
                        "(glibc; on by default: far less kernel time, the same results; --no-keep-freed-memory: "
                        "glibc's defaults; README \"Training of the committed weights\")")


def apply_keep_freed_memory(args: argparse.Namespace) -> None:
    if args.keep_freed_memory:
        keep_freed_memory()
