"""`imgcls batch`: one file never breaks a job (issue 15, defect 6), and restarts are not noticed (issue 14).

Against `FakeServer` (tests/test_client_retry.py), whose answers the tests script per file: a slow file in a
request of 16, a file that makes the whole request fail, a server that refuses requests of more than one
image, a server restarted mid-run, and one that goes away for good. The reproduction in the issue: a folder
with one decode bomb made the job exit 3 "server unavailable" after 616 s while the server was healthy,
resent the whole 16-file request on each retry, and never got past it on resume.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest
from test_client_retry import FakeServer, fake_server

from imgcls.cli import main
from imgcls.client.batch import EXIT_FAILED_FILES, EXIT_OK, EXIT_SERVER_GONE, BatchConfig, BatchJob, BatchSummary
from imgcls.v1 import inference_pb2 as pb

SLOW, POISON, FLAKY = b"SLOW-FILE", b"POISON-FILE", b"FLAKY-FILE"

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture (real-server test only)


def _folder(root: Path, count: int = 16, special: dict[int, bytes] | None = None) -> Path:
    """`count` files named 00.jpg, 01.jpg, ...; the fake server does not decode, content marks behaviour."""
    folder = root / "photos"
    folder.mkdir()
    for i in range(count):
        (folder / f"{i:02d}.jpg").write_bytes((special or {}).get(i, f"image {i}".encode()))
    return folder


def _run(server: FakeServer, folder: Path, out: Path, **settings) -> BatchSummary:
    settings = {"model": "tiny", "progress": False, "backoff": 0.02, "max_backoff": 0.1, "timeout": 5.0,
                "concurrency": 1, **settings}
    return BatchJob(BatchConfig(target=server.target, input=str(folder), output=out, **settings)).run()


def _rows(out: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}


def _sent(server: FakeServer) -> list[int]:
    """Images per Predict call, in order."""
    return [len(images) for _, images in server.service.calls]


def test_a_slow_file_costs_its_own_row_not_the_job(tmp_path, capfd):
    folder = _folder(tmp_path, special={5: SLOW})
    out = tmp_path / "out.jsonl"
    with fake_server() as server:
        server.service.on_image = lambda data, context: time.sleep(3) if data == SLOW else None
        started = time.monotonic()
        summary = _run(server, folder, out, timeout=1.0)
        took = time.monotonic() - started
        sent = _sent(server)
    rows = _rows(out)
    assert len(rows) == 16 and summary.files == 16 and summary.ok == 15 and summary.failed == 1
    assert rows["05.jpg"]["error"]["code"] == "DEADLINE_EXCEEDED"
    assert "while the server was healthy" in rows["05.jpg"]["error"]["message"]
    assert all("labels" in r for name, r in rows.items() if name != "05.jpg")
    assert summary.stopped is None and summary.exit_code == EXIT_FAILED_FILES  # not 3: the server is fine
    assert summary.split_requests == 1
    assert sent == [16] + [1] * 16  # the request once, then each file once: never the 16 again
    assert took < 6, took  # two timeouts of 1 s, not retries of the whole request
    err = capfd.readouterr().err
    assert "a request of 16 files failed (DEADLINE_EXCEEDED" in err and "sent one by one" in err
    assert "05.jpg: DEADLINE_EXCEEDED" in err

    # Resume gets past it: the error row counts as done, nothing is sent again ...
    with fake_server() as server:
        again = _run(server, folder, out)
        assert again.files == 0 and again.skipped == 16 and _sent(server) == []
    assert again.exit_code == EXIT_FAILED_FILES and again.output_failed == 1
    # ... unless asked: --retry-errors sends the failed file alone, and now it answers.
    with fake_server() as server:
        retried = _run(server, folder, out, retry_errors=True)
        assert _sent(server) == [1]
    assert retried.files == 1 and retried.ok == 1 and retried.exit_code == EXIT_OK
    assert len(_rows(out)) == 16 and all("labels" in r for r in _rows(out).values())


def test_files_delayed_by_a_slow_neighbour_are_not_recorded_as_failed(tmp_path):
    """A server that goes on decoding the slow file after the deadline (two decode workers here, both taken:
    the first request's decode and the file's own) makes the next files wait past their timeout too; they
    get a second chance after the others, and only the slow file (the first to time out alone) gets an error
    row."""
    workers = threading.Semaphore(2)

    def decode(data, context):
        while not workers.acquire(timeout=0.01):  # like the real server, work still queued for a call that
            if not context.is_active():  # has gone (deadline, cancel) is dropped, never started
                return None
        try:
            # Once started it never stops, like a Pillow decode. 3.5 timeouts: every wait in the story below
            # ends 0.5 timeouts away from a deadline (at exactly 4, a neighbour's wait ended on its deadline).
            time.sleep(5.25 if data == SLOW else 0.01)
        finally:
            workers.release()

    folder = _folder(tmp_path, count=8, special={0: SLOW})
    out = tmp_path / "out.jsonl"
    with fake_server() as server:
        server.service.on_image = decode
        summary = _run(server, folder, out, batch_size=8, timeout=1.5)
    rows = _rows(out)
    assert [name for name, r in rows.items() if "error" in r] == ["00.jpg"]
    assert summary.ok == 7 and summary.exit_code == EXIT_FAILED_FILES


def test_a_file_that_takes_the_server_down_gets_an_error_row_and_the_job_goes_on(tmp_path, capfd):
    """A file that gets the server killed each time it is sent (an OOM kill, say; the server restarts):
    after the server went away twice with it in flight, its request is split, and the file alone gets an
    error row, so neither this run nor a resumed one sends it forever."""
    CRASH = b"CRASH-FILE"
    folder = _folder(tmp_path, count=8, special={2: CRASH})
    out = tmp_path / "out.jsonl"
    server = FakeServer().start()
    crashes: list[float] = []

    def restart() -> None:
        server.stop(grace=0)  # everything in flight is lost
        time.sleep(0.3)
        server.start()

    def crash(data, context):
        if data == CRASH:
            crashes.append(time.monotonic())
            time.sleep(0.2)  # it was being decoded when the server died
            threading.Thread(target=restart).start()
            time.sleep(1)

    server.service.on_image = crash
    try:
        summary = _run(server, folder, out, batch_size=4, backoff=0.1, max_backoff=0.5)
    finally:
        time.sleep(0.5)
        server.stop()
    rows = _rows(out)
    assert len(rows) == 8 and [name for name, r in rows.items() if "error" in r] == ["02.jpg"]
    assert "went away twice" in rows["02.jpg"]["error"]["message"]
    assert summary.exit_code == EXIT_FAILED_FILES and summary.split_requests == 1
    assert len(crashes) == 4  # twice in its request of 4, twice alone: then never again
    assert "it may be what takes the server down" in capfd.readouterr().err


def test_a_file_that_fails_the_whole_request_is_isolated(tmp_path):
    def poison(data, context):
        if data == POISON:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "cannot identify image file")

    folder = _folder(tmp_path, count=6, special={2: POISON})
    out = tmp_path / "out.jsonl"
    with fake_server() as server:
        server.service.on_image = poison
        summary = _run(server, folder, out, batch_size=6)
        assert _sent(server) == [6, 1, 1, 1, 1, 1, 1]
    rows = _rows(out)
    assert rows["02.jpg"]["error"] == {"code": "INVALID_ARGUMENT", "message": "cannot identify image file"}
    assert summary.ok == 5 and summary.failed == 1 and summary.exit_code == EXIT_FAILED_FILES


def test_an_internal_error_on_a_request_is_split_too(tmp_path):
    folder = _folder(tmp_path, count=4, special={1: POISON})
    out = tmp_path / "out.jsonl"

    def crash(data, context):
        if data == POISON:
            context.abort(grpc.StatusCode.INTERNAL, "runtime failed")

    with fake_server() as server:
        server.service.on_image = crash
        summary = _run(server, folder, out, batch_size=4)
    assert summary.ok == 3 and _rows(out)["01.jpg"]["error"]["code"] == "INTERNAL"


def test_unavailable_for_one_file_from_a_healthy_server_is_that_files_row(tmp_path):
    """Only a failing health check means the server is gone: a file the server keeps refusing is its row."""
    def flaky(data, context):
        if data == FLAKY:
            context.abort(grpc.StatusCode.UNAVAILABLE, "worker lost")

    folder = _folder(tmp_path, count=4, special={3: FLAKY})
    out = tmp_path / "out.jsonl"
    with fake_server() as server:
        server.service.on_image = flaky
        summary = _run(server, folder, out, batch_size=4, retries=2)
    assert summary.stopped is None and summary.exit_code == EXIT_FAILED_FILES
    assert _rows(out)["03.jpg"]["error"]["code"] == "UNAVAILABLE" and summary.ok == 3


def test_resource_exhausted_honours_the_hint_then_splits(tmp_path, capfd):
    """A server that never has room for 4 images at once (its per-request cost budget, say)."""
    folder = _folder(tmp_path, count=4)
    out = tmp_path / "out.jsonl"
    calls: list[float] = []

    with fake_server() as server:
        original = server.service.Predict

        def predict(request, context):
            calls.append(time.monotonic())
            if len(request.images) > 1:
                context.set_trailing_metadata((("retry-after-ms", "200"),))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "over the decode budget")
            return original(request, context)

        server.service.Predict = predict  # instance attribute: the servicer's bound method is looked up per call
        server.stop()
        server.start()
        summary = _run(server, folder, out, batch_size=4, retries=2)
    assert summary.ok == 4 and summary.retries >= 2 and summary.split_requests == 1
    assert calls[1] - calls[0] >= 0.19 and calls[2] - calls[1] >= 0.19  # waited for the hint, not 0.02 s
    assert "waiting for the server to have room (RESOURCE_EXHAUSTED" in capfd.readouterr().err


def test_a_restart_mid_run_loses_nothing_and_writes_no_error_rows(tmp_path, capfd):
    folder = _folder(tmp_path, count=40)
    out = tmp_path / "out.jsonl"
    server = FakeServer().start()
    answered = threading.Event()

    def slow(data, context):
        if len(server.service.calls) >= 3:
            answered.set()
        time.sleep(0.01)

    server.service.on_image = slow

    def restart() -> None:
        answered.wait(10)
        server.stop(grace=0)  # in-flight calls are cancelled, as a shutdown past its grace period does
        time.sleep(2.5)
        for _ in range(50):  # the port can be briefly held: a client reconnecting to a closed loopback port
            try:             # may connect to itself from that very port (TCP self-connect), then lets go
                server.start()
                return
            except (AssertionError, RuntimeError):
                time.sleep(0.1)

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        summary = _run(server, folder, out, batch_size=2, concurrency=2, backoff=0.1, max_backoff=1.0)
    finally:
        thread.join()
        server.stop()
    rows = _rows(out)
    assert len(rows) == 40 and all("labels" in r for r in rows.values())
    assert summary.exit_code == EXIT_OK and summary.retries >= 1 and summary.failed == 0
    assert "to come back" in capfd.readouterr().err  # it said what it was waiting for


def test_a_server_gone_for_good_stops_with_exit_3_and_resume_finishes(tmp_path, capfd):
    folder = _folder(tmp_path, count=20)
    out = tmp_path / "out.jsonl"
    server = FakeServer().start()

    def stop_after_some(data, context):
        if len(server.service.calls) == 4:
            threading.Thread(target=server.stop, args=(0,), daemon=True).start()
            time.sleep(0.2)

    server.service.on_image = stop_after_some
    try:
        summary = _run(server, folder, out, batch_size=2, retries=3)
    finally:
        server.stop()
    assert summary.exit_code == EXIT_SERVER_GONE and "server unavailable" in summary.stopped
    rows = _rows(out)
    assert 0 < len(rows) < 20 and all("labels" in r for r in rows.values())  # no UNAVAILABLE rows to redo
    assert "waiting for" in capfd.readouterr().err
    with fake_server() as again:
        resumed = _run(again, folder, out)
    assert resumed.exit_code == EXIT_OK and len(_rows(out)) == 20 and resumed.skipped == len(rows)


def test_cli_exit_codes_match_the_help(tmp_path, capsys):
    from imgcls.cli import build_parser

    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["batch"].description.split())
    for code in ("0 all files answered", "1 some files failed", "2 usage error", "3 server unavailable",
                 "130 interrupted"):
        assert code in help_text
    folder = _folder(tmp_path, count=3, special={1: POISON})
    with fake_server() as server:
        server.service.on_image = lambda data, context: (
            pb.Status(code=3, message="not an image") if data == POISON else None)
        args = ["batch", "--target", server.target, "--input", str(folder), "--no-progress"]
        assert main([*args, "--output", str(tmp_path / "a.jsonl")]) == EXIT_FAILED_FILES
        assert main([*args, "--output", str(tmp_path / "a.jsonl"), "--allow-failures"]) == EXIT_OK
        assert main([*args, "--output", str(tmp_path / "b.jsonl"), "--model", "nope"]) == 2
        err = capsys.readouterr().err
        assert "NOT_FOUND" in err and "Traceback" not in err
    port_without_server = server.port
    assert main(["batch", "--target", f"127.0.0.1:{port_without_server}", "--input", str(folder), "--no-progress",
                 "--output", str(tmp_path / "c.jsonl"), "--retries", "1", "--backoff", "0.01"]) == EXIT_SERVER_GONE
    err = capsys.readouterr().err
    assert f"waiting for 127.0.0.1:{port_without_server}" in err  # says what it waits for while it retries
    assert f"is imgcls serve running at 127.0.0.1:{port_without_server}? set --target or IMGCLS_TARGET" in err


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED])
def test_codes_no_file_can_fix_stop_the_job(tmp_path, code):
    from imgcls.errors import ImgclsError

    folder = _folder(tmp_path, count=4)
    with fake_server() as server:
        server.service.fail(code, message="model version gone")
        with pytest.raises(ImgclsError, match=f"the server refused the job: {code.name}"):
            _run(server, folder, tmp_path / "out.jsonl", batch_size=4)


@pytest.mark.slow
def test_real_server_restarted_mid_job(service_repo, tmp_path):
    """The real server drained and started again on the same port (~2.5 s without a server) while
    `imgcls batch` runs: every file answered, no error rows, exit 0."""
    from service_fixtures import running_server, sample_image
    from test_client_retry import free_port

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(60):
        (folder / f"{i:03d}.jpg").write_bytes(sample_image(i, size=(32, 32)))
    out = tmp_path / "out.jsonl"
    port = free_port()
    result: list[BatchSummary] = []

    def job() -> None:
        result.append(BatchJob(BatchConfig(target=f"127.0.0.1:{port}", input=str(folder), output=out, model="tiny",
                                           progress=False, batch_size=2, concurrency=2, backoff=0.1,
                                           max_backoff=1.0, timeout=10.0)).run())

    class Slow:  # 60 files take >3 s, so the restart lands in the middle of the job
        def __init__(self, inner) -> None:
            self.inner, self.format = inner, inner.format

        def run(self, batch):
            time.sleep(0.05)
            return self.inner.run(batch)

    thread = threading.Thread(target=job)
    with running_server(service_repo, port=port, grace_period=2.0, runtime_hook=lambda entry, rt: Slow(rt)):
        thread.start()
        deadline = time.monotonic() + 30
        while (not out.exists() or out.read_bytes().count(b"\n") < 10) and time.monotonic() < deadline:
            time.sleep(0.01)
    time.sleep(1.0)  # nothing listens on the port for a while
    with running_server(service_repo, port=port):
        thread.join(60)
    assert not thread.is_alive()
    summary = result[0]
    rows = _rows(out)
    assert len(rows) == 60 and all("labels" in r for r in rows.values()), summary
    assert summary.exit_code == EXIT_OK and summary.failed == 0 and summary.retries >= 1
