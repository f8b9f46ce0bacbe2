"""The hostile-input fuzz suite against a real `imgcls serve` process, on every protocol (issue 15).

The corpus (tests/hostile/corpus.py, >= 1,000 generated inputs) goes through imgcls.v1 Predict, KServe v2
ModelInfer and TF Serving Predict, one image per request, from a few client threads; then the heavy inputs
one at a time with their CPU cost measured; then mixed good+bad requests, the malformed protocol requests
(tests/hostile/protocol.py) and streams with malformed messages. Asserted throughout: 0 crashes (the server
process alive and SERVING after each part), 0 hangs (every call answered within its deadline), no input
expected to be refused classified, every refusal INVALID_ARGUMENT (NOT_FOUND for a model or version not
served) with a short reason, never INTERNAL/UNKNOWN, good images classified, the three protocols agreeing,
and no traceback in the server's log.

Each test reports every failing case (grouped by what went wrong), not only the first.
`IMGCLS_FUZZ_THREADS` (default 4) sets the client threads, `IMGCLS_FUZZ_REPORT_LIMIT` (default 40) the
failures listed per group; docs/fuzzing.md has the rest.
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hostile import corpus, protocol
from hostile.wire import CLEAN_CODES, MAX_REASON_BYTES, PROTOCOLS, Clients, Outcome, Server, call_with_retry

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture (the tiny model repository)

pytestmark = pytest.mark.slow

THREADS = int(os.environ.get("IMGCLS_FUZZ_THREADS", "4"))
DEADLINE = 10.0  # seconds one image or request may take before it counts as a hang
BULK_BUDGET = 200.0  # seconds for the whole bulk corpus; cases not sent by then fail as "not run"
HEAVY_BUDGET = 240.0  # the same for the heavy cases, sent one at a time
CPU_PER_IMAGE = 1.0  # issue 15: no single image costs more than 1 CPU-second
RSS_LIMIT = int(1.5 * 1024**3)  # issue 15: server RSS stays under 1.5 GiB


@pytest.fixture(scope="module")
def server(service_repo):
    with Server(service_repo) as running:
        yield running


@pytest.fixture(scope="module")
def clients(server) -> Clients:
    return Clients(server.channel)


def _assert_healthy(server: Server, clients: Clients, after: str) -> None:
    """No crash, no wedge: the process runs, health says SERVING, a good image is classified promptly."""
    assert server.alive(), (
        f"the server process died after {after} (exit {server.proc.returncode}):\n{server.log()[-4000:]}"
    )
    assert server.health(timeout=5) == "SERVING", f"health not SERVING after {after}"
    for proto in PROTOCOLS:
        outcome = clients.classify(proto, protocol.good_image(9), timeout=5)
        assert outcome.accepted, f"a good image on {proto} after {after}: {outcome}"


def _report(failures: dict[str, list[str]], limit: int = int(os.environ.get("IMGCLS_FUZZ_REPORT_LIMIT", "40"))) -> str:
    """Failures grouped by problem (the first words of the message), each with its cases."""
    groups: dict[str, list[str]] = defaultdict(list)
    for case, problems in failures.items():
        for problem in problems:
            what = problem.split(": ", 1)[1] if problem.split(": ", 1)[0] in PROTOCOLS else problem
            key = re.sub(r"\d+(\.\d+)?", "N", what.split("(")[0].split(":")[0].split("'")[0]).strip()[:90]
            groups[key].append(f"{case}: {problem}"[:300])
    lines = [f"{sum(map(len, groups.values()))} problems in {len(failures)} cases"]
    for key, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"== {key} ({len(items)})")
        lines.extend(f"   {item}" for item in items[:limit])
        if len(items) > limit:
            lines.append(f"   ... and {len(items) - limit} more")
    return "\n".join(lines)


def _send_all(clients: Clients, cases: list[corpus.Case], budget: float) -> dict[tuple[str, str], Outcome]:
    """Every case on every protocol from THREADS threads; what is not sent within `budget` is NOT_RUN."""
    stop_at = time.monotonic() + budget
    jobs = [(case, proto, i) for i, case in enumerate(cases) for proto in PROTOCOLS]

    def one(job) -> tuple[tuple[str, str], Outcome]:
        case, proto, i = job
        if time.monotonic() > stop_at:
            return (case.name, proto), Outcome(proto, "NOT_RUN", "the bulk time budget ran out")
        return (case.name, proto), clients.classify(proto, case.data, timeout=DEADLINE, variant=i)

    with ThreadPoolExecutor(THREADS) as pool:
        return dict(pool.map(one, jobs))


def _check(cases: list[corpus.Case], outcomes: dict[tuple[str, str], Outcome]) -> dict[str, list[str]]:
    failures: dict[str, list[str]] = {}
    for case in cases:
        problems = []
        answers = {proto: outcomes[(case.name, proto)] for proto in PROTOCOLS if (case.name, proto) in outcomes}
        for proto, outcome in answers.items():
            if outcome.code == "NOT_RUN":
                problems.append(f"not run: {outcome.reason}")
                continue
            problems.extend(f"{proto}: {p}" for p in outcome.problems(case.expect))
        finished = {p: o for p, o in answers.items() if o.code in CLEAN_CODES}
        verdicts = {p: ("classified " + str(o.label)) if o.accepted else o.code for p, o in finished.items()}
        if len(set(verdicts.values())) > 1:
            problems.append(f"protocols disagree: {verdicts}")
        if problems:
            failures[f"{case.name} [{case.expect}, {case.kind}]"] = problems
    return failures


def test_corpus_is_large_varied_and_deterministic():
    cases = corpus.build()
    assert len(cases) >= 1000
    assert len({c.name for c in cases}) == len(cases)
    kinds = {c.kind for c in cases}
    assert {
        "good",
        "mutation",
        "truncation",
        "random",
        "non-image",
        "bomb",
        "cost",
        "limit",
        "exif",
        "icc",
        "mode",
        "polyglot",
        "text-format",
        "float",
        "format",
    } <= kinds
    expects = {c.expect for c in cases}
    assert expects == {corpus.ACCEPT, corpus.REJECT, corpus.ANY}
    modes = {c.note.split()[2] for c in cases if c.kind == "mode"}
    assert len(modes) >= 20, sorted(modes)
    again = corpus.build.__wrapped__()  # a second, uncached generation: the same bytes
    assert [(c.name, c.data, c.expect) for c in again] == [(c.name, c.data, c.expect) for c in cases]


def test_image_corpus_on_every_protocol(server, clients):
    """The bulk: every light case, one image per request, on the three protocols."""
    cases = [c for c in corpus.build() if not c.heavy]
    start = time.monotonic()
    outcomes = _send_all(clients, cases, BULK_BUDGET)
    elapsed = time.monotonic() - start
    failures = _check(cases, outcomes)
    _assert_healthy(server, clients, "the image corpus")
    assert not failures, f"{len(cases)} cases x {len(PROTOCOLS)} protocols in {elapsed:.0f} s\n{_report(failures)}"


def test_heavy_inputs_cost_at_most_one_cpu_second_each(server, clients):
    """Cost bombs and the multi-megabyte limit cases, one request at a time, with the server's CPU time per
    image and its peak RSS measured from /proc."""
    cases = [c for c in corpus.build() if c.heavy]
    failures: dict[str, list[str]] = {}
    costs = []
    stop_at = time.monotonic() + HEAVY_BUDGET
    for case in cases:
        if time.monotonic() > stop_at:
            failures[f"{case.name} [{case.expect}, {case.kind}]"] = ["not run: the heavy-case time budget ran out"]
            continue
        problems = []
        answers = {}
        for i, proto in enumerate(PROTOCOLS):
            before = server.cpu_seconds()
            outcome = clients.classify(proto, case.data, timeout=DEADLINE, variant=i)
            time.sleep(0.2)  # work the answer left running (a decode past its deadline) shows up here
            cpu = server.cpu_seconds() - before
            costs.append((cpu, case.name, proto))
            answers[proto] = outcome
            problems.extend(f"{proto}: {p}" for p in outcome.problems(case.expect))
            if cpu > CPU_PER_IMAGE:
                problems.append(f"{proto}: cost {cpu:.1f} CPU-seconds (> {CPU_PER_IMAGE})")
            if not server.alive():
                problems.append(f"{proto}: the server died")
                break
        verdicts = {
            p: ("classified " + str(o.label)) if o.accepted else o.code
            for p, o in answers.items()
            if o.code in CLEAN_CODES
        }
        if len(set(verdicts.values())) > 1:
            problems.append(f"protocols disagree: {verdicts}")
        if problems:
            failures[f"{case.name} [{case.expect}, {case.kind}, {len(case.data)} B]"] = problems
        if not server.alive():
            break
    peak = server.memory()["VmHWM"]
    if peak > RSS_LIMIT:
        failures["server memory"] = [f"peak RSS {peak / 1024**3:.2f} GiB (> 1.5 GiB)"]
    _assert_healthy(server, clients, "the heavy inputs")
    worst = ", ".join(f"{name} on {proto} {cpu:.2f} s" for cpu, name, proto in sorted(costs, reverse=True)[:3])
    assert not failures, f"{len(cases)} heavy cases; most expensive: {worst}\n{_report(failures)}"


def test_mixed_requests_keep_every_good_answer(server, clients):
    """imgcls.v1 has a status per image: good images next to hostile ones are still classified. KServe and TF
    Serving have none, so one bad image fails the request, cleanly."""
    pb = clients.pb
    hostile = [c for c in corpus.build() if not c.heavy and c.expect == corpus.REJECT][::7][:60]
    good = [c for c in corpus.build() if c.kind == "good" and c.expect == corpus.ACCEPT and len(c.data) < 200_000]
    failures: dict[str, list[str]] = {}

    def one(i: int) -> None:
        bad = hostile[3 * i : 3 * i + 3]
        images = [good[i % len(good)], bad[0], good[(i + 1) % len(good)], *bad[1:]]
        name = "mixed-" + "+".join(c.name for c in images)
        try:
            reply = call_with_retry(
                clients.v1.Predict, pb.PredictRequest(model_name="tiny", images=[c.data for c in images]), DEADLINE
            )
        except grpc.RpcError as exc:
            failures[name] = [f"v1 request failed as a whole: {exc.code().name} {exc.details()[:200]!r}"]
            return
        problems = []
        for case, result in zip(images, reply.results, strict=True):
            ok = result.status.code == 0
            if case.expect == corpus.ACCEPT and not (ok and result.labels):
                problems.append(f"{case.name}: good image lost ({result.status.code} {result.status.message[:100]!r})")
            if case.expect == corpus.REJECT:
                if ok:
                    problems.append(f"{case.name}: classified")
                elif result.status.code != grpc.StatusCode.INVALID_ARGUMENT.value[0] or not result.status.message:
                    problems.append(f"{case.name}: status {result.status.code} {result.status.message[:100]!r}")
        if problems:
            failures[name] = problems

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(one, range(len(hostile) // 3)))
    for proto in ("kserve", "tfserving"):
        for case in hostile[:10]:
            outcome = _send_pair(clients, proto, [good[0].data, case.data])
            if outcome.code != "INVALID_ARGUMENT" or not outcome.reason or len(outcome.reason) > MAX_REASON_BYTES:
                failures[f"{proto}-pair-good+{case.name}"] = [f"{outcome.code} {outcome.reason[:200]!r}"]
    _assert_healthy(server, clients, "mixed requests")
    assert not failures, _report(failures)


def _send_pair(clients: Clients, proto: str, images: list[bytes]) -> Outcome:
    from hostile.wire import DT_STRING, MODEL, kserve_images_request

    start = time.monotonic()
    try:
        if proto == "kserve":
            call_with_retry(clients.model_infer, kserve_images_request(clients.kpb, images), DEADLINE)
        else:
            request = clients.tf_predict_request()
            request.model_spec.name = MODEL
            tensor = request.inputs["images"]
            tensor.dtype = DT_STRING
            tensor.tensor_shape.dim.add(size=len(images))
            tensor.string_val.extend(images)
            call_with_retry(clients.tf_predict, request, DEADLINE)
    except grpc.RpcError as exc:
        return Outcome(proto, exc.code().name, exc.details() or "", seconds=time.monotonic() - start)
    return Outcome(proto, "OK", seconds=time.monotonic() - start)


def test_malformed_requests_on_every_protocol(server):
    """~150 protocol-level cases: odd names and versions, overflowing shapes, NaN pixels, wrong types..."""
    calls = protocol.calls()
    assert len(calls) >= 140

    def one(call: protocol.Call) -> tuple[str, list[str]]:
        method = server.channel.unary_unary(call.method)  # raw bytes both ways
        start = time.monotonic()
        problems = []
        try:
            reply = call_with_retry(method, call.request, DEADLINE)
            code, details = "OK", ""
        except grpc.RpcError as exc:
            reply, code, details = None, exc.code().name, exc.details() or ""
        seconds = time.monotonic() - start
        if code == "DEADLINE_EXCEEDED":
            return call.name, [f"no answer within {DEADLINE:.0f} s: a hang"]
        if code not in call.codes:
            problems.append(f"status {code}, expected {'/'.join(call.codes)} ({details[:200]!r})")
        if code != "OK":
            if not details.strip():
                problems.append(f"{code} without a reason")
            if len(details.encode()) > MAX_REASON_BYTES:
                problems.append(f"reason of {len(details.encode())} bytes (> {MAX_REASON_BYTES}): not truncated")
        elif call.check is not None and call.response is not None:
            wrong = call.check(call.response(reply))
            if wrong:
                problems.append(f"OK but {wrong}")
        if seconds > DEADLINE / 2:
            problems.append(f"took {seconds:.1f} s")
        return call.name, problems

    with ThreadPoolExecutor(THREADS) as pool:
        results = dict(pool.map(one, calls))
    failures = {name: problems for name, problems in results.items() if problems}
    _assert_healthy(server, clients=Clients(server.channel), after="the malformed requests")
    assert not failures, f"{len(calls)} protocol cases\n{_report(failures)}"


def test_streams_answer_a_malformed_message_and_go_on(server):
    """PredictStream and ModelStreamInfer: each malformed message is answered with an error, the next good one
    is answered normally, and the stream ends when the client ends it (no wedged stream or worker)."""
    from tritonclient.grpc import service_pb2 as kpb

    from imgcls.v1 import inference_pb2 as pb

    failures: dict[str, list[str]] = {}
    for stream in protocol.streams():
        is_v1 = stream.method.startswith(protocol.V1)
        reply_cls = pb.PredictResponse if is_v1 else kpb.ModelStreamInferResponse
        call = server.channel.stream_stream(stream.method, response_deserializer=reply_cls.FromString)
        outbox: queue.Queue = queue.Queue()
        answers: list = []
        problems: list[str] = []
        responses = call(iter(outbox.get, None), timeout=60)
        done = threading.Event()

        def read(responses=responses, answers=answers, problems=problems, done=done) -> None:
            try:
                for reply in responses:
                    answers.append(reply)
            except grpc.RpcError as exc:
                problems.append(f"stream ended with {exc.code().name}: {exc.details()[:200]!r}")
            finally:
                done.set()

        threading.Thread(target=read, daemon=True).start()
        for i, message in enumerate(stream.messages):  # one at a time: each must be answered before the next
            outbox.put(message)
            deadline = time.monotonic() + DEADLINE
            while len(answers) <= i and time.monotonic() < deadline and not done.is_set():
                time.sleep(0.01)
            if len(answers) <= i:
                problems.append(f"message {i} ({stream.expect[i]}) never answered: the stream is wedged")
                break
        outbox.put(None)
        if not done.wait(DEADLINE):
            problems.append("the stream did not end after the client closed its side")
            responses.cancel()
        for i, (expect, reply) in enumerate(zip(stream.expect, answers, strict=False)):
            if is_v1:
                failed = reply.error.code != 0
                reason = reply.error.message
                ok = not failed and reply.results and any(r.labels for r in reply.results)
                code_ok = not failed or reply.error.code in (3, 5)  # INVALID_ARGUMENT, NOT_FOUND
            else:
                failed = bool(reply.error_message)
                reason = reply.error_message
                ok = not failed and len(reply.infer_response.outputs) > 0
                code_ok = not failed or reason.startswith(("INVALID_ARGUMENT", "NOT_FOUND"))
            if expect == "ok" and not ok:
                problems.append(f"message {i}: a good request answered {reason[:200]!r}")
            if expect == "error":
                if not failed:
                    problems.append(f"message {i}: a malformed request answered without an error")
                elif not reason or len(reason.encode()) > MAX_REASON_BYTES or not code_ok:
                    problems.append(f"message {i}: error {reason[:200]!r} ({len(reason.encode())} bytes)")
        if len(answers) != len(stream.messages) and not any("wedged" in p for p in problems):
            problems.append(f"{len(answers)} answers for {len(stream.messages)} messages")
        if problems:
            failures[stream.name] = problems
        if not server.alive():
            break
    _assert_healthy(server, Clients(server.channel), "the malformed streams")
    assert not failures, _report(failures)


def test_many_streams_with_a_bad_version_leave_the_server_serving(server):
    """Issue 15, item 1: 71 streams of one `model_version "²"` message each kept health and inference at
    DEADLINE_EXCEEDED. Each must be answered with an error and end when its client ends it."""
    from tritonclient.grpc import service_pb2 as kpb

    message = kpb.ModelInferRequest(model_name="tiny", model_version="²").SerializeToString()
    call = server.channel.stream_stream(
        protocol.KSERVE + "ModelStreamInfer", response_deserializer=kpb.ModelStreamInferResponse.FromString
    )
    problems: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        outbox: queue.Queue = queue.Queue()
        outbox.put(message)
        responses = call(iter(outbox.get, None), timeout=3 * DEADLINE)
        try:
            reply = next(responses)
            outbox.put(None)
            rest = list(responses)
            wrong = None if reply.error_message and not rest else f"answer {reply.error_message[:100]!r}, then {rest}"
        except grpc.RpcError as exc:
            wrong = f"{exc.code().name}: {(exc.details() or '')[:100]}"
        finally:
            outbox.put(None)
            responses.cancel()
        if wrong:
            with lock:
                problems.append(f"stream {i}: {wrong}")

    with ThreadPoolExecutor(72) as pool:
        list(pool.map(one, range(72)))
    _assert_healthy(server, Clients(server.channel), "72 streams with version '²'")
    assert not problems, f"{len(problems)} of 72 streams:\n" + "\n".join(problems[:20])


def test_sigterm_during_a_flood_of_bombs_exits_within_the_grace_period(service_repo):
    """SIGTERM while cost bombs are being decoded: the server exits 0 within its grace period (a decode that
    outlives its request must not hold the process)."""
    bombs = [c for c in corpus.build() if c.kind == "cost"]
    with Server(service_repo, grace_period=5.0) as fresh:
        clients = Clients(fresh.channel)
        pool = ThreadPoolExecutor(8)
        try:
            for i in range(24):
                pool.submit(clients.classify, PROTOCOLS[i % 3], bombs[i % len(bombs)].data, 30.0, i)
            time.sleep(1.0)  # the bombs are in the decoders now
            code, seconds = fresh.terminate(timeout=fresh.grace_period + 20)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        assert code == 0 and seconds <= fresh.grace_period + 2, (
            f"SIGTERM: exit code {code} after {seconds:.1f} s (grace period {fresh.grace_period:g} s)\n"
            f"{fresh.log()[-3000:]}"
        )


def test_no_traceback_in_the_server_log(server, clients):
    """Every client mistake above was a clean refusal: nothing in the log looks like a crash."""
    _assert_healthy(server, clients, "the whole suite")
    log = server.log()
    for marker in ("Traceback (most recent call last)", "Segmentation fault", "Fatal Python error"):
        assert marker not in log, f"{marker!r} in the server log:\n{log[log.index(marker) - 2000 :][:6000]}"
