"""Offline RL benchmark on a mixed-quality CartPole-v1 dataset: rlops against d3rlpy, in one run.

    .venv/bin/python benchmarks/offline.py            # the full benchmark (5 seeds)
    .venv/bin/python benchmarks/offline.py --quick    # a small run that checks the plumbing

What it does, in order:

1. Collects one dataset with the mixed behaviour ``rlops_trainer.collect.CARTPOLE_MIXED`` and saves it
   as Parquet; every algorithm and seed trains on these same transitions.
2. Creates d3rlpy's own virtual environment (``benchmarks/.venv-d3rlpy``, pins in
   ``requirements-d3rlpy.txt``) when it is missing or stale: d3rlpy 2.8.1 pins gymnasium 1.0.0, which
   cannot share an environment with Ray. ``d3rlpy_runner.py`` trains DiscreteCQL and DiscreteBC there,
   one subprocess per (algorithm, seed), and exports d3rlpy's greedy TorchScript policy.
3. Trains rlops BC, CQL, IQL and BC on the best 10 % of episodes, per seed.
4. Rolls every policy out greedily in CartPole-v1 with the same episode seeds (d3rlpy's exported
   policy too, through the same rollout code), and records gradient steps per second on one thread.
5. Off-policy evaluation: for candidate policies of graded quality, every estimator of
   ``rlops_trainer.ope.evaluate`` next to the discounted return of rollouts (the truth).
6. Writes ``results.json``, ``results.md`` and ``results.png`` and checks the targets.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import machine_info
import numpy as np
import torch
import typer
from peers import BenchmarkError, ensure_peer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rlops_trainer import collect, datasets, ope, rollout
from rlops_trainer.algos import ALGORITHMS
from rlops_trainer.datasets import Transitions
from rlops_trainer.policy import Selection
from rlops_trainer.training import RunOptions, TrainResult
from scipy import stats
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RUNNER = BENCH / "d3rlpy_runner.py"
ENV_ID = "CartPole-v1"
GAMMA = 0.99
GREEDY = Selection(temperature=0.0, epsilon=0.0)

# rlops runs, in table order: (label, algorithm key in ALGORITHMS, trained on the top-10 % subset).
OURS: tuple[tuple[str, str, bool], ...] = (
    ("rlops CQL", "cql", False),
    ("rlops IQL", "iql", False),
    ("rlops BC", "bc", False),
    ("rlops BC top-10%", "bc", True),
)
# d3rlpy runs: (label, runner --algo, the rlops algorithm whose batch size and widths it takes).
THEIRS: tuple[tuple[str, str, str], ...] = (
    ("d3rlpy DiscreteCQL", "cql", "cql"),
    ("d3rlpy DiscreteBC", "bc", "bc"),
)
CQL, BC, TOP10, D3_CQL = "rlops CQL", "rlops BC", "rlops BC top-10%", "d3rlpy DiscreteCQL"

console = Console(stderr=True)
app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)


@dataclass
class Settings:
    seeds: int
    episodes: int
    steps: int
    eval_episodes: int
    truth_episodes: int
    fqe_steps: int
    n_bootstrap: int
    data_seed: int
    behavior: str
    cql_alpha: float | None
    d3rlpy_aligned: bool
    out: Path
    quick: bool
    eval_seed: int = 10_000
    """Rollout episode i of every policy is reset with ``eval_seed + i``: the same starts for all."""
    truth_seed: int = 20_000


@dataclass
class Run:
    label: str
    library: str
    algorithm: str
    seed: int
    steps: int
    wall_s: float
    steps_per_s: float
    returns: list[float]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def return_mean(self) -> float:
        return float(np.mean(self.returns))


# ----------------------------------------------------------------------------------------------------
# The d3rlpy environment and runner


def run_d3rlpy(
    python: Path,
    s: Settings,
    data_path: Path,
    algo: str,
    seed: int,
    aligned_to: Any,
    export: Path,
    log: Path,
) -> dict[str, Any]:
    """One d3rlpy training in its own process; returns the runner's JSON result."""
    cmd = [
        str(python),
        str(RUNNER),
        f"--dataset={data_path}",
        f"--algo={algo}",
        f"--seed={seed}",
        f"--steps={s.steps}",
        f"--batch-size={aligned_to.batch_size}",
        f"--hidden={','.join(str(w) for w in aligned_to.hidden)}",
        f"--eval-episodes={s.eval_episodes}",
        f"--eval-seed={s.eval_seed}",
        f"--env-id={ENV_ID}",
        f"--export={export}",
    ]
    if s.d3rlpy_aligned:
        cmd += ["--align", f"--lr={aligned_to.lr}"]
        if algo == "cql":
            # d3rlpy copies the target network every N steps; rlops blends it in with rate tau
            # every target_update_every steps. The copy interval with the same time constant is
            # target_update_every / tau.
            interval = max(1, round(aligned_to.target_update_every / aligned_to.tau))
            cmd += [
                f"--gamma={aligned_to.gamma}",
                f"--target-update={interval}",
                f"--alpha={aligned_to.alpha}",
            ]
    return call_runner(cmd, log, f"d3rlpy {algo} seed {seed}")


