"""`imgcls train`: scan, (cache features,) train the head, optionally fine-tune, evaluate, write a bundle.

The bundle is assembled in `OUT.partial/` and renamed to `OUT` only when complete, so a crash never
leaves something that looks like a finished bundle, and checkpoints/logs of a failed run stay there.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from imgcls import __version__
from imgcls.backbones import get_backbone
from imgcls.errors import ImgclsError
from imgcls.manifest import Manifest, write_manifest
from imgcls.preprocessing import PreprocessingSpec, normalize
from imgcls.training import data as data_mod
from imgcls.training import model as model_mod
from imgcls.training import plots
from imgcls.training.evaluate import evaluation_report, format_report

log = logging.getLogger(__name__)
FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"


@dataclass
class TrainConfig:
    out: Path
    data: Path | None = None  # None: the flower_photos dataset via the Keras cache
    backbone: str = "efficientnet_lite0"  # docs/backbones.md: +3 points over mobilenet_v2, same training time
    weights: str = "imagenet"
    input_size: int | None = None  # None: the backbone's own
    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-3
    dropout: float = 0.2
    hidden_units: int = 0
    label_smoothing: float = 0.0
    seed: int = 42
    split_seed: int | None = None  # the train/val/test split's own seed (None: `seed`), to vary only training
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    class_weights: bool = False
    augment: bool = False  # phase 1 on augmented pixels (no feature cache)
    cache_features: bool = True  # phase 1 on features computed once (only without augmentation)
    flip_features: bool = True  # also cache features of mirrored training images
    # Extra randomly augmented copies (the --augment layers) of each training image in the cache: drawn once,
    # so each costs one more forward pass per image in all rather than one per epoch.
    augment_views: int = 0
    mixup: float = 0.0  # Beta(alpha, alpha) blending of training samples in both phases (0: off)
    # Phase 2 keeps the mean of its last N epochs' weights (stochastic weight averaging) instead of the epoch
    # with the best validation loss; all epochs run. 0: early stopping picks one epoch.
    fine_tune_average: int = 0
    fine_tune_layers: int = 0  # phase 2 off unless > 0
    fine_tune_epochs: int = 10
    fine_tune_lr: float = 1e-5
    # Phase 2 on activations cached below the unfrozen layers (+ mirrored copies) unless live random
    # augmentation is asked for, which costs a full forward pass per image per epoch.
    fine_tune_augment: bool = False
    activation_cache_gb: float = 6.0
    patience: int = 4
    overwrite: bool = False
    progress: bool = True


def flowers_dir() -> Path:
    """The flower_photos folder: from the Keras cache when present, else via Keras' get_file download."""
    cached = model_mod.keras_cache_dir() / "datasets" / "flower_photos"
    if cached.is_dir():
        return cached
    import tf_keras

    try:  # get_file(untar=True) looks for the .tar.gz first, so the folder check above comes first
        return Path(tf_keras.utils.get_file("flower_photos", origin=FLOWERS_URL, untar=True))
    except Exception as exc:
        raise ImgclsError(
            f"no --data given and the flower_photos dataset is not in the Keras cache ({cached}) "
            f"and could not be downloaded ({str(exc).splitlines()[0][:160]}). Copy it there "
            "(make keras-cache does it from ../shared/keras-cache) or pass --data DIR"
        ) from None


