"""The curl examples of docs/http.md work as written: every ```sh block runs in bash against a real server
(only `localhost:8080` becomes the test server's address) and answers JSON without an error.

The server serves a model named `flowers` as the docs do: the tiny fixture model, copied under that name.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from service_fixtures import running_server, sample_image

pytest_plugins = ["service_plugin"]

DOC = Path(__file__).resolve().parents[1] / "docs" / "http.md"


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)


@pytest.fixture(scope="module")
def flowers_repo(service_repo, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("docs") / "repo"
    folder = repo / "flowers" / "1"
    shutil.copytree(service_repo / "tiny" / "1", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(name="flowers", version=1)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return repo


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_examples_run_as_written(flowers_repo, tmp_path):
    blocks = shell_blocks(DOC.read_text())
    assert len(blocks) >= 8
    for api in ("/predict", "/v2/models/flowers/infer", ":predict", ":classify", "Inference-Header-Content-Length"):
        assert any(api in block for block in blocks), f"no example uses {api}"
    (tmp_path / "photo.jpg").write_bytes(sample_image(3, size=(120, 90)))
    (tmp_path / "rose.png").write_bytes(sample_image(4, size=(80, 100), fmt="PNG"))
    with running_server(flowers_repo, http_port=0) as server:
        for block in blocks:
            script = block.replace("localhost:8080", f"127.0.0.1:{server.http_port}")
            out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                                 text=True, timeout=60)
            assert out.returncode == 0, f"{block}\n{out.stderr}"
            answer = json.loads(out.stdout)
            assert "error" not in answer, f"{block}\n{answer}"
            if "classification" in block:
                label = answer["outputs"][0]["data"][0].split(":")[2]
                assert label in ("cat", "dog", "bird")
