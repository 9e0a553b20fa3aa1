"""``rlops demo``: the whole loop on one machine, step by step, with the real commands.

Every step is an ``rlops`` command run as its own process, exactly as a user would type it, so the demo
doubles as a walkthrough: the commands are printed before they run and the summary says where each
result went and how long each step took. The folder it writes is laid out like the cluster volumes:
``data/``, ``runs/``, ``reports/``, ``registry/``, ``logs/`` (decisions and rewards) and ``serve/``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()


@dataclass(frozen=True)
class Profile:
    """What differs between the demo's environments; every step and command is the same."""

    env_id: str
    policy: str
    """Registry name of the policy the demo trains, serves and retrains."""
    behavior: str
    """``rlops data collect --behavior`` spec of the logged data."""
    algorithms: tuple[tuple[str, tuple[str, ...]], ...]
    """Offline candidates: (algorithm, extra ``rlops train`` arguments)."""
    loop_train: str
    """The loop's algorithm and its ``train:`` settings (YAML flow mapping, without steps and seed)."""


def _profiles() -> dict[str, Profile]:
    from rlops_trainer.collect import CARTPOLE_MIXED, PENDULUM_MIXED

    return {
        # CQL's penalty weight suits the data: on logs led by one mediocre policy a light penalty (0.1)
        # lets the rewards speak; the default (1.0) stays close to that policy (docs/benchmarks.md).
        "CartPole-v1": Profile(
            "CartPole-v1",
            "cartpole",
            CARTPOLE_MIXED,
            (("bc", ()), ("cql", ("--set", "alpha=0.1"))),
            "cql|alpha: 0.1",
        ),
        # Continuous actions: a noisy partially trained controller mixed with uniform random actions. IQL
        # learns from the good sixth of the episodes within the demo's 10,000 steps; TD3+BC, held close
        # to the mostly poor logged actions, needs many more (docs/benchmarks.md).
        "Pendulum-v1": Profile(
            "Pendulum-v1",
            "pendulum",
            PENDULUM_MIXED,
            (("bc", ()), ("iql", ())),
            "iql|",
        ),
    }


