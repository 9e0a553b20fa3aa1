"""D4RL HDF5 / pickle and local Minari imports: good files, and each kind of bad one."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from rlops_trainer.datasets import DatasetError, load, save
from rlops_trainer.importers import (
    import_d4rl_hdf5,
    import_d4rl_pkl,
    import_dataset,
    import_minari,
)

# Rows 0-3: episode ending in a terminal; rows 4-7: cut by a timeout; rows 8-9: cut by the end of the file.
N = 10
TERMINALS = np.array([0, 0, 0, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
TIMEOUTS = np.array([0, 0, 0, 0, 0, 0, 0, 1, 0, 0], dtype=bool)


def d4rl_arrays(with_next: bool = False, one_hot: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    obs = (np.arange(N * 4, dtype=np.float32).reshape(N, 4)) / 10
    actions = rng.integers(0, 2, N)
    arrays: dict[str, np.ndarray] = {
        "observations": obs,
        "actions": np.eye(2, dtype=np.float32)[actions] if one_hot else actions,
        "rewards": np.arange(N, dtype=np.float32),
        "terminals": TERMINALS.copy(),
        "timeouts": TIMEOUTS.copy(),
        "infos/action_log_probs": np.full(N, math.log(0.5)),
    }
    if with_next:
        arrays["next_observations"] = obs + 100
    return arrays


def write_hdf5(path: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any] | None = None) -> Path:
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return path


# --------------------------------------------------------------------------------------------------
# D4RL HDF5
# --------------------------------------------------------------------------------------------------


def test_hdf5_without_next_observations(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    path = write_hdf5(tmp_path / "d.hdf5", arrays, {"env_id": "CartPole-v1", "n_actions": 2})
    t = import_d4rl_hdf5(path)
    # The cut rows 7 (timeout) and 9 (end of file) have no next observation in the file: dropped.
    kept = [0, 1, 2, 3, 4, 5, 6, 8]
    np.testing.assert_array_equal(t.observation, arrays["observations"][kept])
    np.testing.assert_array_equal(t.action, arrays["actions"][kept])
    np.testing.assert_array_equal(t.reward, arrays["rewards"][kept])
    np.testing.assert_array_equal(t.episode_id, [0, 0, 0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(t.step, [0, 1, 2, 3, 0, 1, 2, 0])
    np.testing.assert_array_equal(t.terminated, [0, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(t.truncated, [0, 0, 0, 0, 0, 0, 1, 1])
    obs = arrays["observations"]
    np.testing.assert_array_equal(t.next_observation[:3], obs[1:4])
    np.testing.assert_array_equal(t.next_observation[3], obs[3])  # terminal: never bootstrapped from
    np.testing.assert_array_equal(t.next_observation[4:7], obs[5:8])
    np.testing.assert_array_equal(t.next_observation[7], obs[9])
    np.testing.assert_allclose(np.exp(t.behavior_logp), 0.5)
    assert t.meta.extra["rows_dropped_without_next_observation"] == 2
    assert "terminal_next_observation" in t.meta.extra
    assert t.meta.env_id == "CartPole-v1"
    assert t.meta.source == "d4rl-hdf5:d.hdf5"
    # CartPole-v1 is registered, so its real bounds are used.
    assert t.meta.observation_space["low"][0] == pytest.approx(-4.8)
    assert load(save(t, tmp_path / "d.parquet")).fingerprint() == t.fingerprint()


def test_hdf5_with_next_observations_and_one_hot_actions(tmp_path: Path) -> None:
    arrays = d4rl_arrays(with_next=True, one_hot=True)
    path = write_hdf5(tmp_path / "d.hdf5", arrays)
    t = import_d4rl_hdf5(path, env_id="my-env", n_actions=2)
    assert len(t) == N
    np.testing.assert_array_equal(t.next_observation, arrays["next_observations"])
    np.testing.assert_array_equal(t.action, arrays["actions"].argmax(axis=1))
    np.testing.assert_array_equal(t.episode_id, [0] * 4 + [1] * 4 + [2] * 2)
    np.testing.assert_array_equal(t.truncated, [0, 0, 0, 0, 0, 0, 0, 1, 0, 1])
    assert t.meta.extra["last_episode_cut_by_end_of_file"] is True
    assert t.meta.observation_space["high"] == ["inf"] * 4


def test_hdf5_bad_one_hot_row(tmp_path: Path) -> None:
    arrays = d4rl_arrays(one_hot=True)
    arrays["actions"][6] = [1, 1]
    path = write_hdf5(tmp_path / "d.hdf5", arrays)
    with pytest.raises(DatasetError, match=r"must be one-hot.*\[1\.0, 1\.0\]") as e:
        import_d4rl_hdf5(path, env_id="x")
    assert (e.value.column, e.value.row) == ("actions", 6)
    assert str(path) in str(e.value)


def test_hdf5_missing_key(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    del arrays["timeouts"]
    path = write_hdf5(tmp_path / "d.hdf5", arrays)
    with pytest.raises(DatasetError, match="missing HDF5 dataset 'timeouts'") as e:
        import_d4rl_hdf5(path, env_id="x", n_actions=2)
    assert str(path) in str(e.value)
    assert "expected keys: observations, actions, rewards, terminals, timeouts" in str(e.value)


def test_hdf5_length_mismatch_names_both_keys(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    arrays["rewards"] = arrays["rewards"][:9]
    path = write_hdf5(tmp_path / "d.hdf5", arrays)
    with pytest.raises(DatasetError, match="'rewards' has 9 rows but 'observations' has 10") as e:
        import_d4rl_hdf5(path, env_id="x", n_actions=2)
    assert str(path) in str(e.value)


def test_hdf5_truncated_file(tmp_path: Path) -> None:
    path = write_hdf5(tmp_path / "d.hdf5", d4rl_arrays())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"truncated or corrupt\?") as e:
        import_d4rl_hdf5(path, env_id="x", n_actions=2)
    assert str(path) in str(e.value)


def test_hdf5_needs_env_id_and_n_actions(tmp_path: Path) -> None:
    path = write_hdf5(tmp_path / "d.hdf5", d4rl_arrays())
    with pytest.raises(DatasetError, match="--n-actions"):
        import_d4rl_hdf5(path, env_id="x")
    with pytest.raises(DatasetError, match="--env-id"):
        import_d4rl_hdf5(path, n_actions=2)


def test_hdf5_rows_are_validated_with_file_rows(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    arrays["actions"][8] = 5
    path = write_hdf5(tmp_path / "d.hdf5", arrays)
    with pytest.raises(DatasetError, match=r"action 5 is outside the action space Discrete\(2\)") as e:
        import_d4rl_hdf5(path, env_id="x", n_actions=2)
    # Row 8 of the file (row 7 of the converted data, after row 7 was dropped).
    assert e.value.row == 8
    assert str(path) in str(e.value)


def test_hdf5_observation_width_must_match_a_registered_env(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    arrays["observations"] = arrays["observations"][:, :3]
    path = write_hdf5(tmp_path / "d.hdf5", arrays)
    with pytest.raises(DatasetError, match="observations have 3 features but CartPole-v1 observes"):
        import_d4rl_hdf5(path, env_id="CartPole-v1", n_actions=2)


# --------------------------------------------------------------------------------------------------
# D4RL pickle
# --------------------------------------------------------------------------------------------------


class _Tripwire:
    """Unpickling this writes a marker file: proof that code in the pickle ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_pickle_is_refused_without_opt_in(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps([_Tripwire(str(marker))]))
    with pytest.raises(DatasetError) as e:
        import_d4rl_pkl(path, env_id="x", n_actions=2)
    message = str(e.value)
    assert "executes code" in message
    assert "--allow-pickle" in message
    assert str(path) in message
    assert not marker.exists()


