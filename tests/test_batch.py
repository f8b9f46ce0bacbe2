"""`imgcls batch` against a real local server with the tiny fixture model: the three input kinds, both output
formats, bad files among good ones, retries on RESOURCE_EXHAUSTED, a server that goes away, resume after a
killed run (no duplicates, nothing missing), and the CLI's exit codes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from service_fixtures import TINY_CLASSES, GatedRuntime, metric, running_server, sample_image, scrape

from imgcls.cli import main
from imgcls.client.batch import BatchConfig, BatchJob, BatchSummary
from imgcls.client.batch_io import csv_columns
from imgcls.errors import ImgclsError

pytest_plugins = ["service_plugin"]  # the session-scoped `service_repo` fixture

@pytest.fixture(scope="module")
def server(service_repo):
    with running_server(service_repo) as server:
        yield server


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A labelled tree: cat/ and dog/ (with a nested folder), plus things a folder walk must skip."""
    root = tmp_path_factory.mktemp("photos")
    for k, name in enumerate(TINY_CLASSES[:2]):
        (root / name / "more").mkdir(parents=True)
        for i in range(7):
            fmt, ext = ("PNG", "png") if i % 3 == 0 else ("JPEG", "jpg")
            sub = root / name / "more" if i == 6 else root / name
            (sub / f"{name}_{i}.{ext}").write_bytes(sample_image(100 * k + i, size=(40 + 3 * i, 30 + 2 * i), fmt=fmt))
    (root / "cat" / "notes.txt").write_text("not an image, not listed")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(sample_image(1))
    return root


def image_files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if p.suffix in (".jpg", ".png") and ".hidden" not in p.parts}


