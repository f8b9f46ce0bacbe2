"""imgcls: a folder of labelled photos in, a served classifier out.

This package is the small shared core that every stage imports: the backbone registry, the one
preprocessing implementation and the manifest schema. Stages (training, export, service, client) never
import each other; they talk through the files described by `imgcls.manifest`.

It is also the Python API (docs/python-api.md):

    import imgcls

    bundle = imgcls.train(data="photos/", out="runs/mine")         # what `imgcls train` does
    clf = imgcls.Classifier.load("runs/mine")                       # a bundle or a repository version
    labels = clf.predict(["a.jpg", pil_image, numpy_array], top_k=3)

The names load on first use (module `__getattr__`), so `import imgcls` stays light and loads no stage and
no TensorFlow; `imgcls.train` imports the training stage only when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from imgcls.api import Bundle, train
    from imgcls.classifier import Classifier, Label
    from imgcls.errors import ImgclsError

__all__ = ["Bundle", "Classifier", "ImgclsError", "Label", "__version__", "train"]

_LAZY = {"Bundle": "imgcls.api", "train": "imgcls.api", "Classifier": "imgcls.classifier",
         "Label": "imgcls.classifier", "ImgclsError": "imgcls.errors"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imgcls' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
