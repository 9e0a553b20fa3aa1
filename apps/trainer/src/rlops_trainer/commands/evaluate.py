"""``rlops evaluate``: off-policy estimates for candidate policies, the promotion gate, a report.

Every candidate is valued from the logged data with each estimator (bootstrap intervals, ESS), compared
with the registry's champion (``--champion NAME``) or else the behaviour policy by the gate, and
optionally rolled out in its environment for ground truth. The command writes ``report.json`` and
``report.png`` and prints a table; it exits 0 whatever the gate says (it is a report).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rlops_contracts import CHAMPION
from rlops_contracts.registry import DEFAULT_REGISTRY, REGISTRY_ENV

from rlops_trainer.card import utc_now
from rlops_trainer.commands import fail as _fail
from rlops_trainer.datasets import DatasetError, Transitions
from rlops_trainer.gate import GateError, decide, default_estimator
from rlops_trainer.ope import (
    ACTION_SAMPLES,
    ESTIMATORS,
    NEEDS_PROPENSITIES,
    Estimate,
    FQEConfig,
    OPEError,
    possible_estimators,
)
from rlops_trainer.policy import Selection
from rlops_trainer.report import PLOT_FILE, REPORT_FILE, REPORT_SCHEMA_VERSION


@dataclass
class _Policy:
    ref: str
    path: Path
    module: Any  # torch.jit.ScriptModule
    card: dict[str, Any]
    role: str  # "candidate" | "champion"
    label: str = ""
    estimates: dict[str, Estimate] = field(default_factory=dict)
    rollout: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def selection(self) -> Selection:
        return Selection.from_card(self.card)

    @property
    def version(self) -> int | None:
        v = self.card.get("version")
        return int(v) if isinstance(v, int) else None


console = Console()


def _load_policy(ref: str, path: Path, role: str, data: Transitions) -> _Policy:
    from rlops_trainer.export import load_policy_dir

    module, card = load_policy_dir(path)
    shape = card["observation_space"]["shape"]
    obs_dim = math.prod(int(s) for s in shape)
    if obs_dim != data.meta.obs_dim:
        _fail(
            f"policy {ref} ({path}) takes observations of shape {shape}, but the dataset's have "
            f"{data.meta.obs_dim} features"
        )
    space = card["action_space"]
    if (space["type"] == "Box") != data.meta.is_continuous:
        _fail(
            f"policy {ref} ({path}) acts in a {space['type']} action space, but the dataset's is "
            f"{data.meta.action_space.get('type')}"
        )
    if space["type"] == "Box":
        if int(space["shape"][0]) != data.meta.action_dim:
            _fail(
                f"policy {ref} ({path}) gives actions of {space['shape'][0]} dimensions, but the dataset's "
                f"have {data.meta.action_dim}"
            )
    elif int(space["n"]) != data.meta.n_actions:
        _fail(
            f"policy {ref} ({path}) has {space['n']} actions, but the dataset's action space has "
            f"{data.meta.n_actions}"
        )
    return _Policy(ref=ref, path=path, module=module, card=card, role=role)


def _parse_estimators(text: str | None, data: Transitions, stochastic: bool = True) -> tuple[str, ...]:
    """The estimators to run; ``stochastic``: every policy explores (Box actions: ``std > 0``), which
    importance weights over continuous actions need."""
    deterministic = data.meta.is_continuous and not stochastic
    if text is None:
        possible = possible_estimators(data, stochastic)
        if possible != ESTIMATORS:
            why = (
                "the dataset has no behaviour propensities (column 'behavior_logp')"
                if not data.has_propensities
                else "a deterministic continuous policy (selection std 0) has no density for importance "
                "weights"
            )
            console.print(f"[yellow]note:[/yellow] {why}; running {', '.join(possible)} only")
        return possible
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown or not names:
        _fail(
            f"--estimators: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(ESTIMATORS)}"
        )
    needs = [n for n in names if n in NEEDS_PROPENSITIES]
    if needs and not data.has_propensities:
        _fail(
            f"--estimators {','.join(needs)} need behaviour propensities, but column 'behavior_logp' is "
            "missing (NaN) in this dataset; use --estimators fqe"
        )
    if needs and deterministic:
        _fail(
            f"--estimators {','.join(needs)} need importance weights, but a policy here is deterministic "
            "(selection std 0): over continuous actions a point mass has no density, so the ratio is "
            "undefined; use --estimators fqe"
        )
    return names


def _labels(policies: list[_Policy]) -> None:
    seen: dict[str, int] = {}
    for p in policies:
        base = str(p.card.get("name") or p.path.name)
        if p.version is not None:
            base += f"@{p.version}"
        # Unpublished candidates usually share a name: the algorithm tells them apart.
        elif p.card.get("algorithm"):
            base += f" {p.card['algorithm']}"
        seen[base] = seen.get(base, 0) + 1
        p.label = base if seen[base] == 1 else f"{base}#{seen[base]}"


def evaluate(
    data: Annotated[
        Path, typer.Option("--data", help="Logged dataset (Parquet file or directory of part files).")
    ],
    policy: Annotated[
        list[str] | None,
        typer.Option(
            "--policy",
            help="Candidate policy: a policy directory, or NAME@VERSION / NAME@ALIAS in the registry. "
            "Repeat for several.",
        ),
    ] = None,
    registry: Annotated[
        Path,
        typer.Option(
            "--registry", envvar=REGISTRY_ENV, help="Registry folder for NAME@REF policies.", file_okay=False
        ),
    ] = DEFAULT_REGISTRY,
    champion: Annotated[
        str | None,
        typer.Option(
            "--champion",
            help="Policy NAME in the registry whose champion is evaluated too and is the incumbent the "
            "candidates must beat (without it, or without a champion yet, the behaviour policy).",
        ),
    ] = None,
    gamma: Annotated[float, typer.Option("--gamma", help="Discount of the estimated return.")] = 0.99,
    estimators: Annotated[
        str | None,
        typer.Option(
            "--estimators",
            help=f"Comma-separated subset of {','.join(ESTIMATORS)}. Default: all of them, or fqe alone when "
            "the data has no behaviour propensities or a continuous-action policy is deterministic (std 0).",
        ),
    ] = None,
    gate_estimator: Annotated[
        str | None,
        typer.Option(
            "--gate-estimator",
            help="Estimator the gate decides on. Default: dr, or fqe when importance weights are impossible "
            "(no propensities in the data, or a deterministic continuous-action policy).",
        ),
    ] = None,
    margin: Annotated[
        float, typer.Option("--margin", help="How far the candidate's lower bound must clear the baseline.")
    ] = 0.0,
    relative: Annotated[
        bool,
        typer.Option("--relative", help="Read --margin as a fraction of the baseline's value (0.05 = 5 %)."),
    ] = False,
    against: Annotated[
        str,
        typer.Option(
            "--against",
            help="Baseline number the lower bound is compared with: 'value' (its point estimate) or "
            "'upper' (its upper bound, stricter).",
        ),
    ] = "value",
    env_episodes: Annotated[
        int,
        typer.Option(
            "--env-episodes", help="Also roll each policy out for N episodes for ground truth (0: no)."
        ),
    ] = 0,
    env_id: Annotated[
        str | None,
        typer.Option("--env-id", help="Gymnasium environment for rollouts. Default: the dataset's env id."),
    ] = None,
    confidence: Annotated[
        float, typer.Option("--confidence", help="Level of the bootstrap intervals.")
    ] = 0.95,
    n_bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples per interval.")] = 1000,
    fqe_steps: Annotated[
        int, typer.Option("--fqe-steps", help="Gradient steps of fitted Q evaluation per policy.")
    ] = FQEConfig.steps,
    fqe_models: Annotated[
        int,
        typer.Option(
            "--fqe-models",
            help="Q networks in the FQE ensemble (different seeds): their mean is the estimate, their "
            "disagreement widens the interval and warns.",
        ),
    ] = FQEConfig.ensemble,
    clip_weights: Annotated[
        float | None,
        typer.Option(
            "--clip-weights",
            help="Cap cumulative importance weights at this value (less variance, some bias). "
            "Default: no cap.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap, FQE and rollouts.")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for report.json and report.png. Default: .rlops/reports/evaluate-<UTC time>.",
            file_okay=False,
        ),
    ] = None,
) -> None:
    """Estimate candidate policies' values off-policy, gate them against the incumbent, write a report."""
    t_start = time.perf_counter()
    if not 0.0 < gamma <= 1.0:
        _fail(f"--gamma must be in (0, 1], got {gamma}")
    if not 0.0 < confidence < 1.0:
        _fail(f"--confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 1:
        _fail(f"--bootstrap must be >= 1, got {n_bootstrap}")
    if fqe_steps < 1:
        _fail(f"--fqe-steps must be >= 1, got {fqe_steps}")
    if fqe_models < 1:
        _fail(f"--fqe-models must be >= 1, got {fqe_models}")
    if clip_weights is not None and not clip_weights > 0.0:
        _fail(f"--clip-weights must be > 0, got {clip_weights}")
    if not margin >= 0.0:
        _fail(f"--margin must be >= 0, got {margin}")
    if against not in ("value", "upper"):
        _fail(f"--against must be 'value' or 'upper', got {against!r}")
    if env_episodes < 0:
        _fail(f"--env-episodes must be >= 0, got {env_episodes}")
    if not policy and not champion:
        _fail("nothing to evaluate: give --policy REF (repeatable) and/or --champion NAME")

    from rlops_trainer import datasets

    t0 = time.perf_counter()
    try:
        transitions = datasets.load(data)
    except DatasetError as e:
        _fail(str(e))
    load_s = time.perf_counter() - t0
    n_episodes = len(transitions.episode_starts())
    console.print(
        f"data: {escape(str(data))}: {len(transitions):,} transitions, {n_episodes:,} episodes of "
        f"{escape(transitions.meta.env_id)}, behaviour {escape(transitions.meta.behavior_policy)}"
    )
    policies = _resolve(policy or [], registry, champion, transitions)
    _labels(policies)
    stochastic = all(p.selection.std > 0.0 for p in policies)
    names = _parse_estimators(estimators, transitions, stochastic)
    weights_possible = "pdis" in possible_estimators(transitions, stochastic)
    gate_name = (gate_estimator or default_estimator(weights_possible)).strip().lower()
    if gate_name not in names:
        _fail(f"--gate-estimator {gate_name} is not among the estimators run ({','.join(names)})")
    fqe_config = FQEConfig(steps=fqe_steps, seed=seed, ensemble=fqe_models)

    from rlops_trainer import ope

    behavior = ope.behavior_value(
        transitions, gamma=gamma, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed
    )
    rollout_env = env_id or transitions.meta.env_id
    for p in policies:
        console.print(
            f"[bold]{escape(p.label)}[/bold] ({p.role}): off-policy evaluation with {', '.join(names)}"
        )
        t0 = time.perf_counter()
        try:
            p.estimates = ope.evaluate(
                transitions,
                (
                    ope.policy_target(p.module, p.selection)
                    if transitions.meta.is_continuous
                    else ope.policy_probs_fn(p.module, p.selection)
                ),
                gamma=gamma,
                estimators=names,
                n_bootstrap=n_bootstrap,
                confidence=confidence,
                fqe_config=fqe_config,
                seed=seed,
                clip_weights=clip_weights,
                progress=True,
            )
        except OPEError as e:
            _fail(f"{p.label}: {e}")
        p.timings["ope_s"] = time.perf_counter() - t0
        if env_episodes:
            from rlops_trainer.rollout import RolloutError, rollout

            t0 = time.perf_counter()
            try:
                result = rollout(
                    p.module, p.selection, rollout_env, env_episodes, seed=seed, gamma=gamma, progress=True
                )
            except RolloutError as e:
                _fail(f"{p.label}: {e}" + ("" if env_id else " (choose the environment with --env-id)"))
            p.rollout = result.to_dict(confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)
            p.timings["rollout_s"] = time.perf_counter() - t0

    incumbent = next((p for p in policies if p.role == "champion"), None)
    for p in policies:
        if p.role != "candidate":
            continue
        try:
            decision = decide(
                p.estimates[gate_name],
                incumbent.estimates[gate_name] if incumbent else None,
                behavior,
                margin,
                relative,
                against="upper" if against == "upper" else "value",
                incumbent_label=f"champion {incumbent.label}" if incumbent else "champion",
                incumbent_version=incumbent.version if incumbent else None,
            )
        except GateError as e:
            _fail(str(e))
        p.gate = decision.to_dict()

    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "created_at": utc_now(),
        "data": {
            "path": str(data),
            "fingerprint": transitions.fingerprint(),
            "env_id": transitions.meta.env_id,
            "n_transitions": len(transitions),
            "n_episodes": n_episodes,
            "behavior_policy": transitions.meta.behavior_policy,
            "source": transitions.meta.source,
            "has_propensities": transitions.has_propensities,
        },
        "settings": {
            "gamma": gamma,
            "estimators": list(names),
            "confidence": confidence,
            "n_bootstrap": n_bootstrap,
            "seed": seed,
            "fqe": asdict(fqe_config),
            "action_samples": ACTION_SAMPLES if transitions.meta.is_continuous else None,
            "clip_weights": clip_weights,
            "gate": {"estimator": gate_name, "margin": margin, "relative": relative, "against": against},
            "env_episodes": env_episodes,
            "env_id": rollout_env if env_episodes else None,
        },
        "behavior": behavior.to_dict(),
        "champion": (
            {"name": champion, "version": incumbent.version, "ref": incumbent.ref} if incumbent else None
        ),
        "policies": [
            {
                "ref": p.ref,
                "path": str(p.path.resolve()),
                "label": p.label,
                "name": p.card.get("name"),
                "version": p.version,
                "role": p.role,
                "algorithm": p.card.get("algorithm"),
                # The card's own selection: std only for Box policies, so discrete reports keep their form.
                "selection": dict(p.card["policy"]["selection"]),
                "estimates": {k: v.to_dict() for k, v in p.estimates.items()},
                "rollout": p.rollout,
                "gate": p.gate,
                "timings": p.timings,
            }
            for p in policies
        ],
        "timings": {"load_s": load_s, "total_s": time.perf_counter() - t_start},
    }
    _finish(report, out)


