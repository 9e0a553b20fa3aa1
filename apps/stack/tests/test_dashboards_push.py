"""``rlops dashboards push`` against a small fake of Grafana's HTTP API (a unit test: no Grafana here).

The fake answers the four calls the push makes (list folders, create a folder, save a dashboard) the way
Grafana's API documents them and records every request, so the tests check the exact payloads.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from rlops_stack import dashboards
from rlops_stack import grafana as grafana_push
from rlops_stack.commands.dashboards import app
from rlops_stack.grafana import GrafanaError, push, upsert_payload
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[3]
TOKEN = "glsa_test-token"


@dataclass
class Call:
    method: str
    path: str
    authorization: str | None
    body: Any


@dataclass
class FakeGrafana:
    """Grafana's folder and dashboard API, in memory; ``status`` forces every answer's status code."""

    prefix: str = ""
    folders: list[dict[str, Any]] = field(default_factory=list)
    saved: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    status: int | None = None
    accepted: tuple[str, ...] = (f"Bearer {TOKEN}",)

    def answer(self, method: str, path: str, auth: str | None, body: Any) -> tuple[int, Any]:
        self.calls.append(Call(method, path, auth, body))
        if auth not in self.accepted:
            return 401, {"message": "invalid API key"}
        if self.status is not None:
            return self.status, {"message": "forced by the test"}
        api = f"{self.prefix}/api"
        if (method, path) == ("GET", f"{api}/folders"):
            return 200, self.folders
        if (method, path) == ("POST", f"{api}/folders"):
            folder = {"id": len(self.folders) + 1, "uid": body["uid"], "title": body["title"]}
            self.folders.append(folder)
            return 200, folder
        if (method, path) == ("POST", f"{api}/dashboards/db"):
            uid = body["dashboard"]["uid"]
            version = self.saved.get(uid, {}).get("version", 0) + 1
            self.saved[uid] = {"body": body, "version": version}
            slug = body["dashboard"]["title"].lower().replace(" / ", "-").replace(" ", "-")
            return 200, {
                "id": 7,
                "uid": uid,
                "url": f"{self.prefix}/d/{uid}/{slug}",
                "status": "success",
                "version": version,
                "slug": slug,
            }
        return 404, {"message": "not found"}


@pytest.fixture
def grafana() -> Iterator[tuple[FakeGrafana, str]]:
    fake = FakeGrafana()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            status, body = fake.answer(
                self.command, self.path, self.headers.get("Authorization"), json.loads(raw) if raw else None
            )
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def boards() -> list[dict[str, Any]]:
    return dashboards.load_built(REPO / "dashboards" / "build")


def test_upsert_payload_replaces_by_uid_without_an_id() -> None:
    board = {"id": 12, "uid": "rlops-x", "title": "X", "version": 3, "panels": []}
    assert upsert_payload(board, "rlops", "why") == {
        "dashboard": {"uid": "rlops-x", "title": "X", "panels": []},
        "overwrite": True,
        "message": "why",
        "folderUid": "rlops",
    }
    assert "folderUid" not in upsert_payload(board, None, "why")
    assert board["id"] == 12  # the caller's dict is left alone


def test_push_creates_the_folder_then_saves_every_dashboard(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    results = push(boards(), url, TOKEN, folder="rlops", message="deploy 42")
    assert [(c.method, c.path) for c in fake.calls] == [
        ("GET", "/api/folders"),
        ("POST", "/api/folders"),
        *[("POST", "/api/dashboards/db")] * 4,
    ]
    assert all(c.authorization == f"Bearer {TOKEN}" for c in fake.calls)
    assert fake.calls[1].body == {"title": "rlops", "uid": "rlops"}
    for call, board in zip(fake.calls[2:], boards(), strict=True):
        assert call.body == {
            "dashboard": board,
            "overwrite": True,
            "message": "deploy 42",
            "folderUid": "rlops",
        }
    assert [(r.uid, r.version, r.status) for r in results] == [(b["uid"], 1, "success") for b in boards()]
    assert results[0].url == f"{url}/d/{boards()[0]['uid']}/rlops-policy-health"


def test_pushing_again_updates_in_the_existing_folder(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    fake.folders.append({"id": 3, "uid": "abc123", "title": "Team RL"})
    push(boards(), url, TOKEN, folder="Team RL")
    results = push(boards(), url, TOKEN, folder="Team RL")
    assert [c.path for c in fake.calls].count("/api/folders") == 2  # looked up twice, never created
    assert all(c.body["folderUid"] == "abc123" for c in fake.calls if c.path == "/api/dashboards/db")
    assert {r.version for r in results} == {2}


def test_no_folder_means_the_general_folder(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    push(boards()[:1], url, TOKEN, folder=None)
    assert [c.path for c in fake.calls] == ["/api/dashboards/db"]
    assert "folderUid" not in fake.calls[0].body


def test_a_grafana_under_a_sub_path_with_basic_auth(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    fake.prefix = "/grafana"
    fake.accepted = ("Basic " + base64.b64encode(b"admin:s3cret").decode(),)
    host = url.removeprefix("http://")
    push(boards()[:1], f"http://admin:s3cret@{host}/grafana", None, folder=None)
    assert [c.path for c in fake.calls] == ["/grafana/api/dashboards/db"]


def test_a_refused_token_says_so(grafana: tuple[FakeGrafana, str]) -> None:
    _, url = grafana
    with pytest.raises(
        GrafanaError, match=r"refused the credentials \(401\) while finding or creating the folder"
    ):
        push(boards(), url, "wrong", folder="rlops")


def test_a_forbidden_token_says_which_permission(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    fake.status = 403
    with pytest.raises(
        GrafanaError, match=r"may not do this \(403\) while saving dashboard 'rlops-policy-health'"
    ):
        push(boards(), url, TOKEN, folder=None)


def test_a_server_error_names_the_dashboard(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    fake.status = 500
    with pytest.raises(GrafanaError, match=r"saving dashboard 'rlops-policy-health' .*forced by the test"):
        push(boards(), url, TOKEN, folder=None)


def test_an_unreachable_grafana_says_so() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(GrafanaError, match=rf"Grafana at http://127.0.0.1:{port} cannot be reached"):
        push(boards(), f"http://127.0.0.1:{port}", TOKEN, timeout=2)


@pytest.mark.parametrize(
    ("url", "token", "message"),
    [
        ("grafana.example.com", TOKEN, "expected http"),
        ("ftp://grafana.example.com", TOKEN, "expected http"),
        ("http://grafana.example.com:99999", TOKEN, "out of range"),
        ("http://grafana.example.com", None, "no credentials"),
    ],
)
def test_bad_urls_and_missing_credentials(url: str, token: str | None, message: str) -> None:
    with pytest.raises(GrafanaError, match=message):
        grafana_push.client(url, token)


def test_push_command_prints_where_the_dashboards_are(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    result = CliRunner().invoke(
        app, ["push", "--url", url, "--token", TOKEN, "--uid", "rlops-slo", "--dir", str(REPO / "dashboards")]
    )
    assert result.exit_code == 0, result.output
    assert [c.body["dashboard"]["uid"] for c in fake.calls if c.path == "/api/dashboards/db"] == ["rlops-slo"]
    assert "rlops-slo" in result.output
    assert f"{url}/d/rlops-slo/" in result.output


def test_push_command_errors(grafana: tuple[FakeGrafana, str], monkeypatch: pytest.MonkeyPatch) -> None:
    _, url = grafana
    runner = CliRunner()
    result = runner.invoke(app, ["push", "--url", url, "--token", "nope", "--dir", str(REPO / "dashboards")])
    assert result.exit_code == 2
    assert "refused the credentials (401)" in result.output
    result = runner.invoke(app, ["push", "--url", url, "--token", TOKEN, "--uid", "rlops-nope"])
    assert result.exit_code == 2
    assert "--uid rlops-nope: no such dashboard" in result.output
    monkeypatch.setenv("RLOPS_GRAFANA_TOKEN", TOKEN)
    result = runner.invoke(app, ["push", "--url", url, "--folder", "", "--uid", "rlops-slo"])
    assert result.exit_code == 0, result.output
