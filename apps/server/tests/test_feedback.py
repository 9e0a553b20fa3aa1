from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import urllib3
from rlops_server.decision_log import complete_files
from rlops_server.feedback import (
    MAX_REWARDS_PER_REQUEST,
    REWARD_FIELDS,
    RewardsRejected,
    parse_rewards,
    serve_in_thread,
)

HTTP = urllib3.PoolManager(retries=False, timeout=10)


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = HTTP.request("POST", url + "/rewards", body=data, headers=headers or {})
    return r.status, json.loads(r.data)


def reward(i: int, **extra: Any) -> dict[str, Any]:
    return {"decision_id": f"d-{i}", "reward": 1.0, **extra}


def read_rewards(directory: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in complete_files(directory / "rewards"):
        assert f.name.startswith("part-")
        assert f.parent.name.startswith("date=")
        out.extend(json.loads(line) for line in f.read_text().splitlines())
    return out


def metric(text: str, name: str, **labels: str) -> float:
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == want:
            return float(value)
    raise AssertionError(f"{want} not in /metrics:\n{text}")


def test_batch_and_single_rewards_are_written_and_counted(tmp_path: Path) -> None:
    with serve_in_thread(tmp_path) as (url, _):
        batch = [
            reward(0, policy="cartpole", version=3),
            reward(1, reward=-0.5, policy="cartpole", version=3),
            reward(2, terminated=True, next_observation=[0.1, -0.2, 0.0, 1], policy="cartpole", version=4),
        ]
        t0 = time.time()
        status, body = post(url, {"rewards": batch})
        assert (status, body) == (202, {"accepted": 3})
        status, body = post(url, {"decision_id": "solo", "reward": 2})
        assert (status, body) == (202, {"accepted": 1})
        text = HTTP.request("GET", url + "/metrics").data.decode()
        health = json.loads(HTTP.request("GET", url + "/healthz").data)
    assert health["status"] == "ok"
    got = read_rewards(tmp_path)
    assert [tuple(r) for r in got] == [REWARD_FIELDS] * 4
    assert [r["decision_id"] for r in got] == ["d-0", "d-1", "d-2", "solo"]
    assert got[2]["next_observation"] == [0.1, -0.2, 0.0, 1.0]
    assert (got[2]["terminated"], got[2]["truncated"]) == (True, False)
    assert got[3] == {
        "decision_id": "solo",
        "reward": 2.0,
        "terminated": False,
        "truncated": False,
        "next_observation": None,
        "time": got[3]["time"],
        "policy": None,
        "version": None,
    }
    assert all(t0 - 1 <= r["time"] <= time.time() for r in got)
    assert metric(text, "rlops_rewards_received_total", policy="cartpole", version="3") == 2
    assert metric(text, "rlops_rewards_received_total", policy="cartpole", version="4") == 1
    assert metric(text, "rlops_rewards_received_total", policy="unknown", version="unknown") == 1
    assert metric(text, "rlops_reward_positive_sum_total", policy="cartpole", version="3") == 1.0
    assert metric(text, "rlops_reward_negative_sum_total", policy="cartpole", version="3") == 0.5
    assert (
        metric(text, "rlops_reward_log_written_total") + metric(text, "rlops_reward_log_pending_records") == 4
    )


@pytest.mark.parametrize(
    ("item", "field", "words"),
    [
        ({"reward": 1.0}, "decision_id", "missing"),
        ({"decision_id": "", "reward": 1.0}, "decision_id", "''"),
        ({"decision_id": 7, "reward": 1.0}, "decision_id", "7"),
        ({"decision_id": "a"}, "reward", "missing"),
        ({"decision_id": "a", "reward": "1"}, "reward", "'1'"),
        ({"decision_id": "a", "reward": True}, "reward", "True"),
        ({"decision_id": "a", "reward": 1.0, "terminated": "yes"}, "terminated", "'yes'"),
        ({"decision_id": "a", "reward": 1.0, "truncated": 1}, "truncated", "1"),
        ({"decision_id": "a", "reward": 1.0, "terminated": True, "truncated": True}, "truncated", "both"),
        (
            {"decision_id": "a", "reward": 1.0, "next_observation": [1.0, "x"]},
            "next_observation",
            "element 1",
        ),
        ({"decision_id": "a", "reward": 1.0, "next_observation": []}, "next_observation", "length 0"),
        ({"decision_id": "a", "reward": 1.0, "next_observation": 3.0}, "next_observation", "float"),
        ({"decision_id": "a", "reward": 1.0, "policy": "a b"}, "policy", "'a b'"),
        ({"decision_id": "a", "reward": 1.0, "version": 0}, "version", "0"),
        ({"decision_id": "a", "reward": 1.0, "rewrd": 2}, "rewrd", "unknown field"),
    ],
)
def test_each_invalid_field_is_named_with_its_index(item: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(RewardsRejected) as info:
        parse_rewards(json.dumps({"rewards": [reward(0), item]}).encode())
    e = info.value
    assert (e.status, e.reason, e.count) == (422, "invalid_field", 2)
    assert [(err.index, err.field) for err in e.errors] == [(1, field)]
    assert words in e.errors[0].message
    assert e.errors[0].accepted
    assert "1 of 2 rewards are invalid" in e.message


def test_integers_beyond_a_float_are_refused() -> None:
    # JSON integers have no size limit; math.isfinite raises OverflowError for one beyond a float.
    body = json.dumps({"rewards": [reward(0, reward=10**400), reward(1, next_observation=[0.5, -(10**400)])]})
    with pytest.raises(RewardsRejected) as info:
        parse_rewards(body.encode())
    assert [(err.index, err.field) for err in info.value.errors] == [(0, "reward"), (1, "next_observation")]


def test_values_the_reward_log_cannot_hold_are_refused() -> None:
    # The log is UTF-8 JSON lines with 64-bit integers: a reward accepted but not written would be lost.
    body = json.dumps({"rewards": [reward(0, decision_id="d-\ud800"), reward(1, version=2**63)]})
    with pytest.raises(RewardsRejected) as info:
        parse_rewards(body.encode())
    assert [(err.index, err.field) for err in info.value.errors] == [(0, "decision_id"), (1, "version")]


def test_errors_show_bad_values_cut_short() -> None:
    # An answer that echoed a value of megabytes would turn a large bad request into a larger answer.
    body = json.dumps({"rewards": [reward(0, decision_id=[0] * 1_000_000), reward(1, policy="p" * 10**6)]})
    with pytest.raises(RewardsRejected) as info:
        parse_rewards(body.encode())
    answer = json.dumps(info.value.to_json())
    assert len(answer) < 2000
    assert [(err.index, err.field) for err in info.value.errors] == [(0, "decision_id"), (1, "policy")]


def test_non_finite_numbers_are_refused() -> None:
    # Python's json reads NaN / Infinity literals; they must not reach the log.
    body = b'{"rewards": [{"decision_id": "a", "reward": NaN}, {"decision_id": "b", "reward": 1,'
    body += b' "next_observation": [0, Infinity]}]}'
    with pytest.raises(RewardsRejected) as info:
        parse_rewards(body)
    assert [(err.index, err.field) for err in info.value.errors] == [(0, "reward"), (1, "next_observation")]


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
        (b'{"rewards": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_shape"),
        (b'{"rewards": []}', 400, "invalid_shape"),
        (b'{"rewards": {"decision_id": "a"}}', 400, "invalid_shape"),
        (b'{"rewards": [], "extra": 1}', 400, "invalid_shape"),
        (json.dumps({"rewards": [reward(0)] * (MAX_REWARDS_PER_REQUEST + 1)}).encode(), 413, "too_many"),
    ],
)
def test_bad_bodies(body: bytes, status: int, reason: str) -> None:
    with pytest.raises(RewardsRejected) as info:
        parse_rewards(body)
    assert (info.value.status, info.value.reason) == (status, reason)
    assert "accepted" in info.value.to_json()


def test_rejected_requests_write_nothing_and_count_the_reason(tmp_path: Path) -> None:
    with serve_in_thread(tmp_path, max_body_bytes=2000) as (url, _):
        status, body = post(url, {"rewards": [reward(0), reward(1, reward=math.inf)]})
        assert status == 422
        assert body["errors"] == [
            {"index": 1, "field": "reward", "message": "got inf", "accepted": "a finite number"}
        ]
        status, body = post(url, b"{oops")
        assert status == 400
        assert "not valid JSON" in body["error"]
        status, body = post(url, {"rewards": [reward(i) for i in range(100)]})
        assert status == 413
        assert "2000" in body["error"]
        text = HTTP.request("GET", url + "/metrics").data.decode()
    assert read_rewards(tmp_path) == []
    assert metric(text, "rlops_rewards_rejected_total", reason="invalid_field") == 2
    assert metric(text, "rlops_rewards_rejected_total", reason="invalid_json") == 1
    assert metric(text, "rlops_rewards_rejected_total", reason="too_large") == 1


def test_token_is_required_when_configured(tmp_path: Path) -> None:
    with serve_in_thread(tmp_path, token="s3cret") as (url, _):
        assert post(url, reward(0))[0] == 401
        assert post(url, reward(0), {"Authorization": "Bearer wrong"})[0] == 401
        assert post(url, reward(1), {"Authorization": "Bearer s3cret"}) == (202, {"accepted": 1})
    assert [r["decision_id"] for r in read_rewards(tmp_path)] == ["d-1"]


def test_a_header_block_over_the_limit_is_refused_431(tmp_path: Path) -> None:
    # Read in one go, a 100 KB header block passes h11's own limit; the service measures it.
    with serve_in_thread(tmp_path) as (url, _):
        status, body = post(url, reward(0), {"X-Pad": "a" * 100_000})
        assert post(url, reward(1), {"X-Pad": "a" * 8_000}) == (202, {"accepted": 1})
        text = HTTP.request("GET", url + "/metrics").data.decode()
    assert status == 431
    assert "at most 16384" in body["error"]
    assert metric(text, "rlops_rewards_rejected_total", reason="headers_too_large") == 1
    assert [r["decision_id"] for r in read_rewards(tmp_path)] == ["d-1"]


def test_full_reward_log_answers_503_and_counts(tmp_path: Path) -> None:
    with serve_in_thread(tmp_path, max_queue=1) as (url, app):
        app.state.log.close()  # a closed log refuses every record, as a full one does
        status, body = post(url, {"rewards": [reward(0), reward(1)]})
        text = HTTP.request("GET", url + "/metrics").data.decode()
    assert status == 503
    assert body["accepted_count"] == 0
    assert metric(text, "rlops_rewards_rejected_total", reason="queue_full") == 2


def test_serve_command_refuses_an_empty_token_file(tmp_path: Path) -> None:
    from rlops_server.commands.feedback import app
    from typer.testing import CliRunner

    token = tmp_path / "token"
    token.write_text("\n")
    result = CliRunner().invoke(app, ["serve", "--dir", str(tmp_path / "logs"), "--token-file", str(token)])
    assert result.exit_code == 2
    assert "is empty" in result.output
