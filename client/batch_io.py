"""Files in and rows out for `imgcls batch`: lazy input listing, the output formats, and resume.

Everything here streams, so a job over a million files holds one directory handle, one request's worth of
paths and an 8-byte hash per answered file, never a list of the files or of the results:

- inputs are walked with `os.scandir` (a folder, or the fixed prefix of a glob) or read line by line (a list
  file), never listed up front (`glob.glob` would hold every name of a directory in memory);
- the output is appended and flushed after each answered request; on the next run it is read back once to
  learn which files are already answered (`PathIndex`), and a partial last line left by a killed run is cut.
"""

from __future__ import annotations

import array
import csv
import fcntl
import glob
import hashlib
import io
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from imgcls.errors import ImgclsError
from imgcls.preprocessing import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

InputKind = Literal["folder", "glob", "list"]
OutputFormat = Literal["jsonl", "csv"]

# --- inputs ------------------------------------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk(root: str, max_depth: int | None = None) -> Iterator[str]:
    """Paths of the files under `root` (recursive, following symbolic links), lazily.

    Files come in directory order (not sorted: sorting a directory of a million files would hold all its
    names); subfolders are visited in name order after their parent's files. Hidden names (leading dot)
    are skipped, and a folder reached twice through links is walked once. A broken link is reported as a
    file, so the job records it as unreadable instead of silently leaving it out.
    """
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[str, int]] = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            info = os.stat(folder)
        except OSError as exc:
            log.warning("cannot enter %s: %s", folder, exc.strerror or exc)
            continue
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        subfolders: list[str] = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    if is_dir:
                        if max_depth is None or depth + 1 < max_depth:
                            subfolders.append(entry.name)
                    elif entry.is_file() or entry.is_symlink():  # not FIFOs or sockets: reading them blocks
                        yield entry.path
        except OSError as exc:
            log.warning("cannot list %s: %s", folder, exc.strerror or exc)
            continue
        for name in sorted(subfolders, reverse=True):
            stack.append((os.path.join(folder, name), depth + 1))


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A regex for a relative glob with `**` (any number of folders), `*`, `?` and `[...]`; `*` never crosses
    a `/`, as in the shell and `glob.glob(recursive=True)`."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern.startswith(("[!", "[^"), i) else i + 1)
            if end < 0:
                out.append(re.escape(c))
                i += 1
                continue
            body = pattern[i + 1:end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _split_glob(pattern: str) -> tuple[str, str]:
    """`photos/20*/**/*.jpg` -> (`photos`, `20*/**/*.jpg`): the folder to walk and the pattern below it."""
    parts = pattern.split("/")
    fixed: list[str] = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    if len(fixed) == len(parts):  # no magic at all
        return os.path.dirname(pattern), os.path.basename(pattern)
    root = "/".join(fixed) or ("/" if pattern.startswith("/") else ".")
    if pattern.startswith("/") and fixed == [""]:
        root = "/"
    return root, "/".join(parts[len(fixed):])


@dataclass(frozen=True)
class InputSource:
    """What `--input` names. Iterating it lists the files again from the start, lazily.

    `root` is the folder that class subfolders hang from (`--labels-from-folders`): the folder itself, or
    the fixed part of a glob. A list file has none: there a file's class is its parent folder's name.
    """

    kind: InputKind
    spec: str
    root: str | None = None
    pattern: str | None = None  # glob only, relative to root

    def __iter__(self) -> Iterator[str]:
        if self.kind == "folder":
            assert self.root is not None
            return (p for p in _walk(self.root) if _is_image_name(p))
        if self.kind == "glob":
            return self._glob()
        return self._lines()

    def _glob(self) -> Iterator[str]:
        assert self.root is not None and self.pattern is not None
        regex = _glob_regex(self.pattern)
        depth = None if "**" in self.pattern else self.pattern.count("/") + 1
        prefix = "" if self.root == "." and not self.spec.startswith("./") else self.root
        for path in _walk(self.root, max_depth=depth):
            relative = os.path.relpath(path, self.root)
            if regex.match(relative):
                yield os.path.join(prefix, relative) if prefix else relative

    def _lines(self) -> Iterator[str]:
        base = os.path.dirname(self.spec)
        with open(self.spec, encoding="utf-8", errors="surrogateescape", newline="") as f:
            for line in f:
                path = line.rstrip("\r\n")
                if not path.strip() or path.lstrip().startswith("#"):
                    continue
                yield os.path.join(base, path)  # absolute paths stay as they are

    def true_label(self, path: str) -> str | None:
        """The class folder of `path`: first folder below the root (folder, glob) or the parent (list)."""
        if self.root is None:
            parent = os.path.basename(os.path.dirname(path))
            return parent or None
        relative = os.path.relpath(path, self.root)
        parts = relative.split(os.sep)
        return parts[0] if len(parts) > 1 and parts[0] not in ("..", ".") else None


def open_input(spec: str) -> InputSource:
    """Decide what `--input` is: an existing folder, an existing text file of paths, or a glob pattern."""
    if not spec:
        raise ImgclsError("--input is required: a folder, a glob pattern or a text file with one path per line")
    if os.path.isdir(spec):
        return InputSource("folder", spec, root=spec.rstrip("/") or "/")
    if os.path.isfile(spec):
        if _is_image_name(spec):
            raise ImgclsError(f"--input {spec} is an image; give a folder, a glob or a text file listing paths "
                              "(for a few files, `imgcls predict` is simpler)")
        with open(spec, "rb") as f:
            head = f.read(4096)
        if b"\0" in head:
            raise ImgclsError(f"--input {spec} is not a text file of paths (it holds binary data)")
        return InputSource("list", spec)
    if glob.has_magic(spec):
        root, pattern = _split_glob(spec)
        if not os.path.isdir(root):
            raise ImgclsError(f"--input {spec}: folder {root} does not exist")
        return InputSource("glob", spec, root=root, pattern=pattern)
    raise ImgclsError(f"--input {spec}: no such file or folder (and not a glob pattern)")


# --- the set of answered files -------------------------------------------------------------------------------------


def path_key(path: str) -> int:
    """A 64-bit hash of a path: what the answered-files index stores instead of the string (8 bytes a file).
    Two of a million paths collide with probability ~3e-8."""
    digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class PathIndex:
    """Which paths were answered or are under way: a sorted uint64 array plus a small set of recent keys,
    merged into the array every `merge_every` additions, so memory is ~8 bytes per path."""

    def __init__(self, keys: np.ndarray | None = None, merge_every: int = 1024) -> None:
        self.sorted = np.unique(keys).astype(np.uint64) if keys is not None else np.zeros(0, np.uint64)
        self.recent: set[int] = set()
        self.merge_every = merge_every

    def __len__(self) -> int:
        return len(self.sorted) + len(self.recent)

    def __contains__(self, key: int) -> bool:
        if key in self.recent:
            return True
        i = int(np.searchsorted(self.sorted, np.uint64(key)))
        return i < len(self.sorted) and int(self.sorted[i]) == key

    def add(self, key: int) -> None:
        self.recent.add(key)
        if len(self.recent) >= self.merge_every:
            merged = np.fromiter(self.recent, np.uint64, len(self.recent))
            self.sorted = np.union1d(self.sorted, merged).astype(np.uint64)
            self.recent.clear()


# --- output formats -----------------------------------------------------------------------------------------------


def output_format(path: Path, explicit: str | None) -> OutputFormat:
    if explicit:
        if explicit not in ("jsonl", "csv"):
            raise ImgclsError(f"--format {explicit}: choose jsonl or csv")
        return explicit  # type: ignore[return-value]
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise ImgclsError(f"--output {path}: name it .jsonl (JSON Lines) or .csv, or pass --format jsonl|csv")


def csv_columns(top_k: int) -> list[str]:
    """path, model, version, top1_label, top1_index, top1_score, ..., error_code, error_message."""
    columns = ["path", "model", "version"]
    for i in range(1, top_k + 1):
        columns += [f"top{i}_label", f"top{i}_index", f"top{i}_score"]
    return [*columns, "error_code", "error_message"]


def _csv_row(record: dict[str, Any], top_k: int) -> list[str]:
    if "error" in record:
        return [record["path"], "", "", *[""] * (3 * top_k), record["error"]["code"], record["error"]["message"]]
    cells = [record["path"], record["model"], str(record["version"])]
    for i in range(top_k):
        if i < len(record["labels"]):
            label = record["labels"][i]
            cells += [label["name"], str(label["index"]), f"{label['score']:.6g}"]
        else:
            cells += ["", "", ""]
    return [*cells, "", ""]


def _csv_record(row: list[str], top_k: int) -> dict[str, Any]:
    """A CSV row back to the record shape (for resume and for accuracy over earlier rows)."""
    path, model, version = row[0], row[1], row[2]
    if row[-2]:
        return {"path": path, "error": {"code": row[-2], "message": row[-1]}}
    labels = []
    for i in range(top_k):
        name, index, score = row[3 + 3 * i:6 + 3 * i]
        if name:
            labels.append({"index": int(index), "name": name, "score": float(score)})
    return {"path": path, "model": model, "version": int(version), "labels": labels}


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # file names that are not UTF-8 round-trip unchanged


def open_locked(path: Path) -> BinaryIO:
    """Open the output for appending, holding an exclusive `flock` on it for the whole job: two jobs appending
    to one file would each skip only what they had read at their start, and write duplicates."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "ab")  # noqa: SIM115 (the caller closes it)
    except OSError as exc:
        raise ImgclsError(f"--output {path}: cannot open it for writing ({exc.strerror or exc})") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ImgclsError(f"--output {path} is being written by another `imgcls batch` (it holds the file's lock)") \
            from None
    return f


class ResultWriter:
    """Appends records and flushes after every call, so a killed job keeps everything it was told."""

    def __init__(self, file: BinaryIO, fmt: OutputFormat, top_k: int) -> None:
        self.file, self.fmt, self.top_k = file, fmt, top_k
        if fmt == "csv" and os.fstat(file.fileno()).st_size == 0:  # not tell(): the file may have been cut
            self._write_rows([csv_columns(top_k)])

    def _write_rows(self, rows: Iterable[list[str]]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        self.file.write(_encode(buf.getvalue()))
        self.file.flush()

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        if self.fmt == "csv":
            self._write_rows(_csv_row(r, self.top_k) for r in records)
        else:  # one write call for all lines: a kill can cut at most the last line
            self.file.write(_encode("".join(json.dumps(r) + "\n" for r in records)))
            self.file.flush()

    def close(self) -> None:
        self.file.close()


# --- reading an existing output (resume) -------------------------------------------------------------------------


@dataclass
class ExistingOutput:
    """What an earlier run left in the output file."""

    rows: int = 0
    failed: int = 0
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # answered paths, hashed
    duplicates: int = 0
    models: set[str] = field(default_factory=set)
    truncated_bytes: int = 0  # a partial last line that was cut
    dropped_errors: int = 0  # error rows removed by --retry-errors


def _lines_with_offsets(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    offset = 0
    for line in f:
        yield offset, line
        offset += len(line)


def _records(path: Path, fmt: OutputFormat, top_k: int) -> Iterator[tuple[int, int, dict[str, Any] | None]]:
    """(start offset, end offset, record) per row; record None for a partial or garbled *last* row.

    A garbled row anywhere else means the file is not ours (or was edited): that is an error, not
    something to cut away silently.
    """
    with open(path, "rb") as f:
        if fmt == "jsonl":
            end = 0
            for start, raw in _lines_with_offsets(f):
                end = start + len(raw)
                record = None
                if raw.endswith(b"\n"):
                    try:
                        record = json.loads(raw.decode("utf-8", "surrogateescape"))
                    except ValueError:
                        record = None
                if not isinstance(record, dict) or "path" not in record:
                    yield start, end, None
                    continue
                yield start, end, record
            return
        lines = _lines_with_offsets(f)
        consumed = [0, 0]  # start of the current row, end of the bytes read so far

        def text_lines() -> Iterator[str]:
            for start, raw in lines:
                consumed[1] = start + len(raw)
                if not raw.endswith(b"\n"):
                    return  # a partial last line: never parsed
                yield raw.decode("utf-8", "surrogateescape")

        reader = csv.reader(text_lines())
        header = next(reader, None)
        if header is None:
            if consumed[1]:
                yield 0, consumed[1], None
            return
        expected = csv_columns(top_k)
        if header != expected:
            found_k = sum(1 for c in header if c.endswith("_label"))
            if header[:3] == expected[:3] and found_k != top_k:
                raise ImgclsError(f"{path} was written with --top-k {found_k} (its columns); use the same "
                                  "--top-k to resume, or another --output")
            raise ImgclsError(f"{path} is not an `imgcls batch` CSV (unexpected header); choose another --output")
        consumed[0] = consumed[1]
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:
                row = None
            start, end = consumed[0], consumed[1]
            consumed[0] = end
            if row is None or len(row) != len(expected):
                yield start, end, None
                continue
            try:
                yield start, end, _csv_record(row, top_k)
            except ValueError:
                yield start, end, None
        if consumed[1] > consumed[0]:  # the partial last line
            yield consumed[0], consumed[1], None


def read_existing(path: Path, fmt: OutputFormat, top_k: int, *, retry_errors: bool = False,
                  on_record: Callable[[dict[str, Any]], None] | None = None) -> ExistingOutput:
    """Read what an earlier run wrote to `path` and make the file safe to append to.

    Cuts a partial last row (a run killed mid-write); with `retry_errors`, rewrites the file without its
    error rows (atomically, through a temporary file: the caller must reopen it) so those files are sent
    again. `on_record` sees each row that stays (for accuracy over the whole job).
    """
    out = ExistingOutput()
    if not path.exists():
        return out
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ImgclsError(f"--output {path} is not a regular file")
    keys = array.array("Q")
    good_end, bad_at = 0, None
    rewrite = None
    if retry_errors:
        rewrite = open(path.with_name(path.name + ".rewrite.tmp"), "wb")  # noqa: SIM115
        if fmt == "csv":
            with open(path, "rb") as f:
                header = f.readline()
            if header.endswith(b"\n"):
                rewrite.write(header)
    try:
        with open(path, "rb") as src:
            for start, end, record in _records(path, fmt, top_k):
                if bad_at is not None:  # a bad row that was not the last one
                    raise ImgclsError(f"{path}: byte {bad_at} starts a row that is not an `imgcls batch` record; "
                                      "fix or move the file, or choose another --output")
                if record is None:
                    bad_at = start
                    continue
                good_end = end
                if "error" in record and retry_errors:
                    out.dropped_errors += 1
                    continue
                if rewrite is not None:
                    src.seek(start)
                    rewrite.write(src.read(end - start))
                out.rows += 1
                if "error" in record:
                    out.failed += 1
                elif record.get("model"):
                    out.models.add(record["model"])
                keys.append(path_key(record["path"]))
                if on_record is not None:
                    on_record(record)
        size = os.path.getsize(path)
        if bad_at is not None:
            out.truncated_bytes = size - bad_at
            good_end = bad_at
        if rewrite is not None and out.dropped_errors:
            rewrite.close()
            os.replace(rewrite.name, path)
            rewrite = None
        elif good_end < size:
            with open(path, "r+b") as f:
                f.truncate(good_end)
    finally:
        if rewrite is not None:
            rewrite.close()
            os.unlink(rewrite.name)
    if out.truncated_bytes:
        log.warning("%s: cut a partial last row (%d bytes) left by an interrupted run; that file is sent again",
                    path, out.truncated_bytes)
    unique = np.unique(np.frombuffer(keys, dtype=np.uint64)) if len(keys) else np.zeros(0, np.uint64)
    out.duplicates = len(keys) - len(unique)
    out.keys = unique
    return out
