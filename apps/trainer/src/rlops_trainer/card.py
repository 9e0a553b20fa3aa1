"""The model card: what a policy is, where it came from, and what serving should expect to see.

The card is plain JSON; its schema and cross-field rules are the artifact contract's
(:func:`rlops_contracts.card.validate_card`), the one place trainer and server agree on it. This module
builds the card of a trained policy. ``reference`` holds the training observations' per-feature statistics
and quantile bins, which serving compares live traffic against (population stability index), and the
logged actions: their proportions for a Discrete space, the same per-dimension statistics and bins as
the observations for a Box space (raw action units).
"""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rlops_contracts import MODEL_CARD_SCHEMA_VERSION, POLICY_FILE
from rlops_contracts.card import CardError

from rlops_trainer.datasets import Transitions

if TYPE_CHECKING:
    from rlops_trainer.training import TrainResult

N_BINS = 10
"""Quantile bins per observation feature in the reference statistics."""


def utc_now() -> str:
    """The current time as ISO 8601 UTC, the format of every timestamp in cards and registry files."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def jsonable(value: Any, where: str = "value") -> Any:
    """``value`` as strict JSON data: tuples become lists, paths strings, non-finite floats ``None``."""
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return jsonable(value.item(), where)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), where)
    if isinstance(value, Enum):
        return jsonable(value.value, where)
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value), where)
    if isinstance(value, dict):
        return {str(k): jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise CardError(f"{where}: cannot store a {type(value).__name__} in a model card (use JSON data)")


def _bound(x: float) -> float | str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(x)


def _feature_bins(column: np.ndarray) -> dict[str, list[float]]:
    """Quantile bins of one feature: interior edges plus the proportion of rows in each bin.

    Edges are taken from the data (``method="lower"``) and kept only above the minimum, so every
    bin holds at least one training row and a discrete feature gets one bin per observed value
    (up to ``N_BINS``).
    """
    qs = np.quantile(column, np.arange(1, N_BINS) / N_BINS, method="lower")
    edges = np.unique(qs[qs > column.min()])
    counts = np.bincount(np.searchsorted(edges, column, side="right"), minlength=len(edges) + 1)
    return {
        "edges": [float(e) for e in edges],
        "proportions": [float(c) for c in counts / len(column)],
    }


def _feature_stats(values: np.ndarray) -> dict[str, Any]:
    """Per-column mean, std, min, max and quantile bins of ``values`` ``[N, d]`` (the drift reference
    format, shared by observations and continuous actions)."""
    return {
        "n": len(values),
        "mean": [float(v) for v in values.mean(axis=0)],
        "std": [float(v) for v in values.std(axis=0)],
        "min": [float(v) for v in values.min(axis=0)],
        "max": [float(v) for v in values.max(axis=0)],
        "bins": [_feature_bins(values[:, j]) for j in range(values.shape[1])],
    }


def reference_stats(data: Transitions) -> dict[str, Any]:
    """Per-feature mean, std, min, max and quantile bins of the observations; for the actions their
    proportions (Discrete) or the same per-dimension statistics as the observations (Box, raw units)."""
    if len(data) == 0:
        raise CardError("reference statistics need at least one transition; the dataset is empty")
    obs = np.asarray(data.observation, dtype=np.float64).reshape(len(data), -1)
    if data.meta.is_continuous:
        actions = np.asarray(data.action, dtype=np.float64).reshape(len(data), -1)
        return {"observation": _feature_stats(obs), "actions": _feature_stats(actions)}
    counts = np.bincount(np.asarray(data.action, dtype=np.int64), minlength=data.meta.n_actions)
    return {
        "observation": _feature_stats(obs),
        "actions": {"n": len(data), "proportions": [float(c) for c in counts / len(data)]},
    }


def observation_space(data: Transitions) -> dict[str, Any]:
    space = data.meta.observation_space
    if space.get("type") != "Box":
        raise CardError(f"observation space must be a Box, got {space.get('type')!r}")
    dim = data.meta.obs_dim
    low = np.broadcast_to(np.asarray(space.get("low", -np.inf), dtype=np.float64), (dim,))
    high = np.broadcast_to(np.asarray(space.get("high", np.inf), dtype=np.float64), (dim,))
    return {
        "type": "Box",
        "shape": [int(s) for s in space["shape"]],
        "dtype": "float32",
        "low": [_bound(v) for v in low],
        "high": [_bound(v) for v in high],
    }


def action_space(data: Transitions) -> dict[str, Any]:
    space = data.meta.action_space
    if space.get("type") == "Discrete":
        return {"type": "Discrete", "n": data.meta.n_actions}
    if space.get("type") != "Box":
        raise CardError(f"action space must be Discrete or Box, got {space.get('type')!r}")
    low, high = data.meta.action_bounds()
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        # Serving squashes actions into the bounds: an unbounded Box has no squashing to record.
        raise CardError(
            f"a Box action space needs finite bounds, got low {low.tolist()} high {high.tolist()}"
        )
    return {
        "type": "Box",
        "shape": [data.meta.action_dim],
        "dtype": "float32",
        "low": [float(v) for v in low],
        "high": [float(v) for v in high],
    }


def selection(result: TrainResult, continuous: bool) -> dict[str, float]:
    """``policy.selection``: the arguments serving passes to the policy (``std`` only for Box policies,
    so discrete cards stay as they were)."""
    out = {
        "temperature": float(result.selection.temperature),
        "epsilon": float(result.selection.epsilon),
    }
    if continuous:
        out["std"] = float(result.selection.std)
    return out


def build_card(result: TrainResult, data: Transitions, name: str) -> dict[str, Any]:
    """The card of a freshly trained, unpublished policy; ``files`` is filled by the exporter."""
    now = utc_now()
    starts = data.episode_starts()
    return {
        "schema_version": MODEL_CARD_SCHEMA_VERSION,
        "name": name,
        "version": None,
        "created_at": now,
        "algorithm": result.algorithm,
        "hyperparameters": jsonable(result.config, "hyperparameters"),
        "dataset": {
            "fingerprint": result.dataset_fingerprint,
            "env_id": data.meta.env_id,
            "n_transitions": len(data),
            "n_episodes": len(starts),
            "source": data.meta.source,
            "behavior_policy": data.meta.behavior_policy,
        },
        "observation_space": observation_space(data),
        "action_space": action_space(data),
        "policy": {
            "file": POLICY_FILE,
            "score_kind": result.policy.score_kind,
            "input": {"dtype": "float32", "shape": [-1, data.meta.obs_dim]},
            "selection": selection(result, data.meta.is_continuous),
            "torch_version": torch.__version__,
        },
        "training": {
            "steps": int(result.steps),
            "wall_time_s": float(result.wall_time_s),
            "device": str(result.device),
            "final_metrics": jsonable(result.final_metrics, "final_metrics"),
        },
        "evaluation": None,
        "gate": None,
        "reference": reference_stats(data),
        "lineage": [
            {
                "event": "trained",
                "at": now,
                "algorithm": result.algorithm,
                "dataset_fingerprint": result.dataset_fingerprint,
                "steps": int(result.steps),
            }
        ],
        "files": {},
    }
