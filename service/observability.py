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
class _LineBudget:
    """A token bucket of `rate` lines per second, and how many lines it left out since its last line."""

    rate: float
    tokens: float = field(init=False)
    last: float = field(init=False, default_factory=time.monotonic)
    left_out: int = 0

    def __post_init__(self) -> None:
        self.tokens = self.rate

    def take(self, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            self.left_out += 1
            return False
        self.tokens -= 1
        return True


@dataclass
class AccessLog:
    """One line per call, through the `imgcls.access` logger (JSON fields with `--log-format json`).

    Calls that failed are always logged. Successful ones are logged up to `rate` lines per second (a token
    bucket). Refusals that overload causes (RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED)
    have a bucket of their own at the same rate, at least one line a second: under overload they come by the
    hundred per second, and a line each would flood the log pipeline (docs/observability.md). The next line
    written says how many were left out meanwhile (`suppressed`, `suppressed_refusals`).
    rate 0 = successful calls are not logged, refusals one line a second."""

    rate: float = 10.0
    _ok: _LineBudget = field(init=False)
    _refused: _LineBudget = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._ok, self._refused = _LineBudget(self.rate), _LineBudget(max(self.rate, 1.0))

    def _admit(self, code: str) -> dict[str, int] | None:
        """None = leave this line out; else the fields that say what was left out before it."""
        budget = self._ok if code == "OK" else self._refused if code in REFUSAL_CODES else None
        with self._lock:
            if budget is not None and not budget.take(time.monotonic()):
                return None
            counts = {"suppressed": self._ok.left_out, "suppressed_refusals": self._refused.left_out}
            self._ok.left_out = self._refused.left_out = 0
        return {k: v for k, v in counts.items() if v}

    def write(self, fields: dict[str, Any] | Callable[[], dict[str, Any]], code: str | None = None) -> None:
        """Log one call's line; `fields` may be a function, called only when the line is written (a line left
        out costs a lock and a counter, nothing more). `code` (a gRPC status name) defaults to fields["code"]."""
        if code is None:
            assert isinstance(fields, dict)
            code = fields["code"]
        left_out = self._admit(code)
        if left_out is None:
            return
        fields = fields() if callable(fields) else fields
        fields.update(left_out)
        text = " ".join(f"{k}={v}" for k, v in fields.items() if v not in ("", None))
        log.info("%s", text, extra={"fields": fields})


# Status codes of calls turned away or cut short by load, not by what they asked: rate-limited in the access log.
REFUSAL_CODES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"})


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
