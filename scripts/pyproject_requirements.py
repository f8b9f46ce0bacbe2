#!/usr/bin/env python3
"""Print the project's requirements from pyproject.toml, one per line: the base dependencies plus the
given extras (`imgcls[train]` inside an extra is expanded). Standard library only (Python 3.11+).

The Dockerfile installs these before it copies the source, so a code change does not invalidate the
cached dependency layer:  python3 scripts/pyproject_requirements.py train export > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    name = project["name"]
    optional = project.get("optional-dependencies", {})
    self_ref = re.compile(rf"^{re.escape(name)}\s*\[([^\]]+)\]\s*$")
    out: list[str] = list(project.get("dependencies", []))
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"pyproject_requirements: unknown extra {extra!r} (have: {', '.join(optional)})")
        seen.add(extra)
        for req in optional[extra]:
            match = self_ref.match(req)
            if match:
                todo.extend(e.strip() for e in match.group(1).split(","))
            elif req not in out:
                out.append(req)
    return out


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    extras = [e for arg in argv for e in arg.split(",") if e]
    print("\n".join(requirements(root / "pyproject.toml", extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
