"""Serving the dashboard: the built files at /, their caching headers and CSP, and the API
routes still answering as before."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess, repo_root

STATIC = repo_root() / "pipeline" / "static"


def asset_paths(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="(/assets/[^"]+)"', html)


async def test_index_is_revalidated_and_locked_down(module_client: httpx.AsyncClient,
                                                    module_server: ServerProcess) -> None:
    response = await module_client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.text == (STATIC / "index.html").read_text()
    csp = response.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == "'self'"
    assert directives["default-src"] == "'self'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    host = f"127.0.0.1:{module_server.port}"
    assert directives["connect-src"] == f"'self' ws://{host} wss://{host}"
    assert directives["frame-ancestors"] == "'none'"
    assert response.headers["x-content-type-options"] == "nosniff"
    # No inline script: every script element loads a file of this server.
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", response.text, re.S)
    assert scripts
    assert all('src="/assets/' in attrs and not body.strip() for attrs, body in scripts)


async def test_hashed_assets_are_immutable(module_client: httpx.AsyncClient) -> None:
    index = await module_client.get("/")
    paths = asset_paths(index.text)
    assert any(p.endswith(".js") for p in paths) and any(p.endswith(".css") for p in paths)
    for path in paths:
        response = await module_client.get(path)
        assert response.status_code == 200, path
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert "content-security-policy" in response.headers
        expected = "text/javascript" if path.endswith(".js") else "text/css"
        assert response.headers["content-type"] == f"{expected}; charset=utf-8"
        assert response.content == (STATIC / path.lstrip("/")).read_bytes()
        assert re.search(r"-[A-Za-z0-9_-]{8}\.(js|css)$", path), "asset names carry a hash"


async def test_conditional_and_head_requests(module_client: httpx.AsyncClient) -> None:
    first = await module_client.get("/")
    etag = first.headers["etag"]
    again = await module_client.get("/", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    head = await module_client.head("/")
    assert head.status_code == 200
    assert head.content == b""
    assert int(head.headers["content-length"]) == len(first.content)


@pytest.mark.parametrize("path", ["/assets/missing-abcdefgh.js", "/assets/%2e%2e/index.html",
                                  "/assets/..%2f..%2fapp.py", "/index.html", "/nothing"])
async def test_unknown_files_are_json_404s(module_client: httpx.AsyncClient, path: str) -> None:
    response = await module_client.get(path)
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


async def test_api_routes_still_win(module_client: httpx.AsyncClient) -> None:
    assert (await module_client.get("/healthz")).json() == {"status": "ok"}
    unauthorized = await module_client.get("/api/signals")
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error"] == "unauthorized"
    assert (await module_client.get("/api/nothing")).json()["error"] == "not_found"
    assert "signalbox_log_head" in (await module_client.get("/metrics")).text
    not_allowed = await module_client.post("/")
    assert not_allowed.status_code == 405
    assert not_allowed.json()["error"] == "method_not_allowed"


def test_the_wheel_ships_the_dashboard(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
         "--wheel-dir", str(tmp_path), str(repo_root())],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(tmp_path.glob("signalbox-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    built = {f"pipeline/static/{p.relative_to(STATIC).as_posix()}"
             for p in STATIC.rglob("*") if p.is_file()}
    assert "pipeline/static/index.html" in built
    assert built <= names
