"""Roll a policy out in its Gymnasium environment: the ground truth that off-policy estimates chase.

Episodes run in batches of environments stepped side by side, so the policy sees one batch of
observations per step. Episode ``i`` seeds its environment reset and its own action stream from
``(seed, i)``, so results depend on ``seed`` alone, not on the batch size.

Discrete environments sample from the policy's ``action_probs`` under the selection's temperature and
epsilon. Box environments (a continuous policy: ``forward`` and ``act(obs, std)``) take the deterministic
action when the selection's ``std`` is 0, else the policy's own explored action ``act(obs, std)``, one
row at a time under a torch seed drawn from the episode's stream (the noise is drawn inside the policy,
so a batched call would tie each episode's noise to its neighbours in the batch).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from rlops_trainer.ope import Estimate, ProbsFn, policy_probs_fn
from rlops_trainer.policy import Selection


class RolloutError(ValueError):
    """The environment or the policy cannot be rolled out as asked."""


@dataclass
class RolloutResult:
    """Per-episode outcomes of a rollout, in episode order."""

    env_id: str
    seed: int
    gamma: float
    selection: dict[str, float]
    returns: np.ndarray  # undiscounted, [episodes]
    discounted_returns: np.ndarray  # sum_t gamma^t r_t, [episodes]
    lengths: np.ndarray  # [episodes]
    wall_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def estimate(self, confidence: float = 0.95, n_bootstrap: int = 1000, seed: int = 0) -> Estimate:
        """The mean discounted return with a percentile bootstrap interval over episodes: the value that
        the off-policy estimators (same gamma) estimate."""
        return _mean_estimate("rollout", self.discounted_returns, confidence, n_bootstrap, seed)

    def to_dict(self, confidence: float = 0.95, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
        undiscounted = _mean_estimate("return", self.returns, confidence, n_bootstrap, seed)
        return {
            "env_id": self.env_id,
            "episodes": len(self.returns),
            "seed": self.seed,
            "gamma": self.gamma,
            "selection": self.selection,
            "discounted_return": self.estimate(confidence, n_bootstrap, seed).to_dict(),
            "return": undiscounted.to_dict(),
            "mean_length": float(self.lengths.mean()) if len(self.lengths) else float("nan"),
            "wall_time_s": self.wall_time_s,
        }


def _mean_estimate(name: str, values: np.ndarray, confidence: float, n_bootstrap: int, seed: int) -> Estimate:
    n = len(values)
    if n == 0:
        nan = float("nan")
        return Estimate(name, nan, nan, nan, confidence, 0)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, n, size=(n_bootstrap, n))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return Estimate(name, float(values.mean()), float(lo), float(hi), confidence, n)


def rollout(
    policy: nn.Module | ProbsFn,
    selection: Selection,
    env_id: str,
    episodes: int,
    seed: int = 0,
    gamma: float = 0.99,
    *,
    batch_size: int = 16,
    max_steps: int = 100_000,
    progress: bool = False,
    env_kwargs: Mapping[str, Any] | None = None,
) -> RolloutResult:
    """Run ``episodes`` episodes of ``policy`` (a ``PolicyModule``, a ``ContinuousPolicyModule``, a loaded
    TorchScript policy or a ``probs_fn``) in ``env_id``, sampling actions from its distribution under
    ``selection``.

    ``max_steps`` caps an episode in environments without a time limit (it counts as truncation);
    ``env_kwargs`` go to ``gym.make``.
    """
    import time

    if episodes < 1:
        raise RolloutError(f"episodes must be >= 1, got {episodes}")
    if not 0.0 < gamma <= 1.0:
        raise RolloutError(f"gamma must be in (0, 1], got {gamma}")
    try:
        envs = [gym.make(env_id, **(env_kwargs or {})) for _ in range(min(batch_size, episodes))]
    except gym.error.Error as exc:
        raise RolloutError(f"cannot create environment {env_id!r}: {exc}") from exc
    space = envs[0].action_space
    try:
        choose = _chooser(policy, selection, env_id, space)
    except BaseException:
        for env in envs:
            env.close()
        raise

    returns = np.zeros(episodes)
    discounted = np.zeros(episodes)
    lengths = np.zeros(episodes, dtype=np.int64)
    slot_episode: list[int] = [-1] * len(envs)
    slot_obs: list[np.ndarray] = [np.zeros(0, np.float32)] * len(envs)
    rngs: dict[int, np.random.Generator] = {}
    next_episode = 0

    def start(slot: int) -> None:
        nonlocal next_episode
        if next_episode >= episodes:
            slot_episode[slot] = -1
            return
        i = next_episode
        next_episode += 1
        # Environment and action streams both derive from (seed, i): independent of the batch size,
        # and disjoint between seeds (seed + i would replay episodes of the neighbouring seed).
        env_seed, action_seed = np.random.SeedSequence([seed, i]).generate_state(2)
        obs, _ = envs[slot].reset(seed=int(env_seed))
        rngs[i] = np.random.default_rng(int(action_seed))
        slot_episode[slot], slot_obs[slot] = i, np.asarray(obs, dtype=np.float32).reshape(-1)

    t0 = time.perf_counter()
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(transient=True, console=Console(stderr=True))
        bar.start()
        task = bar.add_task(f"rollout {env_id}", total=episodes)
    try:
        for slot in range(len(envs)):
            start(slot)
        while True:
            active = [s for s, i in enumerate(slot_episode) if i >= 0]
            if not active:
                break
            actions = choose(np.stack([slot_obs[s] for s in active]), [rngs[slot_episode[s]] for s in active])
            for row, slot in enumerate(active):
                i = slot_episode[slot]
                obs, reward, terminated, truncated, _ = envs[slot].step(actions[row])
                discounted[i] += gamma ** lengths[i] * float(reward)
                returns[i] += float(reward)
                lengths[i] += 1
                slot_obs[slot] = np.asarray(obs, dtype=np.float32).reshape(-1)
                if terminated or truncated or lengths[i] >= max_steps:
                    del rngs[i]
                    start(slot)
                    if bar is not None:
                        bar.update(task, advance=1)
    finally:
        if bar is not None:
            bar.stop()
        for env in envs:
            env.close()
    return RolloutResult(
        env_id=env_id,
        seed=seed,
        gamma=gamma,
        selection=(
            {"temperature": selection.temperature, "epsilon": selection.epsilon, "std": selection.std}
            if isinstance(space, gym.spaces.Box)
            else {"temperature": selection.temperature, "epsilon": selection.epsilon}
        ),
        returns=returns,
        discounted_returns=discounted,
        lengths=lengths,
        wall_time_s=time.perf_counter() - t0,
    )


Chooser = Callable[[np.ndarray, list[np.random.Generator]], list[Any]]
"""Actions for a batch of observations, one per row, each drawn with its episode's random stream."""


