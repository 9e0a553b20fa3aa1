"""``rlops rollback``: put the previous champion back, in the registry and in serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rlops_stack import actions
from rlops_stack.commands import fail
from rlops_stack.local import ACTIONS_RECORD, DEFAULT_ROOT

console = Console()


def rollback(
    policy: Annotated[str, typer.Argument(help="Policy name in the registry.")],
    to: Annotated[
        int | None,
        typer.Option(
            "--to", min=1, help="Roll back through earlier champions until this version is champion."
        ),
    ] = None,
    reason: Annotated[
        str, typer.Option("--reason", help="Why (recorded in the registry history).")
    ] = "manual rollback",
    registry: Annotated[
        Path,
        typer.Option("--registry", envvar="RLOPS_REGISTRY", help="Registry folder.", file_okay=False),
    ] = Path(".rlops/registry"),
    serve_run_dir: Annotated[
        Path,
        typer.Option(
            "--serve-run-dir", help="Run directory of the local TorchServe to switch.", file_okay=False
        ),
    ] = Path(".rlops/serve"),
    registry_only: Annotated[
        bool, typer.Option("--registry-only", help="Move the champion alias only; leave serving alone.")
    ] = False,
    record: Annotated[
        Path, typer.Option("--record", help="Actions record (JSON lines) to append to.", dir_okay=False)
    ] = DEFAULT_ROOT / ACTIONS_RECORD,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Point the champion back at the previous champion (or --to VERSION) and make TorchServe serve it."""
    if not reason.strip():
        fail("--reason must not be empty: it is recorded in the registry history")
    result = actions.rollback(
        registry,
        policy,
        reason=reason,
        to=to,
        serve_run_dir=None if registry_only else serve_run_dir,
        record_to=record,
    )
    if as_json:
        console.print_json(json.dumps(result.to_json()))
    else:
        console.print(f"{result.outcome}: {result.message}", highlight=False, soft_wrap=True)
    if result.outcome == actions.FAILED:
        raise typer.Exit(1)
