"""Online RL benchmark on CartPole-v1: rlops PPO against Stable-Baselines3 PPO and RLlib's default PPO.

    .venv/bin/python benchmarks/online.py            # the full benchmark: 5 seeds of each, one run
    .venv/bin/python benchmarks/online.py --quick    # a small run that checks the plumbing (1 seed)

Every run is its own process, started here one after the other and interleaved by seed (SB3, RLlib,
rlops for seed 0, then seed 1, …), so that each pays its imports and start-up and a change in the
machine's load touches all three alike:

* SB3: ``sb3_runner.py`` in SB3's own environment ``benchmarks/.venv-sb3`` (built on first use from
  ``requirements-sb3.txt``), rl-zoo3's CartPole-v1 hyperparameters.
* RLlib: ``online_runner.py rllib``: ``PPOConfig().environment("CartPole-v1")``, RLlib's defaults.
* rlops: ``online_runner.py rlops``: ``rlops_trainer.online`` with ``configs/online/cartpole-ppo.yaml``.

The criterion is the same for all: the mean return of the last ``--window`` finished training episodes
reaches ``--target``. Reported per run: wall time to it from process start and from the first training
step (so Ray's start-up is apart), environment steps to it, environment steps per second over the whole
training, start-up time. RLlib and rlops report after every training iteration, SB3 after every
episode: the two Ray-based runs are timed at the end of the iteration in which the criterion held,
which can only make them look slower. Writes ``results.json``, ``results.md`` and ``results.png`` to
``--out`` and checks the targets (rlops ≤ 1.5× SB3's time from the first step, ≤ 0.5× RLlib's,
≥ 3,000 env steps/s, at least 4 of 5 seeds solved).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from machine_info import machine
from peers import ensure_peer
from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
FRAMEWORKS = ("sb3", "rllib", "rlops")
LABELS = {"sb3": "SB3 PPO (rl-zoo)", "rllib": "RLlib PPO (defaults)", "rlops": "rlops PPO"}
COLORS = {"sb3": "tab:blue", "rllib": "tab:orange", "rlops": "tab:green"}

console = Console(stderr=True)
app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)


@dataclass
class Settings:
    seeds: int
    frameworks: tuple[str, ...]
    target: float
    window: int
    max_seconds: float
    max_env_steps: int
    rlops_set: tuple[str, ...]
    scaling: int


# ----------------------------------------------------------------------------------------------------
# One run


def run_one(framework: str, seed: int, s: Settings, sb3_python: Path | None, log_dir: Path) -> dict[str, Any]:
    common = [
        "--seed",
        str(seed),
        "--target",
        str(s.target),
        "--window",
        str(s.window),
        "--max-seconds",
        str(s.max_seconds),
    ]
    if framework == "sb3":
        assert sb3_python is not None
        cmd = [str(sb3_python), str(BENCH / "sb3_runner.py"), *common]
    else:
        cmd = [sys.executable, str(BENCH / "online_runner.py"), framework, *common]
        cmd += ["--max-env-steps", str(s.max_env_steps)]
        if framework == "rlops":
            for item in s.rlops_set:
                cmd += ["--set", item]
    log = log_dir / f"{framework}-seed{seed}.log"
    spawned = time.time()
    cmd += ["--spawned-at", repr(spawned)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as err:
        done = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            timeout=s.max_seconds + 300,
            check=False,
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"framework": framework, "seed": seed, "error": f"exit code {done.returncode}; see {log}"}
    return summarise_run(json.loads(lines[-1][len("RESULT ") :]), s)


def summarise_run(raw: dict[str, Any], s: Settings) -> dict[str, Any]:
    spawned, first = raw["spawned_at"], raw["t_first_step"]
    hit = next((p for p in raw["points"] if p[2] is not None and p[2] >= s.target), None)
    run = {
        "framework": raw["framework"],
        "seed": raw["seed"],
        "solved": hit is not None,
        "startup_s": first - spawned,
        "env_steps": raw["env_steps"],
        "train_time_s": raw["train_time_s"],
        "env_steps_per_s": raw["env_steps"] / raw["train_time_s"] if raw["train_time_s"] > 0 else None,
        "config": raw.get("config"),
        # Mean return of the window over wall time from the first training step, for the plot.
        "curve": [[p[1] - first, p[0], p[2]] for p in raw["points"]],
    }
    if hit is not None:
        run |= {
            "env_steps_to_target": hit[0],
            "time_from_first_step_s": hit[1] - first,
            "time_from_process_start_s": hit[1] - spawned,
        }
    return run


# ----------------------------------------------------------------------------------------------------
# Summary, targets, report


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(runs: list[dict[str, Any]], s: Settings) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for fw in s.frameworks:
        mine = [r for r in runs if r["framework"] == fw and "error" not in r]
        solved = [r for r in mine if r["solved"]]
        first = [r["time_from_first_step_s"] for r in solved]
        out[fw] = {
            "runs": len([r for r in runs if r["framework"] == fw]),
            "failed": len([r for r in runs if r["framework"] == fw and "error" in r]),
            "solved": len(solved),
            "time_from_first_step_s": _median(first),
            "time_from_first_step_range": [min(first), max(first)] if first else None,
            "time_from_process_start_s": _median([r["time_from_process_start_s"] for r in solved]),
            "env_steps_to_target": _median([r["env_steps_to_target"] for r in solved]),
            "env_steps_per_s": _median([r["env_steps_per_s"] for r in mine if r["env_steps_per_s"]]),
            "startup_s": _median([r["startup_s"] for r in mine]),
        }
    return out


def ratio(ours: dict[str, Any], theirs: dict[str, Any], s: Settings) -> dict[str, Any] | None:
    """rlops' median time from the first step over another's; a bound when the other never solved."""
    if ours.get("time_from_first_step_s") is None:
        return None
    if theirs.get("time_from_first_step_s") is not None:
        return {"value": ours["time_from_first_step_s"] / theirs["time_from_first_step_s"], "bound": None}
    if theirs.get("runs"):
        # Unsolved within the time limit: its time is above max_seconds, so the ratio is below this.
        return {"value": ours["time_from_first_step_s"] / s.max_seconds, "bound": "upper"}
    return None


def check_targets(
    summary: dict[str, dict[str, Any]], ratios: dict[str, Any], s: Settings
) -> list[dict[str, Any]]:
    ours = summary.get("rlops", {})
    checks = []

    def add(name: str, value: Any, ok: bool | None, rule: str) -> None:
        checks.append({"target": name, "value": value, "ok": ok, "rule": rule})

    for other, limit in (("sb3", 1.5), ("rllib", 0.5)):
        r = ratios.get(other)
        add(
            f"time from first step vs {LABELS[other]}",
            r,
            None if r is None else r["value"] <= limit,
            f"<= {limit}x",
        )
    rate = ours.get("env_steps_per_s")
    add("rlops env steps/s", rate, None if rate is None else rate >= 3000, ">= 3,000")
    need = -(-4 * s.seeds // 5)  # 4 of 5, scaled to the number of seeds
    add(
        "rlops seeds solved",
        ours.get("solved"),
        None if not ours else ours["solved"] >= need,
        f">= {need} of {s.seeds}",
    )
    return checks


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _ratio_text(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    return f"{'< ' if r['bound'] == 'upper' else ''}{r['value']:.2f}x"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"# Online benchmark: PPO on CartPole-v1 ({result['date']})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, Python "
        f"{result['machine']['python']}; load average at the end {result['machine']['load_average_at_end']}.",
        "",
        f"Criterion: mean return of the last {s['window']} training episodes >= {s['target']:g}; "
        f"{s['seeds']} seeds; a run stops at the criterion or after {s['max_seconds']:g} s of training.",
        "",
        "| framework | seeds solved | time to target from first step (median, range) | from process start | "
        "env steps to target | env steps/s | start-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for fw, row in result["summary"].items():
        rng = row["time_from_first_step_range"]
        span = f" ({rng[0]:.1f}–{rng[1]:.1f})" if rng else ""
        lines.append(
            f"| {LABELS[fw]} | {row['solved']}/{row['runs']} | "
            f"{_fmt(row['time_from_first_step_s'])} s{span} | {_fmt(row['time_from_process_start_s'])} s | "
            f"{_fmt(row['env_steps_to_target'], 0)} | "
            f"{_fmt(row['env_steps_per_s'], 0)} | {_fmt(row['startup_s'])} s |"
        )
    lines += ["", "| target | value | rule | met |", "|---|---|---|---|"]
    for c in result["targets"]:
        value = _ratio_text(c["value"]) if isinstance(c["value"], dict) else _fmt(c["value"], 0)
        met = {True: "yes", False: "no", None: "not measured"}[c["ok"]]
        lines.append(f"| {c['target']} | {value} | {c['rule']} | {met} |")
    lines += [
        "",
        "Runs:",
        "",
        "| framework | seed | solved | from first step | from process start | env steps | env steps/s |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {LABELS[r['framework']]} | {r['seed']} | error: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {LABELS[r['framework']]} | {r['seed']} | {'yes' if r['solved'] else 'no'} | "
            f"{_fmt(r.get('time_from_first_step_s'))} s | {_fmt(r.get('time_from_process_start_s'))} s | "
            f"{_fmt(r.get('env_steps_to_target'), 0)} | {_fmt(r['env_steps_per_s'], 0)} |"
        )
    if result.get("scaling"):
        lines += ["", "rlops env steps/s by number of EnvRunner actors:", "", "| env runners | env steps/s |"]
        lines.append("|---|---|")
        for row in result["scaling"]:
            lines.append(f"| {row['env_runners']} | {_fmt(row.get('env_steps_per_s'), 0)} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["settings"]
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in result["runs"]:
        if "error" in r:
            continue
        pts = [(t, m) for t, _steps, m in r["curve"] if m is not None]
        if pts:
            curves.plot(*zip(*pts, strict=True), color=COLORS[r["framework"]], alpha=0.7, lw=1.2)
    for fw in result["summary"]:
        curves.plot([], [], color=COLORS[fw], label=LABELS[fw])
    curves.axhline(s["target"], color="grey", ls="--", lw=1)
    curves.set_xlabel("seconds from the first training step")
    curves.set_ylabel(f"mean return of the last {s['window']} episodes")
    curves.set_title("Learning curves, every seed")
    curves.legend(loc="lower right")
    names = list(result["summary"])
    medians = [result["summary"][fw]["time_from_first_step_s"] or 0.0 for fw in names]
    for i, fw in enumerate(names):
        row = result["summary"][fw]
        rng = row["time_from_first_step_range"]
        err = [[medians[i] - rng[0]], [rng[1] - medians[i]]] if rng else None
        bars.bar(i, medians[i], color=COLORS[fw], yerr=err, capsize=6)
        bars.text(i, medians[i], f" {row['solved']}/{row['runs']} solved", ha="center", va="bottom")
    bars.set_xticks(range(len(names)), [LABELS[fw] for fw in names])
    bars.set_ylabel(f"seconds to mean return >= {s['target']:g} (median, range)")
    bars.set_title("Time to target from the first training step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scaling(s: Settings, log_dir: Path) -> list[dict[str, Any]]:
    """rlops env steps/s with 1..N EnvRunner actors (fixed budget, no target)."""
    rows = []
    for runners in range(1, s.scaling + 1):
        settings = Settings(**{**s.__dict__, "target": 1e12, "max_env_steps": 100_000})
        settings.rlops_set = (*s.rlops_set, f"resources.env_runners={runners}", "stop.iterations=20")
        run = run_one("rlops", 0, settings, None, log_dir)
        rows.append(
            {"env_runners": runners, "env_steps_per_s": run.get("env_steps_per_s"), "error": run.get("error")}
        )
        console.print(f"scaling: {runners} env runners: {_fmt(run.get('env_steps_per_s'), 0)} env steps/s")
    return rows


# ----------------------------------------------------------------------------------------------------
# Entry point


@app.command()
def main(
    seeds: Annotated[int, typer.Option(help="Seeds per framework.")] = 5,
    frameworks: Annotated[
        str, typer.Option(help="Comma-separated subset of sb3,rllib,rlops.")
    ] = "sb3,rllib,rlops",
    target: Annotated[float, typer.Option(help="Mean return that counts as solved.")] = 475.0,
    window: Annotated[int, typer.Option(help="Training episodes behind the mean return.")] = 20,
    max_seconds: Annotated[
        float, typer.Option(help="Training seconds a run may take before it is unsolved.")
    ] = 600.0,
    max_env_steps: Annotated[
        int, typer.Option(help="Env-step budget of the RLlib and rlops runs.")
    ] = 1_000_000,
    rlops_set: Annotated[
        list[str] | None,
        typer.Option("--rlops-set", help="Override of the rlops config, key=value (repeatable)."),
    ] = None,
    scaling_runners: Annotated[
        int, typer.Option("--scaling", help="Also measure rlops env steps/s with 1..N EnvRunners (0: off).")
    ] = 0,
    quick: Annotated[
        bool, typer.Option(help="Plumbing check: 1 seed, 60 s and 30,000 env steps a run.")
    ] = False,
    out: Annotated[Path, typer.Option(help="Where results go.")] = BENCH / "results" / "online",
) -> None:
    """Run the benchmark (see the module docstring)."""
    chosen = tuple(f.strip() for f in frameworks.split(",") if f.strip())
    unknown = sorted(set(chosen) - set(FRAMEWORKS))
    if unknown or not chosen:
        raise typer.BadParameter(f"unknown frameworks {unknown}; choose from {', '.join(FRAMEWORKS)}")
    if seeds < 1 or window < 1 or max_seconds <= 0 or max_env_steps < 1 or scaling_runners < 0:
        raise typer.BadParameter(
            "seeds, window, max-seconds and max-env-steps must be positive, scaling >= 0"
        )
    s = Settings(
        seeds, chosen, target, window, max_seconds, max_env_steps, tuple(rlops_set or ()), scaling_runners
    )
    if quick:
        s.seeds, s.max_seconds, s.max_env_steps = 1, 60.0, 30_000
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out / "logs"
    log_dir.mkdir(exist_ok=True)
    sb3_python = ensure_peer("sb3", log_dir / "sb3-venv.log") if "sb3" in chosen else None

    runs: list[dict[str, Any]] = []
    for seed in range(s.seeds):
        for fw in s.frameworks:
            with console.status(f"{LABELS[fw]}, seed {seed}"):
                run = run_one(fw, seed, s, sb3_python, log_dir)
            runs.append(run)
            if "error" in run:
                console.print(f"[red]{LABELS[fw]} seed {seed}: {run['error']}[/red]")
            else:
                console.print(
                    f"{LABELS[fw]} seed {seed}: solved {run['solved']}, "
                    f"{_fmt(run.get('time_from_first_step_s'))} s from the first step, "
                    f"{_fmt(run.get('env_steps_to_target'), 0)} env steps, "
                    f"{_fmt(run['env_steps_per_s'], 0)} steps/s"
                )
    summary = summarise(runs, s)
    ratios: dict[str, Any] = {
        other: ratio(summary["rlops"], summary[other], s)
        for other in ("sb3", "rllib")
        if "rlops" in summary and other in summary
    }
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "settings": s.__dict__ | {"frameworks": list(s.frameworks), "rlops_set": list(s.rlops_set)},
        "machine": machine(),
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }
    result["targets"] = check_targets(summary, ratios, s)
    if s.scaling:
        result["scaling"] = scaling(s, log_dir)
    result["machine"] = machine()
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown(result))
    plot(result, out / "results.png")
    console.print(markdown(result))
    console.print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")


if __name__ == "__main__":
    app()
