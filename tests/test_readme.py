"""The README's commands are tested (as in Polygraphy's examples): the test command is what CI runs, and the
main-job command runs here end to end, exactly as written."""

from __future__ import annotations

import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

from leukograph.deploy.paths import REPO_ROOT

README = REPO_ROOT / "README.md"


def readme_commands() -> list[str]:
    """The bash code blocks before the first section heading: the main-job command, then the test command."""
    head = README.read_text().split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", head, re.S)]


def test_readme_starts_with_two_commands_that_create_the_venv() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    for command in commands:
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install")


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci
    assert '"$rc" -eq 5' in ci  # pytest's "no tests collected" is a failure, not a pass


@pytest.mark.server
def test_readme_main_job_runs(tmp_path: Path) -> None:
    """Starts the real CPU Triton server, streams the held-out frames, prints the differential and latency."""
    command = readme_commands()[0].replace("leukograph demo", f"leukograph demo --db {tmp_path / 'demo.sqlite'}")
    result = subprocess.run(["bash", "-c", command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "Triton ready" in out
    assert "95% CI (Wilson)" in out
    assert "Latency capture->labels: p50" in out
    with sqlite3.connect(tmp_path / "demo.sqlite") as db:
        frames = db.execute("SELECT COUNT(*) FROM frames").fetchone()[0]
        cells = db.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    assert frames >= 70 and cells > frames
