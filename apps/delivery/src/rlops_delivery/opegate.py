"""The OPE gate on served logs: before any traffic moves, value the candidate on what serving logged.

The registry's gate judged the candidate on its training data when it was published. Serving has
logged decisions since (under the champion, and earlier candidates), joined with the rewards that came
back: the most recent picture of the world. This gate values the candidate and the champion off-policy on
that data with the same estimator (:func:`rlops_trainer.ope.evaluate`) and applies the same rule
(:func:`rlops_trainer.gate.decide`): promote only when the candidate's lower bound clears the champion.

The logs are joined with :func:`rlops_server.join.join`; a subset of the decision files (the loop's
window) is joined through a folder of links to them, because the join reads whole folders.

Box (continuous) policies are valued the same way, with the estimators their logs allow
(:func:`rlops_trainer.ope.possible_estimators`): fitted Q evaluation always; importance-sampling and
doubly robust estimates only when the logs carry the behaviour's log-densities and both policies explore
(``selection.std > 0``), because a deterministic policy over continuous actions has no density.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from rlops_contracts import CHAMPION
from rlops_contracts.card import ArtifactError
from rlops_server.decision_log import DECISIONS_STREAM
from rlops_server.feedback import REWARDS_STREAM
from rlops_server.join import JoinError, JoinStats, input_files, join
from rlops_trainer import ope
from rlops_trainer.datasets import DatasetError, Transitions, space_bounds
from rlops_trainer.export import load_policy_dir
from rlops_trainer.gate import GateError, decide, default_estimator
from rlops_trainer.hyperparams import ESTIMATORS
from rlops_trainer.ope import FQEConfig, OPEError
from rlops_trainer.policy import Selection
from rlops_trainer.registry import Registry

from rlops_delivery.config import OPEGateError, OPESettings


@contextmanager
def _linked(decision_files: Sequence[Path], logs: Path) -> Iterator[Path]:
    """A temporary log root whose decisions/ holds links to ``decision_files`` and whose rewards/ links
    to every reward file under ``logs`` (rewards may come long after their decisions)."""
    root = Path(tempfile.mkdtemp(prefix="rlops-join-"))
    try:
        for stream, files in (
            (DECISIONS_STREAM, decision_files),
            (REWARDS_STREAM, input_files(logs, REWARDS_STREAM) if (logs / REWARDS_STREAM).is_dir() else []),
        ):
            d = root / stream
            d.mkdir()
            for i, f in enumerate(files):
                os.symlink(Path(f).resolve(), d / f"{i:06d}-{Path(f).name}")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def join_logs(
    logs: Path,
    policy: str,
    registry: Path,
    out: Path,
    decision_files: Sequence[Path] | None = None,
) -> JoinStats:
    """Join the decisions (all complete files under ``logs``, or only ``decision_files``) of ``policy``
    with every reward under ``logs`` into the Parquet dataset ``out``."""
    logs = Path(logs)
    try:
        if decision_files is None:
            return join(logs, logs, out, policy=policy, registry=registry)
        if not decision_files:
            raise OPEGateError(f"no decision files to join for {policy}")
        with _linked(decision_files, logs) as root:
            return join(root, root, out, policy=policy, registry=registry)
    except JoinError as e:
        raise OPEGateError(f"joining the logs under {logs}: {e}") from None


def load_dataset(path: Path) -> Transitions:
    from rlops_trainer import datasets

    try:
        return datasets.load(path)
    except DatasetError as e:
        raise OPEGateError(str(e)) from None


def _target(module: Any, card: dict[str, Any], data: Transitions) -> ope.Target:
    """What the estimators value: action probabilities (Discrete) or a continuous target (Box)."""
    selection = Selection.from_card(card)
    if data.meta.is_continuous:
        return ope.policy_target(module, selection)
    return ope.policy_probs_fn(module, selection)


def _estimate(
    module: Any, card: dict[str, Any], data: Transitions, estimator: str, s: OPESettings
) -> ope.Estimate:
    estimates = ope.evaluate(
        data,
        _target(module, card, data),
        gamma=s.gamma,
        estimators=(estimator,),
        n_bootstrap=s.n_bootstrap,
        confidence=s.confidence,
        fqe_config=FQEConfig(steps=s.fqe_steps, seed=s.seed, ensemble=s.fqe_models),
        seed=s.seed,
    )
    return estimates[estimator]


def _space_problem(card: dict[str, Any], data: Transitions) -> str | None:
    """How the policy's observation and action spaces differ from the logs', or None when they fit."""
    n_obs = math.prod(int(x) for x in card["observation_space"]["shape"])
    if n_obs != data.meta.obs_dim:
        return f"takes {n_obs} observation features, but the logs have {data.meta.obs_dim}"
    space = card["action_space"]
    logged = data.meta.action_space
    if space["type"] != logged.get("type"):
        return f"acts in a {space['type']} action space, but the logs' is {logged.get('type')}"
    if space["type"] == "Discrete":
        if int(space["n"]) != data.meta.n_actions:
            return f"has {space['n']} actions, but the logs have {data.meta.n_actions}"
        return None
    low, high = data.meta.action_bounds()
    card_low, card_high = space_bounds(space)
    if len(card_low) != len(low):
        return f"gives actions of {len(card_low)} dimensions, but the logs' have {len(low)}"
    # The card stores the bounds as float32 values; the logs' metadata may hold them in float64.
    if not (
        np.allclose(card_low, low, rtol=1e-6, atol=1e-6)
        and np.allclose(card_high, high, rtol=1e-6, atol=1e-6)
    ):
        return (
            f"acts within [{card_low.tolist()}, {card_high.tolist()}], but the logs' action space is "
            f"[{low.tolist()}, {high.tolist()}]"
        )
    return None


def _estimator(
    settings: OPESettings, data: Transitions, cards: dict[str, dict[str, Any]]
) -> tuple[str, tuple[str, ...]]:
    """The estimator the gate decides on and every one the logs and policies allow."""
    stochastic = all(Selection.from_card(c).std > 0.0 for c in cards.values())
    possible = ope.possible_estimators(data, stochastic)
    estimator = settings.estimator or default_estimator("dr" in possible)
    if estimator in possible:
        return estimator, possible
    if not data.has_propensities:
        raise OPEGateError(f"estimator {estimator} needs behaviour propensities, and the logs have none")
    deterministic = sorted(role for role, c in cards.items() if Selection.from_card(c).std <= 0.0)
    raise OPEGateError(
        f"estimator {estimator} needs importance weights, but the {' and '.join(deterministic)} "
        "policy is deterministic (selection std 0): over continuous actions it has no density; "
        f"accepted here: {', '.join(possible)}"
    )


def gate(
    registry: Path, policy: str, candidate: int | str | Path, data: Transitions, settings: OPESettings
) -> dict[str, Any]:
    """Value candidate and champion on ``data`` and decide; the result is plain JSON data.

    ``candidate`` is a registry version (number or alias) or an unpublished policy directory. Keys:
    ``promote``, ``reason``, ``candidate`` (its version, None for a directory), ``champion`` (None: no
    champion, the behaviour policy is the baseline), ``gate`` (the full decision, as the registry's
    publish takes it), ``estimates``, ``behavior``, ``data``, ``possible_estimators`` (what the logs and
    both policies allow), ``settings``.
    """
    reg = Registry(registry)
    try:
        champion = reg.aliases(policy).get(CHAMPION) if policy in reg.names() else None
        version: int | None = None
        if isinstance(candidate, Path):
            loaded = {"candidate": load_policy_dir(candidate)}
        else:
            version = reg.resolve_version(policy, candidate)
            loaded = {"candidate": reg.load(policy, version)}
        if champion is not None and champion != version:
            loaded["champion"] = reg.load(policy, champion)
    except ArtifactError as e:
        raise OPEGateError(str(e)) from None
    for role, (_, card) in loaded.items():
        problem = _space_problem(card, data)
        if problem:
            raise OPEGateError(f"{policy} {role} ({card.get('version') or 'unpublished'}) {problem}")
    estimator, possible = _estimator(settings, data, {role: card for role, (_, card) in loaded.items()})
    try:
        estimates = {role: _estimate(m, c, data, estimator, settings) for role, (m, c) in loaded.items()}
        behavior = ope.behavior_value(
            data,
            gamma=settings.gamma,
            n_bootstrap=settings.n_bootstrap,
            confidence=settings.confidence,
            seed=settings.seed,
        )
        decision = decide(
            estimates["candidate"],
            estimates.get("champion"),
            behavior,
            settings.margin,
            settings.relative,
            against="upper" if settings.against == "upper" else "value",
            incumbent_label=f"champion {policy}@{champion}",
            incumbent_version=champion if "champion" in estimates else None,
        )
    except (OPEError, GateError) as e:
        raise OPEGateError(str(e)) from None
    return {
        "promote": decision.promote,
        "reason": decision.reason,
        "candidate": version,
        "champion": champion,
        "gate": decision.to_dict(),
        "estimates": {role: e.to_dict() for role, e in estimates.items()},
        "behavior": behavior.to_dict(),
        "data": {
            "fingerprint": data.fingerprint(),
            "n_transitions": len(data),
            "n_episodes": len(data.episode_starts()),
            "behavior_policy": data.meta.behavior_policy,
            "has_propensities": data.has_propensities,
            "action_space": data.meta.action_space.get("type"),
        },
        "possible_estimators": [e for e in ESTIMATORS if e in possible],
        "settings": {**asdict(settings), "estimator": estimator},
    }


def gate_on_logs(
    logs: Path,
    registry: Path,
    policy: str,
    candidate: int | str,
    settings: OPESettings,
    decision_files: Sequence[Path] | None = None,
) -> dict[str, Any]:
    """Join the logs, then :func:`gate`; the join's counts go in the result under ``join``."""
    with tempfile.TemporaryDirectory(prefix="rlops-ope-") as tmp:
        out = Path(tmp) / "joined.parquet"
        stats = join_logs(logs, policy, registry, out, decision_files)
        data = load_dataset(out)
        result = gate(registry, policy, candidate, data, settings)
    result["join"] = {**stats.counts(), "versions": stats.versions, "logs": str(logs)}
    return result
