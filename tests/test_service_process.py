"""`imgcls serve` as a real process: configuration from the environment, SIGTERM drain and exit 0, and
no TensorFlow in a process serving ONNX."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from service_fixtures import sample_image

from imgcls.client.client import Client, ServiceError
from imgcls.v1 import inference_pb2 as pb
from imgcls.v1 import inference_pb2_grpc as pb_grpc

# Runs the real CLI and reports at exit whether TensorFlow was ever imported.
CLI = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('TENSORFLOW_LOADED=%s' % ('tensorflow' in sys.modules), file=sys.stderr))\n"
    "from imgcls.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
IMAGE = sample_image(7)

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture


class ServeProcess:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CLI, *args], env={**os.environ, **env},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ports: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"gRPC on [\d.]+:(\d+), metrics on [\d.]+:(\d+)", line)
            if found:
                self.ports.put((int(found[1]), int(found[2])))

    def wait_for_ports(self, timeout: float = 30.0) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.ports.get(timeout=0.1)
            except queue.Empty:
                assert self.proc.poll() is None, f"imgcls serve exited early:\n{self.stderr()}"
        raise AssertionError(f"imgcls serve did not report its ports:\n{self.stderr()}")

    def stderr(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def serve_env(service_repo):
    return {"IMGCLS_MODEL_REPOSITORY": str(service_repo), "IMGCLS_HOST": "127.0.0.1", "IMGCLS_PORT": "0",
            "IMGCLS_METRICS_PORT": "0", "IMGCLS_HTTP_PORT": "0", "IMGCLS_GRACE_PERIOD": "20",
            "IMGCLS_INFERENCE_THREADS": "1", "IMGCLS_RUNTIME": "tiny=tflite", "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.mark.slow
def test_sigterm_drains_in_flight_stream_then_exits_zero_without_tensorflow(serve_env):
    server = ServeProcess(["serve"], serve_env)  # every setting from the environment
    try:
        port, metrics_port = server.wait_for_ports()
        target = f"127.0.0.1:{port}"
        with Client(target, retries=0) as client:
            client.wait_until_serving(30)
            assert [(m.name, m.runtime) for m in client.list_models()] == [("other", "onnx"), ("tiny", "tflite")]
            assert client.predict([IMAGE], model="other").results[0].ok
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
                assert 'imgcls_model_loaded{backbone="mobilenet_v2",model="tiny",runtime="tflite",version="2"} 1.0' in (
                    response.read().decode())

            outbox: queue.Queue = queue.Queue()
            requests = iter(outbox.get, None)
            channel = grpc.insecure_channel(target)
            stream = pb_grpc.InferenceStub(channel).PredictStream(requests, timeout=30)
            outbox.put(pb.PredictRequest(model_name="tiny", images=[IMAGE], request_id="before"))
            assert next(stream).request_id == "before"

            server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while client.health() != "NOT_SERVING":
                assert time.monotonic() < deadline, "health never went NOT_SERVING"
                time.sleep(0.05)
            with pytest.raises(ServiceError) as refused:
                client.predict([IMAGE], model="tiny", timeout=5)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE

            outbox.put(pb.PredictRequest(model_name="tiny", images=[IMAGE], request_id="during-drain"))
            answer = next(stream)
            assert answer.request_id == "during-drain" and answer.results[0].status.code == 0
            outbox.put(None)  # the client finishes its stream: nothing is in flight any more
            assert list(stream) == []
            channel.close()
        assert server.proc.wait(timeout=20) == 0, server.stderr()
        assert "TENSORFLOW_LOADED=False" in server.stderr()
        # the start-up heap was frozen once the models were loaded (server.freeze_heap): tens of thousands of objects
        frozen = re.findall(r"gc: froze (\d+) objects at start-up", server.stderr())
        assert len(frozen) == 1 and int(frozen[0]) > 10_000, server.stderr()
    finally:
        server.stop()


def test_service_modules_do_not_import_tensorflow(service_repo):
    """Import every service module, serve the default (TFLite) runtime and answer a request: no TensorFlow."""
    code = (
        "import sys\n"
        "import imgcls.service.batcher, imgcls.service.cli, imgcls.service.metrics, imgcls.service.repository\n"
        "from imgcls.client.client import Client\n"
        "from imgcls.service.server import InferenceServer, ServeConfig\n"
        f"s = InferenceServer(ServeConfig(model_repository={str(service_repo)!r}, host='127.0.0.1', port=0,"
        " metrics_port=0)).start()\n"
        "assert s.wait_until_ready(30)\n"
        "c = Client('127.0.0.1:%d' % s.port)\n"
        f"assert c.predict([{IMAGE!r}], model='tiny').results[0].ok\n"
        "c.close(); s.stop()\n"
        "print('runtime', s.models['tiny'][2].runtime, 'tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["runtime", "tflite", "False"]


def test_serve_reports_a_bad_repository_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "imgcls.cli", "serve", "--model-repository", str(tmp_path / "no"),
                          "--port", "0", "--metrics-port", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "not a folder" in out.stderr and "Traceback" not in out.stderr
