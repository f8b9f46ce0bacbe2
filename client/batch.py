"""`imgcls batch`: classify a folder, a glob or a list of files through a running imgcls server.

Design, and why:

- Unary `Predict` calls, `--concurrency` of them in flight, each with up to `--batch-size` images. The
  server's dynamic batcher merges concurrent requests into model batches anyway, so this is as fast as the
  streaming RPC, and a failed unary call can be retried on its own (a stream cannot be replayed).
- Lazy all the way: paths come from a generator, at most 2 x `--concurrency` requests are queued (paths
  only; a worker reads the files just before sending them), and each answered request is appended to the
  output and flushed at once. Memory does not depend on the number of files, except 8 bytes per answered
  path for resume and de-duplication (`batch_io.PathIndex`).
- Failures (docs/batch.md, Failures and retries): one file never breaks the job. A request answered
  UNAVAILABLE, CANCELLED by a server shutting down, or RESOURCE_EXHAUSTED is retried as it is, with
  exponential back-off and jitter (capped at `--max-backoff`, never sooner than the server's
  `retry-after-ms` hint), at most `--retries` times, saying on stderr what it waits for. A request that
  still fails, times out (DEADLINE_EXCEEDED), or is refused as a whole (INVALID_ARGUMENT, INTERNAL, a
  message over the size limit, ...) is split and its files are sent one by one, so a slow or hostile file
  costs only its own error row (with the reason) and the clean files of its request get their answers.
  The server is considered gone only when it also fails its health check: then no error rows are written
  for those files, the requests in flight finish, and the job stops with exit code 3 so that re-running it
  resumes where it stopped (rather than filling the output with UNAVAILABLE rows that a later run would
  have to redo). A file that cannot be read, or that the server rejects, becomes an error row too.
- Resume: the output is the job's state. Files already in it are skipped, error rows included, so every
  run gets further than the last one even when a file fails every time; a partial last row from a kill is
  cut; `--retry-errors` (or `--retry-failed`) removes the error rows first so those files are sent again.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

import grpc

from imgcls.client.batch_io import (
    InputSource,
    PathIndex,
    ResultWriter,
    open_input,
    open_locked,
    output_format,
    path_key,
    read_existing,
)
from imgcls.client.client import Backoff, Client, ServiceError, retryable
from imgcls.client.predict import (
    MAX_MESSAGE_BYTES,
    is_unreachable,
    read_files,
    send,
    short_reason,
    unreachable,
)
from imgcls.client.records import error_record
from imgcls.errors import ImgclsError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Retried as they are (see client.retryable): UNAVAILABLE, CANCELLED by a server shutting down,
# RESOURCE_EXHAUSTED that is load (not a message over the size limit).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})
# Codes that no retry and no other file can fix: the job as configured cannot run.
FATAL = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED,
                   grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION})

EXIT_OK, EXIT_FAILED_FILES, EXIT_SERVER_GONE, EXIT_INTERRUPTED = 0, 1, 3, 130


@dataclass
class BatchConfig:
    """Everything `imgcls batch` can be told (docs/batch-jobs.md)."""

    target: str
    input: str
    output: Path
    model: str = ""
    version: int = 0  # 0 = the latest the server has
    top_k: int = 5
    output_format: str | None = None  # None: from the output's extension
    batch_size: int = 16  # images per request
    concurrency: int = 4  # requests in flight
    timeout: float = 60.0  # seconds per attempt
    retries: int = 8
    backoff: float = 0.2  # first retry delay, doubled each time
    max_backoff: float = 10.0
    max_request_bytes: int = 16 * 1024 * 1024
    retry_errors: bool = False
    allow_failures: bool = False
    labels_from_folders: bool = False
    progress: bool | None = None  # None: a bar when stderr is a terminal, a line every 10 s otherwise
    # TLS and the bearer token (imgcls.client.client.Security, docs/security.md)
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    token: str | None = None

    def validate(self) -> None:
        for name in ("top_k", "batch_size", "concurrency", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ImgclsError(f"--{name.replace('_', '-')} must be at least 1")
        if self.retries < 0 or self.backoff < 0 or self.max_backoff < 0 or self.timeout <= 0:
            raise ImgclsError("--retries, --backoff and --max-backoff must be >= 0 and --timeout > 0")


class ServerGone(Exception):
    """A request still failed with a retryable code after every retry: stop, resume later."""

    def __init__(self, exc: ServiceError, retries: int) -> None:
        super().__init__(f"{exc.code.name} after {retries} retries: {exc.message}")
        self.code = exc.code
        self.error = exc


@dataclass
class _SplitPass:
    """Files of a split request sent one by one: whether one already timed out alone (the likely culprit,
    which gets its error row), and the files that timed out after it (sent again, last)."""

    culprit_seen: bool = False
    waited: list[tuple[str, bytes]] = field(default_factory=list)


class _LostInFlight(ServiceError):
    """The server went away twice while this request was in flight: maybe it is what takes the server down
    (a file that gets the pod OOM-killed, say). Split, and a single file gets an error row, so that neither
    this run nor a resumed one sends it again and again."""


# An attempt that fails UNAVAILABLE/CANCELLED after running this long was accepted and then lost (the server
# died or was stopped with it in flight); refusals (nothing listening, draining) come back in milliseconds.
LOST_IN_FLIGHT_S = 0.1


class _Stopped(Exception):
    """The job is stopping; the request was not completed (its files stay unanswered)."""


@dataclass
class _ChunkResult:
    records: list[dict[str, Any]]


# --- evaluation -------------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Accuracy of the served model when the class is the file's folder (`--labels-from-folders`)."""

    class_names: list[str]
    top_k: int
    support: Counter = field(default_factory=Counter)
    correct: Counter = field(default_factory=Counter)
    correct_top_k: Counter = field(default_factory=Counter)
    predicted: Counter = field(default_factory=Counter)
    failed: int = 0
    unlabelled: int = 0
    unknown: Counter = field(default_factory=Counter)  # folder names that are not classes (first few kept)

    def add(self, true: str | None, record: dict[str, Any]) -> None:
        if "error" in record:
            self.failed += 1
            return
        if true is None:
            self.unlabelled += 1
            return
        if true not in self.class_names:
            if true in self.unknown or len(self.unknown) < 20:
                self.unknown[true] += 1
            self.unlabelled += 1
            return
        names = [label["name"] for label in record["labels"]]
        self.support[true] += 1
        if names:
            self.predicted[names[0]] += 1
            self.correct[true] += names[0] == true
            self.correct_top_k[true] += true in names[: self.top_k]

    def report(self) -> dict[str, Any]:
        files = sum(self.support.values())
        per_class = []
        for name in self.class_names:
            n, ok, predicted = self.support[name], self.correct[name], self.predicted[name]
            per_class.append({"class": name, "files": n, "correct": ok,
                              "recall": ok / n if n else None, "precision": ok / predicted if predicted else None})
        return {
            "files": files, "correct": sum(self.correct.values()),
            "accuracy": sum(self.correct.values()) / files if files else None,
            "top_k": self.top_k, "top_k_accuracy": sum(self.correct_top_k.values()) / files if files else None,
            "failed": self.failed, "unlabelled": self.unlabelled, "unknown_folders": dict(self.unknown),
            "per_class": per_class,
        }