def _paths() -> list[dict[str, Any]]:
    arrays = d4rl_arrays(with_next=True)
    first = {k: v[:4] for k, v in arrays.items() if k != "infos/action_log_probs"}
    second = {k: v[4:] for k, v in arrays.items() if k not in ("timeouts", "infos/action_log_probs")}
    second["terminals"] = np.zeros(6, dtype=bool)
    return [first, second]


def test_pickle_list_of_paths_with_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps(_paths()))
    t = import_d4rl_pkl(path, env_id="x", n_actions=2, allow_pickle=True)
    assert len(t) == N
    np.testing.assert_array_equal(t.episode_id, [0] * 4 + [1] * 6)
    np.testing.assert_array_equal(t.terminated, [0, 0, 0, 1] + [0] * 6)
    np.testing.assert_array_equal(t.truncated, [0] * 9 + [1])
    assert np.isnan(t.behavior_logp).all()
    assert t.meta.extra["pickle_layout"] == "paths"


def test_pickle_dict_of_arrays_with_opt_in(tmp_path: Path) -> None:
    arrays = d4rl_arrays()
    logp = arrays.pop("infos/action_log_probs")
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps({**arrays, "infos": {"action_log_probs": logp}}))
    t = import_dataset("d4rl-pkl", path, env_id="x", n_actions=2, allow_pickle=True)
    assert len(t) == 8
    assert t.has_propensities
    assert t.meta.source == "d4rl-pkl:d.pkl"


