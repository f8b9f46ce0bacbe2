"""Hot reload and version policies against a real server: a version published while traffic flows takes
over with no failed request, bad versions never replace the serving one, removed versions and models stop
being served, in-flight requests on a replaced version complete, policies select the right versions.

Each test copies the fixture's tiny model into its own repository (the session fixture is read-only) and
publishes versions the way `imgcls export` does: a hidden staging folder renamed into place.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from service_fixtures import client_for, metric, running_server, sample_image, scrape

from imgcls.errors import ImgclsError
from imgcls.service.batcher import Batcher, ShuttingDown
from imgcls.service.cli import _model_policies
from imgcls.service.repository import VersionPolicy
from imgcls.service.server import InferenceServer, ServeConfig
from imgcls.v1 import inference_pb2 as pb
from imgcls.v1 import inference_pb2_grpc as pb_grpc

IMAGE = sample_image(3)

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture


def publish(repo: Path, source: Path, name: str, version: int,
            edit: Callable[[dict, Path], None] | None = None) -> Path:
    """Copy `source` (a version folder) to `repo/name/version` atomically, with the manifest's name and
    version rewritten (and `edit(manifest, folder)` applied), as `imgcls export` publishes: staging folder,
    then rename."""
    staging = repo / f".{name}.tmp-test{version}"
    shutil.copytree(source, staging)
    manifest_path = staging / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["name"], manifest["version"] = name, version
    if edit is not None:
        edit(manifest, staging)
    manifest_path.write_text(json.dumps(manifest))
    (repo / name).mkdir(parents=True, exist_ok=True)
    target = repo / name / str(version)
    os.rename(staging, target)
    return target


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def repo(service_repo, tmp_path) -> Path:
    """A repository with only tiny/1."""
    root = tmp_path / "repo"
    publish(root, service_repo / "tiny" / "1", "tiny", 1)
    return root


@contextmanager
def stub_for(server) -> Iterator[pb_grpc.InferenceStub]:
    """A raw stub (no client retries: an UNAVAILABLE during a swap must show up as an error)."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.InferenceStub(channel)


def served(server) -> dict[str, list[int]]:
    return {name: sorted(versions) for name, versions in server.models.items()}


def predict(stub, version: int = 0, model: str = "tiny") -> pb.PredictResponse:
    return stub.Predict(pb.PredictRequest(model_name=model, model_version=version, images=[IMAGE]), timeout=10)


# --- policies -----------------------------------------------------------------------------------------------


def test_version_policy_parse_and_select():
    versions = [1, 2, 3, 5]
    assert VersionPolicy.parse("latest").select(versions) == [5]
    assert VersionPolicy.parse("latest:2").select(versions) == [3, 5]
    assert VersionPolicy.parse("latest:9").select(versions) == versions
    assert VersionPolicy.parse("all").select(versions) == versions
    assert VersionPolicy.parse("specific:5,1,4").select(versions) == [1, 5]
    assert str(VersionPolicy.parse(" Specific:3,1 ")) == "specific:1,3"
    for bad in ("latest:0", "latest:x", "newest", "all:2", "specific:", "specific:0"):
        with pytest.raises(ImgclsError, match=r"--version-policy .*expected latest, latest:N, all or specific"):
            VersionPolicy.parse(bad)


def test_serve_flags_for_policies_and_polling(monkeypatch):
    from imgcls.cli import build_parser

    assert _model_policies(["a=latest:2", "b=specific:1,3;c=all"]) == {
        "a": "latest:2", "b": "specific:1,3", "c": "all"}
    with pytest.raises(ImgclsError, match="--model-version-policy 'a': expected NAME=POLICY"):
        _model_policies("a")
    args = build_parser().parse_args(["serve", "--versions", "all"])  # the older flag name still works
    assert (args.version_policy, args.poll_interval) == ("all", 10.0)
    monkeypatch.setenv("IMGCLS_VERSION_POLICY", "latest:3")
    monkeypatch.setenv("IMGCLS_POLL_INTERVAL", "2.5")
    args = build_parser().parse_args(["serve"])
    assert (args.version_policy, args.poll_interval) == ("latest:3", 2.5)


