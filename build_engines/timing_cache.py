"""TensorRT timing caches: one file per TensorRT version and compute capability, checked when attached, saved
without ever failing the build.

TensorRT 10 Python API reference, `IBuilderConfig`:
  `create_timing_cache(serialized_timing_cache)` -> ITimingCache (an empty buffer gives a new, empty cache);
  `set_timing_cache(cache, ignore_mismatch)` -> bool: the cache carries a header describing the device and
  TensorRT that made it; with `ignore_mismatch=False` a cache from another environment is refused and the call returns
  False; `get_timing_cache()` returns None when no cache is set. `ITimingCache.serialize()` -> IHostMemory.
And the Developer Guide, "Optimizing Builder Performance" > "Timing Cache": a cache is only valid for the device and
TensorRT version that produced it.

So: the file name carries the TensorRT version and the compute capability (`cache_file`); `set_timing_cache`'s result
is checked, and a refused file is replaced by a fresh cache rather than ignored or forced (`attach`); after the build
the cache object this code created and attached is serialized (not whatever `get_timing_cache()` returns, which may
be None), and a failure to save is a note in the build report, never an exception after model.plan exists (`save`).

The builder config is taken through the small `BuilderConfigLike` protocol (the two documented methods it calls), so
this logic runs here against a test double written from the same documentation (tests/test_build_engines.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from leukograph.deploy.paths import write_atomically


class TimingCacheLike(Protocol):
    def serialize(self) -> Any:
        """IHostMemory (a buffer) with the cache's bytes."""


class BuilderConfigLike(Protocol):
    def create_timing_cache(self, serialized_timing_cache: bytes) -> TimingCacheLike | None: ...

    def set_timing_cache(self, cache: TimingCacheLike, ignore_mismatch: bool) -> bool: ...


@dataclass
class TimingCacheUse:
    """What happened to the timing cache in one build, for the build report.

    status: "disabled" (no cache asked for, or compute capability unknown), "loaded" (the file was accepted),
    "new" (no file yet: a fresh cache), "replaced" (TensorRT refused the file: a fresh cache, the file is rewritten),
    "unusable" (TensorRT refused even a fresh cache: built without one)."""

    path: Path | None
    status: str
    cache: TimingCacheLike | None = None
    note: str = ""
    saved: bool = False

    def to_json(self) -> dict:
        return {"path": str(self.path) if self.path else None, "status": self.status, "saved": self.saved,
                "note": self.note or None}


def _safe(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z.+-]", "_", str(text))


def cache_file(directory: Path, tensorrt_version: str, compute_capability: str | None) -> Path | None:
    """`<directory>/timing-trt<version>-sm<major.minor>.cache`; None when the compute capability is unknown (a cache
    then cannot be keyed safely, so none is used)."""
    if not compute_capability:
        return None
    return directory / f"timing-trt{_safe(tensorrt_version)}-sm{_safe(compute_capability)}.cache"


def attach(config: BuilderConfigLike, path: Path | None, reason_disabled: str = "") -> TimingCacheUse:
    """Create a timing cache from `path` (or empty), attach it with ignore_mismatch=False and check that TensorRT
    took it; fall back to a fresh cache, then to none."""
    if path is None:
        return TimingCacheUse(None, "disabled", note=reason_disabled)
    note = ""
    blob = path.read_bytes() if path.exists() else b""
    if blob:
        cache = config.create_timing_cache(blob)
        if cache is not None and config.set_timing_cache(cache, False):
            return TimingCacheUse(path, "loaded", cache)
        why = "not readable as a timing cache" if cache is None else "made on another device or TensorRT"
        note = f"TensorRT refused {path.name} ({why}); built with a fresh cache, which replaces it"
    cache = config.create_timing_cache(b"")
    if cache is not None and config.set_timing_cache(cache, False):
        return TimingCacheUse(path, "replaced" if blob else "new", cache, note)
    return TimingCacheUse(path, "unusable", None, (note + "; " if note else "") + "TensorRT refused a fresh timing "
                          "cache too: built without one")


def save(use: TimingCacheUse) -> TimingCacheUse:
    """Serialize the cache object `attach` created to its file (atomically). Never raises: a failure becomes
    `use.note`, so nothing after the plan is written can fail the build."""
    if use.cache is None or use.path is None:
        return use
    try:
        data = bytes(use.cache.serialize())
        if not data:
            raise ValueError("serialize() returned no bytes")
        write_atomically(use.path, lambda tmp: tmp.write_bytes(data))
        use.saved = True
    except Exception as exc:  # the plan is already written: record, never raise
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        use.note = (use.note + "; " if use.note else "") + f"timing cache not saved ({detail})"
    return use
