"""The one request path of the client side: files in, one record per file out.

`imgcls predict` and `imgcls batch` used to each read files, send them and turn the answers into records,
and each handled the same edge cases (a file that cannot be read, an image the server rejects, a single-image
request refused as a whole). Both now go through `read_files` and `send`; what differs is only what happens
around them (batch retries, splits and resumes; predict prints).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from imgcls.client.client import Client, ErrorInfo, ServiceError
from imgcls.client.records import error_record, ok_record, read_error_record
from imgcls.errors import ImgclsError

Record = dict[str, Any]


class ServerUnreachable(ImgclsError):
    """The server could not be reached at all: `imgcls batch` documents exit code 3 for it."""

    exit_code = 3


def short_reason(exc: ServiceError) -> str:
    """gRPC's connection errors in a few words ("failed to connect to all addresses; last error: UNKNOWN:
    ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused" is "connection refused")."""
    message = exc.message
    lowered = message.lower()
    if "refused" in lowered:
        return "connection refused"
    if "dns resolution failed" in lowered or "name resolution" in lowered:
        return "host name not found"
    if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer before the deadline"
    return message.splitlines()[0][:160] if message else exc.code.name


def unreachable(target: str, exc: ServiceError) -> ServerUnreachable:
    """The error for a server that does not answer, naming the target and the fix."""
    return ServerUnreachable(f"cannot reach {target} ({exc.code.name}: {short_reason(exc)}); is imgcls serve "
                             f"running at {target}? set --target or IMGCLS_TARGET")


def is_unreachable(exc: ServiceError) -> bool:
    """UNAVAILABLE (nothing listening, name not resolved) or a deadline hit before any answer."""
    return exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# The client channel's message limit, as the server's default: a larger file cannot be sent at all.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def read_files(paths: Sequence[str | Path], max_bytes: int = MAX_MESSAGE_BYTES,
               ) -> tuple[list[tuple[str, bytes]], list[tuple[int, Record]]]:
    """(path, bytes) of the readable files, and (position, error record) of those that are not: missing,
    not readable, a folder, or larger than a request may carry (checked before reading: `read()` would
    allocate the whole size up front)."""
    items: list[tuple[str, bytes]] = []
    errors: list[tuple[int, Record]] = []
    for i, path in enumerate(map(str, paths)):
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > max_bytes:
                    errors.append((i, error_record(path, "INVALID_ARGUMENT", f"file is {size} bytes, over the "
                                                   f"{max_bytes} bytes a request may carry")))
                    continue
                items.append((path, f.read()))
        except OSError as exc:
            errors.append((i, read_error_record(path, exc)))
    return items, errors


def send(client: Client, group: Sequence[tuple[str, bytes]], *, model: str, version: int, top_k: int,
         timeout: float | None, single_invalid_is_row: bool = True) -> list[Record]:
    """One Predict request for `group`; one record per file, in order. A multi-image request answers each
    image on its own (undecodable ones get their error row); a single-image request that the server refuses
    as INVALID_ARGUMENT is that image's error row too (with `single_invalid_is_row`). Other failures raise
    ServiceError for the caller to retry, split or report."""
    try:
        prediction = client.predict([data for _, data in group], model=model, version=version, top_k=top_k,
                                    timeout=timeout)
    except ServiceError as exc:
        if single_invalid_is_row and len(group) == 1 and exc.code == grpc.StatusCode.INVALID_ARGUMENT:
            return [error_record(group[0][0], exc.code.name, exc.message)]
        raise
    records = []
    for (path, _), result in zip(group, prediction.results, strict=True):
        error: ErrorInfo | None = result.error
        if error is not None:
            records.append(error_record(path, error.code, error.message))
        else:
            records.append(ok_record(path, prediction.model, prediction.version, result.labels))
    return records


def predict_records(client: Client, files: Sequence[str | Path], *, model: str = "", version: int = 0,
                    top_k: int = 5, batch_size: int = 16, timeout: float | None = None) -> list[Record]:
    """`imgcls predict`: one record per file, in argument order (the shape `imgcls batch` writes too).

    The model's metadata is fetched first, so a wrong model name fails once, not once per file, and a
    server that cannot be reached fails with `ServerUnreachable` naming the target."""
    try:
        meta = client.metadata(model, version, timeout=timeout)
    except ServiceError as exc:
        if is_unreachable(exc):
            raise unreachable(client.target, exc) from None
        raise
    items, read_errors = read_files(files)
    records: list[Record] = []
    for start in range(0, len(items), batch_size):
        records += send(client, items[start:start + batch_size], model=meta.name, version=meta.version,
                        top_k=top_k, timeout=timeout)
    for position, record in read_errors:  # back into argument order
        records.insert(position, record)
    return records