def call_runner(cmd: list[str], log: Path, what: str) -> dict[str, Any]:
    """Run a runner script on one thread, its stderr to ``log``; returns the JSON line it prints last."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise BenchmarkError(f"{what} failed (exit code {done.returncode}); see {log}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


class GreedyActions(nn.Module):
    """A policy that outputs action indices (d3rlpy's export) seen through rlops' ``action_probs``."""

    def __init__(self, actions: Callable[[torch.Tensor], torch.Tensor], n_actions: int) -> None:
        super().__init__()
        self.actions = actions
        self.n_actions = n_actions

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.actions(obs).long().view(-1), self.n_actions).float()

    def action_probs(self, obs: torch.Tensor, temperature: float, epsilon: float) -> torch.Tensor:
        return (1.0 - epsilon) * self.forward(obs) + epsilon / self.n_actions


# ----------------------------------------------------------------------------------------------------
# rlops side


def top_episodes(data: Transitions, fraction: float) -> tuple[Transitions, dict[str, Any]]:
    """The best ``fraction`` of episodes by undiscounted return (at least one)."""
    returns = data.episode_returns()
    ids = data.episode_id[data.episode_starts()]
    k = max(1, math.ceil(fraction * len(returns)))
    # Stable sort on -return: ties go to the earlier episode, so the subset is deterministic.
    best = np.argsort(-returns, kind="stable")[:k]
    subset = data.select(np.isin(data.episode_id, ids[best]))
    info = {
        "fraction": fraction,
        "episodes": int(k),
        "transitions": len(subset),
        "return_mean": float(returns[best].mean()),
        "return_min": float(returns[best].min()),
    }
    return subset, info


def our_config(algo: str, seed: int, steps: int, s: Settings) -> Any:
    """The algorithm's default config with this run's steps and seed (and CQL alpha when given)."""
    fields: dict[str, Any] = {"steps": steps, "seed": seed}
    if algo == "cql" and s.cql_alpha is not None:
        fields["alpha"] = s.cql_alpha
    return ALGORITHMS[algo][0](**fields)


def train_ours(algo: str, data: Transitions, seed: int, steps: int, s: Settings) -> TrainResult:
    train = ALGORITHMS[algo][1]
    return train(
        our_config(algo, seed, steps, s), data, RunOptions(out_dir=None, device="cpu", progress=False)
    )


def greedy_returns(policy: nn.Module, s: Settings) -> list[float]:
    """Undiscounted returns of greedy rollouts, episode ``i`` reset with ``s.eval_seed + i``."""
    result = rollout.rollout(policy, GREEDY, ENV_ID, s.eval_episodes, s.eval_seed, GAMMA)
    return [float(x) for x in result.returns]


# ----------------------------------------------------------------------------------------------------
# Off-policy evaluation


@dataclass
class Candidate:
    name: str
    policy: nn.Module
    selection: Selection


def ope_candidates(trained: dict[str, TrainResult], short_cql: TrainResult) -> list[Candidate]:
    """Policies of graded quality, each stochastic (every action keeps some probability).

    Several trained policies reach the maximum return on CartPole, and policies with the same true value
    cannot be ranked by any estimator: a rank correlation over them would measure noise. Different
    exploration rates on top of the trained policies spread the true values apart.
    """
    cql, iql, bc, top = (trained[k] for k in (CQL, "rlops IQL", BC, TOP10))

    def eps(e: float) -> Selection:
        return Selection(temperature=0.0, epsilon=e)

    # Truths on CartPole for a near-perfect base policy: about 99, 93, 78, 66, 50, 33 and 21.
    return [
        Candidate(f"CQL, epsilon {cql.selection.epsilon:g} (served)", cql.policy, cql.selection),
        Candidate("IQL, epsilon 0.25", iql.policy, eps(0.25)),
        Candidate("BC top-10%, epsilon 0.35", top.policy, eps(0.35)),
        Candidate(f"CQL after {short_cql.steps} steps, epsilon 0.45", short_cql.policy, eps(0.45)),
        Candidate("BC, softmax temperature 1", bc.policy, Selection(temperature=1.0, epsilon=0.0)),
        Candidate("CQL, epsilon 0.7", cql.policy, eps(0.7)),
        Candidate("uniform random", cql.policy, eps(1.0)),
    ]


N_CANDIDATES = 7


def evaluate_candidate(cand: Candidate, data: Transitions, s: Settings) -> dict[str, Any]:
    ests = ope.evaluate(
        data,
        ope.policy_probs_fn(cand.policy, cand.selection),
        gamma=GAMMA,
        fqe_config=ope.FQEConfig(steps=s.fqe_steps, seed=s.data_seed),
        n_bootstrap=s.n_bootstrap,
    )
    truth = rollout.rollout(cand.policy, cand.selection, ENV_ID, s.truth_episodes, s.truth_seed, GAMMA)
    value = float(truth.discounted_returns.mean())
    return {
        "name": cand.name,
        "selection": dataclasses.asdict(cand.selection),
        "truth": value,
        "truth_ci": truth.estimate(n_bootstrap=s.n_bootstrap).to_dict(),
        "truth_undiscounted_return": float(truth.returns.mean()),
        "estimates": {k: e.to_dict() for k, e in ests.items()},
        "relative_error": {k: relative_error(e.value, value) for k, e in ests.items()},
    }


def relative_error(estimate: float, truth: float) -> float:
    return (estimate - truth) / abs(truth) if truth else math.inf


def ope_summary(rows: list[dict[str, Any]], s: Settings) -> dict[str, Any]:
    estimators = list(rows[0]["estimates"])
    truths = [c["truth"] for c in rows]
    spearman = {
        e: float(stats.spearmanr([c["estimates"][e]["value"] for c in rows], truths).statistic)
        for e in estimators
    }
    return {
        "gamma": GAMMA,
        "truth_episodes": s.truth_episodes,
        "fqe_steps": s.fqe_steps,
        "fqe_models": ope.FQEConfig().ensemble,
        "estimators": estimators,
        "candidates": rows,
        "spearman": spearman,
    }


# ----------------------------------------------------------------------------------------------------
# Summary, targets, report


def summarise(runs: list[Run]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r.label for r in runs):
        rs = sorted((r for r in runs if r.label == label), key=lambda r: r.seed)
        per_seed = [r.return_mean for r in rs]
        rates = [r.steps_per_s for r in rs]
        out[label] = {
            "seeds": [r.seed for r in rs],
            "return_per_seed": per_seed,
            "return_mean": float(np.mean(per_seed)),
            "return_std": float(np.std(per_seed)),
            "steps_per_s_per_seed": rates,
            "steps_per_s_mean": float(np.mean(rates)),
        }
    return out


def check_targets(
    summary: dict[str, dict[str, Any]], ope_result: dict[str, Any], dataset: dict[str, Any]
) -> list[dict[str, Any]]:
    cql = summary[CQL]
    n = len(cql["return_per_seed"])
    need = math.ceil(0.8 * n)
    above = sum(r >= 400 for r in cql["return_per_seed"])
    behaviour = dataset["behavior_return_mean"]
    targets = [
        {
            "target": "dataset condition: the behaviour policy averages at most 150 return",
            "value": behaviour,
            "threshold": 150.0,
            "passed": behaviour <= 150.0,
        },
        {
            "target": "CQL return >= d3rlpy DiscreteCQL return (mean over seeds)",
            "value": cql["return_mean"],
            "threshold": summary[D3_CQL]["return_mean"],
            "passed": cql["return_mean"] >= summary[D3_CQL]["return_mean"],
        },
        {
            "target": "CQL return >= 1.2 x BC return (mean over seeds)",
            "value": cql["return_mean"],
            "threshold": 1.2 * summary[BC]["return_mean"],
            "passed": cql["return_mean"] >= 1.2 * summary[BC]["return_mean"],
        },
        {
            "target": "CQL return >= BC on the best 10 % of episodes (mean over seeds)",
            "value": cql["return_mean"],
            "threshold": summary[TOP10]["return_mean"],
            "passed": cql["return_mean"] >= summary[TOP10]["return_mean"],
        },
        {
            "target": f"CQL return >= 400 in at least {need} of {n} seeds",
            "value": above,
            "threshold": need,
            "passed": above >= need,
        },
        {
            "target": "CQL gradient steps/s >= 2 x d3rlpy DiscreteCQL (one CPU thread)",
            "value": cql["steps_per_s_mean"],
            "threshold": 2 * summary[D3_CQL]["steps_per_s_mean"],
            "passed": cql["steps_per_s_mean"] >= 2 * summary[D3_CQL]["steps_per_s_mean"],
        },
    ]
    cands = ope_result["candidates"]
    for est in ("fqe", "dr"):
        errors = [abs(c["relative_error"][est]) for c in cands]
        inside = sum(e <= 0.10 for e in errors)
        targets.append(
            {
                "target": f"{est.upper()} within ±10 % of the rollout truth for every candidate",
                "value": f"{inside}/{len(cands)} (worst {max(errors):.1%})",
                "threshold": f"{len(cands)}/{len(cands)}",
                "passed": inside == len(cands),
            }
        )
        rho = ope_result["spearman"][est]
        targets.append(
            {
                "target": f"{est.upper()} Spearman rank correlation with the truth >= 0.9 "
                f"({len(cands)} candidates)",
                "value": rho,
                "threshold": 0.9,
                "passed": bool(rho >= 0.9) and len(cands) >= 5,
            }
        )
    return targets


def _fmt(x: Any) -> str:
    if isinstance(x, bool):
        return "pass" if x else "FAIL"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def table_row(cells: list[str]) -> str:
    """One row of a Markdown table."""
    return "| " + " | ".join(cells) + " |"


def check_behavior(flag: str, spec: str) -> None:
    """Exit 2 with the collector's message when ``spec`` is not a behaviour ``rlops data collect`` takes."""
    try:
        collect.parse_behavior(spec)
    except collect.CollectError as e:
        console.print(f"[red]{flag}: {e}[/red]")
        raise typer.Exit(2) from None


def check_minimums(options: list[tuple[str, int, int]]) -> None:
    """Exit 2 naming the first ``(flag, value, minimum)`` whose value is below its minimum."""
    for flag, value, low in options:
        if value < low:
            console.print(f"[red]{flag} must be at least {low}, got {value}[/red]")
            raise typer.Exit(2)


def markdown(result: dict[str, Any]) -> str:
    s, summary, data = result["settings"], result["summary"], result["dataset"]
    seeds = summary[CQL]["seeds"]
    top = data["top10"]
    d3, bc = summary[D3_CQL]["return_mean"], summary[BC]["return_mean"]
    lines = [
        "# Offline RL benchmark: mixed CartPole-v1, rlops vs d3rlpy",
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['created_at']}; {result['machine']['cpu']}, {result['machine']['cores']} cores, one "
        f"torch thread per process; total time {result['elapsed_s'] / 60:.1f} min.",
        "",
        f"Dataset: {data['n_episodes']} episodes, {data['n_transitions']} transitions of "
        f"`{data['behavior']}`; behaviour return {data['behavior_return_mean']:.1f} ± "
        f"{data['behavior_return_std']:.1f}. Best 10 %: {top['episodes']} episodes, {top['transitions']} "
        f"transitions, return ≥ {top['return_min']:.0f}. Every run: {s['steps']} gradient steps. Returns: "
        f"greedy rollouts, {s['eval_episodes']} episodes per seed, the same episode seeds for every policy.",
        "",
        "## Return and speed",
        "",
        table_row(
            ["policy", *(f"seed {i}" for i in seeds), "mean ± std", "vs d3rlpy CQL", "vs rlops BC", "steps/s"]
        ),
        table_row(["---", *("---:" for _ in seeds), "---:", "---:", "---:", "---:"]),
    ]
    for label, row in summary.items():
        mean = row["return_mean"]
        lines.append(
            table_row(
                [
                    label,
                    *(f"{x:.1f}" for x in row["return_per_seed"]),
                    f"{mean:.1f} ± {row['return_std']:.1f}",
                    f"{mean / d3:.2f}×",
                    f"{mean / bc:.2f}×",
                    f"{row['steps_per_s_mean']:.0f}",
                ]
            )
        )
    behaviour = data["behavior_return_mean"]
    lines.append(
        table_row(
            [
                "behaviour policy (data)",
                *("" for _ in seeds),
                f"{behaviour:.1f}",
                f"{behaviour / d3:.2f}×",
                f"{behaviour / bc:.2f}×",
                "",
            ]
        )
    )
    speed = summary[CQL]["steps_per_s_mean"] / summary[D3_CQL]["steps_per_s_mean"]
    alpha = f", except CQL alpha {s['cql_alpha']:g}" if s["cql_alpha"] is not None else ""
    lines += [
        "",
        f"Gradient steps per second on one CPU thread: rlops CQL runs {speed:.2f}× d3rlpy DiscreteCQL. "
        f"rlops algorithms use their default configs{alpha}. "
        f"d3rlpy settings aligned with rlops: {', '.join(result['d3rlpy']['aligned'])}; everything else is "
        "d3rlpy's default.",
    ]
    o = result["ope"]
    ests = o["estimators"]
    lines += [
        "",
        f"## Off-policy evaluation (gamma {o['gamma']}, truth: {o['truth_episodes']} rollouts per candidate)",
        "",
        "Discounted return; estimates with their bootstrap interval. ESS: effective sample size of the "
        f"importance weights (of {result['dataset']['n_episodes']} episodes); where it collapses, the "
        "importance-sampling estimates rest on a handful of episodes and doubly robust leans on FQE.",
        "",
        table_row(["candidate", "truth", *ests, "ESS", "FQE error", "DR error"]),
        table_row(["---", "---:", *("---:" for _ in ests), "---:", "---:", "---:"]),
    ]
    for c in o["candidates"]:
        cells = []
        for e in ests:
            est = c["estimates"][e]
            cells.append(f"{est['value']:.2f} [{est['lower']:.1f}, {est['upper']:.1f}]")
        err = c["relative_error"]
        ess = c["estimates"]["dr"]["ess"]
        ess_cell = f"{ess:.1f}" if ess is not None else ""
        lines.append(
            table_row(
                [c["name"], f"{c['truth']:.2f}", *cells, ess_cell, f"{err['fqe']:+.1%}", f"{err['dr']:+.1%}"]
            )
        )
    rhos = ", ".join(f"{e} {o['spearman'][e]:.3f}" for e in ests)
    lines += ["", f"Spearman rank correlation with the truth: {rhos}."]
    lines += [
        "",
        "## Targets",
        "",
        table_row(["target", "value", "threshold", "result"]),
        table_row(["---", "---:", "---:", "---"]),
    ]
    for t in result["targets"]:
        lines.append(table_row([t["target"], _fmt(t["value"]), _fmt(t["threshold"]), _fmt(t["passed"])]))
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    summary = result["summary"]
    labels = list(summary)
    for i, label in enumerate(labels):
        ys = summary[label]["return_per_seed"]
        ax.scatter(np.full(len(ys), i) + np.linspace(-0.12, 0.12, len(ys)), ys, s=25, zorder=3)
        ax.hlines(summary[label]["return_mean"], i - 0.3, i + 0.3, colors="black", zorder=4)
    ax.axhline(result["dataset"]["behavior_return_mean"], ls="--", c="grey", label="behaviour policy")
    ax.axhline(400, ls=":", c="red", label="target 400")
    ax.set_xticks(range(len(labels)), [lbl.replace(" ", "\n", 1) for lbl in labels], fontsize=8)
    ax.set_ylabel("greedy return (mean over rollouts)")
    ax.set_title("Return per seed (dots) and mean (bar)")
    ax.legend(fontsize=8)
    ax = axes[1]
    if result.get("ope"):
        cands = result["ope"]["candidates"]
        truth = np.array([c["truth"] for c in cands])
        for est in result["ope"]["estimators"]:
            ys = np.array([c["estimates"][est]["value"] for c in cands])
            ax.scatter(truth, ys, label=est, s=25)
        lim = [0.0, max(truth.max(), 1.0) * 1.15]
        ax.plot(lim, lim, c="black", lw=1)
        ax.fill_between(
            lim, [0.9 * v for v in lim], [1.1 * v for v in lim], color="grey", alpha=0.2, label="±10 %"
        )
        ax.set_xlim(lim)
        ax.set_ylim(lim)
        ax.set_xlabel("rollout truth (discounted return)")
        ax.set_ylabel("OPE estimate")
        ax.set_title("Off-policy estimates vs truth")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Main