class _PixelBatches:
    """Shuffled batches of uint8 pixels as float32 0..255 (augmentation and normalization run in-graph), or of
    cached features/activations; with `mixup` > 0 each sample is blended with another of its batch (weight
    drawn from Beta(mixup, mixup), labels blended alike): mixup (Zhang et al. 2018), or manifold mixup
    (Verma et al. 2019) on cached activations, where it costs nothing and stops the memorizing that
    cached views invite."""

    def __new__(cls, *args, **kwargs):
        import tf_keras

        class Seq(tf_keras.utils.Sequence):
            def __init__(self, x, y, batch_size, shuffle, seed, mixup=0.0):
                super().__init__()
                self.x, self.y, self.batch_size, self.shuffle, self.mixup = x, y, batch_size, shuffle, mixup
                self.rng = np.random.default_rng(seed)
                self.order = np.arange(len(x))
                if shuffle:
                    self.rng.shuffle(self.order)

            def __len__(self):
                return int(np.ceil(len(self.x) / self.batch_size))

            def __getitem__(self, i):
                idx = self.order[i * self.batch_size:(i + 1) * self.batch_size]
                x, y = self.x[idx].astype(np.float32), self.y[idx]
                if self.mixup > 0 and len(idx) > 1:
                    lam = self.rng.beta(self.mixup, self.mixup, len(idx)).astype(np.float32)
                    lam = np.maximum(lam, 1 - lam)  # the sample's own label stays the larger part
                    other = self.rng.permutation(len(idx))
                    w = lam.reshape(-1, *[1] * (x.ndim - 1))
                    x = w * x + (1 - w) * x[other]
                    y = lam[:, None] * y + (1 - lam[:, None]) * y[other]
                return x, y

            def on_epoch_end(self):
                if self.shuffle:
                    self.rng.shuffle(self.order)

        return Seq(*args, **kwargs)


def _weight_average(start_epoch: int):
    """A callback keeping the running mean of the trainable weights from epoch `start_epoch` (0-based) on and
    putting it in the model when training ends (SWA, Izmailov et al. 2018). BatchNorm is frozen in phase 2,
    so the averaged network needs no statistics pass."""
    import tf_keras

    class WeightAverage(tf_keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0
            self.mean: list[np.ndarray] | None = None

        def on_epoch_end(self, epoch, logs=None):
            if epoch < start_epoch:
                return
            weights = [v.numpy() for v in self.model.trainable_weights]
            self.count += 1
            self.mean = weights if self.mean is None else [
                m + (w - m) / self.count for m, w in zip(self.mean, weights, strict=True)]

        def on_train_end(self, logs=None):
            if self.mean is not None:
                for v, m in zip(self.model.trainable_weights, self.mean, strict=True):
                    v.assign(m)

    return WeightAverage()


def _one_hot(y: np.ndarray, c: int) -> np.ndarray:
    return np.eye(c, dtype=np.float32)[y]


def _callbacks(work: Path, phase: str, patience: int, average_from: int | None = None):
    """Checkpoint, early stopping (or weight averaging from 0-based epoch `average_from` on), logs."""
    import tf_keras

    (work / "checkpoints").mkdir(exist_ok=True)
    if average_from is None:
        choose = tf_keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
    else:
        choose = _weight_average(average_from)
    return [
        tf_keras.callbacks.ModelCheckpoint(
            str(work / "checkpoints" / f"{phase}_best.weights.h5"), monitor="val_loss",
            save_best_only=True, save_weights_only=True,
        ),
        choose,
        tf_keras.callbacks.CSVLogger(str(work / f"history_{phase}.csv")),
        tf_keras.callbacks.TensorBoard(log_dir=str(work / "logs" / phase), histogram_freq=0, write_graph=False,
                                       profile_batch=0),
    ]


def _versions() -> dict[str, str]:
    import PIL
    import tensorflow as tf
    import tf_keras

    return {"imgcls": __version__, "python": sys.version.split()[0], "tensorflow": tf.__version__,
            "tf_keras": tf_keras.__version__, "numpy": np.__version__, "pillow": PIL.__version__}


def _save_saved_model(inference, path: Path, spec: PreprocessingSpec) -> None:
    import tensorflow as tf

    h, w = spec.input_size

    @tf.function(input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32, name=model_mod.INPUT_NAME)])
    def serve(images):
        return {model_mod.OUTPUT_NAME: inference(images, training=False)}

    tf.saved_model.save(inference, str(path), signatures={"serving_default": serve})


