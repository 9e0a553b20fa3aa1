"""Join the decision log and the rewards into the transition dataset the trainer reads.

Inputs are the partitioned JSON-lines files of :mod:`rlops_server.decision_log` (decisions) and
:mod:`rlops_server.feedback` (rewards); only complete ``*.jsonl`` files are read, never a ``.tmp``.
The output is one Parquet file in the dataset format of ``rlops_contracts`` (``DATASET_COLUMNS``, with
the dataset metadata as JSON under ``DATASET_METADATA_KEY``).

The join, in three steps that run the same on one machine or on Ray Data (``use_ray=True``):

1. every line is parsed and checked; unreadable records are counted and skipped, with examples;
2. per ``decision_id``: the earliest decision and the earliest reward (by time, then content, so the
   choice is deterministic) are kept; duplicates are counted. A decision without a reward (yet) and a
   reward without a decision are counted and kept out of the output;
3. per episode (``episode_id``; a decision without one is a one-step episode): decisions ordered by
   step; one transition per rewarded decision with ``next_observation`` = the observation of the
   decision at the next step, or else the reward's ``next_observation``; a terminated step without
   one reuses its own observation (never bootstrapped from, since the episode ended there).
   Transitions after the end of an episode, a second decision at the same step and a step whose next
   observation is unknown are counted and dropped. ``behavior_logp`` = log(propensity) for Discrete
   actions; for Box actions (a list of floats per decision) it is the decision's ``log_density``,
   null when unknown (deterministic decisions, fallbacks), and the dataset's ``action`` column is
   ``fixed_size_list<float32>[k]``. A dataset has a ``behavior_logp`` on every row or on none: when
   some transitions have none, the others' are left out too (counted as ``dropped_logp``).

Episode ids become int64 by hashing the episode's key, so joining more data later keeps every
episode's id. Episodes are written in order of their first decision's time.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rlops_contracts import DATASET_COLUMNS, DATASET_SCHEMA_VERSION, MODEL_CARD_FILE
from rlops_contracts.card import ArtifactError, read_card
from rlops_contracts.dataset import transitions_table, write_transitions
from rlops_contracts.registry import default_registry

from rlops_server.decision_log import DECISIONS_STREAM, complete_files
from rlops_server.feedback import REWARDS_STREAM

SOURCE = "decision-log"
MAX_EXAMPLES = 5
_WRITE_EPISODES = 1000
"""Episodes per Parquet row group written."""

DECISION = "decision"
REWARD = "reward"
INVALID_DECISION = "invalid_decision"
INVALID_REWARD = "invalid_reward"

JOINED = "joined"
UNREWARDED = "unrewarded"
ORPHAN = "orphan"


class JoinError(ValueError):
    """The inputs cannot be joined as asked; the message says why and what would work."""


# --------------------------------------------------------------------------------------------------
# Step 1: parse and check records (one file at a time)
# --------------------------------------------------------------------------------------------------


def _canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _vector(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(_finite(v) for v in x)


def check_decision(raw: Any) -> dict[str, Any] | str:
    """The fields of a decision record the join needs, or a description of what is wrong."""
    if not isinstance(raw, dict):
        return f"expected a JSON object, got {type(raw).__name__}"
    problems = []
    if not isinstance(raw.get("decision_id"), str) or not raw["decision_id"]:
        problems.append(f"decision_id {raw.get('decision_id')!r} is not a non-empty string")
    if not _finite(raw.get("time")):
        problems.append(f"time {raw.get('time')!r} is not a number")
    if not isinstance(raw.get("policy"), str) or not raw["policy"]:
        problems.append(f"policy {raw.get('policy')!r} is not a non-empty string")
    version = raw.get("version")
    if version is not None and not (_int(version) or isinstance(version, str)):
        problems.append(f"version {version!r} is not an integer, a string or null")
    episode = raw.get("episode_id")
    if episode is not None and not (isinstance(episode, str) or _int(episode)):
        problems.append(f"episode_id {episode!r} is not a string, an integer or null")
    step = raw.get("step")
    if step is not None and not (_int(step) and step >= 0):
        problems.append(f"step {step!r} is not an integer >= 0 or null")
    if episode is not None and step is None:
        problems.append("episode_id is set but step is null: the episode cannot be ordered")
    if not _vector(raw.get("observation")):
        problems.append("observation is not a non-empty list of finite numbers")
    action: Any = raw.get("action")
    p: Any = raw.get("propensity")
    logp: Any = raw.get("log_density")
    if isinstance(action, list):
        # A Box decision: the action itself, its log-density when it was explored, no propensity.
        if not _vector(action):
            problems.append("action is a list but not a non-empty list of finite numbers")
        if p is not None:
            problems.append(f"propensity {p!r} is set for a Box action (a list); Box decisions have null")
        if logp is not None and not _finite(logp):
            problems.append(f"log_density {logp!r} is neither null nor a finite number")
    else:
        if not (_int(action) and action >= 0):
            problems.append(
                f"action {action!r} is neither an integer >= 0 (Discrete) nor a list of numbers (Box)"
            )
        if not (_finite(p) and 0 < p <= 1):
            problems.append(f"propensity {p!r} is not a probability in (0, 1]")
        if logp is not None:
            problems.append(
                f"log_density {logp!r} is set for a Discrete action; Discrete decisions have null"
            )
    if problems:
        return "; ".join(problems)
    return {
        "decision_id": raw["decision_id"],
        "time": float(raw["time"]),
        "policy": raw["policy"],
        "version": None if version is None else str(version),
        "episode_id": None if episode is None else str(episode),
        "step": 0 if step is None else step,
        "observation": [float(v) for v in raw["observation"]],
        "action": [float(v) for v in action] if isinstance(action, list) else action,
        # log of the chosen action's probability (Discrete) or density (Box); None when unknown.
        "logp": logp if isinstance(action, list) else math.log(p),
    }


def check_reward(raw: Any) -> dict[str, Any] | str:
    """The fields of a reward record the join needs, or a description of what is wrong."""
    if not isinstance(raw, dict):
        return f"expected a JSON object, got {type(raw).__name__}"
    problems = []
    if not isinstance(raw.get("decision_id"), str) or not raw["decision_id"]:
        problems.append(f"decision_id {raw.get('decision_id')!r} is not a non-empty string")
    if not _finite(raw.get("reward")):
        problems.append(f"reward {raw.get('reward')!r} is not a finite number")
    for key in ("terminated", "truncated"):
        if not isinstance(raw.get(key, False), bool):
            problems.append(f"{key} {raw.get(key)!r} is not true or false")
    if raw.get("terminated") is True and raw.get("truncated") is True:
        problems.append("terminated and truncated are both true")
    next_obs = raw.get("next_observation")
    if next_obs is not None and not _vector(next_obs):
        problems.append("next_observation is neither null nor a non-empty list of finite numbers")
    if not _finite(raw.get("time")):
        problems.append(f"time {raw.get('time')!r} is not a number")
    if problems:
        return "; ".join(problems)
    return {
        "decision_id": raw["decision_id"],
        "reward": float(raw["reward"]),
        "terminated": raw.get("terminated", False),
        "truncated": raw.get("truncated", False),
        "next_observation": None if next_obs is None else [float(v) for v in next_obs],
        "time": float(raw["time"]),
    }


def parse_file(path: str, kind: str) -> list[dict[str, str]]:
    """Rows ``{decision_id, kind, record}`` for every line of one file; ``record`` is canonical JSON of
    the checked record, or for an invalid line (``kind`` = ``invalid_…``) of its file, line and problem."""
    check = check_decision if kind == DECISION else check_reward
    rows = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                result = check(json.loads(line))
            except (ValueError, UnicodeDecodeError) as e:
                result = f"not JSON ({e})"
            if isinstance(result, str):
                where = {"file": path, "line": number, "problem": result}
                rows.append({"decision_id": "", "kind": "invalid_" + kind, "record": _canonical(where)})
            else:
                rows.append(
                    {"decision_id": result["decision_id"], "kind": kind, "record": _canonical(result)}
                )
    return rows


# --------------------------------------------------------------------------------------------------
# Step 2: one row per decision_id
# --------------------------------------------------------------------------------------------------

MERGED_SCHEMA = pa.schema(
    [
        ("decision_id", pa.string()),
        ("status", pa.string()),
        ("episode_key", pa.string()),
        ("policy", pa.string()),
        ("version", pa.string()),
        ("duplicate_decisions", pa.int64()),
        ("duplicate_rewards", pa.int64()),
        ("record", pa.string()),
    ]
)


def _earliest(records: list[str]) -> tuple[dict[str, Any] | None, int]:
    if not records:
        return None, 0
    parsed = sorted(((json.loads(r), r) for r in records), key=lambda pr: (pr[0]["time"], pr[1]))
    return parsed[0][0], len(records) - 1


def merge_group(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge the decision and reward rows of one ``decision_id`` into one row (see the module docstring)."""
    decision, dup_d = _earliest([r["record"] for r in rows if r["kind"] == DECISION])
    reward, dup_r = _earliest([r["record"] for r in rows if r["kind"] == REWARD])
    decision_id = rows[0]["decision_id"]
    if decision is None:
        status, merged, key, policy, version = ORPHAN, reward, "", "", ""
    else:
        status = UNREWARDED if reward is None else JOINED
        merged = dict(decision)
        if reward is not None:
            merged["reward"] = {
                k: reward[k] for k in ("reward", "terminated", "truncated", "next_observation")
            }
        episode = decision["episode_id"]
        key = f"e:{episode}" if episode is not None else f"d:{decision_id}"
        policy, version = decision["policy"], decision["version"] or ""
    return {
        "decision_id": decision_id,
        "status": status,
        "episode_key": key,
        "policy": policy,
        "version": version,
        "duplicate_decisions": dup_d,
        "duplicate_rewards": dup_r,
        "record": _canonical(merged or {}),
    }


