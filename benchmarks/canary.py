"""Canary benchmark: how long until a bad candidate is rolled back, and how much traffic did it answer?

    .venv/bin/python benchmarks/canary.py              # the local profile (about 10 minutes)
    .venv/bin/python benchmarks/canary.py --quick      # 1 s scrapes and short steps: checks the plumbing

What it does:

1. Trains a CartPole champion (BC on logs of a trained, slightly exploring policy) into a temporary
   registry and builds three candidates from it: one that always pushes left (``constant``), one that
   answers the same but 0.25 s later per pass (``slow``, the stack's latency fault) and an identical copy
   (``good``).
2. Serves the four as versions of one model on TorchServe, starts the reward feedback service and a
   Prometheus that scrapes both (every 15 s in the local profile, as ``rlops stack up`` does), and drives
   CartPole through the canary-aware client on 8 threads, episodes cut at 50 steps, rewards posted.
3. Canaries each candidate in turn with the repository's ``alerts/canary/analysis.yaml``: steps 10 %,
   50 %, 100 % (after promotion), one minute at least per step, measured every 15 s.
4. Reports per candidate the outcome, the failed checks, the time from the start of the canary to its
   decision, and the share of the requests sent during the canary that went to the candidate and that it
   answered in time (counted by the client, exactly; Prometheus' count is in the results too), then
   checks the targets of issue 7 for the bad ones: rolled back within 2 minutes, under 5 % of the requests.

Writes ``results.json`` and ``results.md`` (with the exact command) to ``benchmarks/results/canary/``.
Everything it starts is stopped again, also when a step fails. The end-to-end test
(``apps/delivery/tests/test_canary_e2e.py``) runs the same test bed with the quick profile.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

# One torch thread in this process, as in every TorchServe worker: on two cores more threads only contend.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
ANALYSIS = REPO / "alerts" / "canary" / "analysis.yaml"
RESULTS = REPO / "benchmarks" / "results" / "canary"
POLICY = "cartpole"
TARGET_SECONDS = 120.0
TARGET_SHARE = 0.05


@dataclass(frozen=True)
class Profile:
    name: str
    scrape_s: float
    """Prometheus scrape and rule evaluation interval."""
    interval_s: float | None
    """Between two measurements of the checks; None: the analysis file's (15 s)."""
    step_min_s: float
    step_timeout_s: float
    steps: tuple[float, ...]
    concurrency: int
    max_steps: int
    """CartPole episodes are cut here: more, shorter episodes give a sticky per-episode split more chances."""
    client_timeout_s: float
    slow_seconds: float


LOCAL = Profile("local", 15.0, None, 60.0, 300.0, (0.1, 0.5, 1.0), 8, 50, 0.1, 0.25)
QUICK = Profile("quick", 1.0, 2.0, 6.0, 150.0, (0.1, 0.5), 4, 30, 0.3, 0.2)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Testbed:
    registry: Path
    run_dir: Path
    prometheus_url: str
    traffic: Any  # rlops_delivery.traffic.BackgroundTraffic
    versions: dict[str, int]
    """Candidate versions by kind: constant, slow, good."""


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up") from None
            time.sleep(0.2)


def _champion(root: Path, registry: Path, seed: int) -> Path:
    from rlops_trainer.algos.bc import BCConfig, train
    from rlops_trainer.collect import collect
    from rlops_trainer.export import write_policy_dir
    from rlops_trainer.registry import Registry
    from rlops_trainer.training import RunOptions

    # A champion that balances the pole uses both actions about equally: a collapsed candidate stands out.
    data = collect("CartPole-v1", "eps-greedy:0.1@2000", 30, seed=seed, progress=False)
    result = train(BCConfig(steps=500, seed=seed, batch_size=64), data, RunOptions(progress=False))
    champion_dir = write_policy_dir(result, data, root / "champion", POLICY)
    reg = Registry(registry)
    reg.publish(champion_dir, POLICY)
    reg.promote(POLICY, 1, require_gate=False, force_reason="the benchmark's champion")
    return champion_dir


