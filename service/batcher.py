"""Dynamic batcher: one thread per model version turns single images from many requests into batches.

A request becomes a `Job` with one slot per image. `admit` reserves the slots up front (so a full queue is
refused before any decoding work), decode workers `put` each preprocessed image as it is ready, and the
batcher thread takes up to `max_batch_size` queued images, drops those whose request was cancelled or
whose deadline passed, runs the model once and writes each row back to the slot it came from. Results
therefore land in request order and never in another request's job, however the images were split
across batches.

Batching policy: the first queued image waits at most `max_queue_delay` for the batch to fill, and only
while images already admitted are still being decoded; with nothing on the way the batch runs at once,
so a lone client pays no batching delay. Under load, images queue up while the previous batch runs.

Shedding: a closed loop of clients holds a steady queue (each waits for its answer before it sends again),
and the admission limit is sized so that a closed loop of up to `max_queue_size` single-image clients is never
refused. An open-loop overload (arrivals that do not wait for answers) fills the queue to that limit instead,
and then every admitted image waits for the whole limit's work: about half a second on 2 cores. So the first
refusal at the full limit turns shedding on: the batcher then admits only the images it expects to compute
within `overload_target`. Under sustained overload the admitted images then wait for the target's worth of
work, not the limit's.

Shedding ends after `SHED_QUIET` seconds without a refusal (the arrivals no longer outpace the model), and at
the latest after a probe period: clients that retry what shedding refused (a closed loop of 8, a batch job)
keep the refusals going although their demand fits the full limit, so only lifting the cap can tell them from
an overload. An overload that persists refills the queue within a fraction of a second and shedding resumes,
with the probe period doubled (1 s up to `SHED_PROBE_MAX`) so that each refill costs less. Not "until the queue
runs empty": under overload it does, many times a second (the instances take everything queued and finish
together), and ending there let the queue refill to the full limit every time.

Instances (Triton's `instance_group` count): with several `run` callables, one thread per callable takes
batches from the one queue, so a batch starts as soon as any instance is free. A lone image may instead run
on the thread that queues it, in the first instance's place (`put`, `may_run`). On a small CPU, two
single-threaded instances keep both cores busy where one two-threaded runtime waits at every operator for
whichever of its threads a decode worker preempted (docs/scaling.md has the measurement).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SHED_QUIET = 1.0  # seconds without a refusal that end shedding; also the first probe period
SHED_PROBE_MAX = 32.0  # longest probe period: shedding ends at the latest this long after it began


class QueueFull(Exception):
    """The batcher already holds `max_queue_size` images (decoding, queued or in a running batch), or, while it
    sheds load, the work its `overload_target` allows."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its image reached the model."""


class Cancelled(Exception):
    """The request was cancelled (client gone); its images were dropped."""


class ShuttingDown(Exception):
    """The batcher stopped before the image was processed."""


@dataclass(eq=False)
class Job:
    """One request's images; `results[i]` ends as probabilities [C] or an exception for image i."""

    n: int
    deadline: float | None = None  # time.monotonic() value
    on_done: Callable[[Job], Any] | None = None
    results: list[Any] = field(init=False)
    done: threading.Event = field(init=False, default_factory=threading.Event)
    cancelled: bool = field(init=False, default=False)
    reserved: int = field(init=False)  # slots still counted in the batcher's queue (guarded by its lock)
    # Where the request's time went, for per-request statistics (Triton's ModelStatistics):
    input_s: float = field(init=False, default=0.0)  # decode + preprocess, summed over its images
    queue_s: float = field(init=False, default=0.0)  # longest wait of its images, summed over its batches
    infer_s: float = field(init=False, default=0.0)  # the batches it was part of (each counted once)
    batches: list[int] = field(init=False, default_factory=list)  # sizes of those batches (traces, access log)
    done_at: float = field(init=False, default=0.0)  # time.monotonic() when the last image finished
    admitted_at: float = field(init=False, default_factory=time.monotonic)
    _remaining: int = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.results = [None] * self.n
        self.reserved = self.n
        self._remaining = self.n

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now if now is not None else time.monotonic()) >= self.deadline

    def add_input(self, seconds: float) -> None:
        with self._lock:
            self.input_s += seconds

    def set(self, index: int, value: Any) -> None:
        """Record image `index`'s outcome (the first one wins); the last one completes the job."""
        with self._lock:
            if self.results[index] is not None:
                return
            self.results[index] = value
            self._remaining -= 1
            finished = self._remaining == 0
        if finished:
            self.done_at = time.monotonic()
            self.done.set()
            if self.on_done is not None:
                self.on_done(self)


