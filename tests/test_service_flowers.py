"""Correctness against training: the flower model served over gRPC agrees with `imgcls evaluate`.

By default it trains and exports the real flower model itself (the `flower_model` fixture in conftest.py:
`imgcls train` defaults, then `imgcls export`) and compares on its test split. Point it elsewhere with:

    IMGCLS_FLOWER_REPO=runs/repo            model repository written by `imgcls export`
    IMGCLS_FLOWER_DATA=DIR                  labelled folder, one subfolder per class (both or neither)
    IMGCLS_FLOWER_BUNDLE=runs/bundle        bundle for `imgcls evaluate` (default: the repository entry)
    IMGCLS_FLOWER_MODEL=flowers             model name (default: the repository's only model)
    IMGCLS_FLOWER_RUNTIME=onnx              runtime to serve (default: the server's choice)

Goal from issue 4: equal accuracy and top-1 agreement of at least 99.5% on the same JPEG files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from service_fixtures import client_for, running_server

from imgcls.preprocessing import IMAGE_EXTENSIONS
from imgcls.service import repository

REPO = os.environ.get("IMGCLS_FLOWER_REPO")
DATA = os.environ.get("IMGCLS_FLOWER_DATA")

pytestmark = [pytest.mark.slow]


@pytest.fixture()
def flower_setup(request) -> tuple[str, str, str | None]:
    """(repository, labelled data folder, bundle or None) from the environment, else the real flower model."""
    if REPO and DATA:
        return REPO, DATA, os.environ.get("IMGCLS_FLOWER_BUNDLE")
    model = request.getfixturevalue("flower_model")
    return str(model["repo"]), str(model["test_dir"]), str(model["bundle"])


def test_served_predictions_agree_with_imgcls_evaluate(tmp_path, flower_setup):
    repo, data, bundle = flower_setup
    entries = repository.scan(Path(repo))
    name = os.environ.get("IMGCLS_FLOWER_MODEL") or (entries[0].name if len(entries) == 1 else None)
    assert name, f"several models in {repo}: set IMGCLS_FLOWER_MODEL"
    entry = next(e for e in entries if e.name == name)
    bundle = bundle or str(entry.folder)

    report_path = tmp_path / "report.json"
    out = subprocess.run([sys.executable, "-m", "imgcls.cli", "evaluate", "--model", bundle, "--data", data,
                          "--split", "all", "--top-k", "1", "--json", "--report", str(report_path)],
                         capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(report_path.read_text())
    classes = report["class_names"]
    folder = Path(report["data"])
    skipped = {s["file"] for s in report["skipped"]}
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.parent != folder)
    files = [f for f in files if f not in skipped]
    truth = {f: Path(f).parts[0] for f in files}
    evaluated = dict(truth)  # evaluate lists only its mistakes; every other file was predicted correctly
    evaluated.update({m["file"]: m["predicted"] for m in report["mistakes"]})
    assert len(files) == report["num_images"]

    served: dict[str, str] = {}
    runtime = os.environ.get("IMGCLS_FLOWER_RUNTIME")
    threads = os.cpu_count() or 1
    with running_server(Path(repo), runtime=runtime, inference_threads=threads) as server, \
            client_for(server, timeout=120) as client:
        for start in range(0, len(files), 16):
            chunk = files[start:start + 16]
            prediction = client.predict([folder / f for f in chunk], model=name, top_k=1)
            for f, result in zip(chunk, prediction.results, strict=True):
                assert result.ok, f"{f}: {result.error}"
                served[f] = result.labels[0].name
    assert set(served.values()) <= set(classes)

    agreement = sum(served[f] == evaluated[f] for f in files) / len(files)
    served_accuracy = sum(served[f] == truth[f] for f in files) / len(files)
    print(f"\n{len(files)} images: evaluate accuracy {report['accuracy']:.4f}, served accuracy {served_accuracy:.4f}, "
          f"top-1 agreement {agreement:.4f}")
    assert agreement >= 0.995
    assert abs(served_accuracy - report["accuracy"]) < 0.001
