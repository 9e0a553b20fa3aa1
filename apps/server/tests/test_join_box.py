"""The reward join for Box policies: float-vector actions, behavior_logp from log_density, the
fixed-size-list action column, and records of the wrong kind refused with their file and line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rlops_server.decision_log import DecisionLog
from rlops_server.feedback import REWARD_FILE_PREFIX, REWARDS_STREAM
from rlops_server.join import build_episode, check_decision, join
from server_testkit import BOX_HIGH, BOX_LOW, make_box_card, make_card


def decision(did: str, step: int, t: float, **extra: Any) -> dict[str, Any]:
    return {
        "decision_id": did,
        "time": t,
        "policy": "reacher",
        "version": 1,
        "episode_id": "ep-1",
        "step": step,
        "observation": [float(step), 0.5, -0.5, 0.0],
        "action": [0.1 * step, 2.0 + 0.5 * step],
        "propensity": None,
        "log_density": -1.0 - step,
        "temperature": None,
        "epsilon": None,
        "std": 0.3,
        "action_mask": None,
        "fallback": False,
        **extra,
    }


def reward(did: str, t: float, **extra: Any) -> dict[str, Any]:
    base = {"decision_id": did, "reward": 1.0, "terminated": False, "truncated": False}
    return {**base, "next_observation": None, "time": t, **extra}


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    root = tmp_path / "logs"
    decisions = [decision(f"d{s}", s, 100 + s) for s in range(4)]
    decisions[2]["log_density"] = None  # a deterministic (or fallback) decision: behaviour density unknown
    decisions[2]["std"] = 0.0
    rewards = [reward(f"d{s}", 200 + s, terminated=s == 3) for s in range(4)]
    with DecisionLog(root) as log:
        for d in decisions:
            log.write(d)
    with DecisionLog(root, stream=REWARDS_STREAM, file_prefix=REWARD_FILE_PREFIX) as log:
        for r in rewards:
            log.write(r)
    day = next((root / "decisions").glob("date=*"))
    bad = [
        decision("m1", 9, 1, propensity=0.5),  # a Box action with a propensity
        decision("m2", 9, 1, action=1, propensity=0.5),  # a Discrete action with a log-density
        decision("m3", 9, 1, action=[0.1, float("nan")]),
        decision("m4", 9, 1, log_density="high"),
    ]
    (day / "handmade.jsonl").write_text("\n".join(json.dumps(b) for b in bad) + "\n")
    return root


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    d = tmp_path / "registry" / "reacher" / "1"
    d.mkdir(parents=True)
    (d / "model-card.json").write_text(json.dumps(make_box_card("reacher", 1, "sha256:" + "1" * 64)))
    return tmp_path / "registry"


def test_box_decisions_join_into_a_box_dataset(logs: Path, registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "box.parquet"
    stats = join(logs, logs, out, policy="reacher", registry=registry)
    assert (stats.transitions, stats.invalid_decisions, stats.mismatched) == (4, 4, 0)
    table = pq.read_table(out)
    assert table.schema.field("action").type == pa.list_(pa.float32(), 2)
    rows = table.to_pylist()
    assert [r["action"] for r in rows] == [
        pytest.approx([0.1 * s, 2.0 + 0.5 * s], rel=1e-6) for s in range(4)
    ]
    # One decision was served deterministically (no density): a dataset has a behavior_logp on every row or
    # on none, so the three known densities are left out and counted.
    assert [r["behavior_logp"] for r in rows] == [None] * 4
    assert (stats.unknown_logp, stats.dropped_logp) == (1, 3)
    assert [r["terminated"] for r in rows] == [False, False, False, True]
    meta = json.loads(table.schema.metadata[b"rlops"])
    assert meta["action_space"] == {"type": "Box", "shape": [2], "low": BOX_LOW, "high": BOX_HIGH}


def test_records_of_the_wrong_kind_are_named_with_file_and_line(
    logs: Path, registry: Path, tmp_path: Path
) -> None:
    stats = join(logs, logs, tmp_path / "box.parquet", policy="reacher", registry=registry)
    examples = [e for e in stats.examples if "handmade.jsonl" in e]
    assert "handmade.jsonl:1: propensity 0.5 is set for a Box action" in examples[0]
    assert "handmade.jsonl:2: log_density -10.0 is set for a Discrete action" in examples[1]
    assert "handmade.jsonl:3: action is a list but not a non-empty list of finite numbers" in examples[2]
    assert "handmade.jsonl:4: log_density 'high' is neither null nor a finite number" in examples[3]


def test_check_decision_reads_both_kinds() -> None:
    box = check_decision(decision("b", 0, 1.0))
    assert isinstance(box, dict)
    assert (box["action"], box["logp"]) == ([0.0, 2.0], -1.0)
    discrete = check_decision(decision("d", 0, 1.0, action=1, propensity=0.25, log_density=None))
    assert isinstance(discrete, dict)
    assert (discrete["action"], discrete["logp"]) == (1, math.log(0.25))
    bad = check_decision(decision("x", 0, 1.0, action=[]))
    assert isinstance(bad, str)
    assert "action is a list but not a non-empty list of finite numbers" in bad
    bad = check_decision(decision("x", 0, 1.0, action="left", propensity=0.5, log_density=None))
    assert bad == "action 'left' is neither an integer >= 0 (Discrete) nor a list of numbers (Box)"


def test_actions_of_the_other_kind_or_size_are_counted_as_mismatched() -> None:
    def row(d: dict[str, Any], did: str) -> dict[str, Any]:
        checked = check_decision(d)
        assert isinstance(checked, dict)
        checked["reward"] = {"reward": 1.0, "terminated": False, "truncated": False, "next_observation": None}
        return {"episode_key": "e:ep-1", "record": json.dumps(checked)}

    rows = [
        row(decision("a", 0, 1.0), "a"),
        row(decision("b", 1, 2.0, action=[0.0, 1.0, 2.0]), "b"),  # three dimensions, not two
        row(decision("c", 2, 3.0, action=1, propensity=0.5, log_density=None), "c"),  # Discrete
        row(decision("d", 3, 4.0, next_observation=None), "d"),
    ]
    built = build_episode(rows, obs_dim=4, n_actions=0, action_dim=2)
    assert built["mismatched"] == 2
    # Steps 0 and 3 are kept, but neither has a next observation (step 1 was dropped, 3 has none).
    assert (built["transitions"], built["no_next_observation"]) == (0, 2)
    discrete = build_episode(rows, obs_dim=4, n_actions=2)
    assert discrete["mismatched"] == 3


def test_the_trainer_loads_the_joined_box_dataset(logs: Path, registry: Path, tmp_path: Path) -> None:
    # Only the test may import the trainer: the server package never does.
    from rlops_trainer.datasets import load

    out = tmp_path / "box.parquet"
    stats = join(logs, logs, out, policy="reacher", registry=registry)
    t = load(out)
    # The logs mix explored and deterministic decisions: the dataset keeps every transition and no density
    # (a dataset has a behavior_logp on every row or on none), and says how many it left out.
    assert 0 < stats.unknown_logp < stats.transitions
    assert stats.dropped_logp == stats.transitions - stats.unknown_logp
    assert not t.has_propensities
    assert t.meta.extra["join"]["dropped_logp"] == stats.dropped_logp
    assert t.meta.is_continuous
    assert t.meta.action_dim == 2
    assert t.action.shape == (4, 2)
    assert t.action.dtype.name == "float32"


def test_a_discrete_registry_counts_box_decisions_as_mismatched(logs: Path, tmp_path: Path) -> None:
    d = tmp_path / "registry" / "reacher" / "1"
    d.mkdir(parents=True)
    (d / "model-card.json").write_text(json.dumps(make_card("reacher", 1, "sha256:" + "1" * 64)))
    with pytest.raises(Exception, match="no transitions to write"):
        join(logs, logs, tmp_path / "x.parquet", policy="reacher", registry=tmp_path / "registry")
