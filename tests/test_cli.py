"""The ``rlops`` command mounts every installed package's sub-commands, each with its own help."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from rlops_cli.main import build_app
from typer.testing import CliRunner

runner = CliRunner()
# Built once: every package's commands are imported at build time, which takes a while.
APP = build_app()


def _command_paths(app: typer.Typer) -> list[list[str]]:
    click_cmd = typer.main.get_command(app)
    paths: list[list[str]] = []

    def walk(cmd: object, prefix: list[str]) -> None:
        paths.append(prefix)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*prefix, name])

    walk(click_cmd, [])
    return paths


def test_top_level_lists_trainer_commands() -> None:
    result = runner.invoke(APP, ["--help"])
    assert result.exit_code == 0, result.output
    for name in ("data", "train", "evaluate", "registry", "demo"):
        assert name in result.output


@pytest.mark.parametrize("path", _command_paths(APP), ids=lambda p: " ".join(p) or "rlops")
def test_every_command_has_help(path: list[str]) -> None:
    result = runner.invoke(APP, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    # Every command says what it does, not just its usage line.
    body = result.output.split("Usage:", 1)[1]
    assert len(body.strip().splitlines()) > 2


def test_console_script_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rlops_cli.main", "--help"], capture_output=True, text=True, check=True
    )
    assert "rlops" in out.stdout


def test_a_package_that_fails_to_import_leaves_the_other_commands_working(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from importlib.metadata import EntryPoint

    import rlops_cli.main as main

    good = EntryPoint(name="demo", value="rlops_cli.demo:demo", group=main.GROUP)
    broken = EntryPoint(name="ghost", value="rlops_no_such_package.commands:app", group=main.GROUP)
    monkeypatch.setattr(main, "entry_points", lambda group: [good, broken])
    app = main.build_app()
    assert runner.invoke(app, ["demo", "--help"]).exit_code == 0
    result = runner.invoke(app, ["ghost"])
    assert result.exit_code == 1
    assert "rlops ghost is unavailable: rlops_no_such_package.commands:app" in result.output
    assert "No module named 'rlops_no_such_package'" in result.output