def test_bad_policy_is_refused_naming_the_flag(repo):
    with pytest.raises(ImgclsError, match="--model-version-policy tiny= 'latest:-1'"):
        ServeConfig(model_repository=repo, model_versions={"tiny": "latest:-1"}).validate()
    with pytest.raises(ImgclsError, match="--poll-interval"):
        ServeConfig(model_repository=repo, poll_interval=-1).validate()


def test_policies_at_startup_and_on_reload(repo, service_repo):
    for v in (2, 3):
        publish(repo, service_repo / "tiny" / "1", "tiny", v)
    publish(repo, service_repo / "other" / "1", "other", 1)
    with running_server(repo, versions="latest:2", model_versions={"other": "all"}) as server:
        assert served(server) == {"other": [1], "tiny": [2, 3]}
        publish(repo, service_repo / "tiny" / "1", "tiny", 4)
        publish(repo, service_repo / "other" / "1", "other", 2)
        result = server.reload()
        assert sorted(result.loaded) == [("other", 2), ("tiny", 4)] and result.retired == [("tiny", 2)]
        assert served(server) == {"other": [1, 2], "tiny": [3, 4]}
    with running_server(repo, versions="specific:1,3,9") as server:
        assert served(server) == {"other": [1], "tiny": [1, 3]}
        publish(repo, service_repo / "tiny" / "1", "tiny", 9)
        assert server.reload().loaded == [("tiny", 9)]
        assert served(server)["tiny"] == [1, 3, 9]


def test_a_policy_that_selects_nothing_fails_startup(repo):
    with pytest.raises(ImgclsError, match="version policy specific:7 selects none of its versions on disk"), \
            running_server(repo, versions="specific:7"):
        pass


# --- hot reload -----------------------------------------------------------------------------------------------


def test_new_version_takes_over_under_traffic_with_zero_errors(repo, service_repo):
    """Continuous Predict traffic from several threads while version 2 is published: no request fails and
    each thread's responses switch from version 1 to 2 exactly once."""
    with running_server(repo, poll_interval=0.2) as server, stub_for(server) as stub:
        stop = threading.Event()
        seen: list[list[int]] = [[] for _ in range(3)]
        errors: list[str] = []

        def traffic(i: int) -> None:
            while not stop.is_set():
                try:
                    seen[i].append(predict(stub).model_version)
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")

        threads = [threading.Thread(target=traffic, args=(i,)) for i in range(len(seen))]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: all(len(s) >= 3 for s in seen), what="traffic on version 1")
            publish(repo, service_repo / "tiny" / "2", "tiny", 2)
            wait_for(lambda: all(s[-1] == 2 for s in seen), what="every client on version 2")
            counts = [len(s) for s in seen]
            wait_for(lambda: all(len(s) >= c + 3 for s, c in zip(seen, counts, strict=True)), what="more traffic")
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert errors == []
        for versions in seen:
            switches = [i for i in range(1, len(versions)) if versions[i] != versions[i - 1]]
            assert versions[0] == 1 and versions[-1] == 2 and len(switches) == 1, versions
        wait_for(lambda: not server._retiring, what="version 1 unloaded")
        assert served(server) == {"tiny": [2]}
        text = scrape(server)
        assert metric(text, "imgcls_model_loaded", model="tiny", version="2") == 1
        assert 'version="1"' not in "".join(ln for ln in text.splitlines() if ln.startswith("imgcls_model_loaded"))
        assert metric(text, "imgcls_model_swaps_total", model="tiny") == 2  # the first load, then the swap


