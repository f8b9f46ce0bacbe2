"""The web page at `/`, the offline API docs at `/docs`, their static files, and `/metrics` on the HTTP port.

Plain HTML, CSS and JavaScript shipped in the package (`static/`): no build step, no CDN, nothing fetched
from elsewhere, so the page and the docs work on an air-gapped cluster. `/metrics` here is the same registry
the metrics port serves (the ServiceMonitor keeps scraping that one); it is here so the page can link to it.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from imgcls.service.http.app import STATIC, HttpServer

TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".png": "image/png",
         ".svg": "image/svg+xml"}
PAGES = {"/": "index.html", "/docs": "docs.html"}


def _files() -> dict[str, tuple[bytes, str]]:
    """Every static file, read once (a few KB): name -> (content, media type)."""
    files = {}
    for entry in STATIC.iterdir():
        suffix = entry.name[entry.name.rfind("."):]
        if entry.is_file() and suffix in TYPES:
            files[entry.name] = (entry.read_bytes(), TYPES[suffix])
    return files


def add_routes(router: web.UrlDispatcher, http: HttpServer) -> None:
    files = _files()

    def serve(name: str):
        async def handler(request: web.Request) -> web.Response:
            body, media = files[name]
            return web.Response(body=body, content_type=media, charset="utf-8" if media != "image/png" else None,
                                headers={"Cache-Control": "no-cache"})
        return handler

    for path, name in PAGES.items():
        router.add_get(path, serve(name), allow_head=False)
    for name in files:
        router.add_get(f"/static/{name}", serve(name), allow_head=False)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=http.core.metrics.exposition(),  # with --workers: every worker's sum
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
    router.add_get("/metrics", metrics, allow_head=False)
