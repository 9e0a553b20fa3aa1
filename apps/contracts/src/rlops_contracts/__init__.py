"""What the trainer and the server agree on, written down once.

A policy version is a directory holding :data:`POLICY_FILE` (TorchScript) and :data:`MODEL_CARD_FILE`
(JSON, valid against the ``model-card`` schema). Aliases such as :data:`CHAMPION` point at versions.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

POLICY_FILE = "policy.pt"
MODEL_CARD_FILE = "model-card.json"

CHAMPION = "champion"
CANDIDATE = "candidate"
ALIASES: tuple[str, ...] = (CHAMPION, CANDIDATE)

# The transition dataset: Parquet, one row per transition (rlops_contracts.dataset), dataset metadata as
# JSON in the schema metadata under DATASET_METADATA_KEY. Written by the trainer (collect, import) and
# by the server's reward join; read by the trainer.
DATASET_SCHEMA_VERSION = 1
DATASET_METADATA_KEY = b"rlops"
DATASET_COLUMNS: dict[str, str] = {
    "episode_id": "int64",
    "step": "int64",
    "observation": "list<float32>[obs_dim]",
    "action": "int64 (Discrete) or list<float32>[action_dim] (Box)",
    "reward": "float32",
    "next_observation": "list<float32>[obs_dim]",
    "terminated": "bool",
    "truncated": "bool",
    "behavior_logp": "float32, null when unknown",
}

# The decision log: one JSON record per decision, written by serving (rlops_server.decision_log); the
# rewards that arrive later, keyed by decision_id. The reward join turns both into the dataset above.
DECISION_FIELDS: tuple[str, ...] = (
    "decision_id",  # str: the client's id, or a uuid4 made by the server
    "time",  # float: unix seconds when the decision was made
    "policy",  # str: policy name
    "version",  # int: registry version that decided
    "episode_id",  # str | null
    "step",  # int | null: position in the episode
    "observation",  # list[float]: the raw observation
    "action",  # int (Discrete) | list[float] (Box, raw action units): the action answered
    "propensity",  # float | null: probability of that action under the served distribution; null for Box
    "log_density",  # float | null: Box only, log-density of the action under the served (squashed
    #                 Gaussian) distribution; null when deterministic (std 0), on the fallback, for Discrete
    "temperature",  # float | null: exploration setting used (<= 0 means greedy); null for Box
    "epsilon",  # float | null: exploration setting used; null for Box
    "std",  # float | null: Box only, exploration noise before the tanh squashing (0: deterministic)
    "action_mask",  # list[bool | int] | null: Discrete only
    "fallback",  # bool: the action came from the fallback path
)
REWARD_FIELDS: tuple[str, ...] = (
    "decision_id",  # str: the decision this reward belongs to
    "reward",  # float
    "terminated",  # bool: the episode ended in a terminal state after this decision
    "truncated",  # bool: the episode was cut off (time limit) after this decision
    "next_observation",  # list[float] | null: required for the last step of an episode
    "time",  # float: unix seconds when the feedback service received the reward
    "policy",  # str | null: optional, only labels the live metrics
    "version",  # int | str | null: optional, only labels the live metrics
)

MODEL_CARD_SCHEMA = "model-card"
MODEL_CARD_SCHEMA_VERSION = 1

_SUFFIX = ".schema.json"


def schema_names() -> list[str]:
    """Names accepted by :func:`load_schema`."""
    files = resources.files(__name__)
    return sorted(p.name.removesuffix(_SUFFIX) for p in files.iterdir() if p.name.endswith(_SUFFIX))


def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) called ``name``, e.g. ``load_schema("model-card")``."""
    names = schema_names()
    if name not in names:
        raise KeyError(f"unknown schema {name!r}; known schemas: {', '.join(names)}")
    text = resources.files(__name__).joinpath(name + _SUFFIX).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
