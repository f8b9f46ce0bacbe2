"""The Python API (docs/python-api.md): imgcls.train, imgcls.Classifier, the sync and async clients.

The docs' example runs here for real (trained on a small synthetic folder) and must give the predictions
`imgcls evaluate` gives for the same files; the Classifier must give the scores the server gives.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_dataset
from PIL import Image
from service_fixtures import TINY_CLASSES, Reference, client_for, running_server, sample_image

import imgcls
from imgcls.cli import main
from imgcls.errors import ImageDecodeError, ImgclsError

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python-api.md"
# The docs' example trains the default backbone; here the same call trains a model small enough for a unit
# test (VGG16 from random weights on 32 px learns the synthetic colours, as tests/conftest.py's tiny_bundle).
SMALL = {"backbone": "vgg16", "weights": "none", "input_size": 32, "learning_rate": 0.01, "seed": 1,
         "progress": False}


def docs_example(heading: str) -> str:
    """The first ```python block under `heading` in docs/python-api.md."""
    text = DOC.read_text()
    section = text[text.index(heading):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python example under {heading!r}"
    return match.group(1)


# --- the docs example: train, load, predict == imgcls evaluate ----------------------------------------------

@pytest.mark.slow
def test_docs_example_predicts_what_imgcls_evaluate_predicts(tmp_path, monkeypatch, capsys):
    make_dataset(tmp_path / "photos", classes=3, per_class=12, seed=5)
    monkeypatch.chdir(tmp_path)
    real_train = imgcls.train
    calls = []

    def small_train(*args, **kwargs):
        calls.append(kwargs)
        return real_train(*args, **{**kwargs, **SMALL})

    monkeypatch.setattr(imgcls, "train", small_train)
    namespace: dict = {}
    exec(compile(docs_example("## Train, load, predict"), str(DOC), "exec"), namespace)
    assert calls and calls[0]["data"] == "photos" and calls[0]["out"] == "runs/mine"

    bundle, files, predictions = namespace["bundle"], namespace["files"], namespace["predictions"]
    assert isinstance(bundle, imgcls.Bundle) and bundle.path == Path("runs/mine")
    assert (tmp_path / "runs/mine/saved_model/saved_model.pb").is_file()
    assert bundle.class_names == ["class_0", "class_1", "class_2"] and bundle.summary["bundle"] == "runs/mine"
    assert len(files) == 36 and len(predictions) == 36 and all(len(labels) == 3 for labels in predictions)

    capsys.readouterr()
    assert main(["evaluate", "--model", "runs/mine", "--data", "photos", "--top-k", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["num_images"] == len(files)
    mistakes = {m["file"]: m for m in report["mistakes"]}
    names = report["class_names"]
    confusion = np.zeros((len(names), len(names)), int)
    top3 = 0
    for path, labels in zip(files, predictions, strict=True):
        rel = path.relative_to("photos").as_posix()
        true = rel.split("/")[0]
        expected = mistakes[rel]["predicted"] if rel in mistakes else true
        assert labels[0].name == expected, rel
        if rel in mistakes:
            assert labels[0].score == pytest.approx(mistakes[rel]["score"], abs=1e-5)
        confusion[names.index(true), names.index(labels[0].name)] += 1
        top3 += true in [label.name for label in labels]
        assert [label.score for label in labels] == sorted((label.score for label in labels), reverse=True)
    assert confusion.tolist() == report["confusion_matrix"]
    assert top3 / len(files) == pytest.approx(report["top_k_accuracy"])


# --- Classifier on a repository --------------------------------------------------------------------------------

def _inputs() -> tuple[bytes, Image.Image, np.ndarray]:
    data = sample_image(3, fmt="PNG")
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    return data, pil, np.asarray(pil)


def test_classifier_takes_paths_bytes_pil_and_numpy_alike(service_repo, tmp_path):
    clf = imgcls.Classifier.load(service_repo / "tiny" / "2")
    assert clf.format == "tflite" and clf.class_names == TINY_CLASSES  # what `imgcls serve` runs by default
    data, pil, array = _inputs()
    path = tmp_path / "x.png"
    path.write_bytes(data)
    results = clf.predict([path, str(path), data, pil, array], top_k=2)
    assert len(results) == 5 and all(len(labels) == 2 for labels in results)
    first = [(label.name, round(label.score, 6)) for label in results[0]]
    assert all([(label.name, round(label.score, 6)) for label in labels] == first for labels in results)
    assert clf.predict(data, top_k=1)[0][0].name == first[0][0]  # one image, not a list
    assert len(clf.predict(np.stack([array, array]))) == 2  # a 4-D array is a batch
    probs = clf.predict_proba([data])
    assert probs.shape == (1, 3) and np.allclose(probs.sum(1), 1, atol=1e-4)


def test_classifier_scores_match_the_model_on_the_shared_preprocessing(service_repo):
    images = [sample_image(i) for i in range(6)]
    reference = Reference(service_repo, "tiny", 2).probs(images)  # onnxruntime on imgcls.preprocessing
    for runtime in ("onnx", "tflite"):
        clf = imgcls.Classifier.load(service_repo / "tiny" / "2", runtime=runtime)
        assert clf.format == runtime
        np.testing.assert_allclose(clf.predict_proba(images), reference, atol=1e-4)
        top = clf.predict(images, top_k=1)
        assert [labels[0].index for labels in top] == reference.argmax(1).tolist()


def test_classifier_gives_the_servers_scores(service_repo):
    images = [sample_image(10 + i) for i in range(4)]
    clf = imgcls.Classifier.load(service_repo / "tiny")  # a model folder: its latest version (2)
    assert clf.manifest.version == 2
    local = clf.predict(images, top_k=3)
    with running_server(service_repo) as server, client_for(server) as client:
        remote = client.predict(images, model="tiny", top_k=3)
    assert remote.version == 2
    for mine, theirs in zip(local, remote.results, strict=True):
        assert [label.name for label in mine] == [label.name for label in theirs.labels]
        assert [label.score for label in mine] == pytest.approx([label.score for label in theirs.labels], abs=1e-5)


def test_classifier_errors_name_the_problem(service_repo, tmp_path):
    with pytest.raises(ImgclsError, match="no such bundle or model folder"):
        imgcls.Classifier.load(tmp_path / "nope")
    with pytest.raises(ImgclsError, match="not a bundle"):
        imgcls.Classifier.load(tmp_path)
    with pytest.raises(ImgclsError, match="has no 'tflite-int8' artifact"):
        imgcls.Classifier.load(service_repo / "tiny" / "1", runtime="tflite-int8")
    clf = imgcls.Classifier.load(service_repo / "tiny" / "1")
    assert clf.format == "onnx"  # the only artifact of version 1
    with pytest.raises(ImageDecodeError, match="image 1"):
        clf.predict([sample_image(1), b"not an image"])
    with pytest.raises(ImageDecodeError, match="uint8"):
        clf.predict([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(TypeError, match="image 0"):
        clf.predict([42])
    with pytest.raises(ImgclsError, match=r"image 0: .*missing\.png"):
        clf.predict([tmp_path / "missing.png"])


def test_classifier_on_a_bundle_runs_its_saved_model(tiny_bundle, synthetic_data):
    bundle = imgcls.Bundle.open(tiny_bundle)
    clf = bundle.load()
    assert clf.format == "savedmodel" and clf.class_names == bundle.class_names
    files = sorted(synthetic_data.glob("class_1/*.jpg"))[:4]
    assert all(labels[0].name == "class_1" for labels in clf.predict(files, top_k=1))
    with pytest.raises(ImgclsError, match="is a bundle"):
        imgcls.Classifier.load(tiny_bundle, runtime="onnx")


# --- imgcls.train argument handling ---------------------------------------------------------------------------

def test_train_checks_its_arguments_before_loading_tensorflow(tmp_path):
    code = ("import sys, imgcls\n"
            "try:\n    imgcls.train(data=sys.argv[1], out=sys.argv[2])\n"
            "except imgcls.ImgclsError as exc:\n    print('error:', exc)\n"
            "print('tensorflow' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert out == [f"error: --data {tmp_path / 'missing'} does not exist (expected a folder with one subfolder of "
                   "photos per class)", "False"]


def test_train_rejects_unknown_options(tmp_path):
    data = make_dataset(tmp_path / "d", classes=2, per_class=2)
    with pytest.raises(TypeError, match=r"epochz.*known: .*epochs"):
        imgcls.train(data=data, out=tmp_path / "o", epochz=3)


def test_package_ships_type_hints():
    assert (Path(imgcls.__file__).parent / "py.typed").is_file()
    assert "py.typed" in (ROOT / "pyproject.toml").read_text()


# --- the async client --------------------------------------------------------------------------------------------

def test_async_client_predicts_like_the_sync_client(service_repo):
    from imgcls.client import AsyncClient

    images = [sample_image(20 + i) for i in range(3)]

    async def run(target: str):
        async with AsyncClient(target, timeout=30) as client:
            await client.wait_until_serving(30)
            assert await client.health() == "SERVING"
            assert sorted(m.name for m in await client.list_models()) == ["other", "tiny"]
            meta = await client.metadata("tiny")
            together = await asyncio.gather(*(client.predict([img], model="tiny", top_k=2) for img in images))
            pixels = np.asarray(Image.open(io.BytesIO(images[0])).convert("RGB"))
            as_array = await client.predict([pixels], model="tiny", top_k=2)  # sent as PNG: the same pixels
            assert [lb.name for lb in as_array.results[0].labels] == [lb.name for lb in together[0].results[0].labels]
            return meta, together

    with running_server(service_repo) as server, client_for(server) as sync:
        meta, together = asyncio.run(run(f"127.0.0.1:{server.port}"))
        expected = sync.predict(images, model="tiny", top_k=2)
    assert meta.name == "tiny" and list(meta.class_names) == TINY_CLASSES
    for prediction, result in zip(together, expected.results, strict=True):
        assert prediction.model == "tiny" and prediction.version == 2
        assert [(lb.name, round(lb.score, 5)) for lb in prediction.results[0].labels] == \
            [(lb.name, round(lb.score, 5)) for lb in result.labels]


def test_async_client_retries_then_raises_unavailable():
    import grpc

    from imgcls.client import AsyncClient, ServiceError

    retries = []

    async def run():
        async with AsyncClient("127.0.0.1:1", timeout=1.0, on_retry=lambda e, n, d: retries.append(n)) as client:
            await client.predict([b"x"])

    with pytest.raises(ServiceError) as info:
        asyncio.run(run())
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and retries and retries[0] == 0