# --- progress ---------------------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar on a terminal, else a plain line every `interval` seconds (readable in CI logs).

    The total is counted by a background walk over the input, so the job starts at once and the bar gets
    its ETA when the count is in.
    """

    def __init__(self, enabled: bool | None, interval: float = 10.0) -> None:
        tty = sys.stderr.isatty()
        self.mode = ("bar" if tty else "lines") if enabled is None else ("bar" if enabled and tty else
                                                                            "lines" if enabled else "off")
        self.total: int | None = None
        self.done = 0
        self.started = time.monotonic()
        self.last_line = self.started
        self.interval = interval
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="img", desc="batch", dynamic_ncols=True, file=sys.stderr)

    def count_in_background(self, paths: Iterable[str], skip: Callable[[str], bool]) -> None:
        if self.mode == "off":
            return

        def count() -> None:
            try:
                self.total = sum(1 for p in paths if not skip(p))
            except Exception as exc:  # only the ETA is lost
                log.debug("counting the input failed: %s", exc)

        threading.Thread(target=count, name="batch-count", daemon=True).start()

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            if self.total is not None and self.bar.total != self.total:
                self.bar.total = max(self.total, self.done)
                self.bar.refresh()
            self.bar.update(n)
        elif self.mode == "lines" and time.monotonic() - self.last_line >= self.interval:
            self.last_line = time.monotonic()
            rate = self.done / max(1e-9, self.last_line - self.started)
            eta = ""
            if self.total is not None and rate > 0:
                left = max(0, self.total - self.done) / rate
                eta = f", ETA {int(left // 60)}:{int(left % 60):02d}"
            of = f"/{self.total}" if self.total is not None else ""
            print(f"batch: {self.done}{of} files, {rate:.1f} images/s{eta}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        """A line on stderr that does not break the bar (what the job waits for, a file that failed)."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the job ----------------------------------------------------------------------------------------------------


