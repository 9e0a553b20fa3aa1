"""The transition dataset: one row per transition, stored as Parquet.

Columns and metadata follow the dataset contract (``rlops_contracts.DATASET_COLUMNS``, written through
``rlops_contracts.dataset``). Everything that loads data returns a validated :class:`Transitions`;
everything that writes data takes one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rlops_contracts import DATASET_COLUMNS, DATASET_METADATA_KEY, DATASET_SCHEMA_VERSION
from rlops_contracts.dataset import transitions_table, write_transitions

SCHEMA_VERSION = DATASET_SCHEMA_VERSION
COLUMNS: tuple[str, ...] = tuple(DATASET_COLUMNS)


class DatasetError(ValueError):
    """Bad data. The message names the file, the column and the row where it applies."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        column: str | None = None,
        row: int | None = None,
    ) -> None:
        self.path, self.column, self.row = path, column, row
        where = ", ".join(
            part
            for part in (
                f"file {path}" if path else "",
                f"column '{column}'" if column else "",
                f"row {row}" if row is not None else "",
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)


@dataclass
class DatasetMeta:
    """Dataset-level metadata stored in the Parquet schema metadata under ``rlops``."""

    env_id: str
    observation_space: dict[str, Any]
    """``{"type": "Box", "shape": [d], "low": [...], "high": [...]}``; JSON has no infinity, so an
    unbounded dimension is the string ``"inf"`` / ``"-inf"`` (see :func:`box_space`, :func:`space_bounds`)."""
    action_space: dict[str, Any]
    """``{"type": "Discrete", "n": n}``, or ``{"type": "Box", "shape": [k], "low": [...], "high": [...]}``
    with finite bounds (``low < high`` in every dimension) for continuous actions."""
    behavior_policy: str
    """Human-readable description of the policy that chose the logged actions."""
    source: str
    """Where the data came from: ``collect``, ``d4rl-hdf5:<file>``, ``minari:<id>``…"""
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        # allow_nan=False: the metadata must stay valid JSON for every reader (infinities become strings).
        return json.dumps(_json_safe(asdict(self)), sort_keys=True, allow_nan=False)

    @property
    def obs_dim(self) -> int:
        return int(np.prod(self.observation_space["shape"]))

    @property
    def is_continuous(self) -> bool:
        """True for a Box action space (actions are float vectors), False for Discrete (integers)."""
        return self.action_space.get("type") == "Box"

    @property
    def n_actions(self) -> int:
        """The number of discrete actions; a Box action space has none (see :attr:`action_dim`)."""
        if self.is_continuous:
            raise ValueError("a Box action space has no number of actions; use action_dim")
        return int(self.action_space["n"])

    @property
    def action_dim(self) -> int:
        """Entries per action: ``k`` for Box([k]), 1 for Discrete (one integer)."""
        return int(np.prod(self.action_space["shape"])) if self.is_continuous else 1

    def action_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """``(low, high)`` of a Box action space as float64 arrays of length :attr:`action_dim`."""
        if not self.is_continuous:
            raise ValueError("a Discrete action space has no bounds")
        return space_bounds(self.action_space)


@dataclass
class Transitions:
    """A validated dataset held in memory as numpy arrays (one entry per transition)."""

    episode_id: np.ndarray  # int64 [N]
    step: np.ndarray  # int64 [N]
    observation: np.ndarray  # float32 [N, obs_dim]
    action: np.ndarray  # int64 [N] (Discrete) or float32 [N, action_dim] (Box)
    reward: np.ndarray  # float32 [N]
    next_observation: np.ndarray  # float32 [N, obs_dim]
    terminated: np.ndarray  # bool [N]
    truncated: np.ndarray  # bool [N]
    behavior_logp: np.ndarray  # float32 [N]; NaN where the propensity is unknown
    meta: DatasetMeta

    def __len__(self) -> int:
        return int(self.action.shape[0])

    @property
    def has_propensities(self) -> bool:
        return bool(len(self)) and not bool(np.isnan(self.behavior_logp).any())

    def episode_starts(self) -> np.ndarray:
        """Row index where each episode starts (rows are grouped by episode, ordered by step)."""
        change = np.flatnonzero(np.diff(self.episode_id)) + 1
        return np.concatenate([[0], change]).astype(np.int64)

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of every episode, in row order."""
        starts = self.episode_starts()
        return np.add.reduceat(self.reward.astype(np.float64), starts) if len(self) else np.zeros(0)

    def select(self, mask: np.ndarray) -> Transitions:
        """Rows where ``mask`` holds (a boolean array or an index array)."""
        return Transitions(
            **{c: getattr(self, c)[mask] for c in COLUMNS},
            meta=self.meta,
        )

    def fingerprint(self) -> str:
        """sha256 over the contents and metadata: identical data gives the identical id."""
        h = hashlib.sha256()
        h.update(self.meta.to_json().encode())
        for c in COLUMNS:
            arr = np.ascontiguousarray(getattr(self, c))
            h.update(c.encode())
            h.update(str(arr.dtype).encode())
            h.update(str(arr.shape).encode())
            h.update(arr.tobytes())
        return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Spaces as JSON
# --------------------------------------------------------------------------------------------------


def _bound_to_json(x: float) -> float | str:
    # JSON has no infinity; unbounded Box dimensions are written as the strings "inf" / "-inf".
    if np.isposinf(x):
        return "inf"
    if np.isneginf(x):
        return "-inf"
    return float(x)


def box_space(low: Any, high: Any) -> dict[str, Any]:
    """JSON form of a flat Box observation space; infinite bounds become ``"inf"`` / ``"-inf"``."""
    lo = np.asarray(low, dtype=np.float64).reshape(-1)
    hi = np.asarray(high, dtype=np.float64).reshape(-1)
    if lo.shape != hi.shape:
        raise ValueError(f"Box bounds disagree in shape: low {lo.shape}, high {hi.shape}")
    return {
        "type": "Box",
        "shape": [int(lo.size)],
        "low": [_bound_to_json(v) for v in lo],
        "high": [_bound_to_json(v) for v in hi],
    }


def discrete_space(n: int) -> dict[str, Any]:
    return {"type": "Discrete", "n": int(n)}


def same_action_space(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two action space dicts (datasets, model cards) describe the same space: the same number
    of Discrete actions, or Box bounds equal up to float32 rounding."""
    if a.get("type") != b.get("type"):
        return False
    if a.get("type") == "Discrete":
        return int(a["n"]) == int(b["n"])
    (low_a, high_a), (low_b, high_b) = space_bounds(a), space_bounds(b)
    return low_a.shape == low_b.shape and bool(
        np.allclose(low_a, low_b, rtol=1e-6, atol=0) and np.allclose(high_a, high_b, rtol=1e-6, atol=0)
    )


def action_space_text(space: dict[str, Any]) -> str:
    """An action space dict in words: ``3 actions`` or ``Box actions of shape [1] in [-2.0]..[2.0]``."""
    if space.get("type") == "Discrete":
        return f"{space['n']} actions"
    return f"Box actions of shape {space['shape']} in {space['low']}..{space['high']}"


def space_bounds(space: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)`` of a Box space dict as float64 arrays, with ±inf restored."""
    return (
        np.asarray([float(v) for v in space["low"]], dtype=np.float64),
        np.asarray([float(v) for v in space["high"]], dtype=np.float64),
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return "nan" if np.isnan(value) else _bound_to_json(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def meta_from_json(text: str | bytes, path: str | None = None) -> DatasetMeta:
    """Parse and check the ``rlops`` metadata written by :meth:`DatasetMeta.to_json`."""

    def bad(message: str) -> DatasetError:
        return DatasetError(f"invalid dataset metadata (schema metadata key 'rlops'): {message}", path=path)

    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise bad(f"expected a JSON object, got {type(raw).__name__}")
    required = ("env_id", "observation_space", "action_space", "behavior_policy", "source", "schema_version")
    missing = [k for k in required if k not in raw]
    if missing:
        raise bad(f"missing keys {missing}; expected {sorted((*required, 'extra'))}")
    unknown = sorted(set(raw) - {*required, "extra"})
    if unknown:
        raise bad(f"unknown keys {unknown}; expected {sorted((*required, 'extra'))}")
    version = raw["schema_version"]
    if not isinstance(version, int) or version < 1:
        raise bad(f"schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise bad(
            f"schema_version {version} is newer than this rlops reads ({SCHEMA_VERSION}); upgrade rlops"
        )
    for key in ("env_id", "behavior_policy", "source"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise bad(f"'{key}' must be a non-empty string, got {raw[key]!r}")
    extra = raw.get("extra", {})
    if not isinstance(extra, dict):
        raise bad(f"'extra' must be an object, got {type(extra).__name__}")

    obs = raw["observation_space"]
    _check_box(obs, "observation_space", bad, finite=False)
    act = raw["action_space"]
    if isinstance(act, dict) and act.get("type") == "Box":
        _check_box(act, "action_space", bad, finite=True)
    elif isinstance(act, dict) and act.get("type") == "Discrete":
        n = act.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise bad(f"action_space.n must be a positive integer, got {n!r}")
    else:
        raise bad(f"action_space must be a Discrete or Box space object, got {act!r}")
    return DatasetMeta(
        env_id=raw["env_id"],
        observation_space=obs,
        action_space=act,
        behavior_policy=raw["behavior_policy"],
        source=raw["source"],
        schema_version=version,
        extra=extra,
    )


def _check_box(space: Any, key: str, bad: Callable[[str], DatasetError], *, finite: bool) -> None:
    """Check a Box space object; action spaces (``finite``) need finite bounds with low < high."""
    if not isinstance(space, dict) or space.get("type") != "Box":
        raise bad(f"{key} must be a Box space object, got {space!r}")
    shape = space.get("shape")
    if not (
        isinstance(shape, list)
        and shape
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise bad(f"{key}.shape must be a list of positive integers, got {shape!r}")
    dim = int(np.prod(shape))
    for bound in ("low", "high"):
        values = space.get(bound)
        if not isinstance(values, list) or len(values) != dim:
            raise bad(f"{key}.{bound} must be a list of {dim} numbers, got {values!r}")
        for v in values:
            is_number = isinstance(v, int | float) and not isinstance(v, bool)
            if finite and not (is_number and np.isfinite(v)):
                raise bad(f"{key}.{bound} holds {v!r}; an action space needs finite numbers")
            if not (is_number or (isinstance(v, str) and v in ("inf", "-inf"))):
                raise bad(f'{key}.{bound} holds {v!r}; expected numbers or "inf" / "-inf"')
    if finite:
        low, high = space_bounds(space)
        wrong = np.flatnonzero(~(low < high))
        if wrong.size:
            j = int(wrong[0])
            raise bad(f"{key} dimension {j}: low {low[j]:g} must be below high {high[j]:g}")


# --------------------------------------------------------------------------------------------------
# Validation (vectorised: datasets have millions of rows)
# --------------------------------------------------------------------------------------------------

Locator = Callable[[int], tuple[str | None, int]]
"""Maps a row of the concatenated dataset to (file, row within that file)."""


def _first(mask: np.ndarray) -> int | None:
    return int(mask.argmax()) if mask.any() else None


def _fmt(x: Any) -> str:
    return np.format_float_positional(x, trim="-") if isinstance(x, float | np.floating) else str(x)


def validate(t: Transitions, path: str | None = None, locate: Locator | None = None) -> Transitions:
    """Check every rule of the dataset contract; returns the dataset with canonical dtypes.

    Raises :class:`DatasetError` naming the file, the column and the first offending row.
    """
    where: Locator = locate if locate is not None else (lambda r: (path, r))

    def err(message: str, column: str | None = None, row: int | None = None) -> DatasetError:
        if row is None:
            return DatasetError(message, path=path, column=column)
        file, local = where(row)
        return DatasetError(message, path=file, column=column, row=local)

    meta = t.meta
    n_rows = int(np.shape(t.action)[0]) if np.ndim(t.action) else 0
    if n_rows == 0:
        raise err("the dataset has no rows")
    for c in COLUMNS:
        length = int(np.shape(getattr(t, c))[0]) if np.ndim(getattr(t, c)) else 0
        if length != n_rows:
            raise err(f"has {length} rows but 'action' has {n_rows}", column=c)

    dim = meta.obs_dim
    obs_cols = {}
    for c in ("observation", "next_observation"):
        arr = np.asarray(getattr(t, c))
        if arr.ndim == 1 and dim == 1:
            arr = arr.reshape(-1, 1)
        if arr.ndim != 2 or arr.shape[1] != dim:
            raise err(
                f"shape {arr.shape} does not match observation_space shape {meta.observation_space['shape']}"
                f" (expected ({n_rows}, {dim}))",
                column=c,
            )
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise err(f"dtype {arr.dtype} is not numeric; expected float32", column=c)
        arr = arr.astype(np.float32, copy=False)
        finite = np.isfinite(arr)
        row = _first(~finite.all(axis=1))
        if row is not None:
            feature = int((~finite[row]).argmax())
            raise err(f"value {_fmt(arr[row, feature])} at index {feature} is not finite", column=c, row=row)
        obs_cols[c] = arr

    reward = np.asarray(t.reward)
    if not (np.issubdtype(reward.dtype, np.floating) or np.issubdtype(reward.dtype, np.integer)):
        raise err(f"dtype {reward.dtype} is not numeric; expected float32", column="reward")
    reward = reward.astype(np.float32, copy=False)
    row = _first(~np.isfinite(reward))
    if row is not None:
        raise err(f"value {_fmt(reward[row])} is not finite", column="reward", row=row)

    if meta.is_continuous:
        action = _box_actions(np.asarray(t.action), meta, err)
    else:
        action = _integer_column(np.asarray(t.action), "action", err)
        n_actions = meta.n_actions
        row = _first((action < 0) | (action >= n_actions))
        if row is not None:
            raise err(
                f"action {action[row]} is outside the action space Discrete({n_actions}): "
                f"expected 0..{n_actions - 1}",
                column="action",
                row=row,
            )

    logp = np.asarray(t.behavior_logp)
    if not np.issubdtype(logp.dtype, np.floating):
        raise err(
            f"dtype {logp.dtype} is not floating point; expected float32 (NaN = unknown)", "behavior_logp"
        )
    logp = logp.astype(np.float32, copy=False)
    unknown = np.isnan(logp)
    if unknown.any() and not unknown.all():
        row = int((unknown != unknown[0]).argmax())
        state = (
            "has no propensity but the first row has one"
            if unknown[row]
            else "has a propensity but the first row has none"
        )
        raise err(
            f"behavior_logp {state}: either every row has a behavior_logp or none does",
            column="behavior_logp",
            row=row,
        )
    if not unknown[0] and meta.is_continuous:
        # A log-density, not a log-probability: a narrow density exceeds 1, so positive values are fine.
        row = _first(np.isinf(logp))
        if row is not None:
            raise err(
                f"log-density {_fmt(logp[row])} is not finite: the behaviour policy's density at the "
                "logged action must be a finite number (NaN in every row = unknown)",
                column="behavior_logp",
                row=row,
            )
    elif not unknown[0]:
        row = _first(logp > 0)
        if row is not None:
            raise err(
                f"log-propensity {_fmt(logp[row])} > 0 means a probability above 1: "
                "behavior_logp must lie in (-inf, 0] (probability in (0, 1])",
                column="behavior_logp",
                row=row,
            )
        row = _first(np.isneginf(logp))
        if row is not None:
            raise err(
                "log-propensity -inf means the logged action had probability 0, which cannot have been "
                "chosen: behavior_logp must lie in (-inf, 0]",
                column="behavior_logp",
                row=row,
            )

    episode_id = _integer_column(np.asarray(t.episode_id), "episode_id", err)
    step = _integer_column(np.asarray(t.step), "step", err)
    row = _first(step < 0)
    if row is not None:
        raise err(f"step {step[row]} is negative", column="step", row=row)

    flags = {}
    for c in ("terminated", "truncated"):
        arr = np.asarray(getattr(t, c))
        if arr.dtype != np.bool_:
            if not np.issubdtype(arr.dtype, np.number) or not np.isin(arr, (0, 1)).all():
                raise err(f"dtype {arr.dtype} with values other than 0/1; expected bool", column=c)
            arr = arr.astype(np.bool_)
        flags[c] = arr

    same = episode_id[1:] == episode_id[:-1]
    starts = np.concatenate([[0], np.flatnonzero(~same) + 1])
    block_ids = episode_id[starts]
    order = np.argsort(block_ids, kind="stable")
    repeated = order[1:][block_ids[order[1:]] == block_ids[order[:-1]]]
    if repeated.size:
        row = int(starts[repeated.min()])
        raise err(
            f"episode_id {episode_id[row]} appears again after other episodes: the rows of an episode "
            "must be contiguous (grouped by episode, ordered by step)",
            column="episode_id",
            row=row,
        )
    row = _first(same & (step[1:] <= step[:-1]))
    if row is not None:
        raise err(
            f"step {step[row + 1]} follows step {step[row]} in episode_id {episode_id[row]}: "
            "steps must increase within an episode",
            column="step",
            row=row + 1,
        )
    terminated, truncated = flags["terminated"], flags["truncated"]
    row = _first(terminated & truncated)
    if row is not None:
        raise err(
            "terminated and truncated are both true: a transition ends an episode one way", "truncated", row
        )
    for c, arr in flags.items():
        row = _first(arr[:-1] & same)
        if row is not None:
            raise err(
                f"{c} is true but episode_id {episode_id[row]} continues in the next row", column=c, row=row
            )

    return Transitions(
        episode_id=episode_id,
        step=step,
        observation=obs_cols["observation"],
        action=action,
        reward=reward,
        next_observation=obs_cols["next_observation"],
        terminated=terminated,
        truncated=truncated,
        behavior_logp=logp,
        meta=meta,
    )


def _integer_column(
    arr: np.ndarray, column: str, err: Callable[[str, str | None, int | None], DatasetError]
) -> np.ndarray:
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64, copy=False)
    if np.issubdtype(arr.dtype, np.floating):
        # Some writers store whole numbers as floats; accept them, but never round a fraction away.
        with np.errstate(invalid="ignore"):
            row = _first(~np.isfinite(arr) | (arr != np.round(arr)))
        if row is not None:
            raise err(f"value {_fmt(arr[row])} is not an integer", column, row)
        return arr.astype(np.int64)
    raise err(f"dtype {arr.dtype} is not an integer type; expected int64", column, None)


BOUND_TOLERANCE = 1e-6
"""Relative slack on Box action bounds: float32 storage and ``mid + half * tanh(z)`` can land a hair
outside a bound. Within ``BOUND_TOLERANCE * max(|bound|, 1)`` an action is clipped onto the bound (the
floor of 1 keeps a bound at 0 from demanding exact arithmetic)."""


def bound_tolerance(bound: np.ndarray) -> np.ndarray:
    """How far outside ``bound`` an action may lie and still count as on it (see :data:`BOUND_TOLERANCE`)."""
    return BOUND_TOLERANCE * np.maximum(np.abs(bound), 1.0)


def _box_actions(
    arr: np.ndarray, meta: DatasetMeta, err: Callable[[str, str | None, int | None], DatasetError]
) -> np.ndarray:
    """Box actions as float32 [N, k]: finite and inside the bounds, values within rounding of a bound
    clipped onto it."""
    k = meta.action_dim
    low, high = meta.action_bounds()
    space = f"Box(low={_fmt_list(low)}, high={_fmt_list(high)})"
    if arr.ndim == 1 and k == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or arr.shape[1] != k:
        raise err(
            f"shape {arr.shape} does not match action_space shape {meta.action_space['shape']} "
            f"(expected ({arr.shape[0] if arr.ndim else 0}, {k}) for {space})",
            "action",
            None,
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise err(f"dtype {arr.dtype} is not numeric; expected float32 vectors for {space}", "action", None)
    values = arr.astype(np.float32, copy=False)
    finite = np.isfinite(values)
    row = _first(~np.all(finite, axis=1))
    if row is not None:
        j = int((~finite[row]).argmax())
        raise err(
            f"value {_fmt(values[row, j])} in dimension {j} is not finite; expected a number in "
            f"[{_fmt(low[j])}, {_fmt(high[j])}] ({space})",
            "action",
            row,
        )
    wide = values.astype(np.float64)
    outside = (wide < low - bound_tolerance(low)) | (wide > high + bound_tolerance(high))
    row = _first(outside.any(axis=1))
    if row is not None:
        j = int(outside[row].argmax())
        raise err(
            f"value {_fmt(values[row, j])} in dimension {j} is outside the action space: expected "
            f"[{_fmt(low[j])}, {_fmt(high[j])}] in that dimension ({space})",
            "action",
            row,
        )
    return np.clip(wide, low, high).astype(np.float32)


def _fmt_list(values: np.ndarray) -> str:
    return "[" + ", ".join(_fmt(float(v)) for v in values) + "]"


# --------------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------------

METADATA_KEY = DATASET_METADATA_KEY


def to_table(t: Transitions) -> pa.Table:
    """The Arrow table written to Parquet (unknown propensities become nulls)."""
    columns = {c: getattr(t, c) for c in DATASET_COLUMNS}
    table = transitions_table(t.meta.obs_dim, columns, action_dim=_action_dim(t.meta))
    return table.replace_schema_metadata({METADATA_KEY: t.meta.to_json().encode()})


def _action_dim(meta: DatasetMeta) -> int | None:
    """The contract's ``action_dim``: None for a Discrete (int64) action column, k for a Box one."""
    return meta.action_dim if meta.is_continuous else None


def save(t: Transitions, path: str | os.PathLike[str]) -> Path:
    """Validate and write ``t`` as one Parquet file, atomically.

    The bytes go to a temporary file in the same directory, are fsynced, and only then renamed over
    ``path``: a crash mid-write leaves the previous file (or nothing) at ``path``, never half a file.
    """
    target = Path(path)
    t = validate(t, path=str(target))
    return write_transitions(
        target, t.meta.obs_dim, t.meta.to_json(), to_table(t), action_dim=_action_dim(t.meta)
    )


_INT_COLUMNS = ("episode_id", "step", "action")
_FLOAT_COLUMNS = ("reward", "behavior_logp")
_BOOL_COLUMNS = ("terminated", "truncated")
_OBS_COLUMNS = ("observation", "next_observation")
_EXPECTED_TYPES = {
    "episode_id": "int64",
    "step": "int64",
    "observation": "fixed_size_list<float32>[obs_dim]",
    "action": "int64 (Discrete action space)",
    "reward": "float32",
    "next_observation": "fixed_size_list<float32>[obs_dim]",
    "terminated": "bool",
    "truncated": "bool",
    "behavior_logp": "float32 (null = unknown)",
}


def _read_part(file: Path) -> tuple[DatasetMeta, dict[str, np.ndarray], int]:
    """Read one Parquet file into numpy columns, checking structure, types and shapes."""
    name = str(file)
    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"not a readable Parquet file (truncated or corrupt?): {e}", path=name) from None
    metadata = table.schema.metadata or {}
    if METADATA_KEY not in metadata:
        raise DatasetError(
            "missing dataset metadata: the Parquet schema metadata has no 'rlops' key "
            "(was this file written by rlops data collect/import?)",
            path=name,
        )
    meta = meta_from_json(metadata[METADATA_KEY], path=name)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise DatasetError(
            f"missing column(s) {', '.join(missing)}; expected columns: {', '.join(COLUMNS)}", path=name
        )

    cols: dict[str, np.ndarray] = {}
    for c in COLUMNS:
        col = table.column(c)
        arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        typ = arr.type

        def bad_type(c: str = c, typ: pa.DataType = typ) -> DatasetError:
            expected = _EXPECTED_TYPES[c]
            if c == "action" and meta.is_continuous:
                expected = f"fixed_size_list<float32>[{meta.action_dim}] (Box action space)"
            return DatasetError(f"wrong type {typ}; expected {expected}", path=name, column=c)

        if c in _OBS_COLUMNS:
            cols[c] = _vector_column(arr, meta.obs_dim, meta.observation_space, name, c, bad_type)
            continue
        if c == "action" and meta.is_continuous and not (meta.action_dim == 1 and _is_number(typ)):
            # A Box action of one dimension may also be a plain number column; validate() reshapes it.
            cols[c] = _vector_column(arr, meta.action_dim, meta.action_space, name, c, bad_type)
            continue
        if c == "behavior_logp":
            if pa.types.is_null(typ):
                cols[c] = np.full(len(arr), np.nan, dtype=np.float32)
                continue
            if not pa.types.is_floating(typ):
                raise bad_type()
            cols[c] = arr.to_numpy(zero_copy_only=False).astype(np.float32)
            continue
        if arr.null_count:
            row = _first(np.asarray(arr.is_null()))
            raise DatasetError(
                "null value; this column must be set on every row", path=name, column=c, row=row
            )
        if c in _INT_COLUMNS:
            # Whole-valued float actions are checked (and accepted) by validate().
            float_ok = c == "action" and pa.types.is_floating(typ)
            if not (pa.types.is_integer(typ) or float_ok):
                raise bad_type()
        elif c in _FLOAT_COLUMNS:
            if not (pa.types.is_floating(typ) or pa.types.is_integer(typ)):
                raise bad_type()
        elif not pa.types.is_boolean(typ):
            raise bad_type()
        cols[c] = arr.to_numpy(zero_copy_only=False)
    return meta, cols, table.num_rows