class Gate:
    """Holds inference of version 1 once armed (warm-up and probe run freely), to keep a request in flight."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def hook(self, entry, runtime):
        gate = self

        class Held:
            def run(self, x: np.ndarray) -> np.ndarray:
                if entry.version == 1 and gate.armed:
                    gate.entered.set()
                    assert gate.release.wait(20)
                return runtime.run(x)

        return Held()


def test_request_in_flight_on_the_replaced_version_completes(repo, service_repo):
    gate = Gate()
    with running_server(repo, runtime_hook=gate.hook) as server, client_for(server, retries=0) as client:
        old = server.models["tiny"][1]
        gate.armed = True
        pending = []
        t = threading.Thread(target=lambda: pending.append(client.predict([IMAGE], model="tiny", timeout=20)))
        t.start()
        assert gate.entered.wait(10)
        publish(repo, service_repo / "tiny" / "2", "tiny", 2)
        assert server.reload().retired == [("tiny", 1)]
        assert served(server) == {"tiny": [2]}
        assert client.predict([IMAGE], model="tiny").version == 2  # new requests: the new version
        assert old in server._retiring  # still resident: its request is not finished
        gate.release.set()
        t.join(10)
        assert pending[0].version == 1 and pending[0].results[0].ok
        wait_for(lambda: not server._retiring, what="version 1 unloaded")
        with pytest.raises(ShuttingDown):
            old.batcher.admit(1)


def test_a_call_that_resolved_the_old_version_can_still_submit_after_the_swap(repo, service_repo):
    """The window between resolve() and submit(): the old version stays until the call ends (call epochs)."""
    from imgcls.service.core import Call

    with running_server(repo) as server:
        core = server.core
        with core.pin():  # what every call does from arrival to answer
            old = core.resolve("tiny", 0)
            publish(repo, service_repo / "tiny" / "2", "tiny", 2)
            server.reload()
            assert core.resolve("tiny", 0).entry.version == 2
            call = Call("test", time.monotonic(), None)
            result = asyncio.run_coroutine_threadsafe(core.infer(call, old, images=[IMAGE]), server._loop).result(10)
            assert isinstance(result.images[0].probabilities, np.ndarray)
            assert old in server._retiring
        wait_for(lambda: not server._retiring, what="version 1 unloaded after the call ended")


def test_an_open_stream_does_not_keep_the_replaced_version_loaded(repo, service_repo):
    """Streams pin versions per request, not for their whole life: the old version goes while the stream
    stays open, and the stream's next request is answered by the new one."""
    requests: queue.Queue = queue.Queue()

    def feed() -> Iterator[pb.PredictRequest]:
        while (item := requests.get()) is not None:
            yield item

    with running_server(repo, grace_period=60) as server, stub_for(server) as stub:
        responses = stub.PredictStream(feed(), timeout=30)
        requests.put(pb.PredictRequest(model_name="tiny", images=[IMAGE], request_id="a"))
        assert next(responses).model_version == 1
        publish(repo, service_repo / "tiny" / "2", "tiny", 2)
        server.reload()
        wait_for(lambda: not server._retiring, timeout=10, what="version 1 unloaded with the stream open")
        requests.put(pb.PredictRequest(model_name="tiny", images=[IMAGE], request_id="b"))
        second = next(responses)
        assert (second.request_id, second.model_version, second.error.code) == ("b", 2, 0)
        requests.put(None)
        assert list(responses) == []


def test_rollback_by_moving_the_newest_version_away(repo, service_repo):
    """Under `latest`, renaming the newest folder to a non-number brings the previous version back (it is
    loaded again) and only then drops the rejected one."""
    with running_server(repo) as server:
        publish(repo, service_repo / "tiny" / "1", "tiny", 2)
        assert server.reload().retired == [("tiny", 1)]
        os.rename(repo / "tiny" / "2", repo / "tiny" / "2.rejected")
        result = server.reload()
        assert (result.loaded, result.retired) == ([("tiny", 1)], [("tiny", 2)])
        assert served(server) == {"tiny": [1]}


def test_an_empty_repository_does_not_unload_everything(repo):
    with running_server(repo) as server:
        shutil.move(repo / "tiny", repo.parent / "tiny-away")  # e.g. the volume is briefly unmounted
        assert server.reload().retired == []
        assert served(server) == {"tiny": [1]}


def nan_for_version(version: int):
    def hook(entry, runtime):
        if entry.version != version:
            return runtime

        class NaN:
            def run(self, x: np.ndarray) -> np.ndarray:
                return np.full_like(runtime.run(x), np.nan)

        return NaN()

    return hook


