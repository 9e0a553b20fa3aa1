"""Rollback through a real registry (and the rlops rollback / rlops scale commands) without a server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from rlops_stack import actions
from rlops_stack.commands.rollback import rollback as rollback_command
from rlops_stack.commands.scale import scale as scale_command
from rlops_trainer.registry import Registry
from typer import Typer
from typer.testing import CliRunner


@pytest.fixture
def registry(tmp_path: Path, trained_policy: Callable[[int], Path], publish: Callable[..., int]) -> Path:
    """Champions 1, 2, 3 in that order (3 is the champion)."""
    root = tmp_path / "registry"
    for seed in (1, 2, 3):
        publish(root, trained_policy(seed), promote=True)
    return root


def app(command: Callable[..., None]) -> Typer:
    typer_app = Typer()
    typer_app.command()(command)
    return typer_app


def test_rollback_to_a_named_version_steps_through_the_champions(registry: Path, tmp_path: Path) -> None:
    record = tmp_path / "actions.jsonl"
    result = actions.rollback(registry, "cartpole", reason="drill", to=1, record_to=record)
    assert (result.outcome, result.details["steps"]) == ("done", [2, 1])
    reg = Registry(registry)
    assert reg.aliases("cartpole")["champion"] == 1
    assert [e["to"] for e in reg.history("cartpole") if e["action"] == "rollback"] == [2, 1]
    again = actions.rollback(registry, "cartpole", reason="drill", to=1, record_to=record)
    assert (again.outcome, again.message) == ("skipped", "version 1 of cartpole is already the champion")
    assert [e["outcome"] for e in actions.read_record(record)] == ["done", "skipped"]


def test_rollback_refuses_a_version_that_was_never_an_earlier_champion(registry: Path) -> None:
    result = actions.rollback(registry, "cartpole", reason="drill", to=7)
    assert result.outcome == "failed"
    assert result.message == "version 7 of cartpole was not a champion before 3; earlier champions: 1, 2"
    assert Registry(registry).aliases("cartpole")["champion"] == 3


def test_rollback_command_without_a_server_moves_the_registry_and_says_so(
    registry: Path, tmp_path: Path
) -> None:
    args = ["cartpole", "--registry", str(registry), "--serve-run-dir", str(tmp_path / "serve")]
    args += ["--record", str(tmp_path / "actions.jsonl"), "--reason", "bad canary", "--json"]
    result = CliRunner().invoke(app(rollback_command), args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["outcome"] == "done"
    assert "rolled cartpole back from version 3 to version 2" in out["message"]
    assert "no server runs from" in out["message"]
    assert Registry(registry).history("cartpole")[-1]["reason"] == "bad canary"


def test_rollback_command_errors(registry: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app(rollback_command), ["nosuch", "--registry", str(registry), "--registry-only"])
    assert result.exit_code == 1
    assert "unknown policy 'nosuch'" in result.output
    result = runner.invoke(app(rollback_command), ["cartpole", "--registry", str(registry), "--reason", " "])
    assert result.exit_code == 2
    assert "--reason must not be empty" in result.output


def test_scale_command_without_a_server_fails_clearly(tmp_path: Path) -> None:
    args = ["cartpole", "1", "--workers", "2", "--serve-run-dir", str(tmp_path / "serve")]
    result = CliRunner().invoke(app(scale_command), [*args, "--record", str(tmp_path / "a.jsonl")])
    assert result.exit_code == 1
    assert "no server is running from" in result.output
    result = CliRunner().invoke(app(scale_command), ["cartpole", "1", "--workers", "0"])
    assert result.exit_code == 2
