"""Bad image files get one line each and the good ones still run (issue cases 7-11), with real files.

`leukograph classify` runs once over a mixed set (good JPEG, decompression-bomb PNG, a name with a space, a truncated
JPEG, a name with a newline, an animated GIF); each test checks one case of that run. `leukograph stream` over a
folder holding a bomb runs against the real Triton server.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukograph.client.images import ImageError, list_images, read_image, safe_name
from leukograph.deploy.server import TritonServer
from leukograph.training.datasets import load_bccd

LEUKOGRAPH = [sys.executable, "-m", "leukograph.client.cli"]
TIMEOUT_S = 300


def write_bomb_png(path: Path, side: int = 60000) -> Path:
    """A valid PNG whose header declares side x side RGB pixels (one tiny IDAT: decoding it would need GBs)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def bccd_jpegs(count: int) -> list[Path]:
    return [frame.image_path for frame in load_bccd()[:count]]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("mixed_files")
    good, spaced, newline_source = bccd_jpegs(3)
    files = {
        "good": folder / "good.jpg",
        "bomb": write_bomb_png(folder / "bomb.png"),
        "space": folder / "with space.jpg",
        "truncated": folder / "truncated.jpg",
        "newline": folder / "new\nline.jpg",
        "animated": folder / "animated.gif",
    }
    shutil.copy(good, files["good"])
    shutil.copy(spaced, files["space"])
    shutil.copy(newline_source, files["newline"])
    data = good.read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 3])  # its first third
    rgb = read_image(good)
    frames = [Image.fromarray(rgb), Image.fromarray(np.ascontiguousarray(rgb[::-1]))]
    frames[0].save(files["animated"], save_all=True, append_images=frames[1:], duration=100, loop=0)
    order = ["good", "bomb", "space", "truncated", "newline", "animated"]
    result = subprocess.run([*LEUKOGRAPH, "classify", *(str(files[k]) for k in order)], capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    return {"files": files, "result": result, "out": result.stdout.splitlines(), "err": result.stderr.splitlines()}


def _error_line(mixed: dict, key: str) -> str:
    name = safe_name(mixed["files"][key])
    lines = [line for line in mixed["err"] if line.startswith(f"leukograph classify: error: {name}: ")]
    assert len(lines) == 1, mixed["result"].stderr
    return lines[0]


def test_bomb_is_one_line_and_the_next_file_still_runs(mixed: dict) -> None:
    """Case 7: a PNG with a 60000x60000 header is refused from its header; the file after it is classified."""
    assert mixed["result"].returncode == 1
    assert "Traceback" not in mixed["result"].stderr
    assert "refused before decoding" in _error_line(mixed, "bomb")
    assert any(line.startswith(f"{mixed['files']['space']}: ") and "cells" in line for line in mixed["out"])
    assert any(line.startswith(f"{mixed['files']['good']}: ") for line in mixed["out"])
    with pytest.raises(ImageError, match="refused before decoding"):
        read_image(mixed["files"]["bomb"])


def test_truncated_jpeg_is_refused(mixed: dict) -> None:
    """Case 10: the first third of a JPEG is not a frame with fewer cells; it is refused as truncated."""
    assert _error_line(mixed, "truncated").endswith("image data is truncated")
    assert not any(line.startswith(str(mixed["files"]["truncated"])) for line in mixed["out"])


def test_names_are_printed_safely_and_animation_is_named(mixed: dict) -> None:
    """Case 11: a newline in a name does not split the output; an animated GIF is called animated, not corrupt."""
    quoted = json.dumps(str(mixed["files"]["newline"]))
    assert sum(line.startswith(f"{quoted}: ") for line in mixed["out"]) == 1
    assert len(mixed["out"]) == 3  # good, with space, new\nline: one line each
    assert "animated image with 2 frames" in _error_line(mixed, "animated")
    assert mixed["err"][-1] == "leukograph classify: 3 of 6 inputs failed"


def _without_root_powers() -> list[str]:
    """As root, permissions are only enforced once the capabilities that bypass them are dropped."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]


def test_unreadable_folder_and_file_inside_it(tmp_path: Path) -> None:
    """Case 9: a file inside an unreadable folder and the folder itself: one line each, non-zero exit."""
    locked = tmp_path / "locked"
    locked.mkdir()
    shutil.copy(bccd_jpegs(1)[0], locked / "a.jpg")
    code = ("import sys; from leukograph.client.images import list_images; "
            "images, problems = list_images(sys.argv[1:]); print(len(images)); "
            "[print(f'{p}: {why}') for p, why in problems]")
    locked.chmod(0)
    try:
        listing = subprocess.run([*_without_root_powers(), sys.executable, "-c", code, str(locked),
                                  str(locked / "a.jpg")], capture_output=True, text=True, timeout=60)
        result = subprocess.run([*_without_root_powers(), *LEUKOGRAPH, "classify", str(locked / "a.jpg"),
                                 str(locked)], capture_output=True, text=True, timeout=TIMEOUT_S)
    finally:
        locked.chmod(0o755)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines() == ["0", f"{locked}: folder not readable: permission denied",
                                           f"{locked / 'a.jpg'}: permission denied"]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert f"leukograph classify: error: {locked / 'a.jpg'}: permission denied" in lines
    assert f"leukograph classify: error: {locked}: folder not readable: permission denied" in lines
    # Readable again: the same paths list the image once.
    assert list_images([locked])[0] == [locked / "a.jpg"]


@pytest.mark.server
def test_stream_folder_with_a_bomb_skips_it_and_goes_on(triton_server: TritonServer, tmp_path: Path) -> None:
    """Case 8: the bomb is skipped and listed, every file after it is streamed and recorded."""
    from leukograph.client.records import ResultStore

    folder = tmp_path / "frames"
    folder.mkdir()
    first, second, third = bccd_jpegs(3)
    shutil.copy(first, folder / "0_good.jpg")
    write_bomb_png(folder / "1_bomb.png")
    shutil.copy(second, folder / "2_good.jpg")
    shutil.copy(third, folder / "3_good.jpg")
    db, summary_path = tmp_path / "r.sqlite", tmp_path / "s.json"
    result = subprocess.run([*LEUKOGRAPH, "stream", str(folder), "--url", triton_server.grpc_url, "--db", str(db),
                             "--sample", "bomb", "--json-summary", str(summary_path)], capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "source failed" not in result.stderr
    skipped = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "1_bomb.png" in skipped[0] and "refused before decoding" in skipped[0]
    summary = json.loads(summary_path.read_text())
    assert summary["frames"]["recorded"] == 3
    assert [Path(f["path"]).name for f in summary["skipped_files"]] == ["1_bomb.png"]
    assert "Skipped files: 1" in result.stdout
    with ResultStore(db, create=False) as store:
        assert [Path(f["source"]).name for f in store.frames("bomb")] == ["0_good.jpg", "2_good.jpg", "3_good.jpg"]


def test_microscope_camera_formats_are_read_and_classified_like_the_same_pixels(tmp_path: Path) -> None:
    """TIFF, WebP and JPEG 2000, as microscope cameras save them, give the same pixels as the PNG of a real BCCD
    frame, and `classify` the same answer; 16-bit grey TIFF is scaled to 8 bits (not clipped to white); a
    multi-page TIFF is one line."""
    rgb = read_image(load_bccd()[0].image_path)
    image = Image.fromarray(rgb)
    png, tiff, webp, jp2 = (tmp_path / name for name in ("frame.png", "frame.tif", "frame.webp", "frame.jp2"))
    image.save(png)
    image.save(tiff, compression="tiff_lzw")
    image.save(webp, lossless=True)
    image.save(jp2)  # Pillow's JPEG 2000 default is the reversible (lossless) transform
    for path in (tiff, webp, jp2):
        assert np.array_equal(read_image(path), rgb), path
    grey = (rgb.mean(axis=2) * 257).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.tif")  # mode I;16
    decoded = read_image(tmp_path / "grey16.tif")
    assert decoded.shape == rgb.shape and np.array_equal(decoded[..., 0], np.rint(grey / 257).astype(np.uint8))
    image.save(tmp_path / "pages.tif", save_all=True, append_images=[Image.fromarray(rgb[::-1].copy())])
    with pytest.raises(ImageError, match="2 frames"):
        read_image(tmp_path / "pages.tif")
    result = subprocess.run([*LEUKOGRAPH, "classify", "--json", "--views", "1", str(png), str(tiff), str(webp),
                             str(jp2)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 4
    for record in records[1:]:
        assert record["cells"] == records[0]["cells"] and record["white_cell"] == records[0]["white_cell"]
    assert list_images([tmp_path]) == (sorted([png, tiff, webp, jp2, tmp_path / "grey16.tif",
                                               tmp_path / "pages.tif"]), [])
