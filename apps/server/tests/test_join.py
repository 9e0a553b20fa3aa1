from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from rlops_contracts import DATASET_COLUMNS, DATASET_METADATA_KEY
from rlops_server.decision_log import DecisionLog
from rlops_server.feedback import REWARD_FILE_PREFIX, REWARDS_STREAM
from rlops_server.join import JoinError, episode_int_id, join
from server_testkit import make_card

CARD: dict[str, Any] = {
    "dataset": {"env_id": "CartPole-v1"},
    "observation_space": {
        "type": "Box",
        "shape": [4],
        "dtype": "float32",
        "low": [-4.8, "-inf", -0.42, "-inf"],
        "high": [4.8, "inf", 0.42, "inf"],
    },
    "action_space": {"type": "Discrete", "n": 2},
}


def obs(ep: int, step: int) -> list[float]:
    return [ep * 10.0 + step, 0.5, -0.5, step / 10]


def decision(did: str, ep: int | None, step: int | None, t: float, **extra: Any) -> dict[str, Any]:
    return {
        "decision_id": did,
        "time": t,
        "policy": "cartpole",
        "version": 3,
        "episode_id": None if ep is None else f"ep-{ep}",
        "step": step,
        "observation": obs(ep or 0, step or 0),
        "action": (step or 0) % 2,
        "propensity": 0.5,
        "temperature": 1.0,
        "epsilon": 0.0,
        "action_mask": None,
        "fallback": False,
        **extra,
    }


def reward(did: str, t: float, r: float = 1.0, **extra: Any) -> dict[str, Any]:
    base = {
        "decision_id": did,
        "reward": r,
        "terminated": False,
        "truncated": False,
        "next_observation": None,
    }
    return {**base, "time": t, "policy": "cartpole", "version": 3, **extra}


def scenario(root: Path) -> None:
    """Decisions and rewards with every case the join must handle (see the comments)."""
    decisions: list[dict[str, Any]] = []
    rewards: list[dict[str, Any]] = []
    # ep-1: four steps, the last terminated without a next observation; decision 0 logged twice and
    # reward 1 posted twice (the later copy differs and must lose).
    for s in range(4):
        decisions.append(decision(f"e1-{s}", 1, s, 100 + s))
        rewards.append(reward(f"e1-{s}", 1000 + s, terminated=s == 3))
    decisions.append(decision("e1-0", 1, 0, 100))
    rewards.append(reward("e1-1", 2000, r=5.0))
    # ep-2 (served by version 4): truncated at step 2 with a next observation; a second decision
    # at step 1 under another id has no reward and loses the step.
    for s in range(3):
        decisions.append(decision(f"e2-{s}", 2, s, 200 + s, version=4))
        rewards.append(
            reward(f"e2-{s}", 1100 + s, truncated=s == 2, next_observation=[9.0] * 4 if s == 2 else None)
        )
    decisions.append(decision("e2-1b", 2, 1, 201.5, version=4))
    # ep-3 starts first; only steps 0 and 1 are rewarded so far.
    for s in range(4):
        decisions.append(decision(f"e3-{s}", 3, s, 50 + s))
    rewards += [reward("e3-0", 1200, r=0.5), reward("e3-1", 1201, r=-1.0)]
    # ep-4: the decision at step 1 is missing, so step 0 has no next observation.
    decisions += [decision("e4-0", 4, 0, 500), decision("e4-2", 4, 2, 502)]
    rewards += [reward("e4-0", 1300), reward("e4-2", 1302, terminated=True, next_observation=[7.0] * 4)]
    # ep-5 terminates at step 0, yet decisions 1 and 2 follow.
    for s in range(3):
        decisions.append(decision(f"e5-{s}", 5, s, 400 + s))
        rewards.append(reward(f"e5-{s}", 1400 + s, terminated=s == 0))
    # A contextual-bandit decision (no episode), a decision of another policy, a reward of nothing.
    decisions.append(decision("b1", None, None, 300))
    rewards.append(reward("b1", 1500, r=2.0, terminated=True))
    decisions.append(decision("x1", 9, 0, 600, policy="other"))
    rewards += [reward("x1", 1600), reward("ghost", 1700)]

    with DecisionLog(root, rotate_bytes=3000) as log:
        for d in decisions:
            log.write(d)
    with DecisionLog(root, stream=REWARDS_STREAM, file_prefix=REWARD_FILE_PREFIX, rotate_bytes=1000) as log:
        for r in rewards:
            log.write(r)
    day = next((root / "decisions").glob("date=*"))
    (day / "handmade.jsonl").write_text('not json\n{"decision_id": "z", "propensity": 0}\n')
    (day / "open-file.jsonl.tmp").write_text('{"half": ')
    (day / "empty.jsonl").write_text("")


