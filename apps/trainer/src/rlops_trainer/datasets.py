"""The transition dataset: one row per transition, stored as Parquet.

Columns and metadata follow the dataset contract in DESIGN.md. Everything that loads data
returns a validated :class:`Transitions`; everything that writes data takes one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

COLUMNS: tuple[str, ...] = (
    "episode_id",
    "step",
    "observation",
    "action",
    "reward",
    "next_observation",
    "terminated",
    "truncated",
    "behavior_logp",
)


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
    """``{"type": "Box", "shape": [d], "low": [...], "high": [...]}`` (bounds may be ±inf)."""
    action_space: dict[str, Any]
    """``{"type": "Discrete", "n": n}``; continuous action spaces come later."""
    behavior_policy: str
    """Human-readable description of the policy that chose the logged actions."""
    source: str
    """Where the data came from: ``collect``, ``d4rl-hdf5:<file>``, ``minari:<id>``…"""
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def obs_dim(self) -> int:
        return int(np.prod(self.observation_space["shape"]))

    @property
    def n_actions(self) -> int:
        return int(self.action_space["n"])


@dataclass
class Transitions:
    """A validated dataset held in memory as numpy arrays (one entry per transition)."""

    episode_id: np.ndarray  # int64 [N]
    step: np.ndarray  # int64 [N]
    observation: np.ndarray  # float32 [N, obs_dim]
    action: np.ndarray  # int64 [N]
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