def train(cfg: TrainConfig) -> dict:
    """Run the whole job; returns the summary (also in the bundle's manifest)."""
    started = time.perf_counter()
    out = Path(cfg.out)
    if (out / "manifest.json").exists() and not cfg.overwrite:
        raise ImgclsError(f"{out} already holds a model bundle; pass --overwrite or choose another --out")
    if out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
        raise ImgclsError(f"{out} exists and is not an imgcls bundle; refusing to write into it")
    backbone = get_backbone(cfg.backbone)
    size = cfg.input_size or backbone.input_size
    if size < backbone.min_input_size:
        raise ImgclsError(f"{backbone.name} needs --input-size of at least {backbone.min_input_size}")
    if cfg.epochs < 1:
        raise ImgclsError("--epochs must be at least 1")
    if cfg.augment_views < 0:
        raise ImgclsError("--augment-views must be 0 or more")
    if cfg.fine_tune_average < 0:
        raise ImgclsError("--fine-tune-average must be 0 (off) or a number of epochs")
    if cfg.mixup < 0:
        raise ImgclsError("--mixup must be 0 (off) or a positive Beta parameter such as 0.2")
    if cfg.weights not in ("imagenet", "none") and not Path(cfg.weights).is_file():
        raise ImgclsError(f"--weights {cfg.weights}: no such file (use imagenet, none or a weights file)")
    spec = backbone.preprocessing(size)
    data_root = Path(cfg.data) if cfg.data else flowers_dir()

    # 1. Scan and decode everything first: bad files are listed now, never a crash mid-epoch.
    dataset = data_mod.scan(data_root, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                            seed=cfg.seed if cfg.split_seed is None else cfg.split_seed)
    names = dataset.class_names
    c = len(names)
    if len(dataset.splits["val"]) == 0:
        raise ImgclsError("the validation split is empty; add images or raise --val-fraction")

    # 2. The model before decoding: a missing weights file fails in seconds, not after the decode.
    import tf_keras

    tf_keras.utils.set_random_seed(cfg.seed)
    models = model_mod.build_models(backbone, size, c, weights=cfg.weights, dropout=cfg.dropout,
                                    hidden_units=cfg.hidden_units)
    arrays = data_mod.load_images(dataset, spec, progress=cfg.progress)
    _print_counts(dataset)
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = arrays["train"], arrays["val"], arrays["test"]
    cw = data_mod.class_weights(y_tr, c) if cfg.class_weights else None
    loss = tf_keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing)
    history: list[tuple[str, dict]] = []
    timings: dict[str, float] = {}

    verbose = 2 if cfg.progress else 0
    use_cache = cfg.cache_features and not cfg.augment
    split = _activation_split(models, cfg) if use_cache and cfg.fine_tune_layers > 0 else None
    n_views = (2 if cfg.flip_features else 1) + cfg.augment_views
    labels_tr = np.concatenate([y_tr] * n_views) if use_cache else y_tr
    cache_limit = cfg.activation_cache_gb * 2**30
    if split is not None and _activation_bytes(split, len(x_tr) * n_views + len(x_va)) > cache_limit:
        print(f"phase 2: activations at {split.cut} would exceed {cfg.activation_cache_gb:g} GiB; "
              "fine-tuning on images instead (fewer --fine-tune-layers keeps the cache small)", flush=True)
        split = None

    # 3. Phase 1: the head, base frozen.
    t0 = time.perf_counter()
    if use_cache:
        if split is not None:
            est = _activation_bytes(split, len(x_tr) * n_views + len(x_va))
            print(f"phase 1: computing activations at {split.cut} {split.activation_shape} once "
                  f"({est / 2**20:.0f} MiB; both phases train on them)", flush=True)
            acts_tr = _predict_views(split.lower, x_tr, spec, cfg, verbose)
            acts_va = split.lower.predict(normalize(x_va, spec), batch_size=64, verbose=0)
            feats_tr = split.features.predict(acts_tr, batch_size=256, verbose=0)
            feats_va = split.features.predict(acts_va, batch_size=256, verbose=0)
        else:
            print(f"phase 1: computing {backbone.name} features once (cached-feature head training)", flush=True)
            extractor = model_mod.feature_extractor(models)
            feats_tr = _predict_views(extractor, x_tr, spec, cfg, verbose)
            feats_va = extractor.predict(normalize(x_va, spec), batch_size=64, verbose=0)
        timings["feature_extraction_s"] = time.perf_counter() - t0
        models.head.compile(tf_keras.optimizers.Adam(cfg.learning_rate), loss, metrics=["accuracy"])
        print(f"phase 1: training the head on cached features ({len(feats_tr)} samples)", flush=True)
        h = models.head.fit(
            **_train_data(feats_tr, _one_hot(labels_tr, c), cfg, cfg.seed),
            validation_data=(feats_va, _one_hot(y_va, c)),
            epochs=cfg.epochs, class_weight=cw, verbose=verbose,
            callbacks=_callbacks(work, "phase1", cfg.patience),
        )
    else:
        augment = model_mod.augmentation(cfg.seed) if cfg.augment else None
        trainer = model_mod.training_model(models, spec, augment)
        trainer.compile(tf_keras.optimizers.Adam(cfg.learning_rate), loss, metrics=["accuracy"])
        print("phase 1: training the head end to end" + (" with augmentation" if augment else ""), flush=True)
        h = trainer.fit(
            _PixelBatches(x_tr, _one_hot(y_tr, c), cfg.batch_size, True, cfg.seed, cfg.mixup),
            validation_data=_PixelBatches(x_va, _one_hot(y_va, c), 64, False, cfg.seed),
            epochs=cfg.epochs, class_weight=cw, verbose=verbose,
            callbacks=_callbacks(work, "phase1", cfg.patience),
        )
    history.append(("head", h.history))
    timings["phase1_s"] = time.perf_counter() - t0

    # 4. Phase 2 (optional): unfreeze the top of the base, BatchNorm stays in inference mode.
    unfrozen: list[str] = []
    if cfg.fine_tune_layers > 0:
        t1 = time.perf_counter()
        unfrozen = model_mod.unfreeze_top(models, cfg.fine_tune_layers)
        average_from = max(0, cfg.fine_tune_epochs - cfg.fine_tune_average) if cfg.fine_tune_average > 0 else None
        where = f"cached activations at {split.cut}" if split is not None else (
            "augmented images" if cfg.fine_tune_augment else "images")
        print(f"phase 2: fine-tuning the top {cfg.fine_tune_layers} base layers ({len(unfrozen)} with weights, "
              f"BatchNorm frozen) at learning rate {cfg.fine_tune_lr:g} on {where}", flush=True)
        if split is not None:
            split.upper.compile(tf_keras.optimizers.Adam(cfg.fine_tune_lr), loss, metrics=["accuracy"])
            h2 = split.upper.fit(
                **_train_data(acts_tr, _one_hot(labels_tr, c), cfg, cfg.seed + 1),
                validation_data=(acts_va, _one_hot(y_va, c)),
                epochs=cfg.fine_tune_epochs, class_weight=cw, verbose=verbose,
                callbacks=_callbacks(work, "phase2", cfg.patience, average_from),
            )
            if average_from is not None:
                _report_average(split.upper.evaluate(acts_va, _one_hot(y_va, c), verbose=0), cfg)
            del acts_tr, acts_va
        else:
            augment = model_mod.augmentation(cfg.seed + 10) if cfg.fine_tune_augment else None
            trainer = model_mod.training_model(models, spec, augment)
            trainer.compile(tf_keras.optimizers.Adam(cfg.fine_tune_lr), loss, metrics=["accuracy"])
            h2 = trainer.fit(
                _PixelBatches(x_tr, _one_hot(y_tr, c), cfg.batch_size, True, cfg.seed + 1, cfg.mixup),
                validation_data=_PixelBatches(x_va, _one_hot(y_va, c), 64, False, cfg.seed),
                epochs=cfg.fine_tune_epochs, class_weight=cw, verbose=verbose,
                callbacks=_callbacks(work, "phase2", cfg.patience, average_from),
            )
            if average_from is not None:
                _report_average(trainer.evaluate(_PixelBatches(x_va, _one_hot(y_va, c), 64, False, cfg.seed),
                                                 verbose=0), cfg)
        history.append(("fine-tune", h2.history))
        timings["phase2_s"] = time.perf_counter() - t1

    # 5. Evaluate on the held-out test split with the inference model.
    t2 = time.perf_counter()
    probs = models.inference.predict(normalize(x_te, spec), batch_size=64, verbose=0) if len(x_te) else \
        np.zeros((0, c), np.float32)
    report = evaluation_report(y_te, probs, names, files=dataset.splits["test"].files)
    timings["evaluation_s"] = time.perf_counter() - t2

    # 6. Write the bundle.
    _save_saved_model(models.inference, work / "saved_model", spec)
    models.inference.save(str(work / "model.keras"))
    (work / "plots").mkdir(exist_ok=True)
    plots.learning_curves(history, work / "plots" / "learning_curves.png")
    if len(x_te):
        plots.confusion_matrix(report["confusion_matrix"], names, work / "plots" / "confusion_matrix.png",
                               title=f"test split: accuracy {report['accuracy']:.1%}")
        pred = probs.argmax(1)
        plots.prediction_grid(x_te, y_te, pred, probs.max(1), names, work / "plots" / "test_predictions.png")
    _write_history(history, work / "history.csv")
    (work / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    split_doc = {"root": str(data_root.resolve()), "class_names": names,
                 **{k: [[f, int(lab)] for f, lab in zip(s.files, s.labels, strict=True)]
                    for k, s in dataset.splits.items()}}
    (work / "split.json").write_text(json.dumps(split_doc) + "\n")
    timings["total_s"] = time.perf_counter() - started

    settings = asdict(cfg)
    settings.update(out=str(cfg.out), data=str(data_root), input_size=size, feature_cache=use_cache,
                    unfrozen_layers=unfrozen, activation_cache_cut=split.cut if split is not None else None)
    settings.pop("progress", None)
    settings.pop("overwrite", None)
    manifest = Manifest(
        kind="bundle",
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        backbone=backbone.name,
        preprocessing=spec,
        class_names=names,
        model={"input_name": model_mod.INPUT_NAME, "output_name": model_mod.OUTPUT_NAME,
               "saved_model": "saved_model", "signature": "serving_default", "keras_model": "model.keras",
               "parameters": int(models.inference.count_params()), "feature_dim": models.feature_dim},
        training=settings,
        dataset={
            "root": str(data_root.resolve()), "fingerprint": dataset.fingerprint(), "presplit": dataset.presplit,
            "split_file": "split.json",
            "counts": {k: s.counts(names) for k, s in dataset.splits.items()},
            "skipped": [{"file": f, "reason": r} for f, r in dataset.skipped],
        },
        metrics={"test_accuracy": report["accuracy"], "test_top_k_accuracy": report["top_k_accuracy"],
                 "top_k": report["top_k"], "test_macro_f1": report["macro_f1"],
                 "test_images": report["num_images"], "timings": timings},
        library_versions=_versions(),
    )
    write_manifest(work, manifest)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)

    print("\n" + format_report(report))
    print(f"\nbundle: {out}\nplots:  {out / 'plots'}\nwall time: {timings['total_s']:.1f} s")
    return {"bundle": str(out), "test_accuracy": report["accuracy"], "timings": timings,
            "skipped": len(dataset.skipped), "counts": manifest.dataset["counts"]}


