"""``rlops loop``: the continuous-learning loop on this machine, one iteration per run (cron it).

Exit codes of ``run-once``: 0 when the iteration ended (promoted, rolled back, rejected by a gate, or,
with ``--canary none``, handed off at the candidate alias) or there was not enough new data; 1 when it
stopped on an error and can be resumed; 2 for bad input.
"""

from __future__ import annotations

import json
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rlops_contracts.registry import DEFAULT_REGISTRY, REGISTRY_ENV
from rlops_server.commands import err_console, fail, group
from rlops_server.plan import DEFAULT_DECISION_LOG_DIR
from rlops_server.serving import DEFAULT_RUN_DIR, ServeError
from rlops_stack import prometheus
from rlops_trainer.registry import RegistryError

from rlops_delivery import analysis, loop, opegate, records
from rlops_delivery import config as loop_config
from rlops_delivery.commands import AnalysisOption, PrometheusUrlOption, analysis_path, prometheus_url
from rlops_delivery.rollout import LocalServing, Rollout, RolloutError, RolloutSettings
from rlops_delivery.serving import ServingError, restart_with_candidate

console = Console()

app = group("loop", "Continuous learning: served logs → join → retrain → OPE gate → canary → decision.")

DEFAULT_STATE_DIR = Path(".rlops/loop")

ConfigOption = Annotated[Path, typer.Option("--config", help="Loop config (YAML).", dir_okay=False)]
StateOption = Annotated[
    Path,
    typer.Option("--state-dir", help="Where the loop keeps its state and iterations.", file_okay=False),
]


@app.command("run-once")
def run_once(
    config: ConfigOption,
    logs: Annotated[
        Path, typer.Option("--logs", help="Log root with decisions/ and rewards/.", file_okay=False)
    ] = DEFAULT_DECISION_LOG_DIR,
    registry: Annotated[
        Path, typer.Option("--registry", envvar=REGISTRY_ENV, help="Registry folder.", file_okay=False)
    ] = DEFAULT_REGISTRY,
    state_dir: StateOption = DEFAULT_STATE_DIR,
    run_dir: Annotated[
        Path, typer.Option("--serve-run-dir", help="Run directory of the local TorchServe.", file_okay=False)
    ] = DEFAULT_RUN_DIR,
    prometheus_url_: PrometheusUrlOption = None,
    analysis_file: AnalysisOption = None,
    canary_mode: Annotated[
        str,
        typer.Option(
            "--canary",
            help="local: canary on the local TorchServe (restarted with the candidate); none: end the "
            "iteration at the candidate alias and leave the canary to the platform (Argo Rollouts).",
        ),
    ] = "local",
    as_json: Annotated[bool, typer.Option("--json", help="Print the iteration as JSON.")] = False,
) -> None:
    """One iteration of the loop; resumes an interrupted one; does nothing without enough new data."""
    if canary_mode not in ("local", "none"):
        fail(f"--canary {canary_mode!r}: accepted: local, none")
    try:
        cfg = loop_config.load_config(config)
        spec = analysis.load(analysis_path(analysis_file))
        settings = RolloutSettings.from_analysis(
            spec,
            steps=cfg.canary.steps,
            interval_s=cfg.canary.interval_s,
            step_min_s=cfg.canary.step_min_s,
            step_timeout_s=cfg.canary.step_timeout_s,
        )
    except (loop_config.LoopError, analysis.AnalysisError, ValueError) as e:
        fail(str(e))
    if not logs.is_dir():
        fail(
            f"--logs {logs}: no such folder (serving writes decisions/ there, the feedback service rewards/)"
        )
    url = prometheus_url(prometheus_url_)

    def canary(version: int) -> dict[str, Any]:
        rollout = Rollout(
            registry,
            cfg.policy,
            version,
            analysis=spec,
            settings=settings,
            query=partial(prometheus.query, url),
            serving=LocalServing(run_dir),
            report=_say,
        )
        return rollout.run().to_json()

    the_loop = loop.Loop(
        cfg,
        loop.Paths(logs=logs, registry=registry, state_dir=state_dir, serve_run_dir=run_dir),
        canary=canary if canary_mode == "local" else None,
        load_candidate=lambda version: restart_with_candidate(registry, cfg.policy, version, run_dir),
        report=_say,
    )
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        result = the_loop.run_once()
    except (
        loop_config.LoopError,
        opegate.OPEGateError,
        RolloutError,
        RegistryError,
        ServingError,
        ServeError,
        records.RolloutBusy,
        prometheus.PrometheusError,
    ) as e:
        err_console.print(
            f"[red]error:[/red] {escape(str(e))}\n"
            "the iteration stopped; run rlops loop run-once again to resume",
            soft_wrap=True,
        )
        raise typer.Exit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if as_json:
        console.print_json(json.dumps(result))


def _say(line: str) -> None:
    console.print(escape(line), highlight=False, soft_wrap=True)


@app.command()
def status(
    config: ConfigOption,
    state_dir: StateOption = DEFAULT_STATE_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print the state as JSON.")] = False,
) -> None:
    """The loop's iterations: when, how much data, what the gate and the canary decided."""
    try:
        cfg = loop_config.load_config(config)
        state = loop.LoopState.read(state_dir / cfg.policy / loop.STATE_FILE, cfg.policy)
    except loop_config.LoopError as e:
        fail(str(e))
    if as_json:
        console.print_json(
            json.dumps({"policy": state.policy, "consumed": state.consumed, "iterations": state.iterations})
        )
        return
    table = Table(
        title=f"loop of {cfg.policy}: {len(state.consumed)} decision files consumed", title_justify="left"
    )
    for col in ("iteration", "stage", "new transitions", "trained on", "version", "outcome", "reason"):
        table.add_column(col, overflow="fold")
    for it in state.iterations:
        table.add_row(
            it["id"],
            it["stage"],
            str(it.get("new_transitions", "-")),
            str(it.get("transitions", "-")),
            str(it.get("version", "-")),
            it.get("outcome", "-"),
            escape(str(it.get("reason", ""))),
        )
    console.print(table)
