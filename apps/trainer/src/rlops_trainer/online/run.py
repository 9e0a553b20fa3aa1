"""The online training loop: Ray, the RLlib algorithm, checkpoints, metrics, stop rules and export.

The run directory (a local folder, or the model volume on Kubernetes) holds::

    config.yaml            the validated config of the run (resumes must agree with it)
    metrics.jsonl          one record per training iteration (see rlops_trainer.online.rllib)
    checkpoints/iter-NNNNNN/   RLlib's algorithm checkpoint plus rlops-state.json
    reference.parquet      episodes of the trained policy (the model card's reference data)
    policy/                policy.pt and model-card.json, as the offline trainer writes them

A checkpoint is written to a temporary directory, synced, then renamed, so a crash never leaves one
that resume would trust half-written; ``--resume`` continues from the newest and loses at most the
iterations since it (``checkpoint.every``). EnvRunner processes that die are replaced by RLlib
(``resources.restart_failed_env_runners``) and training goes on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rlops_contracts.durable import fsync_path, replace_atomic

from rlops_trainer import telemetry
from rlops_trainer.card import jsonable
from rlops_trainer.collect import CollectError, make_env
from rlops_trainer.online.config import ALGORITHMS, BOX_ALGORITHMS, ConfigError, OnlineConfig
from rlops_trainer.training import METRICS_FILE, start_metrics

if TYPE_CHECKING:
    from ray.rllib.algorithms import Algorithm

    from rlops_trainer.online.tracking import Tracker
    from rlops_trainer.training import TrainResult

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"
STATE_FILE = "rlops-state.json"
STATE_FORMAT = 1
_CHECKPOINT_RE = re.compile(r"^iter-(\d{6,})$")
# Keys that define what is learned; a resume may change everything else (budget, resources, metrics).
_IDENTITY_KEYS = ("algorithm", "env", "env_kwargs", "seed", "model", "training")
_LEARNER_CHECKED = ("loss", "policy_loss", "value_loss", "td_loss", "grad_norm")

log = logging.getLogger(__name__)


class OnlineTrainingError(RuntimeError):
    """The run cannot start or continue (resources, checkpoints, a diverged loss)."""


@dataclass
class OnlineRun:
    """How to run (not what to learn: that is the config)."""

    out_dir: Path
    """Run directory (see the module docstring)."""
    resume: bool = False
    """Continue from the newest checkpoint in ``out_dir``."""
    address: str | None = None
    """Ray cluster to join (``auto``, ``host:6379`` or ``ray://host:10001``); None starts a local Ray."""
    progress: bool = True
    """Show a progress line."""
    export: bool = True
    """Write the policy directory at the end."""
    on_iteration: Callable[[Algorithm, dict[str, float]], None] | None = None
    """Called after every iteration with the algorithm and the iteration's record."""
    baseline: Path | None = None
    """Policy directory of the incumbent (the registry's champion): its mean return in this run's
    environment is the run's baseline (``rlops_train_baseline_return``), the level below which
    ``RlopsTrainingEvalRegression`` fires on the run's evaluation return."""


@dataclass
class OnlineResult:
    """What a run did and produced."""

    config: OnlineConfig
    iterations: int
    env_steps: int
    start_iteration: int
    """0 for a fresh run, else the iteration of the checkpoint it resumed from."""
    train_time_s: float
    """Seconds spent in training iterations, over all resumes of the run."""
    setup_time_s: float
    """Seconds to start (or join) Ray and build (or restore) the algorithm in this process."""
    stopped_by: str
    final_metrics: dict[str, float]
    checkpoint: Path
    metrics_path: Path
    policy_dir: Path | None
    train_result: TrainResult | None
    metrics_port: int | None
    baseline_return: float | None = None
    """Mean return of ``OnlineRun.baseline`` in this run's environment, when one was given."""


# --------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def read_state(checkpoint: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise OnlineTrainingError(f"{checkpoint / STATE_FILE}: cannot be read ({e})") from e
    if state.get("format") != STATE_FORMAT:
        raise OnlineTrainingError(
            f"{checkpoint / STATE_FILE}: format {state.get('format')!r}, expected {STATE_FORMAT}"
        )
    return state


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def save_checkpoint(algo: Algorithm, out_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """Write the algorithm and the rlops state as ``checkpoints/iter-NNNNNN``; keep the newest ``keep``."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"iter-{int(state['iteration']):06d}"
    tmp = folder / f".tmp-{target.name}-{uuid.uuid4().hex}"
    try:
        algo.save_to_path(str(tmp.resolve()))
        # Strict JSON: a metric that was NaN (no episode ended yet) is stored as null.
        content = jsonable({"format": STATE_FORMAT, **state}, "checkpoint state")
        (tmp / STATE_FILE).write_text(json.dumps(content, allow_nan=False) + "\n")
        _fsync_tree(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
        fsync_path(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return target


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [k for k in _IDENTITY_KEYS if saved.get(k) != current.get(k)]


def prepare_run_dir(cfg: OnlineConfig, run: OnlineRun) -> Path | None:
    """Create the run directory; returns the checkpoint to resume from, if any.

    Refuses to start afresh over an earlier run's checkpoints (a later resume would mix the two) and to
    resume a run that learned something else.
    """
    out = Path(run.out_dir)
    if out.exists() and not out.is_dir():
        raise OnlineTrainingError(f"{out}: exists and is not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    found = checkpoints(out)
    if found and not run.resume:
        raise OnlineTrainingError(
            f"{out} already holds checkpoints of an earlier run (latest {found[-1].name}); resume it "
            "(--resume) or choose another --out"
        )
    latest = found[-1] if found else None
    if latest is not None:
        saved = read_state(latest).get("config", {})
        differ = _differences(saved, cfg.to_dict())
        if differ:
            detail = "; ".join(f"{k}: {saved.get(k)!r} -> {cfg.to_dict()[k]!r}" for k in differ)
            raise OnlineTrainingError(
                f"{latest} was trained with another config ({detail}); only stop, resources, checkpoint, "
                "export, metrics and tracking may change on --resume"
            )
    replace_atomic(out / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return latest


# --------------------------------------------------------------------------------------------------
# Ray


def check_environment(cfg: OnlineConfig) -> None:
    """Fail before Ray starts when the environment cannot be made or exported (names the key)."""
    try:
        handle = make_env(cfg.env, kwargs=dict(cfg.env_kwargs), box_actions=cfg.box_actions)
    except CollectError as e:
        key = "env_kwargs" if "does not accept" in str(e) else "env"
        hint = f"; {', '.join(BOX_ALGORITHMS)} takes Box actions" if "action space" in str(e) else ""
        raise ConfigError(f"{key}: {e}{hint}") from None
    handle.env.close()
    if cfg.box_actions and not isinstance(handle.action_space, gym.spaces.Box):
        discrete = ", ".join(a for a in ALGORITHMS if a not in BOX_ALGORITHMS)
        raise ConfigError(
            f"env: {cfg.env} has action space {handle.action_space}: {cfg.algorithm} needs a Box action "
            f"space; {discrete} take Discrete actions"
        )


def _check_resources(cfg: OnlineConfig, local: bool) -> None:
    import ray

    r = cfg.resources
    have = ray.cluster_resources()
    needs = {
        "CPU": (
            r.env_runners * r.cpus_per_env_runner + r.learners * r.cpus_per_learner,
            "resources.env_runners × cpus_per_env_runner + learners × cpus_per_learner",
        ),
        "GPU": (max(r.learners, 1) * r.gpus_per_learner, "resources.gpus_per_learner × max(learners, 1)"),
    }
    for kind, (need, keys) in needs.items():
        if need > have.get(kind, 0.0) + 1e-9:
            message = f"{keys} asks for {need:g} {kind}s; the Ray cluster has {have.get(kind, 0.0):g}"
            if local:
                raise ConfigError(message + " (lower them, or join a larger cluster with --address)")
            log.warning("%s; the run waits until an autoscaler adds them", message)


@contextmanager
def ray_session(address: str | None) -> Iterator[bool]:
    """Join ``address`` (or ``RAY_ADDRESS``, which KubeRay sets for a RayJob's driver) or start a local
    Ray; shuts down only what it started. Yields True when the Ray instance is this machine's own."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        yield address is None
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
    }
    try:
        ray.init(address=address, **kwargs) if address else ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise OnlineTrainingError(f"cannot connect to the Ray cluster at --address {address!r}: {e}") from e
    try:
        yield address is None
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------------------------------
# The loop


def _stop_reason(cfg: OnlineConfig, record: dict[str, float], full_window: bool) -> str | None:
    s = cfg.stop
    if s.target_return is not None and full_window and record["episode_return_mean"] >= s.target_return:
        return "target_return"
    if s.env_steps is not None and record["env_steps"] >= s.env_steps:
        return "env_steps"
    if s.iterations is not None and record["iteration"] >= s.iterations:
        return "iterations"
    if s.time_s is not None and record["time_s"] >= s.time_s:
        return "time_s"
    return None


def _check_finite(cfg: OnlineConfig, record: dict[str, float]) -> None:
    bad = sorted(k for k in _LEARNER_CHECKED if k in record and not math.isfinite(record[k]))
    if bad:
        raise OnlineTrainingError(
            f"{cfg.algorithm}: non-finite {', '.join(bad)} at iteration {int(record['iteration'])}; "
            "try a lower training.lr or training.grad_clip"
        )


@contextmanager
def _progress(enabled: bool, cfg: OnlineConfig, done: float) -> Iterator[Callable[[dict[str, float]], None]]:
    if not enabled:
        yield lambda record: None
        return
    total, key = (
        (cfg.stop.env_steps, "env_steps") if cfg.stop.env_steps else (cfg.stop.iterations, "iteration")
    )
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(f"{cfg.algorithm} {cfg.env}", total=total, completed=int(done), status="starting")

        def update(record: dict[str, float]) -> None:
            status = (
                f"iter {int(record['iteration'])}  env steps {int(record['env_steps']):,}  "
                f"return {record['episode_return_mean']:.1f}  {record['env_steps_per_s']:,.0f} steps/s"
            )
            bar.update(task, completed=record.get(key, 0.0), status=status)

        yield update


def _start_telemetry(cfg: OnlineConfig, out: Path) -> telemetry.TrainingTelemetry | None:
    """The metrics endpoint; a taken default port only warns, a port that was asked for is an error."""
    try:
        return telemetry.start(
            run=out.resolve().name,
            algorithm=cfg.algorithm.lower(),
            policy=cfg.policy_name,
            port=cfg.metrics.port,
            addr=cfg.metrics.addr,
        )
    except telemetry.TelemetryError as e:
        if "port" in cfg.metrics.model_fields_set:
            raise ConfigError(f"metrics.port: {e}") from None
        log.warning("training metrics are not served: %s", e)
        return None


def baseline_return(policy_dir: Path, cfg: OnlineConfig) -> float:
    """Mean return of the policy in ``policy_dir`` in the run's environment, with the selection its card
    records, over as many episodes as the run's final evaluation (``export.reference_episodes``)."""
    from rlops_trainer.datasets import action_space_text, box_space, discrete_space, same_action_space
    from rlops_trainer.export import load_policy_dir
    from rlops_trainer.policy import Selection
    from rlops_trainer.rollout import RolloutError, rollout

    try:
        module, card = load_policy_dir(policy_dir)
    except (ValueError, OSError) as e:
        raise OnlineTrainingError(f"baseline policy {policy_dir}: {e}") from None
    env_id = card["dataset"]["env_id"]
    if env_id != cfg.env:
        raise OnlineTrainingError(
            f"baseline policy {policy_dir} was trained for {env_id}, but this run trains in {cfg.env}"
        )
    env = gym.make(cfg.env, **cfg.env_kwargs)
    try:
        obs_shape = list(env.observation_space.shape or ())
        if isinstance(env.action_space, gym.spaces.Box):
            actions = box_space(env.action_space.low, env.action_space.high)
        else:
            actions = discrete_space(int(getattr(env.action_space, "n", -1)))
    finally:
        env.close()
    card_shape = [int(x) for x in card["observation_space"]["shape"]]
    if card_shape != obs_shape or not same_action_space(card["action_space"], actions):
        raise OnlineTrainingError(
            f"baseline policy {policy_dir} takes observations of shape {card_shape} and "
            f"{action_space_text(card['action_space'])}; {cfg.env} with env_kwargs {cfg.env_kwargs} has "
            f"{obs_shape} and {action_space_text(actions)}"
        )
    try:
        result = rollout(
            module,
            Selection.from_card(card),
            cfg.env,
            cfg.export.reference_episodes,
            seed=cfg.seed,
            env_kwargs=cfg.env_kwargs,
        )
    except RolloutError as e:
        raise OnlineTrainingError(f"baseline policy {policy_dir}: {e}") from None
    return float(result.returns.mean())


def train_online(cfg: OnlineConfig, run: OnlineRun) -> OnlineResult:
    """Train ``cfg`` with RLlib until a stop rule holds, checkpointing and exporting as configured."""
    started = time.perf_counter()
    check_environment(cfg)
    # RLlib takes seconds to import: only after the cheap checks passed.
    from rlops_trainer.online.export import export_checkpoint
    from rlops_trainer.online.rllib import EpisodeWindow, build_algorithm, record_from_result
    from rlops_trainer.online.tracking import start_tracking

    out = Path(run.out_dir)
    latest = prepare_run_dir(cfg, run)
    metrics_path = out / METRICS_FILE
    torch.set_num_threads(cfg.resources.torch_threads)

    window = EpisodeWindow(cfg.metrics.episode_window)
    state: dict[str, Any] = {"iteration": 0, "env_steps": 0.0, "time_s": 0.0, "record": {}}
    if latest is not None:
        state = read_state(latest)
        window.restore(state.get("episodes", {}))
    start_metrics(metrics_path, int(state["iteration"]), key="iteration")
    start_iteration = int(state["iteration"])

    tel = _start_telemetry(cfg, out)
    tracker: Tracker | None = None
    baseline: float | None = None
    try:
        if run.baseline is not None:
            baseline = baseline_return(run.baseline, cfg)
            if tel is not None:
                tel.record({"baseline_return": baseline})
        with ray_session(run.address) as local:
            _check_resources(cfg, local)
            algo = build_algorithm(cfg)
            try:
                if latest is not None:
                    algo.restore_from_path(str(latest.resolve()))
                tracker = start_tracking(cfg, out, state.get("tracking_run_id"))
                if tracker is not None and baseline is not None:
                    tracker.log({"iteration": float(state["iteration"]), "baseline_return": baseline})
                setup_s = time.perf_counter() - started
                record = {k: math.nan if v is None else float(v) for k, v in state.get("record", {}).items()}
                checkpoint = latest
                stopped_by = _stop_reason(cfg, record, window.full) if record else None
                with _progress(run.progress, cfg, float(state["env_steps"])) as update:
                    while stopped_by is None:
                        t0 = time.perf_counter()
                        result = algo.train()
                        elapsed = time.perf_counter() - t0
                        record = record_from_result(
                            result,
                            cfg,
                            window,
                            iteration_s=elapsed,
                            env_steps_before=float(state["env_steps"]),
                            time_s=float(state["time_s"]) + elapsed,
                        )
                        state = {
                            "iteration": int(record["iteration"]),
                            "env_steps": record["env_steps"],
                            "time_s": record["time_s"],
                            "record": record,
                            "episodes": window.state(),
                            "config": cfg.to_dict(),
                            "tracking_run_id": tracker.run_id if tracker is not None else None,
                        }
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        if tel is not None:
                            tel.record(record)
                        if tracker is not None:
                            tracker.log(record)
                        update(record)
                        _check_finite(cfg, record)
                        stopped_by = _stop_reason(cfg, record, window.full)
                        every = cfg.checkpoint.every
                        if stopped_by is not None or (every and state["iteration"] % every == 0):
                            checkpoint = save_checkpoint(algo, out, state, cfg.checkpoint.keep)
                        if run.on_iteration is not None:
                            run.on_iteration(algo, record)
            finally:
                algo.stop()
        if checkpoint is None:
            raise OnlineTrainingError(f"{out}: no checkpoint was written")
        policy_dir = train_result = None
        if run.export:
            device = "cuda" if cfg.resources.gpus_per_learner > 0 else "cpu"
            policy_dir, train_result, _data = export_checkpoint(
                checkpoint,
                cfg,
                out,
                env_steps=int(state["env_steps"]),
                wall_time_s=float(state["time_s"]),
                final_metrics={k: float(v) for k, v in record.items()},
                metrics_path=metrics_path,
                device=device,
            )
        if train_result is not None:
            # The exported policy's own episodes, as served: the run's last evaluation.
            eval_return = train_result.final_metrics["reference_return_mean"]
            if tel is not None:
                tel.record({"eval_return": eval_return})
            if tracker is not None:
                tracker.log({"iteration": record.get("iteration", 0.0), "eval_return": eval_return})
        if tracker is not None:
            tracker.finish(policy_dir, status="FINISHED")
            tracker = None
        return OnlineResult(
            config=cfg,
            iterations=int(state["iteration"]),
            env_steps=int(state["env_steps"]),
            start_iteration=start_iteration,
            train_time_s=float(state["time_s"]),
            setup_time_s=setup_s,
            stopped_by=stopped_by,
            final_metrics={k: float(v) for k, v in record.items()},
            checkpoint=checkpoint,
            metrics_path=metrics_path,
            policy_dir=policy_dir,
            train_result=train_result,
            metrics_port=tel.port if tel is not None else None,
            baseline_return=baseline,
        )
    finally:
        if tracker is not None:
            tracker.finish(None, status="FAILED")
        if tel is not None:
            tel.close()
