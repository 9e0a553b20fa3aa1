"""The transition dataset on disk: its Arrow schema and the one Parquet writer.

The columns are :data:`rlops_contracts.DATASET_COLUMNS`; the dataset's metadata (environment, spaces,
behaviour policy, source, schema version) is JSON in the Arrow schema's metadata under
:data:`rlops_contracts.DATASET_METADATA_KEY`. The trainer (collect, import) and the server's reward join
both write through :func:`write_transitions`, so the files are alike to the byte in layout; only the
trainer reads and validates them (``rlops_trainer.datasets``).

The ``action`` column depends on the action space: ``int64`` for Discrete actions (``action_dim=None``),
``fixed_size_list<float32>[k]`` for Box actions of ``k`` dimensions (``action_dim=k``, raw action units).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rlops_contracts import DATASET_COLUMNS, DATASET_METADATA_KEY
from rlops_contracts.durable import atomic_file

COMPRESSION = "zstd"


def _check_action_dim(action_dim: int | None) -> None:
    if action_dim is not None and (
        isinstance(action_dim, bool) or not isinstance(action_dim, int) or action_dim < 1
    ):
        raise ValueError(
            "action_dim must be None (Discrete actions) or a positive integer (Box actions), "
            f"got {action_dim!r}"
        )


def arrow_schema(
    obs_dim: int, metadata_json: str | None = None, *, action_dim: int | None = None
) -> pa.Schema:
    """The dataset's Arrow schema for observations of ``obs_dim`` features and actions that are integers
    (``action_dim=None``, Discrete) or vectors of ``action_dim`` floats (Box)."""
    _check_action_dim(action_dim)
    obs = pa.list_(pa.float32(), obs_dim)
    types = {
        "episode_id": pa.int64(),
        "step": pa.int64(),
        "observation": obs,
        "action": pa.int64() if action_dim is None else pa.list_(pa.float32(), action_dim),
        "reward": pa.float32(),
        "next_observation": obs,
        "terminated": pa.bool_(),
        "truncated": pa.bool_(),
        "behavior_logp": pa.float32(),
    }
    schema = pa.schema([pa.field(name, types[name]) for name in DATASET_COLUMNS])
    return schema.with_metadata({DATASET_METADATA_KEY: metadata_json.encode()}) if metadata_json else schema


def transitions_table(obs_dim: int, columns: dict[str, Any], *, action_dim: int | None = None) -> pa.Table:
    """An Arrow table of the dataset's columns from array-likes (one entry per transition; observations
    as rows of ``obs_dim`` values; Box actions, ``action_dim=k``, as rows of ``k`` values). An unknown
    ``behavior_logp`` (NaN or None) becomes null."""
    missing = [c for c in DATASET_COLUMNS if c not in columns]
    if missing:
        raise KeyError(f"transition columns missing: {', '.join(missing)}")
    schema = arrow_schema(obs_dim, action_dim=action_dim)

    def vectors(values: Any, column: str) -> pa.Array:
        flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), type=pa.float32())
        return pa.FixedSizeListArray.from_arrays(flat, type=schema.field(column).type)

    logp = np.asarray(columns["behavior_logp"], dtype=np.float32)
    arrays = {
        "episode_id": pa.array(np.asarray(columns["episode_id"], dtype=np.int64)),
        "step": pa.array(np.asarray(columns["step"], dtype=np.int64)),
        "observation": vectors(columns["observation"], "observation"),
        "action": (
            pa.array(np.asarray(columns["action"], dtype=np.int64))
            if action_dim is None
            else vectors(columns["action"], "action")
        ),
        "reward": pa.array(np.asarray(columns["reward"], dtype=np.float32)),
        "next_observation": vectors(columns["next_observation"], "next_observation"),
        "terminated": pa.array(np.asarray(columns["terminated"], dtype=np.bool_)),
        "truncated": pa.array(np.asarray(columns["truncated"], dtype=np.bool_)),
        "behavior_logp": pa.array(logp, mask=np.isnan(logp)),
    }
    return pa.Table.from_arrays([arrays[c] for c in DATASET_COLUMNS], schema=schema)


def write_transitions(
    path: Path | str,
    obs_dim: int,
    metadata_json: str,
    tables: Iterable[pa.Table] | pa.Table,
    *,
    action_dim: int | None = None,
) -> Path:
    """Write one Parquet file of transitions, atomically, from one table or a stream of tables.

    The tables must have the dataset's columns (:func:`transitions_table` with the same ``action_dim``).
    A crash mid-write leaves the previous file (or nothing) at ``path``, never half a file.
    """
    schema = arrow_schema(obs_dim, metadata_json, action_dim=action_dim)
    if isinstance(tables, pa.Table):
        tables = [tables]
    with atomic_file(path) as f, pq.ParquetWriter(f, schema, compression=COMPRESSION) as writer:
        for table in tables:
            if table.num_rows:
                writer.write_table(table.replace_schema_metadata(schema.metadata))
    return Path(path)
