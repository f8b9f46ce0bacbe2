"""Every runtime gives the model's output on dynamic batch sizes; the default artifact is chosen sensibly."""

from __future__ import annotations

import numpy as np
import pytest
from service_fixtures import Reference, sample_image

from imgcls.errors import ImgclsError
from imgcls.manifest import read_manifest
from imgcls.service.runtimes import choose_artifact, load_runtime

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture

IMAGES = [sample_image(200 + i) for i in range(7)]
TOLERANCE = {"tflite": 1e-5, "tflite-fp16": 2e-2, "tflite-int8": 0.1}


@pytest.fixture(scope="module")
def expected(service_repo):
    reference = Reference(service_repo)
    return reference.inputs(IMAGES), reference.probs(IMAGES)


@pytest.mark.parametrize("threads", [1, 2])  # the serving chunk sizes differ (imgcls.runtimes.serving_chunk)
@pytest.mark.parametrize("fmt", ["onnx", "tflite", "tflite-fp16", "tflite-int8"])
def test_runtime_matches_model_on_any_batch_size(service_repo, expected, fmt, threads):
    folder = service_repo / "tiny" / "2"
    runtime = load_runtime(folder, read_manifest(folder).artifact(fmt), threads=threads)
    x, probs = expected
    atol = TOLERANCE.get(fmt, 1e-5)
    for sizes in ([1, 1], [3, 4], [7], [2, 5]):  # TFLite resizes (and caches) per batch size
        start = 0
        for n in sizes:
            out = runtime.run(x[start:start + n])
            assert out.shape == (n, 3) and out.dtype == np.float32
            np.testing.assert_allclose(out, probs[start:start + n], atol=atol)
            start += n
    if fmt == "tflite-int8":  # quantized input and output: same ranking on these images
        assert (runtime.run(x).argmax(1) == probs.argmax(1)).mean() >= 0.85


def test_serving_runs_onnx_in_bounded_chunks(service_repo, expected):
    """A batch larger than the chunk runs in pieces no larger than it (the session's arena stays that small),
    with the same output as one call on the whole batch."""
    from imgcls.runtimes import OnnxRuntime, serving_chunk

    assert (serving_chunk("onnx", 1), serving_chunk("onnx", 2)) == (4, 8)
    assert (serving_chunk("tflite", 1), serving_chunk("tflite-int8", 4), serving_chunk("savedmodel", 2)) == (1, 8, None)
    folder = service_repo / "tiny" / "2"
    runtime = load_runtime(folder, read_manifest(folder).artifact("onnx"), threads=1)
    assert isinstance(runtime, OnnxRuntime) and runtime.max_chunk == 4
    sizes = []
    session_run = runtime.session.run

    def spy(outputs, feed):
        sizes.append(len(next(iter(feed.values()))))
        return session_run(outputs, feed)

    runtime.session = type("Spy", (), {"run": staticmethod(spy)})()
    x, probs = expected
    np.testing.assert_allclose(runtime.run(x), probs, atol=1e-5)
    assert sizes == [4, 3]


_SPIN_PROBE = r"""
import json, sys, time
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from imgcls.runtimes import OnnxRuntime

path = sys.argv[1]
rng = np.random.default_rng(0)
weights = [numpy_helper.from_array((rng.standard_normal((256, 256)) / 16).astype(np.float32), f"w{i}")
           for i in range(12)]
nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}"]) for i in range(12)]
graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])],
                          [helper.make_tensor_value_info("h11", TensorProto.FLOAT, [None, 256])], weights)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 8
onnx.save(model, path)
x = np.ones((256, 256), np.float32)

def busy_after_run(run):
    for _ in range(3):
        run()
    start = time.process_time()
    time.sleep(0.3)
    return time.process_time() - start

options = ort.SessionOptions()  # onnxruntime's own defaults: threads spin, and go on spinning after a run
options.intra_op_num_threads = 2
control = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
spinning, sleeping = OnnxRuntime(path, 2, spin=True), OnnxRuntime(path, 2)
print(json.dumps({
    "control": busy_after_run(lambda: control.run(None, {"x": x})),
    "spin": busy_after_run(lambda: spinning.run(x)),
    "sleep": busy_after_run(lambda: sleeping.run(x)),
    "entries": [[r.session.get_session_options().get_session_config_entry(k)
                 for k in ("session.intra_op.allow_spinning", "session.force_spinning_stop")]
                for r in (spinning, sleeping, OnnxRuntime(path, 1, spin=True))],
}))
"""


