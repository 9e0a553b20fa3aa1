"""``rlops data``: record, import and inspect transition datasets."""

from __future__ import annotations

import json
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from rlops_trainer import datasets
from rlops_trainer.collect import CollectError, collect
from rlops_trainer.commands import fail as _fail
from rlops_trainer.commands import group
from rlops_trainer.datasets import LOW_PROPENSITY, DatasetError, Transitions
from rlops_trainer.importers import import_dataset

console = Console()

app = group(
    "data",
    "Record, import and inspect transition datasets (Parquet, one row per transition).",
)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _num(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.{digits}f}"


def _stats_table(summary: dict[str, Any]) -> Table:
    table = Table(title="Episodes", title_justify="left")
    table.add_column("")
    for col in ("mean", "std", "min", "p25", "median", "p75", "max"):
        table.add_column(col, justify="right")
    for label, key in (("return", "returns"), ("length", "episode_length")):
        stats = summary[key]
        if stats is not None:
            table.add_row(
                label, *(_num(stats[c], 1) for c in ("mean", "std", "min", "p25", "median", "p75", "max"))
            )
    return table


def _histogram(summary: dict[str, Any], width: int = 40) -> Table:
    hist = summary["return_histogram"]
    counts, edges = hist["counts"], hist["edges"]
    table = Table(title="Return histogram", title_justify="left", box=None, show_header=False, pad_edge=False)
    table.add_column("bin", justify="right", style="dim")
    table.add_column("count", justify="right")
    table.add_column("bar")
    peak = max(counts, default=0) or 1
    for i, count in enumerate(counts):
        bar = "█" * round(width * count / peak) or ("▏" if count else "")
        table.add_row(f"{edges[i]:,.0f} – {edges[i + 1]:,.0f}", str(count), f"[cyan]{bar}[/cyan]")
    return table


def _actions_table(summary: dict[str, Any]) -> Table:
    prop = summary["propensity"]
    per_action = {row["action"]: row for row in prop["per_action"]}
    table = Table(title="Actions and propensity coverage", title_justify="left")
    for col in (
        "action",
        "count",
        "share",
        "min propensity",
        "median propensity",
        "ESS (always this action)",
    ):
        table.add_column(col, justify="right")
    actions = summary["actions"]
    for a, (count, share) in enumerate(zip(actions["counts"], actions["shares"], strict=True)):
        row = per_action.get(a)
        table.add_row(
            str(a),
            _num(count),
            f"{share:.1%}",
            _num(row["min_propensity"], 3) if row else "-",
            _num(row["median_propensity"], 3) if row else "-",
            f"{_num(row['ess'], 0)} ({row['ess_share']:.1%})" if row else "-",
        )
    return table


def _box_actions_table(summary: dict[str, Any]) -> Table:
    table = Table(title="Actions per dimension (raw units)", title_justify="left")
    for col in ("dim", "bounds", "mean", "std", "min", "p25", "median", "p75", "max", "at a bound"):
        table.add_column(col, justify="right")
    for row in summary["actions"]["dimensions"]:
        table.add_row(
            str(row["dimension"]),
            f"[{row['low']:g}, {row['high']:g}]",
            *(_num(row[c], 3) for c in ("mean", "std", "min", "p25", "median", "p75", "max")),
            f"{row['share_at_bound']:.1%}",
        )
    return table


def _space(space: dict[str, Any]) -> str:
    if space["type"] == "Discrete":
        return f"Discrete({space['n']})"
    low, high = space["low"], space["high"]
    if len(set(map(str, low))) == 1 and len(set(map(str, high))) == 1:
        bounds = f"{low[0]}, {high[0]}"  # one bound for every dimension, as gymnasium prints it
    else:
        bounds = f"{low}, {high}"
    return f"Box({bounds}, {tuple(space['shape'])})"


def _coverage(summary: dict[str, Any]) -> str:
    prop = summary["propensity"]
    if prop.get("kind") == "log_density":
        stats = prop["log_density"]
        if stats is None:
            return "none (behavior_logp unknown: importance-sampling estimators cannot run)"
        return (
            f"{prop['share_with_propensity']:.0%} of rows; log-density min {_num(stats['min'], 2)}, "
            f"median {_num(stats['median'], 2)}, max {_num(stats['max'], 2)}"
        )
    low_key = f"share_below_{LOW_PROPENSITY}"
    if prop["min"] is None:
        return "none (behavior_logp unknown: importance-sampling estimators cannot run)"
    return (
        f"{prop['share_with_propensity']:.0%} of rows; min {_num(prop['min'], 3)}, median "
        f"{_num(prop['median'], 3)}, {prop[low_key]:.1%} below {LOW_PROPENSITY}"
    )


def render_summary(summary: dict[str, Any]) -> Group:
    """Rich tables for a :func:`rlops_trainer.datasets.inspect` summary."""
    overview = Table(title="Dataset", title_justify="left", show_header=False)
    overview.add_column("", style="bold", no_wrap=True)
    overview.add_column("", overflow="fold")
    obs = summary["observation_space"]
    rows = [
        ("environment", summary["env_id"]),
        ("source", summary["source"]),
        ("behaviour policy", summary["behavior_policy"]),
        ("transitions", _num(summary["n_transitions"])),
        (
            "episodes",
            f"{_num(summary['n_episodes'])} ({summary['episodes_terminated']:,} terminated, "
            f"{summary['episodes_truncated']:,} truncated)",
        ),
        ("observation space", f"{obs['type']}{tuple(obs['shape'])}"),
        ("action space", _space(summary["action_space"])),
        ("propensities", _coverage(summary)),
        ("fingerprint", summary["fingerprint"]),
    ]
    for label, value in rows:
        overview.add_row(label, escape(str(value)))
    continuous = summary["action_space"]["type"] == "Box"
    actions = _box_actions_table(summary) if continuous else _actions_table(summary)
    return Group(overview, _stats_table(summary), _histogram(summary), actions)


