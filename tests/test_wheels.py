"""deploy/bench/wheels.py on wheels laid out as the real ones: nvidia-pytriton's python-backend stubs, and
onnxruntime-gpu's ELF64 CUDA provider whose `.nv_fatbin` section holds cubins of two GPU generations in two
containers (the real wheels, 40 and 256 MB, are what `deploy/bench_gpu.sh pack` cut for the H200 run)."""

from __future__ import annotations

import base64
import hashlib
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from leukograph.client.errors import UserError
from leukograph.deploy.bench.wheels import (
    CUDA_PROVIDER,
    FATBIN_MAGIC,
    PROG,
    keep_one_sm,
    trim_onnxruntime_gpu,
    trim_pytriton,
)

PROVIDER_PATH = f"onnxruntime/capi/{CUDA_PROVIDER}"
TRIM_ORT = [sys.executable, "-m", "leukograph.deploy.bench.wheels", "onnxruntime-gpu"]
RECORD_PATH = "onnxruntime_gpu-1.31.1.dist-info/RECORD"
ENTRY_HEADER = 64


def fatbin_entry(sm: int, payload: bytes) -> bytes:
    header = struct.pack("<HHIQ", 2, 0x101, ENTRY_HEADER, len(payload)) + bytes(12) + struct.pack("<I", sm)
    return header.ljust(ENTRY_HEADER, b"\0") + payload


def fatbin_container(entries: list[bytes]) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body


def elf_with_fatbin(fatbin: bytes) -> tuple[bytes, int]:
    """A minimal ELF64: a text-like blob, the fatbin section, the section-name table, three section headers."""
    names = b"\0.nv_fatbin\0.shstrtab\0"
    text = b"\x90" * 40
    fatbin_at = 64 + len(text)
    names_at = fatbin_at + len(fatbin)
    headers_at = (names_at + len(names) + 7) // 8 * 8
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    elf_header = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, headers_at, 0, 64, 0, 0, 64, 3, 2)

    def section(name: int, kind: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, kind, 0, 0, offset, size, 0, 0, 8, 0)

    body = elf_header + text + fatbin + names
    body = body.ljust(headers_at, b"\0")
    body += section(0, 0, 0, 0) + section(1, 1, fatbin_at, len(fatbin)) + section(11, 3, names_at, len(names))
    return body, fatbin_at