def _report_average(scores: list[float], cfg: TrainConfig) -> None:
    first = max(0, cfg.fine_tune_epochs - cfg.fine_tune_average) + 1
    print(f"phase 2: kept the mean of the weights of epochs {first}-{cfg.fine_tune_epochs}: "
          f"val_loss {scores[0]:.4f}, val_accuracy {scores[1]:.4f}", flush=True)


def _train_data(x: np.ndarray, y: np.ndarray, cfg: TrainConfig, seed: int) -> dict:
    """`fit` arguments for cached training samples: the arrays themselves (Keras shuffles and batches them),
    or, with mixup, a Sequence that blends each batch."""
    if cfg.mixup > 0:
        return {"x": _PixelBatches(x, y, cfg.batch_size, True, seed, cfg.mixup)}
    return {"x": x, "y": y, "batch_size": cfg.batch_size, "shuffle": True}


def _predict_views(model, x: np.ndarray, spec: PreprocessingSpec, cfg: TrainConfig, verbose: int) -> np.ndarray:
    """Outputs for the images, their mirror images (`flip_features`) and `augment_views` randomly augmented
    copies, in that order (the cached-feature augmentation; labels repeat in the same order)."""
    outs = [model.predict(normalize(x, spec), batch_size=64, verbose=verbose)]
    if cfg.flip_features:
        outs.append(model.predict(normalize(x[:, :, ::-1], spec), batch_size=64, verbose=verbose))
    for view in range(cfg.augment_views):
        outs.append(_augmented_model(model, spec, cfg.seed + 100 + 10 * view).predict(
            _PixelBatches(x, np.zeros(len(x), np.float32), 64, False, cfg.seed), verbose=verbose))
    return np.concatenate(outs)