def _resolve(refs: list[str], registry: Path, champion: str | None, data: Transitions) -> list[_Policy]:
    from rlops_contracts.card import ArtifactError
    from rlops_contracts.registry import resolve_policy_ref

    from rlops_trainer.registry import Registry

    policies: list[_Policy] = []
    champion_path: Path | None = None
    try:
        if champion:
            reg = Registry(registry)
            if champion in reg.names() and CHAMPION in reg.aliases(champion):
                champion_path = reg.resolve(champion, CHAMPION)
                policies.append(_load_policy(f"{champion}@{CHAMPION}", champion_path, "champion", data))
            else:
                console.print(
                    f"[yellow]note:[/yellow] registry {escape(str(registry))} has no champion of "
                    f"{escape(champion)} yet: candidates are compared with the behaviour policy"
                )
        for ref in refs:
            path = resolve_policy_ref(ref, registry)
            if champion_path is not None and path.resolve() == champion_path.resolve():
                continue  # the champion is already in, as the incumbent
            policies.append(_load_policy(ref, path, "candidate", data))
    except ArtifactError as e:
        _fail(str(e))
    return policies


def _finish(report: dict[str, Any], out: Path | None) -> None:
    from rlops_trainer import report as render

    out_dir = out or Path(".rlops/reports") / f"evaluate-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    json_path = render.write_json(report, out_dir / REPORT_FILE)
    plot_path = render.plot(report, out_dir / PLOT_FILE)
    console.print(render.table(report))
    for line in render.warning_lines(report):
        console.print(f"[yellow]warning:[/yellow] {escape(line)}", soft_wrap=True)
    for line in render.gate_lines(report):
        console.print(f"[bold]gate[/bold] {escape(line)}", soft_wrap=True)
    timings = ", ".join(
        f"{p['label']} {p['timings'].get('ope_s', 0):.1f} s"
        + (f" + rollouts {p['timings']['rollout_s']:.1f} s" if "rollout_s" in p["timings"] else "")
        for p in report["policies"]
    )
    console.print(f"time: {report['timings']['total_s']:.1f} s ({timings})")
    console.print(f"report: {escape(str(json_path))}\nplot:   {escape(str(plot_path))}")
