"""The transition dataset on disk: its Arrow schema and the one Parquet writer.

The columns are :data:`rlops_contracts.DATASET_COLUMNS`; the dataset's metadata (environment, spaces,
behaviour policy, source, schema version) is JSON in the Arrow schema's metadata under
:data:`rlops_contracts.DATASET_METADATA_KEY`. The trainer (collect, import) and the server's reward join
both write through :func:`write_transitions`, so the files are alike to the byte in layout; only the
trainer reads and validates them (``rlops_trainer.datasets``).
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


def arrow_schema(obs_dim: int, metadata_json: str | None = None) -> pa.Schema:
    """The dataset's Arrow schema for observations of ``obs_dim`` features."""
    obs = pa.list_(pa.float32(), obs_dim)
    types = {
        "episode_id": pa.int64(),
        "step": pa.int64(),
        "observation": obs,
        "action": pa.int64(),
        "reward": pa.float32(),
        "next_observation": obs,
        "terminated": pa.bool_(),
        "truncated": pa.bool_(),
        "behavior_logp": pa.float32(),
    }
    schema = pa.schema([pa.field(name, types[name]) for name in DATASET_COLUMNS])
    return schema.with_metadata({DATASET_METADATA_KEY: metadata_json.encode()}) if metadata_json else schema


def transitions_table(obs_dim: int, columns: dict[str, Any]) -> pa.Table:
    """An Arrow table of the dataset's columns from array-likes (one entry per transition; observations
    as rows of ``obs_dim`` values). An unknown ``behavior_logp`` (NaN or None) becomes null."""
    missing = [c for c in DATASET_COLUMNS if c not in columns]
    if missing:
        raise KeyError(f"transition columns missing: {', '.join(missing)}")
    schema = arrow_schema(obs_dim)

    def observations(values: Any) -> pa.Array:
        flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), type=pa.float32())
        return pa.FixedSizeListArray.from_arrays(flat, type=schema.field("observation").type)

    logp = np.asarray(columns["behavior_logp"], dtype=np.float32)
    arrays = {
        "episode_id": pa.array(np.asarray(columns["episode_id"], dtype=np.int64)),
        "step": pa.array(np.asarray(columns["step"], dtype=np.int64)),
        "observation": observations(columns["observation"]),
        "action": pa.array(np.asarray(columns["action"], dtype=np.int64)),
        "reward": pa.array(np.asarray(columns["reward"], dtype=np.float32)),
        "next_observation": observations(columns["next_observation"]),
        "terminated": pa.array(np.asarray(columns["terminated"], dtype=np.bool_)),
        "truncated": pa.array(np.asarray(columns["truncated"], dtype=np.bool_)),
        "behavior_logp": pa.array(logp, mask=np.isnan(logp)),
    }
    return pa.Table.from_arrays([arrays[c] for c in DATASET_COLUMNS], schema=schema)


def write_transitions(
    path: Path | str, obs_dim: int, metadata_json: str, tables: Iterable[pa.Table] | pa.Table
) -> Path:
    """Write one Parquet file of transitions, atomically, from one table or a stream of tables.

    The tables must have the dataset's columns (:func:`transitions_table`). A crash mid-write leaves the
    previous file (or nothing) at ``path``, never half a file.
    """
    schema = arrow_schema(obs_dim, metadata_json)
    if isinstance(tables, pa.Table):
        tables = [tables]
    with atomic_file(path) as f, pq.ParquetWriter(f, schema, compression=COMPRESSION) as writer:
        for table in tables:
            if table.num_rows:
                writer.write_table(table.replace_schema_metadata(schema.metadata))
    return Path(path)
