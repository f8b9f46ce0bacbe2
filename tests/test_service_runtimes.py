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


@pytest.mark.parametrize("fmt", ["onnx", "tflite", "tflite-fp16", "tflite-int8"])
def test_runtime_matches_model_on_any_batch_size(service_repo, expected, fmt):
    folder = service_repo / "tiny" / "2"
    runtime = load_runtime(folder, read_manifest(folder).artifact(fmt), threads=1)
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


def test_choose_artifact(service_repo):
    manifest = read_manifest(service_repo / "tiny" / "2")
    assert choose_artifact(manifest).format == "onnx"  # fastest full-precision by the fixture's numbers
    assert choose_artifact(manifest, "tflite-int8").format == "tflite-int8"  # int8 only when asked
    faster_tflite = {"onnx": {"batch32_images_per_s": 10}, "tflite": {"batch32_images_per_s": 20},
                     "savedmodel": {"batch32_images_per_s": 5}, "tflite-int8": {"batch32_images_per_s": 99}}
    assert choose_artifact(_with_benchmarks(manifest, faster_tflite)).format == "tflite"
    by_latency = {"onnx": {"batch1_p50_ms": 3.0}, "tflite": {"batch1_p50_ms": 4.0},
                  "savedmodel": {"batch1_p50_ms": 1.0}}
    assert choose_artifact(_with_benchmarks(manifest, by_latency)).format == "savedmodel"
    no_tf = ("onnx", "tflite", "tflite-fp16", "tflite-int8")
    assert choose_artifact(_with_benchmarks(manifest, by_latency), available=no_tf).format == "onnx"
    partial = {"tflite": {"batch32_images_per_s": 20}}  # not comparable: fall back to onnx > tflite > savedmodel
    assert choose_artifact(_with_benchmarks(manifest, partial)).format == "onnx"
    with pytest.raises(ImgclsError, match="no 'tflite' artifact"):
        choose_artifact(read_manifest(service_repo / "tiny" / "1"), "tflite")


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
