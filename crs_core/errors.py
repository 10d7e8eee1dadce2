"""Errors a user can act on: each names what was wrong and where."""

from __future__ import annotations


class CRSError(Exception):
    """Base class for errors shown to users as one clear line."""


class InputError(CRSError):
    """Bad user-supplied input: names the file and, where known, the line."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.path = path
        self.line = line
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f", line {line}"
            where += ": "
        super().__init__(where + message)


class WorkspaceError(CRSError):
    """The workspace is missing something, locked, or from an unknown version."""
