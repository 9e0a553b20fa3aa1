"""Load a new candidate into the local server: restart it with the registry's champion and candidate.

Serving runs with its model API off (registering models at runtime would let anyone who reaches the
management port load code), so a version that was not loaded at start cannot be added later. Locally the
server is restarted with the plan it was started with (:func:`rlops_server.serving.restart`: the same
ports, workers, batching, request limits and decision log); clients fall back for the seconds that takes,
and the workers write every queued decision before they stop. On Kubernetes the Rollout starts the
candidate's pods instead.
"""

from __future__ import annotations

from pathlib import Path

from rlops_contracts import CANDIDATE
from rlops_server import serving
from rlops_server.backend import ServeError
from rlops_trainer.registry import Registry


class ServingError(RuntimeError):
    """The local server could not be (re)started with the candidate; the message says why."""


def served_versions(run_dir: Path, policy: str) -> set[str]:
    """Versions of ``policy`` the running server in ``run_dir`` loaded at start."""
    try:
        return set(serving.status(run_dir).of(policy))
    except ServeError as e:
        raise ServingError(str(e)) from None


def restart_with_candidate(registry: Path, policy: str, candidate: int, run_dir: Path) -> str:
    """Point the registry's ``candidate`` alias at ``candidate`` and restart the server in ``run_dir``
    so that it serves the champion (default) and that candidate; returns what happened, in words."""
    run_dir = Path(run_dir).resolve()
    if str(candidate) in served_versions(run_dir, policy):
        return f"the server from {run_dir} already serves {policy} version {candidate}"
    try:
        plan = serving.stored_plan(run_dir)
    except ServeError as e:
        raise ServingError(str(e)) from None
    if plan.policy != policy:
        raise ServingError(f"the server from {run_dir} serves {plan.policy!r}, not {policy!r}")
    reg = Registry(registry)
    if reg.aliases(policy).get(CANDIDATE) != candidate:
        reg.set_alias(policy, CANDIDATE, candidate, reason=f"load version {candidate} for a canary")
    try:
        serving.restart(run_dir, registry=Path(registry))
    except (ServeError, ValueError) as e:
        raise ServingError(
            f"restarting the server from {run_dir} with version {candidate} failed: {e}"
        ) from None
    return f"restarted the server from {run_dir} with {policy} champion and candidate version {candidate}"
