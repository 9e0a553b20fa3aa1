"""``rlops rollout``: canary a candidate on the local TorchServe, judged by the canary analysis.

Exit codes: ``start`` 0 promoted, 1 rolled back or rejected; ``ope-gate`` 0 pass, 1 fail; ``check`` 0
pass, 1 fail or inconclusive; 2 bad input.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rlops_contracts.registry import DEFAULT_REGISTRY, REGISTRY_ENV
from rlops_server.commands import fail, group
from rlops_server.serving import DEFAULT_RUN_DIR, ServeError
from rlops_stack import prometheus
from rlops_stack.prometheus import PrometheusError
from rlops_trainer.card import utc_now
from rlops_trainer.registry import Registry, RegistryError

from rlops_delivery import analysis, records
from rlops_delivery.commands import AnalysisOption, PrometheusUrlOption, analysis_path, prometheus_url
from rlops_delivery.config import parse_steps
from rlops_delivery.opegate import OPEGateError, OPESettings, gate_on_logs
from rlops_delivery.rollout import LocalServing, Rollout, RolloutError, RolloutSettings
from rlops_delivery.serving import ServingError, restart_with_candidate, served_versions
from rlops_delivery.split import read_split, write_split

console = Console()

app = group(
    "rollout",
    "Canary a candidate policy version on the local TorchServe; promote or roll back on the canary analysis.",
)

RegistryOption = Annotated[
    Path, typer.Option("--registry", envvar=REGISTRY_ENV, help="Registry folder.", file_okay=False)
]
PolicyOption = Annotated[
    str | None, typer.Option("--policy", help="Policy name in the registry (default: the only one).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except (
        RolloutError,
        RegistryError,
        analysis.AnalysisError,
        OPEGateError,
        ServingError,
        ServeError,
        records.RolloutBusy,
        PrometheusError,
        ValueError,
    ) as e:
        fail(str(e))


def _policy(registry: Path, policy: str | None) -> str:
    if policy:
        return policy
    names = Registry(registry).names()
    if len(names) != 1:
        fail(f"say which policy with --policy; registry {registry} holds: {', '.join(names) or 'none'}")
    return names[0]


def _seconds(text: str | None, flag: str) -> float | None:
    return None if text is None else analysis.parse_duration(text, flag)


def _ope_settings(
    estimator: str | None,
    margin: float,
    relative: bool,
    bootstrap: int,
    fqe_steps: int,
    fqe_models: int,
    seed: int,
) -> OPESettings:
    return OPESettings(
        estimator=estimator,
        margin=margin,
        relative=relative,
        n_bootstrap=bootstrap,
        fqe_steps=fqe_steps,
        fqe_models=fqe_models,
        seed=seed,
    )


@app.command()
def start(
    version: Annotated[str, typer.Argument(help="Candidate version number (or alias, e.g. candidate).")],
    policy: PolicyOption = None,
    share: Annotated[
        float | None,
        typer.Option(
            "--share",
            min=0.0,
            max=1.0,
            help="One canary step at this share of the traffic (0.1 = 10 %), then promotion; "
            "instead of --steps.",
        ),
    ] = None,
    steps: Annotated[
        str | None,
        typer.Option(
            "--steps",
            help="Percentages of the traffic, one per step, e.g. 10,50,100 (the default). A step of 100 "
            "comes "
            "after promotion and is checked too; a failure there rolls the promotion back.",
        ),
    ] = None,
    interval: Annotated[
        str | None,
        typer.Option(
            "--interval", help="Time between measurements, e.g. 15s (default: the analysis file's)."
        ),
    ] = None,
    step_duration: Annotated[
        str, typer.Option("--step-duration", help="Least time a step lasts before it can pass, e.g. 1m.")
    ] = "1m",
    step_timeout: Annotated[
        str,
        typer.Option(
            "--step-timeout",
            help="A step without a verdict after this long rolls back (no traffic is not success).",
        ),
    ] = "10m",
    prometheus_url_: PrometheusUrlOption = None,
    analysis_file: AnalysisOption = None,
    registry: RegistryOption = DEFAULT_REGISTRY,
    run_dir: Annotated[
        Path, typer.Option("--serve-run-dir", help="Run directory of the local TorchServe.", file_okay=False)
    ] = DEFAULT_RUN_DIR,
    restart_serving: Annotated[
        bool,
        typer.Option(
            "--restart-serving",
            help="If TorchServe does not serve the candidate, restart it with champion and candidate "
            "(clients fall back while it restarts).",
        ),
    ] = False,
    logs: Annotated[
        Path | None,
        typer.Option(
            "--logs",
            help="Run the OPE gate on the served logs under this folder (decisions/ and rewards/) before any "
            "traffic moves; the rollout stops there if it fails.",
            file_okay=False,
        ),
    ] = None,
    force_reason: Annotated[
        str | None,
        typer.Option(
            "--force-reason",
            help="Canary (and promote, if it passes) a candidate the registry's gate did not clear; "
            "recorded.",
        ),
    ] = None,
    estimator: Annotated[
        str | None, typer.Option("--estimator", help="OPE gate estimator (with --logs).")
    ] = None,
    margin: Annotated[float, typer.Option("--margin", help="OPE gate margin (with --logs).")] = 0.0,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=1, help="OPE bootstrap resamples.")] = 500,
    fqe_steps: Annotated[
        int, typer.Option("--fqe-steps", min=1, help="OPE: FQE gradient steps.")
    ] = OPESettings.fqe_steps,
    as_json: JsonOption = False,
) -> None:
    """Move a share of the traffic to a candidate, judge it against the champion, promote or roll back."""
    if share is not None and steps is not None:
        fail("give --share (one step, then promotion) or --steps, not both")
    if share is not None and not 0 < share < 1:
        fail(f"--share must be a fraction strictly between 0 and 1, got {share}")
    with _user_errors():
        policy = _policy(registry, policy)
        spec = analysis.load(analysis_path(analysis_file))
        shares = (share, 1.0) if share is not None else parse_steps(steps or "10,50,100")
        settings = RolloutSettings.from_analysis(
            spec,
            steps=tuple(s for s in shares if s is not None),
            interval_s=_seconds(interval, "--interval"),
            step_min_s=_seconds(step_duration, "--step-duration"),
            step_timeout_s=_seconds(step_timeout, "--step-timeout"),
        )
        url = prometheus_url(prometheus_url_)
        if restart_serving:
            candidate = Registry(registry).resolve_version(policy, version)
            if str(candidate) not in served_versions(run_dir, policy):
                console.print(restart_with_candidate(registry, policy, candidate, run_dir), highlight=False)
        ope = None
        if logs is not None:
            ope_settings = _ope_settings(estimator, margin, False, bootstrap, fqe_steps, 3, 0)
            ope = partial(gate_on_logs, logs, registry, policy, version, ope_settings)
        rollout = Rollout(
            registry,
            policy,
            version,
            analysis=spec,
            settings=settings,
            query=partial(prometheus.query, url),
            serving=LocalServing(run_dir),
            force_reason=force_reason,
            ope=ope,
            report=lambda line: console.print(escape(line), highlight=False, soft_wrap=True),
        )
        console.print(
            f"rollout of {policy} version {rollout.candidate} against champion {rollout.champion}: steps "
            f"{', '.join(f'{100 * s:g} %' for s in settings.steps)}, "
            f"measured every {settings.interval_s:g} s "
            f"against {url}",
            highlight=False,
        )
        # SIGTERM ends the rollout like Ctrl-C: traffic goes back to the champion before the exit.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        try:
            record = rollout.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
    if as_json:
        console.print_json(json.dumps(record.to_json()))
    else:
        console.print(_record_table(record))
    if record.state != records.PROMOTED:
        raise typer.Exit(1)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _record_table(record: records.RolloutRecord) -> Table:
    decision = record.decision or {}
    traffic = record.traffic or {}
    title = (
        f"rollout {record.id}: {record.policy} version {record.candidate} against {record.champion}: "
        f"{record.state}"
    )
    table = Table(
        title=title,
        title_justify="left",
        caption=escape(str(decision.get("reason", ""))),
        caption_justify="left",
    )
    for col in ("check", "verdict", "value", "threshold", "samples", "failed measurements"):
        table.add_column(col)
    failures = decision.get("failures", {})
    for m in decision.get("evidence", []):
        table.add_row(
            m["check"],
            m["verdict"],
            _fmt(m["value"]),
            f"{m['comparison']} {_fmt(m['threshold'])}",
            f"{_fmt(m['samples'])} / {_fmt(m['min_samples'])}",
            str(failures.get(m["check"], 0)),
        )
    if traffic:
        share = traffic.get("candidate_share")
        table.add_section()
        table.add_row(
            "traffic",
            "",
            f"candidate {_fmt(traffic.get('candidate_requests'))} requests",
            f"champion {_fmt(traffic.get('champion_requests'))}",
            "-" if share is None else f"{100 * share:.2f} % to the candidate",
            "",
        )
    return table


@app.command()
def status(
    policy: PolicyOption = None,
    registry: RegistryOption = DEFAULT_REGISTRY,
    show_all: Annotated[
        bool, typer.Option("--all", help="Every rollout of the policy, not only the last.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """The last rollout of a policy (or all): state, steps, the evidence of its decision, traffic."""
    with _user_errors():
        policy = _policy(registry, policy)
        found = records.read_all(registry, policy)
        live = records.is_locked(registry, policy)
    if not found:
        console.print(f"no rollouts of {policy} in {registry}", highlight=False)
        return
    shown = found if show_all else found[-1:]
    if as_json:
        console.print_json(json.dumps([r.to_json() for r in shown]))
        return
    for record in shown:
        console.print(_record_table(record))
        for i, step in enumerate(record.steps, start=1):
            if "share" in step:
                console.print(
                    f"  step {i}: {100 * step['share']:g} %: {step.get('outcome') or 'running'}"
                    + (f" ({escape(step['reason'])})" if step.get("reason") else ""),
                    highlight=False,
                )
            else:
                console.print(f"  promoted at {step.get('promoted_at')}", highlight=False)
    last = found[-1]
    if last.state == records.RUNNING and not live:
        console.print(
            f"[yellow]rollout {last.id} is marked running but no process holds it (it died); "
            f"rlops rollout abort --policy {policy} sends its traffic back to the champion[/yellow]"
        )


@app.command()
def abort(
    policy: PolicyOption = None,
    registry: RegistryOption = DEFAULT_REGISTRY,
    run_dir: Annotated[
        Path, typer.Option("--serve-run-dir", help="Run directory of the local TorchServe.", file_okay=False)
    ] = DEFAULT_RUN_DIR,
) -> None:
    """After a rollout whose process died: traffic back to the champion, its record marked aborted."""
    with _user_errors():
        policy = _policy(registry, policy)
        if records.is_locked(registry, policy):
            fail(f"a rollout of {policy} is running; stop its process (Ctrl-C or SIGTERM) to abort it")
        split = read_split(run_dir)
        if split is not None and split.policy == policy:
            write_split(run_dir, None)
            console.print(f"traffic of {policy} goes to the default version again", highlight=False)
        with records.locked(registry, policy):
            for record in records.read_all(registry, policy):
                if record.state == records.RUNNING:
                    record.state = records.ABORTED
                    record.finished_at = utc_now()
                    record.decision = {
                        "outcome": records.ABORTED,
                        "reason": "its process died; aborted by hand",
                    }
                    records.write(registry, record)
                    console.print(f"rollout {record.id} marked aborted", highlight=False)


@app.command("ope-gate")
def ope_gate(
    policy: Annotated[str, typer.Argument(help="Policy name in the registry.")],
    candidate: Annotated[str, typer.Argument(help="Candidate version number (or alias).")],
    logs: Annotated[
        Path,
        typer.Option(
            "--logs", help="Log root with decisions/ and rewards/ (what serving wrote).", file_okay=False
        ),
    ],
    registry: RegistryOption = DEFAULT_REGISTRY,
    estimator: Annotated[
        str | None,
        typer.Option(
            "--estimator",
            help="dr, wdr, fqe, pdis or wpdis (default: dr, or fqe without propensities or, for Box "
            "policies, when one of them is deterministic).",
        ),
    ] = None,
    margin: Annotated[
        float, typer.Option("--margin", help="How far the lower bound must clear the champion.")
    ] = 0.0,
    relative: Annotated[
        bool, typer.Option("--relative", help="Read --margin as a fraction of the champion's value.")
    ] = False,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=1, help="Bootstrap resamples per interval.")
    ] = 500,
    fqe_steps: Annotated[
        int, typer.Option("--fqe-steps", min=1, help="FQE gradient steps.")
    ] = OPESettings.fqe_steps,
    fqe_models: Annotated[
        int, typer.Option("--fqe-models", min=1, help="Q networks in the FQE ensemble.")
    ] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap and FQE.")] = 0,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the result as JSON here.", dir_okay=False)
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Value a candidate off-policy on served logs against the champion: exit 0 pass, 1 fail, 2 bad input."""
    if not logs.is_dir():
        fail(f"--logs {logs}: no such folder")
    with _user_errors():
        settings = _ope_settings(estimator, margin, relative, bootstrap, fqe_steps, fqe_models, seed)
        result = gate_on_logs(logs, registry, policy, candidate, settings)
    if out is not None:
        from rlops_trainer.report import write_json

        write_json(result, out)
    if as_json:
        console.print_json(json.dumps(result))
    else:
        est = result["estimates"]
        parts = [f"{role} {e['value']:.4g} [{e['lower']:.4g}, {e['upper']:.4g}]" for role, e in est.items()]
        console.print(
            f"{policy} version {result['candidate']} on {result['data']['n_episodes']} logged episodes "
            f"({result['settings']['estimator']}): {', '.join(parts)}",
            highlight=False,
        )
        console.print(
            ("[green]pass[/green] " if result["promote"] else "[red]fail[/red] ") + escape(result["reason"])
        )
    if not result["promote"]:
        raise typer.Exit(1)


