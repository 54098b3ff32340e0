"""onnxruntime-gpu's wheel cut to one GPU generation, so that it travels to a GPU machine that accepts 64 MiB per call.

Its CUDA provider (`libonnxruntime_providers_cuda.so`, 284 MB in 1.31.1) carries cubins for sm_75 to sm_120 in its
`.nv_fatbin` section, 218 MB of it. `keep_one_sm` zeroes every cubin but one generation's: the CUDA runtime loads the
cubin built for the card, and zeros compress to nothing. `trim_wheel` rewrites the wheel that way, LZMA-compressed,
with the changed file's RECORD hash: 256 -> 70 MB for sm_90 (H100, H200), on which every ONNX Runtime CUDA row of
`leukograph bench` ran (README "Measured on a GPU"). `deploy/bench_gpu.sh pack` calls it.

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
from pathlib import Path

from leukograph.client.errors import UserError

FATBIN_MAGIC = 0xBA55ED50
CUDA_PROVIDER = "libonnxruntime_providers_cuda.so"


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


def trim_wheel(wheel: Path, sm: int) -> int:
    """Rewrite `wheel` in place with only `sm`'s cubins in its CUDA provider, LZMA-compressed; the cubins kept.
    On any error the wheel is left as it was."""
    trimmed = wheel.with_suffix(".trim")
    try:
        kept = _write_trimmed(wheel, trimmed, sm)
    except BaseException:
        trimmed.unlink(missing_ok=True)
        raise
    trimmed.replace(wheel)
    return kept


def _write_trimmed(wheel: Path, trimmed: Path, sm: int) -> int:
    records, kept = {}, 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w") as dst:
        # RECORD last: it takes the new hash of the file changed before it
        for info in sorted(src.infolist(), key=lambda i: i.filename.endswith(".dist-info/RECORD")):
            data = src.read(info)
            if info.filename.endswith("/" + CUDA_PROVIDER):
                try:
                    data, kept, _ = keep_one_sm(data, sm)
                except UserError as exc:
                    raise UserError(f"{wheel.name}: {CUDA_PROVIDER}: {exc}") from None
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                records[info.filename] = f"{info.filename},sha256={digest},{len(data)}"
            if info.filename.endswith(".dist-info/RECORD"):
                rows = data.decode().splitlines()
                data = "".join(records.get(row.split(",", 1)[0], row) + "\n" for row in rows).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_LZMA)
    if not records:
        raise UserError(f"{wheel.name}: no {CUDA_PROVIDER} in it")
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leukograph.deploy.bench.cuda_wheel",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("wheel", type=Path, help="an onnxruntime-gpu wheel, rewritten in place")
    parser.add_argument("sm", type=int, help="the GPU's compute capability as one number (H100, H200: 90)")
    args = parser.parse_args(argv)
    try:
        kept = trim_wheel(args.wheel, args.sm)
    except (UserError, OSError, zipfile.BadZipFile) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.wheel.name}: kept {kept} sm_{args.sm} cubins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
