"""D4RL HDF5 / pickle and Minari imports of Box actions: bounds, log-densities, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from rlops_trainer.datasets import DatasetError, load, save
from rlops_trainer.importers import import_d4rl_hdf5, import_d4rl_pkl, import_minari
from rlops_trainer.policy import squashed_gaussian_log_prob, unsquash

N, K = 10, 2
TIMEOUTS = np.array([0, 0, 0, 0, 1, 0, 0, 0, 0, 1], dtype=bool)


def box_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(N, 3)).astype(np.float32)
    return {
        "observations": obs,
        "actions": rng.uniform(-1, 1, size=(N, K)).astype(np.float32),
        "rewards": np.arange(N, dtype=np.float32),
        "terminals": np.zeros(N, dtype=bool),
        "timeouts": TIMEOUTS.copy(),
        "next_observations": obs + 1,
    }


def write_hdf5(path: Path, arrays: dict[str, np.ndarray], distribution: str | None = None) -> Path:
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
        if distribution is not None:
            f["metadata/policy/output_distribution"] = np.bytes_(distribution)
    return path


def test_hdf5_box_round_trip_with_explicit_bounds(tmp_path: Path) -> None:
    arrays = box_arrays()
    arrays["infos/action_log_probs"] = np.full(N, 1.25, dtype=np.float32)  # a density above 1 is fine
    path = write_hdf5(tmp_path / "d.hdf5", arrays)
    t = import_d4rl_hdf5(path, env_id="hopper-medium-v2", action_low=[-1.0], action_high=[1.0])
    assert t.meta.action_space == {"type": "Box", "shape": [2], "low": [-1.0, -1.0], "high": [1.0, 1.0]}
    np.testing.assert_array_equal(t.action, arrays["actions"])
    np.testing.assert_array_equal(t.behavior_logp, 1.25)
    assert t.meta.extra["behavior_logp_source"] == "infos/action_log_probs"
    back = load(save(t, tmp_path / "d.parquet"))
    assert back.fingerprint() == t.fingerprint()


def test_hdf5_box_bounds_come_from_a_registered_env(tmp_path: Path) -> None:
    arrays = box_arrays()
    arrays["actions"] = arrays["actions"][:, :1] * 2
    t = import_d4rl_hdf5(write_hdf5(tmp_path / "p.hdf5", arrays), env_id="Pendulum-v1")
    assert t.meta.action_bounds()[1].tolist() == [2.0]
    assert not t.has_propensities


def test_hdf5_unknown_bounds_say_what_to_pass(tmp_path: Path) -> None:
    path = write_hdf5(tmp_path / "d.hdf5", box_arrays())
    with pytest.raises(DatasetError, match="pass --action-low and --action-high") as e:
        import_d4rl_hdf5(path, env_id="hopper-medium-v2")
    assert str(path) in str(e.value)
    with pytest.raises(DatasetError, match="--action-low has 3 values but the actions have 2 dimensions"):
        import_d4rl_hdf5(path, env_id="x", action_low=[-1, -1, -1], action_high=[1])
    with pytest.raises(DatasetError, match=r"dimension 1 has bounds \[1, 1\]"):
        import_d4rl_hdf5(path, env_id="x", action_low=[-1, 1], action_high=[1])


def test_hdf5_actions_outside_the_bounds_name_the_file_row(tmp_path: Path) -> None:
    arrays = box_arrays()
    arrays["actions"][6, 1] = 1.5
    path = write_hdf5(tmp_path / "d.hdf5", arrays)
    with pytest.raises(DatasetError, match=r"value 1.5 in dimension 1 is outside the action space") as e:
        import_d4rl_hdf5(path, env_id="x", action_low=-1, action_high=1)
    assert (e.value.column, e.value.row) == ("action", 6)
    assert str(path) in str(e.value)


def _gaussian_params() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.normal(size=(N, K)).astype(np.float32), np.full((N, K), -0.5, dtype=np.float32)


def test_plain_gaussian_log_densities_by_hand(tmp_path: Path) -> None:
    arrays = box_arrays()
    mean, log_std = _gaussian_params()
    arrays["infos/action_mean"], arrays["infos/action_log_std"] = mean, log_std
    t = import_d4rl_hdf5(write_hdf5(tmp_path / "g.hdf5", arrays), env_id="x", action_low=-1, action_high=1)
    a = arrays["actions"].astype(np.float64)
    std = np.exp(-0.5)
    by_hand = (-0.5 * ((a - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)).sum(axis=1)
    np.testing.assert_allclose(t.behavior_logp, by_hand, rtol=1e-5)
    assert "gaussian density" in t.meta.extra["behavior_logp_source"]


def test_tanh_gaussian_log_densities_follow_the_files_metadata(tmp_path: Path) -> None:
    arrays = box_arrays()
    mean, log_std = _gaussian_params()
    arrays["infos/action_mean"], arrays["infos/action_logstd"] = mean, log_std
    arrays["actions"][:, 1] += 1.0  # the second dimension lives in [0, 2]
    path = write_hdf5(tmp_path / "s.hdf5", arrays, distribution="tanh_gaussian")
    t = import_d4rl_hdf5(path, env_id="x", action_low=[-1, 0], action_high=[1, 2])
    mid, half = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    a = torch.as_tensor(arrays["actions"], dtype=torch.float64)
    z = unsquash(a, mid, half)
    expected = squashed_gaussian_log_prob(
        z, torch.as_tensor(mean).double(), torch.full((N, K), -0.5).double(), torch.log(half)
    )
    np.testing.assert_allclose(t.behavior_logp, expected.numpy(), rtol=1e-5)
    # By hand for one row: Gaussian density of z minus log|da/dz| = log(half * (1 - tanh(z)^2)).
    z0 = np.arctanh(arrays["actions"][0].astype(np.float64) - [0.0, 1.0])
    g = -0.5 * ((z0 - mean[0]) / np.exp(-0.5)) ** 2 + 0.5 - 0.5 * np.log(2 * np.pi)
    assert t.behavior_logp[0] == pytest.approx((g - np.log(1 - np.tanh(z0) ** 2)).sum(), rel=1e-5)
    with pytest.raises(DatasetError, match="behaviour distribution 'beta' is not known"):
        import_d4rl_hdf5(path, env_id="x", action_low=-1, action_high=1, behavior_distribution="beta")


def test_nan_in_the_gaussian_parameters_names_key_and_row(tmp_path: Path) -> None:
    arrays = box_arrays()
    mean, log_std = _gaussian_params()
    mean[3, 0] = np.nan
    arrays["infos/action_mean"], arrays["infos/action_log_std"] = mean, log_std
    path = write_hdf5(tmp_path / "n.hdf5", arrays)
    with pytest.raises(DatasetError, match="not finite") as e:
        import_d4rl_hdf5(path, env_id="x", action_low=-1, action_high=1)
    assert (e.value.column, e.value.row) == ("infos/action_mean", 3)


def test_pickle_paths_with_box_actions(tmp_path: Path) -> None:
    arrays = box_arrays()
    paths = [
        {
            "observations": arrays["observations"][s],
            "next_observations": arrays["next_observations"][s],
            "actions": arrays["actions"][s],
            "rewards": arrays["rewards"][s],
            "terminals": arrays["terminals"][s],
            "infos": {"action_log_probs": np.full(5, -1.0)},
        }
        for s in (slice(0, 5), slice(5, 10))
    ]
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps(paths))
    t = import_d4rl_pkl(path, env_id="x", allow_pickle=True, action_low=-1, action_high=1)
    assert t.meta.is_continuous
    np.testing.assert_array_equal(t.action, arrays["actions"])
    np.testing.assert_array_equal(t.behavior_logp, -1.0)


def test_minari_box_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    env = gym.make("Pendulum-v1", max_episode_steps=20)
    rng = np.random.default_rng(0)
    buffers, actions = [], []
    for ep in range(2):
        obs, _ = env.reset(seed=ep)
        observations, acts, rewards, terms, truncs = [obs], [], [], [], []
        while True:
            action = rng.uniform(-2, 2, size=1).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            acts.append(action)
            rewards.append(float(reward))
            terms.append(terminated)
            truncs.append(truncated)
            if terminated or truncated:
                break
        actions.append(np.asarray(acts))
        infos = {"action_log_probs": np.full(len(acts), -np.log(4.0))}
        buffers.append(
            EpisodeBuffer(
                id=ep,
                seed=ep,
                observations=np.asarray(observations),
                actions=np.asarray(acts),
                rewards=np.asarray(rewards),
                terminations=np.asarray(terms),
                truncations=np.asarray(truncs),
                infos=infos,
            )
        )
    with pytest.warns(UserWarning, match="is set to None"):
        minari.create_dataset_from_buffers("pendulum/uniform-v0", buffers, env=env, algorithm_name="uniform")
    env.close()
    t = import_minari("pendulum/uniform-v0")
    assert t.meta.action_space["low"] == [-2.0]
    np.testing.assert_array_equal(t.action, np.concatenate(actions))
    np.testing.assert_allclose(t.behavior_logp, -np.log(4.0), rtol=1e-6)
