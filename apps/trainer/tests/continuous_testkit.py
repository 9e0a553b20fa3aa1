"""Box-action datasets and policies for tests that need a continuous policy of known behaviour without
training one (a linear pre-squash mean with chosen weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from rlops_trainer.datasets import DatasetMeta, Transitions, box_space
from rlops_trainer.policy import ContinuousPolicyModule, Selection
from rlops_trainer.training import TrainResult

OBS_DIM, ACTION_DIM = 3, 2
LOW, HIGH = np.array([-2.0, 0.0]), np.array([2.0, 1.0])


def box_meta(
    obs_dim: int = OBS_DIM, low: np.ndarray = LOW, high: np.ndarray = HIGH, env_id: str = "ToyBox-v0"
) -> DatasetMeta:
    return DatasetMeta(
        env_id=env_id,
        observation_space=box_space(np.full(obs_dim, -np.inf), np.full(obs_dim, np.inf)),
        action_space=box_space(low, high),
        behavior_policy="uniform",
        source="test",
    )


def box_transitions(n_episodes: int = 8, length: int = 25, seed: int = 0) -> Transitions:
    """Random transitions with uniform actions inside [LOW, HIGH] and their exact log-densities."""
    rng = np.random.default_rng(seed)
    n = n_episodes * length
    obs = rng.normal(size=(n + 1, OBS_DIM)).astype(np.float32)
    action = rng.uniform(LOW, HIGH, size=(n, ACTION_DIM)).astype(np.float32)
    return Transitions(
        episode_id=np.repeat(np.arange(n_episodes), length).astype(np.int64),
        step=np.tile(np.arange(length), n_episodes).astype(np.int64),
        observation=obs[:-1],
        action=action,
        reward=rng.normal(size=n).astype(np.float32),
        next_observation=obs[1:],
        terminated=np.arange(n) % length == length - 1,
        truncated=np.zeros(n, dtype=bool),
        behavior_logp=np.full(n, -np.log(HIGH - LOW).sum(), dtype=np.float32),
        meta=box_meta(),
    )


def linear_policy(
    weight: np.ndarray, bias: np.ndarray, low: np.ndarray = LOW, high: np.ndarray = HIGH
) -> ContinuousPolicyModule:
    """Pre-squash mean ``u(obs) = weight @ obs + bias`` (observations taken as already normalised)."""
    weight, bias = np.atleast_2d(weight), np.atleast_1d(bias)
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight[:] = torch.as_tensor(weight, dtype=torch.float32)
        lin.bias[:] = torch.as_tensor(bias, dtype=torch.float32)
    dim = weight.shape[1]
    return ContinuousPolicyModule(lin, np.zeros(dim), np.ones(dim), low, high).eval()


def box_result(
    data: Transitions, policy: ContinuousPolicyModule | None = None, std: float = 0.2
) -> TrainResult:
    if policy is None:
        rng = np.random.default_rng(1)
        policy = linear_policy(rng.normal(size=(ACTION_DIM, OBS_DIM)), rng.normal(size=ACTION_DIM))
    return TrainResult(
        algorithm="td3bc",
        # TrainResult.policy is typed for the discrete module; the Box one is exported the same way.
        policy=cast(Any, policy),
        selection=Selection(std=std),
        config={"alpha": 2.5},
        dataset_fingerprint=data.fingerprint(),
        steps=10,
        wall_time_s=0.1,
        final_metrics={"loss": 0.5},
        metrics_path=None,
        device="cpu",
    )


def box_policy_dir(
    root: Path, data: Transitions, name: str, policy: ContinuousPolicyModule, std: float
) -> Path:
    from rlops_trainer.export import write_policy_dir

    return write_policy_dir(box_result(data, policy, std), data, root / name, name)
