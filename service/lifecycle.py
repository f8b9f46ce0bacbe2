"""Pieces of the model lifecycle (hot reload) that need no server: the probe a new version must pass and
the call epochs that tell when an unloaded version can no longer be reached by a call in flight.

Why epochs rather than a reference count per model: a handler resolves a model and then submits to it;
counting would need every protocol front-end to release what it resolved on every path. Instead each call
records the epoch it started in (`InferenceServer.track`), and a swap opens a new epoch after replacing the
version table. A call that started in a later epoch can only see the new table, so once every call of the
earlier epochs has ended, nothing can submit to the replaced version any more (RCU's grace period).
"""

from __future__ import annotations

import threading

import numpy as np

from imgcls.errors import ImgclsError
from imgcls.manifest import Artifact
from imgcls.preprocessing import normalize
from imgcls.service.repository import Entry
from imgcls.service.runtimes import Runtime

PROBE_GREY = 128  # a mid-grey image: every preprocessing mode maps it to ordinary input values


def probe(runtime: Runtime, entry: Entry, artifact: Artifact) -> None:
    """One real inference on a deterministic input: the output must be one row of C finite probabilities
    that sum to 1 (softmax). Catches a wrong or corrupt artifact that still loads and has the right shape."""
    spec = entry.manifest.preprocessing
    h, w = spec.input_size
    classes = entry.manifest.num_classes
    out = np.asarray(runtime.run(normalize(np.full((1, h, w, 3), PROBE_GREY, np.uint8), spec)))
    if out.shape != (1, classes):
        raise ImgclsError(f"probe inference: output shape {out.shape}, expected (1, {classes})")
    if not np.all(np.isfinite(out)):
        raise ImgclsError("probe inference: the output has NaN or infinite values")
    # int8 outputs are rounded to the quantization step: allow half a step per class on top of float error
    scale = artifact.outputs[0].scale if artifact.outputs and artifact.outputs[0].scale else 0.0
    tolerance = 1e-3 + classes * scale / 2
    total = float(out.sum())
    if out.min() < -tolerance or abs(total - 1.0) > tolerance:
        raise ImgclsError(f"probe inference: outputs sum to {total:.4f} (min {out.min():.4f}); "
                          "expected softmax probabilities summing to 1")


class CallEpochs:
    """Counts calls in flight per epoch; `advance()` after a swap, then `wait_before(epoch)`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._epoch = 0
        self._calls: dict[int, int] = {}

    def enter(self) -> int:
        with self._cond:
            self._calls[self._epoch] = self._calls.get(self._epoch, 0) + 1
            return self._epoch

    def leave(self, epoch: int) -> None:
        with self._cond:
            self._calls[epoch] -= 1
            if not self._calls[epoch]:
                del self._calls[epoch]
                self._cond.notify_all()

    def advance(self) -> int:
        """Start a new epoch (call after publishing the new version table); returns it."""
        with self._cond:
            self._epoch += 1
            return self._epoch

    def wait_before(self, epoch: int, timeout: float | None) -> bool:
        """Wait until no call that started before `epoch` is in flight; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: all(e >= epoch for e in self._calls), timeout)

    def in_flight_before(self, epoch: int) -> int:
        with self._cond:
            return sum(n for e, n in self._calls.items() if e < epoch)
