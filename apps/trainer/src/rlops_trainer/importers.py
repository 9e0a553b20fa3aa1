"""Import D4RL (HDF5 and ``.pkl``) and local Minari datasets into the native transition format.

Every importer returns a :class:`~rlops_trainer.datasets.Transitions` that passed the same
validation as :func:`~rlops_trainer.datasets.load`; errors name the file, the key or column, and the
row of the source file.

D4RL files hold one row per step with episode ends marked by ``terminals`` (the environment
ended the episode) or ``timeouts`` (a time limit cut it). Without ``next_observations`` the next
observation of a row is the following row's observation; the last row of an episode that was cut
(timeout, or the end of the file) has no successor in the file and is dropped, and the row before
it becomes the truncated end of its episode. A terminal row keeps its own observation as next
observation: nothing bootstraps from the state after a termination. Both facts are recorded in
the metadata ``extra``.

Actions are Discrete (integers, or one-hot rows) or Box (float vectors ``[N, k]``, raw units). The
action space is, in order: explicit bounds (``action_low`` / ``action_high``: Box), an explicit
``n_actions`` (Discrete), the environment's own space when Gymnasium knows ``env_id`` (and has its
package), else the actions themselves (whole numbers or one-hot rows: Discrete; fractions: Box, whose
bounds must then be passed). D4RL stores the actions of its MuJoCo tasks already in [-1, 1].

Behaviour log-densities of Box actions, in order:

* ``infos/action_log_probs``: the logged log-density, ``[N]`` (or ``[N, k]`` per-dimension terms,
  summed). D4RL's MuJoCo files (SAC, tanh-Gaussian) carry this key.
* ``infos/action_mean`` with ``infos/action_log_std`` (or ``infos/action_logstd``): the behaviour's
  Gaussian, from which the exact log-density is computed. D4RL's Adroit files (DAPG) carry these; the
  HDF5 dataset ``metadata/policy/output_distribution`` (or ``behavior_distribution``) says whether the
  Gaussian was ``gaussian`` (plain; actions possibly clipped to the bounds afterwards) or
  ``tanh_gaussian`` (mean and log-std of the pre-squash ``z``, action ``mid + half * tanh(z)``);
  without it the Gaussian is taken as plain.
* otherwise unknown (NaN).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from rlops_trainer.datasets import (
    DatasetError,
    DatasetMeta,
    Transitions,
    bound_tolerance,
    box_space,
    discrete_space,
    validate,
)
from rlops_trainer.policy import squashed_gaussian_log_prob, unsquash

FORMATS = ("d4rl-hdf5", "d4rl-pkl", "minari")
D4RL_REQUIRED = ("observations", "actions", "rewards", "terminals", "timeouts")
INFO_KEYS = ("action_log_probs", "action_mean", "action_log_std", "action_logstd")
"""Per-row behaviour facts read from ``infos``: the log-probability (or log-density), or the Gaussian."""
D4RL_OPTIONAL = ("next_observations", *(f"infos/{k}" for k in INFO_KEYS))
BEHAVIOR_DISTRIBUTIONS = ("gaussian", "tanh_gaussian")
"""What ``infos/action_mean`` and ``infos/action_log_std`` parameterise (see the module docstring)."""
DISTRIBUTION_KEY = "metadata/policy/output_distribution"
"""Where D4RL's HDF5 files name the behaviour's output distribution."""
_KEYS_HINT = f"expected keys: {', '.join(D4RL_REQUIRED)} (optional: {', '.join(D4RL_OPTIONAL)})"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return str(value)


EnvSpaces = tuple[gym.Space[Any], gym.Space[Any]]


def _env_spaces(env_id: str) -> EnvSpaces | None:
    """The registered environment's (observation, action) spaces; None when Gymnasium does not know
    ``env_id`` here or lacks the package that provides it."""
    if env_id not in gym.registry:
        return None
    try:
        env = gym.make(env_id)
    except gym.error.Error:
        return None
    spaces = env.observation_space, env.action_space
    env.close()
    return spaces


def _observation_space(env_id: str, obs_dim: int, spaces: EnvSpaces | None, path: str) -> dict[str, Any]:
    """The registered environment's bounds when it exists and agrees with the data, else unbounded."""
    unbounded = box_space(np.full(obs_dim, -np.inf), np.full(obs_dim, np.inf))
    if spaces is None or not isinstance(spaces[0], gym.spaces.Box):
        return unbounded
    obs_space = spaces[0]
    if int(np.prod(obs_space.shape)) != obs_dim:
        raise DatasetError(
            f"observations have {obs_dim} features but {env_id} observes {obs_space.shape}: "
            "is --env-id right?",
            path=path,
        )
    return box_space(obs_space.low, obs_space.high)


