"""Wheels cut down so that they travel to a GPU machine that accepts 64 MiB per call (`deploy/bench_gpu.sh pack`).

`rewrite_wheel` rewrites a wheel in place, LZMA-compressed (pip reads it like any zip): files dropped or edited by
name, RECORD following (the dropped files' rows out, the edited files rehashed, every other byte of it kept).

* nvidia-pytriton (`trim_pytriton`): only the GPU machine's Python stub travels; the other stubs and the bundled
  libpython3.13 that only the 3.13 stub links (13 MB) are dropped: 39.5 -> 27.4 MB.
* onnxruntime-gpu (`trim_onnxruntime_gpu`): its CUDA provider (`libonnxruntime_providers_cuda.so`, 284 MB in 1.31.1)
  carries cubins for sm_75 to sm_120 in its `.nv_fatbin` section, 218 MB of it. `keep_one_sm` zeroes every cubin but
  one generation's: the CUDA runtime loads the cubin built for the card, and zeros compress to nothing. 256 -> 70 MB
  for sm_90 (H100, H200), on which every ONNX Runtime CUDA row of `leukograph bench` ran (README "Measured on a GPU").

Fatbin layout (CUDA's fatbinary.h): containers of a 16-byte header (magic 0xBA55ED50, version, header size, size of
the entries), each entry a header (kind, version, header size, payload size, ..., the SM at byte 28) and its payload.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from leukograph.client.errors import UserError

FATBIN_MAGIC = 0xBA55ED50
CUDA_PROVIDER = "libonnxruntime_providers_cuda.so"
RECORD_SUFFIX = ".dist-info/RECORD"
PROG = "python -m leukograph.deploy.bench.wheels"


def record_row(name: str, data: bytes) -> str:
    """A wheel RECORD row: name, urlsafe-base64 sha256 without padding, size."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def rewrite_wheel(wheel: Path, drop: Callable[[str], bool] = lambda name: False,
                  edit: Callable[[str], Callable[[bytes], bytes] | None] = lambda name: None) -> None:
    """Rewrite `wheel` in place, LZMA-compressed, without the files `drop` names and with each file `edit` returns a
    change for changed by it; RECORD's rows follow, each row's line ending kept. Every file is read once (the edited
    ones first, so RECORD can take their new hashes wherever it lies). On any error the wheel is left as it was."""
    trimmed = wheel.with_suffix(".trim")
    try:
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w") as dst:
            infos = [info for info in src.infolist() if not drop(info.filename)]
            edited = {}
            for info in infos:
                change = edit(info.filename)
                if change is not None:
                    edited[info.filename] = change(src.read(info))
            for info in infos:
                data = edited[info.filename] if info.filename in edited else src.read(info)
                if info.filename.endswith(RECORD_SUFFIX):
                    rows = []
                    for row in data.decode().splitlines(keepends=True):
                        name = row.split(",", 1)[0]
                        if name in edited:
                            row = record_row(name, edited[name]) + row[len(row.rstrip("\r\n")):]
                        if not drop(name):
                            rows.append(row)
                    data = "".join(rows).encode()
                dst.writestr(info, data, compress_type=zipfile.ZIP_LZMA)
    except BaseException:
        trimmed.unlink(missing_ok=True)
        raise
    trimmed.replace(wheel)


def trim_pytriton(wheel: Path, python_version: str) -> None:
    """nvidia-pytriton with `python_version`'s python-backend stub only, and without the bundled libpython3.13."""
    def dropped(name: str) -> bool:
        stub = "/python_backend_stubs/" in name and f"/python_backend_stubs/{python_version}/" not in name
        return stub or name.startswith("nvidia_pytriton.libs/libpython3")

    rewrite_wheel(wheel, drop=dropped)


def elf_section(elf: bytes, wanted: str) -> tuple[int, int]:
    """(file offset, size) of an ELF64 little-endian section by name."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise UserError("not an ELF64 file")
    (section_headers,) = struct.unpack_from("<Q", elf, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        (name,) = struct.unpack_from("<I", elf, section_headers + i * entry_size)
        offset, size = struct.unpack_from("<QQ", elf, section_headers + i * entry_size + 0x18)
        return name, offset, size

    names_at = header(names_index)[1]
    for i in range(count):
        name, offset, size = header(i)
        if elf[names_at + name:].split(b"\0", 1)[0] == wanted.encode():
            return offset, size
    raise UserError(f"no {wanted} section")


def keep_one_sm(elf: bytes, sm: int) -> tuple[bytes, int, int]:
    """`elf` with every cubin of its `.nv_fatbin` section but `sm`'s zeroed: (new bytes, entries kept, zeroed)."""
    out = bytearray(elf)
    start, size = elf_section(elf, ".nv_fatbin")
    pos, kept, zeroed = start, 0, 0
    while pos + 16 <= start + size:
        magic, _, header_size, entries_size = struct.unpack_from("<IHHQ", out, pos)
        if magic != FATBIN_MAGIC:  # containers start 8-byte aligned
            pos += 8
            continue
        entry, end = pos + header_size, pos + header_size + entries_size
        while entry < end:
            _, _, entry_header, payload = struct.unpack_from("<HHIQ", out, entry)
            (entry_sm,) = struct.unpack_from("<I", out, entry + 28)
            if entry_sm == sm:
                kept += 1
            else:
                out[entry + entry_header:entry + entry_header + payload] = bytes(payload)
                zeroed += 1
            entry += entry_header + payload
        pos = end
    if not kept:
        raise UserError(f"no sm_{sm} cubin in the fatbin")
    return bytes(out), kept, zeroed


def trim_onnxruntime_gpu(wheel: Path, sm: int) -> int:
    """onnxruntime-gpu with only `sm`'s cubins in its CUDA provider; the cubins kept."""
    kept = []

    def keep(elf: bytes) -> bytes:
        try:
            trimmed, count, _ = keep_one_sm(elf, sm)
        except UserError as exc:
            raise UserError(f"{wheel.name}: {CUDA_PROVIDER}: {exc}") from None
        kept.append(count)
        return trimmed

    rewrite_wheel(wheel, edit=lambda name: keep if name.endswith("/" + CUDA_PROVIDER) else None)
    if not kept:
        raise UserError(f"{wheel.name}: no {CUDA_PROVIDER} in it")
    return kept[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    pytriton = kinds.add_parser("pytriton", help="keep one Python version's python-backend stub")
    pytriton.add_argument("wheel", type=Path, help="an nvidia-pytriton wheel, rewritten in place")
    pytriton.add_argument("python_version", help="the GPU machine's Python, e.g. 3.12")
    ort = kinds.add_parser("onnxruntime-gpu", help="keep one GPU generation's cubins")
    ort.add_argument("wheel", type=Path, help="an onnxruntime-gpu wheel, rewritten in place")
    ort.add_argument("sm", type=int, help="the GPU's compute capability as one number (H100, H200: 90)")
    args = parser.parse_args(argv)
    try:
        if args.kind == "pytriton":
            trim_pytriton(args.wheel, args.python_version)
        else:
            kept = trim_onnxruntime_gpu(args.wheel, args.sm)
            print(f"{args.wheel.name}: kept {kept} sm_{args.sm} cubins")
    except (UserError, OSError, zipfile.BadZipFile) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