# --------------------------------------------------------------------------------------------------
# Step 3: one row per episode, holding its transitions
# --------------------------------------------------------------------------------------------------

EPISODE_STATS = (
    "transitions",
    "step_conflicts",
    "no_next_observation",
    "after_episode_end",
    "mismatched",
    "unknown_logp",
)


def episode_schema(action_dim: int | None = None) -> pa.Schema:
    """Schema of the episode rows; ``action_dim`` None for Discrete actions, k for Box actions."""
    floats = pa.list_(pa.float32())
    return pa.schema(
        [
            ("episode_key", pa.string()),
            ("start", pa.float64()),
            ("episode_id", pa.int64()),
            ("step", pa.list_(pa.int64())),
            ("observation", pa.list_(floats)),
            ("action", pa.list_(pa.int64() if action_dim is None else floats)),
            ("reward", pa.list_(pa.float32())),
            ("next_observation", pa.list_(floats)),
            ("terminated", pa.list_(pa.bool_())),
            ("truncated", pa.list_(pa.bool_())),
            ("behavior_logp", pa.list_(pa.float32())),
            *[(s, pa.int64()) for s in EPISODE_STATS],
        ]
    )


def episode_int_id(key: str) -> int:
    """A stable non-negative int64 for an episode key (the same key gives the same id in every join)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def _fits(action: Any, n_actions: int, action_dim: int | None) -> bool:
    """Whether a checked decision's action belongs to the action space (Discrete n, or Box of k)."""
    if action_dim is None:
        return not isinstance(action, list) and action < n_actions
    return isinstance(action, list) and len(action) == action_dim


