"""What the manifest says about an artifact: checksum, size and tensor names/shapes/dtypes.

A folder artifact (saved_model/) gets a deterministic *tree hash*: sha256 over the sorted lines
`relative/posix/path NUL sha256(file) LF` of every file in it, so the same SavedModel always hashes the
same whatever order the file system lists it in. Reproduce with `tree_sha256`. The hashes are the core's
(`imgcls.runtimes`): the server verifies artifacts with the very same code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgcls.manifest import TensorInfo
from imgcls.runtimes import checksum, file_sha256, tree_sha256

__all__ = ["checksum", "file_sha256", "onnx_tensors", "savedmodel_tensors", "tflite_tensors", "tree_sha256"]


def _dims(shape) -> list[int | None]:
    return [None if d is None or int(d) < 0 else int(d) for d in shape]


def savedmodel_tensors(runner) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """From a `runners.SavedModelRunner`: the signature's keys are the tensor names a client uses."""
    i, o = runner.input_spec, runner.output_spec
    return ([TensorInfo(name=runner.input_name, shape=_dims(i.shape.as_list()), dtype=i.dtype.name)],
            [TensorInfo(name=runner.output_name, shape=_dims(o.shape.as_list()), dtype=o.dtype.name)])


def _tflite_info(d: dict) -> TensorInfo:
    dtype = np.dtype(d["dtype"])
    scale, zero = d["quantization"]
    quantized = dtype in (np.int8, np.uint8)
    return TensorInfo(name=d["name"], shape=_dims(d["shape_signature"]), dtype=dtype.name,
                      scale=float(scale) if quantized else None, zero_point=int(zero) if quantized else None)


def tflite_tensors(path: Path) -> tuple[list[TensorInfo], list[TensorInfo], dict]:
    """Tensor names are the converter's (e.g. `serving_default_images:0`); the signature keeps the
    bundle's names, returned as the third element."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    signatures = interp.get_signature_list()
    return ([_tflite_info(d) for d in interp.get_input_details()],
            [_tflite_info(d) for d in interp.get_output_details()], signatures)


def onnx_tensors(path: Path) -> tuple[list[TensorInfo], list[TensorInfo], int]:
    """Graph inputs/outputs and the default-domain opset."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(path), load_external_data=False)

    def info(v) -> TensorInfo:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        return TensorInfo(name=v.name, shape=dims, dtype=np.dtype(tensor_dtype_to_np_dtype(t.elem_type)).name)

    initializers = {i.name for i in model.graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ([info(v) for v in model.graph.input if v.name not in initializers],
            [info(v) for v in model.graph.output], int(opset))
