"""Exceptions raised by the data package."""

from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """Base class for every problem with dataset files, locations or downloads."""


class CorruptFile(DataError):
    """A dataset file is truncated, malformed or does not hold what its name promises.

    Args:
        path: the offending file (or folder).
        problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ChecksumMismatch(CorruptFile):
    """A file's digest differs from every digest known for it."""


class DatasetNotFound(DataError):
    """The dataset is in none of the places searched and could not be downloaded."""


class DownloadError(DataError):
    """Every mirror failed for a file; the message lists each attempt and its error."""
