"""Shared settings and fixtures for the delivery tests: real policies in a real registry, served logs."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

# One torch thread per process: the CI box has two cores and parallel BLAS only contends.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import gymnasium as gym
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
ANALYSIS = REPO / "alerts" / "canary" / "analysis.yaml"
ANALYSIS_TEST = REPO / "alerts" / "canary" / "tests" / "analysis_test.yaml"

torch.set_num_threads(1)

POLICY = "cartpole"


@pytest.fixture(scope="session")
def cartpole_data() -> Any:
    """A small logged CartPole dataset (random behaviour, exact propensities)."""
    from rlops_trainer.collect import collect

    return collect("CartPole-v1", "random", 30, seed=0, progress=False)


def train_policy_dir(data: Any, out: Path, seed: int = 0, steps: int = 30) -> Path:
    """A real (briefly trained) BC policy directory for ``data``."""
    from rlops_trainer.algos.bc import BCConfig, train
    from rlops_trainer.export import write_policy_dir
    from rlops_trainer.training import RunOptions

    result = train(BCConfig(steps=steps, seed=seed, batch_size=64), data, RunOptions(progress=False))
    return write_policy_dir(result, data, out, POLICY)


def publish(registry: Path, policy_dir: Path, *, gate: bool = True) -> int:
    """Publish ``policy_dir``; with ``gate`` its gate decision says promote against the current champion."""
    from rlops_trainer.registry import Registry

    reg = Registry(registry)
    champion = reg.aliases(POLICY).get("champion") if POLICY in reg.names() else None
    decision = {"promote": gate, "incumbent_version": champion, "reason": "test gate"}
    return reg.publish(policy_dir, POLICY, gate=decision)


@pytest.fixture
def registry(tmp_path: Path, cartpole_data: Any) -> Path:
    """A registry with champion version 1 and candidate version 2 (whose gate clears it)."""
    from rlops_trainer.registry import Registry

    root = tmp_path / "registry"
    one = train_policy_dir(cartpole_data, tmp_path / "p1", seed=1)
    publish(root, one, gate=False)
    Registry(root).promote(POLICY, 1, require_gate=False, force_reason="the first champion")
    publish(root, train_policy_dir(cartpole_data, tmp_path / "p2", seed=2))
    shutil.rmtree(tmp_path / "p1")
    shutil.rmtree(tmp_path / "p2")
    return root


EPSILON = 0.4


def serve_episodes(logs: Path, registry: Path, episodes: int, seed: int) -> None:
    """Drive CartPole with the registry's champion (epsilon-greedy) and log decisions and rewards."""
    from rlops_server.decision_log import DECISIONS_STREAM, DecisionLog
    from rlops_server.feedback import REWARD_FILE_PREFIX, REWARDS_STREAM
    from rlops_trainer.registry import Registry

    reg = Registry(registry)
    version = reg.aliases(POLICY)["champion"]
    module, _ = reg.load(POLICY, version)
    decisions = DecisionLog(logs, stream=DECISIONS_STREAM)
    rewards = DecisionLog(logs, stream=REWARDS_STREAM, file_prefix=REWARD_FILE_PREFIX)
    rng = np.random.default_rng(seed)
    env = gym.make("CartPole-v1")
    for e in range(episodes):
        obs, _ = env.reset(seed=seed + e)
        episode = f"{seed}-{e}-{uuid.uuid4().hex[:6]}"
        for step in range(500):
            with torch.no_grad():
                probs = module.action_probs(torch.as_tensor(obs, dtype=torch.float32)[None], 0.0, EPSILON)[0]
            p = probs.double().numpy()
            action = int(rng.choice(len(p), p=p / p.sum()))
            decision_id = f"{episode}-{step}"
            now = time.time()
            decisions.write(
                {
                    "decision_id": decision_id,
                    "time": now,
                    "policy": POLICY,
                    "version": version,
                    "episode_id": episode,
                    "step": step,
                    "observation": [float(x) for x in obs],
                    "action": action,
                    "propensity": float(p[action]),
                    "temperature": 0.0,
                    "epsilon": EPSILON,
                    "action_mask": None,
                    "fallback": False,
                }
            )
            obs, reward, terminated, truncated, _ = env.step(action)
            rewards.write(
                {
                    "decision_id": decision_id,
                    "reward": float(reward),
                    "terminated": bool(terminated),
                    "truncated": bool(truncated),
                    "next_observation": [float(x) for x in obs],
                    "time": now,
                    "policy": POLICY,
                    "version": version,
                }
            )
            if terminated or truncated:
                break
    assert decisions.close()
    assert rewards.close()


