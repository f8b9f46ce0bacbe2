"""One serving process of `imgcls serve --workers N`: `python -m imgcls.service.worker FOLDER INDEX`.

The supervisor (supervisor.py) starts it with PROMETHEUS_MULTIPROC_DIR already set, so its metrics go to the
shared folder from the first import of prometheus-client. It is a whole InferenceServer: it binds the shared
ports with SO_REUSEPORT (the kernel spreads new connections over the workers), loads the models itself, polls
the repository itself (hot reload), and drains on SIGTERM. It exits by itself if the supervisor dies, so no
worker outlives a killed pod's main process.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

from imgcls import logs
from imgcls.errors import ImgclsError
from imgcls.service.cluster import WorkerLink
from imgcls.service.server import InferenceServer, ServeConfig

log = logging.getLogger(__name__)


def _watch_parent(server: InferenceServer, parent: int) -> None:
    """Drain when the supervisor is gone (SIGKILL, OOM kill): the worker is re-parented, so getppid changes."""
    while not server._stopped.wait(0.5):
        if os.getppid() != parent:
            log.warning("the supervisor (pid %d) is gone; draining", parent)
            server.request_stop()
            return


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder, index = Path(args[0]), int(args[1])
    logs.from_environment(worker=str(index + 1))  # the level and format `imgcls serve` was given
    config = ServeConfig.from_json((folder / "config.json").read_text())
    link = WorkerLink(folder, index)
    server = InferenceServer(config, link=link)
    threading.Thread(target=_watch_parent, args=(server, os.getppid()), name="parent-watch", daemon=True).start()
    try:
        return server.serve_forever()
    except ImgclsError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