def _is_number(typ: pa.DataType) -> bool:
    return bool(pa.types.is_floating(typ) or pa.types.is_integer(typ))


def _vector_column(
    arr: pa.Array,
    dim: int,
    space: dict[str, Any],
    name: str,
    c: str,
    bad_type: Callable[[], DatasetError],
) -> np.ndarray:
    """A list column of ``dim`` numbers per row (observations, Box actions) as float32 [N, dim]; fixed
    or variable-size lists are accepted as long as every row has ``dim`` values."""
    typ = arr.type
    if not (pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ) or pa.types.is_large_list(typ)):
        raise bad_type()
    if not _is_number(typ.value_type):
        raise bad_type()
    noun = "observation" if c in _OBS_COLUMNS else c
    if arr.null_count:
        row = _first(np.asarray(arr.is_null()))
        raise DatasetError(f"null {noun}", path=name, column=c, row=row)
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    row = _first(lengths != dim)
    if row is not None:
        kind = "observation_space" if c in _OBS_COLUMNS else "action_space"
        raise DatasetError(
            f"has {lengths[row]} values, expected {dim} ({kind} shape {space['shape']})",
            path=name,
            column=c,
            row=row,
        )
    values = arr.flatten()
    if values.null_count:
        row = int(np.asarray(values.is_null()).argmax()) // dim
        raise DatasetError(f"null value inside the {noun}", path=name, column=c, row=row)
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)