@contextmanager
def progress_bar(total: int) -> Iterator[Callable[[str], None]]:
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    with bar:
        task = bar.add_task("starting", total=total)
        first = [True]

        def advance(description: str) -> None:
            if not first[0]:
                bar.advance(task)
            first[0] = False
            bar.update(task, description=description)

        yield advance
        bar.advance(task)


def machine() -> dict[str, Any]:
    return machine_info.machine() | {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def prepare_dataset(s: Settings) -> tuple[Transitions, Path, dict[str, Any]]:
    with console.status(f"collecting {s.episodes} episodes of {ENV_ID} with {s.behavior}"):
        data = collect.collect(
            env_id=ENV_ID,
            behavior=s.behavior,
            episodes=s.episodes,
            seed=s.data_seed,
            progress=False,
        )
        path = datasets.save(data, s.out / "dataset.parquet")
    returns = data.episode_returns()
    info = {
        "path": str(path),
        "fingerprint": data.fingerprint(),
        "behavior": data.meta.behavior_policy,
        "n_episodes": len(returns),
        "n_transitions": len(data),
        "behavior_return_mean": float(returns.mean()),
        "behavior_return_std": float(returns.std()),
        "behavior_return_max": float(returns.max()),
        "behavior_discounted_value": ope.behavior_value(data, gamma=GAMMA, n_bootstrap=s.n_bootstrap).value,
        "extra": data.meta.extra,
    }
    console.print(
        f"dataset: {len(returns)} episodes, {len(data)} transitions, behaviour return "
        f"{returns.mean():.1f} (max {returns.max():.0f}) -> {path}"
    )
    return data, path, info


def run_benchmark(s: Settings, command: str) -> dict[str, Any]:
    started = time.perf_counter()
    load_at_start = list(os.getloadavg())
    s.out.mkdir(parents=True, exist_ok=True)
    logs = s.out / "logs"
    logs.mkdir(exist_ok=True)
    python = ensure_peer("d3rlpy", logs / "d3rlpy-venv.log")
    data, data_path, dataset_info = prepare_dataset(s)
    top10, dataset_info["top10"] = top_episodes(data, 0.10)

    seeds = list(range(s.seeds))
    runs: list[Run] = []
    first_seed: dict[str, TrainResult] = {}
    d3: dict[str, Any] = {"python": str(python), "configs": {}}
    ope_rows: list[dict[str, Any]] = []
    with progress_bar(len(seeds) * (len(OURS) + len(THEIRS)) + 1 + N_CANDIDATES) as advance:
        for seed in seeds:
            for label, algo, on_top in OURS:
                advance(f"seed {seed}: {label}")
                trained = train_ours(algo, top10 if on_top else data, seed, s.steps, s)
                rate = trained.steps / trained.wall_time_s
                extra = {"final_metrics": trained.final_metrics, "config": trained.config}
                runs.append(
                    Run(
                        label,
                        "rlops",
                        algo,
                        seed,
                        trained.steps,
                        trained.wall_time_s,
                        rate,
                        greedy_returns(trained.policy, s),
                        extra,
                    )
                )
                if seed == seeds[0]:
                    first_seed[label] = trained
            for label, algo, like in THEIRS:
                advance(f"seed {seed}: {label}")
                export = s.out / "d3rlpy" / f"{algo}-seed{seed}.pt"
                log = logs / f"d3rlpy-{algo}-seed{seed}.log"
                out = run_d3rlpy(
                    python, s, data_path, algo, seed, our_config(like, seed, s.steps, s), export, log
                )
                policy = GreedyActions(torch.jit.load(str(export)), data.meta.n_actions)
                extra = {
                    # The runner's own rollouts, in gymnasium 1.0: they should equal ours (same seeds).
                    "runner_returns": out["eval_returns"],
                    "fit_steps_per_s": out["steps_per_s"],
                    "config": out["config"],
                }
                runs.append(
                    Run(
                        label,
                        "d3rlpy",
                        algo,
                        seed,
                        out["steps"],
                        out["fit_wall_s"],
                        # First to last gradient step inside fit(), leaving out fit()'s own setup, as
                        # the rlops rate leaves out everything before its loop.
                        out["loop_steps_per_s"],
                        greedy_returns(policy, s),
                        extra,
                    )
                )
                d3["version"] = out["version"]
                d3["configs"][out["algorithm"]] = out["config"]

        short_steps = max(1, s.steps // 5)
        advance(f"OPE: a short CQL run ({short_steps} steps) as one more candidate")
        short = train_ours("cql", data, seeds[0], short_steps, s)
        for cand in ope_candidates(first_seed, short):
            advance(f"OPE: {cand.name}")
            ope_rows.append(evaluate_candidate(cand, data, s))

    summary = summarise(runs)
    ope_result = ope_summary(ope_rows, s)
    d3["aligned"] = ["gradient steps", "batch size", "hidden layer widths", "one torch thread"]
    if s.d3rlpy_aligned:
        d3["aligned"] += [
            "learning rate",
            "CQL gamma, alpha and target update (copy every target_update_every / tau steps)",
        ]
    report: dict[str, Any] = {
        "benchmark": "offline-cartpole-mixed",
        "command": command,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine() | {"load_average_at_start": load_at_start},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(s).items()},
        "dataset": dataset_info,
        "d3rlpy": d3,
        "runs": [dataclasses.asdict(r) | {"return_mean": r.return_mean} for r in runs],
        "summary": summary,
        "ope": ope_result,
        "targets": check_targets(summary, ope_result, dataset_info),
    }
    report["elapsed_s"] = time.perf_counter() - started
    return report


@app.command()
def main(
    seeds: Annotated[int, typer.Option(help="Training seeds (0 .. N-1) per algorithm.")] = 5,
    episodes: Annotated[int, typer.Option(help="Episodes in the collected dataset.")] = 1000,
    steps: Annotated[
        int, typer.Option(help="Gradient steps of every training run, rlops and d3rlpy.")
    ] = 5000,
    eval_episodes: Annotated[int, typer.Option(help="Greedy rollouts per trained policy.")] = 20,
    truth_episodes: Annotated[int, typer.Option(help="Rollouts per OPE candidate for the truth.")] = 300,
    fqe_steps: Annotated[int, typer.Option(help="FQE gradient steps per OPE candidate.")] = (
        ope.FQEConfig.steps
    ),
    n_bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of every OPE interval.")] = 1000,
    data_seed: Annotated[int, typer.Option(help="Seed of the dataset collection.")] = 0,
    behavior: Annotated[
        str, typer.Option(help="Behaviour spec of the dataset (see 'rlops data collect --help').")
    ] = collect.CARTPOLE_MIXED,
    cql_alpha: Annotated[
        float | None, typer.Option(help="CQL penalty weight for rlops CQL; default: CQLConfig's default.")
    ] = None,
    d3rlpy_aligned: Annotated[
        bool,
        typer.Option(help="Also give d3rlpy rlops' learning rate, CQL gamma, alpha and target update."),
    ] = False,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="A small run that checks the plumbing: 1 seed, 300 episodes, 300 steps, 300 FQE steps, "
            "few rollouts (overrides those options).",
        ),
    ] = False,
    out: Annotated[Path, typer.Option(help="Directory for the results.")] = BENCH / "results" / "offline",
) -> None:
    """Train rlops BC, CQL, IQL and BC on the best 10 % of episodes, and d3rlpy DiscreteCQL and DiscreteBC,
    on one mixed CartPole-v1 dataset; compare returns, gradient steps per second and off-policy estimates
    with rollout truth; write results.json, results.md and results.png to --out."""
    if quick:
        seeds, episodes, steps, eval_episodes, truth_episodes, fqe_steps, n_bootstrap = (
            1,
            300,
            300,
            3,
            10,
            300,
            100,
        )
    if cql_alpha is not None and cql_alpha < 0:
        console.print(f"[red]--cql-alpha must be >= 0, got {cql_alpha}[/red]")
        raise typer.Exit(2)
    check_behavior("--behavior", behavior)
    check_minimums(
        [
            ("--seeds", seeds, 1),
            ("--episodes", episodes, 10),
            ("--steps", steps, 1),
            ("--eval-episodes", eval_episodes, 1),
            ("--truth-episodes", truth_episodes, 2),
            ("--fqe-steps", fqe_steps, 1),
            ("--n-bootstrap", n_bootstrap, 10),
        ]
    )
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    settings = Settings(
        seeds=seeds,
        episodes=episodes,
        steps=steps,
        eval_episodes=eval_episodes,
        truth_episodes=truth_episodes,
        fqe_steps=fqe_steps,
        n_bootstrap=n_bootstrap,
        data_seed=data_seed,
        behavior=behavior,
        cql_alpha=cql_alpha,
        d3rlpy_aligned=d3rlpy_aligned,
        out=out.resolve(),
        quick=quick,
    )
    command = shlex.join(["python", "benchmarks/offline.py", *sys.argv[1:]])
    try:
        result = run_benchmark(settings, command)
    except (BenchmarkError, collect.CollectError, datasets.DatasetError, ope.OPEError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    out_dir = settings.out
    (out_dir / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / "results.md").write_text(markdown(result))
    plot(result, out_dir / "results.png")
    # Plain stdout: the table stays copyable, without the console's line wrapping.
    sys.stdout.write(markdown(result))
    sys.stdout.flush()
    passed = sum(t["passed"] for t in result["targets"])
    console.print(
        f"{passed}/{len(result['targets'])} targets met in {result['elapsed_s'] / 60:.1f} min. Results: "
        f"{out_dir / 'results.json'}, {out_dir / 'results.md'}, {out_dir / 'results.png'}"
    )


if __name__ == "__main__":
    app()
