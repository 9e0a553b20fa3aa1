from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from rlops_server.client import (
    BAD_RESPONSE,
    CONNECTION,
    REJECTED,
    SERVER_ERROR,
    TIMEOUT,
    UNAVAILABLE,
    Decision,
    PolicyClient,
)


class FakeServer(ThreadingHTTPServer):
    """Answers POSTs following a script of behaviours (the last one repeats) and records requests."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script: list[str] = ["ok"]
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def next_behaviour(self) -> str:
        with self.lock:
            return self.script.pop(0) if len(self.script) > 1 else self.script[0]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body in one write: two small writes meet Nagle and delayed ACKs (40 ms per request).
    wbufsize = 1 << 16  # keep-alive, so connection reuse can be observed
    server: FakeServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append(
                {
                    "path": self.path,
                    "body": body,
                    "port": self.client_address[1],
                    "auth": self.headers["Authorization"],
                }
            )
        behaviour = self.server.next_behaviour()
        if behaviour.startswith("slow"):
            time.sleep(float(behaviour.split(":")[1]))
            behaviour = "ok"
        if behaviour == "hangup":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        status, payload = 200, b""
        if behaviour == "ok":
            payload = json.dumps(answer(body)).encode()
        elif behaviour == "server-fallback":
            payload = json.dumps({**answer(body), "fallback": True, "reason": "non_finite"}).encode()
        elif behaviour.startswith("box:"):  # a Box policy's answer, with its action as given in the script
            raw = json.loads(behaviour[4:])
            payload = json.dumps({**answer(body), "propensity": None, **raw}).encode()
        elif behaviour == "garbage":
            payload = b"<html>oops"
        elif behaviour == "bad-token":  # TorchServe 0.12's answer to a wrong or stale inference key
            status, payload = 400, json.dumps(TORCHSERVE_BAD_TOKEN).encode()
        else:
            status, payload = int(behaviour), json.dumps({"code": int(behaviour), "message": "nope"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


TORCHSERVE_BAD_TOKEN = {
    "code": 400,
    "type": "InvalidKeyException",
    "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly",
}


def answer(body: dict[str, Any]) -> Any:
    """A handler-like answer: action 1 when the first feature is positive."""

    def one(obs: list[float], decision_id: str) -> dict[str, Any]:
        return {
            "action": int(obs[0] > 0),
            "propensity": 0.8,
            "policy": "cartpole",
            "version": 3,
            "decision_id": decision_id,
        }

    if "observations" in body:
        return {
            "decisions": [one(o, d) for o, d in zip(body["observations"], body["decision_ids"], strict=True)]
        }
    return one(body["observation"], body["decision_id"])


@pytest.fixture
def server() -> Iterator[FakeServer]:
    srv = FakeServer()
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_good_answers_are_parsed_over_one_reused_connection(server: FakeServer) -> None:
    with PolicyClient(server.url, "cartpole", version=3, token="key") as client:
        d1 = client.act(
            np.array([0.5, 0.0, 0.1, 0.2], dtype=np.float32), decision_id="a", episode_id="e", step=0
        )
        d2 = client.act([-0.5, 0.0, 0.1, 0.2], episode_id="e", step=1, deterministic=True)
    assert d1 == Decision(1, 0.8, 3, "a", False, None, d1.latency_s)
    assert (d2.action, d2.fallback, len(d2.decision_id)) == (0, False, 32)
    first, second = server.requests
    assert first["path"] == "/predictions/cartpole/3"
    assert first["auth"] == "Bearer key"
    assert first["body"] == {
        "observation": [0.5, 0.0, 0.10000000149011612, 0.20000000298023224],
        "decision_id": "a",
        "episode_id": "e",
        "step": 0,
    }
    assert second["body"]["deterministic"] is True
    assert second["body"]["decision_id"] == d2.decision_id
    assert first["port"] == second["port"], "the second call must reuse the pooled connection"
    assert client.stats() == {"requests": 2, "retries": 0, "fallbacks": {}}


def test_timeout_falls_back_at_the_deadline_without_retrying(server: FakeServer) -> None:
    server.script = ["slow:0.5"]
    client = PolicyClient(server.url, "cartpole", timeout=0.1, retries=3, fallback_action=1)
    t0 = time.perf_counter()
    d = client.act([0.1, 0.2, 0.3, 0.4], decision_id="late")
    elapsed = time.perf_counter() - t0
    assert (d.action, d.fallback, d.reason, d.decision_id, d.version) == (1, True, TIMEOUT, "late", None)
    assert 0.09 <= elapsed < 0.3
    assert len(server.requests) == 1, "a POST that may have been processed must not be sent again"
    assert client.fallbacks == {TIMEOUT: 1}


def test_503_is_retried_with_backoff_then_falls_back(server: FakeServer) -> None:
    server.script = ["503"]
    client = PolicyClient(server.url, "cartpole", timeout=1.0, retries=2, backoff=0.01)
    d = client.act([0.1, 0.2, 0.3, 0.4], decision_id="busy")
    assert (d.fallback, d.reason) == (True, UNAVAILABLE)
    assert len(server.requests) == 3
    assert {r["body"]["decision_id"] for r in server.requests} == {"busy"}
    assert d.latency_s >= 0.03  # 10 ms + 20 ms of backoff
    assert client.stats() == {"requests": 3, "retries": 2, "fallbacks": {UNAVAILABLE: 1}}


def test_503_then_success(server: FakeServer) -> None:
    server.script = ["503", "ok"]
    d = PolicyClient(server.url, "cartpole", timeout=1.0).act([1.0, 0, 0, 0])
    assert (d.action, d.fallback) == (1, False)
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("500", SERVER_ERROR),
        ("507", SERVER_ERROR),
        ("400", REJECTED),
        ("garbage", BAD_RESPONSE),
        ("hangup", CONNECTION),
    ],
)
def test_errors_after_sending_fall_back_without_retry(
    server: FakeServer, behaviour: str, reason: str
) -> None:
    server.script = [behaviour]
    client = PolicyClient(server.url, "cartpole", timeout=1.0, retries=3, fallback_action=lambda obs: 7)
    d = client.act([0.1, 0.2, 0.3, 0.4])
    assert (d.action, d.fallback, d.reason, d.propensity) == (7, True, reason, 1.0)
    assert len(server.requests) == 1
    assert client.fallbacks == {reason: 1}


def test_connection_refused_is_retried_then_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    client = PolicyClient(f"http://127.0.0.1:{free_port()}", "cartpole", retries=2, backoff=0.001)
    with caplog.at_level("WARNING", logger="rlops_server.client"):
        decisions = [client.act([0.0] * 4) for _ in range(3)]
    assert all(d.fallback and d.reason == CONNECTION and d.action == 0 for d in decisions)
    assert client.stats() == {"requests": 9, "retries": 6, "fallbacks": {CONNECTION: 3}}
    # Logged, but once a second per reason however many calls fail.
    assert len([r for r in caplog.records if "fallback action" in r.message]) == 1


def test_server_side_fallback_is_flagged(server: FakeServer) -> None:
    server.script = ["server-fallback"]
    client = PolicyClient(server.url, "cartpole")
    d = client.act([1.0, 0, 0, 0], decision_id="x")
    assert (d.action, d.fallback, d.reason, d.version) == (1, True, "server:non_finite", 3)
    assert client.fallbacks == {"server:non_finite": 1}


def test_batch_calls(server: FakeServer) -> None:
    client = PolicyClient(server.url, "cartpole", timeout=1.0)
    obs = np.array([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [2.0, 0, 0, 0]])
    ds = client.act_batch(obs, decision_ids=["a", "b", "c"], episode_ids=["e", "e", "f"], steps=[0, 1, 0])
    assert [(d.action, d.decision_id, d.fallback) for d in ds] == [
        (1, "a", False),
        (0, "b", False),
        (1, "c", False),
    ]
    assert server.requests[0]["body"]["steps"] == [0, 1, 0]
    server.script = ["500"]
    ds = client.act_batch(obs, decision_ids=["a", "b", "c"])
    assert [(d.action, d.decision_id, d.reason) for d in ds] == [
        (0, "a", SERVER_ERROR),
        (0, "b", SERVER_ERROR),
        (0, "c", SERVER_ERROR),
    ]
    with pytest.raises(ValueError, match="decision_ids has 1 entries for 3 observations"):
        client.act_batch(obs, decision_ids=["a"])


def test_concurrent_callers_share_the_client(server: FakeServer) -> None:
    client = PolicyClient(server.url, "cartpole", timeout=2.0, pool_size=4)
    results: list[Decision] = []
    lock = threading.Lock()

    def run() -> None:
        for i in range(10):
            d = client.act([float(i % 2) - 0.5, 0, 0, 0])
            with lock:
                results.append(d)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40
    assert not any(d.fallback for d in results)
    assert client.stats()["requests"] == 40
    assert len({r["port"] for r in server.requests}) <= 4


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="base_url"):
        PolicyClient("localhost:8080", "m")
    with pytest.raises(ValueError, match="timeout"):
        PolicyClient("http://localhost:8080", "m", timeout=0)


@pytest.mark.parametrize("refusal", ["bad-token", "401"])
def test_a_token_source_follows_a_restart_with_new_keys(server: FakeServer, refusal: str) -> None:
    keys = ["old"]
    server.script = [refusal, "ok"]
    client = PolicyClient(server.url, "cartpole", token=lambda: keys[-1], timeout=2.0)
    keys.append("new")  # the server restarted and wrote new keys
    d = client.act([0.5, 0.0])
    assert not d.fallback
    assert [r["auth"] for r in server.requests] == ["Bearer old", "Bearer new"]
    assert client.retried == 1


@pytest.mark.parametrize("refusal", ["bad-token", "401"])
def test_a_refused_token_without_new_keys_falls_back_without_retry(server: FakeServer, refusal: str) -> None:
    server.script = [refusal]
    fixed = PolicyClient(server.url, "cartpole", token="old", timeout=2.0)
    assert fixed.act([0.5]).fallback
    unchanged = PolicyClient(server.url, "cartpole", token=lambda: "old", timeout=2.0)
    assert unchanged.act([0.5]).fallback
    assert len(server.requests) == 2
    assert fixed.fallbacks["rejected"] == unchanged.fallbacks["rejected"] == 1


def test_box_answers_are_parsed_and_bad_ones_fall_back(server: FakeServer) -> None:
    server.script = [
        'box:{"action": [0.5, -1.25], "log_density": -1.5}',
        'box:{"action": [0.5, 2], "log_density": null}',
        'box:{"action": [0.5, "x"], "log_density": -1.0}',
        'box:{"action": [], "log_density": -1.0}',
        'box:{"action": [0.5], "log_density": "high"}',
    ]
    client = PolicyClient(server.url, "reacher", fallback_action=0)
    explored, deterministic, *bad = [client.act([0.1, 0.2, 0.3, 0.4]) for _ in range(5)]
    assert (explored.action, explored.log_density, explored.fallback, explored.version) == (
        [0.5, -1.25],
        -1.5,
        False,
        3,
    )
    assert (deterministic.action, deterministic.log_density) == ([0.5, 2.0], None)
    assert all(d.fallback and d.reason == BAD_RESPONSE and d.action == 0 for d in bad)
    assert client.fallbacks == {BAD_RESPONSE: 3}