@dataclass
class BatchSummary:
    """What `imgcls batch` prints at the end (`--json`: this, as one object)."""

    input: str
    input_kind: str
    output: str
    format: str
    model: str
    version: int
    files: int = 0  # rows written by this run
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # already answered in the output
    duplicates: int = 0  # listed more than once in the input
    retries: int = 0
    split_requests: int = 0  # requests that failed and were sent again one file at a time
    wall_seconds: float = 0.0
    images_per_second: float = 0.0
    output_rows: int = 0  # the whole output after this run
    output_failed: int = 0
    cut_partial_row: bool = False
    retried_error_rows: int = 0  # error rows removed by --retry-errors and sent again
    stopped: str | None = None  # why the job ended early (interrupted, server gone)
    exit_code: int = 0
    first_failures: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class BatchJob:
    """One run of `imgcls batch`. `run()` returns the summary; the CLI prints it and exits with its code."""

    def __init__(self, config: BatchConfig, *, client: Client | None = None) -> None:
        config.validate()
        self.cfg = config
        self.source: InputSource = open_input(config.input)
        self.fmt = output_format(config.output, config.output_format)
        self.client = client or Client(config.target, timeout=config.timeout, retries=0,
                                       max_message_bytes=MAX_MESSAGE_BYTES, tls=config.tls, tls_ca=config.tls_ca,
                                       tls_cert=config.tls_cert, tls_key=config.tls_key, token=config.token,
                                       tls_server_name=config.tls_server_name)
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._noted: dict[str, float] = {}
        self._backoff = Backoff(config.backoff, config.max_backoff)
        self.retries = 0
        self.split_requests = 0
        self.progress = Progress(config.progress)
        self.model, self.top_k = config.model, config.top_k  # resolved from the server's metadata in run()

    # -- retries --

    def _note(self, key: str, message: str) -> None:
        """Say on stderr what the job is waiting for (at most once a second per kind of wait), so that a job
        that makes no progress for a while says why instead of looking hung."""
        now = time.monotonic()
        with self._lock:
            if now - self._noted.get(key, -1e9) < 1.0:
                return
            self._noted[key] = now
        self.progress.note(f"batch: {message}")

    def _sleep(self, seconds: float) -> None:
        with self._lock:
            self.retries += 1
        if self.stop.wait(seconds):
            raise _Stopped

    def _server_healthy(self) -> bool:
        """Whether the server answers its health check SERVING: only a failing health check (or connection)
        means the server is gone; a request that fails while it is healthy is that request's problem."""
        try:
            return self.client.health(timeout=min(5.0, self.cfg.timeout)) == "SERVING"
        except ServiceError:
            return False
        except ValueError:  # closed channel: the job is stopping
            raise _Stopped from None

    def _with_retries(self, call: Callable[[], T], what: str = "the server", count_losses: bool = False) -> T:
        """`call()`, retried with back-off while a later attempt can succeed (UNAVAILABLE, CANCELLED by a
        server shutting down, RESOURCE_EXHAUSTED honouring the server's retry hint), at most `--retries`
        times. Then: ServerGone when the server also fails its health check, else the last error (the
        request, not the server, is the problem: the caller splits it). With `count_losses`, a request that
        was in flight twice when the server went away raises `_LostInFlight` at once."""
        attempt = 0
        lost = 0
        while True:
            if self.stop.is_set():
                raise _Stopped
            started = time.monotonic()
            try:
                return call()
            except ServiceError as exc:
                if self.stop.is_set():
                    raise _Stopped from None
                if not retryable(exc, cancelled_by_us=self.client.closed):
                    raise
                if (count_losses and exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                        and time.monotonic() - started >= LOST_IN_FLIGHT_S):
                    lost += 1
                    if lost >= 2:
                        raise _LostInFlight(exc.code, f"the server went away twice while this was in flight "
                                                      f"(last: {exc.message[:200]})") from None
                if attempt >= self.cfg.retries:
                    if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED and not self._server_healthy():
                        raise ServerGone(exc, self.cfg.retries) from None
                    raise
                delay = self._backoff.delay(attempt, exc.retry_after)
                waiting = ("the server to have room" if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                           else f"{self.cfg.target} to come back")
                self._note(exc.code.name, f"waiting for {waiting} ({exc.code.name}: {short_reason(exc)}) for "
                                          f"{what}; retry {attempt + 1}/{self.cfg.retries} in {delay:.1f} s")
            except ValueError:  # "Cannot invoke RPC on closed channel": the job is stopping
                if self.stop.is_set():
                    raise _Stopped from None
                raise
            self._sleep(delay)
            attempt += 1

    # -- one request's worth of files --

    def _process(self, paths: list[str]) -> _ChunkResult:
        items, unreadable = read_files(paths, MAX_MESSAGE_BYTES)
        records: list[dict[str, Any]] = [record for _, record in unreadable]
        group: list[tuple[str, bytes]] = []
        size = 0
        for path, data in items:  # split further so that no request goes over --max-request-bytes
            if group and size + len(data) > self.cfg.max_request_bytes:
                records += self._send(group)
                group, size = [], 0
            group.append((path, data))
            size += len(data)
        if group:
            records += self._send(group)
        return _ChunkResult(records)

    def _send(self, group: list[tuple[str, bytes]], server_lost: int = 0,
              split: _SplitPass | None = None) -> list[dict[str, Any]]:
        """Records for `group`, one request (with retries); see `_failed` for what happens when it fails.
        `split`: the split request this single file comes from (see `_failed`)."""
        what = f"{len(group)} files" if len(group) > 1 else group[0][0]
        try:
            return self._with_retries(lambda: send(
                self.client, group, model=self.model, version=self.cfg.version, top_k=self.top_k,
                timeout=self.cfg.timeout, single_invalid_is_row=False), what, count_losses=True)
        except ServiceError as exc:
            return self._failed(group, exc, server_lost, split)

    def _failed(self, group: list[tuple[str, bytes]], exc: ServiceError, server_lost: int,
                split: _SplitPass | None = None) -> list[dict[str, Any]]:
        """A request failed for good. Codes that no file can fix stop the job (exit 2). A request that timed
        out while the server also stopped answering its health check waits for the server and is sent
        again (twice at most: a file that takes the server down with it must not do so forever). Otherwise
        the request is the problem, not the server: several files are split and sent one by one, so one
        bad or slow file costs only its own row; a single file gets an error row with the reason.

        The first file of a split request to time out alone gets its error row (that is its second timeout).
        Files after it that time out too get a second chance, alone, after the others: a server that goes on
        decoding the slow file after the deadline (its first request's decode and its own) can make the next
        files wait past their deadline too, and they must not be recorded as failed for a neighbour's cost."""
        if exc.code in FATAL:
            raise ImgclsError(f"the server refused the job: {exc}")
        lost = isinstance(exc, _LostInFlight)
        if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED and not self._server_healthy():
            if server_lost < 2:
                self._wait_for_server(exc)
                return self._send(group, server_lost + 1)
            exc = ServiceError(exc.code, f"{exc.message} (the server stopped answering twice while this was "
                                         "in flight)")
        if len(group) > 1:
            with self._lock:
                self.split_requests += 1
            reason = "it may be what takes the server down" if lost else "the server is healthy"
            self._note("split", f"a request of {len(group)} files failed ({exc.code.name}: {exc.message[:120]}); "
                                f"{reason}, so its files are sent one by one")
            one_by_one = _SplitPass()
            records = [record for item in group for record in self._send([item], server_lost, one_by_one)]
            waited = one_by_one.waited
            if waited:
                self._note("second", f"{_n(len(waited), 'file')} of that request timed out alone; sending "
                                     f"{'it' if len(waited) == 1 else 'them'} once more, last")
            return records + [record for item in waited for record in self._send([item], server_lost)]
        if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED and split is not None:
            if split.culprit_seen:  # not the first of its request to time out alone: maybe the first one's victim
                split.waited.append(group[0])
                return []
            split.culprit_seen = True  # the first: the likely culprit, its error row is written below
        path = group[0][0]
        message = exc.message
        if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            message = f"no answer within --timeout {self.cfg.timeout:g} s while the server was healthy ({message})"
        self._note(f"file:{path}", f"{path}: {exc.code.name}: {message[:200]} (recorded as an error row; "
                                   "--retry-errors sends it again)")
        return [error_record(path, exc.code.name, message)]

    def _wait_for_server(self, exc: ServiceError) -> None:
        """Poll health with back-off, at most `--retries` times; ServerGone if it never answers SERVING."""
        for attempt in range(self.cfg.retries + 1):
            if self._server_healthy():
                return
            if attempt == self.cfg.retries:
                break
            delay = self._backoff.delay(attempt)
            self._note("health", f"waiting for {self.cfg.target} to answer its health check ({exc.code.name}: "
                                 f"{exc.message[:120]}); check {attempt + 1}/{self.cfg.retries} in {delay:.1f} s")
            self._sleep(delay)
        raise ServerGone(exc, self.cfg.retries)

    # -- the whole job --

    def run(self) -> BatchSummary:
        """Classify every file of the input not yet in the output; see the module docstring."""
        try:
            return self._run()
        finally:
            self.stop.set()
            self.client.close()  # also cancels calls still in flight after an interrupt
            self.progress.close()  # also when the job never started (a bar is already on the terminal)

    def _run(self) -> BatchSummary:
        cfg = self.cfg
        started = time.monotonic()
        try:
            meta = self._with_retries(lambda: self.client.metadata(cfg.model, cfg.version, timeout=cfg.timeout))
        except ServerGone as exc:  # the server never answered: exit 3, as documented
            raise unreachable(cfg.target, exc.error) from None
        except ServiceError as exc:
            if is_unreachable(exc):
                raise unreachable(cfg.target, exc) from None
            what = f"model {cfg.model!r}" if cfg.model else "the served model"
            raise ImgclsError(f"cannot get {what} from {cfg.target}: {exc}") from None
        self.model, self.top_k = meta.name, min(cfg.top_k, len(meta.class_names))
        evaluation = Evaluation(list(meta.class_names), self.top_k) if cfg.labels_from_folders else None
        on_record = (lambda r: evaluation.add(self.source.true_label(r["path"]), r)) if evaluation else None
        handle = open_locked(cfg.output)
        try:
            existing = read_existing(cfg.output, self.fmt, self.top_k, retry_errors=cfg.retry_errors,
                                     on_record=on_record)
            if existing.models and meta.name not in existing.models:
                raise ImgclsError(f"{cfg.output} holds results of model {', '.join(sorted(existing.models))}, "
                                  f"not {meta.name}; choose another --output")
            if existing.dropped_errors:  # the file was replaced by its rewritten copy: lock that one
                handle.close()
                handle = open_locked(cfg.output)
        except BaseException:
            handle.close()
            raise
        summary = BatchSummary(input=cfg.input, input_kind=self.source.kind, output=str(cfg.output),
                               format=self.fmt, model=meta.name, version=meta.version,
                               cut_partial_row=existing.truncated_bytes > 0,
                               retried_error_rows=existing.dropped_errors)
        answered = PathIndex(existing.keys)  # earlier runs
        seen = PathIndex()  # this run (duplicates in the input)

        def todo() -> Iterator[str]:
            for path in self.source:
                key = path_key(path)
                if key in answered:
                    summary.skipped += 1
                elif key in seen:
                    summary.duplicates += 1
                else:
                    seen.add(key)
                    yield path

        progress = self.progress
        progress.count_in_background(self.source, lambda p: path_key(p) in answered)
        writer = ResultWriter(handle, self.fmt, self.top_k)
        pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="batch")
        pending: dict[Future[_ChunkResult], int] = {}
        fatal: ImgclsError | None = None

        def collect(block: bool) -> None:
            nonlocal fatal
            done, _ = wait(pending, timeout=None if block else 0, return_when=FIRST_COMPLETED)
            for future in done:
                pending.pop(future)
                try:
                    result = future.result()
                except _Stopped:
                    continue
                except ServerGone as exc:
                    if summary.stopped is None:
                        summary.stopped = f"server unavailable ({exc}); re-run the same command to resume"
                    self.stop.set()
                    continue
                except ImgclsError as exc:
                    fatal = fatal or exc
                    self.stop.set()
                    continue
                writer.write(result.records)
                for record in result.records:
                    summary.files += 1
                    if "error" in record:
                        summary.failed += 1
                        if len(summary.first_failures) < 5:
                            summary.first_failures.append(record)
                    if evaluation is not None:
                        evaluation.add(self.source.true_label(record["path"]), record)
                summary.ok = summary.files - summary.failed
                progress.update(len(result.records))

        try:
            for chunk in _chunks(todo(), cfg.batch_size):
                while len(pending) >= 2 * cfg.concurrency:  # bounded: paths of at most this many requests
                    collect(block=True)
                if self.stop.is_set():
                    break
                pending[pool.submit(self._process, chunk)] = len(chunk)
            while pending:  # after a failure too: what the server answered is kept
                collect(block=True)
        except KeyboardInterrupt:
            summary.stopped = "interrupted; re-run the same command to resume"
            summary.exit_code = EXIT_INTERRUPTED
        finally:
            self.stop.set()
            self.client.close()  # cancels calls still in flight after an interrupt
            pool.shutdown(wait=False, cancel_futures=True)
            writer.close()
            progress.close()
        if fatal is not None:
            raise fatal

        summary.retries = self.retries
        summary.split_requests = self.split_requests
        summary.wall_seconds = time.monotonic() - started
        summary.images_per_second = summary.files / summary.wall_seconds if summary.wall_seconds > 0 else 0.0
        summary.output_rows = existing.rows + summary.files
        summary.output_failed = existing.failed + summary.failed
        summary.evaluation = evaluation.report() if evaluation else None
        if summary.exit_code == EXIT_OK:
            if summary.stopped:
                summary.exit_code = EXIT_SERVER_GONE
            elif summary.output_failed and not cfg.allow_failures:
                summary.exit_code = EXIT_FAILED_FILES
        return summary


