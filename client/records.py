"""The per-file result record shared by `imgcls predict --json` and `imgcls batch`.

One place builds it so the two commands can never drift apart: scripts that parse one can parse the other.

    {"path": ..., "model": ..., "version": ..., "labels": [{"index": i, "name": ..., "score": ...}, ...]}
    {"path": ..., "error": {"code": "INVALID_ARGUMENT", "message": ...}}      # the gRPC status name
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol


class LabelLike(Protocol):
    index: int
    name: str
    score: float


# Read errors get the gRPC status name that describes them best, so error rows look alike whoever failed.
_READ_ERROR_CODES: dict[type[OSError], str] = {FileNotFoundError: "NOT_FOUND", PermissionError: "PERMISSION_DENIED"}


def ok_record(path: str, model: str, version: int, labels: Iterable[LabelLike]) -> dict[str, Any]:
    return {"path": path, "model": model, "version": version,
            "labels": [{"index": lb.index, "name": lb.name, "score": round(lb.score, 6)} for lb in labels]}


def error_record(path: str, code: str, message: str) -> dict[str, Any]:
    return {"path": path, "error": {"code": code, "message": message}}


def read_error_record(path: str, exc: OSError) -> dict[str, Any]:
    """The record of a file that could not be read (missing, no permission, a directory, ...)."""
    code = next((c for t, c in _READ_ERROR_CODES.items() if isinstance(exc, t)), "INVALID_ARGUMENT")
    return error_record(path, code, exc.strerror or str(exc))
