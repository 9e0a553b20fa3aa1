"""``rlops serve traffic``: a real environment driven by the served policy, rewards sent back."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rlops_server.client import DEFAULT_TIMEOUT_S, PolicyClient
from rlops_server.commands import err_console
from rlops_server.commands import fail as _fail
from rlops_server.serving import DEFAULT_RUN_DIR, ServeError, inference_token
from rlops_server.traffic import RewardSender, TrafficError, TrafficSummary, run_traffic

INFERENCE_TOKEN_ENV = "RLOPS_INFERENCE_TOKEN"
FEEDBACK_TOKEN_ENV = "RLOPS_FEEDBACK_TOKEN"


console = Console()


def traffic_token(run_dir: Path) -> str | Callable[[], str | None]:
    """The inference token for a traffic client: ``$RLOPS_INFERENCE_TOKEN`` as given, else the local
    server's key, read afresh whenever the server refuses it, so that the traffic survives a restart of
    the server (TorchServe makes new keys at every start). A broken key file raises ServeError now rather
    than costing every request a fallback; without one (token authorization off) requests carry no token.
    """
    token = os.environ.get(INFERENCE_TOKEN_ENV) or None
    if token is not None:
        return token
    return inference_token(run_dir)


def reward_sender(feedback_url: str | None) -> RewardSender | None:
    """The sender of a traffic run's rewards (with ``$RLOPS_FEEDBACK_TOKEN``), or None without a URL."""
    if not feedback_url:
        return None
    return RewardSender(feedback_url, token=os.environ.get(FEEDBACK_TOKEN_ENV) or None)


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f} ms"


def summary_table(s: TrafficSummary) -> Table:
    table = Table(title=f"Traffic: {s.env_id} driven by {s.model}", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("episodes", f"{s.episodes:,}")
    table.add_row("decisions", f"{s.steps:,} ({s.decisions_per_s:,.0f}/s)")
    table.add_row(
        "mean return",
        f"{s.mean_return:.2f} ± {s.std_return:.2f} (min {s.min_return:g}, max {s.max_return:g})",
    )
    table.add_row("latency p50", _ms(s.latency_p50_ms))
    table.add_row("latency p99", _ms(s.latency_p99_ms))
    table.add_row("errors", f"{s.errors:,}", style="red" if s.errors else None)
    table.add_row("timeouts", f"{s.timeouts:,}", style="yellow" if s.timeouts else None)
    fallbacks = sum(s.fallbacks.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(s.fallbacks.items()))
    table.add_row(
        "fallbacks",
        f"{fallbacks:,}" + (f" ({detail})" if detail else ""),
        style="yellow" if fallbacks else None,
    )
    table.add_row("retries", f"{s.retries:,}")
    table.add_row("versions", ", ".join(f"{v}: {n:,}" for v, n in s.versions.items()) or "-")
    table.add_row(
        "rewards posted",
        f"{s.rewards_posted:,}" + (f" ({s.rewards_failed:,} failed)" if s.rewards_failed else ""),
        style="red" if s.rewards_failed else None,
    )
    if s.rewards_skipped:
        table.add_row("rewards skipped", f"{s.rewards_skipped:,} (client fallback steps)")
    return table


def traffic(
    model: Annotated[str, typer.Option("--model", help="Served model (policy) name.")],
    url: Annotated[str, typer.Option("--url", help="TorchServe inference API.")] = "http://127.0.0.1:8080",
    env: Annotated[str, typer.Option("--env", help="Gymnasium environment id to drive.")] = "CartPole-v1",
    episodes: Annotated[int, typer.Option("--episodes", min=1, help="Episodes to run.")] = 20,
    feedback_url: Annotated[
        str | None,
        typer.Option(
            "--feedback-url", help="Reward service (rlops feedback serve); omit to send no rewards."
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, max=256, help="Episodes run at once.")
    ] = 1,
    version: Annotated[
        str | None,
        typer.Option("--version", help="Ask this version (default: the server's default version)."),
    ] = None,
    timeout_ms: Annotated[
        float, typer.Option("--timeout-ms", min=1, help="Deadline per decision, retries included.")
    ] = DEFAULT_TIMEOUT_S * 1e3,
    fallback_action: Annotated[
        int, typer.Option("--fallback-action", min=0, help="Action taken when no answer comes in time.")
    ] = 0,
    deterministic: Annotated[
        bool | None,
        typer.Option(
            "--deterministic/--stochastic", help="Override the served selection (default: the card's)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Episode i resets the environment with seed + i.")] = 0,
    run_dir: Annotated[
        Path,
        typer.Option(
            "--run-dir",
            help=f"Server run directory whose key file has the inference token (or ${INFERENCE_TOKEN_ENV}).",
        ),
    ] = DEFAULT_RUN_DIR,
    summary: Annotated[Path, typer.Option("--summary", help="Where to write the JSON summary.")] = Path(
        ".rlops/traffic-summary.json"
    ),
) -> None:
    """Drive a real Gymnasium environment with actions from the server; post rewards to the feedback service.

    Prints mean return, client latency p50/p99, error and fallback counts, and writes a JSON summary.
    """
    try:
        token = traffic_token(run_dir)
    except ServeError as e:
        _fail(str(e))
    try:
        client = PolicyClient(
            url,
            model,
            version=version,
            timeout=timeout_ms / 1e3,
            fallback_action=fallback_action,
            token=token,
            pool_size=concurrency,
        )
    except ValueError as e:
        _fail(f"--url / --timeout-ms: {e}")
    sender = reward_sender(feedback_url)
    with Progress(
        TextColumn("episodes"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("last return {task.fields[last]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("episodes", total=episodes, last="-")
        try:
            result = run_traffic(
                client,
                sender,
                env,
                episodes,
                concurrency=concurrency,
                seed=seed,
                deterministic=deterministic,
                on_episode=lambda ret: progress.update(task, advance=1, last=f"{ret:g}"),
            )
        except TrafficError as e:
            _fail(str(e))
        finally:
            client.close()
    console.print(summary_table(result))
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    console.print(f"summary: {summary}", highlight=False)
    if result.steps and result.errors + result.timeouts == result.steps:
        _fail(f"every decision fell back ({result.fallbacks}); is the server at {url} serving {model!r}?")
