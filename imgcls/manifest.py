"""The manifest: the versioned contract between stages.

`training` writes a bundle manifest, `export` carries it into a repository entry and adds artifacts,
`service` reads it. Every reader validates it with `read_manifest`, which names the offending field.

Bundle layout (written by `imgcls train`)::

    BUNDLE/manifest.json   this schema, kind "bundle"
    BUNDLE/labels.txt      class names, one per line, in output order
    BUNDLE/saved_model/    SavedModel, signature "serving_default": float NHWC in, softmax out
    BUNDLE/model.keras     Keras model to resume training from

Repository entry layout (written by `imgcls export`)::

    REPO/NAME/VERSION/manifest.json   kind "model", with `artifacts`
    REPO/NAME/VERSION/labels.txt
    REPO/NAME/VERSION/<artifact files named in the manifest>
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imgcls.errors import ManifestError
from imgcls.preprocessing import PreprocessingSpec

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.txt"


class TensorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int | None]  # None for a dynamic dimension (the batch)
    dtype: str
    scale: float | None = None  # int8 quantization parameters, when quantized
    zero_point: int | None = None


class Artifact(BaseModel):
    """One runnable file (or folder) of a repository entry."""

    model_config = ConfigDict(extra="allow")

    format: Literal["savedmodel", "tflite", "tflite-fp16", "tflite-int8", "onnx"]
    file: str
    sha256: str
    size_bytes: int = Field(ge=0)
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    checks: dict[str, Any] = Field(default_factory=dict)
    accuracy: float | None = None
    benchmark: dict[str, Any] = Field(default_factory=dict)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["bundle", "model"]
    created_at: str
    backbone: str
    preprocessing: PreprocessingSpec
    class_names: list[str] = Field(min_length=2)
    model: dict[str, Any] = Field(default_factory=dict)  # input/output tensor names, files of the bundle
    training: dict[str, Any] = Field(default_factory=dict)  # settings the bundle was trained with
    dataset: dict[str, Any] = Field(default_factory=dict)  # fingerprint, counts, split
    metrics: dict[str, Any] = Field(default_factory=dict)  # test-split evaluation summary
    library_versions: dict[str, str] = Field(default_factory=dict)
    # Repository entries only:
    name: str | None = None
    version: int | None = Field(default=None, ge=1)
    artifacts: list[Artifact] = Field(default_factory=list)
    export: dict[str, Any] = Field(default_factory=dict)

    @field_validator("class_names")
    @classmethod
    def _unique_names(cls, names: list[str]) -> list[str]:
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"class names must be unique, repeated: {dupes}")
        if any(not n or "\n" in n for n in names):
            raise ValueError("class names must be non-empty single-line strings")
        return names

    @model_validator(mode="after")
    def _entry_fields(self) -> Manifest:
        if self.kind == "model" and (self.name is None or self.version is None or not self.artifacts):
            raise ValueError("a model repository entry needs name, version and at least one artifact")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def artifact(self, fmt: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.format == fmt), None)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def _format_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"field '{loc}': {err['msg']}")
    return "; ".join(parts)


def parse_manifest(data: dict[str, Any], source: str = MANIFEST_FILE) -> Manifest:
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a JSON object at the top level")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(
            f"{source}: field 'schema_version' is {version!r}; this imgcls reads schema {SCHEMA_VERSION}"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"{source} is invalid: {_format_errors(exc)}") from None


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and validate `folder/manifest.json`; also checks labels.txt agrees with it."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise ManifestError(f"{folder}: not a folder (expected a model bundle or repository entry)")
    if not path.is_file():
        raise ManifestError(f"{path}: missing; is {folder} a model bundle written by imgcls?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not readable JSON ({exc})") from None
    manifest = parse_manifest(data, str(path))
    labels_path = folder / LABELS_FILE
    if labels_path.is_file():
        labels = labels_path.read_text(encoding="utf-8").splitlines()
        if labels != manifest.class_names:
            raise ManifestError(f"{labels_path} does not match field 'class_names' of {path}")
    return manifest


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> None:
    """Write manifest.json and labels.txt (atomically each, so a reader never sees half a file)."""
    folder = Path(folder)
    for name, text in ((MANIFEST_FILE, manifest.to_json()), (LABELS_FILE, "\n".join(manifest.class_names) + "\n")):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / name)