DEFAULT_CHECK_WAIT_S = 600.0


def _version(reg: Registry, policy: str, ref: str, role: str) -> int:
    try:
        return reg.resolve_version(policy, ref)
    except RegistryError as e:
        where = "" if str(reg.root) in str(e) else f" (registry {reg.root})"
        raise RegistryError(f"the {role} {ref!r}: {e}{where}") from None


@app.command()
def check(
    policy: Annotated[str, typer.Argument(help="Policy name in the registry.")],
    candidate: Annotated[str, typer.Argument(help="Candidate version number (or alias).")],
    champion: Annotated[str, typer.Argument(help="Champion version number (or alias).")],
    prometheus_url_: PrometheusUrlOption = None,
    analysis_file: AnalysisOption = None,
    registry: RegistryOption = DEFAULT_REGISTRY,
    wait_s: Annotated[
        float,
        typer.Option(
            "--wait-s",
            min=0.0,
            help="Give up after this many seconds without a verdict (exit 1: no traffic is not success).",
        ),
    ] = DEFAULT_CHECK_WAIT_S,
    as_json: JsonOption = False,
) -> None:
    """Measure until conclusive the canary checks no Prometheus query can (Box: action divergence per
    dimension), as Argo's Job metric: exit 0 pass (Discrete: nothing to add), 1 fail or inconclusive."""
    with _user_errors():
        spec = analysis.load(analysis_path(analysis_file))
        reg = Registry(registry)
        reg.versions(policy)  # an unknown policy, named as such before either version
        cand = _version(reg, policy, candidate, "candidate")
        champ = _version(reg, policy, champion, "champion")
        if cand == champ:
            fail(f"the candidate and the champion are both {policy} version {cand}; a canary compares two")
        where = f"{policy} version {cand} against version {champ} (registry {registry})"
        cards = reg.card(policy, cand), reg.card(policy, champ)
        try:
            checks, skipped = analysis.for_policies(spec, *cards)
        except analysis.AnalysisError as e:
            fail(f"cannot check {where}: {e}")
        own = analysis.beyond_prometheus(spec, checks)
        result: dict[str, Any] = {
            "policy": policy,
            "candidate": cand,
            "champion": champ,
            "analysis": spec.source,
            "skipped_checks": skipped,
        }
        if not own:
            kind = cards[0]["action_space"]["type"]
            reason = (
                f"{where}, {kind} actions: every check of {spec.source} applies as written, and the "
                "rendered Prometheus checks cover them; nothing more to measure"
            )
            if as_json:
                console.print_json(json.dumps({**result, "verdict": analysis.PASS, "reason": reason}))
            else:
                console.print(escape(reason), highlight=False, soft_wrap=True)
            return
        url = prometheus_url(prometheus_url_)
        if not as_json:
            console.print(
                f"{where}: {', '.join(c.name for c in own)} against {url}, every "
                f"{spec.interval_s:g} s for up to {wait_s:g} s",
                highlight=False,
                soft_wrap=True,
            )

        def report(round_: list[analysis.Measurement]) -> None:
            if not as_json:
                line = "; ".join(f"{m.check} {m.verdict} ({m.detail})" for m in round_)
                console.print("  " + escape(line), highlight=False, soft_wrap=True)

        watch = analysis.measure_until_conclusive(
            own,
            {"policy": policy, "candidate": str(cand), "champion": str(champ)},
            partial(prometheus.query, url),
            interval_s=spec.interval_s,
            wait_s=wait_s,
            report=report,
        )
    if watch.verdict == analysis.INCONCLUSIVE:
        reason = (
            f"inconclusive after {watch.elapsed_s:.0f} s ({watch.shortfall()}): no traffic is not success"
        )
    else:
        shown = [m for m in watch.measurements if m.verdict == watch.verdict]
        reason = f"{watch.verdict}: " + "; ".join(f"{m.check} {m.detail}" for m in shown)
    if as_json:
        console.print_json(
            json.dumps(
                {
                    **result,
                    "verdict": watch.verdict,
                    "reason": reason,
                    "rounds": watch.rounds,
                    "elapsed_s": watch.elapsed_s,
                    "checks": [m.to_dict() for m in watch.measurements],
                }
            )
        )
    else:
        colour = "green" if watch.verdict == analysis.PASS else "red"
        console.print(f"[{colour}]{escape(reason)}[/{colour}]", highlight=False, soft_wrap=True)
    if watch.verdict != analysis.PASS:
        raise typer.Exit(1)


