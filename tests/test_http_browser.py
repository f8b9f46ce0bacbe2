"""The web page at `/` in a real headless browser: Debian's chromium driven through its chromedriver (selenium),
no browser download. A flower photo uploaded through the page shows the label the gRPC Predict path returns.

Also a script that takes the screenshot in docs/ (`python tests/test_http_browser.py --help`).
"""

from __future__ import annotations

import argparse
import base64
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from service_fixtures import running_server, sample_image

from imgcls.v1 import inference_pb2 as pb
from imgcls.v1 import inference_pb2_grpc as pb_grpc

pytest_plugins = ["service_plugin"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLOWERS = Path.home() / ".keras" / "datasets" / "flower_photos"


@contextmanager
def browser(width: int = 1100, height: int = 900) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# Drops a file on the drop zone as a browser does (a DragEvent with a DataTransfer holding the file).
DROP = """
const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], arguments[1], {type: "image/jpeg"}));
document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true,
                                                                     cancelable: true}));
"""


def upload(driver, port: int, files: list[Path], model: str, timeout: float = 60) -> list:
    """Open the page, choose `model`, upload `files` through the file input; the result cards, once done."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(f"http://127.0.0.1:{port}/")
    wait = WebDriverWait(driver, timeout)
    wait.until(lambda d: model in [o.text for o in d.find_elements(By.CSS_SELECTOR, "#model option")])
    Select(driver.find_element(By.ID, "model")).select_by_visible_text(model)
    driver.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result.done")) == len(files))
    return driver.find_elements(By.CSS_SELECTOR, ".result")


def photo(tmp: Path) -> Path:
    """A flower photo from the offline Keras cache, or a generated one where the cache is absent."""
    found = sorted((FLOWERS / "daisy").glob("*.jpg"))[:1] if FLOWERS.is_dir() else []
    if found:
        return found[0]
    path = tmp / "photo.jpg"
    path.write_bytes(sample_image(7, size=(320, 240)))
    return path


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromium-driver not installed (apt; "
                                                             ".ci/run installs them)")
def test_upload_through_the_page_shows_the_grpc_label(service_repo, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = photo(tmp_path)
    with running_server(service_repo, http_port=0) as server, browser() as driver:
        (card,) = upload(driver, server.http_port, [image], "tiny")
        shown = card.find_element(By.CSS_SELECTOR, ".label-name").text
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            response = pb_grpc.InferenceStub(channel).Predict(
                pb.PredictRequest(model_name="tiny", images=[image.read_bytes()], top_k=1), timeout=30)
        assert shown == response.results[0].labels[0].name
        assert "ms" in card.find_element(By.CSS_SELECTOR, ".latency").text
        assert len(card.find_elements(By.CSS_SELECTOR, ".label")) == 3  # top-k 5 of a 3-class model
        # drag and drop: a drop event carrying the same photo adds a card with the same label
        driver.execute_script(DROP, base64.b64encode(image.read_bytes()).decode(), "dropped.jpg")
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result.done")) == 2)
        dropped = driver.find_elements(By.CSS_SELECTOR, ".result")[0]  # newest first
        assert dropped.find_element(By.CSS_SELECTOR, ".filename").text == "dropped.jpg"
        assert dropped.find_element(By.CSS_SELECTOR, ".label-name").text == shown
        models = driver.find_element(By.ID, "models").text
        assert "tiny" in models and "other" in models and "READY" in models
        # a file that is not an image gets its error on the page, and the page keeps working
        bad = tmp_path / "notes.jpg"
        bad.write_bytes(b"not an image at all")
        cards = upload(driver, server.http_port, [bad], "tiny")
        assert "INVALID_ARGUMENT" in cards[0].find_element(By.CSS_SELECTOR, ".error").text
        png = tmp_path / "page.png"
        assert driver.save_screenshot(str(png)) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # the offline API docs render every operation of /openapi.json
        operations = sum(len(item) for item in _openapi(server.http_port)["paths"].values())
        driver.get(f"http://127.0.0.1:{server.http_port}/docs")
        WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "details.op")) == operations)


def _openapi(port: int) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=10) as response:
        return json.loads(response.read())


def main(argv: list[str] | None = None) -> int:
    """The screenshot for the docs: the page after uploading some photos to a real repository."""
    parser = argparse.ArgumentParser(description="Screenshot of the web page (docs/images/web-page.png).")
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, default=Path("docs/images/web-page.png"))
    parser.add_argument("images", nargs="+", type=Path)
    args = parser.parse_args(argv)
    with running_server(args.model_repository, http_port=0) as server, browser(1000, 1250) as driver:
        upload(driver, server.http_port, [p.resolve() for p in args.images], args.model)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
    from PIL import Image

    with Image.open(args.out) as shot:  # a palette PNG: a third of the size, for the repository
        shot.convert("RGB").quantize(colors=192, method=Image.Quantize.MEDIANCUT,
                                     dither=Image.Dither.NONE).save(args.out, optimize=True)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