def test_spinning_runtime_stops_spinning_when_its_run_returns(tmp_path):
    """`spin=True` (the server's lone-batch runtime) lets onnxruntime's threads spin between operators but not
    after the run: an idle server must not burn a core. onnxruntime's own default does keep spinning, which
    shows the measurement can see it. In a fresh process, so no other thread of the test run is counted."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _SPIN_PROBE, str(tmp_path / "chain.onnx")], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    got = json.loads(out)
    assert got["entries"] == [["1", "1"], ["0", "1"], ["0", "1"]]  # one thread: nothing to spin
    assert got["control"] > 0.03, got  # of 0.3 s idle (measured: 0.09)
    assert got["spin"] < 0.01 and got["sleep"] < 0.01, got  # measured: under 0.0001


@pytest.mark.slow
def test_savedmodel_runtime(service_repo, expected):
    """Imports TensorFlow (only this runtime does): checked in a fresh process via the server elsewhere."""
    folder = service_repo / "tiny" / "2"
    runtime = load_runtime(folder, read_manifest(folder).artifact("savedmodel"), threads=1)
    x, probs = expected
    np.testing.assert_allclose(runtime.run(x[:3]), probs[:3], atol=1e-5)
    np.testing.assert_allclose(runtime.run(x), probs, atol=1e-5)


def _with_benchmarks(manifest, numbers: dict[str, dict]):
    artifacts = [a.model_copy(update={"benchmark": numbers.get(a.format, {})}) for a in manifest.artifacts]
    return manifest.model_copy(update={"artifacts": artifacts})


def _with_formats(manifest, formats: tuple[str, ...]):
    return manifest.model_copy(update={"artifacts": [a for a in manifest.artifacts if a.format in formats]})


def test_choose_artifact_is_a_fixed_order_never_savedmodel_beside_onnx_or_tflite(service_repo):
    """tflite > onnx > savedmodel whatever the export's benchmark said (docs/export.md has the measurements);
    fp16/int8 only when asked; SavedModel only when it is the only full-precision artifact."""
    manifest = read_manifest(service_repo / "tiny" / "2")
    assert choose_artifact(manifest).format == "tflite"
    assert choose_artifact(manifest, "tflite-int8").format == "tflite-int8"  # int8 only when asked
    assert choose_artifact(manifest, "onnx").format == "onnx"  # --runtime still wins
    faster_tflite = {"onnx": {"batch32_images_per_s": 10}, "tflite": {"batch32_images_per_s": 20},
                     "savedmodel": {"batch32_images_per_s": 5}, "tflite-int8": {"batch32_images_per_s": 99}}
    faster_onnx = {"onnx": {"batch32_images_per_s": 30}, "tflite": {"batch32_images_per_s": 20}}
    savedmodel_fastest = {"onnx": {"batch1_p50_ms": 3.0}, "tflite": {"batch1_p50_ms": 4.0},
                          "savedmodel": {"batch1_p50_ms": 1.0, "batch32_images_per_s": 1e6}}
    for numbers in (faster_tflite, faster_onnx, savedmodel_fastest, {}):  # noisy numbers change nothing
        assert choose_artifact(_with_benchmarks(manifest, numbers)).format == "tflite"
        assert choose_artifact(_with_formats(_with_benchmarks(manifest, numbers), ("onnx", "savedmodel"))).format \
            == "onnx"
    only_savedmodel = _with_formats(manifest, ("savedmodel", "tflite-int8"))
    assert choose_artifact(only_savedmodel).format == "savedmodel"
    no_tf = ("onnx", "tflite", "tflite-fp16", "tflite-int8")
    with pytest.raises(ImgclsError, match="no full-precision artifact this server can run"):
        choose_artifact(only_savedmodel, available=no_tf)
    assert choose_artifact(_with_formats(manifest, ("savedmodel", "onnx")), available=no_tf).format == "onnx"
    with pytest.raises(ImgclsError, match="no 'tflite' artifact"):
        choose_artifact(read_manifest(service_repo / "tiny" / "1"), "tflite")
    assert choose_artifact(read_manifest(service_repo / "tiny" / "1")).format == "onnx"


def test_three_exports_of_one_bundle_pick_one_runtime(service_repo):
    """Issue 15 defect 8: three exports picked onnx, tflite, savedmodel because their benchmarks differed."""
    manifest = read_manifest(service_repo / "tiny" / "2")
    runs = [{"onnx": {"batch32_images_per_s": 120}, "tflite": {"batch32_images_per_s": 110},
             "savedmodel": {"batch32_images_per_s": 60}},
            {"onnx": {"batch32_images_per_s": 90}, "tflite": {"batch32_images_per_s": 150},
             "savedmodel": {"batch32_images_per_s": 60}},
            {"onnx": {"batch32_images_per_s": 40}, "tflite": {"batch32_images_per_s": 45},
             "savedmodel": {"batch32_images_per_s": 56}}]
    assert {choose_artifact(_with_benchmarks(manifest, numbers)).format for numbers in runs} == {"tflite"}


def test_service_names_are_the_cores():
    """The server imports these from imgcls.service.*; they are the core's, shared with export."""
    import imgcls.runtimes as core
    from imgcls.export import describe, runners
    from imgcls.service import repository, runtimes

    for name in ("load_runtime", "choose_artifact", "FORMATS", "tensorflow_installed", "default_threads", "Runtime"):
        assert getattr(runtimes, name) is getattr(core, name)
    assert repository.verify_checksum is core.verify_checksum
    assert describe.checksum is core.checksum and describe.tree_sha256 is core.tree_sha256
    assert issubclass(runners.TFLiteRunner, core.TFLiteRuntime) and runners.OnnxRunner is core.OnnxRuntime


