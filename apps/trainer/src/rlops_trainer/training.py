"""The training loop every algorithm shares, written once.

An algorithm module (``algos/bc.py``, ``algos/td3bc.py`` …) trains with its config dataclass
(:mod:`rlops_trainer.hyperparams`), defines its loss functions and a :class:`Learner`: an ``nn.Module``
holding its networks whose ``forward(batch)`` returns the total loss and the metrics of one minibatch.
Actor-critic learners whose step is several losses applied one after the other (the critic, then the actor
on the updated critic) are :class:`StagedLearner` s instead. Everything else lives here: device choice,
seeding, the dataset as tensors on the device, minibatch sampling, the gradient step, metrics, and resume
from checkpoints (:mod:`rlops_trainer.checkpoints`). The Ray Train path (``distributed.py``) calls the same
:func:`gradient_step` on the same learner wrapped in DistributedDataParallel (Discrete datasets only).

Discrete datasets reach the learner as integer actions; Box datasets as float actions scaled to [-1, 1]
per dimension (``(a - mid) / half``), and the learner's policy network outputs the pre-squash mean ``u``
whose ``tanh`` is that scaled action: the exported :class:`rlops_trainer.policy.ContinuousPolicyModule`
maps it back into the dataset's bounds.

Metrics (``metrics.jsonl`` in the run directory, one JSON object per ``log_every`` steps, each value
the mean over the steps since the previous record; the same name means the same thing in every
algorithm, and an algorithm reports only the ones that apply to it). "Box" marks the continuous-action
learners; their actions are in the [-1, 1] units above:

``loss``             total loss that was differentiated (for a staged learner the sum of the stages applied)
``grad_norm``        L2 norm of all gradients before clipping (all stages of the step together)
``td_loss``          temporal-difference regression of Q(s, a_data) on r + gamma * target (Huber or MSE);
                     with twin critics the sum of both critics' squared errors
``cql_penalty``      mean of logsumexp_a Q(s, a) - Q(s, a_data), before multiplying by alpha; on Box the
                     logsumexp runs over sampled actions (uniform, and the policy's at s and s') with their
                     log-densities subtracted, averaged over the twin critics
``q_mean``           mean Q(s, a_data) over the batch (the Q-value estimate; the first critic when twin)
``q_data_minus_pi``  mean Q(s, a_data) - Q(s, argmax_a Q(s, a)); <= 0, near 0 when the data look greedy
``value_loss``       expectile regression of V(s) on the target Q(s, a_data) (IQL)
``v_mean``           mean V(s) (IQL)
``actor_loss``       the policy's loss: advantage-weighted negative log-likelihood of the data action
                     (IQL; a cross-entropy for Discrete), -lambda * Q(s, pi(s)) + squared error to the data
                     action (TD3+BC), alpha * log pi(a|s) - Q(s, a) for a sampled a (CQL on Box)
``awr_weight_mean``  mean clipped exp(beta * advantage) weight (IQL)
``bc_loss``          behaviour cloning loss: cross-entropy of the policy logits on the data actions
                     (Discrete); negative log-likelihood of the data action under the tanh-squashed
                     Gaussian, or squared error of the deterministic action, per the config (Box)
``accuracy``         share of batch rows where the policy's greedy action equals the data action
``mse``              mean squared difference between the policy's deterministic action tanh(u(s)) and
                     the data action, per dimension (Box)
``alpha``            entropy temperature of the SAC actor (CQL on Box)
``entropy``          mean -log pi(a|s) of the actions the actor samples (an entropy estimate; CQL on Box)
``lagrange_alpha``   multiplier of the conservative penalty tuned towards ``target_action_gap`` (CQL on
                     Box with ``lagrange=true``)

Every record also carries ``step``, ``time_s`` (seconds since this process started training) and
``steps_per_s`` (gradient steps per second over the record's window; in ``TrainResult.final_metrics``
the average over the whole run of this process).

Seeded runs on CPU are bit-for-bit reproducible, and a run resumed from a checkpoint ends with the same
weights as the uninterrupted run. On CUDA, results can differ in the last bits between runs.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import json
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from rlops_trainer.checkpoints import load_checkpoint, restore, resume_checkpoint, save_checkpoint
from rlops_trainer.datasets import DatasetError, Transitions
from rlops_trainer.hyperparams import LoopConfig
from rlops_trainer.policy import ContinuousPolicyModule, PolicyModule, Selection

METRICS_FILE = "metrics.jsonl"


@dataclass
class RunOptions:
    """How to run a training job (not what to learn: that is the algorithm's config)."""

    out_dir: Path | None = None
    """Where metrics.jsonl and checkpoints/ go; None keeps nothing on disk."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    resume: bool = False
    """Continue from the latest checkpoint in ``out_dir/checkpoints`` if there is one."""
    checkpoint_every: int = 5000
    """Gradient steps between checkpoints; one is always written at the end (0: only that one)."""
    log_every: int = 100
    """Gradient steps between metric records (and host syncs)."""
    progress: bool = True
    """Show a progress bar."""
    on_record: Callable[[dict[str, float]], None] | None = None
    """Called with every metrics record before it is checked and written (e.g. the Prometheus
    exporter of :mod:`rlops_trainer.telemetry`)."""


@dataclass
class TrainResult:
    """What a training run produced: the policy and everything the model card records about it."""

    algorithm: str
    policy: PolicyModule | ContinuousPolicyModule
    """On CPU, in eval mode: a ContinuousPolicyModule for a Box dataset."""
    selection: Selection
    """How the policy should be served and evaluated."""
    config: dict[str, Any]
    dataset_fingerprint: str
    steps: int
    wall_time_s: float
    final_metrics: dict[str, float]
    metrics_path: Path | None
    device: str


class Batch(NamedTuple):
    """A minibatch of transitions; observations are already normalised."""

    obs: torch.Tensor  # float32 [B, d]
    action: torch.Tensor  # int64 [B] (Discrete) or float32 [B, k] scaled to [-1, 1] (Box)
    reward: torch.Tensor  # float32 [B]
    next_obs: torch.Tensor  # float32 [B, d]
    terminated: torch.Tensor  # float32 [B]: 1 stops bootstrapping; truncation does not


class Learner(nn.Module, abc.ABC):
    """An algorithm's networks and losses: ``forward(batch)`` returns ``(loss, metrics)``.

    ``metrics`` maps documented metric names to detached scalar tensors. The loop adds ``loss`` and
    ``grad_norm`` itself. Networks that get no gradient (target networks) must have
    ``requires_grad=False`` so that DistributedDataParallel ignores them.
    """

    score_kind: ClassVar[str]
    """``logits`` or ``q_values`` (Discrete), ``action`` (Box: the policy network outputs the pre-squash
    mean); it also tells :func:`fit` which action spaces the learner takes."""

    def __init__(self) -> None:
        super().__init__()
        self._trainable: list[nn.Parameter] | None = None

    def trainable(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates, listed once: walking the modules every step is slow."""
        if self._trainable is None:
            self._trainable = [p for p in self.parameters() if p.requires_grad]
        return self._trainable

    @abc.abstractmethod
    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    @abc.abstractmethod
    def make_optimizer(self) -> torch.optim.Optimizer: ...

    @abc.abstractmethod
    def policy_net(self) -> nn.Module:
        """The network whose outputs are the policy's scores (it becomes ``PolicyModule.net``)."""

    def after_step(self, step: int) -> None:
        """Called after each optimiser step with the number of steps done (target network updates)."""


Apply = Callable[[torch.Tensor, list[nn.Parameter]], None]
"""``apply(loss, params)``: differentiate ``loss`` with respect to ``params`` only, clip, step."""


class StagedLearner(Learner):
    """A learner whose gradient step is several losses applied one after the other, each to its own
    networks: actor-critic methods update the critic, then the actor against the updated critic.

    ``update(batch, step, apply)`` computes each stage's loss on the current weights and hands it to
    ``apply(loss, params)``, which differentiates it with respect to ``params`` alone (the actor's loss
    reaches the critic's weights, which must not move with it), clips and steps the optimiser. The one
    optimiser holds a parameter group per network with its own learning rate (:func:`adam`), so a
    checkpoint still holds one optimiser state and a stage's Adam moments advance only when it is applied.
    ``step`` is the number of steps done before this one (for delayed updates).
    """

    @abc.abstractmethod
    def update(self, batch: Batch, step: int, apply: Apply) -> dict[str, torch.Tensor]:
        """Apply this step's stages and return the documented metrics (detached scalars)."""

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every stage's loss and the metrics on the current weights, nothing applied."""
        losses: list[torch.Tensor] = []
        metrics = self.update(batch, 0, lambda loss, params: losses.append(loss.detach()))
        return torch.stack(losses).sum(), metrics


def adam(
    params: list[nn.Parameter], lr: float, *groups: tuple[list[nn.Parameter], float]
) -> torch.optim.Adam:
    """Adam with the fastest implementation the device has (one fused kernel instead of a loop).

    ``groups`` are further ``(parameters, learning rate)`` pairs: one optimiser for networks that learn at
    different rates (a :class:`StagedLearner`'s actor, critic and temperature).
    """
    param_groups: list[dict[str, Any]] = [{"params": params, "lr": lr}]
    param_groups += [{"params": p, "lr": group_lr} for p, group_lr in groups]
    return torch.optim.Adam(param_groups, lr=lr, fused=params[0].device.type in ("cpu", "cuda"))


class TargetSync:
    """Moves a target network towards its online network: target <- (1 - tau) * target + tau * online.

    The parameter lists are taken once; moving the modules to a device keeps the same Parameter objects.
    """

    def __init__(self, target: nn.Module, online: nn.Module) -> None:
        self.target: list[torch.Tensor] = list(target.parameters())
        self.online: list[torch.Tensor] = list(online.parameters())

    def update(self, tau: float) -> None:
        with torch.no_grad():
            if tau >= 1.0:
                torch._foreach_copy_(self.target, self.online)
            else:
                torch._foreach_lerp_(self.target, self.online, tau)


# ----------------------------------------------------------------------------------------------------
# Device and seeding


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device '{name}' was requested but CUDA is not available on this machine "
                f"(torch {torch.__version__}); use 'cpu' or 'auto'"
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device '{name}': only {torch.cuda.device_count()} CUDA device(s) exist")
        return torch.device(name)
    raise ValueError(f"device '{name}' is not supported; accepted: auto, cpu, cuda, cuda:N")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# The dataset as tensors


def observation_stats(data: Transitions) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation of the dataset's observations (float32)."""
    obs = data.observation.astype(np.float64)
    return obs.mean(axis=0).astype(np.float32), obs.std(axis=0).astype(np.float32)


def check_data(data: Transitions) -> None:
    """Raise DatasetError when the algorithms here cannot learn from these data."""
    if len(data) == 0:
        raise DatasetError("the dataset has no transitions; training needs at least one")
    space = data.meta.action_space
    if space.get("type") not in ("Discrete", "Box"):
        raise DatasetError(
            f"action space {space.get('type')!r} is not supported; the algorithms take Discrete or Box "
            "actions"
        )
    if data.meta.is_continuous:
        k = data.meta.action_dim
        if data.action.ndim != 2 or data.action.shape[1] != k:
            raise DatasetError(
                f"Box actions must be float vectors of {k} values (action_space shape "
                f"{space.get('shape')}), got shape {data.action.shape[1:]}",
                column="action",
            )
    if data.observation.ndim != 2:
        raise DatasetError(
            f"observations must be flat vectors, got shape {data.observation.shape[1:]}",
            column="observation",
        )


def scale_actions(data: Transitions) -> np.ndarray:
    """Box actions scaled to [-1, 1] per dimension, ``(a - mid) / half`` (float32 ``[N, k]``): the units
    every continuous learner works in, whatever the dataset's bounds."""
    low, high = data.meta.action_bounds()
    mid, half = (high + low) / 2.0, (high - low) / 2.0
    # Rounding can put an action on a bound a hair outside it; the squashed policy never leaves [-1, 1].
    return np.clip((data.action.astype(np.float64) - mid) / half, -1.0, 1.0).astype(np.float32)


class TensorData:
    """All transitions packed in one tensor on the device; a minibatch is one row gather.

    Observations are normalised here once with the same rule the served PolicyModule applies; Box actions
    are scaled to [-1, 1] (:func:`scale_actions`).
    """

    def __init__(
        self,
        data: Transitions,
        obs_mean: np.ndarray,
        obs_std: np.ndarray,
        device: torch.device,
    ) -> None:
        normalise = PolicyModule(nn.Identity(), obs_mean, obs_std, "logits")
        with torch.no_grad():
            obs = normalise(torch.tensor(data.observation, dtype=torch.float32))
            next_obs = normalise(torch.tensor(data.next_observation, dtype=torch.float32))
        self.continuous = data.meta.is_continuous
        if self.continuous:
            action = torch.tensor(scale_actions(data))
        else:
            action = torch.tensor(data.action, dtype=torch.float32)[:, None]
        cols = [
            obs,
            next_obs,
            action,
            torch.tensor(data.reward, dtype=torch.float32)[:, None],
            torch.tensor(data.terminated, dtype=torch.float32)[:, None],
        ]
        self.packed = torch.cat(cols, dim=1).contiguous().to(device)
        self.obs_dim = int(obs.shape[1])
        self.action_dim = int(action.shape[1])
        self.n = int(self.packed.shape[0])
        self.device = device

    def batch(self, index: torch.Tensor) -> Batch:
        rows = self.packed.index_select(0, index)
        d, k = self.obs_dim, self.action_dim
        action = rows[:, 2 * d : 2 * d + k]
        return Batch(
            obs=rows[:, :d],
            next_obs=rows[:, d : 2 * d],
            action=action if self.continuous else action[:, 0].long(),
            reward=rows[:, 2 * d + k],
            terminated=rows[:, 2 * d + k + 1],
        )

    def probe(self) -> Batch:
        """The first rows, for a forward pass that only needs shapes and names."""
        return self.batch(torch.arange(min(2, self.n), device=self.device))

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        index = torch.randint(self.n, (batch_size,), generator=generator, device=self.device)
        return self.batch(index)


def sampling_generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# ----------------------------------------------------------------------------------------------------
# One gradient step (shared with the Ray Train path)


def gradient_step(
    model: nn.Module,
    learner: Learner,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    step: int,
    max_grad_norm: float,
) -> torch.Tensor:
    """Forward, backward, clip, step, target update. Returns [loss, grad_norm, *metrics] on the device.

    ``model`` is the learner itself or its DistributedDataParallel wrapper; gradients are all-reduced
    during ``backward`` in the latter case. A :class:`StagedLearner` applies its stages itself
    (:func:`staged_step`).
    """
    if isinstance(learner, StagedLearner):
        return staged_step(learner, optimizer, batch, step, max_grad_norm)
    loss, metrics = model(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_gradients(learner.trainable(), max_grad_norm)
    optimizer.step()
    learner.after_step(step + 1)
    with torch.no_grad():
        return torch.stack([loss.detach(), grad_norm, *metrics.values()])


def clip_gradients(params: list[nn.Parameter], max_grad_norm: float) -> torch.Tensor:
    """The L2 norm of the gradients of ``params``, clipped in place to ``max_grad_norm`` when > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    # One fused per-tensor norm call: torch.nn.utils.get_total_norm dispatches several ops per tensor.
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_grad_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(grads, max_grad_norm, grad_norm)
    return grad_norm


def staged_step(
    learner: StagedLearner,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    step: int,
    max_grad_norm: float,
) -> torch.Tensor:
    """One step of a :class:`StagedLearner`: each stage is differentiated, clipped and applied in turn.

    Returns [loss, grad_norm, *metrics] like :func:`gradient_step`: ``loss`` sums the applied stages,
    ``grad_norm`` is the norm of all their gradients together.
    """
    losses: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []

    def apply(loss: torch.Tensor, params: list[nn.Parameter]) -> None:
        # set_to_none: the previous stage's gradients must not be stepped again by this stage's step.
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=params)
        norms.append(clip_gradients(params, max_grad_norm))
        optimizer.step()
        losses.append(loss.detach())

    metrics = learner.update(batch, step, apply)
    learner.after_step(step + 1)
    with torch.no_grad():
        grad_norm = torch.linalg.vector_norm(torch.stack(norms))
        return torch.stack([torch.stack(losses).sum(), grad_norm, *metrics.values()])


def metric_names(learner: Learner, sample: Batch) -> list[str]:
    """Metric names in the order :func:`gradient_step` returns them (one extra forward, no update)."""
    with torch.no_grad():
        _, metrics = learner(sample)
    return ["loss", "grad_norm", *metrics]


def check_finite(algorithm: str, metrics: dict[str, float], step: int) -> None:
    """Stop a run that diverged instead of training on NaNs until the last step."""
    bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
    if bad:
        raise FloatingPointError(
            f"{algorithm}: non-finite metrics {bad} at step {step}; try a lower lr or max_grad_norm > 0"
        )


class MetricWindow:
    """Sums metric vectors on the device; reading the mean is the only host sync."""

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names = names
        self.total = torch.zeros(len(names), dtype=torch.float32, device=device)
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        self.total += values
        self.count += 1

    def mean(self) -> dict[str, float]:
        values = (self.total / max(self.count, 1)).tolist()
        return dict(zip(self.names, values, strict=True))

    def reset(self) -> None:
        self.total.zero_()
        self.count = 0


# ----------------------------------------------------------------------------------------------------
# Metrics file and progress bar


def start_metrics(path: Path, step: int, key: str = "step") -> None:
    """A fresh run starts an empty file; a resumed one drops the records written after ``step``.

    ``key`` is the record field that counts progress (``iteration`` in the online trainer).
    """
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)[key] <= step]
    path.write_text("".join(line + "\n" for line in kept))


@contextmanager
def progress_bar(enabled: bool, description: str, total: int, done: int) -> Iterator[Callable[..., None]]:
    """Yields ``update(completed, loss)``; a no-op when disabled."""
    if not enabled:
        yield lambda completed, loss: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task(description, total=total, completed=done, loss="-")

        def update(completed: int, loss: float) -> None:
            bar.update(task, completed=completed, loss=f"{loss:.4g}")

        yield update


# ----------------------------------------------------------------------------------------------------
# The loop


def fit(
    algorithm: str,
    cfg: LoopConfig,
    data: Transitions,
    run: RunOptions,
    learner_cls: Callable[[Any, int, int], Learner],
) -> TrainResult:
    """Train ``learner_cls(cfg, obs_dim, n_actions)`` on ``data`` for ``cfg.steps`` gradient steps.

    A continuous learner (``score_kind == "action"``) takes Box data and is built as
    ``learner_cls(cfg, obs_dim, action_dim)``.
    """
    check_data(data)
    check_learner(algorithm, learner_cls, data)
    if run.log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {run.log_every}")
    if run.checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {run.checkpoint_every}")
    device = resolve_device(run.device)
    config = dataclasses.asdict(cfg)  # type: ignore[call-overload]
    fingerprint = data.fingerprint()

    seed_everything(cfg.seed)
    obs_mean, obs_std = observation_stats(data)
    tensors = TensorData(data, obs_mean, obs_std, device)
    # Weights are initialised on CPU, then moved: the same seed gives the same start on every device.
    learner = learner_cls(cfg, tensors.obs_dim, action_width(data)).to(device)
    optimizer = learner.make_optimizer()
    generator = sampling_generator(cfg.seed, device)
    window = MetricWindow(metric_names(learner, tensors.probe()), device)

    step = 0
    metrics_path: Path | None = None
    if run.out_dir is not None:
        metrics_path = run.out_dir / METRICS_FILE
        latest = resume_checkpoint(run)
        if latest is not None:
            state = load_checkpoint(latest, algorithm=algorithm, config=config, fingerprint=fingerprint)
            step = restore(state, learner, optimizer, generator, window)
        start_metrics(metrics_path, step)
    if step > cfg.steps:
        raise ValueError(f"the checkpoint is at step {step}, past this run's steps={cfg.steps}")

    learner.train()
    final: dict[str, float] = {}
    start = time.perf_counter()
    first_step = last_step = step
    last_time = start
    with progress_bar(run.progress, f"{algorithm} on {device.type}", cfg.steps, step) as update:
        while step < cfg.steps:
            batch = tensors.sample(cfg.batch_size, generator)
            window.add(gradient_step(learner, learner, optimizer, batch, step, cfg.max_grad_norm))
            step += 1
            if step % run.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                record = {
                    "step": step,
                    "time_s": round(now - start, 4),
                    "steps_per_s": (step - last_step) / max(now - last_time, 1e-9),
                    **window.mean(),
                }
                window.reset()
                last_time, last_step = now, step
                final = {k: float(v) for k, v in record.items() if k not in ("step", "time_s")}
                if run.on_record is not None:
                    run.on_record(record)
                check_finite(algorithm, final, step)
                if metrics_path is not None:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                update(step, record["loss"])
            if run.out_dir is not None and (
                (run.checkpoint_every and step % run.checkpoint_every == 0) or step == cfg.steps
            ):
                save_checkpoint(
                    run.out_dir,
                    algorithm=algorithm,
                    config=config,
                    fingerprint=fingerprint,
                    step=step,
                    learner=learner,
                    optimizer=optimizer,
                    generator=generator,
                    window=window,
                )
    wall = time.perf_counter() - start
    if not final and metrics_path is not None and metrics_path.exists():
        # Resumed at the last step: nothing was trained now, the last record is the final one.
        lines = metrics_path.read_text().splitlines()
        if lines:
            final = {k: float(v) for k, v in json.loads(lines[-1]).items() if k not in ("step", "time_s")}
    if step > first_step:
        final["steps_per_s"] = (step - first_step) / max(wall, 1e-9)

    return TrainResult(
        algorithm=algorithm,
        policy=build_policy(learner, obs_mean, obs_std, data),
        selection=served_selection(cfg, data),
        config=config,
        dataset_fingerprint=fingerprint,
        steps=step,
        wall_time_s=wall,
        final_metrics=final,
        metrics_path=metrics_path,
        device=str(device),
    )


def check_learner(algorithm: str, learner_cls: Any, data: Transitions) -> None:
    """A discrete learner takes Discrete data, a continuous one Box data."""
    continuous = getattr(learner_cls, "score_kind", None) == "action"
    if continuous != data.meta.is_continuous:
        kind = "Box" if continuous else "Discrete"
        raise DatasetError(
            f"{algorithm}: this implementation takes {kind} actions, the dataset's action space is "
            f"{data.meta.action_space.get('type')}; `rlops train {algorithm}` picks the implementation "
            "that matches the dataset"
        )


def action_width(data: Transitions) -> int:
    """The learner's third argument: the number of actions (Discrete) or the action dimension (Box)."""
    return data.meta.action_dim if data.meta.is_continuous else data.meta.n_actions


def served_selection(cfg: Any, data: Transitions) -> Selection:
    """How the trained policy is served: ``serve_std`` for Box policies, temperature and epsilon else."""
    if data.meta.is_continuous:
        return Selection(std=float(cfg.serve_std))
    return Selection(temperature=cfg.serve_temperature, epsilon=cfg.serve_epsilon)


def build_policy(
    learner: Learner, obs_mean: np.ndarray, obs_std: np.ndarray, data: Transitions
) -> PolicyModule | ContinuousPolicyModule:
    """The policy network on CPU, frozen, inside the module that is exported; a continuous learner's
    network outputs the pre-squash mean in [-1, 1] units, which the module maps into ``data``'s bounds."""
    net = copy.deepcopy(learner.policy_net()).cpu().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    if learner.score_kind == "action":
        low, high = data.meta.action_bounds()
        return ContinuousPolicyModule(net, obs_mean, obs_std, low, high).eval()
    return PolicyModule(net, obs_mean, obs_std, learner.score_kind).eval()
