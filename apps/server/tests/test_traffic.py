from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import typer
from rlops_server.client import PolicyClient
from rlops_server.commands.traffic import INFERENCE_TOKEN_ENV, traffic, traffic_token
from rlops_server.decision_log import DecisionLog
from rlops_server.feedback import serve_in_thread
from rlops_server.join import join
from rlops_server.torchserve.process import ServeError
from rlops_server.traffic import RewardSender, TrafficError, run_traffic
from typer.testing import CliRunner


class PolicyServer(ThreadingHTTPServer):
    """A stand-in for TorchServe with the rlops handler: a pole-balancing rule, decisions logged.

    Every ``fail_every``-th request is answered 500 without logging, as a crashed worker would.
    """

    daemon_threads = True

    def __init__(self, log: DecisionLog, fail_every: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.log, self.fail_every = log, fail_every
        self.count = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body in one write: two small writes meet Nagle and delayed ACKs (40 ms per request).
    wbufsize = 1 << 16
    server: PolicyServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.count += 1
            fail = self.server.fail_every and self.server.count % self.server.fail_every == 0
        if fail:
            self._send(500, {"code": 500, "message": "worker died"})
            return
        obs = req["observation"]
        # Push the cart toward where the pole falls: a policy that keeps CartPole up for a while.
        action = int(obs[2] + 0.5 * obs[3] > 0)
        self.server.log.write(
            {
                "decision_id": req["decision_id"],
                "time": time.time(),
                "policy": "cartpole",
                "version": 3,
                "episode_id": req.get("episode_id"),
                "step": req.get("step"),
                "observation": obs,
                "action": action,
                "propensity": 1.0,
                "temperature": 0.0,
                "epsilon": 0.0,
                "action_mask": None,
                "fallback": False,
            }
        )
        answer = {"action": action, "propensity": 1.0, "policy": "cartpole", "version": 3}
        self._send(200, {**answer, "decision_id": req["decision_id"], "fallback": False})

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return tmp_path / "logs"


def serve_policy(log_dir: Path, fail_every: int = 0) -> tuple[PolicyServer, DecisionLog, threading.Thread]:
    log = DecisionLog(log_dir)
    server = PolicyServer(log, fail_every)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    return server, log, thread


@pytest.fixture
def policy_server(logs: Path) -> Iterator[PolicyServer]:
    server, log, _ = serve_policy(logs)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        log.close()


def test_traffic_drives_cartpole_and_its_rewards_join_into_a_dataset(logs: Path, tmp_path: Path) -> None:
    server, decision_log, _ = serve_policy(logs, fail_every=7)
    try:
        with serve_in_thread(logs) as (feedback_url, _):
            client = PolicyClient(server.url, "cartpole", timeout=2.0, fallback_action=0, pool_size=2)
            returns: list[float] = []
            summary = run_traffic(
                client,
                RewardSender(feedback_url),
                "CartPole-v1",
                6,
                concurrency=2,
                seed=1,
                on_episode=returns.append,
            )
    finally:
        server.shutdown()
        server.server_close()
        decision_log.close()
    assert summary.episodes == 6
    assert summary.mean_return == pytest.approx(sum(returns) / 6)
    assert summary.steps == sum(returns)  # CartPole pays 1 per step
    failed = server.count // 7
    assert summary.fallbacks == {"server_error": failed}
    assert (summary.errors, summary.timeouts, summary.retries) == (failed, 0, 0)
    assert summary.rewards_skipped == failed
    assert summary.rewards_posted == summary.steps - failed
    assert summary.rewards_failed == 0
    assert summary.versions == {"3": summary.steps - failed}
    assert 0 < summary.latency_p50_ms <= summary.latency_p99_ms <= summary.latency_max_ms

    out = tmp_path / "joined.parquet"
    stats = join(logs, logs, out, env_id="CartPole-v1", obs_dim=4, n_actions=2)
    assert stats.rewards == stats.decisions == summary.rewards_posted
    assert (stats.orphan_rewards, stats.unrewarded_decisions, stats.no_next_observation) == (0, 0, 0)
    assert stats.transitions == summary.rewards_posted
    assert stats.episodes == 6

    from rlops_trainer.datasets import load

    data = load(out)
    # Steps that fell back have no reward, so the dataset's returns add up to the rewards posted.
    assert data.episode_returns().sum() == summary.rewards_posted
    # An episode ends in a terminated/truncated row unless its very last step fell back.
    assert 6 - failed <= int(data.terminated.sum() + data.truncated.sum()) <= 6
    # Within an episode, each transition's next observation is the following decision's observation.
    follows = (data.episode_id[1:] == data.episode_id[:-1]) & (data.step[1:] == data.step[:-1] + 1)
    assert follows.sum() > 0
    assert (data.next_observation[:-1][follows] == data.observation[1:][follows]).all()


def test_unknown_environment_and_missing_feedback_service_fail_early(policy_server: PolicyServer) -> None:
    client = PolicyClient(policy_server.url, "cartpole")
    with pytest.raises(TrafficError, match="cannot make environment 'NoSuchEnv-v0'"):
        run_traffic(client, None, "NoSuchEnv-v0", 1)
    with pytest.raises(TrafficError, match=r"feedback service .* not reachable"):
        run_traffic(client, RewardSender("http://127.0.0.1:9"), "CartPole-v1", 1)


def test_traffic_command_prints_the_table_and_writes_the_summary(
    policy_server: PolicyServer, logs: Path, tmp_path: Path
) -> None:
    app = typer.Typer()
    app.command()(traffic)
    summary = tmp_path / "summary.json"
    with serve_in_thread(logs) as (feedback_url, _):
        result = CliRunner().invoke(
            app,
            [
                "--url",
                policy_server.url,
                "--model",
                "cartpole",
                "--episodes",
                "2",
                "--feedback-url",
                feedback_url,
                "--run-dir",
                str(tmp_path / "no-server"),
                "--summary",
                str(summary),
                "--timeout-ms",
                "2000",
            ],
        )
    assert result.exit_code == 0, result.output
    for words in ("mean return", "latency p50", "latency p99", "errors", "fallbacks", "rewards posted"):
        assert words in result.output
    saved = json.loads(summary.read_text())
    assert saved["episodes"] == 2
    assert saved["rewards_posted"] == saved["steps"]


def test_traffic_command_fails_when_every_decision_falls_back(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(traffic)
    result = CliRunner().invoke(
        app,
        [
            "--url",
            "http://127.0.0.1:9",
            "--model",
            "cartpole",
            "--episodes",
            "1",
            "--summary",
            str(tmp_path / "s.json"),
        ],
    )
    assert result.exit_code == 2
    assert "every decision fell back" in result.output


def test_traffic_token_reads_the_key_file_afresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def keys(inference: str) -> None:
        (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": inference}}))

    monkeypatch.delenv(INFERENCE_TOKEN_ENV, raising=False)
    keys("old")
    token = traffic_token(tmp_path)
    assert callable(token)
    assert token() == "old"
    keys("new")  # TorchServe restarted
    assert token() == "new"
    monkeypatch.setenv(INFERENCE_TOKEN_ENV, "given")
    assert traffic_token(tmp_path) == "given"


def test_traffic_token_refuses_a_broken_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INFERENCE_TOKEN_ENV, raising=False)
    (tmp_path / "key_file.json").write_text("{not json")
    with pytest.raises(ServeError, match=r"key_file\.json"):
        traffic_token(tmp_path)


def test_answered_actions_become_what_the_environment_steps_with() -> None:
    import gymnasium as gym
    import numpy as np
    from rlops_server.traffic import _env_action

    box = _env_action(gym.spaces.Box(low=np.array([-2.0, 0.0]), high=np.array([2.0, 1.0]), dtype=np.float32))
    answered = box([0.5, 0.25])
    assert answered.dtype == np.float32
    assert answered.tolist() == [0.5, 0.25]
    # The client's own fallback is an integer: in a Box environment the middle of the bounds is taken.
    assert box(0).tolist() == [0.0, 0.5]
    assert _env_action(gym.spaces.Discrete(2))(1) == 1
