"""The rlops rollout and rlops loop commands: exit codes and messages for people."""

from __future__ import annotations

from pathlib import Path

from delivery_testkit import ANALYSIS, POLICY, serve_episodes
from rlops_delivery.commands.loop import app as loop_app
from rlops_delivery.commands.rollout import app
from typer.testing import CliRunner

runner = CliRunner()


def test_start_refuses_share_and_steps_together(registry: Path) -> None:
    result = runner.invoke(
        app, ["start", "2", "--registry", str(registry), "--share", "0.1", "--steps", "10,100"]
    )
    assert result.exit_code == 2
    assert "give --share (one step, then promotion) or --steps, not both" in result.output


def test_start_names_bad_steps_and_missing_servers(registry: Path, tmp_path: Path) -> None:
    args = ["start", "2", "--registry", str(registry), "--analysis", str(ANALYSIS)]
    result = runner.invoke(app, [*args, "--steps", "50,10"])
    assert result.exit_code == 2
    assert "strictly increasing percentages" in result.output
    result = runner.invoke(app, [*args, "--serve-run-dir", str(tmp_path / "nothing"), "--interval", "1s"])
    assert result.exit_code == 2
    assert "no server is running from" in result.output


def test_status_of_a_policy_without_rollouts(registry: Path) -> None:
    result = runner.invoke(app, ["status", "--registry", str(registry)])
    assert result.exit_code == 0
    assert f"no rollouts of {POLICY}" in result.output


def test_ope_gate_exit_codes(registry: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    serve_episodes(logs, registry, episodes=20, seed=5)
    base = ["ope-gate", POLICY, "2", "--registry", str(registry), "--logs", str(logs), "--estimator", "fqe"]
    fast = ["--fqe-steps", "200", "--fqe-models", "1", "--bootstrap", "50"]
    result = runner.invoke(app, [*base, *fast, "--margin", "1000", "--out", str(tmp_path / "gate.json")])
    assert result.exit_code == 1, result.output
    assert "fail not promoted" in result.output
    assert (tmp_path / "gate.json").is_file()
    result = runner.invoke(app, [*base, *fast, "--estimator", "bogus"])
    assert result.exit_code == 2
    assert "estimator 'bogus'" in result.output
    result = runner.invoke(app, ["ope-gate", POLICY, "9", "--registry", str(registry), "--logs", str(logs)])
    assert result.exit_code == 2
    assert "has no version 9" in result.output
    result = runner.invoke(
        app, ["ope-gate", POLICY, "2", "--registry", str(registry), "--logs", str(tmp_path / "no")]
    )
    assert result.exit_code == 2


def test_loop_config_errors_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "loop.yaml"
    config.write_text("policy: cartpole\nalgorithm: ppo\n")
    result = runner.invoke(loop_app, ["run-once", "--config", str(config), "--analysis", str(ANALYSIS)])
    assert result.exit_code == 2
    assert "algorithm: 'ppo'" in result.output


def test_loop_names_the_accepted_canary_modes(tmp_path: Path) -> None:
    config = tmp_path / "loop.yaml"
    config.write_text("policy: cartpole\n")
    result = runner.invoke(
        loop_app, ["run-once", "--config", str(config), "--analysis", str(ANALYSIS), "--canary", "bogus"]
    )
    assert result.exit_code == 2
    assert "--canary 'bogus': accepted: local, none" in result.output
