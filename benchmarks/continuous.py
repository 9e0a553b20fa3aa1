"""Offline RL with continuous actions (Pendulum-v1 or a MuJoCo task): rlops against d3rlpy, in one run.

    .venv/bin/python benchmarks/continuous.py            # Pendulum-v1, the full benchmark (3 seeds)
    .venv/bin/python benchmarks/continuous.py --quick    # a small run that checks the plumbing
    .venv/bin/python benchmarks/continuous.py --env Hopper-v5 --data-dir DIR   # D4RL-style MuJoCo data

What it does, in order:

1. Datasets. On Pendulum-v1 it collects two with ``rlops data collect``'s behaviours
   (``Settings.behaviors``): "medium" (a partially trained controller explored with Gaussian noise) and
   "medium-replay" (a mixture of that controller's noisy play and uniform random actions), each written in
   D4RL's HDF5 layout (``observations, actions, rewards, terminals, timeouts, next_observations,
   infos/action_log_probs``). On a MuJoCo task it reads ``<task>-medium-replay.hdf5`` and
   ``<task>-medium.hdf5`` from ``--data-dir``, made by ``mujoco_data.py`` from a partly trained SAC run
   the way D4RL made its own. Every file is imported through ``rlops data import --format d4rl-hdf5``:
   what every algorithm trains on.
2. Trains rlops CQL, IQL, TD3+BC and BC, and d3rlpy's CQL, IQL, TD3PlusBC and BC (in d3rlpy's own
   virtual environment, ``benchmarks/.venv-d3rlpy``), per dataset and seed, the same gradient steps,
   batch size and hidden widths; the d3rlpy runs go on in a second process while rlops trains in this
   one (one torch thread each, one core each on a 2-core machine).
3. Rolls every policy out deterministically in the task with the same episode seeds and reports
   normalised returns: on Pendulum-v1 0 is the uniform random policy and 100 the reference controller
   (``--expert-return``); on Hopper, HalfCheetah and Walker2d D4RL's own reference scores.
4. Off-policy evaluation: FQE for candidate policies of graded quality (trained policies served
   deterministically and with exploration noise) next to the discounted return of rollouts (the truth).
5. Writes ``results.json`` and ``results.md`` and checks the targets.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import shlex
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import h5py
import numpy as np
import torch
import typer
from mujoco_data import stem
from mujoco_data import write_d4rl_hdf5 as write_d4rl_columns
from offline import (
    RUNNER,
    call_runner,
    check_behavior,
    check_minimums,
    console,
    machine,
    progress_bar,
    relative_error,
    table_row,
)
from peers import BenchmarkError, ensure_peer
from rlops_trainer import collect, datasets, importers, ope, rollout
from rlops_trainer.algos import for_dataset
from rlops_trainer.datasets import Transitions
from rlops_trainer.policy import Selection
from rlops_trainer.training import RunOptions, TrainResult
from scipy import stats
from torch import nn

BENCH = Path(__file__).resolve().parent
ENV_ID = "Pendulum-v1"
GAMMA = 0.99
DETERMINISTIC = Selection()
MEDIUM = "gaussian:0.3@200000"
"""D4RL's "medium" shape: one partially trained controller (the cross-entropy method's, at half the
budget of the good one in :data:`rlops_trainer.collect.PENDULUM_MIXED`) explored with small noise."""

D4RL_REFERENCE = {
    "Hopper": (-20.272305, 3234.3),
    "HalfCheetah": (-280.178953, 12135.0),
    "Walker2d": (1.629008, 4592.3),
}
"""D4RL's normalisation per task family (``REF_MIN_SCORE``, ``REF_MAX_SCORE`` in d4rl/infos.py): random and
expert returns of the v2 tasks, whose reward terms the v5 tasks keep."""

# (label suffix, rlops algorithm, d3rlpy runner --algo)
ALGOS: tuple[tuple[str, str], ...] = (("CQL", "cql"), ("IQL", "iql"), ("TD3+BC", "td3bc"), ("BC", "bc"))

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)


@dataclass
class Settings:
    seeds: int
    episodes: int
    steps: int
    batch_size: int
    eval_episodes: int
    truth_episodes: int
    fqe_steps: int
    n_bootstrap: int
    data_seed: int
    behaviors: dict[str, str]
    expert_return: float | None
    out: Path
    quick: bool
    env: str = ENV_ID
    data_dir: Path | None = None
    eval_seed: int = 10_000
    truth_seed: int = 20_000


@dataclass
class Run:
    dataset: str
    label: str
    library: str
    algorithm: str
    seed: int
    steps: int
    steps_per_s: float
    returns: list[float]
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Data


def write_d4rl_hdf5(data: Transitions, path: Path) -> Path:
    """``data`` in D4RL's HDF5 layout (what D4RL's MuJoCo datasets look like on disk)."""
    columns = {
        "observations": data.observation,
        "next_observations": data.next_observation,
        "actions": data.action,
        "rewards": data.reward,
        "terminals": data.terminated,
        "timeouts": data.truncated,
    }
    if data.has_propensities:
        columns["infos/action_log_probs"] = data.behavior_logp
    return write_d4rl_columns(columns, path)


def dataset_file(s: Settings, name: str) -> tuple[Path, str]:
    """The HDF5 file of dataset ``name`` and the behaviour that made it: collected here on Pendulum-v1,
    read from ``--data-dir`` otherwise."""
    if s.data_dir is None:
        behavior = s.behaviors[name]
        with console.status(f"collecting {s.episodes} episodes of {s.env} ({name}: {behavior})"):
            collected = collect.collect(s.env, behavior, s.episodes, s.data_seed, progress=False)
            return write_d4rl_hdf5(collected, s.out / "data" / f"{stem(s.env)}-{name}.hdf5"), behavior
    h5 = s.data_dir / f"{stem(s.env)}-{name}.hdf5"
    if not h5.is_file():
        raise BenchmarkError(
            f"--data-dir: {h5} does not exist; make it with benchmarks/mujoco_data.py "
            f"(train, then rollout) --env {s.env} --out {s.data_dir}"
        )
    with h5py.File(h5, "r") as f:
        behavior = str(f.attrs.get("behavior", h5.name))
    return h5, behavior


def prepare_datasets(s: Settings) -> tuple[dict[str, Transitions], dict[str, Path], dict[str, Any]]:
    loaded: dict[str, Transitions] = {}
    paths: dict[str, Path] = {}
    info: dict[str, Any] = {}
    for name in s.behaviors:
        h5, behavior = dataset_file(s, name)
        with console.status(f"importing {h5}"):
            data = importers.import_dataset("d4rl-hdf5", h5, env_id=s.env)
            paths[name] = datasets.save(data, s.out / "data" / f"{stem(s.env)}-{name}.parquet")
        returns = data.episode_returns()
        info[name] = {
            "behavior": behavior,
            "hdf5": str(h5),
            "parquet": str(paths[name]),
            "fingerprint": data.fingerprint(),
            "n_episodes": len(returns),
            "n_transitions": len(data),
            "behavior_return_mean": float(returns.mean()),
            "behavior_return_std": float(returns.std()),
            "behavior_return_max": float(returns.max()),
            "has_log_densities": data.has_propensities,
            "extra": data.meta.extra,
        }
        loaded[name] = data
        console.print(
            f"{name}: {len(returns)} episodes, behaviour return {returns.mean():.1f} -> {paths[name]}"
        )
    return loaded, paths, info


def reference_returns(s: Settings) -> tuple[float, float, str]:
    """The returns that score 0 and 100, and where they come from."""
    family = s.env.split("-")[0]
    if family in D4RL_REFERENCE:
        random, expert = D4RL_REFERENCE[family]
        return random, expert if s.expert_return is None else s.expert_return, "D4RL reference scores"
    if s.expert_return is None:
        raise BenchmarkError(
            f"--expert-return: {s.env} has no reference score; pass the return that scores 100"
        )
    return random_return(s), s.expert_return, "uniform random actions on the evaluation seeds"


def random_return(s: Settings) -> float:
    """Mean return of uniform random actions over the evaluation episodes (the 0 of the normalised scale)."""
    import gymnasium as gym

    env = gym.make(s.env)
    totals = []
    for i in range(s.eval_episodes):
        env.reset(seed=s.eval_seed + i)
        env.action_space.seed(s.eval_seed + i)
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            total += float(reward)
            done = terminated or truncated
        totals.append(total)
    env.close()
    return float(np.mean(totals))


def normalised(value: float, random: float, expert: float) -> float:
    return 100.0 * (value - random) / (expert - random)


# ----------------------------------------------------------------------------------------------------
# Training


def train_ours(algo: str, data: Transitions, seed: int, s: Settings) -> TrainResult:
    config_cls, train = for_dataset(algo, data.meta)
    cfg = config_cls(steps=s.steps, seed=seed, batch_size=s.batch_size)
    return train(cfg, data, RunOptions(out_dir=None, device="cpu", progress=False))


def d3rlpy_job(
    python: Path,
    path: Path,
    algo: str,
    seed: int,
    hidden: tuple[int, ...],
    s: Settings,
    log: Path,
    export: Path,
) -> dict[str, Any]:
    cmd = [
        str(python),
        str(RUNNER),
        f"--dataset={path}",
        f"--algo={algo}",
        f"--seed={seed}",
        f"--steps={s.steps}",
        f"--batch-size={s.batch_size}",
        f"--hidden={','.join(str(w) for w in hidden)}",
        "--eval-episodes=0",
        f"--env-id={s.env}",
        f"--export={export}",
    ]
    return call_runner(cmd, log, f"d3rlpy {algo} seed {seed}")


class ExportedActions(nn.Module):
    """d3rlpy's exported TorchScript policy (observations to actions, scalers inside) seen as a
    deterministic rlops Box policy, so that the same rollout code drives every policy."""

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.module(obs)

    def act(self, obs: torch.Tensor, std: float) -> tuple[torch.Tensor, torch.Tensor]:
        if std > 0:
            raise ValueError("d3rlpy's exported policy is deterministic")
        action = self.module(obs)
        return action, torch.full(action.shape[:-1], math.nan)


def deterministic_returns(policy: nn.Module, s: Settings) -> list[float]:
    result = rollout.rollout(policy, DETERMINISTIC, s.env, s.eval_episodes, s.eval_seed, GAMMA)
    return [float(x) for x in result.returns]


# ----------------------------------------------------------------------------------------------------
# Off-policy evaluation


@dataclass
class Candidate:
    name: str
    policy: nn.Module
    selection: Selection


def ope_candidates(trained: dict[str, TrainResult]) -> list[Candidate]:
    """Trained policies, deterministic and explored, so that the true values spread apart."""
    cands = [Candidate(f"{label} (deterministic)", r.policy, DETERMINISTIC) for label, r in trained.items()]
    cql, bc = trained["rlops CQL"], trained["rlops BC"]
    cands += [
        Candidate("CQL, std 0.5", cql.policy, Selection(std=0.5)),
        Candidate("BC, std 1.0", bc.policy, Selection(std=1.0)),
        Candidate("CQL, std 2.0", cql.policy, Selection(std=2.0)),
    ]
    return cands


def evaluate_candidate(cand: Candidate, data: Transitions, s: Settings) -> dict[str, Any]:
    target = ope.policy_target(cand.policy, cand.selection)
    estimators = ope.possible_estimators(data, target.stochastic)
    ests = ope.evaluate(
        data,
        target,
        gamma=GAMMA,
        estimators=[e for e in ("fqe", "dr") if e in estimators],
        fqe_config=ope.FQEConfig(steps=s.fqe_steps, seed=s.data_seed),
        n_bootstrap=s.n_bootstrap,
    )
    truth = rollout.rollout(cand.policy, cand.selection, s.env, s.truth_episodes, s.truth_seed, GAMMA)
    value = float(truth.discounted_returns.mean())
    return {
        "name": cand.name,
        "selection": dataclasses.asdict(cand.selection),
        "truth": value,
        "truth_undiscounted_return": float(truth.returns.mean()),
        "estimates": {k: e.to_dict() for k, e in ests.items()},
        "relative_error": {k: relative_error(e.value, value) for k, e in ests.items()},
    }


# ----------------------------------------------------------------------------------------------------
# Summary and targets


def summarise(runs: list[Run], random: float, expert: float) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key in sorted({(r.dataset, r.label) for r in runs}):
        mine = [r for r in runs if (r.dataset, r.label) == key]
        per_seed = [float(np.mean(r.returns)) for r in mine]
        scores = [normalised(x, random, expert) for x in per_seed]
        out[f"{key[0]} / {key[1]}"] = {
            "dataset": key[0],
            "label": key[1],
            "library": mine[0].library,
            "return_per_seed": per_seed,
            "return_mean": float(np.mean(per_seed)),
            "score_per_seed": scores,
            "score_mean": float(np.mean(scores)),
            "score_std": float(np.std(scores)),
            "steps_per_s_mean": float(np.mean([r.steps_per_s for r in mine])),
        }
    return out


def check_targets(summary: dict[str, dict[str, Any]], ope_result: dict[str, Any]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    datasets_ = sorted({v["dataset"] for v in summary.values()})
    for name in datasets_:
        for algo in ("CQL", "IQL"):
            ours, theirs = summary[f"{name} / rlops {algo}"], summary[f"{name} / d3rlpy {algo}"]
            targets.append(
                {
                    "target": f"{name}: rlops {algo} normalised return >= d3rlpy {algo} (mean over seeds)",
                    "value": ours["score_mean"],
                    "threshold": theirs["score_mean"],
                    "passed": ours["score_mean"] >= theirs["score_mean"],
                }
            )
    if "medium-replay" in datasets_:
        bc = summary["medium-replay / rlops BC"]["score_mean"]
        for algo in ("CQL", "IQL"):
            ours = summary[f"medium-replay / rlops {algo}"]["score_mean"]
            targets.append(
                {
                    "target": f"medium-replay: rlops {algo} normalised return >= 1.1 x rlops BC",
                    "value": ours,
                    "threshold": 1.1 * bc,
                    "passed": ours >= 1.1 * bc,
                }
            )
    for algo in ("CQL", "IQL", "TD3+BC", "BC"):
        ours = np.mean([v["steps_per_s_mean"] for v in summary.values() if v["label"] == f"rlops {algo}"])
        theirs = np.mean([v["steps_per_s_mean"] for v in summary.values() if v["label"] == f"d3rlpy {algo}"])
        targets.append(
            {
                "target": f"rlops {algo} gradient steps/s >= 2 x d3rlpy {algo} (one CPU thread)",
                "value": float(ours),
                "threshold": float(2 * theirs),
                "passed": bool(ours >= 2 * theirs),
            }
        )
    cands = ope_result["candidates"]
    errors = [abs(c["relative_error"]["fqe"]) for c in cands]
    inside = sum(e <= 0.15 for e in errors)
    targets.append(
        {
            "target": "FQE within ±15 % of the rollout truth for >= 5 candidates",
            "value": f"{inside}/{len(cands)} (worst {max(errors):.1%})",
            "threshold": "5",
            "passed": inside >= 5,
        }
    )
    rho = ope_result["spearman"]["fqe"]
    targets.append(
        {
            "target": f"FQE Spearman rank correlation with the truth >= 0.8 ({len(cands)} candidates)",
            "value": rho,
            "threshold": 0.8,
            "passed": bool(rho >= 0.8) and len(cands) >= 5,
        }
    )
    return targets


def _fmt(x: Any) -> str:
    if isinstance(x, bool):
        return "pass" if x else "FAIL"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    ref = result["reference"]
    lines = [
        f"# Continuous offline RL on {s['env']}: rlops vs d3rlpy {result['d3rlpy'].get('version', '?')}",
        "",
        f"Command: `{result['command']}`  ",
        f"Created {result['created_at']} on {result['machine']['cpu']} ({result['machine']['cores']} cores); "
        f"{s['seeds']} seeds, {s['steps']} gradient steps, batch {s['batch_size']}, "
        f"{s['eval_episodes']} evaluation episodes; elapsed {result['elapsed_s'] / 60:.1f} min.",
        f"Normalised return ({ref['source']}): 0 = {ref['random_return']:.1f}, "
        f"100 = {ref['expert_return']:.1f}.",
        "",
        "## Datasets",
        "",
        table_row(["dataset", "behaviour", "episodes", "transitions", "behaviour return", "normalised"]),
        table_row(["---"] * 6),
    ]
    for name, d in result["datasets"].items():
        score = normalised(d["behavior_return_mean"], ref["random_return"], ref["expert_return"])
        lines.append(
            table_row(
                [
                    name,
                    f"`{d['behavior']}`",
                    str(d["n_episodes"]),
                    str(d["n_transitions"]),
                    f"{d['behavior_return_mean']:.1f} ± {d['behavior_return_std']:.1f}",
                    f"{score:.1f}",
                ]
            )
        )
    lines += [
        "",
        "## Returns and speed",
        "",
        table_row(["dataset", "run", "normalised return (mean ± std over seeds)", "return", "steps/s"]),
        table_row(["---"] * 5),
    ]
    for v in result["summary"].values():
        lines.append(
            table_row(
                [
                    v["dataset"],
                    v["label"],
                    f"{v['score_mean']:.1f} ± {v['score_std']:.1f}",
                    f"{v['return_mean']:.1f}",
                    f"{v['steps_per_s_mean']:.0f}",
                ]
            )
        )
    lines += ["", "## Off-policy evaluation (FQE) against rollout truth", ""]
    lines += [table_row(["candidate", "truth", "FQE [95 % CI]", "error"]), table_row(["---"] * 4)]
    for c in result["ope"]["candidates"]:
        e = c["estimates"]["fqe"]
        lines.append(
            table_row(
                [
                    c["name"],
                    f"{c['truth']:.1f}",
                    f"{e['value']:.1f} [{e['lower']:.1f}, {e['upper']:.1f}]",
                    f"{c['relative_error']['fqe']:+.1%}",
                ]
            )
        )
    lines += [
        "",
        f"Spearman rank correlation (FQE vs truth): {result['ope']['spearman']['fqe']:.2f}",
        "",
        "## Targets",
        "",
        table_row(["target", "value", "threshold", "result"]),
        table_row(["---"] * 4),
    ]
    for t in result["targets"]:
        lines.append(table_row([t["target"], _fmt(t["value"]), _fmt(t["threshold"]), _fmt(t["passed"])]))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Main


def run_benchmark(s: Settings, command: str) -> dict[str, Any]:
    started = time.perf_counter()
    s.out.mkdir(parents=True, exist_ok=True)
    logs = s.out / "logs"
    logs.mkdir(exist_ok=True)
    python = ensure_peer("d3rlpy", logs / "d3rlpy-venv.log")
    data, paths, dataset_info = prepare_datasets(s)
    random, expert, reference_source = reference_returns(s)

    runs: list[Run] = []
    d3: dict[str, Any] = {"python": str(python), "configs": {}}
    first: dict[str, TrainResult] = {}
    seeds = list(range(s.seeds))
    jobs = len(data) * len(seeds) * len(ALGOS)
    with progress_bar(2 * jobs + 1) as advance, ThreadPoolExecutor(max_workers=1) as peer:
        for name, ds in data.items():
            for seed in seeds:
                pending: list[tuple[str, str, Future[dict[str, Any]], Path]] = []
                for label, algo in ALGOS:
                    hidden = tuple(for_dataset(algo, ds.meta)[0]().hidden)
                    export = s.out / "d3rlpy" / f"{name}-{algo}-seed{seed}.pt"
                    log = logs / f"d3rlpy-{name}-{algo}-seed{seed}.log"
                    job = peer.submit(d3rlpy_job, python, paths[name], algo, seed, hidden, s, log, export)
                    pending.append((label, algo, job, export))
                for label, algo in ALGOS:
                    advance(f"{name}, seed {seed}: rlops {label}")
                    trained = train_ours(algo, ds, seed, s)
                    runs.append(
                        Run(
                            name,
                            f"rlops {label}",
                            "rlops",
                            algo,
                            seed,
                            trained.steps,
                            trained.steps / trained.wall_time_s,
                            deterministic_returns(trained.policy, s),
                            {"final_metrics": trained.final_metrics, "config": trained.config},
                        )
                    )
                    if name == "medium-replay" and seed == seeds[0]:
                        first[f"rlops {label}"] = trained
                for label, algo, job, export in pending:
                    advance(f"{name}, seed {seed}: d3rlpy {label}")
                    out = job.result()
                    policy = ExportedActions(torch.jit.load(str(export)))
                    runs.append(
                        Run(
                            name,
                            f"d3rlpy {label}",
                            "d3rlpy",
                            algo,
                            seed,
                            out["steps"],
                            out["loop_steps_per_s"],
                            deterministic_returns(policy, s),
                            {"fit_steps_per_s": out["steps_per_s"], "config": out["config"]},
                        )
                    )
                    d3["version"] = out["version"]
                    d3["configs"][out["algorithm"]] = out["config"]
        advance("off-policy evaluation")
        replay = data["medium-replay"]
        rows = [evaluate_candidate(c, replay, s) for c in ope_candidates(first)]

    truths = [r["truth"] for r in rows]
    spearman = float(stats.spearmanr(truths, [r["estimates"]["fqe"]["value"] for r in rows]).statistic)
    ope_result = {"dataset": "medium-replay", "candidates": rows, "spearman": {"fqe": spearman}}
    summary = summarise(runs, random, expert)
    report: dict[str, Any] = {
        "benchmark": f"offline-{stem(s.env)}",
        "command": command,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(s).items()},
        "reference": {"random_return": random, "expert_return": expert, "source": reference_source},
        "datasets": dataset_info,
        "d3rlpy": d3,
        "runs": [dataclasses.asdict(r) for r in runs],
        "summary": summary,
        "ope": ope_result,
        "targets": check_targets(summary, ope_result),
    }
    report["elapsed_s"] = time.perf_counter() - started
    return report


@app.command()
def main(
    seeds: Annotated[int, typer.Option(help="Training seeds (0 .. N-1) per algorithm and dataset.")] = 3,
    episodes: Annotated[int, typer.Option(help="Episodes per collected dataset (200 steps each).")] = 100,
    steps: Annotated[int, typer.Option(help="Gradient steps of every training run.")] = 3000,
    batch_size: Annotated[int, typer.Option(help="Transitions per gradient step, every run.")] = 256,
    eval_episodes: Annotated[int, typer.Option(help="Deterministic rollouts per trained policy.")] = 10,
    truth_episodes: Annotated[int, typer.Option(help="Rollouts per OPE candidate for the truth.")] = 30,
    fqe_steps: Annotated[int, typer.Option(help="FQE gradient steps per OPE candidate.")] = 5000,
    n_bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of every OPE interval.")] = 300,
    data_seed: Annotated[int, typer.Option(help="Seed of the dataset collection.")] = 0,
    datasets_: Annotated[
        str, typer.Option("--datasets", help="Comma-separated: medium-replay, medium (in this order).")
    ] = "medium-replay",
    medium: Annotated[str, typer.Option(help="Behaviour spec of the 'medium' dataset.")] = MEDIUM,
    medium_replay: Annotated[
        str, typer.Option(help="Behaviour spec of the 'medium-replay' dataset.")
    ] = collect.PENDULUM_MIXED,
    expert_return: Annotated[
        float | None,
        typer.Option(
            help="Return that scores 100 (default: -150, a well-trained controller, on Pendulum-v1; "
            "D4RL's expert score on Hopper, HalfCheetah and Walker2d)."
        ),
    ] = None,
    env: Annotated[
        str, typer.Option(help="Gymnasium task: Pendulum-v1, or a MuJoCo task with --data-dir.")
    ] = ENV_ID,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder with <task>-medium-replay.hdf5 and <task>-medium.hdf5 (benchmarks/mujoco_data.py); "
            "required for any task but Pendulum-v1."
        ),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option("--quick", help="1 seed, 20 episodes, 300 steps: checks the plumbing."),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="Directory for the results (default: results/continuous, or continuous-<task>)."),
    ] = None,
) -> None:
    """Train rlops and d3rlpy CQL, IQL, TD3+BC and BC on continuous datasets; compare normalised returns,
    gradient steps per second and FQE with rollout truth; write results.json and results.md to --out."""
    if quick:
        seeds, episodes, steps, eval_episodes, truth_episodes, fqe_steps, n_bootstrap = (
            1,
            20,
            300,
            2,
            4,
            300,
            50,
        )
    specs = {"medium-replay": medium_replay, "medium": medium}
    names = [n.strip() for n in datasets_.split(",") if n.strip()]
    if not names or any(n not in specs for n in names) or "medium-replay" not in names:
        console.print(f"[red]--datasets: medium-replay and optionally medium, got {datasets_!r}[/red]")
        raise typer.Exit(2)
    behaviors = {n: specs[n] for n in specs if n in names}
    if env == ENV_ID and data_dir is None:
        for name, spec in behaviors.items():
            check_behavior(f"--{name}", spec)
        if expert_return is None:
            expert_return = -150.0
    elif data_dir is None:
        console.print(
            f"[red]--data-dir: {env} data are not collected here; make them with mujoco_data.py[/red]"
        )
        raise typer.Exit(2)
    elif not data_dir.is_dir():
        console.print(f"[red]--data-dir: {data_dir} is not a directory[/red]")
        raise typer.Exit(2)
    if out is None:
        out = BENCH / "results" / ("continuous" if env == ENV_ID else f"continuous-{stem(env)}")
    check_minimums(
        [
            ("--seeds", seeds, 1),
            ("--episodes", episodes, 2),
            ("--steps", steps, 1),
            ("--batch-size", batch_size, 1),
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
        batch_size=batch_size,
        eval_episodes=eval_episodes,
        truth_episodes=truth_episodes,
        fqe_steps=fqe_steps,
        n_bootstrap=n_bootstrap,
        data_seed=data_seed,
        behaviors=behaviors,
        expert_return=expert_return,
        out=out.resolve(),
        quick=quick,
        env=env,
        data_dir=None if data_dir is None else data_dir.resolve(),
    )
    command = shlex.join(["python", "benchmarks/continuous.py", *sys.argv[1:]])
    try:
        result = run_benchmark(settings, command)
    except (BenchmarkError, collect.CollectError, datasets.DatasetError, ope.OPEError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
    (settings.out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (settings.out / "results.md").write_text(markdown(result))
    sys.stdout.write(markdown(result))
    sys.stdout.flush()
    passed = sum(t["passed"] for t in result["targets"])
    console.print(f"{passed}/{len(result['targets'])} targets met in {result['elapsed_s'] / 60:.1f} min")


if __name__ == "__main__":
    app()
