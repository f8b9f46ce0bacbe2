"""The training stage end to end on tiny data: phases, bundle contents, evaluate, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_dataset

from imgcls.backbones import get_backbone
from imgcls.cli import main
from imgcls.manifest import SCHEMA_VERSION, read_manifest


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess (clean TF state, real exit code and stderr)."""
    return subprocess.run([sys.executable, "-m", "imgcls.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


# --- the bundle ---------------------------------------------------------------------------------

def test_bundle_layout_and_manifest(tiny_bundle: Path, synthetic_data: Path):
    for name in ("manifest.json", "labels.txt", "model.keras", "saved_model/saved_model.pb", "split.json",
                 "evaluation.json", "history.csv", "history_phase1.csv", "checkpoints/phase1_best.weights.h5",
                 "plots/learning_curves.png", "plots/confusion_matrix.png", "plots/test_predictions.png"):
        assert (tiny_bundle / name).exists(), name
    assert any((tiny_bundle / "logs" / "phase1").rglob("events.out.tfevents.*"))
    assert not tiny_bundle.with_name("tiny.partial").exists()
    m = read_manifest(tiny_bundle)
    assert m.schema_version == SCHEMA_VERSION and m.kind == "bundle"
    assert m.backbone == "vgg16" and m.class_names == ["class_0", "class_1", "class_2"]
    assert m.preprocessing == get_backbone("vgg16").preprocessing(32)
    assert m.preprocessing.channel_order == "BGR"  # caffe-style, as Keras' vgg16.preprocess_input
    assert m.training["epochs"] == 10 and m.training["seed"] == 1 and m.training["feature_cache"] is True
    assert m.dataset["counts"]["test"] == {"class_0": 4, "class_1": 4, "class_2": 4}
    assert len(m.dataset["fingerprint"]) == 64 and m.dataset["root"] == str(synthetic_data.resolve())
    assert {"tensorflow", "tf_keras", "numpy", "pillow", "imgcls"} <= set(m.library_versions)
    assert m.metrics["test_accuracy"] >= 0.9  # colours are easy: a real head learns them
    assert (tiny_bundle / "labels.txt").read_text().split() == m.class_names
    for png in (tiny_bundle / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_model_signature_has_dynamic_batch(tiny_bundle: Path):
    import tensorflow as tf

    fn = tf.saved_model.load(str(tiny_bundle / "saved_model")).signatures["serving_default"]
    spec = fn.structured_input_signature[1]["images"]
    assert spec.shape.as_list() == [None, 32, 32, 3] and spec.dtype == tf.float32
    out = fn(images=tf.zeros([5, 32, 32, 3]))["probabilities"].numpy()
    assert out.shape == (5, 3) and np.allclose(out.sum(axis=1), 1, atol=1e-5)


def test_evaluate_json_matches_training_report(tiny_bundle: Path, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tiny_bundle), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = read_manifest(tiny_bundle)
    assert report["accuracy"] == pytest.approx(manifest.metrics["test_accuracy"])
    assert 0 <= report["accuracy"] <= 1 and report["num_images"] == 12
    assert set(report["per_class"]) == set(manifest.class_names)
    assert np.asarray(report["confusion_matrix"]).sum() == 12


def test_evaluate_on_other_folder_and_unknown_class(tiny_bundle: Path, tmp_path: Path, capsys):
    other = make_dataset(tmp_path / "other", classes=3, per_class=5, seed=99)
    assert main(["evaluate", "--model", str(tiny_bundle), "--data", str(other), "--json",
                 "--plots", str(tmp_path / "p")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["num_images"] == 15 and report["accuracy"] > 0.8
    assert (tmp_path / "p" / "confusion_matrix.png").exists()
    (other / "class_7").mkdir()
    assert main(["evaluate", "--model", str(tiny_bundle), "--data", str(other)]) == 2
    assert "class_7" in capsys.readouterr().err


def test_split_seed_fixes_the_split_while_seed_varies_training(tiny_bundle: Path, synthetic_data: Path,
                                                               tmp_path: Path):
    out = tmp_path / "other-seed"
    assert main(["train", "--data", str(synthetic_data), "--out", str(out), "--backbone", "vgg16",
                 "--weights", "none", "--input-size", "32", "--epochs", "1", "--seed", "7", "--split-seed", "1",
                 "--json"]) == 0
    tiny = read_manifest(tiny_bundle).training
    assert tiny["seed"] == 1 and tiny["split_seed"] is None
    assert read_manifest(out).training["seed"] == 7 and read_manifest(out).training["split_seed"] == 1
    split = json.loads((out / "split.json").read_text())
    assert split == json.loads((tiny_bundle / "split.json").read_text())  # the tiny bundle's split: seed 1
    no_split_seed = tmp_path / "seed-7"
    assert main(["train", "--data", str(synthetic_data), "--out", str(no_split_seed), "--backbone", "vgg16",
                 "--weights", "none", "--input-size", "32", "--epochs", "1", "--seed", "7", "--json"]) == 0
    assert json.loads((no_split_seed / "split.json").read_text())["train"] != split["train"]


def test_refuses_to_overwrite_a_bundle(tiny_bundle: Path, synthetic_data: Path, capsys):
    before = (tiny_bundle / "manifest.json").read_bytes()
    assert main(["train", "--data", str(synthetic_data), "--out", str(tiny_bundle), "--weights", "none"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tiny_bundle / "manifest.json").read_bytes() == before


# --- phases -------------------------------------------------------------------------------------

@pytest.fixture()
def small_models():
    from imgcls.training import model as model_mod

    # ResNet50: has BatchNorm and, unlike MobileNet at random init, activations that do not vanish,
    # so a training step really moves the unfrozen weights.
    return model_mod.build_models(get_backbone("resnet50"), 32, 3, weights="none")


def test_phase1_only_head_is_trainable(small_models):
    trainable = {w.name.split("/")[0] for w in small_models.inference.trainable_weights}
    assert trainable == {"head_logits"}
    assert not small_models.base.trainable


def test_phase2_unfreezes_top_layers_and_keeps_batchnorm_in_inference_mode(small_models):
    import tf_keras

    from imgcls.training import model as model_mod

    unfrozen = model_mod.unfreeze_top(small_models, 12)
    layers = small_models.base.layers
    bns = [lyr for lyr in layers if isinstance(lyr, tf_keras.layers.BatchNormalization)]
    assert unfrozen and all(not bn.trainable for bn in bns)
    assert all(not lyr.trainable for lyr in layers[:-12])
    assert set(unfrozen) == {lyr.name for lyr in layers[-12:] if lyr.trainable and lyr.weights}

    spec = get_backbone("resnet50").preprocessing(32)
    trainer = model_mod.training_model(small_models, spec, model_mod.augmentation(0))
    trainer.compile(tf_keras.optimizers.SGD(0.5), "categorical_crossentropy")
    bn_before = [w.numpy().copy() for bn in bns for w in bn.weights]
    top = next(lyr for lyr in layers[::-1] if lyr.name in unfrozen)
    low = next(lyr for lyr in layers if lyr.weights and not isinstance(lyr, tf_keras.layers.BatchNormalization))
    top_before, low_before = top.weights[0].numpy().copy(), low.weights[0].numpy().copy()
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    trainer.fit(x, np.eye(3)[np.arange(8) % 3], epochs=1, verbose=0)
    for before, w in zip(bn_before, [w for bn in bns for w in bn.weights], strict=True):
        np.testing.assert_array_equal(before, w.numpy())  # moving stats and gamma/beta untouched
    assert not np.array_equal(top_before, top.weights[0].numpy())
    np.testing.assert_array_equal(low_before, low.weights[0].numpy())


def test_augmentation_only_in_training():
    from imgcls.training import model as model_mod

    aug = model_mod.augmentation(3)
    x = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(aug(x, training=False).numpy(), x)
    assert not np.allclose(aug(x, training=True).numpy(), x)


@pytest.mark.parametrize("backbone,n_top", [("mobilenet_v2", 29), ("resnet50", 12), ("efficientnet_b0", 20)])
def test_split_base_is_the_same_function_with_the_same_trainable_weights(backbone, n_top):
    """Cached-activation fine-tuning trains exactly the layers (and function) live fine-tuning would."""
    from imgcls.training import model as model_mod

    models = model_mod.build_models(get_backbone(backbone), 64, 3, weights="none")
    model_mod.unfreeze_top(models, n_top)
    split = model_mod.split_base(models, n_top)
    x = np.random.default_rng(0).normal(size=(3, 64, 64, 3)).astype(np.float32)
    act = split.lower.predict(x, verbose=0)
    np.testing.assert_allclose(split.upper.predict(act, verbose=0), models.inference.predict(x, verbose=0),
                               atol=1e-6)
    assert {w.name for w in split.upper.trainable_weights} == {w.name for w in models.inference.trainable_weights}
    assert not split.lower.trainable_weights or all(
        w.name not in {v.name for v in split.upper.trainable_weights} for w in split.lower.trainable_weights)


def test_cached_views_are_plain_mirrored_then_augmented(tmp_path: Path):
    """The cache's training views, in the order their labels are repeated: the images, their mirror images,
    then `augment_views` random augmentations (different from the image, drawn again for each view)."""
    import tf_keras

    from imgcls.backbones import get_backbone
    from imgcls.preprocessing import normalize
    from imgcls.training.train import TrainConfig, _predict_views

    spec = get_backbone("mobilenet_v2").preprocessing(16)
    model = tf_keras.Sequential([tf_keras.Input((16, 16, 3)), tf_keras.layers.Flatten()])
    x = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    out = _predict_views(model, x, spec, TrainConfig(out=tmp_path, augment_views=2), verbose=0)
    flat = lambda a: normalize(a, spec).reshape(len(a), -1)  # noqa: E731
    assert out.shape == (20, 16 * 16 * 3)
    np.testing.assert_allclose(out[:5], flat(x), atol=1e-6)
    np.testing.assert_allclose(out[5:10], flat(x[:, :, ::-1]), atol=1e-6)
    for view in (out[10:15], out[15:20]):
        assert view.min() >= -1.0 - 1e-5 and view.max() <= 1.0 + 1e-5  # still pixels in the model's range
        assert not np.allclose(view, out[:5], atol=1e-2) and not np.allclose(view, out[5:10], atol=1e-2)
    assert not np.allclose(out[10:15], out[15:20], atol=1e-2)
    plain_only = _predict_views(model, x, spec, TrainConfig(out=tmp_path, flip_features=False), verbose=0)
    np.testing.assert_allclose(plain_only, out[:5], atol=1e-6)


def test_mixup_blends_samples_and_labels_alike():
    from imgcls.training.train import _PixelBatches

    x = (np.arange(8, dtype=np.float32) * 10).reshape(8, 1)
    y = np.eye(8, dtype=np.float32)
    plain_x, plain_y = _PixelBatches(x, y, 8, False, 0)[0]
    np.testing.assert_array_equal(plain_x, x)
    np.testing.assert_array_equal(plain_y, y)
    bx, by = _PixelBatches(x, y, 8, False, 0, 0.4)[0]
    np.testing.assert_allclose(by.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(bx[:, 0], by @ x[:, 0], rtol=1e-5)  # the sample is blended as its label is
    own = by[np.arange(8), np.arange(8)]
    assert (own >= 0.5 - 1e-6).all()  # each sample keeps the larger part of its own label
    assert (own < 0.99).sum() >= 4  # and most are really blended


def test_weight_average_keeps_the_mean_of_the_last_epochs():
    import tf_keras

    from imgcls.training.train import _weight_average

    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(3)])
    model.compile(tf_keras.optimizers.SGD(0.1), "mse")
    seen: list[list[np.ndarray]] = []
    record = tf_keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append([v.numpy() for v in model.trainable_weights]))
    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    model.fit(x, x[:, :3] * 2, epochs=4, batch_size=8, verbose=0, callbacks=[record, _weight_average(2)])
    assert len(seen) == 4 and not np.allclose(seen[2][0], seen[3][0])
    for v, third, fourth in zip(model.trainable_weights, seen[2], seen[3], strict=True):
        np.testing.assert_allclose(v.numpy(), (third + fourth) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra,phase2_cut,samples", [
    ([], "block5_conv1", 2), (["--fine-tune-augment"], None, 2),
    (["--augment-views", "2", "--mixup", "0.2", "--fine-tune-average", "2"], "block5_conv1", 4)])
def test_fine_tune_phase_end_to_end(tmp_path: Path, synthetic_data: Path, capsys, extra, phase2_cut, samples):
    out = tmp_path / "ft"
    assert main(["train", "--data", str(synthetic_data), "--out", str(out), "--backbone", "vgg16",
                 "--weights", "none", "--input-size", "32", "--epochs", "4", "--learning-rate", "0.01",
                 "--fine-tune-layers", "3", "--fine-tune-epochs", "2", "--fine-tune-lr", "1e-4",
                 "--class-weights", "--json", *extra]) == 0
    m = read_manifest(out)
    n_train = sum(m.dataset["counts"]["train"].values())
    printed = capsys.readouterr().out
    assert f"cached features ({n_train * samples} samples)" in printed
    assert ("kept the mean of the weights of epochs 1-2" in printed) == ("--fine-tune-average" in extra)
    assert m.training["unfrozen_layers"] == ["block5_conv2", "block5_conv3"]
    assert m.training["activation_cache_cut"] == phase2_cut
    assert m.training["fine_tune_layers"] == 3 and m.training["class_weights"] is True
    phases = {line.split(",")[0] for line in (out / "history.csv").read_text().splitlines()[1:]}
    assert phases == {"head", "fine-tune"}
    assert (out / "checkpoints" / "phase2_best.weights.h5").exists()
    assert any((out / "logs" / "phase2").rglob("events.out.tfevents.*"))
    assert m.metrics["test_accuracy"] >= 0.9


def test_augmented_head_phase_without_feature_cache(tmp_path: Path, synthetic_data: Path):
    out = tmp_path / "aug"
    assert main(["train", "--data", str(synthetic_data), "--out", str(out), "--backbone", "vgg16",
                 "--weights", "none", "--input-size", "32", "--epochs", "2", "--augment", "--json"]) == 0
    assert read_manifest(out).training["feature_cache"] is False


# --- user errors (real console command, no traceback) -------------------------------------------

@pytest.mark.parametrize("make,args,message", [
    (None, ["--data", "{tmp}/missing"], "does not exist"),
    ("ok", ["--data", "{tmp}/d", "--augment-views", "-1"], "--augment-views must be 0 or more"),
    ("ok", ["--data", "{tmp}/d", "--mixup", "-0.5"], "--mixup must be 0 (off) or a positive"),
    ("ok", ["--data", "{tmp}/d", "--fine-tune-average", "-1"], "--fine-tune-average must be 0 (off)"),
    ("one_class", ["--data", "{tmp}/d"], "at least two class"),
    ("ok", ["--data", "{tmp}/d", "--backbone", "alexnet"], "unknown backbone 'alexnet'"),
    ("ok", ["--data", "{tmp}/d", "--weights", "{tmp}/nope.h5"], "no such file"),
])
def test_cli_user_errors(tmp_path: Path, make, args, message):
    if make == "one_class":
        make_dataset(tmp_path / "d", classes=1, per_class=3, size=16)
    elif make == "ok":
        make_dataset(tmp_path / "d", classes=2, per_class=3, size=16)
    res = run_cli("train", *[a.format(tmp=tmp_path) for a in args], "--out", str(tmp_path / "o"))
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr


def test_imagenet_weights_missing_offline_is_a_clear_error(tmp_path: Path):
    """No weights in the Keras cache and no network: say where the file should be."""
    make_dataset(tmp_path / "d", classes=2, per_class=3, size=16)
    env = {"HOME": str(tmp_path / "home"), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    res = run_cli("train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--backbone", "resnet50",
                  "--input-size", "32", env=env)
    assert res.returncode == 2, res.stderr
    assert "ImageNet weights for resnet50 are not in the Keras cache" in res.stderr
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()