@dataclass(eq=False)
class _Item:
    job: Job
    index: int
    x: np.ndarray
    enqueued: float
    waited: float = 0.0  # before it was queued: waiting for a decode worker


# (batch size, each image's wait from admission to its batch (decoding itself excluded), inference seconds,
# images computed for requests that had already failed: cancelled, or past their deadline when it finished)
BatchObserver = Callable[[int, list[float], float, int], None]


class Batcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray] | Sequence[Callable[[np.ndarray], np.ndarray]],
        *,
        max_batch_size: int,
        max_queue_delay: float,
        max_queue_size: int,
        name: str = "model",
        on_batch: BatchObserver | None = None,
        on_depth: Callable[[int], None] | None = None,
        on_admitted: Callable[[int], None] | None = None,
        on_expired: Callable[[int], None] | None = None,
        on_shedding: Callable[[bool], None] | None = None,
        solo: Callable[[np.ndarray], np.ndarray] | None = None,
        overload_target: float = 0.0,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay < 0 or overload_target < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1, max_queue_delay and "
                             "overload_target >= 0")
        runs = list(run) if isinstance(run, Sequence) else [run]
        if not runs:
            raise ValueError("a batcher needs at least one run callable")
        self.instances = len(runs)
        self._solo = solo  # every thread's runtime: for a batch that runs while the other instances are idle
        self._busy = 0  # instances computing a batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_queue_size = max_queue_size
        self.name = name
        self._on_batch = on_batch or (lambda *_: None)
        self._on_depth = on_depth or (lambda _: None)  # images waiting: decoding or queued
        self._on_admitted = on_admitted or (lambda _: None)  # and those being computed: what the limit bounds
        self._on_expired = on_expired or (lambda _: None)
        self._on_shedding = on_shedding or (lambda _: None)
        self.overload_target = overload_target  # seconds of work admitted while shedding; 0: never shed
        self.shedding = False  # guarded by _cond
        self._refused_at = 0.0  # time.monotonic() of the last refusal for load, guarded by _cond
        self._shed_until = 0.0  # while shedding: when the probe period ends it
        self._shed_period = 0.0  # the current probe period (0: none yet)
        self._shed_ended = -math.inf  # when shedding last ended
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._pending = 0  # admitted images not yet taken into a batch (decoding or queued)
        self._running = 0  # images in the batches being computed
        self.per_image = 0.0  # seconds of model time per image (one instance), moving average of recent batches
        self._estimate = threading.Lock()
        self.nice = 0  # the batcher thread (and the runtime's threads it wakes) run this much nicer
        self._stopping = False
        self._closing = False  # close(): refuse new requests, finish the admitted ones
        self._runs = runs
        self._inline = False  # put() is running a lone image on its caller's thread; the first instance waits
        self._threads = [threading.Thread(target=self._loop, args=(i, r), daemon=True,
                                          name=f"batcher-{name}" + (f"-{i}" if len(runs) > 1 else ""))
                         for i, r in enumerate(runs)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        return self._pending

    def observe(self, size: int, seconds: float) -> None:
        """Fold one batch's time into the per-image cost (the warm-up seeds it)."""
        sample = seconds / max(1, size)
        with self._estimate:
            if self.per_image:  # one stalled batch (a pause, a test's gate) moves the estimate 4x at most
                sample = min(sample, 4 * self.per_image)
            self.per_image = sample if self.per_image == 0 else 0.8 * self.per_image + 0.2 * sample

    def expected_wait(self) -> float:
        """Seconds until the images admitted so far (queued, decoding, and the batches running) are computed:
        what a new request would wait before its own batch starts. The instances share that work."""
        return (self._pending + self._running) * self.per_image / self.instances

    def expected_done(self, n: int) -> float:
        """Seconds until `n` more images would be computed. The work ahead is shared by the instances, but
        the last batch, the one holding these images, runs on one instance alone: with one instance this is
        (ahead + n) x per-image cost; with k, the batch's share of it is k times longer."""
        ahead = self._pending + self._running
        batch = min(max(n, self.max_batch_size), max(n, -(-(ahead + n) // self.instances)))
        return ((ahead + n - batch) / self.instances + batch) * self.per_image

    def admit(self, n: int, deadline: float | None = None, on_done: Callable[[Job], Any] | None = None) -> Job:
        """Reserve `n` slots for a request, or raise QueueFull / ShuttingDown at once.

        The limit counts every image in the system: decoding, queued, and in the batches being computed. An
        admitted image then waits for at most `max_queue_size` images' work, its own batch included; counting
        only the waiting ones let a request also wait behind a full batch on each instance (two batches of 32
        on 2 cores doubled the admitted p99 under overload, docs/overload.md). A request larger than the limit
        is admitted only into an empty system, so every allowed request size can be served. A refusal at the
        limit turns shedding on (the module's docstring says why); while it is on, a request is admitted only if
        its images are expected to be computed within `overload_target`, or if they leave no more than one image
        per instance in the system (a model slower than the target still computes on every instance)."""
        with self._cond:
            if self._stopping or self._closing:
                raise ShuttingDown("the model is shutting down")
            held = self._pending + self._running
            now = time.monotonic()
            self._end_shedding_if_quiet(now)
            if held > 0 and held + n > self.max_queue_size:
                self._refused_at = now
                if self.overload_target and not self.shedding:
                    self._shed(True)
                raise QueueFull(f"queue full ({held} of {self.max_queue_size} images admitted: {self._pending} "
                                f"waiting, {self._running} being computed)")
            if (held > 0 and self.shedding and held + n > self.instances
                    and (expected := self.expected_done(n)) > self.overload_target):
                self._refused_at = now
                raise QueueFull(f"shedding load: {held} images admitted need about {expected * 1000:.0f} ms; "
                                f"under overload at most {self.overload_target * 1000:.0f} ms of work is admitted")
            self._pending += n
            self._report()
        return Job(n, deadline, on_done)

    def put(self, job: Job, index: int, x: np.ndarray, waited: float = 0.0, *, may_run: bool = False) -> None:
        """Queue image `index` of `job` (preprocessed, float32 HxWx3); `waited`: seconds it already waited
        for a decode worker, counted in its queue wait.

        `may_run`: the caller's thread may compute (a decode thread, never the event loop). Then a lone image
        (nothing else admitted, queued or running) runs right here, as the batch the first instance would
        have taken. Waking an instance thread for it was half of a lone request's queue wait on a 2-core VM
        (0.23-0.31 ms, against 0.11-0.15 ms without; docs/benchmarks.md)."""
        with self._cond:
            if job.cancelled:
                return
            if self._stopping:
                item = None
            else:
                item = _Item(job, index, x, time.monotonic(), waited)
                if not (may_run and self._busy == 0 and not self._inline and not self._queue
                        and self._pending == 1):
                    self._queue.append(item)
                    self._cond.notify_all()  # every instance: the first free one in order takes it
                    return
                self._take([item])  # as _next_batch would, holding the first instance's place
                self._inline = True
        if item is None:
            self.fail(job, index, ShuttingDown("server shutting down"))
            return
        try:
            self._run_batch([item], self._solo or self._runs[0])
        finally:
            with self._cond:
                self._inline = False
                self._cond.notify_all()

    def fail(self, job: Job, index: int, error: Exception) -> None:
        """Image `index` will not reach the model (undecodable, expired): free its slot, record the error."""
        self._release(job, 1)
        job.set(index, error)

    def cancel(self, job: Job) -> None:
        """Drop every image of `job` not yet in a running batch and free their slots."""
        with self._cond:
            if job.cancelled:
                return
            job.cancelled = True
            if any(item.job is job for item in self._queue):
                self._queue = deque(item for item in self._queue if item.job is not job)
        self._release(job, job.reserved)
        for i in range(job.n):
            job.set(i, Cancelled("request cancelled"))

    def _release(self, job: Job, count: int) -> None:
        with self._cond:
            count = min(count, job.reserved)
            job.reserved -= count
            self._pending -= count
            self._report()
            self._cond.notify_all()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the thread; images still queued get ShuttingDown."""
        with self._cond:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for item in left:
            item.job.set(item.index, ShuttingDown("server shutting down"))
        self._join(timeout)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Retire the batcher (a model version being unloaded): refuse new requests, run every image already
        admitted (some may still be decoding), then stop. Returns False when `timeout` passed first; the
        images left then get ShuttingDown."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        finished = self._join(timeout)
        self.stop(0)
        return finished

    def _join(self, timeout: float | None) -> bool:
        """Wait for every instance thread and a run in put(), `timeout` in all; True when none is left running
        (so the caller may release the runtimes)."""
        end = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(None if end is None else max(0.0, end - time.monotonic()))
        with self._cond:
            self._cond.wait_for(lambda: not self._inline, None if end is None else max(0.0, end - time.monotonic()))
            inline = self._inline
        return not inline and not any(t.is_alive() for t in self._threads if t is not threading.current_thread())

    def _next_batch(self, instance: int = 0) -> tuple[list[_Item], bool] | None:
        """The next batch for `instance`, and whether it runs alone (no other batch running or queued, no image
        still decoding).
        Instance i takes work only while instances 0..i-1 are all busy, so light load stays on instance 0
        (its caches warm) and the others join as the queue builds."""
        with self._cond:
            while True:
                while not self._stopping and not (self._closing and self._pending == 0) and (
                        not self._queue or self._busy < instance or (instance == 0 and self._inline)):
                    self._cond.wait(self._shed_timeout())
                    self._end_shedding_if_quiet(time.monotonic())
                if self._stopping or not self._queue:
                    self._cond.notify_all()  # closing: the other instances see it too
                    return None
                flush_at = self._queue[0].enqueued + self.max_queue_delay
                # Wait for a fuller batch only while admitted images are still being decoded.
                while len(self._queue) < self.max_batch_size and self._pending > len(self._queue):
                    remaining = flush_at - time.monotonic()
                    if remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
                if self._queue:  # another instance may have taken them while this one waited
                    break
            items = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
            # Alone: no other batch running or queued, and no admitted image still decoding. The lone-batch
            # runtime's threads spin within a run; next to busy decode workers they would take their cores.
            alone = self._busy == 0 and not self._queue and self._pending == len(items)
            self._take(items)
            self._cond.notify_all()  # the next instance in order may take what is left
        return items, alone

    def _take(self, items: list[_Item]) -> None:
        """Move `items` from waiting to a running batch (lock held)."""
        for item in items:
            item.job.reserved -= 1
        self._pending -= len(items)
        self._running += len(items)
        self._busy += 1
        self._report()

    def _done_running(self, count: int, batch_over: bool = False) -> None:
        with self._cond:
            self._running -= count
            if count:
                self._report()
            if batch_over:
                self._busy -= 1
                self._cond.notify_all()

    def _report(self) -> None:
        """Hand the gauges their values; called with the lock held, so that two threads cannot write them out of
        order and leave an idle model showing images that are long gone."""
        self._on_depth(self._pending)
        self._on_admitted(self._pending + self._running)
        self._end_shedding_if_quiet(time.monotonic())

    def _end_shedding_if_quiet(self, now: float) -> None:
        if self.shedding and (now - self._refused_at >= SHED_QUIET or now >= self._shed_until):
            self._shed(False, now)

    def _shed_timeout(self) -> float | None:
        """How long an idle batcher thread may sleep: while shedding, until it may end (the gauge with it)."""
        if not self.shedding:
            return None
        return max(0.01, min(self._refused_at + SHED_QUIET, self._shed_until) - time.monotonic())

    def _shed(self, on: bool, now: float | None = None) -> None:
        """Turn shedding on (a refusal at the full limit) or off (quiet, or the probe period over); lock held."""
        now = time.monotonic() if now is None else now
        self.shedding = on
        self._on_shedding(on)
        if on:  # back within a probe period of the last end: the overload persists, probe half as often
            again = now - self._shed_ended < max(SHED_QUIET, self._shed_period)
            self._shed_period = min(SHED_PROBE_MAX, 2 * self._shed_period) if again else SHED_QUIET
            self._shed_until = now + self._shed_period
            log.warning("%s: overloaded (%d images admitted): admitting only what it computes in %.0f ms, for "
                        "%.0f s at most", self.name, self.max_queue_size, self.overload_target * 1000,
                        self._shed_period)
        else:
            self._shed_ended = now
            quiet = now - self._refused_at >= SHED_QUIET
            log.info("%s: %s; admitting up to %d images again", self.name,
                     f"nothing refused for {SHED_QUIET:.0f} s" if quiet else "probing whether the overload is over",
                     self.max_queue_size)

    def _loop(self, instance: int, run: Callable[[np.ndarray], np.ndarray]) -> None:
        if self.nice:
            try:
                os.nice(self.nice)  # Linux: this thread's niceness only
            except OSError as exc:
                log.warning("batcher thread priority unchanged: %s", exc)
        while (taken := self._next_batch(instance)) is not None:
            items, alone = taken
            self._run_batch(items, self._solo if alone and self._solo is not None else run)

    def _run_batch(self, items: list[_Item], runner: Callable[[np.ndarray], np.ndarray]) -> None:
        """Run one batch taken from the queue (counted in `_running` and `_busy`) and write back its rows."""
        now = time.monotonic()
        # An image whose deadline passes before this batch can finish is dropped now, not computed for nothing.
        finish = now + len(items) * self.per_image
        live = []
        expired = 0
        for item in items:
            if item.job.cancelled:
                continue
            if item.job.expired(finish):  # dropped before compute
                expired += 1
                item.job.set(item.index, DeadlineExceeded("deadline exceeded while queued"))
            else:
                live.append(item)
        if expired:
            self._on_expired(expired)
        self._done_running(len(items) - len(live), batch_over=not live)
        if not live:
            return
        start = time.monotonic()
        try:
            probs: np.ndarray | Exception = runner(np.stack([item.x for item in live]))
        except Exception as exc:  # a runtime failure fails this batch, not the server
            log.exception("inference failed for a batch of %d", len(live))
            probs = exc
        end = time.monotonic()
        seconds = end - start
        self.observe(len(live), seconds)
        self._done_running(len(live), batch_over=True)
        waits = [start - item.enqueued + item.waited for item in live]
        wasted = sum(1 for item in live if item.job.cancelled or item.job.expired(end))
        try:
            self._on_batch(len(live), waits, seconds, wasted)
        except Exception:
            log.exception("batch observer failed")
        longest: dict[Job, float] = {}
        for item, wait in zip(live, waits, strict=True):
            longest[item.job] = max(longest.get(item.job, 0.0), wait)
        for job, wait in longest.items():  # before set(): the last image completes the job
            with job._lock:  # a request split over instances is written by several threads
                job.queue_s += wait
                job.infer_s += seconds
                job.batches.append(len(live))
        for k, item in enumerate(live):
            item.job.set(item.index, probs if isinstance(probs, Exception) else probs[k])