def _augmented_model(model, spec: PreprocessingSpec, seed: int):
    """0..255 pixels -> random flip/rotation/zoom/contrast (on in predict too) -> normalization -> `model`."""
    import tf_keras

    inputs = tf_keras.Input(model.input_shape[1:], name="pixels")
    x = model_mod.augmentation(seed)(inputs, training=True)
    x = model_mod.Normalize(spec.to_dict(), name="normalize")(x)
    return tf_keras.Model(inputs, model(x))


def _activation_bytes(split: model_mod.SplitBase, n: int) -> int:
    return int(np.prod(split.activation_shape)) * 4 * n


def _activation_split(models: model_mod.Models, cfg: TrainConfig) -> model_mod.SplitBase | None:
    """The cut for cached-activation fine-tuning, or None when live training is needed or safer."""
    if cfg.fine_tune_augment:
        return None
    try:
        split = model_mod.split_base(models, cfg.fine_tune_layers)
    except (ValueError, KeyError, TypeError) as exc:
        print(f"phase 2: cannot cache activations for this backbone ({exc}); fine-tuning on images", flush=True)
        return None
    return split


def _print_counts(dataset: data_mod.Dataset) -> None:
    names = dataset.class_names
    width = max(8, *(len(n) for n in names))
    print(f"\ndata: {dataset.root} ({'pre-split' if dataset.presplit else 'split by imgcls'})")
    print(f"{'class':<{width}} {'train':>6} {'val':>6} {'test':>6}")
    counts = {k: s.counts(names) for k, s in dataset.splits.items()}
    for n in names:
        print(f"{n:<{width}} {counts['train'][n]:>6} {counts['val'][n]:>6} {counts['test'][n]:>6}")
    if dataset.skipped:
        print(f"skipped {len(dataset.skipped)} file(s):")
        for f, reason in dataset.skipped[:50]:
            print(f"  {f}: {reason}")
        if len(dataset.skipped) > 50:
            print(f"  ... and {len(dataset.skipped) - 50} more (all listed in manifest.json)")
    print(flush=True)


def _write_history(history: list[tuple[str, dict]], path: Path) -> None:
    keys = sorted({k for _, h in history for k in h})
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["phase", "epoch", *keys])
        for phase, h in history:
            for i in range(len(next(iter(h.values()), []))):
                w.writerow([phase, i + 1, *(h[k][i] if k in h and i < len(h[k]) else "" for k in keys)])