@app.command()
def traffic(
    model: Annotated[str, typer.Option("--model", help="Served model (policy) name.")],
    url: Annotated[str, typer.Option("--url", help="TorchServe inference API.")] = "http://127.0.0.1:8080",
    env: Annotated[str, typer.Option("--env", help="Gymnasium environment id to drive.")] = "CartPole-v1",
    episodes: Annotated[int, typer.Option("--episodes", min=1, help="Episodes to run.")] = 20,
    feedback_url: Annotated[
        str | None, typer.Option("--feedback-url", help="Reward service; omit to send no rewards.")
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, max=256, help="Episodes run at once.")
    ] = 1,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="Cut every episode after this many steps.")
    ] = None,
    timeout_ms: Annotated[float, typer.Option("--timeout-ms", min=1, help="Deadline per decision.")] = 100.0,
    seed: Annotated[int, typer.Option("--seed", help="Episode i resets the environment with seed + i.")] = 0,
    run_dir: Annotated[
        Path,
        typer.Option(
            "--serve-run-dir",
            help="Server run directory: its key file and the canary split.",
            file_okay=False,
        ),
    ] = DEFAULT_RUN_DIR,
    summary: Annotated[
        Path | None, typer.Option("--summary", help="Also write the JSON summary here.")
    ] = None,
) -> None:
    """rlops serve traffic, with episodes sent to a running canary's candidate at its current share."""
    from rlops_server.commands.traffic import reward_sender, summary_table, traffic_token
    from rlops_server.traffic import TrafficError, run_traffic

    from rlops_delivery.split import SplitClient

    with _user_errors():
        client = SplitClient(
            url,
            model,
            run_dir=run_dir,
            timeout=timeout_ms / 1e3,
            token=traffic_token(run_dir),
            pool_size=concurrency,
        )
    sender = reward_sender(feedback_url)
    try:
        result = run_traffic(
            client, sender, env, episodes, concurrency=concurrency, seed=seed, max_steps=max_steps
        )
    except TrafficError as e:
        fail(str(e))
    finally:
        client.close()
    routed = client.stats()["routed"]
    console.print(summary_table(result))
    console.print("sent: " + ", ".join(f"{k} {v:,}" for k, v in sorted(routed.items())), highlight=False)
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(
            json.dumps({**result.to_json(), "routed": routed}, indent=2) + "\n", encoding="utf-8"
        )