@contextlib.contextmanager
def canary_bed(root: Path, profile: Profile, seed: int = 0) -> Iterator[Testbed]:
    """Registry, TorchServe with champion and the three candidates, feedback, Prometheus, traffic."""
    from rlops_delivery.drills import write_drill_policy_dir
    from rlops_delivery.split import SplitClient
    from rlops_delivery.traffic import BackgroundTraffic
    from rlops_server.torchserve import process
    from rlops_server.torchserve.archive import build_archive
    from rlops_server.torchserve.backend import start_server
    from rlops_server.torchserve.config import METRICS_FILE, ModelSettings, ServedModel, ServerConfig
    from rlops_server.torchserve.process import ModelVersionState
    from rlops_server.traffic import RewardSender
    from rlops_stack import local
    from rlops_trainer.registry import Registry

    registry, run_dir, logs = root / "registry", root / "serve", root / "logs"
    champion_dir = _champion(root, registry, seed)
    reg = Registry(registry)
    slow = write_drill_policy_dir(champion_dir, root / "slow", "slow", seconds=profile.slow_seconds)
    versions = {
        "constant": reg.publish(write_drill_policy_dir(champion_dir, root / "constant", "constant"), POLICY),
        "slow": reg.publish(slow, POLICY),
        "good": reg.publish(reg.resolve(POLICY, 1), POLICY),
    }
    inference, management, metrics, grpc, grpc_management, feedback, prom, am, hook = free_ports(9)
    store = run_dir / "model-store"
    settings = ModelSettings()
    served, models = [], []
    for version in (1, *versions.values()):
        built = build_archive(registry, POLICY, version, store, model_settings=settings)
        alias = "champion" if version == 1 else None
        served.append(ModelVersionState(POLICY, str(version), alias, built.path.name, settings.batcher))
        models.append(ServedModel(POLICY, str(version), built.path.name, settings))
    config = ServerConfig(
        model_store=store,
        metrics_config=run_dir / METRICS_FILE,
        models=tuple(models),
        inference_port=inference,
        management_port=management,
        metrics_port=metrics,
        grpc_inference_port=grpc,
        grpc_management_port=grpc_management,
    )
    with contextlib.ExitStack() as cleanup:
        # Each service is stopped even when a later one fails to start or a run fails.
        feedback_cmd = [sys.executable, "-m", "rlops_cli.main", "feedback", "serve", "--dir", str(logs)]
        feedback_proc = subprocess.Popen([*feedback_cmd, "--port", str(feedback)])
        cleanup.callback(feedback_proc.wait, 30)
        cleanup.callback(feedback_proc.terminate)
        cleanup.callback(process.stop, run_dir, 30)
        start_server(run_dir, config, served, decision_log_dir=logs, timeout_s=300)
        _wait_http(f"http://127.0.0.1:{feedback}/healthz", feedback_proc)
        cleanup.callback(local.down, root / "stack")
        stack = local.up(
            root / "stack",
            scrape_interval=profile.scrape_s,
            evaluation_interval=profile.scrape_s,
            prometheus_port=prom,
            alertmanager_port=am,
            webhook_port=hook,
            targets=[
                local.Target("torchserve", f"127.0.0.1:{metrics}"),
                local.Target("rlops-feedback", f"127.0.0.1:{feedback}"),
            ],
            webhook=None,
        )
        client = SplitClient(
            f"http://127.0.0.1:{inference}",
            POLICY,
            run_dir=run_dir,
            token=process.read_keys(run_dir).get("inference"),
            pool_size=profile.concurrency,
            timeout=profile.client_timeout_s,
        )
        cleanup.callback(client.close)
        traffic = BackgroundTraffic(
            client,
            RewardSender(f"http://127.0.0.1:{feedback}"),
            concurrency=profile.concurrency,
            max_steps=profile.max_steps,
            seed=seed,
        )
        cleanup.enter_context(traffic)
        yield Testbed(registry, run_dir, stack.prometheus_url, traffic, versions)


@dataclass
class CanaryResult:
    kind: str
    version: int
    state: str
    failed_checks: list[str]
    reason: str
    seconds: float
    """From the start of the canary to its decision (promotion, or rollback)."""
    sent: int
    """Requests the client sent to the candidate during the canary."""
    answered: int
    """Decisions the candidate answered in time (not the client's fallback)."""
    share_sent: float
    share_answered: float
    prometheus: dict[str, Any] = field(default_factory=dict)
    rollout: str = ""


