"""The local stack: generated configs, settings validation, and real Prometheus and Alertmanager processes
started, inspected and stopped (without the webhook, which has its own tests)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml
from rlops_server.http import request_json
from rlops_stack import local, prometheus
from rlops_stack.commands.stack import app
from rlops_stack.local import StackError, StackSettings, Target
from typer.testing import CliRunner

ALERTS = Path(__file__).resolve().parents[3] / "alerts"


def test_target_parsing() -> None:
    assert Target.parse("torchserve=127.0.0.1:8082") == Target("torchserve", "127.0.0.1:8082", "/metrics")
    assert Target.parse("ray=10.0.0.1:8080/api/metrics").metrics_path == "/api/metrics"
    for bad in ("torchserve", "torchserve=localhost", "x=host:99999", "=h:1"):
        with pytest.raises(StackError):
            Target.parse(bad)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"scrape_interval": 0}, "scrape_interval must be between"),
        ({"alert_for": -1}, "alert_for must be between"),
        ({"prometheus_port": 9093}, "ports must differ"),
        ({"alertmanager_port": 70000}, "alertmanager_port must be a TCP port"),
    ],
)
def test_settings_are_checked(kwargs: dict[str, float], words: str) -> None:
    with pytest.raises(StackError, match=words):
        StackSettings(**kwargs)  # type: ignore[arg-type]


def test_prometheus_config_scrapes_the_targets_and_reads_the_rule_copies(tmp_path: Path) -> None:
    settings = StackSettings(scrape_interval=1.5, evaluation_interval=2, prometheus_port=19090)
    config = yaml.safe_load(local.render_prometheus(settings, tmp_path / "rules"))
    assert config["global"]["scrape_interval"] == "1500ms"
    assert config["global"]["evaluation_interval"] == "2s"
    assert config["rule_files"] == [str(tmp_path / "rules" / "*.yaml")]
    jobs = {s["job_name"]: s["static_configs"][0]["targets"] for s in config["scrape_configs"]}
    assert jobs == {
        "torchserve": ["127.0.0.1:8082"],
        "rlops-feedback": ["127.0.0.1:8090"],
        "rlops-trainer": ["127.0.0.1:9108"],
        "rlops-actions": ["127.0.0.1:9095"],
        "prometheus": ["127.0.0.1:19090"],
        "alertmanager": ["127.0.0.1:9093"],
    }
    with pytest.raises(StackError, match="unique"):
        local.render_prometheus(StackSettings(targets=(Target("prometheus", "h:1"),)), tmp_path)


def test_rule_copies_keep_the_file_unless_for_is_overridden() -> None:
    source = ALERTS / "rules" / "training.yaml"
    assert local.render_rules(source, None) == source.read_text()
    fors = [
        r["for"]
        for g in yaml.safe_load(local.render_rules(source, 0.5))["groups"]
        for r in g["rules"]
        if "alert" in r
    ]
    assert fors
    assert set(fors) == {"500ms"}


def test_receivers_with_secret_files_are_kept_with_local_paths(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets" / "rlops-alertmanager"
    secrets.mkdir(parents=True)
    (secrets / "slack-webhook-url").write_text("https://hooks.slack.test/x\n")
    text, silent, token = local.render_alertmanager(
        ALERTS / "alertmanager.yaml", StackSettings(webhook_port=19095), tmp_path / "secrets"
    )
    config = yaml.safe_load(text)
    receivers = {r["name"]: r for r in config["receivers"]}
    assert receivers["slack-tickets"]["slack_configs"][0]["api_url_file"] == str(
        secrets / "slack-webhook-url"
    )
    assert "pagerduty_configs" not in receivers["pagerduty"]
    assert silent == {"pagerduty": f"no secret file {secrets / 'pagerduty-routing-key'}"}
    assert receivers["rlops-actions"]["webhook_configs"][0]["url"] == "http://127.0.0.1:19095/alerts"
    assert token == secrets / "actions-token"
    _, silent, token = local.render_alertmanager(
        ALERTS / "alertmanager.yaml", StackSettings(webhook=None), tmp_path / "secrets"
    )
    assert token is None
    assert "rlops-actions" in silent


def test_missing_binary_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(StackError, match=r"make system.*prometheus-alertmanager"):
        local.binary("prometheus-alertmanager")


def test_alerts_dir_must_hold_rules_and_alertmanager_config(tmp_path: Path) -> None:
    assert local.alerts_dir(ALERTS) == ALERTS
    with pytest.raises(StackError, match="no alerts folder"):
        local.alerts_dir(tmp_path)


def test_status_of_a_root_without_a_stack(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="no stack was started"):
        local.status(tmp_path)
    assert local.down(tmp_path) == [f"no stack was started from {tmp_path.resolve()}"]
    result = CliRunner().invoke(app, ["status", "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "rlops stack up" in result.output


def test_up_status_down_with_real_processes(tmp_path: Path, free_ports: Callable[[int], list[int]]) -> None:
    prom, am, target = free_ports(3)
    root = tmp_path / "stack"
    args = ["up", "--root", str(root), "--prometheus-port", str(prom), "--alertmanager-port", str(am)]
    args += ["--no-webhook", "--scrape-interval", "1", "--evaluation-interval", "1", "--alert-for", "1"]
    args += ["--target", f"torchserve=127.0.0.1:{target}"]
    try:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert f"prometheus:   http://127.0.0.1:{prom}" in result.output
        assert "receiver rlops-actions notifies nobody here" in result.output
        state = local.StackState.read(root)
        assert state is not None
        assert {c.name for c in state.components} == {"prometheus", "alertmanager"}

        again = CliRunner().invoke(app, args)
        assert again.exit_code == 2
        assert "already running" in again.output

        groups = prometheus.rule_groups(state.prometheus_url)
        assert {g["name"] for g in groups} >= {"rlops-serving", "rlops-policy", "rlops-slo"}
        assert {r["duration"] for g in groups for r in g["rules"] if r["type"] == "alerting"} == {1}

        # Nothing listens on the torchserve target: RlopsServingTargetDown goes pending, then fires.
        def firing() -> bool:
            return any(
                a["labels"]["alertname"] == "RlopsServingTargetDown" and a["state"] == "firing"
                for a in prometheus.alerts(state.prometheus_url)
            )

        deadline = time.monotonic() + 60
        while not firing():
            assert time.monotonic() < deadline, prometheus.alerts(state.prometheus_url)
            time.sleep(0.5)
        report = local.status(root)
        assert report["healthy"] is True
        assert {(t["job"], t["health"]) for t in report["targets"]} >= {
            ("torchserve", "down"),
            ("prometheus", "up"),
        }
        assert [a["name"] for a in report["alerts"]] == ["RlopsServingTargetDown"]
        shown = CliRunner().invoke(app, ["status", "--root", str(root)])
        assert shown.exit_code == 0
        assert "RlopsServingTargetDown" in shown.output

        # Alertmanager's inhibition: a page silences its policy's warnings, never an action's alert.
        def post(name: str, **labels: str) -> dict[str, object]:
            return {"labels": {"alertname": name, **labels}, "annotations": {}}

        sent = [
            post("Page", severity="critical", policy="p"),
            post("Ticket", severity="warning", policy="p"),
            post("Scale", severity="warning", policy="p", version="1", action="scale_up"),
            post("Other", severity="warning", policy="q"),
        ]
        assert request_json("POST", f"{state.alertmanager_url}/api/v2/alerts", body=sent)[0] == 200

        def suppressed() -> dict[str, str]:
            _, found = request_json("GET", f"{state.alertmanager_url}/api/v2/alerts")
            return {
                a["labels"]["alertname"]: a["status"]["state"]
                for a in found
                if a["labels"]["alertname"] != "RlopsServingTargetDown"
            }

        deadline = time.monotonic() + 30
        while suppressed().get("Ticket") != "suppressed":
            assert time.monotonic() < deadline, suppressed()
            time.sleep(0.2)
        assert suppressed() == {
            "Page": "active",
            "Ticket": "suppressed",
            "Scale": "active",
            "Other": "active",
        }
        pids = [c.pid for c in state.components]
    finally:
        stopped = CliRunner().invoke(app, ["down", "--root", str(root)])
    assert stopped.exit_code == 0, stopped.output
    assert "stopped prometheus" in stopped.output
    assert "killed" not in stopped.output
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert not (root / local.STATE_FILE).exists()


def test_a_busy_port_is_named(tmp_path: Path, free_ports: Callable[[int], list[int]]) -> None:
    prom, am = free_ports(2)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", prom))
        busy.listen()
        with pytest.raises(StackError, match=rf"port {prom} for Prometheus is in use.*--prometheus-port"):
            local.up(tmp_path, prometheus_port=prom, alertmanager_port=am, webhook=None)