def test_checksum_written_by_export_is_verified_by_the_service(tmp_path):
    from imgcls.manifest import Artifact
    from imgcls.runtimes import TREE_METHOD, checksum, verify_checksum

    (tmp_path / "model.onnx").write_bytes(b"weights")
    (tmp_path / "saved_model" / "variables").mkdir(parents=True)
    (tmp_path / "saved_model" / "saved_model.pb").write_bytes(b"graph")
    (tmp_path / "saved_model" / "variables" / "v.data").write_bytes(b"numbers")
    file_art = Artifact(format="onnx", file="model.onnx", sha256=checksum(tmp_path / "model.onnx")[0],
                        size_bytes=7, inputs=[], outputs=[])
    tree_art = Artifact(format="savedmodel", file="saved_model/", sha256=checksum(tmp_path / "saved_model")[0],
                        size_bytes=12, inputs=[], outputs=[], sha256_method=TREE_METHOD)
    verify_checksum(tmp_path, file_art)
    verify_checksum(tmp_path, tree_art)
    (tmp_path / "saved_model" / "variables" / "v.data").write_bytes(b"changed")
    with pytest.raises(ImgclsError, match="sha256 does not match"):
        verify_checksum(tmp_path, tree_art)
    (tmp_path / "model.onnx").write_bytes(b"other")
    with pytest.raises(ImgclsError, match="sha256 does not match"):
        verify_checksum(tmp_path, file_art)


def test_core_runtimes_load_without_tensorflow():
    import subprocess
    import sys

    code = ("import sys, imgcls.runtimes, imgcls.cpus, imgcls.service.runtimes, imgcls.service.repository,"
            " imgcls.export.runners, imgcls.export.describe, imgcls.export.publish;"
            "print(sorted(m for m in ('tensorflow', 'tf_keras', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_corrupt_artifact_is_refused_at_load(service_repo, tmp_path):
    import shutil

    from service_fixtures import running_server

    repo = tmp_path / "repo"
    shutil.copytree(service_repo / "tiny" / "1", repo / "tiny" / "1")
    manifest = repo / "tiny" / "1" / "manifest.json"  # a file that is not the one the manifest describes
    manifest.write_text(manifest.read_text().replace(read_manifest(manifest.parent).artifacts[0].sha256, "0" * 64))
    with pytest.raises(ImgclsError, match="sha256 does not match"), running_server(repo):
        pass
    with running_server(repo, verify_checksums=False) as server:  # the flag turns the check off
        assert server.ready.is_set()
