"""The alert path end to end, with real TorchServe, Prometheus and Alertmanager and the actions webhook.

A registry holds a trained champion (version 1) and a deliberately slow copy of it (version 2, a TorchScript
policy whose forward pass multiplies matrices first: see rlops_stack.faults). TorchServe serves both; the
local stack scrapes it every second with the test profile (every alert's for: 2 s, Alertmanager waits 1 s).

1. Healthy traffic (the training observations, replayed to version 1) raises no alert at all, pending or
   firing, and the webhook is never called.
2. Traffic to version 2 raises RlopsServingLatencyHigh for version 2 only; Alertmanager routes it to the
   webhook, which scales version 2 from one worker to two through TorchServe's management API.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rlops_server import serving
from rlops_server.client import PolicyClient
from rlops_server.commands.serve import app as serve_app
from rlops_server.http import request_json
from rlops_server.torchserve import process
from rlops_stack import actions, local, prometheus
from rlops_stack.faults import Load, write_slow_policy_dir
from rlops_stack.local import Target, WebhookSettings
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

POLICY = "cartpole"


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def test_slow_version_raises_the_latency_alert_and_the_webhook_scales_it(
    tmp_path: Path,
    free_ports: Callable[[int], list[int]],
    trained_policy: Callable[[int], Path],
    cartpole_data: Any,
    publish: Callable[..., int],
) -> None:
    registry, run_dir, stack_root = tmp_path / "registry", tmp_path / "serve", tmp_path / "stack"
    champion = trained_policy(1)
    assert publish(registry, champion, promote=True) == 1
    assert (
        publish(registry, write_slow_policy_dir(champion, tmp_path / "slow", seconds=0.25), promote=False)
        == 2
    )
    port, mgmt, metrics, grpc, _, prom, am, hook = free_ports(8)
    args = [
        "start", "--name", POLICY,
        "--registry", str(registry),
        "--run-dir", str(run_dir),
        "--port", str(port),
        "--management-port", str(mgmt),
        "--metrics-port", str(metrics),
        "--grpc-port", str(grpc),
        "--no-decision-log",
        "--timeout", "240",
    ]  # fmt: skip
    try:
        result = CliRunner().invoke(serve_app, args)
        assert result.exit_code == 0, f"{result.output}\n{process.log_tail(run_dir)}"
        state = local.up(
            stack_root,
            scrape_interval=1,
            evaluation_interval=1,
            prometheus_port=prom,
            alertmanager_port=am,
            webhook_port=hook,
            targets=[
                Target("torchserve", f"127.0.0.1:{metrics}"),
                Target("rlops-actions", f"127.0.0.1:{hook}"),
            ],
            alert_for=2,
            group_wait=1,
            group_interval=1,
            repeat_interval=3600,
            webhook=WebhookSettings(registry, run_dir, max_workers=2, scale_step=1, cooldown_s=600),
            timeout_s=120,
        )
        prom_url, record = state.prometheus_url, stack_root / local.ACTIONS_RECORD
        token = process.read_keys(run_dir)["inference"]
        observations = np.asarray(cartpole_data.observation, dtype=np.float64).tolist()

        def load(version: int) -> Load:
            def client() -> PolicyClient:
                return PolicyClient(
                    f"http://127.0.0.1:{port}", POLICY, version=version, token=token, timeout=30, retries=0
                )

            # One client at a time: the slow version then shows slow inference, not queueing.
            return Load(client, observations, clients=1).start()

        def requests(version: int) -> float:
            found = prometheus.query(prom_url, f'policy_version:rlops_requests:rate5m{{version="{version}"}}')
            return float(found[0]["value"][1]) if found else 0.0

        # 1. Healthy traffic: ten evaluations after Prometheus first sees it, nothing is pending or firing.
        healthy_start = time.time()
        healthy = load(1)
        try:
            wait_for("Prometheus sees requests to version 1", lambda: requests(1) > 0, timeout=90)
            time.sleep(10)
        finally:
            healthy.stop()
        assert healthy.answered > 100
        assert healthy.fallbacks == 0
        window = int(time.time() - healthy_start) + 2
        raised = prometheus.query(prom_url, f"max_over_time(ALERTS[{window}s])")
        assert [r["metric"] for r in raised] == []
        assert actions.read_record(record) == []
        # The recording rules find the real metric names and labels (TorchServe's and the handler's).
        for rule in (
            'policy_version:rlops_inference_latency_seconds:p99_rate5m{version="1"}',
            'policy:rlops_latency_slo_misses:ratio_rate5m{policy="cartpole"}',
            'job:rlops_serving_errors:ratio_rate5m{job="torchserve"}',
            'policy_model_version:ts_queue_latency_seconds:mean_rate5m{policy="cartpole"}',
            'policy_version_feature:rlops_observation_psi:rate30m{version="1"}',
            'policy_version:rlops_actions_vs_training:tvd_rate15m{version="1"}',
            'max by (policy, version) (rlops_serving_ready_workers{version="1"})',
        ):
            assert prometheus.query(prom_url, rule), f"{rule} has no data"

        # 2. The slow version: the alert reaches the webhook, which adds a worker to version 2.
        slow = load(2)
        try:
            entries = wait_for("the webhook acts", lambda: actions.read_record(record), timeout=120)
        finally:
            slow.stop()
        assert slow.answered > 0
        entry = entries[0]
        assert (entry["action"], entry["policy"], entry["version"], entry["outcome"]) == (
            actions.SCALE_UP,
            POLICY,
            "2",
            actions.DONE,
        ), entry
        assert entry["alert"] == "RlopsServingLatencyHigh"
        assert entry["labels"]["severity"] == "warning"
        assert entry["labels"]["action"] == "scale_up"
        assert (entry["details"]["workers_before"], entry["details"]["workers_after"]) == (1, 2)
        served = serving.status(run_dir).of(POLICY)
        assert (served["1"].workers, served["2"].workers, served["2"].ready_workers) == (1, 2, 2)

        status, alerts = request_json("GET", f"{state.alertmanager_url}/api/v2/alerts")
        assert status == 200
        latency = [a for a in alerts if a["labels"]["alertname"] == "RlopsServingLatencyHigh"]
        assert [a["labels"]["version"] for a in latency] == ["2"]
        assert latency[0]["annotations"]["runbook_url"].endswith("/RlopsServingLatencyHigh.md")
        assert {a["name"] for a in latency[0]["receivers"]} >= {local.ACTIONS_RECEIVER}
        # Only latency alerts of the slow version (the latency SLO burns with it), none of version 1.
        fired = {
            (a["metric"]["alertname"], a["metric"].get("version", ""))
            for a in prometheus.query(prom_url, "ALERTS")
        }
        assert ("RlopsServingLatencyHigh", "2") in fired
        assert fired <= {("RlopsServingLatencyHigh", "2")} | {
            (f"RlopsLatencyBudget{kind}Burn", "") for kind in ("Fast", "Slow", "")
        }, fired
        # The same management API by URL and key file, as the webhook reaches TorchServe in a cluster.
        key_file = tmp_path / "management-key"
        key_file.write_text(process.read_keys(run_dir)["management"])
        by_url = serving.remote(f"http://127.0.0.1:{mgmt}", key_file).describe()
        assert [(v.name, v.version) for v in by_url.versions] == [(POLICY, "1"), (POLICY, "2")]
        assert by_url.default_version(POLICY) == "1"
        status, text = request_json("GET", f"{state.webhook_url}/metrics")
        assert 'rlops_alert_actions_total{action="scale_up",outcome="done"} 1.0' in text
        assert 'rlops_serving_workers{policy="cartpole",version="2"} 2.0' in text
    finally:
        down = local.down(stack_root)
        stopped = process.stop(run_dir, timeout_s=30)
    assert all("killed" not in line for line in down), down
    assert "killed" not in stopped