def _report(t: Transitions, where: Path, elapsed_s: float, verb: str) -> None:
    console.print(render_summary(datasets.inspect(t)))
    console.print(
        f"[green]{verb}[/green] {len(t):,} transitions to [bold]{escape(str(where))}[/bold] "
        f"in {elapsed_s:.1f} s"
    )


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


@app.command("collect")
def collect_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write (replaced atomically).")],
    env: Annotated[
        str, typer.Option("--env", help="Gymnasium environment id (Discrete or Box actions).")
    ] = "CartPole-v1",
    behavior: Annotated[
        str | None,
        typer.Option(
            "--behavior",
            help="Behaviour policy. Discrete: random | eps-greedy:<eps>[@<steps>]; Box: uniform | "
            "gaussian:<std>[@<steps>]; mixture:<component>=<weight>,... (one component per episode). "
            "Default: the mixed-quality behaviour (CartPole-style for Discrete, Pendulum-style for Box).",
            show_default=False,
        ),
    ] = None,
    policy_dir: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            help="Box actions: an exported policy directory (policy.pt) for the gaussian components to "
            "explore around, instead of the built-in controller.",
            show_default=False,
        ),
    ] = None,
    episodes: Annotated[
        int, typer.Option("--episodes", "-n", min=1, help="Number of episodes to record.")
    ] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed gives the same dataset.")] = 0,
    max_episode_steps: Annotated[
        int | None,
        typer.Option(
            "--max-episode-steps", min=1, help="Time limit for environments registered without one."
        ),
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Record a dataset by running a behaviour policy in a Gymnasium environment."""
    start = time.perf_counter()
    try:
        t = collect(
            env,
            behavior,
            episodes,
            seed,
            progress=progress,
            max_episode_steps=max_episode_steps,
            policy_dir=policy_dir,
        )
        path = datasets.save(t, out)
    except (CollectError, DatasetError) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write {out}: {e}")
    _report(t, path, time.perf_counter() - start, "wrote")


class ImportFormat(StrEnum):
    d4rl_hdf5 = "d4rl-hdf5"
    d4rl_pkl = "d4rl-pkl"
    minari = "minari"


class BehaviorDistribution(StrEnum):
    gaussian = "gaussian"
    tanh_gaussian = "tanh_gaussian"


@app.command("import")
def import_cmd(
    source: Annotated[
        str,
        typer.Argument(
            help="Input file (D4RL), or a local Minari dataset id or directory.", show_default=False
        ),
    ],
    fmt: Annotated[
        ImportFormat, typer.Option("--format", "-f", help="Format of the input.", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write (replaced atomically).")],
    env_id: Annotated[
        str | None, typer.Option("--env-id", help="Environment id, when the input does not record one.")
    ] = None,
    n_actions: Annotated[
        int | None,
        typer.Option(
            "--n-actions", min=1, help="Number of discrete actions, when the input does not record it."
        ),
    ] = None,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="Allow loading a .pkl file. Unpickling executes code stored in the file: "
            "only for files you trust.",
        ),
    ] = False,
    action_low: Annotated[
        list[float] | None,
        typer.Option(
            "--action-low",
            help="Box actions: lower bound, once (every dimension) or once per dimension in order, when "
            "Gymnasium does not know the environment (e.g. -1 for D4RL MuJoCo tasks).",
            show_default=False,
        ),
    ] = None,
    action_high: Annotated[
        list[float] | None,
        typer.Option(
            "--action-high",
            help="Box actions: upper bound, given like --action-low.",
            show_default=False,
        ),
    ] = None,
    behavior_distribution: Annotated[
        BehaviorDistribution | None,
        typer.Option(
            "--behavior-distribution",
            help="Box actions: what infos/action_mean and infos/action_log_std describe, when the file "
            "does not say (metadata/policy/output_distribution). Default: gaussian.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Import a D4RL HDF5 / .pkl file or a local Minari dataset into the native Parquet format."""
    start = time.perf_counter()
    try:
        t = import_dataset(
            fmt.value,
            source,
            env_id=env_id,
            n_actions=n_actions,
            allow_pickle=allow_pickle,
            action_low=action_low or None,
            action_high=action_high or None,
            behavior_distribution=behavior_distribution.value if behavior_distribution else None,
        )
        path = datasets.save(t, out)
    except DatasetError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write {out}: {e}")
    _report(t, path, time.perf_counter() - start, "imported")


@app.command("inspect")
def inspect_cmd(
    path: Annotated[
        Path, typer.Argument(help="Parquet file or directory of part files.", show_default=False)
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON (for scripts).")] = False,
) -> None:
    """Summarise a dataset: episodes, returns, actions, propensity coverage, provenance."""
    try:
        t = datasets.load(path)
    except DatasetError as e:
        _fail(str(e))
    summary = datasets.inspect(t)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, allow_nan=False))
    else:
        console.print(render_summary(summary))