def run(server, input: str | Path, output: Path, **settings) -> BatchSummary:
    settings = {"model": "tiny", "progress": False, "backoff": 0.02, "max_backoff": 0.2, **settings}
    return BatchJob(BatchConfig(target=f"127.0.0.1:{server.port}", input=str(input), output=output,
                                **settings)).run()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_to_jsonl_has_exactly_the_predict_json_records(server, photos, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    summary = run(server, photos, out, top_k=2, batch_size=3, concurrency=2)
    rows = read_jsonl(out)
    assert {r["path"] for r in rows} == image_files(photos) and len(rows) == 14
    assert (summary.files, summary.ok, summary.failed, summary.exit_code) == (14, 14, 0, 0)

    files = sorted(image_files(photos))
    assert main(["predict", "--target", f"127.0.0.1:{server.port}", "--model", "tiny", "--top-k", "2", "--json",
                 *files]) == 0
    predicted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(rows, key=lambda r: r["path"]) == predicted  # same records, same shape, same numbers


def test_glob_to_csv(server, photos, tmp_path):
    out = tmp_path / "out.csv"
    summary = run(server, f"{photos}/**/*.png", out, top_k=3)
    with out.open(newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == csv_columns(3)
    expected = {p for p in image_files(photos) if p.endswith(".png")}
    assert {row[0] for row in table[1:]} == expected and summary.files == len(expected) == 6
    reference = {r["path"]: r for r in read_jsonl(_jsonl_of(server, photos, tmp_path))}
    for row in table[1:]:
        record = reference[row[0]]
        assert row[1:3] == ["tiny", "2"]
        assert row[3:12:3] == [lb["name"] for lb in record["labels"]]
        assert [float(s) for s in row[5:12:3]] == pytest.approx([lb["score"] for lb in record["labels"]], abs=1e-5)
        assert row[-2:] == ["", ""]
    # a single-level glob does not descend
    shallow = run(server, f"{photos}/*/*.png", tmp_path / "shallow.jsonl")
    assert shallow.files == 4


def _jsonl_of(server, photos: Path, tmp_path: Path) -> Path:
    out = tmp_path / "reference.jsonl"
    if not out.exists():
        run(server, photos, out, top_k=3)
    return out


def test_list_file_relative_paths_comments_duplicates_and_a_missing_file(server, photos, tmp_path):
    listing = photos / "list.txt"  # relative entries are relative to the list's folder
    listing.write_text("# files to classify\n\ncat/cat_1.jpg\ncat/cat_1.jpg\n" + str(photos / "dog" / "dog_2.jpg") +
                       "\r\ncat/gone.jpg\n")
    out = tmp_path / "out.jsonl"
    summary = run(server, listing, out)
    rows = {r["path"]: r for r in read_jsonl(out)}
    assert set(rows) == {str(photos / "cat" / "cat_1.jpg"), str(photos / "dog" / "dog_2.jpg"),
                         str(photos / "cat" / "gone.jpg")}
    assert rows[str(photos / "cat" / "gone.jpg")]["error"]["code"] == "NOT_FOUND"
    assert (summary.files, summary.failed, summary.duplicates, summary.exit_code) == (3, 1, 1, 1)


def test_bad_files_among_good_ones_are_error_rows_and_the_job_goes_on(server, photos, tmp_path):
    folder = tmp_path / "mixed"
    (folder / "cat").mkdir(parents=True)
    good = []
    for i in range(5):
        good.append(folder / "cat" / f"ok_{i}.jpg")
        good[-1].write_bytes(sample_image(50 + i))
    (folder / "cat" / "truncated.jpg").write_bytes(sample_image(60)[:200])
    (folder / "cat" / "empty.png").write_bytes(b"")
    (folder / "cat" / "text.jpg").write_text("hello")
    (folder / "cat" / "dangling.jpg").symlink_to(folder / "nowhere.jpg")
    out = tmp_path / "out.jsonl"
    summary = run(server, folder, out, batch_size=4)
    rows = {Path(r["path"]).name: r for r in read_jsonl(out)}
    assert len(rows) == 9 and summary.failed == 4 and summary.ok == 5
    assert all("labels" in rows[p.name] for p in good)
    assert {name: rows[name]["error"]["code"] for name in ("truncated.jpg", "empty.png", "text.jpg", "dangling.jpg")} \
        == {"truncated.jpg": "INVALID_ARGUMENT", "empty.png": "INVALID_ARGUMENT", "text.jpg": "INVALID_ARGUMENT",
            "dangling.jpg": "NOT_FOUND"}
    assert summary.exit_code == 1
    again = run(server, folder, out, allow_failures=True)
    assert again.files == 0 and again.skipped == 9 and again.output_failed == 4 and again.exit_code == 0


def test_cli_exit_codes_and_one_line_errors(server, photos, tmp_path, capsys):
    target = ["--target", f"127.0.0.1:{server.port}", "--no-progress"]
    out = tmp_path / "out.csv"
    assert main(["batch", *target, "--model", "tiny", "--input", str(photos / "dog"), "--output", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == 7 and summary["format"] == "csv" and summary["exit_code"] == 0
    # resuming a CSV with another --top-k would mix column layouts: refused, nothing written
    assert main(["batch", *target, "--model", "tiny", "--input", str(photos / "dog"), "--output", str(out),
                 "--top-k", "2"]) == 2
    assert "--top-k 3" in capsys.readouterr().err
    jsonl = tmp_path / "out.jsonl"
    assert main(["batch", *target, "--model", "tiny", "--input", str(photos / "dog"), "--output", str(jsonl)]) == 0
    capsys.readouterr()
    for args, message in (
        (["--model", "nope", "--input", str(photos), "--output", str(tmp_path / "a.jsonl")], "NOT_FOUND"),
        (["--model", "tiny", "--input", str(photos / "missing"), "--output", str(tmp_path / "a.jsonl")],
         "no such file or folder"),
        (["--model", "tiny", "--input", str(photos), "--output", str(tmp_path / "a.txt")], ".jsonl"),
        (["--model", "other", "--input", str(photos / "dog"), "--output", str(jsonl)], "holds results of model tiny"),
    ):
        assert main(["batch", *target, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_labels_from_folders_reports_accuracy_per_class(server, photos, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["batch", "--target", f"127.0.0.1:{server.port}", "--model", "tiny", "--input", str(photos),
                 "--output", str(out), "--labels-from-folders", "--no-progress"]) == 0
    text = capsys.readouterr().out
    rows = read_jsonl(out)
    correct = sum(r["labels"][0]["name"] == Path(r["path"]).relative_to(photos).parts[0] for r in rows)
    assert f"({correct}/14 labelled files" in text
    assert any(line.split()[:2] == ["cat", "7"] for line in text.splitlines())
    summary = run(server, photos, out, labels_from_folders=True)  # resumed: earlier rows still count
    assert summary.files == 0 and summary.evaluation["files"] == 14 and summary.evaluation["correct"] == correct
    per_class = {c["class"]: c for c in summary.evaluation["per_class"]}
    assert per_class["cat"]["files"] == per_class["dog"]["files"] == 7 and per_class["bird"]["files"] == 0


def test_resource_exhausted_is_retried_until_the_queue_has_room(service_repo, photos, tmp_path):
    gates: dict[str, GatedRuntime] = {}

    def hook(entry, runtime):
        gates[entry.name] = GatedRuntime(runtime)
        return gates[entry.name]

    with running_server(service_repo, runtime_hook=hook, max_queue_size=4, max_images_per_request=4) as server:
        gate = gates["tiny"]
        gate.reset()
        gate.gate.clear()  # hold the first batch in the model: the next requests find the queue full

        def open_after_rejections() -> None:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if metric(scrape(server), "imgcls_requests_total", method="Predict", code="RESOURCE_EXHAUSTED") >= 3:
                    break
                time.sleep(0.02)
            gate.gate.set()

        opener = threading.Thread(target=open_after_rejections)
        opener.start()
        try:
            summary = run(server, photos, tmp_path / "out.jsonl", batch_size=4, concurrency=3, retries=100,
                          backoff=0.01, max_backoff=0.05)
        finally:
            gate.gate.set()
            opener.join()
        rejected = metric(scrape(server), "imgcls_requests_total", method="Predict", code="RESOURCE_EXHAUSTED")
    assert rejected >= 3 and summary.retries >= rejected
    assert summary.ok == 14 and summary.failed == 0 and summary.exit_code == 0
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 14


class _DrainAfter:
    """Runtime wrapper: after `n` batches, drain the server (new calls UNAVAILABLE, then the port closes)."""

    def __init__(self, inner, n: int, server_box: list) -> None:
        self.inner, self.format, self.n, self.box = inner, inner.format, n, server_box
        self.armed = False
        self.count = 0

    def run(self, batch):
        out = self.inner.run(batch)
        if self.armed:
            self.count += 1
            if self.count == self.n:
                # Refuse new calls now, as drain() does first: on a loaded machine the drain thread may start
                # only after the job has sent every remaining request.
                server = self.box[0]
                getattr(server, "core", server).accepting = False  # the request core's flag (server.py rewrite)
                threading.Thread(target=self.box[0].drain, args=(5,), daemon=True).start()
        time.sleep(0.01)
        return out


def test_server_gone_stops_the_job_without_error_rows_and_a_rerun_completes_it(service_repo, photos, tmp_path):
    out = tmp_path / "out.jsonl"
    box: list = []
    runtimes: list[_DrainAfter] = []

    def hook(entry, runtime):
        runtimes.append(_DrainAfter(runtime, 2, box))
        return runtimes[-1]

    with running_server(service_repo, runtime_hook=hook) as server:
        box.append(server)
        for r in runtimes:
            r.armed = True
        summary = run(server, photos, out, batch_size=2, concurrency=1, retries=2, backoff=0.01)
        deadline = time.monotonic() + 10
        while not server._stopped.is_set():  # the drain finishes before the next server starts
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert summary.exit_code == 3 and "server unavailable" in summary.stopped
    rows = read_jsonl(out)
    assert 0 < len(rows) < 14 and all("labels" in r for r in rows)  # no UNAVAILABLE rows to redo later
    with running_server(service_repo) as server:
        resumed = run(server, photos, out)
    rows = read_jsonl(out)
    assert resumed.skipped == summary.files and resumed.exit_code == 0
    assert sorted(r["path"] for r in rows) == sorted(image_files(photos))


class _Slow:
    def __init__(self, inner, seconds: float) -> None:
        self.inner, self.format, self.seconds = inner, inner.format, seconds

    def run(self, batch):
        time.sleep(self.seconds)
        return self.inner.run(batch)


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_resume_after_sigterm_and_sigkill_no_duplicates_nothing_missing(service_repo, tmp_path, fmt):
    folder = tmp_path / "many" / "cat"
    folder.mkdir(parents=True)
    image = sample_image(5, size=(24, 24))
    total = 120
    for i in range(total):
        (folder / f"{i:04d}.jpg").write_bytes(image)
    out = tmp_path / f"out.{fmt}"
    header = 1 if fmt == "csv" else 0
    with running_server(service_repo, runtime_hook=lambda entry, rt: _Slow(rt, 0.02)) as server:
        cmd = [sys.executable, "-m", "imgcls.cli", "batch", "--target", f"127.0.0.1:{server.port}", "--model", "tiny",
               "--input", str(tmp_path / "many"), "--output", str(out), "--batch-size", "2", "--concurrency", "2",
               "--no-progress"]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

        def run_until(rows: int, sig: int) -> subprocess.CompletedProcess:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 60
            while _count_lines(out) - header < rows and proc.poll() is None:
                assert time.monotonic() < deadline, "the job made no progress"
                time.sleep(0.01)
            proc.send_signal(sig)
            stdout, stderr = proc.communicate(timeout=30)
            return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)

        first = run_until(20, signal.SIGTERM)  # graceful: summary printed, exit 130
        assert first.returncode == 130, first.stderr
        assert "stopped: interrupted" in first.stdout
        done_first = _count_lines(out) - header
        assert 20 <= done_first < total

        second = run_until(done_first + 30, signal.SIGKILL)
        assert second.returncode == -signal.SIGKILL
        done_second = _count_lines(out) - header
        assert done_first < done_second < total
        with out.open("ab") as f:  # as if the kill had landed in the middle of a row
            f.write(f"{tmp_path}/many/cat/0000.jpg,tiny,2,cat".encode() if fmt == "csv" else b'{"path": "/x.jpg", "mo')

        final = run(server, tmp_path / "many", out)
    assert final.cut_partial_row and final.skipped == done_second and final.files == total - done_second
    assert final.exit_code == 0
    if fmt == "csv":
        with out.open(newline="") as f:
            paths = [row[0] for row in list(csv.reader(f))[1:]]
    else:
        paths = [r["path"] for r in read_jsonl(out)]
    assert len(paths) == len(set(paths)) == total  # no duplicates, nothing missing
    assert set(paths) == {str(p) for p in folder.iterdir()}


def test_garbled_row_in_the_middle_is_an_error_not_silently_cut(server, photos, tmp_path):
    out = tmp_path / "out.jsonl"
    run(server, photos / "cat", out)
    lines = out.read_text().splitlines()
    out.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ImgclsError, match="not an `imgcls batch` record"):
        run(server, photos / "cat", out)
    assert len(out.read_text().splitlines()) == 8  # left as it was


def test_retry_errors_sends_failed_files_again(server, photos, tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(sample_image(3))
    (folder / "b.jpg").write_bytes(b"broken")
    out = tmp_path / "out.jsonl"
    assert run(server, folder, out).failed == 1
    (folder / "b.jpg").write_bytes(sample_image(4))  # fixed
    summary = run(server, folder, out, retry_errors=True)
    assert summary.retried_error_rows == 1 and summary.files == 1 and summary.failed == 0
    assert summary.output_rows == 2 and summary.output_failed == 0 and summary.exit_code == 0
    assert all("labels" in r for r in read_jsonl(out))


# --- pieces without a server ---------------------------------------------------------------------------------------


def test_glob_patterns_match_like_the_shell(tmp_path):
    from imgcls.client.batch_io import open_input

    for name in ("a/x.jpg", "a/b/y.jpg", "a/b/c/z.PNG", "a/.h/w.jpg", "q.jpg", "a/x.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")

    def found(pattern: str) -> list[str]:
        return sorted(os.path.relpath(p, tmp_path) for p in open_input(f"{tmp_path}/{pattern}"))

    assert found("*.jpg") == ["q.jpg"]
    assert found("a/*") == ["a/x.jpg", "a/x.txt"]
    assert found("a/**/*.jpg") == ["a/b/y.jpg", "a/x.jpg"]
    assert found("**/*.[Pp][Nn][Gg]") == ["a/b/c/z.PNG"]
    assert found("a/?/*") == ["a/b/y.jpg"]
    source = open_input(f"{tmp_path}/a/**/*.jpg")
    assert source.kind == "glob" and source.true_label(str(tmp_path / "a" / "b" / "y.jpg")) == "b"
    folder = open_input(str(tmp_path))
    assert sorted(os.path.relpath(p, tmp_path) for p in folder) == ["a/b/c/z.PNG", "a/b/y.jpg", "a/x.jpg", "q.jpg"]
    assert folder.true_label(str(tmp_path / "a" / "b" / "y.jpg")) == "a"
    assert folder.true_label(f"{tmp_path}/q.jpg") is None


def test_path_index_merges_and_finds_everything():
    from imgcls.client.batch_io import PathIndex, path_key

    index = PathIndex(merge_every=7)
    keys = [path_key(f"/data/{i}.jpg") for i in range(100)]
    for key in keys[:50]:
        index.add(key)
    assert len(index) == 50 and all(k in index for k in keys[:50]) and not any(k in index for k in keys[50:])


def test_progress_lines_when_stderr_is_not_a_terminal(capsys):
    from imgcls.client.batch import Progress

    progress = Progress(None, interval=0.0)
    assert progress.mode == "lines"
    progress.total = 10
    time.sleep(0.01)
    progress.update(4)
    assert "batch: 4/10 files" in capsys.readouterr().err


def test_two_jobs_cannot_append_to_one_output(server, photos, tmp_path):
    import fcntl

    out = tmp_path / "nested" / "out.jsonl"  # missing folders are created
    run(server, photos / "dog", out)
    with out.open("ab") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running job holds it
        with pytest.raises(ImgclsError, match="being written by another"):
            run(server, photos, out)
    assert run(server, photos, out).skipped == 7  # the lock goes with the process or file that held it