@dataclass
class Step:
    title: str
    args: list[str]
    outputs: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _rlops(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "rlops_cli.main", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.env = env
        self.root = root
        self.done: list[Step] = []

    def run(self, title: str, *args: str | Path, outputs: tuple[Path, ...] = ()) -> Step:
        step = Step(title, [str(a) for a in args], list(outputs))
        console.rule(f"[bold]{step.title}")
        console.print(f"[dim]$ rlops {shlex.join(step.args)}")
        start = time.perf_counter()
        proc = subprocess.run(_rlops(step.args), env=self.env, check=False)
        step.seconds = time.perf_counter() - start
        self.done.append(step)
        if proc.returncode != 0:
            console.print(f"[red]step '{step.title}' failed with exit code {proc.returncode}")
            raise typer.Exit(proc.returncode)
        return step

    @contextmanager
    def background(self, title: str, *args: str | Path, ready_url: str | None) -> Iterator[None]:
        """A long-running command (a service) for the duration of the block, stopped with SIGTERM.

        Ready when ``ready_url`` answers; without one, when the process is still alive after a second."""
        step = Step(title, [str(a) for a in args])
        console.rule(f"[bold]{step.title}")
        console.print(f"[dim]$ rlops {shlex.join(step.args)} &")
        start = time.perf_counter()
        proc = subprocess.Popen(_rlops(step.args), env=self.env)
        try:
            deadline = time.monotonic() + 60
            while ready_url is None:
                time.sleep(1.0)
                if proc.poll() is not None:
                    console.print(f"[red]'{step.title}' exited with code {proc.returncode}")
                    raise typer.Exit(1)
                break
            while ready_url is not None:
                try:
                    with urllib.request.urlopen(ready_url, timeout=1):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        console.print(f"[red]'{step.title}' did not come up at {ready_url}")
                        raise typer.Exit(1) from None
                    time.sleep(0.2)
            step.seconds = time.perf_counter() - start
            self.done.append(step)
            yield
        finally:
            # SIGTERM is the clean shutdown: the service finishes its open log files.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def summary(self) -> Table:
        table = Table(title=f"rlops demo: steps (outputs under {self.root})")
        table.add_column("step")
        table.add_column("seconds", justify="right")
        table.add_column("output")
        for step in self.done:
            outputs = "\n".join(str(o.relative_to(self.root)) for o in step.outputs)
            table.add_row(step.title, f"{step.seconds:.1f}", outputs)
        table.add_row("[bold]total", f"[bold]{sum(s.seconds for s in self.done):.1f}", "")
        return table


def _best_passing(report_path: Path) -> dict[str, object] | None:
    """The candidate whose gate passed with the best lower bound, if any."""
    report = json.loads(report_path.read_text())
    passing = [p for p in report["policies"] if p.get("gate") and p["gate"]["promote"]]
    return max(passing, key=lambda p: float(p["gate"]["candidate_lower"]), default=None)


def _loop_config(profile: Profile, steps: int, fqe_steps: int | None, seed: int) -> str:
    """The loop's settings for the demo: retrain on what the served traffic logged, with a short canary."""
    algorithm, settings = profile.loop_train.split("|")
    extra = f", {settings}" if settings else ""
    return "\n".join(
        [
            f"policy: {profile.policy}",
            f"algorithm: {algorithm}",
            f"train: {{steps: {steps}{extra}, seed: {seed}}}",
            "min_new_transitions: 200",
            "reward_wait: 1s",
            "gate: {bootstrap: 300" + ("" if fqe_steps is None else f", fqe_steps: {fqe_steps}") + "}",
            "canary: {steps: '10,100', interval: 3s, step_duration: 15s, step_timeout: 3m}",
            "",
        ]
    )


def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Folder for data, runs, reports, registry, logs and the server.")
    ] = Path(".rlops/demo"),
    env_id: Annotated[
        str,
        typer.Option(
            "--env", help="The loop's environment: CartPole-v1 (discrete) or Pendulum-v1 (continuous)."
        ),
    ] = "CartPole-v1",
    episodes: Annotated[int, typer.Option(help="Episodes of logged data to collect.", min=10)] = 300,
    steps: Annotated[int, typer.Option(help="Gradient steps per training run.", min=100)] = 10000,
    env_episodes: Annotated[
        int, typer.Option(help="Ground-truth rollouts per policy in the evaluation.", min=0)
    ] = 30,
    traffic_episodes: Annotated[
        int, typer.Option(help="Environment episodes driven by the served policy.", min=1)
    ] = 20,
    fqe_steps: Annotated[
        int | None,
        typer.Option(
            help="Gradient steps of each fitted Q evaluation model (evaluation and the loop's gate); "
            "default: FQEConfig's.",
            min=100,
        ),
    ] = None,
    loop_steps: Annotated[
        int, typer.Option(help="Gradient steps of the loop's retraining on served logs.", min=100)
    ] = 3000,
    seed: Annotated[int, typer.Option(help="Seed for collection and training.")] = 0,
) -> None:
    """Run the loop on this machine: collect → train → OPE → gate → registry → serve (watched by
    Prometheus) → traffic → join → retrain → gate → canary → decision → report."""
    profiles = _profiles()
    if env_id not in profiles:
        console.print(f"[red]error:[/] --env {env_id!r} is not one of the demo's: {', '.join(profiles)}")
        raise typer.Exit(2)
    profile = profiles[env_id]
    policy_name = profile.policy

    d = directory.resolve()
    marker = d / ".rlops-demo"
    if d.exists() and any(d.iterdir()):
        if not marker.exists():
            console.print(f"[red]error:[/] {d} is not empty and not made by rlops demo; use another --dir")
            raise typer.Exit(2)
        # A rerun starts from nothing: a registry left from an earlier run would change the gate's baseline.
        shutil.rmtree(d)
    d.mkdir(parents=True)
    marker.touch()
    data = d / "data" / f"{policy_name}-mixed.parquet"
    runs = d / "runs"
    report = d / "reports" / "offline"
    registry = d / "registry"
    logs = d / "logs"
    serve_dir = d / "serve"
    joined = d / "data" / "served-joined.parquet"
    stack_dir = d / "stack"
    loop_dir = d / "loop"
    loop_config = d / "loop" / "config.yaml"
    report_page = d / "reports" / "live" / "index.html"
    # Reports are wide tables: give them room when the output is a log rather than a terminal.
    columns = str(max(shutil.get_terminal_size((140, 40)).columns, 140))
    env = {**os.environ, "RLOPS_REGISTRY": str(registry), "OMP_NUM_THREADS": "1", "COLUMNS": columns}
    demo = Demo(env, d)
    console.print(f"[bold]rlops demo[/] — everything goes under {d}")

    # Offline: data → policies → evaluation → gate → registry.
    demo.run(
        "collect a mixed-quality dataset",
        *("data", "collect", "--env", env_id, "--behavior", profile.behavior),
        *("--episodes", str(episodes), "--seed", str(seed), "--out", data),
        outputs=(data,),
    )
    for algo, overrides in profile.algorithms:
        demo.run(
            f"train {algo.upper()}",
            *("train", algo, "--data", data, "--out", runs / algo, "--name", policy_name),
            *("--steps", str(steps), "--seed", str(seed), *overrides),
            outputs=(runs / algo / "policy",),
        )
    demo.run(
        "off-policy evaluation with confidence intervals, next to rollout truth",
        *("evaluate", "--data", data),
        *(arg for algo, _ in profile.algorithms for arg in ("--policy", runs / algo / "policy")),
        *("--registry", registry, "--champion", policy_name, "--env-episodes", str(env_episodes)),
        *(() if fqe_steps is None else ("--fqe-steps", str(fqe_steps))),
        *("--out", report),
        outputs=(report / "report.json", report / "report.png"),
    )
    best = _best_passing(report / "report.json")
    if best is None:
        console.print("[yellow]no candidate passed the gate: nothing to publish or serve")
        console.print(demo.summary())
        return
    demo.run(
        f"publish the best gated candidate ({best['label']})",
        *("registry", "publish", str(best["path"]), "--name", policy_name),
        *("--report", report / "report.json"),
        outputs=(registry / policy_name,),
    )
    version = max(int(v.name) for v in (registry / policy_name).iterdir() if v.name.isdigit())
    demo.run("promote it through the gate", "registry", "promote", policy_name, str(version))

    # Online: archive → TorchServe (watched by the local Prometheus) → traffic from a real environment →
    # decision log + rewards → dataset.
    serving = ["inference", "management", "metrics", "grpc", "feedback"]
    ports = {k: _free_port() for k in [*serving, "prometheus", "alertmanager", "webhook"]}
    demo.run(
        "archive the champion for TorchServe",
        *("serve", "archive", policy_name, "champion", "--store", serve_dir / "model-store"),
        outputs=(serve_dir / "model-store",),
    )
    inference_url = f"http://127.0.0.1:{ports['inference']}"
    feedback_url = f"http://127.0.0.1:{ports['feedback']}"
    summary_path = d / "reports" / "traffic.json"
    serve_start = (
        *("serve", "start", "--name", policy_name, "--run-dir", serve_dir, "--decision-log-dir", logs),
        *("--port", str(ports["inference"]), "--management-port", str(ports["management"])),
        *("--metrics-port", str(ports["metrics"]), "--grpc-port", str(ports["grpc"])),
    )
    stop_serving = ("serve", "stop", "--run-dir", serve_dir)
    feedback = ("feedback", "serve", "--dir", logs, "--port", str(ports["feedback"]))
    demo.run(
        "Prometheus, Alertmanager and the actions webhook, from alerts/",
        *("stack", "up", "--root", stack_dir, "--scrape-interval", "5", "--evaluation-interval", "5"),
        *("--prometheus-port", str(ports["prometheus"])),
        *("--alertmanager-port", str(ports["alertmanager"])),
        *("--webhook-port", str(ports["webhook"]), "--registry", registry, "--serve-run-dir", serve_dir),
        *("--target", f"torchserve=127.0.0.1:{ports['metrics']}"),
        *("--target", f"rlops-feedback=127.0.0.1:{ports['feedback']}"),
        *("--target", f"rlops-actions=127.0.0.1:{ports['webhook']}"),
        outputs=(stack_dir,),
    )
    try:
        # Stopping the server and the reward service seals their open log files for the join.
        with demo.background("reward feedback service", *feedback, ready_url=f"{feedback_url}/healthz"):
            demo.run("start TorchServe with the champion", *serve_start, outputs=(serve_dir,))
            try:
                demo.run(
                    f"drive {env_id} with the served policy",
                    *("serve", "traffic", "--url", inference_url, "--model", policy_name, "--env", env_id),
                    *("--episodes", str(traffic_episodes), "--feedback-url", feedback_url),
                    *("--run-dir", serve_dir, "--summary", summary_path, "--seed", str(seed + 1000)),
                    outputs=(summary_path,),
                )
            finally:
                demo.run("stop TorchServe (flushes the decision log)", *stop_serving)
        demo.run(
            "join decisions with rewards into a training dataset",
            *("feedback", "join", "--decisions", logs, "--rewards", logs, "--out", joined),
            *("--policy", policy_name, "--registry", registry),
            outputs=(joined,),
        )
        demo.run("inspect the joined dataset", "data", "inspect", joined)

        # The loop closes: served logs → join → retrain → OPE gate → canary → promote or roll back, with
        # traffic flowing all along.
        loop_config.parent.mkdir(parents=True, exist_ok=True)
        loop_config.write_text(_loop_config(profile, loop_steps, fqe_steps, seed), encoding="utf-8")
        with demo.background("reward feedback service", *feedback, ready_url=f"{feedback_url}/healthz"):
            demo.run("serve the champion again for the loop", *serve_start, outputs=(serve_dir,))
            try:
                with demo.background(
                    f"keep {env_id} traffic flowing (split between champion and candidate)",
                    *("rollout", "traffic", "--url", inference_url, "--model", policy_name, "--env", env_id),
                    *("--episodes", "1000000", "--feedback-url", feedback_url, "--concurrency", "2"),
                    *("--serve-run-dir", serve_dir, "--seed", str(seed + 5000)),
                    ready_url=None,
                ):
                    demo.run(
                        "one iteration of the continuous-learning loop",
                        *("loop", "run-once", "--config", loop_config, "--logs", logs),
                        *("--registry", registry, "--state-dir", loop_dir, "--serve-run-dir", serve_dir),
                        *("--prometheus-url", f"http://127.0.0.1:{ports['prometheus']}"),
                        outputs=(loop_dir,),
                    )
            finally:
                demo.run("stop TorchServe", *stop_serving)
        demo.run(
            "report: every dashboard panel from the real Prometheus, and the alerts",
            *("report", "--out", report_page, "--stack-root", stack_dir, "--window", "30m"),
            outputs=(report_page,),
        )
        demo.run("alerts pending or firing now", "stack", "status", "--root", stack_dir)
    finally:
        demo.run("stop the monitoring stack", "stack", "down", "--root", stack_dir)
    demo.run("the registry now", "registry", "list")
    console.print(demo.summary())
