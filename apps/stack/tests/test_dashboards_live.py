"""Every panel query of the dashboards returns data from a real Prometheus after demo-like traffic.

Real parts only: TorchServe serving a champion and a candidate (the server tests' toy registry: three
actions, version 1 greedy on Q-values, version 2 sampling from logits, NaN scores for a poisoned last
feature), the reward feedback service, an offline CQL run on logged CartPole data exporting its metrics
(rlops_trainer.telemetry), and the local stack (Prometheus, Alertmanager and the actions webhook, from
``rlops_stack.local.up``) scraping them every second with the rule files of ``alerts/``. Traffic goes to
both versions with rewards, a few malformed requests, poisoned observations (the fallback path) and one
invalid reward, so every counter a serving, policy-health or SLO panel reads has moved at least once.

Training panels checked: those an offline run feeds (:data:`OFFLINE_TRAINING`). Not checked, because
nothing run here produces them honestly: episode return and length, exploration rate and environment
steps per second need environment interaction (the online trainer on Ray); policy entropy is recorded by
no offline algorithm; and ``rlops_train_baseline_return`` (the "baseline" query of the episode return
panel) comes from an online run with a registry champion. Their queries are still checked for syntax
and metric names in test_dashboards.py.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import typer
import uvicorn
from rlops_server.client import PolicyClient
from rlops_server.commands.serve import app as serve_app
from rlops_server.feedback import create_app as feedback_app
from rlops_server.torchserve import process
from rlops_server.traffic import RewardSender
from rlops_stack import dashboards, local
from rlops_stack.commands.report import report as report_command
from rlops_stack.report import Report, collect
from rlops_trainer.algos.cql import CQLConfig
from rlops_trainer.algos.cql import train as train_cql
from rlops_trainer.telemetry import TrainingTelemetry
from rlops_trainer.training import RunOptions
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
SCRAPE_S = 1.0
OFFLINE_TRAINING = {
    ("Since last progress", "A"),
    ("Updates", "A"),
    ("Non-finite events", "A"),
    ("Loss", "A"),
    ("Gradient norm", "A"),
    ("Q estimate", "A"),
    ("Updates per second", "A"),
}
"""(panel, query) of the training dashboard that an offline CQL run feeds."""


def _server_fixtures() -> ModuleType:
    """The server tests' policy builders (TinyPolicy, write_registry), imported from their file."""
    path = REPO / "apps" / "server" / "tests" / "server_testkit.py"
    spec = importlib.util.spec_from_file_location("rlops_server_test_fixtures", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports; the last one also has its successor free (TorchServe's gRPC pair)."""
    while True:
        socks = []
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        ports = [s.getsockname()[1] for s in socks]
        for s in socks:
            s.close()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", ports[-1] + 1))
            except OSError:
                continue
        if ports[-1] + 1 not in ports:
            return ports


class FeedbackServer:
    """The feedback service's real ASGI app under uvicorn, on a thread of this process."""

    def __init__(self, directory: Path, port: int) -> None:
        config = uvicorn.Config(feedback_app(directory), host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the feedback service did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@dataclass
class Live:
    prometheus_url: str
    alertmanager_url: str
    started: float
    report: Report
    missing: list[str]


def _post(url: str, body: bytes, token: str) -> int:
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def drive(inference_url: str, feedback_url: str, token: str, seconds: float) -> dict[str, int]:
    """Requests to both versions with rewards for every decision the server made, for ``seconds``."""
    rng = np.random.default_rng(0)
    clients = {
        "1": PolicyClient(inference_url, "toy", token=token, timeout=10.0),
        "2": PolicyClient(inference_url, "toy", version=2, token=token, timeout=10.0),
    }
    sender = RewardSender(feedback_url)
    sender.check()
    counts = {"decisions": 0, "fallbacks": 0, "rewards": 0}
    deadline = time.monotonic() + seconds
    i = 0
    try:
        while time.monotonic() < deadline:
            for version, client in clients.items():
                # The candidate sees shifted observations: drift against its reference bins.
                obs = rng.normal(0.0 if version == "1" else 1.5, 1.0, size=(6, 4))
                if i % 5 == 0:
                    obs[0, 3] = 2000.0  # NaN scores: the server answers with its fallback action
                decisions = client.act_batch(obs.tolist())
                rewards = []
                for d in decisions:
                    counts["decisions"] += 1
                    counts["fallbacks"] += d.fallback
                    if d.version is None:  # the client's own fallback: no decision to reward
                        continue
                    reward = 1.0 if d.action == 0 else -0.5
                    rewards.append(
                        {
                            "decision_id": d.decision_id,
                            "reward": reward,
                            "policy": "toy",
                            "version": d.version,
                        }
                    )
                assert sender.send(rewards) is None
                counts["rewards"] += len(rewards)
            if i % 10 == 0:
                assert _post(f"{inference_url}/predictions/toy", b'{"observation": [1, 2', token) == 400
                assert _post(f"{inference_url}/predictions/toy/2", b'{"observation": [1.0]}', token) == 422
            i += 1
            time.sleep(0.2)
        assert _post(f"{feedback_url}/rewards", json.dumps({"reward": 1.0}).encode(), "") == 422
    finally:
        for client in clients.values():
            client.close()
    return counts


BOX_PANELS = {
    "Action drift (PSI) per dimension",
    "Actions per reference bin",
    "Mean action per dimension",
}
"""Policy-health panels of policies with Box actions; the registry served here holds Discrete policies."""


def expected(uid: str, panel: str, ref_id: str) -> bool:
    if uid == "rlops-policy-health":
        return panel not in BOX_PANELS
    return uid != "rlops-training" or (panel, ref_id) in OFFLINE_TRAINING


def missing_queries(report: Report) -> list[str]:
    return [
        f"{b.board.uid} / {p.panel.title} / {r.query.ref_id}: {r.error or 'no data'}"
        for b in report.boards
        for p in b.panels
        for r in p.results
        if not r.series and expected(b.board.uid, p.panel.title, r.query.ref_id)
    ]


def train_offline(data: Any, telemetry: TrainingTelemetry) -> threading.Thread:
    """A short CQL run whose metric records go to ``telemetry``, on a thread (it runs while traffic flows)."""
    config = CQLConfig(steps=1500, batch_size=64, hidden=(32, 32), seed=0)
    options = RunOptions(device="cpu", log_every=25, progress=False, on_record=telemetry.record)
    thread = threading.Thread(target=train_cql, args=(config, data, options), daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, cartpole_data: Any) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("live")
    registry = _server_fixtures().write_registry(root / "registry")
    run_dir = root / "serve"
    port, mgmt, metrics, feedback, trainer, prom, am, hook, grpc = free_ports(9)
    boards = dashboards.load_built(REPO / "dashboards" / "build")
    with ExitStack() as stack:
        args = [
            "start", "--registry", str(registry), "--run-dir", str(run_dir),
            "--port", str(port), "--management-port", str(mgmt), "--metrics-port", str(metrics),
            "--grpc-port", str(grpc), "--batch-size", "8", "--max-batch-delay-ms", "5",
            "--decision-log-dir", str(root / "decisions"), "--timeout", "240",
        ]  # fmt: skip
        stack.callback(process.stop, run_dir, timeout_s=30)
        result = CliRunner().invoke(serve_app, args)
        assert result.exit_code == 0, f"{result.output}\n{process.log_tail(run_dir)}"
        service = FeedbackServer(root / "rewards", feedback)
        service.start()
        stack.callback(service.stop)
        telemetry = TrainingTelemetry(run="live-cql", algorithm="cql", policy="toy")
        telemetry.serve(trainer, addr="127.0.0.1")
        stack.callback(telemetry.close)

        stack_root = root / "stack"
        stack.callback(local.down, stack_root)
        state = local.up(
            stack_root,
            scrape_interval=SCRAPE_S,
            evaluation_interval=SCRAPE_S,
            prometheus_port=prom,
            alertmanager_port=am,
            webhook_port=hook,
            targets=[
                local.Target("torchserve", f"127.0.0.1:{metrics}"),
                local.Target("rlops-feedback", f"127.0.0.1:{feedback}"),
                local.Target("rlops-trainer", f"127.0.0.1:{trainer}"),
                local.Target("rlops-actions", f"127.0.0.1:{hook}"),
            ],
            webhook=local.WebhookSettings(registry=registry, serve_run_dir=run_dir),
            alerts=REPO / "alerts",
        )
        started = time.time()
        training = train_offline(cartpole_data, telemetry)
        counts = drive(f"http://127.0.0.1:{port}", service.url, process.read_keys(run_dir)["inference"], 20.0)
        training.join(timeout=120)
        assert not training.is_alive(), "the CQL run did not finish"
        assert counts["decisions"] > 200, counts
        assert counts["fallbacks"] > 0, counts
        assert counts["rewards"] > 0, counts

        # Scrapes, rule evaluations and TorchServe's once-a-second metric flushes lag the traffic a little.
        deadline = time.monotonic() + 60
        while True:
            report = collect(
                state.prometheus_url,
                boards,
                window_s=time.time() - started + 30,
                alertmanager_url=state.alertmanager_url,
            )
            missing = missing_queries(report)
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(2)
        yield Live(state.prometheus_url, state.alertmanager_url, started, report, missing)


def test_every_panel_query_returns_data(live: Live) -> None:
    uids = [b.board.uid for b in live.report.boards]
    assert uids == ["rlops-policy-health", "rlops-serving", "rlops-slo", "rlops-training"]
    checked = [
        r
        for b in live.report.boards
        for p in b.panels
        for r in p.results
        if expected(b.board.uid, p.panel.title, r.query.ref_id)
    ]
    assert len(checked) >= 70
    training = {(p.panel.title, r.query.ref_id) for p in live.report.boards[3].panels for r in p.results}
    assert training >= OFFLINE_TRAINING  # the names above are the dashboard's
    assert live.missing == []


def test_report_command_writes_the_page_with_alerts_and_no_data_for_online_training(
    live: Live, tmp_path: Path
) -> None:
    out = tmp_path / "report" / "index.html"
    window = f"{max(60, int(time.time() - live.started) + 30)}s"
    result = CliRunner().invoke(
        typer_app(),
        [
            "--out", str(out), "--prometheus-url", live.prometheus_url,
            "--alertmanager-url", live.alertmanager_url,
            "--dashboards", str(REPO / "dashboards" / "build"), "--window", window,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    assert not list(out.parent.glob(".*.tmp"))
    for board in dashboards.load_built(REPO / "dashboards" / "build"):
        assert f"<h2>{board['title']}</h2>" in page
    assert page.count('src="data:image/png;base64,') >= 20
    assert "<h3>Prometheus (pending and firing)</h3>" in page
    assert f"<h3>Alertmanager ({live.alertmanager_url})</h3>" in page
    # No online trainer runs here: its panels say so rather than failing.
    assert "no data" in page
    assert "no data: rlops-training / Episode return" in result.output
    assert "no data: rlops-training / Loss" not in result.output
    assert "0 failed queries" in result.output


def typer_app() -> typer.Typer:
    app = typer.Typer()
    app.command()(report_command)
    return app
