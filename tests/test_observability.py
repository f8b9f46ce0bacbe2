"""Traces, access log and JSON logs (issue 19, items 3 and 4).

Tracing is checked with OpenTelemetry's in-memory exporter on a real server: a Predict (gRPC) and a POST
/predict (HTTP) carrying a client's W3C `traceparent` yield the documented span tree inside the client's trace.
The access log and the JSON log format are checked on what a real `imgcls serve` process writes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from service_fixtures import running_server, sample_image

from imgcls import logs
from imgcls.service import observability
from imgcls.v1 import inference_pb2 as pb
from imgcls.v1 import inference_pb2_grpc as pb_grpc

pytest_plugins = ["service_plugin"]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


@pytest.fixture
def traced(service_repo):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with running_server(service_repo, runtime="onnx", http_port=0) as server:
        server.core.tracing = observability.Tracing(provider)
        yield server, exporter


def _tree(exporter, name: str):
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name == name]
    children = sorted((s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id),
                      key=lambda s: s.start_time)
    return root, children


def _check_tree(root, children, method: str) -> None:
    assert format(root.context.trace_id, "032x") == TRACE_ID  # the client's trace continues
    assert format(root.parent.span_id, "016x") == CLIENT_SPAN and root.parent.is_remote
    assert root.attributes["imgcls.model"] == "tiny" and root.attributes["imgcls.version"] == 2
    assert root.attributes["imgcls.images"] == 2 and root.attributes["imgcls.batch_size"] >= 1
    assert root.attributes["rpc.method"] == method and root.attributes["imgcls.code"] == "OK"
    assert [c.name for c in children] == ["decode", "queue", "inference", "respond"]
    for child in children:
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time, child.name
    assert children[2].end_time - children[2].start_time > 0  # the inference took some time


def test_grpc_predict_yields_the_span_tree_in_the_clients_trace(traced):
    server, exporter = traced
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        pb_grpc.InferenceStub(channel).Predict(pb.PredictRequest(model_name="tiny", images=[sample_image(1),
                                                                                           sample_image(2)]),
                                               metadata=[("traceparent", TRACEPARENT)], timeout=20)
    root, children = _tree(exporter, "imgcls Predict")
    _check_tree(root, children, "Predict")


def test_http_predict_yields_the_same_tree(traced):
    server, exporter = traced
    boundary = "imgclsboundary"
    parts = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{i}.jpg\"\r\n"
                     f"Content-Type: image/jpeg\r\n\r\n".encode() + sample_image(i) + b"\r\n" for i in (1, 2))
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/predict?model=tiny",
                                     data=parts + f"--{boundary}--\r\n".encode(), method="POST",
                                     headers={"traceparent": TRACEPARENT,
                                              "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=20) as response:
        assert response.status == 200
    (name,) = {s.name for s in exporter.get_finished_spans() if s.parent is not None and s.parent.is_remote}
    root, children = _tree(exporter, name)
    _check_tree(root, children, name.removeprefix("imgcls "))


def test_a_failed_call_is_an_error_span_without_stage_children(traced):
    server, exporter = traced
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, pytest.raises(grpc.RpcError):
        pb_grpc.InferenceStub(channel).Predict(pb.PredictRequest(model_name="nope", images=[b"x"]),
                                               metadata=[("traceparent", TRACEPARENT)], timeout=20)
    root, children = _tree(exporter, "imgcls Predict")
    assert root.status.status_code.name == "ERROR" and "NOT_FOUND" in root.status.description
    assert children == []


def test_tracing_is_off_unless_the_otel_variables_ask():
    assert not observability.tracing_requested({})
    assert observability.tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert observability.tracing_requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not observability.tracing_requested({"OTEL_TRACES_EXPORTER": "none",
                                                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert not observability.tracing_requested({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"})


def test_access_log_keeps_failures_and_rate_limits_successes(caplog):
    access = observability.AccessLog(rate=5)
    with caplog.at_level(logging.INFO, logger="imgcls.access"):
        for _ in range(50):
            access.write({"method": "Predict", "model": "tiny", "version": 2, "images": 1, "code": "OK", "ms": 1.0})
        access.write({"method": "Predict", "model": "tiny", "version": 2, "images": 1, "code": "NOT_FOUND",
                      "ms": 1.0})
    records = [r for r in caplog.records if r.name == "imgcls.access"]
    ok = [r for r in records if r.fields["code"] == "OK"]
    assert 5 <= len(ok) <= 7  # the bucket's 5, plus what refilled meanwhile
    last = records[-1]
    assert last.fields["code"] == "NOT_FOUND"  # failures are never left out ...
    assert last.fields["suppressed"] == 50 - len(ok)  # ... and say how many successes were


def test_access_log_rate_limits_overload_refusals_but_not_other_failures(caplog):
    """Under overload refusals come by the hundred per second: they get a bucket of their own (so they neither
    flood the log nor push out the success lines), and the next line says how many were left out."""
    access = observability.AccessLog(rate=5)

    def line(code: str) -> dict:
        return {"method": "Predict", "model": "tiny", "version": 2, "images": 1, "code": code, "ms": 1.0}

    with caplog.at_level(logging.INFO, logger="imgcls.access"):
        for code in ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "CANCELLED") * 25:
            access.write(line(code))
        for _ in range(3):
            access.write(line("OK"))  # the refusals used none of the successes' bucket
        for _ in range(20):
            access.write(line("INVALID_ARGUMENT"))  # a client's mistake: always logged
    records = [r for r in caplog.records if r.name == "imgcls.access"]
    codes = [r.fields["code"] for r in records]
    refused = [c for c in codes if c not in ("OK", "INVALID_ARGUMENT")]
    assert 5 <= len(refused) <= 7
    assert codes.count("OK") == 3 and codes.count("INVALID_ARGUMENT") == 20
    first_after = records[len(refused)]
    assert first_after.fields["code"] == "OK"
    assert first_after.fields["suppressed_refusals"] == 100 - len(refused)
    assert "suppressed" not in first_after.fields  # no success was left out
    assert all("suppressed_refusals" not in r.fields for r in records[len(refused) + 1:])


def test_access_log_at_rate_zero_still_shows_one_refusal_a_second(caplog):
    access = observability.AccessLog(rate=0)
    with caplog.at_level(logging.INFO, logger="imgcls.access"):
        for code in ("OK", "RESOURCE_EXHAUSTED") * 10:
            access.write({"method": "Predict", "code": code, "ms": 1.0})
    codes = [r.fields["code"] for r in caplog.records if r.name == "imgcls.access"]
    assert codes == ["RESOURCE_EXHAUSTED"]


def test_json_log_lines_carry_the_fields():
    formatter = logs.JsonFormatter(worker="2")
    record = logging.LogRecord("imgcls.access", logging.INFO, __file__, 1, "%s", ("Predict tiny OK",), None)
    record.fields = {"method": "Predict", "code": "OK", "ms": 3.5, "trace_id": TRACE_ID}
    line = json.loads(formatter.format(record))
    assert line["message"] == "Predict tiny OK" and line["level"] == "INFO" and line["worker"] == 2
    assert line["method"] == "Predict" and line["trace_id"] == TRACE_ID and line["ms"] == 3.5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])


@pytest.mark.slow
def test_serve_with_json_logs_writes_only_json_lines_and_an_access_line_per_call(service_repo, tmp_path):
    """The real command, --log-format json: every stderr line parses, and each call has its access line."""
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "imgcls.cli", "--log-format", "json", "serve",
                                 "--model-repository", str(service_repo), "--host", "127.0.0.1", "--port", "0",
                                 "--metrics-port", "0", "--http-port", "-1", "--workers", "1", "--runtime", "onnx",
                                 "--poll-interval", "0"], stderr=log_file, stdout=log_file, env=env)
    try:
        deadline, target = time.monotonic() + 60, None
        while target is None and time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r'gRPC on 127\.0\.0\.1:(\d+)', log_path.read_text())
            target = f"127.0.0.1:{found[1]}" if found else None
            time.sleep(0.1)
        assert target, log_path.read_text()
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            while '"ready' not in log_path.read_text():
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            stub.Predict(pb.PredictRequest(model_name="tiny", images=[sample_image(3)]), timeout=20)
            with pytest.raises(grpc.RpcError):
                stub.Predict(pb.PredictRequest(model_name="nope", images=[sample_image(3)]), timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    access = [line for line in lines if line["logger"] == "imgcls.access"]
    assert [(a["method"], a["model"], a["code"]) for a in access] == [("Predict", "tiny", "OK"),
                                                                       ("Predict", "", "NOT_FOUND")]
    assert access[0]["images"] == 1 and access[0]["ms"] > 0 and access[0]["peer"].startswith("ipv4:127.0.0.1")
    assert any(line["message"] == "stopped" for line in lines)