def _chooser(
    policy: nn.Module | ProbsFn, selection: Selection, env_id: str, space: gym.Space[Any]
) -> Chooser:
    if isinstance(space, gym.spaces.Box):
        return _box_chooser(policy, selection, env_id, space)
    if isinstance(space, gym.spaces.Discrete):
        probs_fn: ProbsFn = policy_probs_fn(policy, selection) if isinstance(policy, nn.Module) else policy
        return _discrete_chooser(probs_fn, env_id, int(space.n))
    raise RolloutError(f"{env_id} has action space {space}; Discrete and Box are supported")


def _discrete_chooser(probs_fn: ProbsFn, env_id: str, n_actions: int) -> Chooser:
    def choose(obs: np.ndarray, rngs: list[np.random.Generator]) -> list[Any]:
        probs = np.asarray(probs_fn(obs), dtype=np.float64)
        if probs.shape != (len(obs), n_actions):
            raise RolloutError(
                f"policy returned probabilities of shape {probs.shape}; expected "
                f"({len(obs)}, {n_actions}) for {env_id}"
            )
        actions = []
        for row, rng in enumerate(rngs):
            cdf = np.cumsum(probs[row])
            actions.append(
                int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), n_actions - 1))
            )
        return actions

    return choose


def _box_chooser(
    policy: nn.Module | ProbsFn, selection: Selection, env_id: str, space: gym.spaces.Box
) -> Chooser:
    if not (isinstance(policy, nn.Module) and hasattr(policy, "act")):
        raise RolloutError(
            f"{env_id} has a Box action space {space}: the policy must be a continuous policy module "
            "(forward(obs) and act(obs, std)), not action probabilities"
        )
    shape = (int(np.prod(space.shape)),)
    low = np.asarray(space.low, dtype=np.float64).reshape(shape)
    high = np.asarray(space.high, dtype=np.float64).reshape(shape)
    std = float(selection.std)
    act = cast(Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]], policy.act)

    def choose(obs: np.ndarray, rngs: list[np.random.Generator]) -> list[Any]:
        with torch.no_grad():
            if std <= 0.0:
                out = policy(torch.as_tensor(obs, dtype=torch.float32)).double().numpy()
            else:
                rows = []
                with torch.random.fork_rng(devices=[]):
                    for row, rng in enumerate(rngs):
                        torch.manual_seed(int(rng.integers(2**63 - 1)))
                        rows.append(act(torch.as_tensor(obs[row : row + 1], dtype=torch.float32), std)[0])
                out = torch.cat(rows).double().numpy()
        if out.shape != (len(obs), *shape):
            raise RolloutError(
                f"policy returned actions of shape {out.shape}; expected ({len(obs)}, {shape[0]}) "
                f"for {env_id}"
            )
        if not np.isfinite(out).all():
            raise RolloutError(
                f"policy returned non-finite actions for {env_id}: "
                f"{out[~np.isfinite(out).all(axis=1)][0].tolist()}"
            )
        # The policy squashes into the bounds it was trained with; float32 rounding can still step a
        # hair outside the environment's own bounds, which some environments refuse.
        clipped = np.clip(out, low, high).astype(space.dtype)
        return [a.reshape(space.shape) for a in clipped]

    return choose
