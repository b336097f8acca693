"""``/openapi.json`` describes every route, and the server keeps to it under schemathesis."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

from pipeline import dashboard
from pipeline.app import create_app
from pipeline.config import Settings
from tests.support import ADMIN_TOKEN, INGEST_TOKEN, ServerProcess, headers

BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}
SCHEMATHESIS = Path(sys.executable).with_name("st")
# The examples send bad tokens on purpose, and each must be judged on its own: the server
# does not refuse the address after failed authentications (tested in test_security.py).
pytestmark = pytest.mark.server_args("--auth-failures", "0")


CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance")


async def test_the_description_names_every_route_and_its_errors(
        shared_client: httpx.AsyncClient) -> None:
    response = await shared_client.get("/openapi.json")
    assert response.status_code == 200
    description = response.json()
    assert description["openapi"] == "3.1.0"
    served = {(path, method.upper()) for path, item in description["paths"].items()
              for method in item}
    pages = {route.path for route in dashboard.routes if isinstance(route, Route)}
    routes = {(route.path, method) for route in create_app(Settings()).routes
              if isinstance(route, Route) and route.path not in pages
              for method in route.methods or () if method != "HEAD"}
    assert served == routes
    for path, item in description["paths"].items():
        for method, operation in item.items():
            answers = operation["responses"]
            secured = operation.get("security", description["security"]) != []
            if secured:
                assert {"401", "403"} <= set(answers), (method, path)
            if method == "post" and path.startswith(("/api/signals/", "/webhooks")):
                assert "503" in answers, (method, path)
            for status, answer in answers.items():
                if (status.startswith("4") and status != "422") or status == "503":
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, status)
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    assert "{" + parameter["name"] + "}" in path


async def test_schemathesis_finds_no_5xx_and_every_answer_conforms(
        shared_server: ServerProcess, shared_client: httpx.AsyncClient, tmp_path: Path) -> None:
    # Some history, so that lists and timelines have rows to check against the schema.
    accepted = await shared_client.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN))
    await shared_client.post("/api/signals", json={"ticker": "X"}, headers=headers(INGEST_TOKEN))
    signal_id = accepted.json()["signal_id"]
    claimed = await shared_client.post(f"/api/signals/{signal_id}/status", headers=headers(),
                                       json={"status": "processing", "consumer": "bot"})
    assert claimed.status_code == 200
    command = [str(SCHEMATHESIS), "--no-color", "run", shared_server.base_url + "/openapi.json",
               "--header", f"Authorization: Bearer {ADMIN_TOKEN}", "--checks", CHECKS,
               "--mode", "all", "--max-examples", "25", "--seed", "20261126",
               "--workers", "1", "--request-timeout", "20", "--max-failures", "5"]
    result = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True,
                                     timeout=240, cwd=tmp_path)  # its cache goes there
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", report)
    assert counts is not None, report[-3000:]
    assert int(counts[1]) == int(counts[2]) > 300, report[-3000:]
