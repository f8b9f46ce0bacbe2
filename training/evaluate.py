"""Evaluation report: accuracy, top-k accuracy, per-class precision/recall/F1, confusion matrix.

Pure NumPy so the same report comes out of `imgcls train` (its test split) and `imgcls evaluate`.
"""

from __future__ import annotations

import numpy as np


def evaluation_report(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], *, top_k: int = 3,
                      files: list[str] | None = None) -> dict:
    """Everything a person or a script needs to judge a classifier on a labelled set."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n, c = probs.shape
    if n == 0:
        return {"num_images": 0, "accuracy": None, "top_k": top_k, "top_k_accuracy": None, "per_class": {},
                "macro_f1": None, "confusion_matrix": [[0] * c for _ in range(c)], "class_names": class_names}
    k = max(1, min(top_k, c))
    y_pred = probs.argmax(axis=1)
    topk = np.argsort(-probs, axis=1)[:, :k]
    cm = np.zeros((c, c), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    per_class = {}
    f1s = []
    for i, name in enumerate(class_names):
        tp = int(cm[i, i])
        predicted = int(cm[:, i].sum())
        support = int(cm[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support:
            f1s.append(f1)
    report = {
        "num_images": int(n),
        "accuracy": float((y_pred == y_true).mean()),
        "top_k": k,
        "top_k_accuracy": float((topk == y_true[:, None]).any(axis=1).mean()),
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
    }
    if files is not None:
        report["mistakes"] = [
            {"file": f, "true": class_names[t], "predicted": class_names[p], "score": float(probs[i, p])}
            for i, (f, t, p) in enumerate(zip(files, y_true, y_pred, strict=True)) if t != p
        ]
    return report


def format_report(report: dict) -> str:
    """A table for people: overall figures, per-class metrics and the confusion matrix."""
    if not report["num_images"]:
        return "no images evaluated"
    names = report["class_names"]
    width = max(12, *(len(n) for n in names))
    lines = [
        f"images: {report['num_images']}   accuracy: {report['accuracy']:.2%}   "
        f"top-{report['top_k']} accuracy: {report['top_k_accuracy']:.2%}   macro F1: {report['macro_f1']:.3f}",
        "",
        f"{'class':<{width}} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>8}",
    ]
    for name in names:
        m = report["per_class"][name]
        lines.append(f"{name:<{width}} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>6.3f} {m['support']:>8d}")
    col = max(5, *(min(len(n), 10) for n in names))
    lines += ["", "confusion matrix (rows: true, columns: predicted)",
              " " * width + " " + " ".join(f"{n[:10]:>{col}}" for n in names)]
    for name, row in zip(names, report["confusion_matrix"], strict=True):
        lines.append(f"{name:<{width}} " + " ".join(f"{v:>{col}d}" for v in row))
    return "\n".join(lines)


def evaluate_bundle(bundle, data=None, *, split: str = "auto", top_k: int = 3, batch_size: int = 64,
                    progress: bool = True) -> dict:
    """Run a bundle's SavedModel on a labelled folder (or its own recorded test split).

    Class folders are matched to the model's classes by name; a folder the model does not know is an
    error (its images cannot be scored), a class with no folder simply has no support.
    """
    import json
    from pathlib import Path

    from imgcls.errors import ImgclsError
    from imgcls.manifest import read_manifest
    from imgcls.preprocessing import normalize
    from imgcls.training import data as data_mod

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    spec = manifest.preprocessing
    names = manifest.class_names
    if data is None:
        split_file = bundle / manifest.dataset.get("split_file", "split.json")
        if not split_file.is_file():
            raise ImgclsError(f"{bundle} records no split (no {split_file.name}); pass --data DIR")
        doc = json.loads(split_file.read_text())
        root = Path(doc["root"])
        which = "test" if split == "auto" else split
        if which not in ("train", "val", "test"):
            raise ImgclsError("--split must be train, val or test when evaluating the bundle's own split")
        dataset = data_mod.Dataset(root=root, class_names=names, presplit=False, splits={
            k: data_mod.Split([f for f, _ in doc.get(k, [])], [int(lbl) for _, lbl in doc.get(k, [])])
            if k == which else data_mod.Split() for k in data_mod.SPLITS})
        missing = [f for f in dataset.splits[which].files[:1] if not (root / f).exists()]
        if missing:
            raise ImgclsError(f"the bundle's data folder {root} is gone; pass --data DIR")
    else:
        root = Path(data)
        if not root.is_dir():
            raise ImgclsError(f"data folder {root} does not exist")
        subdirs = {p.name for p in root.iterdir() if p.is_dir()}
        presplit = "train" in subdirs and subdirs <= set(data_mod.SPLITS)
        which = ("test" if presplit else "all") if split == "auto" else split
        folder = root / which if presplit and which != "all" else root
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise ImgclsError(f"{folder} has class folder(s) the model does not know: {', '.join(unknown)} "
                              f"(model classes: {', '.join(names)})")
        if not classes:
            raise ImgclsError(f"{folder} has no class subfolders")
        s = data_mod.Split()
        for cls in classes:
            for p in data_mod._image_files(folder / cls):
                s.files.append(str(p.relative_to(folder)))
                s.labels.append(names.index(cls))
        root, which = folder, "test"
        dataset = data_mod.Dataset(root=root, class_names=names, presplit=False,
                                   splits={"train": data_mod.Split(), "val": data_mod.Split(), "test": s})
    if which != "test":  # load_images returns every split; evaluate the chosen one as 'test'
        dataset.splits = {k: (dataset.splits[which] if k == "test" else data_mod.Split()) for k in data_mod.SPLITS}
        which = "test"
    x, y = data_mod.load_images(dataset, spec, progress=progress, require_train=False)["test"]
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    model = tf.saved_model.load(str(bundle / manifest.model.get("saved_model", "saved_model")))
    fn = model.signatures[manifest.model.get("signature", "serving_default")]
    out_name = manifest.model.get("output_name", "probabilities")
    probs = [fn(tf.constant(normalize(x[i:i + batch_size], spec)))[out_name].numpy()
             for i in range(0, len(x), batch_size)]
    probs = np.concatenate(probs) if probs else np.zeros((0, len(names)), np.float32)
    report = evaluation_report(y, probs, names, top_k=top_k, files=dataset.splits[which].files)
    report["data"] = str(root)
    report["skipped"] = [{"file": f, "reason": r} for f, r in dataset.skipped]
    return report