def build_episode(
    rows: Sequence[dict[str, Any]], obs_dim: int, n_actions: int, action_dim: int | None = None
) -> dict[str, Any]:
    """The transitions of one episode from its merged rows (joined and unrewarded decisions); with
    ``action_dim`` (k) the action space is Box and ``n_actions`` is not used."""
    key = rows[0]["episode_key"]
    records = sorted(
        (json.loads(r["record"]) for r in rows),
        # At one step prefer a rewarded decision, then the earliest: never a choice by input order.
        key=lambda d: (d["step"], "reward" not in d, d["time"], d["decision_id"]),
    )
    stats = dict.fromkeys(EPISODE_STATS, 0)
    kept: list[dict[str, Any]] = []
    for d in records:
        if kept and kept[-1]["step"] == d["step"]:
            stats["step_conflicts"] += 1
            continue
        if len(d["observation"]) != obs_dim or not _fits(d["action"], n_actions, action_dim):
            stats["mismatched"] += 1
            continue
        kept.append(d)
    cols: dict[str, list[Any]] = {c: [] for c in DATASET_COLUMNS if c != "episode_id"}
    ended = False
    for i, d in enumerate(kept):
        r = d.get("reward")
        if ended:
            stats["after_episode_end"] += 1
            continue
        if r is None:
            continue  # not rewarded (yet): its observation still serves the previous step
        following = kept[i + 1] if i + 1 < len(kept) and kept[i + 1]["step"] == d["step"] + 1 else None
        next_obs = r["next_observation"]
        if r["terminated"] or r["truncated"]:
            ended = True
            if next_obs is None and r["terminated"]:
                next_obs = d["observation"]
        elif following is not None:
            next_obs = following["observation"]
        if next_obs is None or len(next_obs) != obs_dim:
            stats["no_next_observation" if next_obs is None else "mismatched"] += 1
            continue
        cols["step"].append(d["step"])
        cols["observation"].append(d["observation"])
        cols["action"].append(d["action"])
        cols["reward"].append(r["reward"])
        cols["next_observation"].append(next_obs)
        cols["terminated"].append(r["terminated"])
        cols["truncated"].append(r["truncated"])
        cols["behavior_logp"].append(d["logp"])
        stats["unknown_logp"] += d["logp"] is None
    stats["transitions"] = len(cols["step"])
    return {
        "episode_key": key,
        "start": kept[0]["time"] if kept else records[0]["time"],
        "episode_id": episode_int_id(key),
        **cols,
        **stats,
    }


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def merge_batch(batch: pa.Table) -> pa.Table:
    """Ray Data ``map_groups`` wrapper of :func:`merge_group`."""
    return _table([merge_group(batch.to_pylist())], MERGED_SCHEMA)