def load(path: str | os.PathLike[str]) -> Transitions:
    """Read and validate a dataset: one Parquet file, or a directory of Parquet part files (name order)."""
    root = Path(path)
    if not root.exists():
        raise DatasetError("no such file or directory", path=str(root))
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix == ".parquet" and p.is_file())
        if not files:
            raise DatasetError("directory holds no *.parquet part files", path=str(root))
    else:
        files = [root]

    metas: list[DatasetMeta] = []
    parts: list[dict[str, np.ndarray]] = []
    sizes: list[int] = []
    for file in files:
        meta, cols, n = _read_part(file)
        if metas and meta != metas[0]:
            raise DatasetError(
                f"dataset metadata differs from the first part file {files[0].name}: "
                "all parts of a dataset must share env, spaces, behaviour policy and source",
                path=str(file),
            )
        metas.append(meta)
        parts.append(cols)
        sizes.append(n)

    offsets = np.cumsum([0, *sizes])

    def locate(row: int) -> tuple[str | None, int]:
        i = int(np.searchsorted(offsets, row, side="right")) - 1
        return str(files[i]), row - int(offsets[i])

    columns = {c: parts[0][c] if len(parts) == 1 else np.concatenate([p[c] for p in parts]) for c in COLUMNS}
    t = Transitions(**columns, meta=metas[0])
    return validate(t, path=str(root), locate=locate)


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------