def full_card(version: int, n_actions: int = 2) -> dict[str, Any]:
    """A registry version's card with CARD's environment and spaces."""
    card = make_card("cartpole", version, "sha256:" + "1" * 64)
    card["dataset"]["env_id"] = CARD["dataset"]["env_id"]
    card.update(
        observation_space=CARD["observation_space"], action_space={"type": "Discrete", "n": n_actions}
    )
    card["reference"]["actions"]["proportions"] = [1.0 / n_actions] * n_actions
    return card


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    for v in (3, 4):
        d = tmp_path / "registry" / "cartpole" / str(v)
        d.mkdir(parents=True)
        (d / "model-card.json").write_text(json.dumps(full_card(v)))
    return tmp_path / "registry"


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    scenario(tmp_path / "logs")
    return tmp_path / "logs"


def test_join_builds_transitions_and_counts_what_it_left_out(
    logs: Path, registry: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "joined.parquet"
    stats = join(logs, logs, out, policy="cartpole", registry=registry)
    counts = stats.counts()
    assert counts == {
        "decision_files": counts["decision_files"],
        "reward_files": counts["reward_files"],
        "decisions": 20,
        "rewards": 18,
        "invalid_decisions": 2,
        "invalid_rewards": 0,
        "duplicate_decisions": 1,
        "duplicate_rewards": 1,
        "unrewarded_decisions": 3,
        "orphan_rewards": 1,
        "other_policy": 1,
        "step_conflicts": 1,
        "no_next_observation": 1,
        "after_episode_end": 2,
        "mismatched": 0,
        "unknown_logp": 0,
        "dropped_logp": 0,
        "transitions": 12,
        "episodes": 6,
    }
    assert counts["decision_files"] >= 3, "rotated files must all be read"
    assert (stats.policy, stats.versions) == ("cartpole", ["3", "4"])
    assert "handmade.jsonl:1: not JSON" in stats.examples[0]
    assert "propensity 0 is not a probability" in stats.examples[1]

    table = pq.read_table(out)
    assert table.column_names == list(DATASET_COLUMNS)
    meta = json.loads(table.schema.metadata[DATASET_METADATA_KEY])
    assert meta["behavior_policy"] == "served:cartpole@3,4"
    assert (meta["source"], meta["env_id"], meta["schema_version"]) == ("decision-log", "CartPole-v1", 1)
    assert meta["observation_space"] == {k: v for k, v in CARD["observation_space"].items() if k != "dtype"}
    assert meta["action_space"] == {"type": "Discrete", "n": 2}
    assert meta["extra"]["join"]["transitions"] == 12

    rows = table.to_pylist()
    # Episodes in order of their first decision: ep-3 (t=50), ep-1, ep-2, the bandit, ep-5, ep-4.
    order = ["ep-3", "ep-3", "ep-1", "ep-1", "ep-1", "ep-1", "ep-2", "ep-2", "ep-2", "b1", "ep-5", "ep-4"]
    keys = [f"e:{k}" if k.startswith("ep-") else f"d:{k}" for k in order]
    assert [r["episode_id"] for r in rows] == [episode_int_id(k) for k in keys]
    assert [r["step"] for r in rows] == [0, 1, 0, 1, 2, 3, 0, 1, 2, 0, 0, 2]
    assert [r["reward"] for r in rows] == [0.5, -1.0, 1, 1, 1, 1, 1, 1, 1, 2, 1, 1]

    def f32(v: list[float]) -> list[float]:
        return np.asarray(v, dtype=np.float32).tolist()

    ep3, ep1, ep2 = rows[0:2], rows[2:6], rows[6:9]
    assert ep3[1]["next_observation"] == f32(obs(3, 2)), (
        "an unrewarded decision still gives the next observation"
    )
    assert [r["next_observation"] for r in ep1] == [f32(obs(1, s)) for s in (1, 2, 3, 3)]
    assert [r["terminated"] for r in ep1] == [False, False, False, True]
    assert ep2[2]["next_observation"] == [9.0] * 4
    assert (ep2[2]["terminated"], ep2[2]["truncated"]) == (False, True)
    assert rows[9]["observation"] == rows[9]["next_observation"] == f32(obs(0, 0))
    assert rows[11]["next_observation"] == [7.0] * 4
    assert all(math.isclose(r["behavior_logp"], math.log(0.5), rel_tol=1e-6) for r in rows)
    assert [r["action"] for r in rows] == [r["step"] % 2 for r in rows]
    assert not list(out.parent.glob(".*.tmp"))


def test_the_trainer_loads_the_joined_dataset(logs: Path, registry: Path, tmp_path: Path) -> None:
    # Only the test may import the trainer: the server package never does.
    from rlops_trainer.datasets import load

    out = tmp_path / "joined.parquet"
    join(logs, logs, out, policy="cartpole", registry=registry)
    t = load(out)
    assert len(t) == 12
    assert t.has_propensities
    assert t.meta.behavior_policy == "served:cartpole@3,4"
    assert t.meta.n_actions == 2
    assert t.meta.obs_dim == 4
    assert t.episode_returns().tolist() == [-0.5, 4.0, 3.0, 2.0, 1.0, 1.0]


def test_joining_again_gives_the_same_dataset(logs: Path, registry: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    join(logs, logs, a, policy="cartpole", registry=registry)
    join(logs / "decisions", logs / "rewards", b, policy="cartpole", registry=registry)
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.equals(tb)
    assert ta.schema.metadata == tb.schema.metadata


def test_spaces_from_flags_without_a_registry(logs: Path, tmp_path: Path) -> None:
    out = tmp_path / "flags.parquet"
    stats = join(logs, logs, out, policy="cartpole", env_id="CartPole-v1", obs_dim=4, n_actions=2)
    assert stats.transitions == 12
    meta = json.loads(pq.read_table(out).schema.metadata[DATASET_METADATA_KEY])
    assert meta["observation_space"]["low"] == ["-inf"] * 4


def test_observations_of_another_size_are_counted_not_written(logs: Path, tmp_path: Path) -> None:
    out = tmp_path / "dim3.parquet"
    with pytest.raises(JoinError, match="no transitions to write"):
        join(logs, logs, out, policy="cartpole", env_id="CartPole-v1", obs_dim=3, n_actions=2)
    assert not out.exists()


def test_errors_name_the_way_out(logs: Path, registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.parquet"
    with pytest.raises(JoinError, match=r"several policies \(cartpole, other\).*--policy"):
        join(logs, logs, out, registry=registry)
    with pytest.raises(JoinError, match="no decisions of policy 'nope'; policies found: cartpole, other"):
        join(logs, logs, out, policy="nope", registry=registry)
    with pytest.raises(JoinError, match=r"no model card for cartpole@3 at .*--registry"):
        join(logs, logs, out, policy="cartpole", registry=tmp_path / "empty")
    with pytest.raises(JoinError, match="--env-id, --obs-dim and --n-actions together"):
        join(logs, logs, out, policy="cartpole", obs_dim=4)
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(JoinError, match="no complete decision files"):
        join(nothing, logs, out)
    with pytest.raises(JoinError, match="no such directory"):
        join(tmp_path / "missing", logs, out)
    card = registry / "cartpole" / "4" / "model-card.json"
    card.write_text(json.dumps(full_card(4, n_actions=3)))
    with pytest.raises(JoinError, match="different observation or action spaces"):
        join(logs, logs, out, policy="cartpole", registry=registry)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_join_gives_the_same_dataset(logs: Path, registry: Path, tmp_path: Path) -> None:
    import ray

    local, distributed = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    local_stats = join(logs, logs, local, policy="cartpole", registry=registry)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_stats = join(logs, logs, distributed, policy="cartpole", registry=registry, use_ray=True)
    finally:
        ray.shutdown()
    assert ray_stats.counts() == local_stats.counts()
    assert ray_stats.examples == local_stats.examples
    a, b = pq.read_table(local), pq.read_table(distributed)
    assert a.equals(b)
    assert a.schema.metadata == b.schema.metadata


def test_join_command_prints_the_counts_and_writes_a_report(
    logs: Path, registry: Path, tmp_path: Path
) -> None:
    from rlops_server.commands.feedback import app
    from typer.testing import CliRunner

    out, report = tmp_path / "cli.parquet", tmp_path / "report.json"
    args = ["join", "--decisions", str(logs), "--rewards", str(logs), "--out", str(out)]
    args += ["--policy", "cartpole", "--registry", str(registry), "--report", str(report)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for words in ("transitions", "unrewarded decisions", "orphan rewards", "served:cartpole@3,4"):
        assert words in result.output
    saved = json.loads(report.read_text())
    assert (saved["transitions"], saved["orphan_rewards"], saved["versions"]) == (12, 1, ["3", "4"])
    assert pq.read_table(out).num_rows == 12

    result = CliRunner().invoke(app, [*args[:7], "--registry", str(registry)])
    assert result.exit_code == 2
    assert "several policies" in result.output
    result = CliRunner().invoke(app, ["join", "--decisions", str(logs), "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2
    assert "ending in .parquet" in result.output
