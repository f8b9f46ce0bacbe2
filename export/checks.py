"""The checks that gate publication: every artifact against the bundle's SavedModel on one labelled sample.

- fp32 TFLite and ONNX: top-1 identical on >= 99.5% of images (largest |probability difference| reported);
- fp16 TFLite: top-1 identical on >= 99%;
- int8 TFLite: accuracy at most 1.5 points below the SavedModel's on the same images (a higher accuracy
  is not a failure: the gate guards against quantization loss);
- every artifact's accuracy is recorded.
Each artifact also runs at batch 1 on the first images, to record that batched and single results agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from imgcls.errors import ImgclsError
from imgcls.preprocessing import PreprocessingSpec, normalize

from .runners import Runner
from .samples import Sample

MIN_TOP1_AGREEMENT = {"tflite": 0.995, "onnx": 0.995, "tflite-fp16": 0.99}
MAX_ACCURACY_DROP_POINTS = {"tflite-int8": 1.5}
SINGLE_CHECKS = 3  # images also run one by one


class ExportCheckError(ImgclsError):
    """A check failed: nothing was published."""


@dataclass
class CheckResult:
    format: str
    accuracy: float | None
    figures: dict
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def predict(runner: Runner, sample: Sample, spec: PreprocessingSpec, batch_size: int) -> tuple[np.ndarray, list]:
    """Probabilities for the whole sample in batches of `batch_size` (plus the remainder batch)."""
    outputs, sizes = [], []
    for batch in sample.batches(spec, batch_size):
        outputs.append(runner.run(batch))
        sizes.append(len(batch))
    return np.concatenate(outputs).astype(np.float32), sorted(set(sizes))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def run_checks(fmt: str, runner: Runner, sample: Sample, spec: PreprocessingSpec, batch_size: int,
               reference: np.ndarray | None, reference_accuracy: float | None) -> tuple[CheckResult, np.ndarray | None]:
    """Run `runner` on the sample and judge it against the reference probabilities (None: it is the reference)."""
    n = len(sample)
    try:
        probs, sizes = predict(runner, sample, spec, batch_size)
        single = [runner.run(normalize(image[None], spec)) for image in sample.images[:SINGLE_CHECKS]]
    except ImgclsError:
        raise
    except Exception as exc:  # a corrupt file or a runtime that rejects the graph
        message = f"{fmt}: could not run on the check sample ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        return CheckResult(fmt, None, {"images": n, "error": message, "passed": False}, [message]), None
    expected = (n, reference.shape[1]) if reference is not None else (n, probs.shape[-1])
    if probs.shape != expected:
        message = f"{fmt}: output shape {list(probs.shape)} where {list(expected)} was expected"
        return CheckResult(fmt, None, {"images": n, "error": message, "passed": False}, [message]), None
    single = np.concatenate(single) if single else probs[:0]
    acc = accuracy(probs, sample.labels)
    figures: dict = {"images": n, "accuracy": acc, "batch_sizes": sorted({*sizes, 1}),
                     "batch1_max_abs_diff": float(np.abs(single - probs[:len(single)]).max()) if len(single) else 0.0}
    failures: list[str] = []
    if reference is None:
        figures.update(role="reference", passed=True)
        return CheckResult(fmt, acc, figures), probs
    agreement = float((probs.argmax(1) == reference.argmax(1)).mean())
    diff = np.abs(probs - reference)
    figures.update(reference="savedmodel", reference_accuracy=reference_accuracy, top1_agreement=agreement,
                   max_abs_prob_diff=float(diff.max()), mean_abs_prob_diff=float(diff.mean()),
                   accuracy_delta_points=round((acc - reference_accuracy) * 100, 4))
    if fmt in MIN_TOP1_AGREEMENT:
        limit = MIN_TOP1_AGREEMENT[fmt]
        figures["min_top1_agreement"] = limit
        if agreement < limit:
            failures.append(f"{fmt}: top-1 agreement with the SavedModel is {agreement:.2%} on {n} images, below "
                            f"the required {limit:.1%} (max |prob diff| {figures['max_abs_prob_diff']:.3g})")
    if fmt in MAX_ACCURACY_DROP_POINTS:
        limit = MAX_ACCURACY_DROP_POINTS[fmt]
        drop = round((reference_accuracy - acc) * 100, 9)
        figures["max_accuracy_drop_points"] = limit
        if drop > limit:
            failures.append(f"{fmt}: accuracy {acc:.2%} is {drop:.2f} points below the SavedModel's "
                            f"{reference_accuracy:.2%} on {n} images (allowed: {limit} points)")
    figures["passed"] = not failures
    return CheckResult(fmt, acc, figures, failures), probs