def record_row(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


@pytest.fixture
def provider() -> tuple[bytes, dict[int, list[bytes]]]:
    payloads = {80: [b"A" * 100, b"B" * 50], 90: [b"C" * 70, b"D" * 30]}
    fatbin = (fatbin_container([fatbin_entry(80, payloads[80][0]), fatbin_entry(90, payloads[90][0])])
              + fatbin_container([fatbin_entry(90, payloads[90][1]), fatbin_entry(80, payloads[80][1])]))
    elf, _ = elf_with_fatbin(fatbin)
    return elf, payloads


def make_wheel(path: Path, provider_bytes: bytes | None) -> Path:
    files = {"onnxruntime/__init__.py": b"__version__ = '1.31.1'\n"}
    if provider_bytes is not None:
        files[PROVIDER_PATH] = provider_bytes
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        rows = [record_row(name, data) for name, data in files.items()] + [f"{RECORD_PATH},,"]
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(RECORD_PATH, "\n".join(rows) + "\n")
    return path


def test_keep_one_sm_zeroes_the_other_generations_only(provider: tuple[bytes, dict[int, list[bytes]]]) -> None:
    elf, payloads = provider
    trimmed, kept, zeroed = keep_one_sm(elf, 90)
    assert (kept, zeroed) == (2, 2) and len(trimmed) == len(elf)
    for payload in payloads[90]:  # sm_90's cubins untouched, each where it was
        assert trimmed.find(payload) == elf.find(payload) >= 0
    for payload in payloads[80]:  # sm_80's zeroed in place
        at = elf.find(payload)
        assert trimmed[at:at + len(payload)] == bytes(len(payload))
    changed = [i for i, (a, b) in enumerate(zip(elf, trimmed)) if a != b]
    assert len(changed) == sum(len(p) for p in payloads[80])  # headers and everything outside the payloads unchanged


def test_trim_wheel_rewrites_the_provider_and_its_record_row(provider: tuple[bytes, dict[int, list[bytes]]],
                                                             tmp_path: Path) -> None:
    elf, _ = provider
    wheel = make_wheel(tmp_path / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl", elf)
    assert trim_onnxruntime_gpu(wheel, 90) == 2
    with zipfile.ZipFile(wheel) as trimmed:
        assert trimmed.testzip() is None
        assert {i.compress_type for i in trimmed.infolist()} == {zipfile.ZIP_LZMA}
        assert trimmed.namelist()[-1] == RECORD_PATH
        rows = trimmed.read(RECORD_PATH).decode().splitlines()
        for row in rows:  # every hash in RECORD matches the new wheel's file, as pip reads it
            name, digest, size = row.rsplit(",", 2)
            if digest:
                assert row == record_row(name, trimmed.read(name))
        assert trimmed.read(PROVIDER_PATH) == keep_one_sm(elf, 90)[0]
    assert not wheel.with_suffix(".trim").exists()


def test_a_missing_generation_leaves_the_wheel_and_says_so(provider: tuple[bytes, dict[int, list[bytes]]],
                                                          tmp_path: Path) -> None:
    elf, _ = provider
    wheel = make_wheel(tmp_path / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl", elf)
    before = wheel.read_bytes()
    with pytest.raises(UserError, match="no sm_75 cubin"):
        trim_onnxruntime_gpu(wheel, 75)
    assert wheel.read_bytes() == before
    result = subprocess.run([*TRIM_ORT, str(wheel), "75"], capture_output=True, text=True)
    assert result.returncode == 1 and wheel.read_bytes() == before and not wheel.with_suffix(".trim").exists()
    assert result.stderr.strip() == f"{PROG}: error: {wheel.name}: {CUDA_PROVIDER}: no sm_75 cubin in the fatbin"


def test_a_wheel_without_the_provider_or_not_a_wheel_is_one_line(tmp_path: Path) -> None:
    plain = make_wheel(tmp_path / "onnxruntime-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl", None)
    not_a_zip = tmp_path / "broken.whl"
    not_a_zip.write_bytes(b"not a zip")
    for wheel, message in ((plain, f"{plain.name}: no {CUDA_PROVIDER} in it"), (not_a_zip, "File is not a zip file")):
        result = subprocess.run([*TRIM_ORT, str(wheel), "90"], capture_output=True, text=True)
        assert result.returncode == 1
        assert result.stderr.strip() == f"{PROG}: error: {message}"
    assert not plain.with_suffix(".trim").exists()


def test_pytriton_keeps_one_stub_and_its_record_rows(tmp_path: Path) -> None:
    """Other Pythons' stubs and the bundled libpython3.13 are dropped with their RECORD rows; every other file, row
    (line endings included) and the order are kept, RECORD where it stood."""
    stubs = "pytriton/tritonserver/python_backend_stubs"
    files = {"pytriton/__init__.py": b"", f"{stubs}/3.12/triton_python_backend_stub": b"stub 3.12",
             f"{stubs}/3.13/triton_python_backend_stub": b"stub 3.13", "nvidia_pytriton.libs/libpython3.13.so": b"lib",
             "nvidia_pytriton.libs/libz.so": b"z"}
    record = "nvidia_pytriton-0.7.0.dist-info/RECORD"
    rows = [record_row(name, data) + "\r\n" for name, data in files.items()] + [f"{record},,\r\n"]
    wheel = tmp_path / "nvidia_pytriton-0.7.0-py3-none-manylinux_2_35_x86_64.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as out:
        out.writestr(record, "".join(rows))  # first, as the real wheel has it before its last files
        for name, data in files.items():
            out.writestr(name, data)
    trim_pytriton(wheel, "3.12")
    kept = [record, "pytriton/__init__.py", f"{stubs}/3.12/triton_python_backend_stub", "nvidia_pytriton.libs/libz.so"]
    with zipfile.ZipFile(wheel) as trimmed:
        assert trimmed.namelist() == kept
        assert {i.compress_type for i in trimmed.infolist()} == {zipfile.ZIP_LZMA}
        assert all(trimmed.read(name) == files[name] for name in kept[1:])
        assert trimmed.read(record).decode() == "".join(row for row in rows if row.split(",", 1)[0] in kept)
    assert not wheel.with_suffix(".trim").exists()
