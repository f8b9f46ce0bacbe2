"""Generate the Python gRPC code for `proto/` into the `imgcls` package (`imgcls/v1/*_pb2*.py`).

Run from anywhere: `python proto/generate.py` (needs grpcio-tools, in the `dev` extra). The generated
files are committed so serving needs no protoc; `tests/test_service_proto.py` checks they are current.
Other languages generate their own stubs from the same `.proto` files (docs/protocols.md).

`proto/compat/` holds wire-compatible copies of the published KServe v2 / Triton and TF Serving definitions
(same file names, packages, message names and field numbers). They are compiled into one descriptor set,
`service/protocols.binpb`, that the server loads into a private descriptor pool (`service/protocols.py`):
generated `_pb2` modules would register `tensorflow.TensorProto` or `inference.ModelInferRequest` in the
process-wide pool and clash with TensorFlow or tritonclient imported into the same process.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PROTOS = ["imgcls/v1/inference.proto"]
COMPAT_ROOT = PROTO_ROOT / "compat"
COMPAT_OUT = Path("service") / "protocols.binpb"
INIT_TEXT = '"""Generated gRPC code for the imgcls.v1 API (regenerate with `python proto/generate.py`)."""\n'


def generate(out: Path) -> list[Path]:
    """Run protoc on PROTOS, writing `imgcls/v1/...` under `out`; returns the files written."""
    from grpc_tools import protoc

    include = str(resources.files("grpc_tools") / "_proto")  # well-known types
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *PROTOS]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")
    written = []
    for proto in PROTOS:
        package_dir = out / Path(proto).parent
        init = package_dir / "__init__.py"
        init.write_text(INIT_TEXT, encoding="utf-8")
        stem = Path(proto).stem
        written += [init, *(package_dir / f"{stem}{suffix}" for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))]
    compat = sorted(p.relative_to(COMPAT_ROOT).as_posix() for p in COMPAT_ROOT.rglob("*.proto"))
    if compat:
        target = out / COMPAT_OUT
        target.parent.mkdir(parents=True, exist_ok=True)
        args = ["protoc", f"-I{COMPAT_ROOT}", f"-I{include}", f"--descriptor_set_out={target}", "--include_imports",
                *compat]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed: {' '.join(args)}")
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