def corrupt_sha(manifest: dict, folder: Path) -> None:
    manifest["artifacts"][0]["sha256"] = "0" * 64


def another_models_artifact(service_repo: Path) -> Callable[[dict, Path], None]:
    """A valid ONNX file with a matching sha256, but of a model with another input size and class count."""
    def edit(manifest: dict, folder: Path) -> None:
        shutil.copy(service_repo / "other" / "1" / "model.onnx", folder / "model.onnx")
        manifest["artifacts"][0]["sha256"] = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()

    return edit


@pytest.mark.parametrize(("edit", "hook", "error"), [
    (corrupt_sha, None, "sha256 does not match the manifest"),
    (None, nan_for_version(2), "probe inference: the output has NaN"),
    ("other-model", None, "Got invalid dimensions for input"),
], ids=["checksum", "probe-nan", "other-model"])
def test_bad_version_never_replaces_the_serving_one(repo, service_repo, edit, hook, error):
    if edit == "other-model":
        edit = another_models_artifact(service_repo)
    with running_server(repo, runtime_hook=hook, poll_interval=0.1) as server, stub_for(server) as stub:
        target = publish(repo, service_repo / "tiny" / "1", "tiny", 2, edit)
        wait_for(lambda: "tiny" in server.failed, what="the failure to be recorded")
        assert served(server) == {"tiny": [1]}
        assert predict(stub).model_version == 1
        (summary,) = stub.ListModels(pb.ListModelsRequest(), timeout=5).models
        assert list(summary.versions) == [1]
        (failed,) = summary.failed_versions
        assert failed.version == 2 and error in failed.error
        meta = stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name="tiny"), timeout=5)
        assert [(f.version, f.error) for f in meta.failed_versions] == [(2, failed.error)]
        with pytest.raises(grpc.RpcError) as exc_info:
            predict(stub, version=2)
        assert exc_info.value.code() == grpc.StatusCode.NOT_FOUND and "failed to load" in exc_info.value.details()
        assert server.reload().failed == [] and server.reload().failed == []  # unchanged: not retried
        assert metric(scrape(server), "imgcls_model_load_failures_total", model="tiny", version="2") == 1
        if edit is corrupt_sha:  # fixing the files gets it another try
            shutil.rmtree(target)
            publish(repo, service_repo / "tiny" / "1", "tiny", 2)
            wait_for(lambda: served(server) == {"tiny": [2]}, what="the fixed version to load")
            assert server.failed == {} and predict(stub).model_version == 2


def test_failing_newer_version_at_startup_serves_the_older_one(repo, service_repo):
    publish(repo, service_repo / "tiny" / "1", "tiny", 2)
    with running_server(repo, runtime_hook=nan_for_version(2)) as server:
        assert served(server) == {"tiny": [1]}
        assert list(server.failed["tiny"]) == [2]


def test_a_model_whose_only_version_fails_after_startup_is_listed_with_its_error(repo, service_repo):
    with running_server(repo) as server, stub_for(server) as stub:
        publish(repo, service_repo / "other" / "1", "other", 1, corrupt_sha)
        assert server.reload().failed == [("other", 1)]
        models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=5).models}
        assert list(models["other"].versions) == [] and models["other"].failed_versions[0].version == 1
        with pytest.raises(grpc.RpcError) as exc_info:
            predict(stub, model="other")
        assert exc_info.value.code() == grpc.StatusCode.NOT_FOUND and "sha256" in exc_info.value.details()


def test_removed_version_and_model_stop_being_served(repo, service_repo):
    publish(repo, service_repo / "tiny" / "1", "tiny", 2)
    publish(repo, service_repo / "other" / "1", "other", 1)
    with running_server(repo, versions="all") as server, stub_for(server) as stub:
        assert served(server) == {"other": [1], "tiny": [1, 2]}
        shutil.rmtree(repo / "tiny" / "2")
        shutil.rmtree(repo / "other")
        result = server.reload()
        assert sorted(result.retired) == [("other", 1), ("tiny", 2)]
        assert served(server) == {"tiny": [1]}
        assert predict(stub).model_version == 1
        for request in ({"model": "other"}, {"version": 2}):
            with pytest.raises(grpc.RpcError) as exc_info:
                predict(stub, **request)
            assert exc_info.value.code() == grpc.StatusCode.NOT_FOUND
        assert [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=5).models] == ["tiny"]
        wait_for(lambda: not server._retiring, what="unloads")
        assert metric(scrape(server), "imgcls_model_loaded", model="other") == 0


