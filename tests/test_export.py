"""`imgcls export` of the tiny bundle to every format, for real: layout, checks, manifest, versions, bad input.

One full export (all formats, a short benchmark) is shared by the module; the version and `--data` tests
publish the SavedModel alone, which needs no conversion and takes a few seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from imgcls.cli import main
from imgcls.errors import ImgclsError
from imgcls.export import describe
from imgcls.export.pipeline import ExportConfig, run_export
from imgcls.export.samples import subsample
from imgcls.manifest import read_manifest
from imgcls.preprocessing import preprocess_file

FILES = {"savedmodel": "saved_model", "tflite": "model.tflite", "tflite-fp16": "model_fp16.tflite",
         "tflite-int8": "model_int8.tflite", "onnx": "model.onnx"}


def _export_cli(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["export", *args, "--json"])
    assert rc == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def entry(tmp_path_factory, tiny_bundle) -> tuple[Path, dict]:
    repo = tmp_path_factory.mktemp("repo")
    summary = _export_cli("--model", str(tiny_bundle), "--repository", str(repo), "--name", "tiny",
                          "--threads", "2", "--bench-runs", "5", "--bench-batch-runs", "2")
    return repo, summary


def _versions(repo: Path, name: str) -> list[int]:
    return sorted(int(p.name) for p in (repo / name).iterdir())


@pytest.mark.slow
def test_every_format_is_published_with_passing_checks(entry, tiny_bundle):
    repo, summary = entry
    folder = repo / "tiny" / "1"
    assert summary["version"] == 1 and Path(summary["entry"]) == folder
    assert summary["default_runtime"] == "tflite"  # the fixed order, whatever this run's benchmark said
    assert sorted(p.name for p in repo.iterdir()) == ["tiny"]  # no staging folder left behind
    manifest = read_manifest(folder)
    bundle = read_manifest(tiny_bundle)
    assert manifest.kind == "model" and manifest.name == "tiny" and manifest.version == 1
    assert manifest.backbone == bundle.backbone and manifest.preprocessing == bundle.preprocessing
    assert manifest.class_names == bundle.class_names
    assert (folder / "labels.txt").read_text().splitlines() == bundle.class_names
    assert [a.format for a in manifest.artifacts] == list(FILES)
    ref_acc = manifest.export["check_sample"]["reference_accuracy"]
    for art in manifest.artifacts:
        assert art.file == FILES[art.format] and (folder / art.file).exists()
        assert art.checks["passed"] is True and art.accuracy is not None
        assert art.inputs[0].shape == [None, 32, 32, 3] and art.outputs[0].shape == [None, 3]
        for key in ("batch1_p50_ms", "batch1_p90_ms", "batch32_images_per_s"):
            assert art.benchmark[key] > 0
        assert art.benchmark["threads"] == 2
        sha, size = describe.checksum(folder / art.file)
        assert (art.sha256, art.size_bytes) == (sha, size)
    by = {a.format: a for a in manifest.artifacts}
    for fmt in ("tflite", "onnx"):
        assert by[fmt].checks["top1_agreement"] >= 0.995
        assert by[fmt].checks["max_abs_prob_diff"] < 1e-4
    assert by["tflite-fp16"].checks["top1_agreement"] >= 0.99
    assert (ref_acc - by["tflite-int8"].accuracy) * 100 <= 1.5
    # Names: the bundle's where the format keeps them, the real tensor names otherwise.
    for fmt in ("savedmodel", "onnx"):
        assert (by[fmt].inputs[0].name, by[fmt].outputs[0].name) == ("images", "probabilities")
    assert by["tflite"].signatures == {"serving_default": {"inputs": ["images"], "outputs": ["probabilities"]}}
    int8_in, int8_out = by["tflite-int8"].inputs[0], by["tflite-int8"].outputs[0]
    assert int8_in.dtype == int8_out.dtype == "int8"
    assert int8_in.scale > 0 and int8_out.scale > 0 and int8_in.zero_point is not None
    assert by["onnx"].opset == 17
    # The folder hash is reproducible and independent of listing order.
    assert by["savedmodel"].sha256 == describe.tree_sha256(folder / "saved_model")


@pytest.mark.slow
def test_manifest_records_sample_and_calibration(entry, tiny_bundle):
    repo, _ = entry
    manifest = read_manifest(repo / "tiny" / "1")
    split = json.loads((tiny_bundle / "split.json").read_text())
    check = manifest.export["check_sample"]
    assert check["images"] == len(split["val"]) + len(split["test"]) and check["source"] == "bundle val+test split"
    calib = manifest.export["calibration"]
    train_files = {f for f, _ in split["train"]}
    assert 0 < calib["images"] <= 200 and set(calib["files"]) <= train_files
    assert calib["images"] == len(calib["files"])
    assert manifest.export["library_versions"]["tf2onnx"]
    assert "fault_injected" not in manifest.export


@pytest.mark.slow
def test_every_artifact_runs_with_batches_other_than_one(entry, synthetic_data):
    """Straight through the runtimes (not the export's own runners): batch 7 agrees with the SavedModel."""
    import onnxruntime as ort
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    repo, _ = entry
    folder = repo / "tiny" / "1"
    manifest = read_manifest(folder)
    files = sorted(synthetic_data.rglob("*.jpg"))[::10][:7]
    x = np.stack([preprocess_file(f, manifest.preprocessing) for f in files])
    ref = tf.saved_model.load(str(folder / "saved_model")).signatures["serving_default"](
        images=tf.constant(x))["probabilities"].numpy()
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(sess.run(None, {"images": x})[0] - ref).max() < 1e-4
    for art in manifest.artifacts:
        if not art.format.startswith("tflite"):
            continue
        interp = Interpreter(model_path=str(folder / art.file), num_threads=2)
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
        interp.resize_tensor_input(inp["index"], [7, 32, 32, 3], strict=False)
        interp.allocate_tensors()
        feed = x
        if art.inputs[0].dtype == "int8":
            feed = np.clip(np.round(x / art.inputs[0].scale) + art.inputs[0].zero_point, -128, 127).astype(np.int8)
        interp.set_tensor(inp["index"], feed)
        interp.invoke()
        y = interp.get_tensor(out["index"]).astype(np.float32)
        if art.outputs[0].dtype == "int8":
            y = (y - art.outputs[0].zero_point) * art.outputs[0].scale
        assert y.shape == (7, 3)
        assert (y.argmax(1) == ref.argmax(1)).mean() >= 6 / 7, art.format


@pytest.mark.slow
def test_versions_are_next_free_integer_and_existing_ones_refused(entry, tiny_bundle):
    repo, _ = entry
    before = (repo / "tiny" / "1" / "manifest.json").read_bytes()
    common = ["--model", str(tiny_bundle), "--repository", str(repo), "--formats", "savedmodel", "--no-benchmark"]
    assert _export_cli(*common, "--name", "tiny", "--version", "5")["version"] == 5
    assert _export_cli(*common, "--name", "tiny")["version"] == 6  # highest + 1, gaps are not refilled
    with pytest.raises(ImgclsError, match="already exists"):
        run_export(ExportConfig(model=tiny_bundle, repository=repo, name="tiny", version=5, formats=["savedmodel"]))
    assert _versions(repo, "tiny") == [1, 5, 6]
    assert (repo / "tiny" / "1" / "manifest.json").read_bytes() == before
    six = read_manifest(repo / "tiny" / "6")
    assert six.version == 6 and [a.format for a in six.artifacts] == ["savedmodel"] and not six.artifacts[0].benchmark


@pytest.mark.slow
def test_data_folder_as_check_sample(tmp_path, tiny_bundle, synthetic_data):
    summary = run_export(ExportConfig(model=tiny_bundle, repository=tmp_path / "r", name="m", formats=["savedmodel"],
                                      data=synthetic_data, benchmark=False, progress=False))
    manifest = read_manifest(Path(summary["entry"]))
    assert manifest.export["check_sample"]["source"] == "--data"
    assert manifest.export["check_sample"]["images"] == 72
    assert manifest.artifacts[0].accuracy > 0.9


@pytest.mark.slow
def test_bad_inputs_are_clear_errors(tmp_path, tiny_bundle, capsys):
    repo = tmp_path / "repo"

    def export(**kw):
        cfg = {"model": tiny_bundle, "repository": repo, "name": "m", "formats": ["savedmodel"], **kw}
        return run_export(ExportConfig(**cfg))

    with pytest.raises(ImgclsError, match="no such folder"):
        export(model=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImgclsError, match=r"missing; is .* a model bundle"):
        export(model=tmp_path / "empty")
    with pytest.raises(ImgclsError, match=r"unknown format.*'tflite-int4'.*choose from"):
        export(formats=["onnx,tflite-int4"])
    with pytest.raises(ImgclsError, match="--name"):
        export(name="../escape")
    with pytest.raises(ImgclsError, match="--version 0"):
        export(version=0)
    bad = tmp_path / "bad-data"
    (bad / "class_0").mkdir(parents=True)
    (bad / "tulips").mkdir()
    with pytest.raises(ImgclsError, match="does not know: tulips"):
        export(data=bad)
    assert not repo.exists()  # a failed export creates nothing, not even the repository folder
    # Through the CLI: exit code 2 and one line naming the problem, no traceback.
    rc = main(["export", "--model", str(tmp_path / "missing"), "--repository", str(repo), "--name", "m"])
    err = capsys.readouterr().err
    assert rc == 2 and "imgcls export: error:" in err and "no such folder" in err and "Traceback" not in err


@pytest.mark.slow
def test_repository_entry_is_not_a_bundle(entry, tmp_path):
    repo, _ = entry
    with pytest.raises(ImgclsError, match="not a bundle"):
        run_export(ExportConfig(model=repo / "tiny" / "1", repository=tmp_path / "r", name="m"))


def test_subsample_is_stratified_and_seeded():
    rows = [(f"a/{i}", 0) for i in range(90)] + [(f"b/{i}", 1) for i in range(10)]
    picked = subsample(rows, 20, seed=3)
    assert len(picked) == 20 and sum(1 for _, c in picked if c == 1) == 10
    assert picked == subsample(rows, 20, seed=3) != subsample(rows, 20, seed=4)
    assert subsample(rows, None, 0) == rows



@pytest.mark.slow
def test_chunked_tflite_runner_matches_one_batch(entry, synthetic_data):
    """The benchmark runs TFLite in power-of-two chunks like the service; the results must not change."""
    from imgcls.export.runners import TFLiteRunner

    repo, _ = entry
    folder = repo / "tiny" / "1"
    spec = read_manifest(folder).preprocessing
    x = np.stack([preprocess_file(f, spec) for f in sorted(synthetic_data.rglob("*.jpg"))[:13]])
    whole = TFLiteRunner(folder / "model.tflite", 1).run(x)
    chunked = TFLiteRunner(folder / "model.tflite", 1, max_chunk=8).run(x)
    assert chunked.shape == (13, 3) and np.abs(whole - chunked).max() < 1e-5
