"""A MuJoCo task end to end on small data: D4RL HDF5 from Hopper-v5 -> import -> TD3+BC -> rollouts."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest
from rlops_trainer import rollout
from rlops_trainer.algos import for_dataset
from rlops_trainer.datasets import DatasetError
from rlops_trainer.importers import import_d4rl_hdf5
from rlops_trainer.policy import Selection
from rlops_trainer.training import RunOptions

ENV = "Hopper-v5"


def hopper_file(path: Path, episodes: int = 4, max_len: int = 40) -> Path:
    """Uniform random play of Hopper-v5 in D4RL's layout, episodes cut at ``max_len`` (timeouts)."""
    env = gym.make(ENV)
    env.action_space.seed(0)
    cols: dict[str, list[object]] = {
        k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
    }
    for ep in range(episodes):
        obs, _ = env.reset(seed=ep)
        for t in range(max_len):
            action = env.action_space.sample()
            nxt, reward, terminated, truncated, _ = env.step(action)
            cut = truncated or t == max_len - 1
            for key, value in zip(
                cols, (obs, action, reward, terminated, cut and not terminated, nxt), strict=True
            ):
                cols[key].append(value)
            obs = nxt
            if terminated or cut:
                break
    env.close()
    with h5py.File(path, "w") as f:
        for key, values in cols.items():
            f[key] = np.asarray(values, dtype=np.bool_ if key in ("terminals", "timeouts") else np.float32)
    return path


def test_hopper_data_imports_trains_and_plays(tmp_path: Path) -> None:
    path = hopper_file(tmp_path / "hopper.hdf5")
    data = import_d4rl_hdf5(path, env_id=ENV)
    # the bounds and the observation width come from the registered task
    assert data.meta.action_space == {"type": "Box", "shape": [3], "low": [-1.0] * 3, "high": [1.0] * 3}
    assert data.observation.shape[1] == 11
    assert data.truncated.sum() + data.terminated.sum() == 4

    config_cls, train = for_dataset("td3bc", data.meta)
    result = train(config_cls(steps=30, batch_size=32, seed=0), data, RunOptions(out_dir=None, device="cpu"))
    played = rollout.rollout(result.policy, Selection(), ENV, episodes=2, seed=0, max_steps=50)
    assert len(played.returns) == 2
    assert np.isfinite(played.returns).all()
    assert (played.lengths >= 1).all()


def test_hopper_data_for_the_wrong_task_is_refused(tmp_path: Path) -> None:
    path = hopper_file(tmp_path / "hopper.hdf5", episodes=1, max_len=5)
    with pytest.raises(DatasetError, match=r"the actions have 3 dimensions but HalfCheetah-v5 has Box") as e:
        import_d4rl_hdf5(path, env_id="HalfCheetah-v5")
    assert str(path) in str(e.value)