def _check_discrete_env(env_id: str, n_actions: int, spaces: EnvSpaces | None, path: str) -> None:
    act_space = spaces[1] if spaces else None
    if isinstance(act_space, gym.spaces.Discrete) and int(act_space.n) != n_actions:
        raise DatasetError(
            f"the data have {n_actions} actions but {env_id} has {act_space}: is --n-actions right?",
            path=path,
        )
    if isinstance(act_space, gym.spaces.Box):
        raise DatasetError(
            f"the data have Discrete actions but {env_id} has {act_space}: is --env-id right? "
            "(Box actions are imported as float vectors, not with --n-actions)",
            path=path,
        )


def _is_box(
    actions: np.ndarray,
    n_actions: int | None,
    action_low: Any,
    action_high: Any,
    spaces: EnvSpaces | None,
) -> bool:
    """Whether the actions are Box actions (see the module docstring for the order of the evidence)."""
    if action_low is not None or action_high is not None:
        return True
    if n_actions is not None:
        return False
    if spaces is not None and isinstance(spaces[1], gym.spaces.Box | gym.spaces.Discrete):
        return isinstance(spaces[1], gym.spaces.Box)
    if not np.issubdtype(actions.dtype, np.floating):
        return False
    with np.errstate(invalid="ignore"):
        return bool((actions != np.round(actions)).any())