LOW_PROPENSITY = 0.05


_STAT_NAMES = ("mean", "std", "min", "p25", "median", "p75", "max")


def _stats(x: np.ndarray) -> dict[str, float]:
    q = np.percentile(x, [25, 50, 75]) if x.size else [np.nan] * 3
    return {
        "mean": float(np.mean(x)),
        "std": float(np.std(x)),
        "min": float(np.min(x)),
        "p25": float(q[0]),
        "median": float(q[1]),
        "p75": float(q[2]),
        "max": float(np.max(x)),
    }


def inspect(t: Transitions, bins: int = 10) -> dict[str, Any]:
    """A JSON-ready summary: sizes, returns, episode lengths, actions, propensity coverage, provenance.

    Discrete actions: counts and shares per action, and per action ``ess``, the effective sample size
    (Σw)²/Σw² of the importance weights w = [a_i = a] / p_i, i.e. how many rows' worth of evidence the
    data hold about the policy that always picks ``a``; ``ess_share`` divides it by the number of rows.

    Box actions: per dimension the statistics of the logged actions (raw units) and the share of rows on
    a bound (a saturated controller shows up there); the propensity section describes the logged
    log-densities, which have no per-action breakdown.
    """
    n = len(t)
    starts = t.episode_starts()
    returns = t.episode_returns()
    lengths = np.diff(np.append(starts, n))
    ends = np.append(starts[1:], n) - 1
    if returns.size:
        hist_counts, edges = np.histogram(returns, bins=bins)
    else:
        hist_counts, edges = np.zeros(0, int), np.zeros(0)
    known = ~np.isnan(t.behavior_logp)
    share_known = float(known.mean()) if n else 0.0
    if t.meta.is_continuous:
        actions, propensity = _box_action_summary(t, known, share_known)
    else:
        actions, propensity = _discrete_action_summary(t, known, share_known)

    summary = {
        "n_transitions": n,
        "n_episodes": int(starts.size) if n else 0,
        "returns": _stats(returns) if returns.size else None,
        "return_histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in hist_counts]},
        "episode_length": _stats(lengths.astype(np.float64)) if lengths.size else None,
        "episodes_terminated": int(t.terminated[ends].sum()) if n else 0,
        "episodes_truncated": int(t.truncated[ends].sum()) if n else 0,
        "actions": actions,
        "propensity": propensity,
        "env_id": t.meta.env_id,
        "observation_space": t.meta.observation_space,
        "action_space": t.meta.action_space,
        "behavior_policy": t.meta.behavior_policy,
        "source": t.meta.source,
        "schema_version": t.meta.schema_version,
        "extra": t.meta.extra,
        "fingerprint": t.fingerprint(),
    }
    return dict(_json_safe(summary))


