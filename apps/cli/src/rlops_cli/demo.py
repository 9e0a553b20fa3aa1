"""``rlops demo``: the whole loop on one machine, step by step, with the real commands.

Every step is an ``rlops`` command run as its own process, exactly as a user would type it, so the demo
doubles as a walkthrough: the commands are printed before they run and the summary says where each
result went and how long each step took.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()

POLICY_NAME = "cartpole"
ENV_ID = "CartPole-v1"


@dataclass
class Step:
    title: str
    args: list[str]
    outputs: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _rlops(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "rlops_cli.main", *args]


def _run(step: Step, env: dict[str, str]) -> None:
    console.rule(f"[bold]{step.title}")
    console.print(f"[dim]$ rlops {shlex.join(step.args)}")
    start = time.perf_counter()
    proc = subprocess.run(_rlops(step.args), env=env, check=False)
    step.seconds = time.perf_counter() - start
    if proc.returncode != 0:
        console.print(f"[red]step '{step.title}' failed with exit code {proc.returncode}")
        raise typer.Exit(proc.returncode)


def _best_passing(report_path: Path) -> list[dict[str, object]]:
    """Candidates whose gate passed, best lower bound first."""
    report = json.loads(report_path.read_text())
    passing = [p for p in report["policies"] if p.get("gate") and p["gate"]["promote"]]
    return sorted(passing, key=lambda p: float(p["gate"]["candidate_lower"]), reverse=True)


def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Folder for data, runs, reports and the registry.")
    ] = Path(".rlops/demo"),
    episodes: Annotated[int, typer.Option(help="Episodes of logged data to collect.", min=10)] = 200,
    steps: Annotated[int, typer.Option(help="Gradient steps per training run.", min=100)] = 20000,
    env_episodes: Annotated[
        int, typer.Option(help="Ground-truth rollouts per policy in the evaluation.", min=0)
    ] = 20,
    seed: Annotated[int, typer.Option(help="Seed for collection and training.")] = 0,
) -> None:
    """Run the loop on this machine: collect → train BC and CQL → OPE report → gate → registry."""
    from rlops_trainer.collect import CARTPOLE_MIXED

    d = directory.resolve()
    data = d / "data" / "cartpole-mixed.parquet"
    runs = d / "runs"
    reports = d / "reports" / "offline"
    registry = d / "registry"
    # Reports are wide tables: give them room when the output is a log rather than a terminal.
    columns = str(max(shutil.get_terminal_size((140, 40)).columns, 140))
    env = {**os.environ, "RLOPS_REGISTRY": str(registry), "OMP_NUM_THREADS": "1", "COLUMNS": columns}

    plan = [
        Step(
            "collect a mixed-quality dataset",
            [
                "data",
                "collect",
                "--env",
                ENV_ID,
                "--behavior",
                CARTPOLE_MIXED,
                "--episodes",
                str(episodes),
                "--seed",
                str(seed),
                "--out",
                str(data),
            ],
            [data],
        ),
        *(
            Step(
                f"train {algo.upper()}",
                [
                    "train",
                    algo,
                    "--data",
                    str(data),
                    "--out",
                    str(runs / algo),
                    "--steps",
                    str(steps),
                    "--seed",
                    str(seed),
                    "--name",
                    POLICY_NAME,
                ],
                [runs / algo / "policy"],
            )
            for algo in ("bc", "cql")
        ),
        Step(
            "off-policy evaluation with confidence intervals, next to rollout truth",
            [
                "evaluate",
                "--data",
                str(data),
                "--policy",
                str(runs / "bc" / "policy"),
                "--policy",
                str(runs / "cql" / "policy"),
                "--registry",
                str(registry),
                "--champion",
                POLICY_NAME,
                "--env-episodes",
                str(env_episodes),
                "--out",
                str(reports),
            ],
            [reports / "report.json", reports / "report.png"],
        ),
    ]
    console.print(f"[bold]rlops demo[/] — everything goes under {d}")
    for step in plan:
        _run(step, env)

    passing = _best_passing(reports / "report.json")
    gate_steps: list[Step] = []
    if not passing:
        console.print("[yellow]no candidate passed the gate: the registry keeps its current champion")
    for p in passing[:1]:
        ref = str(p["ref"])
        publish = Step(
            f"publish {Path(ref).parent.name.upper()} to the registry",
            ["registry", "publish", ref, "--name", POLICY_NAME, "--report", str(reports / "report.json")],
            [registry / POLICY_NAME],
        )
        _run(publish, env)
        version = max(int(v.name) for v in (registry / POLICY_NAME).iterdir() if v.name.isdigit())
        promote = Step("promote it through the gate", ["registry", "promote", POLICY_NAME, str(version)])
        _run(promote, env)
        gate_steps += [publish, promote]
    listing = Step("the registry now", ["registry", "list"])
    _run(listing, env)

    table = Table(title="rlops demo: steps")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    table.add_column("output")
    for step in [*plan, *gate_steps, listing]:
        table.add_row(step.title, f"{step.seconds:.1f}", "\n".join(str(o) for o in step.outputs))
    console.print(table)
