"""A MuJoCo task end to end on small data: D4RL HDF5 from Hopper-v5 -> import -> TD3+BC -> rollouts."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from rlops_trainer import collect, rollout
from rlops_trainer.algos import for_dataset
from rlops_trainer.datasets import DatasetError
from rlops_trainer.importers import import_d4rl_hdf5
from rlops_trainer.policy import Selection
from rlops_trainer.training import RunOptions

ENV = "Hopper-v5"


def hopper_file(path: Path, episodes: int = 4) -> Path:
    """Uniform random play of Hopper-v5 (``rlops data collect``'s recorder) in D4RL's layout."""
    played = collect.collect(ENV, "uniform", episodes, seed=0, progress=False)
    columns = {
        "observations": played.observation,
        "actions": played.action,
        "rewards": played.reward,
        "terminals": played.terminated,
        "timeouts": played.truncated,
        "next_observations": played.next_observation,
    }
    with h5py.File(path, "w") as f:
        for key, values in columns.items():
            f[key] = values
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
    path = hopper_file(tmp_path / "hopper.hdf5", episodes=1)
    with pytest.raises(DatasetError, match=r"the actions have 3 dimensions but HalfCheetah-v5 has Box") as e:
        import_d4rl_hdf5(path, env_id="HalfCheetah-v5")
    assert str(path) in str(e.value)