def episode_batch(batch: pa.Table, obs_dim: int, n_actions: int, action_dim: int | None = None) -> pa.Table:
    """Ray Data ``map_groups`` wrapper of :func:`build_episode`."""
    return _table(
        [build_episode(batch.to_pylist(), obs_dim, n_actions, action_dim)], episode_schema(action_dim)
    )


# --------------------------------------------------------------------------------------------------
# Spaces and metadata
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spaces:
    """What the dataset metadata needs to know about the served policy."""

    env_id: str
    observation_space: dict[str, Any]
    action_space: dict[str, Any]

    @property
    def obs_dim(self) -> int:
        return int(math.prod(self.observation_space["shape"]))

    @property
    def n_actions(self) -> int:
        """Actions of a Discrete space; 0 for Box."""
        return int(self.action_space.get("n", 0))

    @property
    def action_dim(self) -> int | None:
        """k for a Box action space, None for Discrete (the dataset writer's ``action_dim``)."""
        return int(self.action_space["shape"][0]) if self.action_space["type"] == "Box" else None


def spaces_from_card(card: dict[str, Any], where: str) -> Spaces:
    try:
        obs, act = card["observation_space"], card["action_space"]
        env_id = card["dataset"]["env_id"]
        space = {
            "type": obs["type"],
            "shape": list(obs["shape"]),
            "low": list(obs["low"]),
            "high": list(obs["high"]),
        }
        if act["type"] == "Box":
            # The dataset metadata's Box action space: shape and finite bounds (no dtype: always float32).
            action: dict[str, Any] = {
                "type": "Box",
                "shape": list(act["shape"]),
                "low": [float(v) for v in act["low"]],
                "high": [float(v) for v in act["high"]],
            }
        else:
            action = {"type": act["type"], "n": int(act["n"])}
    except (KeyError, TypeError, ValueError) as e:
        raise JoinError(
            f"{where}: not a model card with observation_space, action_space and dataset.env_id ({e})"
        ) from None
    if space["type"] != "Box" or action["type"] not in ("Discrete", "Box"):
        raise JoinError(
            f"{where}: only Box observations and Discrete or Box actions are supported, got {obs} / {act}"
        )
    return Spaces(str(env_id), space, action)


