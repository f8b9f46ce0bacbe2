"""What the request path leaves behind when a call ends: an access-log line and an OpenTelemetry trace.

Both are written from `Core.record`, once per call (refusals included), for every protocol, from what the
call found out on its way (model, version, images, the batches it was part of, where its time went). Nothing
here runs while the call is in progress, so neither adds latency to it: the spans are built afterwards with
the call's own start and end times.

Tracing is off unless the standard OpenTelemetry variables ask for it (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or OTEL_TRACES_EXPORTER=otlp|console; OTEL_SDK_DISABLED=true turns it
off): spans go to an OTLP/HTTP collector in batches, sampled as OTEL_TRACES_SAMPLER says. A client's W3C
trace context (`traceparent`, from gRPC metadata or HTTP headers) makes the server's span a child of the
client's, so one trace follows a request from the client through queue, decode and inference.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("imgcls.access")


# --- access log ---------------------------------------------------------------------------------------------


@dataclass
class AccessLog:
    """One line per call, through the `imgcls.access` logger (JSON fields with `--log-format json`). Calls
    that failed are always logged; successful ones up to `rate` lines per second (a token bucket), and the
    next line written says how many were left out meanwhile. rate 0 = successful calls are not logged."""

    rate: float = 10.0
    _tokens: float = field(init=False)
    _last: float = field(init=False, default_factory=time.monotonic)
    _suppressed: int = field(init=False, default=0)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._tokens = self.rate

    def _admit(self, ok: bool) -> int | None:
        """None = leave this line out; else how many lines were left out before it."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if ok and self._tokens < 1:
                self._suppressed += 1
                return None
            if ok:
                self._tokens -= 1
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed

    def write(self, fields: dict[str, Any] | Callable[[], dict[str, Any]], ok: bool | None = None) -> None:
        """Log one call's line; `fields` may be a function, called only when the line is written (a line left
        out costs a lock and a counter, nothing more). `ok` defaults to fields["code"] == "OK"."""
        if ok is None:
            assert isinstance(fields, dict)
            ok = fields["code"] == "OK"
        suppressed = self._admit(ok)
        if suppressed is None:
            return
        fields = fields() if callable(fields) else fields
        if suppressed:
            fields["suppressed"] = suppressed
        text = " ".join(f"{k}={v}" for k, v in fields.items() if v not in ("", None))
        log.info("%s", text, extra={"fields": fields})


# --- tracing ------------------------------------------------------------------------------------------------


def tracing_requested(environ: Mapping[str, str] = os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").lower()
    if exporter == "none":
        return False
    return bool(exporter or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class Tracing:
    """Builds a call's span tree after the call: `imgcls <method>` with children decode, queue, inference and
    respond, laid out from the call's recorded stage times (decode covers the images decoded in parallel,
    queue the longest wait of an image, inference the batches the call was part of)."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("imgcls.service")
        self.propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_environment(cls) -> Tracing | None:
        """The OTLP exporter (or the console one) set up from OTEL_* variables; None when not asked for."""
        if not tracing_requested():
            return None
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                           "imgcls")}))
        if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "console":
            exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def record(self, method: str, start: float, end: float, carrier: Mapping[str, str] | None,
               attributes: dict[str, Any], stages: list[tuple[str, float, float]], error: str | None) -> str:
        """Export one call's spans; `start`/`end` and the stages' times are time.monotonic() values. Returns
        the trace id (hex), for the access log."""
        from opentelemetry.trace import SpanKind, Status, StatusCode

        offset = time.time_ns() - int(time.monotonic() * 1e9)  # monotonic -> epoch nanoseconds

        def ns(t: float) -> int:
            return offset + int(t * 1e9)

        parent = self.propagator.extract(carrier or {})
        span = self.tracer.start_span(f"imgcls {method}", context=parent, kind=SpanKind.SERVER,
                                      start_time=ns(start), attributes=attributes)
        from opentelemetry import trace

        inner = trace.set_span_in_context(span)
        for name, s, e in stages:
            self.tracer.start_span(name, context=inner, start_time=ns(s)).end(end_time=ns(max(s, e)))
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=ns(end))
        return format(span.get_span_context().trace_id, "032x")

    def shutdown(self) -> None:
        self.provider.shutdown()


def stages(job: Any, end: float) -> list[tuple[str, float, float]]:
    """decode -> queue -> inference -> respond, back from the job's completion (time.monotonic() values)."""
    if job is None or not job.done_at:
        return []
    infer_end = job.done_at
    infer_start = infer_end - job.infer_s
    queue_start = infer_start - job.queue_s
    decode_start = max(job.admitted_at, queue_start - job.input_s)
    return [("decode", decode_start, queue_start), ("queue", queue_start, infer_start),
            ("inference", infer_start, infer_end), ("respond", infer_end, end)]