def _discrete_action_summary(
    t: Transitions, known: np.ndarray, share_known: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    n = len(t)
    counts = np.bincount(t.action, minlength=t.meta.n_actions) if n else np.zeros(t.meta.n_actions, int)
    actions = {
        "counts": [int(c) for c in counts],
        "shares": [float(c) / n if n else 0.0 for c in counts],
    }
    propensity: dict[str, Any] = {"share_with_propensity": share_known, "kind": "probability"}
    if known.any():
        p = np.exp(t.behavior_logp[known].astype(np.float64))
        per_action = []
        for a in range(t.meta.n_actions):
            rows = known & (t.action == a)
            w = np.where(rows[known], 1.0 / p, 0.0)
            ess = float(w.sum() ** 2 / (w**2).sum()) if rows.any() else 0.0
            pa_ = p[rows[known]]
            per_action.append(
                {
                    "action": a,
                    "rows": int(rows.sum()),
                    "min_propensity": float(pa_.min()) if pa_.size else None,
                    "median_propensity": float(np.median(pa_)) if pa_.size else None,
                    "ess": ess,
                    "ess_share": ess / int(known.sum()),
                }
            )
        propensity |= {
            "min": float(p.min()),
            "median": float(np.median(p)),
            # The tolerance keeps an exact 0.05 (stored as float32 log) from counting as below it.
            f"share_below_{LOW_PROPENSITY}": float((p < LOW_PROPENSITY * (1 - 1e-6)).mean()),
            "per_action": per_action,
        }
    else:
        propensity |= {
            "min": None,
            "median": None,
            f"share_below_{LOW_PROPENSITY}": None,
            "per_action": [],
        }
    return actions, propensity


def _box_action_summary(
    t: Transitions, known: np.ndarray, share_known: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    low, high = t.meta.action_bounds()
    action = t.action.astype(np.float64).reshape(len(t), -1)
    on_bound = (action <= low + bound_tolerance(low)) | (action >= high - bound_tolerance(high))
    dimensions = [
        {
            "dimension": j,
            "low": float(low[j]),
            "high": float(high[j]),
            **(_stats(action[:, j]) if len(t) else dict.fromkeys(_STAT_NAMES)),
            "share_at_bound": float(on_bound[:, j].mean()) if len(t) else 0.0,
        }
        for j in range(t.meta.action_dim)
    ]
    logp = t.behavior_logp[known].astype(np.float64)
    propensity: dict[str, Any] = {
        "share_with_propensity": share_known,
        "kind": "log_density",
        "log_density": _stats(logp) if logp.size else None,
    }
    return {"dimensions": dimensions}, propensity
