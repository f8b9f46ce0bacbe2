"""`imgcls train` and `imgcls evaluate`. Argparse only at import; TensorFlow loads inside the commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from imgcls.cli_format import add_command


def register(sub: argparse._SubParsersAction) -> None:
    t = add_command(
        sub, "train", help="fine-tune an ImageNet backbone on a folder of photos",
        description="Train a classifier and write a model bundle (SavedModel, labels, manifest, evaluation "
                    "report, plots). Default: fast head-only training on features computed once; "
                    "--fine-tune-layers adds a second phase that unfreezes the top of the backbone. The Python "
                    "API runs the same code: imgcls.train(data=..., out=..., ...) (docs/python-api.md).",
        examples=["imgcls train --data photos/ --out runs/mine",
                  "imgcls train --data photos/ --out runs/mine --backbone efficientnet_b0 --fine-tune-layers 30",
                  "imgcls train --out runs/flowers   # the flower photos from the Keras cache"])
    t.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="folder with one subfolder per class, or with train/ val/ test/ subfolders "
                        "(default: flower_photos from the Keras cache)")
    t.add_argument("--out", type=Path, default=Path("runs/bundle"), metavar="DIR", help="bundle folder to write")
    t.add_argument("--backbone", default="efficientnet_lite0", metavar="NAME",
                   help="backbone name (see `imgcls backbones`, docs/backbones.md)")
    t.add_argument("--weights", default="imagenet", metavar="WEIGHTS", help="imagenet, none, or a weights file PATH")
    t.add_argument("--input-size", type=int, default=None, metavar="PIXELS",
                   help="square input side (default: the backbone's)")
    t.add_argument("--epochs", type=int, default=20, metavar="N", help="head-phase epochs (early stopping on val loss)")
    t.add_argument("--batch-size", type=int, default=32, metavar="N", help="training batch size, both phases")
    t.add_argument("--learning-rate", type=float, default=1e-3, metavar="LR", help="head-phase learning rate (Adam)")
    t.add_argument("--dropout", type=float, default=0.2, metavar="RATE",
                   help="dropout rate before the classification layer")
    t.add_argument("--hidden-units", type=int, default=0, metavar="N",
                   help="add a hidden dense layer of this many units to the head (0: none)")
    t.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS",
                   help="label smoothing of the cross-entropy loss (0: none)")
    t.add_argument("--seed", type=int, default=42, metavar="N", help="seed for the split, initialisation and shuffling")
    t.add_argument("--split-seed", type=int, default=None, metavar="N",
                   help="seed for the train/val/test split alone (default: --seed); keep it fixed and vary "
                        "--seed to see how much a recipe's accuracy moves with initialisation and shuffling")
    t.add_argument("--val-fraction", type=float, default=0.15, metavar="F",
                   help="share of each class held out for validation (early stopping), when not pre-split")
    t.add_argument("--test-fraction", type=float, default=0.15, metavar="F",
                   help="share of each class held out for the final test report, when not pre-split")
    t.add_argument("--class-weights", action="store_true", help="weight the loss by inverse class frequency")
    t.add_argument("--augment", action="store_true",
                   help="head phase on augmented images (flip, rotation, zoom, contrast); disables the feature cache")
    t.add_argument("--feature-cache", dest="cache_features", action=argparse.BooleanOptionalAction, default=True,
                   help="head phase on backbone features computed once, instead of end to end on images")
    t.add_argument("--flip-features", dest="flip_features", action=argparse.BooleanOptionalAction, default=True,
                   help="add mirrored copies to the cached training features")
    t.add_argument("--augment-views", type=int, default=0, metavar="N",
                   help="add N randomly augmented copies (flip, rotation, zoom, contrast) of each training image "
                        "to the feature/activation cache; each costs one more forward pass over the training set")
    t.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                   help="blend pairs of training samples and their labels, weight ~ Beta(ALPHA, ALPHA), in both "
                        "phases (on cached features/activations: manifold mixup, free); 0: off")
    t.add_argument("--fine-tune-layers", type=int, default=0, metavar="N",
                   help="phase 2: unfreeze the top N base layers (0: head only, no phase 2)")
    t.add_argument("--fine-tune-epochs", type=int, default=10, metavar="N",
                   help="phase-2 epochs (early stopping on val loss)")
    t.add_argument("--fine-tune-lr", type=float, default=1e-5, metavar="LR", help="phase-2 learning rate (Adam)")
    t.add_argument("--fine-tune-average", type=int, default=0, metavar="N",
                   help="keep the mean of the last N phase-2 epochs' weights (stochastic weight averaging; "
                        "every epoch runs) instead of the epoch with the best validation loss; 0: off")
    t.add_argument("--fine-tune-augment", action="store_true",
                   help="fine-tune on randomly augmented images (slow on a CPU: a full forward pass per image "
                        "per epoch) instead of on activations cached below the unfrozen layers")
    t.add_argument("--activation-cache-gb", type=float, default=6.0, metavar="GIB",
                   help="memory limit for cached activations; above it phase 2 trains on images")
    t.add_argument("--patience", type=int, default=4, metavar="N", help="early-stopping patience (epochs)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    t.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    t.set_defaults(func=_train)

    e = add_command(
        sub, "evaluate", help="evaluate a bundle on a labelled folder",
        description="Run a bundle's SavedModel on a labelled folder (class subfolders named like the model's "
                    "classes), or on the bundle's own test split, and print accuracy, top-k accuracy, per-class "
                    "precision/recall/F1 and the confusion matrix. The preprocessing is the server's.",
        examples=["imgcls evaluate --model runs/mine                 # its own test split",
                  "imgcls evaluate --model runs/mine --data holdout/ --plots runs/mine-eval",
                  "imgcls evaluate --model runs/mine --json | jq .accuracy"])
    e.add_argument("--model", type=Path, required=True, metavar="DIR", help="model bundle folder")
    e.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="labelled folder (class subfolders; test/ of a pre-split folder); "
                        "default: the bundle's own test split")
    e.add_argument("--split", default="auto", choices=["auto", "all", "train", "val", "test"],
                   help="which split to evaluate: auto = test (of a pre-split --data or of the bundle's split), "
                        "else all of --data")
    e.add_argument("--top-k", type=int, default=3, metavar="K", help="k of the top-k accuracy")
    e.add_argument("--report", type=Path, default=None, metavar="FILE", help="also write the report JSON here")
    e.add_argument("--plots", type=Path, default=None, metavar="DIR",
                   help="write a confusion-matrix PNG into this folder")
    e.add_argument("--json", action="store_true", help="print the report as one JSON object")
    e.set_defaults(func=_evaluate)

    b = add_command(sub, "backbones", help="list the backbones and their preprocessing",
                    description="List the ImageNet backbones `imgcls train --backbone` accepts, with their Keras "
                                "class, default input size and input normalization.",
                    examples=["imgcls backbones", "imgcls backbones --json"])
    b.add_argument("--json", action="store_true", help="print the list as one JSON array")
    b.set_defaults(func=_backbones)


def _train(args: argparse.Namespace) -> int:
    from imgcls.api import check_data_folder, train

    check_data_folder(args.data)  # before TensorFlow loads: a typo costs milliseconds and one line
    from imgcls.training.train import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__) - {"data", "out", "backbone", "progress"}
    bundle = train(args.data, args.out, backbone=args.backbone, progress=not args.json,
                   **{k: v for k, v in vars(args).items() if k in fields})
    if args.json:
        print(json.dumps(bundle.summary))
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