def _bound_values(values: Any, k: int, flag: str, path: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        return np.full(k, float(arr[0]))
    if arr.size != k:
        raise DatasetError(
            f"{flag} has {arr.size} values but the actions have {k} dimensions: give one value "
            f"(every dimension) or {k}",
            path=path,
        )
    return arr


def _box_action_space(
    k: int, env_id: str, spaces: EnvSpaces | None, action_low: Any, action_high: Any, path: str
) -> dict[str, Any]:
    """The Box action space: explicit bounds, else the environment's; finite with low < high."""
    act_space = spaces[1] if spaces else None
    if isinstance(act_space, gym.spaces.Discrete):
        raise DatasetError(
            f"the data have {k}-dimensional float actions but {env_id} has {act_space}: is --env-id right?",
            path=path,
        )
    if isinstance(act_space, gym.spaces.Box) and int(np.prod(act_space.shape)) != k:
        raise DatasetError(
            f"the actions have {k} dimensions but {env_id} has {act_space}: is --env-id right?", path=path
        )
    if action_low is None and action_high is None:
        if not isinstance(act_space, gym.spaces.Box):
            raise DatasetError(
                f"the action bounds are unknown: Gymnasium has no environment {env_id!r} here (or lacks "
                "its package); pass --action-low and --action-high (action_low=, action_high=), one value "
                f"for every dimension or {k}, e.g. -1 and 1 for D4RL MuJoCo tasks",
                path=path,
            )
        low = np.asarray(act_space.low, dtype=np.float64).reshape(-1)
        high = np.asarray(act_space.high, dtype=np.float64).reshape(-1)
        origin = f"{env_id}'s action space"
    elif action_low is None or action_high is None:
        raise DatasetError("pass both --action-low and --action-high (action_low=, action_high=)", path=path)
    else:
        low = _bound_values(action_low, k, "--action-low", path)
        high = _bound_values(action_high, k, "--action-high", path)
        origin = "--action-low/--action-high"
    bad = np.flatnonzero(~(np.isfinite(low) & np.isfinite(high) & (low < high)))
    if bad.size:
        j = int(bad[0])
        raise DatasetError(
            f"{origin}: dimension {j} has bounds [{low[j]:g}, {high[j]:g}]; Box actions need finite "
            "bounds with low < high (pass --action-low and --action-high)",
            path=path,
        )
    return box_space(low, high)


def _box_log_density(
    data: Mapping[str, np.ndarray],
    actions: np.ndarray,
    action_space: dict[str, Any],
    distribution: str | None,
    path: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-row behaviour log-densities of Box actions (NaN when unknown) and notes on where they came
    from, following the order in the module docstring."""
    n, k = actions.shape
    if "infos/action_log_probs" in data:
        raw = data["infos/action_log_probs"].astype(np.float64)
        if raw.ndim == 1 or (raw.ndim == 2 and raw.shape[1] == 1):
            return raw.reshape(-1), {"behavior_logp_source": "infos/action_log_probs"}
        if raw.ndim == 2 and raw.shape[1] == k:
            # Independent per-dimension terms: the joint log-density is their sum.
            note = "infos/action_log_probs, summed over the action dimensions"
            return raw.sum(axis=1), {"behavior_logp_source": note}
        raise DatasetError(
            f"shape {raw.shape}; expected [N], [N, 1] or [N, {k}] (per-dimension terms, summed)",
            path=path,
            column="infos/action_log_probs",
        )
    std_key = next((key for key in ("infos/action_log_std", "infos/action_logstd") if key in data), None)
    if "infos/action_mean" not in data or std_key is None:
        return np.full(n, np.nan), {}
    distribution = distribution or "gaussian"
    if distribution not in BEHAVIOR_DISTRIBUTIONS:
        raise DatasetError(
            f"behaviour distribution {distribution!r} is not known; accepted: "
            f"{', '.join(BEHAVIOR_DISTRIBUTIONS)}",
            path=path,
            column=DISTRIBUTION_KEY,
        )
    params = {}
    for key in ("infos/action_mean", std_key):
        arr = data[key].astype(np.float64)
        arr = arr.reshape(-1, 1) if arr.ndim == 1 and k == 1 else arr
        try:
            # A copy: the broadcast view is read-only, which torch will not wrap.
            arr = np.broadcast_to(arr, (n, k)).copy()
        except ValueError:
            raise DatasetError(
                f"shape {data[key].shape}; expected [N, {k}] (one value per row and action dimension)",
                path=path,
                column=key,
            ) from None
        finite = np.isfinite(arr).all(axis=1)
        if not finite.all():
            raise DatasetError("value is not finite", path=path, column=key, row=int((~finite).argmax()))
        params[key] = arr
    low, high = np.asarray(action_space["low"], np.float64), np.asarray(action_space["high"], np.float64)
    a = torch.as_tensor(actions, dtype=torch.float64)
    mean = torch.as_tensor(params["infos/action_mean"])
    log_std = torch.as_tensor(params[std_key])
    notes: dict[str, Any] = {
        "behavior_logp_source": f"{distribution} density from infos/action_mean and {std_key}"
    }
    if distribution == "tanh_gaussian":
        mid = torch.as_tensor((high + low) / 2.0)
        half = torch.as_tensor((high - low) / 2.0)
        z = unsquash(a, mid, half)
        logp = squashed_gaussian_log_prob(z, mean, log_std, torch.log(half))
    else:
        logp = torch.distributions.Normal(mean, torch.exp(log_std)).log_prob(a).sum(dim=-1)
        on_bound = (actions <= low + bound_tolerance(low)) | (actions >= high - bound_tolerance(high))
        clipped = int(on_bound.any(axis=1).sum())
        if clipped:
            # A Gaussian clipped to the bounds puts probability mass on them: there the Gaussian's
            # density is not the action's probability, which importance weights should know.
            notes["behavior_logp_rows_on_bound"] = clipped
    return logp.numpy(), notes


def _discrete_actions(
    actions: np.ndarray, n_actions: int | None, path: str, key: str
) -> tuple[np.ndarray, int | None]:
    """Integer actions (from ints, whole floats or one-hot rows) and the action count one-hot implies."""
    if actions.ndim == 2 and actions.shape[1] == 1:
        actions = actions[:, 0]
    if actions.ndim == 1:
        return actions, n_actions
    if actions.ndim != 2:
        raise DatasetError(
            f"actions have shape {actions.shape}; expected [N] integers or [N, n_actions] one-hot rows",
            path=path,
            column=key,
        )
    width = int(actions.shape[1])
    if n_actions is not None and n_actions != width:
        raise DatasetError(
            f"one-hot actions have {width} columns but n_actions is {n_actions}", path=path, column=key
        )
    is_binary = (actions == 0) | (actions == 1)
    bad = ~is_binary.all(axis=1) | (actions.sum(axis=1) != 1)
    if bad.any():
        row = int(bad.argmax())
        raise DatasetError(
            f"2-D actions must be one-hot (a single 1, the rest 0); this row is {actions[row].tolist()}",
            path=path,
            column=key,
            row=row,
        )
    return actions.argmax(axis=1), width


def _flags(values: np.ndarray, key: str, path: str) -> np.ndarray:
    values = values.reshape(-1) if values.ndim == 2 and values.shape[1] == 1 else values
    if values.ndim != 1:
        raise DatasetError(f"shape {values.shape}; expected one flag per row", path=path, column=key)
    if values.dtype == np.bool_:
        return values
    if np.issubdtype(values.dtype, np.number):
        bad = ~np.isin(values, (0, 1))
        if bad.any():
            row = int(bad.argmax())
            raise DatasetError(
                f"value {values[row]} is not a flag (0/1, true/false)", path=path, column=key, row=row
            )
        return values.astype(np.bool_)
    raise DatasetError(f"dtype {values.dtype} is not boolean", path=path, column=key)


def _discrete_log_probs(
    data: Mapping[str, np.ndarray], action: np.ndarray, n_actions: int, path: str
) -> np.ndarray:
    """The logged actions' log-probabilities from ``infos/action_log_probs`` (NaN when absent)."""
    n_rows = len(action)
    logp = np.full(n_rows, np.nan)
    if "infos/action_log_probs" in data:
        raw = data["infos/action_log_probs"]
        if raw.ndim == 2 and raw.shape[1] == n_actions:
            # Per-action log-probabilities: keep the logged action's (validated to lie in range below).
            logp = raw[np.arange(n_rows), np.clip(action.astype(np.int64), 0, n_actions - 1)]
        elif raw.ndim == 1 or (raw.ndim == 2 and raw.shape[1] == 1):
            logp = raw.reshape(-1)
        else:
            raise DatasetError(
                f"shape {raw.shape}; expected [N] or [N, {n_actions}]",
                path=path,
                column="infos/action_log_probs",
            )

    return np.asarray(logp, dtype=np.float64)


def from_d4rl_arrays(
    arrays: Mapping[str, np.ndarray],
    *,
    path: str,
    source: str,
    env_id: str | None,
    n_actions: int | None,
    behavior_policy: str = "unknown",
    extra: dict[str, Any] | None = None,
    action_low: Any = None,
    action_high: Any = None,
    behavior_distribution: str | None = None,
) -> Transitions:
    """Convert D4RL-style flat arrays (keys as in :data:`D4RL_REQUIRED` / :data:`D4RL_OPTIONAL`).

    ``action_low`` / ``action_high`` (one value, or one per dimension) make the actions Box actions with
    those bounds; ``behavior_distribution`` (one of :data:`BEHAVIOR_DISTRIBUTIONS`) says what the
    file's ``infos/action_mean`` and ``infos/action_log_std`` describe (see the module docstring)."""
    for key in D4RL_REQUIRED:
        if key not in arrays:
            raise DatasetError(f"missing key '{key}'; {_KEYS_HINT}", path=path, column=key)
    data = {k: np.asarray(v) for k, v in arrays.items() if k in (*D4RL_REQUIRED, *D4RL_OPTIONAL)}
    for key, arr in data.items():
        if arr.ndim == 0:
            raise DatasetError(f"is a scalar {arr!r}; expected one entry per row", path=path, column=key)
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise DatasetError(f"dtype {arr.dtype} is not numeric", path=path, column=key)
    n_rows = len(data["observations"])
    for key, arr in data.items():
        if len(arr) != n_rows:
            raise DatasetError(
                f"length mismatch: '{key}' has {len(arr)} rows but 'observations' has {n_rows}",
                path=path,
                column=key,
            )
    if n_rows == 0:
        raise DatasetError("the file holds no rows", path=path)

    obs = data["observations"].reshape(n_rows, -1)
    obs_dim = int(obs.shape[1])
    terminal = _flags(data["terminals"], "terminals", path)
    timeout = _flags(data["timeouts"], "timeouts", path)
    reward = data["rewards"].reshape(-1) if data["rewards"].ndim == 2 else data["rewards"]
    if reward.ndim != 1:
        raise DatasetError(
            f"shape {data['rewards'].shape}; expected one reward per row", path=path, column="rewards"
        )

    if env_id is None:
        raise DatasetError(
            "the environment id is unknown: the file's attributes carry no 'env_id'; pass --env-id (env_id=)",
            path=path,
        )
    spaces = _env_spaces(env_id)
    notes: dict[str, Any] = dict(extra or {})
    if _is_box(data["actions"], n_actions, action_low, action_high, spaces):
        action = data["actions"]
        action = action.reshape(-1, 1) if action.ndim == 1 else action
        if action.ndim != 2:
            raise DatasetError(
                f"actions have shape {data['actions'].shape}; expected [N, k] float vectors (Box actions)",
                path=path,
                column="actions",
            )
        action_space = _box_action_space(int(action.shape[1]), env_id, spaces, action_low, action_high, path)
        logp, logp_notes = _box_log_density(data, action, action_space, behavior_distribution, path)
        notes |= logp_notes
    else:
        action, n_actions = _discrete_actions(data["actions"], n_actions, path, "actions")
        if n_actions is None:
            raise DatasetError(
                "the number of actions is unknown: the file's attributes carry no 'n_actions' and the "
                "actions are not one-hot; pass --n-actions (n_actions=), or --action-low and --action-high "
                "for Box actions",
                path=path,
            )
        _check_discrete_env(env_id, n_actions, spaces, path)
        action_space = discrete_space(n_actions)
        logp = _discrete_log_probs(data, action, n_actions, path)

    both = terminal & timeout
    if both.any():
        notes["rows_terminal_and_timeout"] = int(both.sum())
        notes["rows_terminal_and_timeout_note"] = "treated as terminated"
    timeout = timeout & ~terminal
    ends = terminal | timeout
    last = ends.copy()
    last[-1] = True
    episode = np.concatenate([[0], np.cumsum(last[:-1])]).astype(np.int64)
    truncated = timeout.copy()

    if "next_observations" in data:
        next_obs = data["next_observations"].reshape(n_rows, -1)
        if next_obs.shape[1] != obs_dim:
            raise DatasetError(
                f"next_observations have {next_obs.shape[1]} features but observations have {obs_dim}",
                path=path,
                column="next_observations",
            )
        if not ends[-1]:
            truncated[-1] = True
            notes["last_episode_cut_by_end_of_file"] = True
        keep = np.ones(n_rows, dtype=np.bool_)
    else:
        next_obs = np.empty_like(obs)
        next_obs[:-1] = obs[1:]
        next_obs[terminal] = obs[terminal]
        drop = last & ~terminal
        truncated = np.zeros(n_rows, dtype=np.bool_)
        truncated[:-1] = drop[1:] & (episode[1:] == episode[:-1])
        keep = ~drop
        if terminal.any():
            notes["terminal_next_observation"] = "copy of the observation (never bootstrapped from)"
        if drop.any():
            notes["rows_dropped_without_next_observation"] = int(drop.sum())
        if not keep.any():
            raise DatasetError(
                "no row has a next observation: every episode is a single cut step and the file has no "
                "'next_observations'",
                path=path,
            )

    rows = np.flatnonzero(keep)
    kept_episode = episode[rows]
    episode_id = np.concatenate([[0], np.cumsum(kept_episode[1:] != kept_episode[:-1])]).astype(np.int64)
    episode_start = np.concatenate([[0], np.flatnonzero(np.diff(episode_id)) + 1])
    step = np.arange(rows.size, dtype=np.int64) - np.repeat(
        episode_start, np.diff([*episode_start, rows.size])
    )
    meta = DatasetMeta(
        env_id=env_id,
        observation_space=_observation_space(env_id, obs_dim, spaces, path),
        action_space=action_space,
        behavior_policy=behavior_policy,
        source=source,
        extra=notes,
    )
    t = Transitions(
        episode_id=episode_id,
        step=step,
        observation=obs[rows],
        action=action[rows],
        reward=reward[rows],
        next_observation=next_obs[rows],
        terminated=terminal[rows],
        truncated=truncated[rows],
        behavior_logp=logp[rows].astype(np.float32),
        meta=meta,
    )

    def locate(row: int) -> tuple[str | None, int]:
        return path, int(rows[row])

    return validate(t, path=path, locate=locate)


# --------------------------------------------------------------------------------------------------
# D4RL HDF5
# --------------------------------------------------------------------------------------------------


def import_d4rl_hdf5(
    path: str | Path,
    *,
    env_id: str | None = None,
    n_actions: int | None = None,
    action_low: Any = None,
    action_high: Any = None,
    behavior_distribution: str | None = None,
) -> Transitions:
    """Import a D4RL-style HDF5 file. ``env_id`` / ``n_actions`` override the file's attributes,
    ``behavior_distribution`` its ``metadata/policy/output_distribution``; ``action_low`` /
    ``action_high`` give Box bounds (see :func:`from_d4rl_arrays`)."""
    import h5py

    name = str(path)
    if not Path(path).is_file():
        raise DatasetError("no such file", path=name)
    try:
        handle = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"not a readable HDF5 file (truncated or corrupt?): {e}", path=name) from None
    arrays: dict[str, np.ndarray] = {}
    with handle:
        for key in (*D4RL_REQUIRED, *D4RL_OPTIONAL):
            if key not in handle:
                if key in D4RL_REQUIRED:
                    raise DatasetError(f"missing HDF5 dataset '{key}'; {_KEYS_HINT}", path=name, column=key)
                continue
            node = handle[key]
            if not isinstance(node, h5py.Dataset):
                raise DatasetError(
                    f"'{key}' is an HDF5 {type(node).__name__}, not a dataset", path=name, column=key
                )
            try:
                arrays[key] = np.asarray(node[()])
            except (OSError, ValueError, TypeError) as e:
                raise DatasetError(
                    f"cannot read HDF5 dataset '{key}' (truncated or corrupt?): {e}", path=name, column=key
                ) from None
        attrs = dict(handle.attrs)
        node = handle.get(DISTRIBUTION_KEY)
        file_distribution = _text(node[()]) if isinstance(node, h5py.Dataset) else None
    file_env = _text(attrs.get("env_id")) or _text(attrs.get("env_name"))
    file_n = attrs.get("n_actions")
    return from_d4rl_arrays(
        arrays,
        path=name,
        source=f"d4rl-hdf5:{Path(path).name}",
        env_id=env_id or file_env,
        n_actions=n_actions if n_actions is not None else (int(file_n) if file_n is not None else None),
        behavior_policy=_text(attrs.get("behavior_policy")) or "unknown",
        action_low=action_low,
        action_high=action_high,
        behavior_distribution=behavior_distribution or file_distribution,
    )


# --------------------------------------------------------------------------------------------------
# D4RL pickle
# --------------------------------------------------------------------------------------------------


def _info_arrays(infos: Any) -> dict[str, np.ndarray]:
    """The :data:`INFO_KEYS` of a pickle's ``infos`` dict, keyed as in the HDF5 layout."""
    if not isinstance(infos, Mapping):
        return {}
    return {f"infos/{k}": np.asarray(infos[k]) for k in INFO_KEYS if k in infos}


def _paths_to_arrays(paths: list[Any], name: str) -> dict[str, np.ndarray]:
    """A list of per-episode path dicts -> flat arrays; each path ends its episode."""
    chunks: dict[str, list[np.ndarray]] = {}
    with_next = [isinstance(p, Mapping) and "next_observations" in p for p in paths]
    if any(with_next) and not all(with_next):
        missing = with_next.index(False)
        raise DatasetError(
            f"path {missing} has no 'next_observations' while others have them",
            path=name,
            column="next_observations",
        )
    for i, p in enumerate(paths):
        if not isinstance(p, Mapping):
            raise DatasetError(f"path {i} is a {type(p).__name__}, expected a dict of arrays", path=name)
        for key in ("observations", "actions", "rewards"):
            if key not in p:
                raise DatasetError(f"path {i} has no key '{key}'; {_KEYS_HINT}", path=name, column=key)
        length = len(np.asarray(p["rewards"]))
        terminals = np.asarray(p.get("terminals", np.zeros(length, dtype=np.bool_)))
        timeouts = np.asarray(p.get("timeouts", np.zeros(length, dtype=np.bool_))).astype(np.bool_).copy()
        if length and not bool(np.asarray(terminals, dtype=np.bool_)[-1]):
            timeouts[-1] = True  # the path ends here, so the episode was cut if it did not terminate
        entries = {k: np.asarray(v) for k, v in p.items() if k in (*D4RL_REQUIRED, *D4RL_OPTIONAL)}
        entries |= _info_arrays(p.get("infos"))
        entries["terminals"], entries["timeouts"] = terminals, timeouts
        for key, arr in entries.items():
            if arr.ndim == 0 or len(arr) != length:
                raise DatasetError(
                    f"path {i}: length mismatch: '{key}' has {arr.size if arr.ndim == 0 else len(arr)} rows "
                    f"but 'rewards' has {length}",
                    path=name,
                    column=key,
                )
            chunks.setdefault(key, []).append(arr)
    counts = {k: len(v) for k, v in chunks.items()}
    for key, n in counts.items():
        if n != len(paths):
            raise DatasetError(f"only {n} of {len(paths)} paths have '{key}'", path=name, column=key)
    return {k: np.concatenate(v) for k, v in chunks.items()}


def import_d4rl_pkl(
    path: str | Path,
    *,
    env_id: str | None = None,
    n_actions: int | None = None,
    allow_pickle: bool = False,
    action_low: Any = None,
    action_high: Any = None,
    behavior_distribution: str | None = None,
) -> Transitions:
    """Import a D4RL ``.pkl``: a list of path dicts, or one dict of arrays with the HDF5 keys (``infos``
    as a nested dict). Box bounds and the behaviour distribution as in :func:`from_d4rl_arrays`.

    Unpickling runs code chosen by whoever wrote the file, so it happens only with ``allow_pickle``.
    """
    name = str(path)
    if not allow_pickle:
        raise DatasetError(
            "refusing to load a pickle file: unpickling executes code stored in the file, so a hostile "
            "file can run anything. Only load files you trust, and opt in with --allow-pickle "
            "(allow_pickle=True)",
            path=name,
        )
    if not Path(path).is_file():
        raise DatasetError("no such file", path=name)
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)  # unpickling is opted into above
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as e:
        raise DatasetError(
            f"not a readable pickle (truncated or corrupt?): {type(e).__name__}: {e}", path=name
        ) from None
    if isinstance(obj, list):
        if not obj:
            raise DatasetError("the pickle holds an empty list of paths", path=name)
        arrays = _paths_to_arrays(obj, name)
        layout = "paths"
    elif isinstance(obj, Mapping):
        arrays = {
            k: np.asarray(v) for k, v in obj.items() if isinstance(k, str) and not isinstance(v, Mapping)
        }
        arrays |= _info_arrays(obj.get("infos"))
        layout = "dict of arrays"
    else:
        raise DatasetError(
            f"the pickle holds a {type(obj).__name__}; expected a list of path dicts or a dict of arrays",
            path=name,
        )
    return from_d4rl_arrays(
        arrays,
        path=name,
        source=f"d4rl-pkl:{Path(path).name}",
        env_id=env_id,
        n_actions=n_actions,
        extra={"pickle_layout": layout},
        action_low=action_low,
        action_high=action_high,
        behavior_distribution=behavior_distribution,
    )


