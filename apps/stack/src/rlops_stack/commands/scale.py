"""``rlops scale``: set the TorchServe workers of one served policy version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rlops_stack import actions
from rlops_stack.local import ACTIONS_RECORD, DEFAULT_ROOT

console = Console()


def scale(
    policy: Annotated[str, typer.Argument(help="Served policy (TorchServe model name).")],
    version: Annotated[str, typer.Argument(help="Served version number.")],
    workers: Annotated[
        int, typer.Option("--workers", min=1, max=64, help="Workers the version should have.")
    ],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the actions record).")] = "manual",
    serve_run_dir: Annotated[
        Path, typer.Option("--serve-run-dir", help="Run directory of the local TorchServe.", file_okay=False)
    ] = Path(".rlops/serve"),
    record: Annotated[
        Path, typer.Option("--record", help="Actions record (JSON lines) to append to.", dir_okay=False)
    ] = DEFAULT_ROOT / ACTIONS_RECORD,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Scale one served policy version to --workers workers (waits until they are up)."""
    result = actions.scale(serve_run_dir, policy, version, workers, reason=reason, record_to=record)
    if as_json:
        console.print_json(json.dumps(result.to_json()))
    else:
        console.print(f"{result.outcome}: {result.message}", highlight=False, soft_wrap=True)
    if result.outcome == actions.FAILED:
        raise typer.Exit(1)
