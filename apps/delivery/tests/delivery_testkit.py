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
