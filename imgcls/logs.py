"""Log output for every `imgcls` command: text for people, JSON lines for log pipelines (`--log-format json`).

JSON: one object per line with `time` (ISO 8601, UTC), `level`, `logger`, `message`, the serving worker when
there is one, the exception text when there is one, and the structured fields a log call passed as
`extra={"fields": {...}}` (the access log's method, model, code, latency, trace id ...) merged in, so a
pipeline can filter on them without parsing the message.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: str | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if self.worker:
            out["worker"] = int(self.worker)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _OwnHandler(logging.StreamHandler):
    """The handler `configure` installs, so a second call replaces it and nothing else."""


def configure(level: str = "INFO", fmt: str = "text", worker: str | None = None) -> None:
    """Set up the root logger, as logging.basicConfig does: nothing changes when logging is already set up by
    someone else (an application embedding imgcls.cli.main, pytest's capture), else a handler on stderr in
    the chosen format. `worker` = the serving worker's number (1-based)."""
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: choose {' or '.join(FORMATS)}")
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _OwnHandler)]
    if len(ours) != len(root.handlers):
        return
    for old in ours:
        root.removeHandler(old)
    handler = _OwnHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        where = f" worker {worker}" if worker else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())


def from_environment(worker: str | None = None) -> None:
    """What a process started by imgcls (a serving worker) uses: IMGCLS_LOG_LEVEL and IMGCLS_LOG_FORMAT, which
    the command line sets for its children."""
    configure(os.environ.get("IMGCLS_LOG_LEVEL", "INFO"), os.environ.get("IMGCLS_LOG_FORMAT", "text"), worker)