# --- Box (continuous-action) policies ------------------------------------------------------------------

BOX_LOW, BOX_HIGH = np.array([-2.0, 0.0]), np.array([2.0, 1.0])
BOX_OBS = 3


def box_meta(low: np.ndarray = BOX_LOW, high: np.ndarray = BOX_HIGH, obs_dim: int = BOX_OBS) -> Any:
    from rlops_trainer.datasets import DatasetMeta, box_space

    return DatasetMeta(
        env_id="ToyBandit-v0",
        observation_space=box_space(np.full(obs_dim, -np.inf), np.full(obs_dim, np.inf)),
        action_space=box_space(low, high),
        behavior_policy="uniform",
        source="test",
    )


def box_target(obs: np.ndarray) -> np.ndarray:
    """The best action of the toy bandit: mid + half * tanh(obs[:, :2]) (inside the bounds)."""
    mid, half = (BOX_HIGH + BOX_LOW) / 2, (BOX_HIGH - BOX_LOW) / 2
    return mid + half * np.tanh(obs[:, :2])


def box_bandit(n: int = 400, seed: int = 0, meta: Any = None) -> Any:
    """One-step episodes of a contextual bandit: actions uniform in the bounds (their exact log-density
    logged), reward -|a - box_target(s)|^2 (scaled per dimension by the half-width)."""
    from rlops_trainer.datasets import Transitions

    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, BOX_OBS)).astype(np.float32)
    action = rng.uniform(BOX_LOW, BOX_HIGH, size=(n, len(BOX_LOW))).astype(np.float32)
    half = (BOX_HIGH - BOX_LOW) / 2
    reward = -(((action - box_target(obs)) / half) ** 2).sum(axis=1)
    return Transitions(
        episode_id=np.arange(n, dtype=np.int64),
        step=np.zeros(n, dtype=np.int64),
        observation=obs,
        action=action,
        reward=reward.astype(np.float32),
        next_observation=rng.normal(size=(n, BOX_OBS)).astype(np.float32),
        terminated=np.ones(n, dtype=bool),
        truncated=np.zeros(n, dtype=bool),
        behavior_logp=np.full(n, -np.log(BOX_HIGH - BOX_LOW).sum(), dtype=np.float32),
        meta=meta if meta is not None else box_meta(),
    )


def box_policy_dir(data: Any, out: Path, weight: np.ndarray, bias: np.ndarray, std: float) -> Path:
    """A Box policy directory whose pre-squash mean is ``weight @ obs + bias``, exported as a trained one."""
    from rlops_trainer.export import write_policy_dir
    from rlops_trainer.policy import ContinuousPolicyModule, Selection
    from rlops_trainer.training import TrainResult

    low, high = data.meta.action_bounds()
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight[:] = torch.as_tensor(weight, dtype=torch.float32)
        lin.bias[:] = torch.as_tensor(bias, dtype=torch.float32)
    policy = ContinuousPolicyModule(
        lin, np.zeros(weight.shape[1]), np.ones(weight.shape[1]), low, high
    ).eval()
    result = TrainResult(
        algorithm="td3bc",
        policy=policy,
        selection=Selection(std=std),
        config={},
        dataset_fingerprint=data.fingerprint(),
        steps=1,
        wall_time_s=0.0,
        final_metrics={},
        metrics_path=None,
        device="cpu",
    )
    return write_policy_dir(result, data, out, POLICY)


GOOD_BOX = (np.eye(2, BOX_OBS), np.zeros(2))
"""Weights of the bandit's best policy: its pre-squash mean is obs[:, :2], its action box_target(obs)."""
POOR_BOX = (np.zeros((2, BOX_OBS)), np.array([-3.0, 3.0]))
"""Weights of a poor policy: near (low, high) whatever it sees."""


@pytest.fixture
def box_registry(tmp_path: Path) -> Path:
    """A registry of Box policies: a poor champion (version 1, std 0.3), a good candidate (2, std 0.3)."""
    from rlops_trainer.registry import Registry

    data = box_bandit()
    root = tmp_path / "box-registry"
    publish(root, box_policy_dir(data, tmp_path / "b1", *POOR_BOX, std=0.3), gate=False)
    Registry(root).promote(POLICY, 1, require_gate=False, force_reason="the first champion")
    publish(root, box_policy_dir(data, tmp_path / "b2", *GOOD_BOX, std=0.3))
    return root
