"""Read a PyTorch checkpoint in the legacy (pre-zip) serialization with the standard library and NumPy.

Installing torch (gigabytes of wheels) to read a 20 MB state dict is not acceptable, and the format is
simple: a sequence of pickles (magic number, protocol version, system info, the object whose tensors
refer to storages by persistent id, the list of storage keys) followed by each storage's raw bytes,
each preceded by its 8-byte element count. The unpickler here resolves only the handful of globals a
state dict needs (OrderedDict, the tensor rebuild functions, the storage types) and refuses anything
else, so a checkpoint cannot run code while it is read.
"""

from __future__ import annotations

import collections
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from imgcls.errors import ImgclsError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class CheckpointError(ImgclsError):
    """The file is not a legacy PyTorch checkpoint this reader understands; the message says why."""


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: type
    size: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _TensorRef:
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    return data


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh: BinaryIO, path: Path) -> None:
        super().__init__(fh)
        self.path = path
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointError(f"{self.path}: refuses to load {module}.{name} (not part of a plain state dict)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, size, view_metadata = pid
        if view_metadata is not None:
            raise CheckpointError(f"{self.path}: storage views are not supported (storage {key})")
        name = storage_type.name if isinstance(storage_type, _StorageType) else str(storage_type)
        if name not in _STORAGE_DTYPES:
            raise CheckpointError(f"{self.path}: unsupported storage type {name}")
        ref = self.storages.setdefault(key, _StorageRef(key, _STORAGE_DTYPES[name], int(size)))
        return ref


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The checkpoint's state dict as name -> NumPy array (a C-contiguous copy, in the tensor's own layout).

    Raises CheckpointError naming the problem for anything that is not a little-endian legacy checkpoint
    holding a flat dict of tensors.
    """
    path = Path(path)
    with path.open("rb") as fh:
        try:
            magic = pickle.load(fh)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a legacy PyTorch checkpoint ({exc})") from None
        if magic != MAGIC_NUMBER:
            raise CheckpointError(f"{path}: not a legacy PyTorch checkpoint (wrong magic number; "
                                  "zip-format checkpoints are not supported)")
        protocol = pickle.load(fh)
        if protocol != PROTOCOL_VERSION:
            raise CheckpointError(f"{path}: unsupported protocol version {protocol}")
        sys_info = pickle.load(fh)
        if not sys_info.get("little_endian", False):
            raise CheckpointError(f"{path}: written on a big-endian machine; not supported")
        unpickler = _Unpickler(fh, path)
        obj = unpickler.load()
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        keys = pickle.load(fh)
        raw: dict[str, np.ndarray] = {}
        for key in keys:
            ref = unpickler.storages.get(key)
            if ref is None:
                raise CheckpointError(f"{path}: storage {key} is listed but no tensor uses it")
            head = fh.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path}: truncated before storage {key}")
            (count,) = struct.unpack("<q", head)
            if count != ref.size:
                raise CheckpointError(f"{path}: storage {key} holds {count} elements, the pickle says {ref.size}")
            nbytes = count * np.dtype(ref.dtype).itemsize
            data = fh.read(nbytes)
            if len(data) != nbytes:
                raise CheckpointError(f"{path}: truncated inside storage {key}")
            raw[key] = np.frombuffer(data, dtype=np.dtype(ref.dtype).newbyteorder("<"))
    out: dict[str, np.ndarray] = {}
    for name, t in obj.items():
        if not isinstance(t, _TensorRef):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        out[name] = _materialize(path, name, t, raw)
    return out


def _materialize(path: Path, name: str, t: _TensorRef, raw: dict[str, np.ndarray]) -> np.ndarray:
    """Apply the tensor's offset, shape and strides (in elements) to its storage; check the bounds first."""
    if t.storage.key not in raw:
        raise CheckpointError(f"{path}: tensor {name!r} uses storage {t.storage.key}, which is not in the file")
    buf = raw[t.storage.key]
    if len(t.shape) != len(t.stride):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {t.shape} but strides {t.stride}")
    last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride, strict=True)) if all(t.shape) else t.offset
    if t.offset < 0 or min(t.stride, default=0) < 0 or (all(t.shape) and last >= len(buf)):
        raise CheckpointError(f"{path}: tensor {name!r} reaches outside its storage")
    itemsize = buf.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(buf[t.offset:], shape=t.shape,
                                           strides=tuple(s * itemsize for s in t.stride), writeable=False)
    return np.ascontiguousarray(view).astype(buf.dtype.newbyteorder("="), copy=False)