def resolve_spaces(
    policy: str,
    versions: Sequence[str],
    *,
    registry: Path | None,
    env_id: str | None = None,
    obs_dim: int | None = None,
    n_actions: int | None = None,
) -> Spaces:
    """Spaces of the served versions from their model cards in ``registry``; or from the flags alone.

    With ``obs_dim`` and ``n_actions`` given, the registry is not read (unbounded Box observations);
    ``env_id`` overrides the card's ``dataset.env_id``.
    """
    if obs_dim is not None or n_actions is not None:
        if obs_dim is None or n_actions is None or env_id is None:
            raise JoinError("give --env-id, --obs-dim and --n-actions together, or none of them")
        if obs_dim < 1 or n_actions < 1:
            raise JoinError(f"--obs-dim and --n-actions must be positive, got {obs_dim} and {n_actions}")
        box = {"type": "Box", "shape": [obs_dim], "low": ["-inf"] * obs_dim, "high": ["inf"] * obs_dim}
        return Spaces(env_id, box, {"type": "Discrete", "n": n_actions})
    root = registry if registry is not None else default_registry()
    found: dict[str, Spaces] = {}
    for v in versions:
        card_path = root / policy / v / MODEL_CARD_FILE
        if not v or not card_path.is_file():
            label = f"{policy}@{v}" if v else f"{policy} (decisions without a version)"
            raise JoinError(
                f"no model card for {label} at {card_path}: pass --registry DIR holding that version, "
                "or --env-id, --obs-dim and --n-actions"
            )
        try:
            card = read_card(card_path.parent)
        except (OSError, ArtifactError) as e:
            raise JoinError(f"{card_path}: cannot read the model card ({e})") from None
        found[v] = spaces_from_card(card, str(card_path))
    first_v, first = next(iter(found.items()))
    for v, s in found.items():
        if (s.observation_space, s.action_space) != (first.observation_space, first.action_space):
            raise JoinError(
                f"{policy}@{v} and {policy}@{first_v} have different observation or action spaces; "
                "join their decisions into separate datasets"
            )
        if s.env_id != first.env_id and env_id is None:
            raise JoinError(
                f"{policy}@{v} was trained for {s.env_id!r} but {policy}@{first_v} for {first.env_id!r}; "
                "pass --env-id to name the environment the decisions were made in"
            )
    return Spaces(env_id or first.env_id, first.observation_space, first.action_space)


def _version_order(v: str) -> tuple[int, int | str]:
    return (0, int(v)) if v.isdigit() else (1, v)


def dataset_metadata(spaces: Spaces, policy: str, versions: Sequence[str], stats: dict[str, int]) -> str:
    """The dataset metadata JSON (the keys that rlops_trainer.datasets reads; same canonical form)."""
    meta = {
        "env_id": spaces.env_id,
        "observation_space": spaces.observation_space,
        "action_space": spaces.action_space,
        "behavior_policy": f"served:{policy}@{','.join(versions) or 'unversioned'}",
        "source": SOURCE,
        "schema_version": DATASET_SCHEMA_VERSION,
        "extra": {"join": stats},
    }
    return json.dumps(meta, sort_keys=True, allow_nan=False)


# --------------------------------------------------------------------------------------------------
# The join
# --------------------------------------------------------------------------------------------------


@dataclass
class JoinStats:
    """What the join read, kept and left out, and why."""

    decision_files: int = 0
    reward_files: int = 0
    decisions: int = 0
    rewards: int = 0
    invalid_decisions: int = 0
    invalid_rewards: int = 0
    duplicate_decisions: int = 0
    duplicate_rewards: int = 0
    unrewarded_decisions: int = 0
    orphan_rewards: int = 0
    other_policy: int = 0
    step_conflicts: int = 0
    no_next_observation: int = 0
    after_episode_end: int = 0
    mismatched: int = 0
    unknown_logp: int = 0
    """Transitions whose decision has no log-propensity (Box decisions served deterministically)."""
    dropped_logp: int = 0
    """Log-propensities left out because other transitions have none: a dataset has all or none."""
    transitions: int = 0
    episodes: int = 0
    policy: str = ""
    versions: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    """Where and why the first invalid records were skipped."""

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if isinstance(v, int)}


