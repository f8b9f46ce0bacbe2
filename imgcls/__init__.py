"""imgcls: a folder of labelled photos in, a served classifier out.

This package is the small shared core that every stage imports: the backbone registry, the one
preprocessing implementation and the manifest schema. Stages (training, export, service) never import
each other; they talk through the files described by `imgcls.manifest`.
"""

__version__ = "0.1.0"
