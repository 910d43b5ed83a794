"""The playground page: static files shipped inside the package (serve/static/), served
at ``/`` and ``/playground/<file>`` by ``glassbox serve --playground``.

The page and its assets are open without the API key (a browser cannot send a bearer
header when it opens a URL); the page asks for the key, keeps it in memory only, and
sends it on every API call. A Content-Security-Policy allows the page to load and
connect to this origin only: no CDN, no third-party call, nothing inline.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from glassbox.serve.errors import APIError

STATIC = Path(__file__).parent / "static"
PREFIX = "/playground/"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}  # fmt: skip
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'none'"
)
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}  # fmt: skip


def asset_files() -> dict[str, Path]:
    """URL path -> file, for every shipped asset (index.html is also ``/``)."""
    files = {PREFIX + p.relative_to(STATIC).as_posix(): p
             for p in sorted(STATIC.rglob("*")) if p.is_file() and p.suffix in TYPES}  # fmt: skip
    files["/"] = STATIC / "index.html"
    return files


def page_router() -> tuple[APIRouter, frozenset[str]]:
    """The router serving the assets, and their exact paths (open without a key)."""
    files = asset_files()
    router = APIRouter()

    def serve(path: str) -> Response:
        file = files.get(path)
        if file is None:
            raise APIError(404, f"No playground file at {path}.", code="not_found")
        return Response(file.read_bytes(), media_type=TYPES[file.suffix], headers=HEADERS)

    @router.get("/", include_in_schema=False)
    async def index() -> Response:
        return serve("/")

    @router.get(PREFIX + "{name:path}", include_in_schema=False)
    async def asset(name: str) -> Response:
        return serve(PREFIX + name)

    return router, frozenset(files)
