"""Load a new candidate into the local TorchServe: restart it with the registry's champion and candidate.

TorchServe runs with its model API off (registering models at runtime would let anyone who reaches the
management port load code), so a version that was not loaded at start cannot be added later. Locally the
server is restarted with the same ports, workers, batching and decision log, through ``rlops serve
start``'s own code; clients fall back for the seconds that takes, and the workers write every queued
decision before they stop. On Kubernetes the Rollout starts the candidate's pods instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import typer
from rlops_contracts import CANDIDATE
from rlops_server import process
from rlops_server.tsconfig import PROPERTIES_FILE, read_properties
from rlops_trainer.registry import Registry


class ServingError(RuntimeError):
    """The local server could not be (re)started with the candidate; the message says why."""


def served_versions(run_dir: Path, policy: str) -> set[str]:
    """Versions of ``policy`` the running server in ``run_dir`` loaded at start."""
    state = process.running_state(Path(run_dir).resolve())
    if state is None:
        raise ServingError(f"no TorchServe is running from {run_dir} (rlops serve start)")
    return {m.version for m in state.models if m.name == policy}


def _port(address: str, key: str, path: Path) -> int:
    port = urlsplit(address if "//" in address else f"//{address}").port
    if port is None:
        raise ServingError(f"{path}: {key}={address!r} has no port")
    return port


def restart_with_candidate(
    registry: Path, policy: str, candidate: int, run_dir: Path, timeout_s: float = 180.0
) -> str:
    """Point the registry's ``candidate`` alias at ``candidate`` and restart the server in ``run_dir``
    so that it serves the champion (default) and that candidate; returns what happened, in words."""
    from rlops_server.commands import serve

    run_dir = Path(run_dir).resolve()
    state = process.running_state(run_dir)
    if state is None:
        raise ServingError(f"no TorchServe is running from {run_dir} (rlops serve start)")
    if str(candidate) in {m.version for m in state.models if m.name == policy}:
        return f"TorchServe from {run_dir} already serves {policy} version {candidate}"
    props_path = run_dir / PROPERTIES_FILE
    props = read_properties(props_path)
    try:
        per_model = json.loads(props["models"])[policy]
        settings = next(iter(per_model.values()))
        batcher = next(m.batcher for m in state.models if m.name == policy)
        inference = urlsplit(props["inference_address"])
        metrics = urlsplit(props["metrics_address"])
    except (KeyError, ValueError, StopIteration) as e:
        raise ServingError(f"{props_path}: cannot read the server's settings for {policy}: {e}") from None
    reg = Registry(registry)
    if reg.aliases(policy).get(CANDIDATE) != candidate:
        reg.set_alias(policy, CANDIDATE, candidate, reason=f"load version {candidate} for a canary")
    process.stop(run_dir)
    try:
        serve.start(
            name=policy,
            registry=Path(registry),
            run_dir=run_dir,
            host=inference.hostname or "127.0.0.1",
            port=_port(props["inference_address"], "inference_address", props_path),
            management_port=_port(props["management_address"], "management_address", props_path),
            metrics_port=_port(props["metrics_address"], "metrics_address", props_path),
            metrics_host=metrics.hostname or "127.0.0.1",
            grpc_port=int(props["grpc_inference_port"]),
            workers=int(settings["minWorkers"]),
            batch_size=int(settings["batchSize"]),
            max_batch_delay_ms=int(settings["maxBatchDelay"]),
            batcher=serve.Batcher(batcher),
            decision_log_dir=Path(state.decision_log_dir) if state.decision_log_dir else Path(".rlops/logs"),
            no_decision_log=state.decision_log_dir is None,
            timeout=timeout_s,
        )
    except typer.Exit as e:
        raise ServingError(
            f"restarting TorchServe from {run_dir} with version {candidate} failed (exit {e.exit_code})"
        ) from None
    return f"restarted TorchServe from {run_dir} with {policy} champion and candidate version {candidate}"