def test_truncated_pickle(tmp_path: Path) -> None:
    path = tmp_path / "d.pkl"
    data = pickle.dumps(_paths())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="not a readable pickle") as e:
        import_d4rl_pkl(path, env_id="x", n_actions=2, allow_pickle=True)
    assert str(path) in str(e.value)


def test_unknown_format() -> None:
    with pytest.raises(DatasetError, match="accepted: d4rl-hdf5, d4rl-pkl, minari"):
        import_dataset("csv", "x.csv")


# --------------------------------------------------------------------------------------------------
# Minari
# --------------------------------------------------------------------------------------------------


def _make_minari_dataset(dataset_id: str, episodes: int = 3) -> list[dict[str, np.ndarray]]:
    """A small CartPole Minari dataset in MINARI_DATASETS_PATH, written through Minari's own API.

    ``DataCollector`` needs jax for buffering, which rlops does not depend on; the episode buffers it
    would produce are built here directly and written with ``create_dataset_from_buffers``.
    """
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(0)
    buffers, raw = [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=ep)
        observations, actions, rewards, terms, truncs = [obs], [], [], [], []
        while True:
            action = int(rng.integers(2))
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(float(reward))
            terms.append(terminated)
            truncs.append(truncated)
            if terminated or truncated:
                break
        episode = {
            "observations": np.asarray(observations),
            "actions": np.asarray(actions),
            "rewards": np.asarray(rewards),
            "terminations": np.asarray(terms),
            "truncations": np.asarray(truncs),
        }
        raw.append(episode)
        buffers.append(EpisodeBuffer(id=ep, seed=ep, infos={}, **episode))
    # Minari warns about every descriptive field (author, description, ...) that a test leaves out.
    with pytest.warns(UserWarning, match="is set to None"):
        minari.create_dataset_from_buffers(dataset_id, buffers, env=env, algorithm_name="random")
    env.close()
    return raw


@pytest.fixture
def minari_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def test_minari_local_dataset_by_id_and_by_path(minari_root: Path) -> None:
    raw = _make_minari_dataset("cartpole/random-v0")
    t = import_minari("cartpole/random-v0")
    lengths = [len(e["actions"]) for e in raw]
    assert len(t) == sum(lengths)
    np.testing.assert_array_equal(t.episode_id, np.repeat(np.arange(3), lengths))
    first = raw[0]
    np.testing.assert_array_equal(t.observation[: lengths[0]], first["observations"][:-1])
    np.testing.assert_array_equal(t.next_observation[: lengths[0]], first["observations"][1:])
    np.testing.assert_array_equal(t.action[: lengths[0]], first["actions"])
    assert t.terminated[lengths[0] - 1]
    assert t.meta.env_id == "CartPole-v1"
    assert t.meta.source == "minari:cartpole/random-v0"
    assert t.meta.behavior_policy == "random"
    assert not t.has_propensities
    by_path = import_minari(minari_root / "cartpole" / "random-v0")
    assert by_path.fingerprint() == t.fingerprint()


def test_minari_missing_dataset_is_not_downloaded(minari_root: Path) -> None:
    with pytest.raises(DatasetError, match="no local Minari dataset 'cartpole/absent-v0'") as e:
        import_minari("cartpole/absent-v0")
    assert "MINARI_DATASETS_PATH" in str(e.value)
    assert str(minari_root) in str(e.value)