def input_files(directory: Path, stream: str) -> list[Path]:
    """Complete files under ``directory/<stream>`` when that exists (a log root), else under ``directory``."""
    if not directory.is_dir():
        raise JoinError(f"{directory}: no such directory")
    sub = directory / stream
    return complete_files(sub if sub.is_dir() else directory)


def _merged_summary(stats: JoinStats, rows: Iterable[dict[str, Any]]) -> dict[str, Counter[str]]:
    """Counts from the merged rows; returns the decisions per policy and version."""
    seen: dict[str, Counter[str]] = defaultdict(Counter)
    for r in rows:
        stats.duplicate_decisions += r["duplicate_decisions"]
        stats.duplicate_rewards += r["duplicate_rewards"]
        if r["status"] == ORPHAN:
            stats.orphan_rewards += 1
            continue
        if r["status"] == UNREWARDED:
            stats.unrewarded_decisions += 1
        seen[r["policy"]][r["version"]] += 1
    return seen


def _choose_policy(seen: dict[str, Counter[str]], policy: str | None) -> tuple[str, list[str]]:
    if policy is None:
        if len(seen) != 1:
            names = ", ".join(sorted(seen)) or "none"
            raise JoinError(f"the decisions come from several policies ({names}): choose one with --policy")
        policy = next(iter(seen))
    elif policy not in seen:
        raise JoinError(
            f"no decisions of policy {policy!r}; policies found: {', '.join(sorted(seen)) or 'none'}"
        )
    return policy, sorted(seen[policy], key=_version_order)


def join(
    decisions: Path,
    rewards: Path,
    out: Path,
    *,
    policy: str | None = None,
    registry: Path | None = None,
    env_id: str | None = None,
    obs_dim: int | None = None,
    n_actions: int | None = None,
    use_ray: bool = False,
) -> JoinStats:
    """Join and write ``out`` (atomically). Raises :class:`JoinError` when nothing can be written."""
    d_files = input_files(decisions, DECISIONS_STREAM)
    r_files = input_files(rewards, REWARDS_STREAM)
    stats = JoinStats(decision_files=len(d_files), reward_files=len(r_files))
    if not d_files:
        raise JoinError(f"{decisions}: no complete decision files (*.jsonl) found")
    runner: _LocalJoin | _RayJoin = _RayJoin() if use_ray else _LocalJoin()
    runner.read(d_files, r_files, stats)
    seen = _merged_summary(stats, runner.merged_summary_rows())
    chosen, versions = _choose_policy(seen, policy)
    stats.other_policy = sum(n for p, c in seen.items() if p != chosen for n in c.values())
    stats.policy, stats.versions = chosen, versions
    spaces = resolve_spaces(
        chosen, versions, registry=registry, env_id=env_id, obs_dim=obs_dim, n_actions=n_actions
    )
    runner.build_episodes(chosen, spaces)
    _account(stats, runner.episode_summaries())
    if not stats.transitions:
        raise JoinError(
            f"no transitions to write: {stats.decisions} decisions and {stats.rewards} rewards were read; "
            f"{stats.unrewarded_decisions} decisions have no reward yet, {stats.orphan_rewards} rewards have "
            f"no decision, {stats.no_next_observation} steps lack a next observation"
        )
    # The dataset contract: every row has a behavior_logp or none does. Logs that mix explored and
    # deterministic Box decisions lose the densities they have (counted), not the transitions.
    drop_logp = 0 < stats.unknown_logp < stats.transitions
    if drop_logp:
        stats.dropped_logp = stats.transitions - stats.unknown_logp
    meta = dataset_metadata(spaces, chosen, versions, stats.counts())
    _write(out, runner.episode_batches(), spaces.obs_dim, meta, spaces.action_dim, drop_logp)
    return stats


