"""``rlops feedback``: receive rewards, and join them with the decision log into a dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rlops_server.commands import err_console, group
from rlops_server.commands import fail as _fail
from rlops_server.feedback import serve as serve_feedback
from rlops_server.join import JoinError, JoinStats, join

TOKEN_ENV = "RLOPS_FEEDBACK_TOKEN"


console = Console()

app = group(
    "feedback",
    "Reward feedback: the service that receives rewards, and the join into a training dataset.",
)


@app.command()
def serve(
    directory: Annotated[
        Path, typer.Option("--dir", help="Log root: rewards go to DIR/rewards/date=YYYY-MM-DD/part-*.jsonl.")
    ] = Path(".rlops/logs"),
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1 keeps it on this machine).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8090,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help=f"File holding a bearer token that POST /rewards must present (or set ${TOKEN_ENV}).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Run the reward service: POST /rewards, GET /healthz, GET /metrics (until Ctrl-C / SIGTERM)."""
    token = os.environ.get(TOKEN_ENV) or None
    if token_file is not None:
        token = token_file.read_text(encoding="utf-8").strip()
        if not token:
            _fail(f"--token-file {token_file} is empty; put the token on its first line")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail(f"--dir {directory}: cannot create it ({e.strerror})")
    auth = "bearer token required" if token else "no token: keep it on a private address"
    err_console.print(
        f"rewards → {directory}/rewards · http://{host}:{port}/rewards · {auth}", highlight=False
    )
    serve_feedback(directory, host, port, token=token)


def _stats_table(stats: JoinStats, out: Path) -> Table:
    table = Table(title=f"Joined dataset → {out}", title_justify="left")
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_column("meaning", style="dim")
    rows = [
        ("transitions", stats.transitions, f"written, in {stats.episodes} episodes"),
        ("decisions", stats.decisions, f"read from {stats.decision_files} files"),
        ("rewards", stats.rewards, f"read from {stats.reward_files} files"),
        ("unrewarded decisions", stats.unrewarded_decisions, "no reward yet: left out"),
        ("orphan rewards", stats.orphan_rewards, "no decision logged for them: left out"),
        ("duplicate decisions", stats.duplicate_decisions, "same decision_id again: earliest kept"),
        ("duplicate rewards", stats.duplicate_rewards, "same decision_id again: earliest kept"),
        ("invalid decisions", stats.invalid_decisions, "unreadable lines: skipped"),
        ("invalid rewards", stats.invalid_rewards, "unreadable lines: skipped"),
        ("other policy", stats.other_policy, "decisions of other policies: left out"),
        ("step conflicts", stats.step_conflicts, "second decision at one step: left out"),
        ("no next observation", stats.no_next_observation, "next step missing and none in the reward"),
        ("after episode end", stats.after_episode_end, "steps after terminated/truncated: left out"),
        ("mismatched", stats.mismatched, "observation size or action outside the model's spaces"),
    ]
    for label, n, meaning in rows:
        style = "yellow" if n and label not in ("transitions", "decisions", "rewards") else None
        table.add_row(label, f"{n:,}", meaning, style=style)
    return table


@app.command("join")
def join_command(
    decisions: Annotated[
        Path, typer.Option(help="Decision log root (holding decisions/) or its decisions/ directory.")
    ] = Path(".rlops/logs"),
    rewards: Annotated[
        Path, typer.Option(help="Reward log root (holding rewards/) or its rewards/ directory.")
    ] = Path(".rlops/logs"),
    out: Annotated[Path, typer.Option(help="Parquet file to write (the trainer's dataset format).")] = Path(
        "joined.parquet"
    ),
    policy: Annotated[
        str | None, typer.Option(help="Policy whose decisions to join (needed when the log holds several).")
    ] = None,
    registry: Annotated[
        Path | None,
        typer.Option(
            help="Registry with the served versions' model cards (default: $RLOPS_REGISTRY, .rlops/registry)."
        ),
    ] = None,
    env_id: Annotated[
        str | None, typer.Option(help="Environment id for the metadata (default: the model card's).")
    ] = None,
    obs_dim: Annotated[
        int | None,
        typer.Option(help="Observation size, with --n-actions and --env-id, instead of model cards."),
    ] = None,
    n_actions: Annotated[
        int | None, typer.Option(help="Number of discrete actions (with --obs-dim).")
    ] = None,
    ray: Annotated[
        bool, typer.Option("--ray", help="Run the join on Ray Data ($RAY_ADDRESS, or a local instance).")
    ] = False,
    report: Annotated[Path | None, typer.Option(help="Also write the counts as JSON to this file.")] = None,
) -> None:
    """Join decisions and rewards by decision_id into transitions; write them as a Parquet dataset."""
    if out.suffix != ".parquet":
        _fail(f"--out {out}: the dataset is written as Parquet; give a path ending in .parquet")
    try:
        stats = join(
            decisions,
            rewards,
            out,
            policy=policy,
            registry=registry,
            env_id=env_id,
            obs_dim=obs_dim,
            n_actions=n_actions,
            use_ray=ray,
        )
    except JoinError as e:
        _fail(str(e))
    console.print(_stats_table(stats, out))
    console.print(f"behaviour policy: served:{stats.policy}@{','.join(stats.versions)}", highlight=False)
    for example in stats.examples:
        err_console.print(f"[yellow]skipped[/yellow] {escape(example)}", highlight=False)
    if report is not None:
        payload = {**stats.counts(), "policy": stats.policy, "versions": stats.versions, "out": str(out)}
        payload["examples"] = stats.examples
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