# --------------------------------------------------------------------------------------------------
# Minari
# --------------------------------------------------------------------------------------------------


def import_minari(
    dataset: str | Path,
    *,
    env_id: str | None = None,
    action_low: Any = None,
    action_high: Any = None,
    behavior_distribution: str | None = None,
) -> Transitions:
    """Import a local Minari dataset by id (under ``MINARI_DATASETS_PATH`` or ``~/.minari/datasets``)
    or by path (the dataset directory or its ``data`` folder). Nothing is downloaded.

    Box actions take the dataset's action space, or ``action_low`` / ``action_high`` where given (or
    where the dataset's bounds are infinite). Behaviour log-densities come from the episodes' infos
    (``action_log_probs`` or ``behavior_logp``, else the Gaussian in ``action_mean`` and
    ``action_log_std``, as for D4RL)."""
    import minari

    text = str(dataset)
    root = Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets")
    candidate = Path(text)
    try:
        if candidate.exists():
            data_path = candidate / "data" if (candidate / "data").is_dir() else candidate
            name = str(data_path)
            ds = minari.MinariDataset(data_path)
        else:
            name = str(root / text)
            ds = minari.load_dataset(text, download=False)
    except FileNotFoundError:
        raise DatasetError(
            f"no local Minari dataset '{text}' (looked under {root}; set MINARI_DATASETS_PATH "
            "or give the dataset's directory). Datasets are never downloaded here",
            path=text,
        ) from None
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(f"not a readable Minari dataset: {type(e).__name__}: {e}", path=text) from None

    obs_space, act_space = ds.observation_space, ds.action_space
    if not isinstance(act_space, gym.spaces.Discrete | gym.spaces.Box):
        raise DatasetError(
            f"action space {act_space}: only Discrete and Box action spaces are supported", path=name
        )
    if not isinstance(obs_space, gym.spaces.Box):
        raise DatasetError(
            f"observation space {obs_space}: only Box observation spaces are supported", path=name
        )
    spec_id = ds.env_spec.id if ds.env_spec is not None else None
    env = env_id or spec_id
    if env is None:
        raise DatasetError("the dataset records no environment; pass --env-id (env_id=)", path=name)
    continuous = isinstance(act_space, gym.spaces.Box)
    if isinstance(act_space, gym.spaces.Box):
        k = int(act_space.low.size)
        finite = bool(np.isfinite(act_space.low).all() and np.isfinite(act_space.high).all())
        if not finite and action_low is None and action_high is None:
            raise DatasetError(
                f"the dataset's action space {act_space} is unbounded; Box actions need finite bounds: "
                "pass --action-low and --action-high (action_low=, action_high=)",
                path=name,
            )
        action_space = _box_action_space(k, env, (obs_space, act_space), action_low, action_high, name)
        start = 0
    else:
        n_actions, start = int(act_space.n), int(act_space.start)
        action_space = discrete_space(n_actions)
        k = 1

    parts: dict[str, list[np.ndarray]] = {
        c: [] for c in ("obs", "next", "act", "rew", "term", "trunc", "logp", "ep")
    }
    gaussian: dict[str, list[np.ndarray]] = {}
    offset = 0

    def fail(message: str, column: str | None = None) -> DatasetError:
        return DatasetError(message, path=name, column=column)

    try:
        episodes = list(ds.iterate_episodes())
    except (OSError, ValueError, KeyError) as e:
        raise fail(f"cannot read the episodes (truncated or corrupt?): {type(e).__name__}: {e}") from None
    for ep in episodes:
        obs = ep.observations
        if not isinstance(obs, np.ndarray):
            raise fail(
                f"episode {ep.id}: observations are a {type(obs).__name__}; expected an array", "observations"
            )
        actions = np.asarray(ep.actions)
        if continuous:
            actions = actions.reshape(len(actions), -1) if actions.ndim else actions
            if actions.ndim != 2 or actions.shape[1] != k:
                raise fail(
                    f"episode {ep.id}: actions have shape {actions.shape}; expected [steps, {k}] for "
                    f"{act_space}",
                    "actions",
                )
        else:
            if actions.ndim == 2 and actions.shape[1] == 1:
                actions = actions[:, 0]
            if actions.ndim != 1:
                raise fail(
                    f"episode {ep.id}: actions have shape {actions.shape}; expected one per step", "actions"
                )
        steps = len(actions)
        if len(obs) != steps + 1:
            raise fail(
                f"episode {ep.id}: {len(obs)} observations for {steps} actions; expected one more "
                "observation than actions",
                "observations",
            )
        for key, arr in (
            ("rewards", ep.rewards),
            ("terminations", ep.terminations),
            ("truncations", ep.truncations),
        ):
            if len(arr) != steps:
                raise fail(f"episode {ep.id}: '{key}' has {len(arr)} entries for {steps} actions", key)
        flat = obs.reshape(steps + 1, -1)
        terminated = np.asarray(ep.terminations, dtype=np.bool_)
        logp = np.full(steps, np.nan)
        for key in ("action_log_probs", "behavior_logp"):
            if key in ep.infos:
                logp = np.asarray(ep.infos[key], dtype=np.float64)
                # Box actions may log one term per dimension: the joint log-density is their sum.
                logp = logp.reshape(len(logp), -1).sum(axis=1) if continuous and logp.ndim == 2 else logp
                logp = logp.reshape(-1)
                if len(logp) != steps:
                    raise fail(
                        f"episode {ep.id}: infos['{key}'] has {len(logp)} entries for {steps} steps", key
                    )
                break
        for key in ("action_mean", "action_log_std", "action_logstd"):
            if continuous and key in ep.infos:
                values = np.asarray(ep.infos[key], dtype=np.float64)
                if len(values) != steps:
                    raise fail(
                        f"episode {ep.id}: infos['{key}'] has {len(values)} entries for {steps} steps", key
                    )
                gaussian.setdefault(f"infos/{key}", []).append(values)
        parts["obs"].append(flat[:-1])
        parts["next"].append(flat[1:])
        parts["act"].append(actions - start)
        parts["rew"].append(np.asarray(ep.rewards, dtype=np.float64))
        parts["term"].append(terminated)
        parts["trunc"].append(np.asarray(ep.truncations, dtype=np.bool_) & ~terminated)
        parts["logp"].append(logp)
        parts["ep"].append(np.full(steps, int(ep.id), dtype=np.int64))
        offset += steps

    if offset == 0:
        raise fail("the dataset holds no steps")
    joined = {c: np.concatenate(v) for c, v in parts.items()}
    extra: dict[str, Any] = {"minari_version": ds.minari_version, "minari_episodes": len(episodes)}
    logged = not np.isnan(joined["logp"]).all()
    if continuous and not logged and gaussian:
        complete = {key: np.concatenate(v) for key, v in gaussian.items() if len(v) == len(episodes)}
        logp, notes = _box_log_density(complete, joined["act"], action_space, behavior_distribution, name)
        joined["logp"] = logp
        extra |= notes
    episode_id = joined["ep"]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(episode_id)) + 1])
    step = np.arange(offset, dtype=np.int64) - np.repeat(starts, np.diff([*starts, offset]))
    meta = DatasetMeta(
        env_id=env,
        observation_space=box_space(obs_space.low, obs_space.high),
        action_space=action_space,
        behavior_policy=_minari_behavior(ds),
        source=f"minari:{ds.id}",
        extra=extra,
    )
    t = Transitions(
        episode_id=episode_id,
        step=step,
        observation=joined["obs"],
        action=joined["act"].astype(np.float32) if continuous else joined["act"],
        reward=joined["rew"].astype(np.float32),
        next_observation=joined["next"],
        terminated=joined["term"],
        truncated=joined["trunc"],
        behavior_logp=joined["logp"].astype(np.float32),
        meta=meta,
    )
    return validate(t, path=name)


