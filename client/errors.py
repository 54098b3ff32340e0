"""Errors that reach the user as one line and a non-zero exit, never as a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment the user can fix; the CLI prints it as one line."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
