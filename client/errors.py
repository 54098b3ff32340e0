"""Errors that reach the user as one line and a non-zero exit, never as a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn


class UserError(Exception):
    """Bad input or environment the user can fix; the CLI prints it as one line."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_module(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, prefix: str) -> NoReturn:
    """`python -m` entry point: `main(parsed args)`'s exit code, or a UserError as one line `<prefix>: <message>`."""
    try:
        sys.exit(main(parser.parse_args()))
    except UserError as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