@app.command()
def drill(
    kind: Annotated[str, typer.Argument(help="constant (always one action) or slow (slower by --seconds).")],
    policy: PolicyOption = None,
    source: Annotated[
        str, typer.Option("--from", help="Version (or alias) the bad candidate is built from.")
    ] = "champion",
    action: Annotated[
        int, typer.Option("--action", min=0, help="constant, Discrete policy: the action it always answers.")
    ] = 0,
    bound: Annotated[
        str,
        typer.Option(
            "--bound",
            help="constant, Box policy: low or high, the bound its action sits at in every dimension.",
        ),
    ] = "high",
    seconds: Annotated[float, typer.Option("--seconds", help="slow: computation added per pass.")] = 0.25,
    registry: RegistryOption = DEFAULT_REGISTRY,
) -> None:
    """Publish a deliberately bad candidate, to check that the canary rolls it back (a fire drill)."""
    import tempfile

    from rlops_delivery.drills import BOUNDS, KINDS, write_drill_policy_dir

    if kind not in KINDS:
        fail(f"drill kind {kind!r}: choose from {', '.join(KINDS)}")
    if bound not in BOUNDS:
        fail(f"--bound {bound!r}: choose from {', '.join(BOUNDS)}")
    with _user_errors():
        policy = _policy(registry, policy)
        reg = Registry(registry)
        with tempfile.TemporaryDirectory(prefix="rlops-drill-") as tmp:
            built = write_drill_policy_dir(
                reg.resolve(policy, source),
                Path(tmp) / "policy",
                kind,
                action=action,
                bound=bound,
                seconds=seconds,
            )
            version = reg.publish(built, policy)
    console.print(
        f"published {policy} version {version}: a {kind} drill candidate (no gate decision)", highlight=False
    )
    console.print(
        f"canary it: rlops rollout start {version} --policy {policy} --restart-serving "
        f'--force-reason "drill: {kind}"',
        highlight=False,
        soft_wrap=True,
    )
