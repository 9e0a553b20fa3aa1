"""The pre-commit hooks are valid and run what `make lint` runs, with the project's own tools."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / ".pre-commit-config.yaml"


def test_the_config_is_valid() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pre_commit", "validate-config", str(CONFIG)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_lint_tool_of_the_makefile_has_a_hook_with_the_venv_tool() -> None:
    lint = re.search(r"^lint:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    assert lint is not None
    tools = {
        line.split()[1] if line.split()[0] == "$(BIN)/ruff" else line.split()[0]
        for line in lint[1].split("\n")
        if line
    }
    hooks = [h for repo in yaml.safe_load(CONFIG.read_text())["repos"] for h in repo["hooks"]]
    entries = [h["entry"] for h in hooks]
    for tool in sorted(tools):
        name = tool.removeprefix("$(BIN)/")
        wanted = f".venv/bin/ruff {name}" if name in ("check", "format") else f".venv/bin/{name}"
        assert any(e.startswith(wanted) for e in entries), f"no hook runs {wanted}; hooks: {entries}"
    assert all(h["language"] == "system" for h in hooks)
