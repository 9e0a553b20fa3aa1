"""The training loop every algorithm shares, written once.

An algorithm module (``algos/bc.py``, ``algos/cql.py``, ``algos/iql.py``) trains with its config dataclass
(:mod:`rlops_trainer.hyperparams`), defines its loss functions and a :class:`Learner`: an ``nn.Module``
holding its networks whose ``forward(batch)`` returns the total loss and the metrics of one minibatch.
Everything else lives here: device choice, seeding, the dataset as tensors on the device, minibatch
sampling, the gradient step, metrics, and resume from checkpoints (:mod:`rlops_trainer.checkpoints`).
The Ray Train path (``distributed.py``) calls the same :func:`gradient_step` on the same learner wrapped
in DistributedDataParallel.

Metrics (``metrics.jsonl`` in the run directory, one JSON object per ``log_every`` steps, each value
the mean over the steps since the previous record; the same name means the same thing in every
algorithm, and an algorithm reports only the ones that apply to it):

``loss``             total loss that was differentiated
``grad_norm``        L2 norm of all gradients before clipping
``td_loss``          temporal-difference regression of Q(s, a_data) on r + gamma * target (Huber or MSE)
``cql_penalty``      mean of logsumexp_a Q(s, a) - Q(s, a_data), before multiplying by alpha
``q_mean``           mean Q(s, a_data) over the batch (the Q-value estimate)
``q_data_minus_pi``  mean Q(s, a_data) - Q(s, argmax_a Q(s, a)); <= 0, near 0 when the data look greedy
``value_loss``       expectile regression of V(s) on the target Q(s, a_data) (IQL)
``v_mean``           mean V(s) (IQL)
``actor_loss``       advantage-weighted cross-entropy of the policy head (IQL)
``awr_weight_mean``  mean clipped exp(beta * advantage) weight (IQL)
``bc_loss``          cross-entropy of the policy logits on the data actions
``accuracy``         share of batch rows where the policy's greedy action equals the data action

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
from rlops_trainer.policy import PolicyModule, Selection

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
    policy: PolicyModule
    """On CPU, in eval mode."""
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
    action: torch.Tensor  # int64 [B]
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


def adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with the fastest implementation the device has (one fused kernel instead of a loop)."""
    return torch.optim.Adam(params, lr=lr, fused=params[0].device.type in ("cpu", "cuda"))


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
    if space.get("type") != "Discrete":
        raise DatasetError(
            f"action space {space.get('type')!r} is not supported; the algorithms take Discrete actions"
        )
    if data.observation.ndim != 2:
        raise DatasetError(
            f"observations must be flat vectors, got shape {data.observation.shape[1:]}",
            column="observation",
        )


class TensorData:
    """All transitions packed in one tensor on the device; a minibatch is one row gather.

    Observations are normalised here once with the same rule the served PolicyModule applies.
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
        cols = [
            obs,
            next_obs,
            torch.tensor(data.action, dtype=torch.float32)[:, None],
            torch.tensor(data.reward, dtype=torch.float32)[:, None],
            torch.tensor(data.terminated, dtype=torch.float32)[:, None],
        ]
        self.packed = torch.cat(cols, dim=1).contiguous().to(device)
        self.obs_dim = int(obs.shape[1])
        self.n = int(self.packed.shape[0])
        self.device = device

    def batch(self, index: torch.Tensor) -> Batch:
        rows = self.packed.index_select(0, index)
        d = self.obs_dim
        return Batch(
            obs=rows[:, :d],
            next_obs=rows[:, d : 2 * d],
            action=rows[:, 2 * d].long(),
            reward=rows[:, 2 * d + 1],
            terminated=rows[:, 2 * d + 2],
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
    during ``backward`` in the latter case.
    """
    loss, metrics = model(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in learner.trainable() if p.grad is not None]
    # One fused per-tensor norm call: torch.nn.utils.get_total_norm dispatches several ops per tensor.
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_grad_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(grads, max_grad_norm, grad_norm)
    optimizer.step()
    learner.after_step(step + 1)
    with torch.no_grad():
        return torch.stack([loss.detach(), grad_norm, *metrics.values()])


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
    """Train ``learner_cls(cfg, obs_dim, n_actions)`` on ``data`` for ``cfg.steps`` gradient steps."""
    check_data(data)
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
    learner = learner_cls(cfg, tensors.obs_dim, data.meta.n_actions).to(device)
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
        policy=build_policy(learner, obs_mean, obs_std),
        selection=Selection(temperature=cfg.serve_temperature, epsilon=cfg.serve_epsilon),
        config=config,
        dataset_fingerprint=fingerprint,
        steps=step,
        wall_time_s=wall,
        final_metrics=final,
        metrics_path=metrics_path,
        device=str(device),
    )


def build_policy(learner: Learner, obs_mean: np.ndarray, obs_std: np.ndarray) -> PolicyModule:
    net = copy.deepcopy(learner.policy_net()).cpu().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return PolicyModule(net, obs_mean, obs_std, learner.score_kind).eval()
