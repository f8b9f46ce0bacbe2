"""The committed generated code is what `proto/generate.py` produces from the committed .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_current(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "imgcls" / "v1").iterdir())
    assert [p.name for p in generated] == ["__init__.py", "inference_pb2.py", "inference_pb2.pyi",
                                          "inference_pb2_grpc.py"]
    for rel in generated:
        committed = ROOT / rel
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} is stale: run `python proto/generate.py` and commit the result")


def test_generated_module_imports_under_the_core_package():
    from imgcls.v1 import inference_pb2, inference_pb2_grpc

    assert inference_pb2.DESCRIPTOR.package == "imgcls.v1"
    assert hasattr(inference_pb2_grpc, "InferenceStub")
