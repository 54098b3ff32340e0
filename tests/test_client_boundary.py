"""The edge client is only the client: `client/` imports nothing of leukograph outside `client/`, and the package
installed with no extras into a fresh environment streams real frames through the real server."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from leukograph.deploy.paths import PACKAGE_ROOT
from leukograph.deploy.server import TritonServer

CLIENT = PACKAGE_ROOT / "client"
# What a base install must not pull: the extras' heavy pieces.
EXTRAS_ONLY = {"torch", "torch-geometric", "onnxruntime", "onnx", "nvidia-pytriton", "matplotlib", "scikit-learn",
               "albumentations"}
# What `pip install <checkout>` needs of the checkout: the build file, the README it names, the packages.
INSTALL_FILES = ("pyproject.toml", "README.md", "client", "training", "build_engines", "deploy")


def leukograph_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `import`/`from ... import` of a leukograph module in one file, nested ones included;
    a relative import counts as leaving its package when it climbs above it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "leukograph"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, "." * node.level + (node.module or "")))
            elif (node.module or "").split(".")[0] == "leukograph":
                found.append((node.lineno, node.module))
    return found


def is_client_module(module: str) -> bool:
    return module == "leukograph.client" or module.startswith("leukograph.client.") or (
        module.startswith(".") and not module.startswith(".."))


def test_client_imports_nothing_outside_client() -> None:
    files = sorted(CLIENT.rglob("*.py"))
    assert len(files) > 10
    outside = [f"{path.relative_to(PACKAGE_ROOT)}:{line}: {module}" for path in files
               for line, module in leukograph_imports(path) if not is_client_module(module)]
    assert outside == [], "client/ must import only client/: " + "; ".join(outside)


def test_import_rule_sees_nested_and_relative_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom leukograph.client import contract\n\n\ndef f():\n"
                      "    from leukograph.training import models\n    import leukograph.deploy.server\n"
                      "    from .. import runners\n    from . import boxes\n")
    found = leukograph_imports(sample)
    assert [m for _, m in found if not is_client_module(m)] == ["leukograph.training", "leukograph.deploy.server",
                                                                ".."]


@pytest.mark.slow
@pytest.mark.server
def test_base_install_streams_against_the_server(triton_server: TritonServer, tmp_path: Path) -> None:
    """`pip install leukograph` (no extras) into a fresh venv: no torch, `stream --help`, and a real stream."""
    source = tmp_path / "source"
    source.mkdir()
    for name in INSTALL_FILES:
        copy = shutil.copytree if (PACKAGE_ROOT / name).is_dir() else shutil.copy2
        copy(PACKAGE_ROOT / name, source / name, **({"ignore": shutil.ignore_patterns(
            "__pycache__", "*.onnx", "*.onnx.data", "*.plan")} if copy is shutil.copytree else {}))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(source)], capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    listed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format=json"], capture_output=True, text=True,
                            timeout=120, check=True)
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert "leukograph" in installed and "pillow" in installed
    assert not installed & EXTRAS_ONLY, f"a base install pulled {sorted(installed & EXTRAS_ONLY)}"

    leukograph = str(venv / "bin" / "leukograph")
    shown = subprocess.run([leukograph, "stream", "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "usage: leukograph stream" in shown.stdout, shown.stderr

    frames = tmp_path / "frames"
    from test_stream import write_png_folder  # tests/ is on sys.path under pytest

    written = write_png_folder(frames, count=3)
    db, summary = tmp_path / "results.sqlite", tmp_path / "summary.json"
    streamed = subprocess.run([leukograph, "stream", str(frames), "--url", triton_server.grpc_url, "--db", str(db),
                               "--sample", "base-install", "--json-summary", str(summary)],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert result["frames"]["recorded"] == len(written) and result["cells_recorded"] > 0, result
