"""A failing check stops the export and leaves the repository exactly as it was; concurrent exports of one
bundle do not interfere. Faults are injected with the test-only `IMGCLS_EXPORT_FAULT` hook (export/faults.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imgcls.cli import main
from imgcls.errors import ImgclsError
from imgcls.export.checks import ExportCheckError
from imgcls.export.faults import FAULT_ENV
from imgcls.export.pipeline import ExportConfig, run_export
from imgcls.manifest import read_manifest

pytestmark = pytest.mark.slow


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and mtime: any change to the repository shows up."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_bundle) -> Path:
    """A repository that already holds one entry (tiny/1, SavedModel only), so 'unchanged' is meaningful."""
    root = tmp_path_factory.mktemp("gates") / "repo"
    run_export(ExportConfig(model=tiny_bundle, repository=root, name="tiny", formats=["savedmodel"],
                            benchmark=False, progress=False))
    return root


def test_wrong_int8_calibration_fails_the_accuracy_gate(repo, tiny_bundle):
    before = _snapshot(repo)
    with pytest.raises(ExportCheckError) as info:
        run_export(ExportConfig(model=tiny_bundle, repository=repo, name="tiny", formats=["tflite-int8"],
                                benchmark=False, progress=False, fault="int8-calibration"))
    message = str(info.value)
    assert "tflite-int8" in message and "points below the SavedModel" in message and "nothing published" in message
    assert _snapshot(repo) == before


def test_corrupted_onnx_fails_the_agreement_gate_through_the_cli(repo, tiny_bundle, monkeypatch, capsys):
    before = _snapshot(repo)
    monkeypatch.setenv(FAULT_ENV, "corrupt-onnx")
    rc = main(["export", "--model", str(tiny_bundle), "--repository", str(repo), "--name", "tiny",
               "--formats", "savedmodel", "onnx", "--no-benchmark", "--json"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "onnx: top-1 agreement with the SavedModel is" in err and "below the required 99.5%" in err
    assert "Traceback" not in err
    assert _snapshot(repo) == before


def test_unloadable_artifact_fails_and_a_new_repository_is_not_created(tmp_path, tiny_bundle):
    target = tmp_path / "fresh-repo"
    with pytest.raises(ExportCheckError, match=r"tflite: (the artifact does not load|could not run)"):
        run_export(ExportConfig(model=tiny_bundle, repository=target, name="m", formats=["tflite"],
                                benchmark=False, progress=False, fault="truncate-tflite"))
    assert not target.exists()


def test_explicit_existing_version_is_refused_before_any_work(repo, tiny_bundle):
    before = _snapshot(repo)
    with pytest.raises(ImgclsError, match="already exists"):
        run_export(ExportConfig(model=tiny_bundle, repository=repo, name="tiny", version=1))
    assert _snapshot(repo) == before


def test_concurrent_exports_of_one_bundle_do_not_interfere(tmp_path, tiny_bundle):
    """Three processes at once: two take automatic versions of the same name, one another name and version."""
    repo = tmp_path / "repo"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop(FAULT_ENV, None)
    base = [sys.executable, "-m", "imgcls.cli", "export", "--model", str(tiny_bundle), "--repository", str(repo),
            "--formats", "savedmodel", "tflite", "--no-benchmark", "--threads", "1", "--json"]
    jobs = [["--name", "a"], ["--name", "a"], ["--name", "b", "--version", "4"]]
    procs = [subprocess.Popen(base + j, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for j in jobs]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert sorted(p.name for p in repo.iterdir()) == ["a", "b"]  # no staging folders left
    assert sorted(p.name for p in (repo / "a").iterdir()) == ["1", "2"]
    assert sorted(p.name for p in (repo / "b").iterdir()) == ["4"]
    shas = set()
    for name, version in (("a", 1), ("a", 2), ("b", 4)):
        m = read_manifest(repo / name / str(version))
        assert (m.name, m.version) == (name, version)
        assert [a.format for a in m.artifacts] == ["savedmodel", "tflite"]
        assert all(a.checks["passed"] for a in m.artifacts)
        shas.add(m.artifact("savedmodel").sha256)
    assert len(shas) == 1  # the same bundle, byte-identical SavedModel in every entry