def test_closing_batcher_finishes_admitted_images_and_refuses_new_ones():
    release = threading.Event()

    def run(x: np.ndarray) -> np.ndarray:
        assert release.wait(10)
        return np.ones((len(x), 2), np.float32) / 2

    batcher = Batcher(run, max_batch_size=4, max_queue_delay=0, max_queue_size=8)
    batcher.start()
    job = batcher.admit(2)
    batcher.put(job, 0, np.zeros((2, 2, 3), np.float32))
    closer = threading.Thread(target=batcher.close, kwargs={"timeout": 10})
    closer.start()
    wait_for(lambda: batcher._closing, what="closing")
    with pytest.raises(ShuttingDown):
        batcher.admit(1)
    batcher.put(job, 1, np.zeros((2, 2, 3), np.float32))  # still decoding when close() began
    release.set()
    closer.join(10)
    assert job.done.is_set() and all(isinstance(r, np.ndarray) for r in job.results)


def test_an_empty_repository_waits_not_serving_then_serves_the_first_version(tmp_path, service_repo):
    """Issue 20: pods start before the first export lands; the server stays up, NOT_SERVING, and serves
    within a poll interval of the first version appearing. (A missing folder is still an error:
    test_service_process.py.)"""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    repo = tmp_path / "repo"
    repo.mkdir()  # an empty volume, mounted before the first export
    with running_server(repo, wait=False, poll_interval=0.2) as server, stub_for(server) as stub, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        time.sleep(0.5)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as exc_info:
            predict(stub)
        assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE
        publish(repo, service_repo / "tiny" / "2", "tiny", 1)
        assert server.wait_until_ready(10)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert predict(stub).model_version == 1


def test_an_empty_repository_is_an_error_with_require_models_or_without_hot_reload(tmp_path):
    (tmp_path / "empty").mkdir()
    for settings in ({"poll_interval": 5, "require_models": True}, {"poll_interval": 0}):
        server = InferenceServer(ServeConfig(model_repository=tmp_path / "empty", host="127.0.0.1", port=0,
                                             metrics_port=0, **settings))
        with pytest.raises(ImgclsError, match="no models found"):
            server.start()
        server.stop()


@pytest.mark.parametrize("frozen", [False, True], ids=["heap-not-frozen", "heap-frozen"])
def test_a_retired_version_is_freed_even_from_a_frozen_heap(repo, service_repo, frozen):
    """`imgcls serve` freezes its start-up heap (server.freeze_heap), and the versions loaded at start-up are
    in it. A frozen object caught in a reference cycle is never collected, so a retired version must not sit
    in one: its runtime (the model's memory) has to go by reference counting alone, or every first hot
    reload would leak the start-up version."""
    import gc
    import weakref

    from imgcls.service.server import freeze_heap

    try:
        with running_server(repo) as server, client_for(server, retries=0) as client:
            assert client.predict([IMAGE], model="tiny").version == 1
            old = weakref.ref(server.models["tiny"][1])
            runtime = weakref.ref(server.models["tiny"][1].batcher._runs[0].__self__)  # an instance's runtime
            if frozen:
                freeze_heap()
            publish(repo, service_repo / "tiny" / "2", "tiny", 2)
            assert server.reload().retired == [("tiny", 1)]
            wait_for(lambda: not server._retiring, what="version 1 unloaded")
            assert client.predict([IMAGE], model="tiny").version == 2
            gc.collect()  # what a frozen heap never gets for its cycles; harmless when nothing is frozen
            wait_for(lambda: old() is None and runtime() is None, timeout=5,
                     what="the retired version and its runtime freed")
    finally:
        gc.unfreeze()
