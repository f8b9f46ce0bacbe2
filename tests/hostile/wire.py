"""A real `imgcls serve` process and one way to send an encoded image over each protocol.

Only wire formats are used: imgcls.v1 through its generated stubs, KServe v2 through tritonclient's own
`service_pb2` messages, TF Serving through the wire-compatible descriptor set (`imgcls.service.protocols`, the
published package names; TensorFlow's own stubs would load TensorFlow). Nothing here knows how the server is
built inside, so the suite survives a rewrite of the server core.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from hostile.corpus import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

PROTOCOLS = ("v1", "kserve", "tfserving")
MODEL = "tiny"  # tests/service_fixtures.py: 32x32, classes cat/dog/bird; served next to "other"
CLASSES = ("cat", "dog", "bird")
MAX_REASON_BYTES = 2048  # a rejection reason is short: well under clients' 8 KiB metadata limit
CLEAN_CODES = ("OK", "INVALID_ARGUMENT", "NOT_FOUND")
KSERVE = "/inference.GRPCInferenceService/"
TFSERVING = "/tensorflow.serving.PredictionService/"
DT_FLOAT, DT_STRING = 1, 7


def _channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", 128 * 1024 * 1024),
        ("grpc.max_receive_message_length", 128 * 1024 * 1024),
        ("grpc.max_metadata_size", 64 * 1024),
    ]


class Server:
    """`python -m imgcls.cli serve` on 127.0.0.1, free ports, the limits the corpus assumes; killed by `close`."""

    def __init__(
        self, repo: Path, *, decode_workers: int = 2, grace_period: float = 10.0, extra: list[str] | None = None
    ) -> None:
        args = [
            "--model-repository",
            str(repo),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--runtime",
            "onnx",
            "--inference-threads",
            "1",
            "--decode-workers",
            str(decode_workers),
            "--poll-interval",
            "0",
            "--grace-period",
            str(grace_period),
            "--max-image-bytes",
            str(MAX_IMAGE_BYTES),
            "--max-image-pixels",
            str(MAX_IMAGE_PIXELS),
            "--http-port",
            "0",
            *(extra or []),
        ]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        self.grace_period = grace_period
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imgcls.cli", "serve", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self.lines: list[str] = []
        self._ports: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name="serve-stderr").start()
        self.port = self.metrics_port = 0
        self.channel: grpc.Channel | None = None

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"gRPC on [\d.]+:(\d+), metrics on [\d.]+:(\d+)", line)
            if found:
                self._ports.put((int(found[1]), int(found[2])))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return "".join(self.lines)

    def start(self, timeout: float = 90.0) -> Server:
        deadline = time.monotonic() + timeout
        while not self.port:
            try:
                self.port, self.metrics_port = self._ports.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"imgcls serve did not start:\n{self.log()[-5000:]}") from None
        self.channel = grpc.insecure_channel(self.target, options=_channel_options())
        while self.health(timeout=2) != "SERVING":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"imgcls serve never became SERVING:\n{self.log()[-5000:]}")
            time.sleep(0.2)
        return self

    def alive(self) -> bool:
        return self.proc.poll() is None

    def health(self, timeout: float = 5.0) -> str:
        """SERVING / NOT_SERVING, or the gRPC code name when the check itself failed."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (threads included; decode worker processes, if the
        server uses any, are added from their /proc entries)."""
        total = 0.0
        for pid in [self.pid, *_children(self.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
        return total

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak) in bytes: the server and its child processes summed."""
        out = {"VmRSS": 0, "VmHWM": 0}
        for pid in [self.pid, *_children(self.pid)]:
            try:
                text = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for key in out:
                found = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
                if found:
                    out[key] += int(found[1]) * 1024
        return out

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if still running after `timeout`, seconds it took)."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout), time.monotonic() - start
        except subprocess.TimeoutExpired:
            return None, time.monotonic() - start

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.proc.poll() is None:
            for pid in _children(self.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _children(pid: int) -> list[int]:
    """Descendant process ids (decode worker processes, if the server forks any)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            found.append(kid)
            todo.append(kid)
    return found


@dataclass
class Outcome:
    """What the server answered for one image on one protocol."""

    protocol: str
    code: str  # gRPC status name ("OK", "INVALID_ARGUMENT", ...; "DEADLINE_EXCEEDED" for a hang)
    reason: str = ""
    label: str | None = None  # top class when classified
    finite: bool = True  # every score finite, in [0, 1]
    seconds: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.code == "OK" and self.label is not None

    def problems(self, expect: str) -> list[str]:
        """Everything wrong with this answer for a case expected to `expect` (accept/reject/any)."""
        wrong = []
        if self.code == "DEADLINE_EXCEEDED":
            return [f"no answer within the deadline ({self.seconds:.1f} s): a hang"]
        if self.code not in ("OK", "INVALID_ARGUMENT"):
            wrong.append(f"status {self.code} ({self.reason[:200]!r}); a bad image is INVALID_ARGUMENT")
        if self.code == "OK" and (self.label is None or not self.finite):
            wrong.append(f"OK without a usable classification (label {self.label}, finite scores {self.finite})")
        if self.code != "OK":
            if not self.reason.strip():
                wrong.append(f"{self.code} without a reason")
            if len(self.reason.encode()) > MAX_REASON_BYTES:
                wrong.append(f"reason of {len(self.reason.encode())} bytes (> {MAX_REASON_BYTES})")
        if expect == "accept" and self.code != "OK":
            wrong.append(f"a good image refused: {self.code} {self.reason[:200]!r}")
        if expect == "reject" and self.code == "OK":
            wrong.append(f"a hostile input classified as {self.label!r}")
        return wrong


def _scores_ok(scores) -> bool:
    return all(math.isfinite(s) and -1e-6 <= s <= 1 + 1e-6 for s in scores)


def _error(protocol: str, exc: grpc.RpcError, start: float) -> Outcome:
    return Outcome(protocol, exc.code().name, exc.details() or "", seconds=time.monotonic() - start)


class Clients:
    """Stubs for the three protocols on one channel."""

    def __init__(self, channel: grpc.Channel) -> None:
        from tritonclient.grpc import service_pb2

        from imgcls.service import protocols
        from imgcls.v1 import inference_pb2 as pb
        from imgcls.v1 import inference_pb2_grpc as pb_grpc

        self.channel, self.pb, self.kpb = channel, pb, service_pb2
        self.v1 = pb_grpc.InferenceStub(channel)
        self.tf_predict_request = protocols.message("tensorflow.serving.PredictRequest")
        self.tf_predict_response = protocols.message("tensorflow.serving.PredictResponse")
        self.tf_tensor = protocols.message("tensorflow.TensorProto")
        self.model_infer = channel.unary_unary(
            KSERVE + "ModelInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        self.tf_predict = channel.unary_unary(
            TFSERVING + "Predict",
            request_serializer=self.tf_predict_request.SerializeToString,
            response_deserializer=self.tf_predict_response.FromString,
        )

    def classify(self, protocol: str, data: bytes, timeout: float, variant: int = 0) -> Outcome:
        """Send one encoded image; `variant` picks between equivalent encodings (KServe contents or raw).
        RESOURCE_EXHAUSTED (a full queue: back-pressure, not an answer about the image) is retried."""
        start = time.monotonic()
        while True:
            outcome = self._classify(protocol, data, max(0.1, timeout - (time.monotonic() - start)), variant)
            if outcome.code != "RESOURCE_EXHAUSTED" or time.monotonic() - start > timeout:
                outcome.seconds = time.monotonic() - start
                return outcome
            time.sleep(0.05)

    def _classify(self, protocol: str, data: bytes, timeout: float, variant: int) -> Outcome:
        start = time.monotonic()
        try:
            if protocol == "v1":
                request = self.pb.PredictRequest(model_name=MODEL, images=[data], top_k=3)
                reply = self.v1.Predict(request, timeout=timeout)
                result = reply.results[0]
                if result.status.code != 0:  # a per-image failure inside an OK response
                    return Outcome(
                        protocol,
                        grpc.StatusCode(_code_tuple(result.status.code)).name,
                        result.status.message,
                        seconds=time.monotonic() - start,
                    )
                label = result.labels[0].name if result.labels else None
                return Outcome(
                    protocol,
                    "OK",
                    label=label,
                    finite=_scores_ok([x.score for x in result.labels]),
                    seconds=time.monotonic() - start,
                )
            if protocol == "kserve":
                reply = self.model_infer(
                    kserve_images_request(self.kpb, [data], raw=variant % 2 == 1, model=MODEL), timeout=timeout
                )
                probs = kserve_probabilities(reply)
                return Outcome(
                    protocol,
                    "OK",
                    label=_top(probs[0]) if probs else None,
                    finite=bool(probs) and _scores_ok(probs[0]),
                    seconds=time.monotonic() - start,
                )
            if protocol == "tfserving":
                request = self.tf_predict_request()
                request.model_spec.name = MODEL
                tensor = request.inputs["images"]
                tensor.dtype = DT_STRING
                tensor.tensor_shape.dim.add(size=1)
                tensor.string_val.append(data)
                reply = self.tf_predict(request, timeout=timeout)
                probs = tfserving_probabilities(reply)
                top = reply.outputs["top_class"].string_val
                return Outcome(
                    protocol,
                    "OK",
                    label=top[0].decode() if top else None,
                    finite=bool(probs) and _scores_ok(probs[0]),
                    seconds=time.monotonic() - start,
                )
        except grpc.RpcError as exc:
            return _error(protocol, exc, start)
        raise ValueError(protocol)


def call_with_retry(method, request, timeout: float):
    """A unary call whose RESOURCE_EXHAUSTED answers (back-pressure) are retried until `timeout`."""
    start = time.monotonic()
    while True:
        try:
            return method(request, timeout=max(0.1, timeout - (time.monotonic() - start)))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() - start > timeout:
                raise
        time.sleep(0.05)


def _code_tuple(value: int):
    return next(code.value for code in grpc.StatusCode if code.value[0] == value)


def _top(probs: list[float]) -> str | None:
    if not probs or len(probs) != len(CLASSES):
        return None
    return CLASSES[max(range(len(probs)), key=probs.__getitem__)]


def kserve_images_request(kpb, images: list[bytes], raw: bool = False, model: str = MODEL, version: str = ""):
    import struct

    request = kpb.ModelInferRequest(model_name=model, model_version=version)
    tensor = request.inputs.add(name="images", datatype="BYTES", shape=[len(images)])
    if raw:
        request.raw_input_contents.append(b"".join(struct.pack("<I", len(x)) + x for x in images))
    else:
        tensor.contents.bytes_contents.extend(images)
    return request


def kserve_probabilities(reply) -> list[list[float]]:
    import numpy as np

    for i, out in enumerate(reply.outputs):
        if out.name == "probabilities" and out.datatype == "FP32":
            if i < len(reply.raw_output_contents):
                flat = np.frombuffer(reply.raw_output_contents[i], "<f4")
            else:
                flat = np.asarray(out.contents.fp32_contents, np.float32)
            return flat.reshape(list(out.shape)).tolist() if flat.size else []
    return []


def tfserving_probabilities(reply) -> list[list[float]]:
    import numpy as np

    if "probabilities" not in reply.outputs:
        return []
    tensor = reply.outputs["probabilities"]
    shape = [d.size for d in tensor.tensor_shape.dim]
    flat = np.frombuffer(tensor.tensor_content, "<f4") if tensor.tensor_content else np.asarray(tensor.float_val)
    return flat.reshape(shape).tolist() if flat.size else []
