"""Which TensorRT versions the builder supports, and whether a plan can load where it will be served.

Version gate. The builder is written against the TensorRT 10 Python API (TensorRT 10.x "Python API" reference):
strongly typed networks (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`), name-based I/O, `IBuilderConfig.
set_timing_cache` returning a bool. It gates on 10.x only: below 10 the name-based I/O it uses does not exist, and
11.x removes `BuilderFlag.FP16` and `IBuilder.platform_has_fast_fp16` (TensorRT 10.x -> 11 migration notes; both
deprecated during 10.x) and has not been checked against this code. FP16 comes from the FP16 ONNX graph
(`fp16.py`), built strongly typed, so no removed flag is used; widening the gate to 11 needs only a check of the
calls listed in build.py's docstring against the 11.x reference.

Plan/server match. A serialized engine loads only on the TensorRT version that built it (TensorRT 10 Developer
Guide, "Version Compatibility": engines are compatible only with the TensorRT version used to build them unless
built version-compatible) and on the kind of GPU it was built for ("Hardware Compatibility"). Triton's TensorRT
backend then fails the model load with "Version tag does not match" (triton-inference-server/server issue #7613).
`plans_match` compares what a build report recorded with what the server will load.

The server's TensorRT version: `--serving-tensorrt-version`, else `$TRT_VERSION` when set, else the libnvinfer the
dynamic loader finds (the one Triton's TensorRT backend links, when run inside the serving container), asked through
its exported C functions `getInferLibMajorVersion` ... `getInferLibBuildVersion` where present (TensorRT 10 C++ API,
NvInferRuntime.h), else `getInferLibVersion`, decoded with NvInferVersion.h's NV_TENSORRT_VERSION encoding
(major * 10000 + minor * 100 + patch from TensorRT 10, major * 1000 + minor * 100 + patch before).
"""

from __future__ import annotations

import ctypes
import os
import re

from leukograph.client.errors import UserError

SUPPORTED_MAJOR = 10
LIBNVINFER_NAMES = ("libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so")
VERSION_ENV = "TRT_VERSION"


class UnsupportedTensorRT(UserError):
    """The importable TensorRT is not a version this builder supports."""


def parse_version(text: str) -> tuple[int, ...]:
    """`10.3.0.26` -> (10, 3, 0, 26); `10.8.0.post1` -> (10, 8, 0). Leading numeric components only."""
    parts = []
    for piece in str(text).strip().split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
        if match.group() != piece:
            break
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts)


def check_supported(version: str) -> None:
    """Raise UnsupportedTensorRT (one line) unless `version` is TensorRT 10.x."""
    major = parse_version(version)[0]
    if major < SUPPORTED_MAJOR:
        raise UnsupportedTensorRT(f"TensorRT {version} found; this builder needs TensorRT {SUPPORTED_MAJOR}.x "
                                  f"(name-based I/O and strongly typed networks)")
    if major > SUPPORTED_MAJOR:
        raise UnsupportedTensorRT(f"TensorRT {version} found; this builder supports TensorRT {SUPPORTED_MAJOR}.x "
                                  f"only (checked against the TensorRT {SUPPORTED_MAJOR} API; {major}.x removes "
                                  f"BuilderFlag.FP16 and has not been checked): build in a container with TensorRT "
                                  f"{SUPPORTED_MAJOR}.x")


def plans_match(built: str, serving: str) -> bool:
    """Same TensorRT release: equal major.minor.patch, and equal build number when both sides name one."""
    a, b = parse_version(built), parse_version(serving)
    if len(a) < 3 or len(b) < 3:
        return False
    return a[:3] == b[:3] and (len(a) < 4 or len(b) < 4 or a[3] == b[3])


def same_compute_capability(built: str | None, serving: str | None) -> bool | None:
    """True/False when both are known, None when either is unknown."""
    if not built or not serving:
        return None
    return parse_version(built)[:2] == parse_version(serving)[:2]


def decode_lib_version(value: int) -> str:
    """getInferLibVersion()'s integer as major.minor.patch (encoding changed in TensorRT 10, see module docstring)."""
    if value >= 100000:
        return f"{value // 10000}.{value // 100 % 100}.{value % 100}"
    return f"{value // 1000}.{value // 100 % 10}.{value % 100}"


def libnvinfer_version(names: tuple[str, ...] = LIBNVINFER_NAMES) -> str | None:
    """The version of the libnvinfer the dynamic loader finds, or None when there is none."""
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        getters = ("getInferLibMajorVersion", "getInferLibMinorVersion", "getInferLibPatchVersion",
                   "getInferLibBuildVersion")
        if all(hasattr(lib, getter) for getter in getters):
            return ".".join(str(int(getattr(lib, getter)())) for getter in getters)
        if hasattr(lib, "getInferLibVersion"):
            return decode_lib_version(int(lib.getInferLibVersion()))
    return None


def serving_tensorrt_version(explicit: str | None = None) -> tuple[str | None, str]:
    """(version, where it came from) of the TensorRT the server will load; (None, reason) when nothing says."""
    if explicit:
        return explicit, "--serving-tensorrt-version"
    if os.environ.get(VERSION_ENV):
        return os.environ[VERSION_ENV], f"${VERSION_ENV}"
    found = libnvinfer_version()
    if found:
        return found, "libnvinfer found by the dynamic loader"
    return None, f"no --serving-tensorrt-version, no ${VERSION_ENV} and no libnvinfer on the library path"