def _minari_behavior(ds: Any) -> str:
    algorithm = ds.storage.metadata.get("algorithm_name")
    return str(algorithm) if algorithm else "unknown"


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def import_dataset(
    fmt: str,
    source: str | Path,
    *,
    env_id: str | None = None,
    n_actions: int | None = None,
    allow_pickle: bool = False,
    action_low: Any = None,
    action_high: Any = None,
    behavior_distribution: str | None = None,
) -> Transitions:
    """Import ``source`` in format ``fmt`` (one of :data:`FORMATS`); Box bounds and the behaviour
    distribution as in :func:`from_d4rl_arrays`."""
    box = {
        "action_low": action_low,
        "action_high": action_high,
        "behavior_distribution": behavior_distribution,
    }
    importers: dict[str, Callable[[], Transitions]] = {
        "d4rl-hdf5": lambda: import_d4rl_hdf5(source, env_id=env_id, n_actions=n_actions, **box),
        "d4rl-pkl": lambda: import_d4rl_pkl(
            source, env_id=env_id, n_actions=n_actions, allow_pickle=allow_pickle, **box
        ),
        "minari": lambda: import_minari(source, env_id=env_id, **box),
    }
    if fmt not in importers:
        raise DatasetError(f"unknown import format {fmt!r}; accepted: {', '.join(FORMATS)}")
    return importers[fmt]()
