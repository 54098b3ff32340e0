"""Generated README sections: text between `<!-- NAME:start -->` and `<!-- NAME:end -->` comes from result JSON,
never typed by hand (evaluation, localisation and benchmark tables)."""

from __future__ import annotations

from pathlib import Path

from leukograph.deploy.paths import REPO_ROOT, write_atomically

README = REPO_ROOT / "README.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(name: str, body: str, readme: Path = README) -> bool:
    """Replace the section's body (appending the section if the markers are absent); True if the file changed.
    Written through a temporary file and a rename, so a reader never sees half a README."""
    start, end = markers(name)
    text = readme.read_text() if readme.exists() else ""
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        new = head + block + tail
    else:
        new = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    if new == text:
        return False
    write_atomically(readme, lambda tmp: tmp.write_text(new))
    return True


def section(name: str, readme: Path = README) -> str | None:
    """The current body of a section, or None if the markers are absent."""
    start, end = markers(name)
    text = readme.read_text() if readme.exists() else ""
    if start not in text or end not in text:
        return None
    return text.partition(start)[2].partition(end)[0].strip("\n")
