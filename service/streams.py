"""The one stream pump, for every bidirectional inference stream (imgcls.v1 PredictStream, KServe
ModelStreamInfer).

A reader task takes messages as the client sends them and starts one task per message, at most
`max_inflight` at a time (then it stops reading, so a fast client is slowed by HTTP/2 flow control rather than
refused); answers are sent in completion order. Each message is its own request on the core's request path:
admitted, counted and recorded alone, with its versions pinned while it runs (the stream pins nothing, so an
open stream never keeps a replaced version resident). A message that fails for any reason, a malformed one
included, is answered in-stream with its error and the stream goes on.

The stream ends when the client half-closes and every message is answered; after `idle_timeout` seconds with
nothing read and nothing in flight (UNAVAILABLE, so clients reconnect); or when the client cancels (every
message still running is cancelled and frees its queue slots). While the server drains, an open stream is
still served (a call already received is drained, not refused) until the client closes it or the grace
period ends. An idle stream is a suspended coroutine: no thread waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from imgcls.service.core import Call, Core, Malformed, RequestError, check_parsed, parser

log = logging.getLogger(__name__)

_EOF = object()

Handle = Callable[[Any, Call], Awaitable[Any]]  # (message, its call) -> response; raises RequestError
OnError = Callable[[Any, RequestError, Call], Any]  # (message, error, its call) -> the in-stream error answer


async def pump(core: Core, method: str, requests: AsyncIterator, context: grpc.aio.ServicerContext, *,
               handle: Handle, on_error: OnError, max_inflight: int, idle_timeout: float,
               empty: Callable[[], Any] | None = None) -> AsyncIterator:
    """Answer a stream's messages (see the module docstring); an async generator of responses. `empty` makes
    the blank message a malformed one is answered as (its fields unreadable)."""
    loop = asyncio.get_running_loop()
    out: asyncio.Queue = asyncio.Queue()
    window = asyncio.Semaphore(max_inflight)
    running: set[asyncio.Task] = set()
    last_activity = loop.time()

    async def answer(message: Any) -> None:
        try:
            async with core.call(method, context, track=False, inference=True) as call:
                try:
                    check_parsed(message)
                    with core.pin():
                        response = await handle(message, call)
                except RequestError as exc:
                    call.code = exc.code
                    if isinstance(message, Malformed) and empty is not None:
                        message = empty()
                    response = on_error(message, exc, call)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("%s: a stream message failed", method)
                    call.code = grpc.StatusCode.INTERNAL
                    response = on_error(message, RequestError(call.code, "internal error (see the server log)"),
                                        call)
            out.put_nowait(response)
        finally:
            window.release()

    async def read() -> None:
        nonlocal last_activity
        try:
            async for message in requests:
                await window.acquire()
                last_activity = loop.time()
                task = asyncio.create_task(answer(message))
                running.add(task)
                task.add_done_callback(running.discard)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client went away or sent a message that does not parse
            log.debug("%s: stream reader stopped: %s", method, exc)
        finally:
            out.put_nowait(_EOF)

    reader = asyncio.create_task(read())
    end: RequestError | None = None
    reading = True
    try:
        while reading or running or not out.empty():
            timeout = None
            if reading and not running and out.empty():
                timeout = max(0.0, last_activity + idle_timeout - loop.time())
            try:
                item = await asyncio.wait_for(out.get(), timeout)
            except TimeoutError:
                if not running and out.empty():
                    reader.cancel()
                    reading = False
                    end = RequestError(grpc.StatusCode.UNAVAILABLE,
                                       f"stream idle for {idle_timeout:g} s; closed by the server")
                continue
            if item is _EOF:
                reading = False
                continue
            last_activity = loop.time()
            yield item
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(reader, *running, return_exceptions=True)
    if end is not None:
        await context.abort(end.code, end.message)


def behaviour(core: Core, method: str, handle: Handle, on_error: OnError, empty: Callable[[], Any] | None = None):
    """A gRPC stream-stream behaviour: the stream is tracked (drain waits for it) and refused while the server
    drains or loads; its messages go through `pump`."""

    async def stream(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> AsyncIterator:
        async with core.call(method, context, pin=False, record=False):
            try:
                core.check_accepting()
            except RequestError as exc:
                await context.abort(exc.code, exc.message, trailing_metadata=exc.trailing_metadata())
            cfg = core.config
            async for response in pump(core, method, requests, context, handle=handle, on_error=on_error,
                                       max_inflight=cfg.stream_max_inflight, idle_timeout=cfg.stream_idle_timeout,
                                       empty=empty):
                yield response

    return stream


def handler(core: Core, method: str, request_cls: type, response_cls: type, handle: Handle,
            on_error: OnError) -> grpc.RpcMethodHandler:
    """`behaviour` as a registered gRPC stream-stream method (lenient parser, response serializer)."""
    return grpc.stream_stream_rpc_method_handler(
        behaviour(core, method, handle, on_error, request_cls), request_deserializer=parser(request_cls),
        response_serializer=response_cls.SerializeToString)
