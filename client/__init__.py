"""The client side of imgcls: talk to a running `imgcls serve` (installed as `imgcls.client`).

- `imgcls.client.client.Client`: the typed, retrying gRPC client (sync); `imgcls.client.aio.AsyncClient` is
  the same on `grpc.aio`;
- `imgcls.client.requests`: the one request path of `imgcls predict` and `imgcls batch` (files in, the
  per-file records of `imgcls.client.records` out);
- `imgcls.client.batch` / `batch_io`: `imgcls batch`, resumable jobs over folders, globs and file lists;
- `imgcls.client.cli`: the `predict` and `batch` subcommands.

A stage like training, export and service: it imports only the shared core `imgcls` (the gRPC stubs of
`imgcls.v1` among it), never the server, and the server never imports it (tests/test_architecture.py).
This module itself imports nothing heavy, so `imgcls --help` does not load grpc; the names below load on use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgcls.client.aio import AsyncClient
    from imgcls.client.client import Client, ErrorInfo, ImageResult, Label, Prediction, ServiceError

__all__ = ["AsyncClient", "Client", "ErrorInfo", "ImageResult", "Label", "Prediction", "ServiceError"]


def __getattr__(name: str) -> Any:
    if name == "AsyncClient":
        from imgcls.client.aio import AsyncClient

        return AsyncClient
    if name in __all__:
        from imgcls.client import client

        return getattr(client, name)
    raise AttributeError(f"module 'imgcls.client' has no attribute {name!r}")
