"""Test-only fault injection, so tests can prove that a bad artifact stops the export.

Set `IMGCLS_EXPORT_FAULT` (or `ExportConfig.fault`) to one of `FAULTS`; never in production. This module
only damages an artifact: it is the ordinary checks that must then stop the export.

- `int8-calibration`: calibrate on inputs scaled x1000, so every real input quantizes to the zero point;
- `corrupt-onnx`: after conversion, rotate the class axis of the ONNX head (runnable, wrong answers);
- `truncate-<format>`: cut the written artifact file in half (it no longer loads).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from imgcls.errors import ImgclsError

FAULT_ENV = "IMGCLS_EXPORT_FAULT"
FAULTS = ("int8-calibration", "corrupt-onnx", "truncate-tflite", "truncate-tflite-fp16", "truncate-tflite-int8",
          "truncate-onnx")


def active(configured: str | None) -> str | None:
    fault = configured or os.environ.get(FAULT_ENV) or None
    if fault is not None and fault not in FAULTS:
        raise ImgclsError(f"{FAULT_ENV}={fault!r}: unknown fault, expected one of {', '.join(FAULTS)}")
    return fault


def calibration_scale(fault: str | None) -> float:
    return 1000.0 if fault == "int8-calibration" else 1.0


def apply(fault: str | None, fmt: str, path: Path, num_classes: int) -> None:
    """Damage the freshly written artifact `path` of format `fmt` if the fault targets it."""
    if fault == f"truncate-{fmt}":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif fault == "corrupt-onnx" and fmt == "onnx":
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        touched = 0
        for init in model.graph.initializer:
            arr = numpy_helper.to_array(init)
            if arr.ndim in (1, 2) and arr.shape[-1] == num_classes:  # the head's kernel [D, C] and bias [C]
                init.CopyFrom(numpy_helper.from_array(np.roll(arr, 1, axis=-1), init.name))
                touched += 1
        if not touched:
            raise RuntimeError("corrupt-onnx: no head weights found to corrupt")
        onnx.save(model, str(path))
