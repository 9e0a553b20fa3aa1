"""The actions webhook over HTTP: payload validation, the bearer token, dispatch by the action label,
idempotent rollback through a real registry, the cooldown, the actions record and /metrics."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
import uvicorn
from rlops_stack import actions
from rlops_stack.local import WebhookSettings
from rlops_stack.webhook import PayloadError, create_app, parse_payload
from rlops_trainer.registry import Registry

HTTP = urllib3.PoolManager(retries=False, timeout=30)
TOKEN = "s3cret"


def alert(status: str = "firing", **labels: str) -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": "RlopsPolicyRewardBelowBaseline", "severity": "critical", **labels},
        "annotations": {"summary": "reward below baseline"},
        "startsAt": "2025-01-01T00:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus/graph",
        "fingerprint": "abc",
    }


def payload(*alerts: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": "4",
        "groupKey": "{}:{}",
        "status": "firing",
        "receiver": "rlops-actions",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager",
        "alerts": list(alerts),
    }


@pytest.fixture
def registry(tmp_path: Path, trained_policy: Callable[[int], Path], publish: Callable[..., int]) -> Path:
    """Champion 2, previous champion 1."""
    root = tmp_path / "registry"
    publish(root, trained_policy(1), promote=True)
    publish(root, trained_policy(2), promote=True)
    return root


class Hook:
    def __init__(self, url: str, record: Path) -> None:
        self.url, self.record = url, record

    def post(self, body: Any, token: str | None = TOKEN) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        r = HTTP.request("POST", self.url + "/alerts", body=data, headers=headers)
        return r.status, json.loads(r.data)

    def metrics(self) -> str:
        text: str = HTTP.request("GET", self.url + "/metrics").data.decode()
        return text


@pytest.fixture
def hook(tmp_path: Path, registry: Path, request: pytest.FixtureRequest) -> Iterator[Hook]:
    cooldown = getattr(request, "param", 300.0)
    settings = WebhookSettings(registry, tmp_path / "no-server", cooldown_s=cooldown)
    record = tmp_path / "actions.jsonl"
    app = create_app(settings, token=TOKEN, record_to=record)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the webhook did not start"
        assert time.monotonic() < deadline, "the webhook did not start in time"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Hook(f"http://127.0.0.1:{port}", record)
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "must be a JSON object"),
        (json.dumps({"version": "3", "alerts": []}).encode(), "'version' must be '4'"),
        (json.dumps({"version": "4", "alerts": {}}).encode(), "'alerts' must be a list"),
        (
            json.dumps(payload({"status": "firing", "labels": {}})).encode(),
            "alerts[0].labels has no alertname",
        ),
        (json.dumps(payload(dict(alert(), status="gone"))).encode(), "alerts[0].status must be"),
        (json.dumps(payload(dict(alert(), labels={"alertname": 3}))).encode(), "alerts[0].labels must be"),
    ],
)
def test_payload_errors_name_the_field(body: bytes, words: str) -> None:
    with pytest.raises(PayloadError, match=words.replace("[", r"\[").replace("]", r"\]")):
        parse_payload(body)


def test_wrong_token_and_bad_payload_are_refused(hook: Hook) -> None:
    assert hook.post(payload(), token=None)[0] == 401
    assert hook.post(payload(), token="wrong")[0] == 401
    status, body = hook.post(b"{")
    assert status == 400
    assert "not JSON" in body["error"]
    assert body["accepted"]
    assert not hook.record.exists()


def test_rollback_moves_the_champion_once_and_records_it(hook: Hook, registry: Path) -> None:
    reg = Registry(registry)
    status, body = hook.post(payload(alert(action="rollback", policy="cartpole", version="2")))
    assert status == 200
    [result] = body["results"]
    assert (result["action"], result["outcome"]) == ("rollback", "done")
    assert reg.aliases("cartpole")["champion"] == 1
    last = reg.history("cartpole")[-1]
    assert (last["action"], last["who"], last["to"]) == ("rollback", "alertmanager", 1)
    assert "RlopsPolicyRewardBelowBaseline" in last["reason"]
    # Alertmanager repeats the notification while the alert fires: the cooldown holds it back.
    status, body = hook.post(payload(alert(action="rollback", policy="cartpole", version="2")))
    assert body["results"][0]["outcome"] == "skipped"
    assert "cooldown" in body["results"][0]["message"]
    assert reg.aliases("cartpole")["champion"] == 1
    entries = actions.read_record(hook.record)
    assert [e["outcome"] for e in entries] == ["done", "skipped"]
    assert entries[0]["alert"] == "RlopsPolicyRewardBelowBaseline"
    assert entries[0]["labels"]["version"] == "2"
    assert entries[0]["details"] == {"previous": 2, "champion": 1, "steps": [1]}
    text = hook.metrics()
    assert 'rlops_alert_actions_total{action="rollback",outcome="done"} 1.0' in text
    assert 'rlops_alert_actions_total{action="rollback",outcome="skipped"} 1.0' in text


@pytest.mark.parametrize("hook", [0.0], indirect=True)
def test_rollback_is_idempotent_without_a_cooldown(hook: Hook, registry: Path) -> None:
    for _ in range(3):
        hook.post(payload(alert(action="rollback", policy="cartpole", version="2")))
    assert Registry(registry).aliases("cartpole")["champion"] == 1
    entries = actions.read_record(hook.record)
    assert [e["outcome"] for e in entries] == ["done", "skipped", "skipped"]
    assert "version 2 of cartpole is not the champion (the champion is 1)" in entries[1]["message"]


def test_only_firing_alerts_with_an_action_are_acted_on(hook: Hook, registry: Path) -> None:
    status, body = hook.post(
        payload(
            alert("resolved", action="rollback", policy="cartpole", version="2"),
            alert(policy="cartpole", version="2"),
            alert(action="reboot", policy="cartpole", version="2"),
            alert(action="scale_up", policy="cartpole"),
        )
    )
    assert status == 200
    assert [(r["action"], r["outcome"]) for r in body["results"]] == [
        ("reboot", "failed"),
        ("scale_up", "failed"),
    ]
    assert "needs labels policy and version" in body["results"][1]["message"]
    assert Registry(registry).aliases("cartpole")["champion"] == 2


def test_a_management_url_that_does_not_answer_is_named(tmp_path: Path, registry: Path) -> None:
    from prometheus_client import Counter, generate_latest
    from rlops_stack.webhook import Dispatcher, WorkersCollector

    settings = WebhookSettings(registry, tmp_path, management_url="http://127.0.0.1:9")
    counter = Counter("c", "c", ["action", "outcome"], registry=None)
    result = Dispatcher(settings, None, counter).handle(
        parse_payload(json.dumps(payload(alert(action="scale_up", policy="cartpole", version="2"))).encode())[
            0
        ],
        time.time(),
    )
    assert result is not None
    assert result.outcome == "failed"
    assert "management API at http://127.0.0.1:9 cannot be reached" in result.message
    text = generate_latest(WorkersCollector(settings)).decode()  # type: ignore[arg-type]
    assert "rlops_serving_workers" in text
    assert "rlops_serving_workers{" not in text


def test_scale_up_without_a_server_fails_with_the_reason(hook: Hook) -> None:
    status, body = hook.post(payload(alert(action="scale_up", policy="cartpole", version="2")))
    assert status == 200
    [result] = body["results"]
    assert result["outcome"] == "failed"
    assert "no server is running from" in result["message"]
    assert 'rlops_alert_actions_total{action="scale_up",outcome="failed"} 1.0' in hook.metrics()