# --- reporting --------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _n(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def format_summary(s: BatchSummary) -> str:
    lines = [
        f"batch: {_n(s.files, 'file')} in {s.wall_seconds:.1f} s ({s.images_per_second:.1f} images/s), "
        f"{s.failed} failed, {s.skipped} already answered, {_n(s.duplicates, 'duplicate')}, "
        f"{_n(s.retries, 'retry', 'retries')}"
        + (f", {_n(s.split_requests, 'request')} split per file" if s.split_requests else ""),
        f"output: {s.output} ({s.format}, {s.output_rows} rows, {s.output_failed} failed); "
        f"model {s.model} v{s.version}",
    ]
    if s.cut_partial_row:
        lines.append("note: a partial last row from an interrupted run was cut; that file was sent again")
    if s.retried_error_rows:
        lines.append(f"note: {_n(s.retried_error_rows, 'error row')} from earlier runs removed and sent again")
    for r in s.first_failures:
        lines.append(f"failed: {r['path']}: {r['error']['code']}: {r['error']['message']}")
    if s.failed > len(s.first_failures):
        lines.append(f"failed: ... {s.failed - len(s.first_failures)} more (rows with \"error\" in the output)")
    e = s.evaluation
    if e is not None:
        if e["files"]:
            top = f", top-{e['top_k']} {_pct(e['top_k_accuracy'])}" if e["top_k"] > 1 else ""
            lines.append(f"accuracy: {_pct(e['accuracy'])} ({e['correct']}/{e['files']} labelled files{top})")
            width = max(5, *(len(c["class"]) for c in e["per_class"]))
            lines.append(f"{'class':<{width}}  {'files':>6}  {'correct':>7}  {'recall':>7}  {'precision':>9}")
            for c in e["per_class"]:
                lines.append(f"{c['class']:<{width}}  {c['files']:>6}  {c['correct']:>7}  {_pct(c['recall']):>7}  "
                             f"{_pct(c['precision']):>9}")
        else:
            lines.append("accuracy: no labelled files (the class is the first folder below the input)")
        if e["unlabelled"]:
            names = ", ".join(sorted(e["unknown_folders"])[:5])
            lines.append(f"note: {e['unlabelled']} files not in a class folder" + (f" ({names})" if names else ""))
    if s.stopped:
        lines.append(f"stopped: {s.stopped}")
    return "\n".join(lines)


def summary_dict(s: BatchSummary) -> dict[str, Any]:
    return asdict(s)


def run_command(cfg: BatchConfig, *, json_summary: bool = False, out: TextIO | None = None) -> int:
    """Run the job, print the summary (text or one JSON object) on stdout, return the exit code."""
    import json
    import signal

    out = out or sys.stdout
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops the job like Ctrl-C
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        summary = BatchJob(cfg).run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if json_summary:
        out.write(json.dumps(summary_dict(summary)) + "\n")
    else:
        out.write(format_summary(summary) + "\n")
    out.flush()
    return summary.exit_code