def _example(record: str) -> str:
    where = json.loads(record)
    return f"{where['file']}:{where['line']}: {where['problem']}"


def _account(stats: JoinStats, summaries: Iterable[dict[str, Any]]) -> None:
    ids: dict[int, str] = {}
    for e in summaries:
        for s in EPISODE_STATS:
            setattr(stats, s, getattr(stats, s) + e[s])
        if e["transitions"]:
            stats.episodes += 1
        other = ids.setdefault(e["episode_id"], e["episode_key"])
        if other != e["episode_key"]:
            raise JoinError(f"episodes {other!r} and {e['episode_key']!r} hash to the same int64 id")


class _LocalJoin:
    """The join in this process."""

    def read(self, d_files: list[Path], r_files: list[Path], stats: JoinStats) -> None:
        groups: dict[str, list[dict[str, str]]] = defaultdict(list)
        for files, kind in ((d_files, DECISION), (r_files, REWARD)):
            for f in files:
                for row in parse_file(str(f), kind):
                    if row["kind"] == DECISION:
                        stats.decisions += 1
                    elif row["kind"] == REWARD:
                        stats.rewards += 1
                    else:
                        if row["kind"] == INVALID_DECISION:
                            stats.invalid_decisions += 1
                        else:
                            stats.invalid_rewards += 1
                        if len(stats.examples) < MAX_EXAMPLES:
                            stats.examples.append(_example(row["record"]))
                        continue
                    groups[row["decision_id"]].append(row)
        self.merged = [merge_group(g) for g in groups.values()]

    def merged_summary_rows(self) -> Iterable[dict[str, Any]]:
        return self.merged

    def build_episodes(self, policy: str, spaces: Spaces) -> None:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in self.merged:
            if row["status"] == ORPHAN:
                continue
            if row["policy"] != policy:
                continue
            groups[row["episode_key"]].append(row)
        built = [
            build_episode(g, spaces.obs_dim, spaces.n_actions, spaces.action_dim) for g in groups.values()
        ]
        built.sort(key=lambda e: (e["start"], e["episode_key"]))
        self.built = built

    def episode_summaries(self) -> Iterable[dict[str, Any]]:
        return self.built

    def episode_batches(self) -> Iterator[list[dict[str, Any]]]:
        for start in range(0, len(self.built), _WRITE_EPISODES):
            yield self.built[start : start + _WRITE_EPISODES]


