"""`imgcls train` and `imgcls evaluate`. Argparse only at import; TensorFlow loads inside the commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="fine-tune an ImageNet backbone on a folder of photos",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train a classifier and write a model bundle (SavedModel, labels, manifest, "
                                   "evaluation report, plots). Default: fast head-only training on cached features.")
    t.add_argument("--data", type=Path, default=None,
                   help="folder with one subfolder per class, or with train/ val/ test/ subfolders "
                        "(default: flower_photos from the Keras cache)")
    t.add_argument("--out", type=Path, default=Path("runs/bundle"), help="bundle folder to write")
    t.add_argument("--backbone", default="mobilenet_v2", help="backbone name (see `imgcls backbones`)")
    t.add_argument("--weights", default="imagenet", help="imagenet, none, or a weights file PATH")
    t.add_argument("--input-size", type=int, default=None, help="square input side (default: the backbone's)")
    t.add_argument("--epochs", type=int, default=20, help="head-phase epochs (early stopping on val loss)")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--learning-rate", type=float, default=1e-3, help="head-phase learning rate (Adam)")
    t.add_argument("--dropout", type=float, default=0.2)
    t.add_argument("--hidden-units", type=int, default=0, help="add a hidden dense layer to the head")
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--seed", type=int, default=42, help="seed for the split, initialisation and shuffling")
    t.add_argument("--val-fraction", type=float, default=0.15)
    t.add_argument("--test-fraction", type=float, default=0.15)
    t.add_argument("--class-weights", action="store_true", help="weight the loss by inverse class frequency")
    t.add_argument("--augment", action="store_true",
                   help="head phase on augmented images (flip, rotation, zoom, contrast); disables the feature cache")
    t.add_argument("--no-feature-cache", dest="cache_features", action="store_false",
                   help="head phase end to end instead of on features computed once")
    t.add_argument("--no-flip-features", dest="flip_features", action="store_false",
                   help="do not add mirrored copies to the cached training features")
    t.add_argument("--fine-tune-layers", type=int, default=0,
                   help="phase 2: unfreeze the top N base layers (0 = head only)")
    t.add_argument("--fine-tune-epochs", type=int, default=10)
    t.add_argument("--fine-tune-lr", type=float, default=1e-5)
    t.add_argument("--fine-tune-augment", action="store_true",
                   help="fine-tune on randomly augmented images (slow on a CPU: a full forward pass per image "
                        "per epoch) instead of on activations cached below the unfrozen layers")
    t.add_argument("--activation-cache-gb", type=float, default=6.0,
                   help="memory limit for cached activations; above it phase 2 trains on images")
    t.add_argument("--patience", type=int, default=4, help="early-stopping patience (epochs)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    t.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="evaluate a bundle on a labelled folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--model", type=Path, required=True, help="model bundle folder")
    e.add_argument("--data", type=Path, default=None,
                   help="labelled folder (class subfolders; test/ of a pre-split folder); "
                        "default: the bundle's own test split")
    e.add_argument("--split", default="auto", choices=["auto", "all", "train", "val", "test"])
    e.add_argument("--top-k", type=int, default=3)
    e.add_argument("--report", type=Path, default=None, help="also write the report JSON here")
    e.add_argument("--plots", type=Path, default=None, help="write a confusion-matrix PNG into this folder")
    e.add_argument("--json", action="store_true", help="print the report as one JSON object")
    e.set_defaults(func=_evaluate)

    b = sub.add_parser("backbones", help="list the backbones, their preprocessing and where their weights come from")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_backbones)


def _train(args: argparse.Namespace) -> int:
    from imgcls.training.train import TrainConfig, train

    fields = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}, progress=not args.json)
    summary = train(cfg)
    if args.json:
        print(json.dumps(summary))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from imgcls.errors import ImgclsError
    from imgcls.training.evaluate import evaluate_bundle, format_report

    if args.top_k < 1:
        raise ImgclsError("--top-k must be at least 1")
    report = evaluate_bundle(args.model, args.data, split=args.split, top_k=args.top_k, progress=not args.json)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    if args.plots and report["num_images"]:
        from imgcls.training import plots

        args.plots.mkdir(parents=True, exist_ok=True)
        plots.confusion_matrix(report["confusion_matrix"], report["class_names"],
                               args.plots / "confusion_matrix.png", title=f"accuracy {report['accuracy']:.1%}")
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
        if report["skipped"]:
            print(f"\nskipped {len(report['skipped'])} undecodable file(s)")
    return 0


def _backbones(args: argparse.Namespace) -> int:
    from imgcls.backbones import BACKBONES, weights_status

    rows = [{"name": b.name, "keras_class": b.keras_class, "input_size": b.input_size, "normalization": b.mode,
             "weights": weights_status(b)} for b in BACKBONES.values()]
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'name':<20} {'keras class':<18} {'input':>5}  {'normalization':<13}  imagenet weights")
        for r in rows:
            print(f"{r['name']:<20} {r['keras_class']:<18} {r['input_size']:>5}  {r['normalization']:<13}  "
                  f"{r['weights']}")
    return 0