def run_canary(
    bed: Testbed, kind: str, profile: Profile, report: Callable[[str], None] = print
) -> CanaryResult:
    """Canary the ``kind`` candidate of the test bed with the repository's analysis."""
    from rlops_delivery import analysis
    from rlops_delivery.rollout import LocalServing, Rollout, RolloutSettings
    from rlops_stack import prometheus

    spec = analysis.load(ANALYSIS)
    settings = RolloutSettings.from_analysis(
        spec,
        steps=profile.steps,
        interval_s=profile.interval_s,
        step_min_s=profile.step_min_s,
        step_timeout_s=profile.step_timeout_s,
    )
    version = bed.versions[kind]
    rollout = Rollout(
        bed.registry,
        POLICY,
        version,
        analysis=spec,
        settings=settings,
        query=partial(prometheus.query, bed.prometheus_url),
        serving=LocalServing(bed.run_dir),
        force_reason=f"canary benchmark: the {kind} candidate",
        report=report,
    )
    before = bed.traffic.counts()
    start = time.monotonic()
    record = rollout.run()
    seconds = time.monotonic() - start
    # Requests routed to the candidate just before the split closed may still be in flight.
    after = bed.traffic.counts(settle_s=10.0)
    if not bed.traffic.running:
        raise RuntimeError("the traffic stopped during the canary")

    def delta(kind: str) -> dict[str, int]:
        return {k: after[kind].get(k, 0) - before[kind].get(k, 0) for k in after[kind]}

    sent, answered = delta("routed"), delta("answered")
    decision = record.decision or {}
    return CanaryResult(
        kind=kind,
        version=version,
        state=record.state,
        failed_checks=list(decision.get("failed_checks", [])),
        reason=str(decision.get("reason", "")),
        seconds=seconds,
        sent=sent.get(str(version), 0),
        answered=answered.get(str(version), 0),
        share_sent=sent.get(str(version), 0) / max(sum(sent.values()), 1),
        share_answered=answered.get(str(version), 0) / max(sum(answered.values()), 1),
        prometheus=dict(record.traffic or {}),
        rollout=record.id,
    )


def _markdown(results: list[CanaryResult], profile: Profile, command: str, meta: dict[str, Any]) -> str:
    lines = [
        f"# Canary benchmark ({profile.name} profile)",
        "",
        f"`{command}` on {meta['machine']}, {meta['date']}.",
        "",
        "| candidate | outcome | failed checks | time to decision | requests sent to it | answered by it |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.kind} (v{r.version}) | {r.state} | {', '.join(r.failed_checks) or '-'} "
            f"| {r.seconds:.0f} s "
            f"| {r.sent:,} ({100 * r.share_sent:.2f} %) | {r.answered:,} ({100 * r.share_answered:.2f} %) |"
        )
    lines += ["", f"Profile: `{json.dumps(asdict(profile))}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s scrapes and short steps (checks plumbing)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results.json and results.md go")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    profile = QUICK if args.quick else LOCAL
    command = shlex.join(
        [".venv/bin/python", "benchmarks/canary.py", *(argv if argv is not None else sys.argv[1:])]
    )
    results: list[CanaryResult] = []
    with (
        tempfile.TemporaryDirectory(prefix="rlops-canary-bench-") as tmp,
        canary_bed(Path(tmp), profile, seed=args.seed) as bed,
    ):
        for kind in ("constant", "slow", "good"):
            print(f"--- canary of the {kind} candidate (version {bed.versions[kind]})", flush=True)
            results.append(run_canary(bed, kind, profile))
            print(json.dumps(asdict(results[-1]), default=str), flush=True)
    meta = {
        "machine": f"{platform.machine()} {platform.node()}, {platform.python_version()}",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "profile": asdict(profile),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({**meta, "results": [asdict(r) for r in results]}, indent=2) + "\n", encoding="utf-8"
    )
    (args.out / "results.md").write_text(_markdown(results, profile, command, meta), encoding="utf-8")
    print(_markdown(results, profile, command, meta))
    problems = []
    for r in results:
        if r.kind == "good":
            if r.state != "promoted":
                problems.append(f"the good candidate was not promoted: {r.reason}")
            continue
        if r.state != "rolled_back":
            problems.append(f"the {r.kind} candidate was not rolled back ({r.state}): {r.reason}")
        if r.seconds >= TARGET_SECONDS:
            problems.append(
                f"the {r.kind} candidate took {r.seconds:.0f} s to roll back (target {TARGET_SECONDS:.0f})"
            )
        if r.share_sent >= TARGET_SHARE:
            problems.append(
                f"the {r.kind} candidate was sent {100 * r.share_sent:.1f} % of the requests (target 5 %)"
            )
    for p in problems:
        print(f"target missed: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