class _RayJoin:
    """The same three steps on Ray Data: parse per file, group by decision_id, group by episode.

    Filters run on Arrow batches with an explicit schema: Ray's hash shuffle cannot sort an empty block
    that lost its columns, which a row filter leaves behind when a whole block is dropped.
    """

    def read(self, d_files: list[Path], r_files: list[Path], stats: JoinStats) -> None:
        import ray

        if not ray.is_initialized():
            # RAY_ADDRESS (when set) points at a cluster; otherwise this starts a local instance.
            ray.init(log_to_driver=False)
        items = [{"path": str(f), "kind": DECISION} for f in d_files]
        items += [{"path": str(f), "kind": REWARD} for f in r_files]
        rows = ray.data.from_items(items).map_batches(_parse_items, batch_size=1, batch_format="pyarrow")
        rows = rows.materialize()
        kinds: Counter[str] = Counter()
        for batch in rows.select_columns(["kind"]).iter_batches(batch_format="pyarrow"):
            kinds.update(batch["kind"].to_pylist())
        stats.decisions = kinds.get(DECISION, 0)
        stats.rewards = kinds.get(REWARD, 0)
        stats.invalid_decisions = kinds.get(INVALID_DECISION, 0)
        stats.invalid_rewards = kinds.get(INVALID_REWARD, 0)
        if stats.invalid_decisions or stats.invalid_rewards:
            rank = {str(f): i for i, f in enumerate(d_files + r_files)}
            invalid = rows.map_batches(_keep_invalid, batch_format="pyarrow", fn_kwargs={"invalid": True})
            bad = [json.loads(r["record"]) for r in invalid.take(50 * MAX_EXAMPLES)]
            bad.sort(key=lambda w: (rank.get(w["file"], len(rank)), w["line"]))
            stats.examples = [_example(_canonical(w)) for w in bad[:MAX_EXAMPLES]]
        valid = rows.map_batches(_keep_invalid, batch_format="pyarrow", fn_kwargs={"invalid": False})
        self.partitions = _partitions(stats.decisions + stats.rewards)
        self.merged = (
            valid.groupby("decision_id", num_partitions=self.partitions)
            .map_groups(merge_batch, batch_format="pyarrow")
            .materialize()
        )

    def merged_summary_rows(self) -> Iterable[dict[str, Any]]:
        columns = ["status", "policy", "version", "duplicate_decisions", "duplicate_rewards"]
        for batch in self.merged.select_columns(columns).iter_batches(batch_format="pyarrow"):
            yield from batch.to_pylist()

    def build_episodes(self, policy: str, spaces: Spaces) -> None:
        mine = self.merged.map_batches(_keep_policy, batch_format="pyarrow", fn_kwargs={"policy": policy})
        self.built = (
            mine.groupby("episode_key", num_partitions=self.partitions)
            .map_groups(
                episode_batch,
                batch_format="pyarrow",
                fn_kwargs={
                    "obs_dim": spaces.obs_dim,
                    "n_actions": spaces.n_actions,
                    "action_dim": spaces.action_dim,
                },
            )
            .sort(["start", "episode_key"])
            .materialize()
        )

    def episode_summaries(self) -> Iterable[dict[str, Any]]:
        columns = ["episode_id", "episode_key", *EPISODE_STATS]
        for batch in self.built.select_columns(columns).iter_batches(batch_format="pyarrow"):
            yield from batch.to_pylist()

    def episode_batches(self) -> Iterator[list[dict[str, Any]]]:
        for batch in self.built.iter_batches(batch_format="pyarrow", batch_size=_WRITE_EPISODES):
            yield batch.to_pylist()


ROW_SCHEMA = pa.schema([("decision_id", pa.string()), ("kind", pa.string()), ("record", pa.string())])


def _partitions(n_records: int) -> int:
    # Ray's default (200 shuffle partitions) is sized for clusters; small joins need only a few.
    return max(2, min(200, n_records // 50_000))


def _parse_items(items: pa.Table) -> pa.Table:
    rows = [row for item in items.to_pylist() for row in parse_file(item["path"], item["kind"])]
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def _keep_invalid(batch: pa.Table, invalid: bool) -> pa.Table:
    mask = pc.starts_with(batch["kind"], "invalid_")
    return batch.filter(mask if invalid else pc.invert(mask))


def _keep_policy(batch: pa.Table, policy: str) -> pa.Table:
    """Rows with a decision of ``policy``."""
    return batch.filter(pc.and_(pc.not_equal(batch["status"], ORPHAN), pc.equal(batch["policy"], policy)))


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _transitions_table(
    episodes: list[dict[str, Any]], obs_dim: int, action_dim: int | None, drop_logp: bool = False
) -> pa.Table:
    lengths = [e["transitions"] for e in episodes]

    def flat(column: str) -> list[Any]:
        return [v for e in episodes for v in e[column]]

    columns: dict[str, Any] = {c: flat(c) for c in DATASET_COLUMNS if c != "episode_id"}
    columns["episode_id"] = np.repeat([e["episode_id"] for e in episodes], lengths)
    if drop_logp:
        columns["behavior_logp"] = [None] * len(columns["behavior_logp"])
    return transitions_table(obs_dim, columns, action_dim=action_dim)


def _write(
    out: Path,
    batches: Iterable[list[dict[str, Any]]],
    obs_dim: int,
    meta: str,
    action_dim: int | None,
    drop_logp: bool = False,
) -> None:
    """Stream the episodes into one Parquet file of the dataset format, written atomically."""
    tables = (
        _transitions_table(kept, obs_dim, action_dim, drop_logp)
        for episodes in batches
        if (kept := [e for e in episodes if e["transitions"]])
    )
    write_transitions(out, obs_dim, meta, tables, action_dim=action_dim)
