"""Connection balancing (issue 19): a long-lived client spreads over servers added after it connected.

Behind one address, as a Kubernetes Service (kube-proxy balances connections, not calls) puts pods: a small
TCP proxy that sends each new connection to the next backend in turn. The client connects while only one
server is behind it; a second server is added; `--max-connection-age` makes the first server ask the client
to reconnect (GOAWAY) once its calls end, so its next connection may go to the second one. No call fails.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from contextlib import contextmanager, suppress

import pytest
from service_fixtures import client_for, metric, running_server, sample_image, scrape

pytest_plugins = ["service_plugin"]


class RoundRobinProxy:
    """A TCP proxy on a free loopback port: each accepted connection is piped to the next backend port."""

    def __init__(self) -> None:
        self.backends: list[int] = []
        self.connections = 0
        self._next = itertools.count()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            port = self.backends[next(self._next) % len(self.backends)]
            self.connections += 1
            try:
                backend = socket.create_connection(("127.0.0.1", port))
            except OSError:
                client.close()
                continue
            self._sockets += [client, backend]
            for a, b in ((client, backend), (backend, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for s in self._sockets:
            s.close()


@contextmanager
def proxy():
    p = RoundRobinProxy()
    try:
        yield p
    finally:
        p.close()


def _served(server) -> float:
    return metric(scrape(server), "imgcls_requests_total", method="Predict", model="tiny", code="OK")


@pytest.mark.slow
def test_a_long_lived_client_moves_to_a_server_added_later(service_repo):
    age = 1.5
    settings = {"max_connection_age": age, "max_connection_age_grace": 5.0, "runtime": "onnx"}
    with running_server(service_repo, **settings) as first, proxy() as lb:
        lb.backends.append(first.port)
        failures: list[str] = []
        with client_for(type("Target", (), {"port": lb.port})(), timeout=10) as client:
            image = sample_image(1)
            assert client.predict([image], model="tiny").results[0].ok  # connected: to the first server
            with running_server(service_repo, **settings) as second:
                lb.backends.append(second.port)
                deadline = time.monotonic() + 6 * age + 5
                while time.monotonic() < deadline:
                    try:
                        assert client.predict([image], model="tiny").results[0].ok
                    except Exception as exc:
                        failures.append(repr(exc))
                    if _served(second) >= 5:
                        break
                    time.sleep(0.02)
                on_second = _served(second)
        on_first = _served(first)
    assert failures == []
    assert on_second >= 5, (on_first, on_second, lb.connections)  # the same client, now on the new server too
    assert on_first >= 1
    assert lb.connections >= 2  # it reconnected (GOAWAY at max_connection_age), never failing a call


@pytest.mark.slow
def test_without_a_connection_age_the_client_stays_pinned(service_repo):
    """The control: the same run with --max-connection-age 0 never reaches the second server."""
    settings = {"max_connection_age": 0, "runtime": "onnx"}
    with running_server(service_repo, **settings) as first, proxy() as lb:
        lb.backends.append(first.port)
        with client_for(type("Target", (), {"port": lb.port})(), timeout=10) as client:
            image = sample_image(1)
            assert client.predict([image], model="tiny").results[0].ok
            with running_server(service_repo, **settings) as second:
                lb.backends.append(second.port)
                end = time.monotonic() + 4.0
                while time.monotonic() < end:
                    assert client.predict([image], model="tiny").results[0].ok
                    time.sleep(0.02)
                assert _served(second) == 0
    assert lb.connections == 1
