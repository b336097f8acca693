"""The dashboard: the built web app in pipeline/static, served at ``/``.

``index.html`` is revalidated on every load (``no-cache``), so a new release shows at once;
the files under ``/assets/`` carry a hash of their content in their names, so they never
change and are cached for a year. Every answer carries a Content-Security-Policy that allows
scripts, styles and connections (HTTP and WebSocket) to this server only, and no inline script.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pipeline.errors import NotFound

STATIC = Path(__file__).resolve().parent / "static"
ASSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"

mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/css", ".css")


def content_security_policy(host: str | None) -> str:
    """'self' covers ws: and wss: on the same host in current browsers; older ones need them
    spelled out, so the page's own host is named for both (when it is a plain host name)."""
    connect = "'self'"
    if host and HOST.match(host):
        connect += f" ws://{host} wss://{host}"
    return "; ".join((
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        f"connect-src {connect}",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ))


_loaded: dict[Path, tuple[tuple[int, int], bytes, str]] = {}


def _load(path: Path) -> tuple[bytes, str]:
    """The file and its ETag, read once per version of the file (a few small files)."""
    stat = path.stat()
    version = (stat.st_mtime_ns, stat.st_size)
    cached = _loaded.get(path)
    if cached is None or cached[0] != version:
        body = path.read_bytes()
        cached = (version, body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
        _loaded[path] = cached
    return cached[1], cached[2]


def _file_response(request: Request, path: Path, cache_control: str) -> Response:
    body, etag = _load(path)
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if media_type.startswith("text/"):
        media_type += "; charset=utf-8"
    headers = {
        "Cache-Control": cache_control,
        "ETag": etag,
        "Content-Security-Policy": content_security_policy(request.headers.get("host")),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
    }
    if etag in {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(body))
        return Response(status_code=200, headers=headers, media_type=media_type)
    return Response(body, headers=headers, media_type=media_type)


async def index(request: Request) -> Response:
    page = STATIC / "index.html"
    if not page.is_file():
        raise NotFound("the dashboard is not built: run `make web` in a clone of the project")
    return _file_response(request, page, REVALIDATE)


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    path = STATIC / "assets" / name
    if not ASSET_NAME.match(name) or not path.is_file():
        raise NotFound(f"no such file: /assets/{name}")
    return _file_response(request, path, IMMUTABLE)


routes = [
    Route("/", index, methods=["GET", "HEAD"]),
    Route("/assets/{name:path}", asset, methods=["GET", "HEAD"]),
]
