"""One iteration of the loop on real logs, real training, the real OPE gate and registry.

The served logs are written with the server's own log writer from CartPole episodes driven by the
champion (with exploration, so the propensities are informative). The canary and the restart of
TorchServe are stand-ins here (the end-to-end test runs the real ones); everything before them is real.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from delivery_testkit import POLICY, publish, serve_episodes, train_policy_dir
from rlops_delivery import config as loop_config
from rlops_delivery import loop
from rlops_delivery.commands.loop import app as loop_app
from rlops_delivery.drills import write_constant_policy_dir
from rlops_server.decision_log import DECISIONS_STREAM, complete_files
from rlops_trainer.registry import Registry
from typer.testing import CliRunner


def config(**overrides: Any) -> loop_config.LoopConfig:
    raw: dict[str, Any] = {
        "policy": POLICY,
        "algorithm": "cql",
        "train": {"steps": 1500, "alpha": 0.1, "hidden": [64, 64], "seed": 0},
        "min_new_transitions": 300,
        "reward_wait": "1ms",
        "gate": {"estimator": "fqe", "fqe_steps": 1500, "fqe_models": 1, "bootstrap": 100},
        "canary": {"steps": "10,100", "interval": "5s", "step_duration": "10s", "step_timeout": "1m"},
    }
    raw.update(overrides)
    return loop_config.parse_config(raw, "loop.yaml")


class Canary:
    def __init__(self, state: str = "promoted", fail: bool = False) -> None:
        self.state, self.fail = state, fail
        self.versions: list[int] = []
        self.loaded: list[int] = []

    def load(self, version: int) -> str:
        self.loaded.append(version)
        return f"loaded {version}"

    def __call__(self, version: int) -> dict[str, Any]:
        self.versions.append(version)
        if self.fail:
            raise RuntimeError("the canary process died")
        return {
            "id": "r1",
            "state": self.state,
            "traffic": {},
            "decision": {"reason": f"canary {self.state}"},
        }


def make_loop(tmp_path: Path, registry: Path, cfg: loop_config.LoopConfig, canary: Canary) -> loop.Loop:
    paths = loop.Paths(tmp_path / "logs", registry, tmp_path / "state", tmp_path / "serve")
    return loop.Loop(cfg, paths, canary=canary, load_candidate=canary.load, report=print)


@pytest.fixture
def poor_champion(tmp_path: Path, cartpole_data: Any) -> Path:
    """A registry whose champion always pushes left: logs under it leave room to learn better."""
    registry = tmp_path / "registry"
    base = train_policy_dir(cartpole_data, tmp_path / "base")
    publish(registry, write_constant_policy_dir(base, tmp_path / "left", 0), gate=False)
    Registry(registry).promote(POLICY, 1, require_gate=False, force_reason="a poor first champion")
    return registry


def test_config_errors_name_the_key() -> None:
    with pytest.raises(loop_config.LoopError, match=r"loop.yaml: policy: the policy name"):
        loop_config.parse_config({}, "loop.yaml")
    with pytest.raises(loop_config.LoopError, match=r"algorithm: 'ppo'; accepted: bc, cql, iql"):
        config(algorithm="ppo")
    with pytest.raises(loop_config.LoopError, match=r"train: .*unknown field 'lr_'"):
        config(train={"lr_": 1})
    with pytest.raises(loop_config.LoopError, match=r"gate: unknown key\(s\) margn"):
        config(gate={"margn": 1})
    with pytest.raises(loop_config.LoopError, match=r"canary.interval: 'often' is not a positive duration"):
        config(canary={"interval": "often"})
    with pytest.raises(loop_config.LoopError, match=r"min_new_transitions: 0 is not an integer >= 1"):
        config(min_new_transitions=0)
    with pytest.raises(loop_config.LoopError, match=r"unknown key\(s\) extra"):
        config(extra=1)


@pytest.mark.slow
def test_an_iteration_trains_gates_publishes_and_canaries_then_waits(
    tmp_path: Path, poor_champion: Path
) -> None:
    serve_episodes(tmp_path / "logs", poor_champion, episodes=80, seed=0)
    canary = Canary()
    the_loop = make_loop(tmp_path, poor_champion, config(), canary)
    it = the_loop.run_once()
    assert it["stage"] == loop.DONE, it
    assert it["gate"]["promote"] is True, it["gate"]["reason"]
    assert it["outcome"] == loop.PROMOTED
    version = it["version"]
    assert canary.loaded == canary.versions == [version]
    card = Registry(poor_champion).card(POLICY, version)
    trained = card["lineage"][0]
    assert trained["event"] == "trained"
    assert trained["loop"]["iteration"] == it["id"]
    assert trained["loop"]["new_transitions"] == it["new_transitions"] > 300
    assert [e["event"] for e in card["lineage"]] == ["trained", "gate", "published"]
    assert card["gate"]["promote"] is True
    assert card["gate"]["incumbent_version"] == 1
    assert card["evaluation"]["source"].startswith("rlops loop iteration")
    # Nothing new: the next run waits and changes nothing.
    state_before = the_loop.state_path.read_text()
    again = make_loop(tmp_path, poor_champion, config(), canary).run_once()
    assert again["outcome"] == "waiting"
    assert the_loop.state_path.read_text() == state_before
    assert canary.versions == [version]


@pytest.mark.slow
def test_too_little_new_data_waits_and_keeps_the_files_for_later(tmp_path: Path, poor_champion: Path) -> None:
    serve_episodes(tmp_path / "logs", poor_champion, episodes=5, seed=1)
    canary = Canary()
    result = make_loop(tmp_path, poor_champion, config(min_new_transitions=10_000), canary).run_once()
    assert result["outcome"] == "waiting"
    assert "are needed to retrain" in result["reason"]
    state = loop.LoopState.read(tmp_path / "state" / POLICY / loop.STATE_FILE, POLICY)
    assert state.consumed == []
    assert not (tmp_path / "state" / POLICY / loop.ITERATIONS_DIR).exists() or not any(
        (tmp_path / "state" / POLICY / loop.ITERATIONS_DIR).iterdir()
    )


@pytest.mark.slow
def test_files_younger_than_the_reward_wait_are_left_for_later(tmp_path: Path, poor_champion: Path) -> None:
    serve_episodes(tmp_path / "logs", poor_champion, episodes=5, seed=2)
    the_loop = make_loop(tmp_path, poor_champion, config(reward_wait="1h"), Canary())
    assert the_loop.new_files() == []
    old = time.time() - 7200
    for f in complete_files(tmp_path / "logs" / DECISIONS_STREAM):
        os.utime(f, (old, old))
    assert len(the_loop.new_files()) == 1


@pytest.mark.slow
def test_a_rejected_candidate_is_not_published_and_its_files_are_consumed(
    tmp_path: Path, poor_champion: Path
) -> None:
    serve_episodes(tmp_path / "logs", poor_champion, episodes=40, seed=3)
    canary = Canary()
    versions_before = Registry(poor_champion).versions(POLICY)
    cfg = config(
        gate={"estimator": "fqe", "fqe_steps": 300, "fqe_models": 1, "bootstrap": 50, "margin": 1000}
    )
    it = make_loop(tmp_path, poor_champion, cfg, canary).run_once()
    assert it["outcome"] == loop.REJECTED_BY_GATE
    assert "not promoted" in it["reason"]
    assert Registry(poor_champion).versions(POLICY) == versions_before
    assert canary.versions == []
    state = loop.LoopState.read(tmp_path / "state" / POLICY / loop.STATE_FILE, POLICY)
    assert state.consumed == it["new_files"]
    assert (
        tmp_path / "state" / POLICY / loop.ITERATIONS_DIR / it["id"] / "policy" / "model-card.json"
    ).exists()


@pytest.mark.slow
def test_an_interrupted_iteration_resumes_where_it_stopped(tmp_path: Path, poor_champion: Path) -> None:
    serve_episodes(tmp_path / "logs", poor_champion, episodes=80, seed=0)
    crashing = Canary(fail=True)
    with pytest.raises(RuntimeError, match="the canary process died"):
        make_loop(tmp_path, poor_champion, config(), crashing).run_once()
    state = loop.LoopState.read(tmp_path / "state" / POLICY / loop.STATE_FILE, POLICY)
    assert state.current is not None
    assert state.current["stage"] == loop.PUBLISHED
    assert state.consumed == []
    versions = Registry(poor_champion).versions(POLICY)
    canary = Canary(state="rolled_back")
    it = make_loop(tmp_path, poor_champion, config(), canary).run_once()
    assert it["id"] == state.current["id"]
    assert it["outcome"] == loop.ROLLED_BACK
    assert canary.versions == [it["version"]]
    assert Registry(poor_champion).versions(POLICY) == versions, "published once, not again"


def test_without_a_canary_the_iteration_hands_the_candidate_off(tmp_path: Path, poor_champion: Path) -> None:
    """``canary=None`` (the cluster's loop): the iteration ends at the candidate alias, nothing is served."""
    serve_episodes(tmp_path / "logs", poor_champion, episodes=40, seed=4)
    cfg = config(
        train={"steps": 300, "alpha": 0.1, "hidden": [32, 32], "seed": 0},
        min_new_transitions=100,
        gate={"estimator": "fqe", "fqe_steps": 300, "fqe_models": 1, "bootstrap": 50},
    )
    paths = loop.Paths(tmp_path / "logs", poor_champion, tmp_path / "state", tmp_path / "serve")

    def no_serving(version: int) -> str:
        raise AssertionError(f"version {version} was loaded into a TorchServe the cluster loop has not got")

    it = loop.Loop(cfg, paths, canary=None, load_candidate=no_serving, report=print).run_once()
    assert it["stage"] == loop.DONE, it
    assert it["gate"]["promote"] is True, it["gate"]["reason"]
    assert it["outcome"] == loop.HANDED_OFF
    assert f"version {it['version']} is the registry's candidate" in it["reason"]
    assert "rollout" not in it
    reg = Registry(poor_champion)
    assert reg.versions(POLICY) == [1, it["version"]]
    assert reg.aliases(POLICY) == {"champion": 1, "candidate": it["version"]}
    state = loop.LoopState.read(tmp_path / "state" / POLICY / loop.STATE_FILE, POLICY)
    assert state.current is None
    assert state.consumed == it["new_files"] != []
    assert state.iterations == [it]
    # Nothing new: the next run waits and changes nothing.
    state_before = (tmp_path / "state" / POLICY / loop.STATE_FILE).read_text()
    again = loop.Loop(cfg, paths, canary=None, load_candidate=no_serving).run_once()
    assert again["outcome"] == "waiting"
    assert (tmp_path / "state" / POLICY / loop.STATE_FILE).read_text() == state_before
    assert Registry(poor_champion).aliases(POLICY) == {"champion": 1, "candidate": it["version"]}
    (tmp_path / "loop.yaml").write_text(f"policy: {POLICY}\n")
    shown = CliRunner().invoke(
        loop_app,
        ["status", "--config", str(tmp_path / "loop.yaml"), "--state-dir", str(tmp_path / "state")],
        env={"COLUMNS": "200"},
    )
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if it["id"] in line)
    for shown_value in (loop.DONE, str(it["version"]), loop.HANDED_OFF, "left to the platform"):
        assert shown_value in row, shown.output


# --- Box (continuous-action) logs --------------------------------------------------------------------------


def test_config_accepts_td3bc_and_the_fields_of_either_implementation() -> None:
    td3bc = config(algorithm="td3bc", train={"steps": 10, "policy_noise": 0.1, "serve_std": 0.2})
    assert (td3bc.algorithm, td3bc.train["policy_noise"]) == ("td3bc", 0.1)
    # cql has a Discrete and a Box implementation: fields of either are accepted until the data decide.
    assert config(train={"actor_lr": 1e-4}).train == {"actor_lr": 1e-4}
    assert config(train={"hidden": [64, 64]}).train == {"hidden": [64, 64]}
    with pytest.raises(loop_config.LoopError, match=r"algorithm: 'ppo'; accepted: bc, cql, iql, td3bc"):
        config(algorithm="ppo")
    with pytest.raises(
        loop_config.LoopError,
        match=r"train: for Discrete actions, .*unknown field 'lr_'.*; for Box actions, .*unknown field 'lr_'",
    ):
        config(train={"lr_": 1})
    with pytest.raises(loop_config.LoopError, match=r"loop.yaml: train: 'serve_epsilon=0.1': unknown field"):
        config(algorithm="td3bc", train={"serve_epsilon": 0.1})


def _joined(tmp_path: Path, the_loop: loop.Loop) -> dict[str, Any]:
    """An iteration recorded as joined (its data are what ``opegate.load_dataset`` returns in the test)."""
    it: dict[str, Any] = {
        "id": "20260101T000000Z",
        "stage": loop.JOINED,
        "started_at": "2026-01-01T00:00:00Z",
        "new_files": [str(tmp_path / "logs" / "decisions" / "d-000001.jsonl")],
        "new_transitions": 400,
        "training_files": 1,
        "transitions": 400,
        "episodes": 400,
        "served_versions": [1],
    }
    the_loop.state.iterations.append(it)
    the_loop._save()
    return it


def test_an_iteration_trains_gates_and_publishes_a_box_policy(
    tmp_path: Path, box_registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from delivery_testkit import box_bandit
    from rlops_delivery import opegate

    monkeypatch.setattr(opegate, "load_dataset", lambda path: box_bandit())
    cfg = config(
        algorithm="td3bc",
        train={"steps": 300, "hidden": [32, 32], "batch_size": 64, "seed": 0, "serve_std": 0.2},
        gate={"estimator": "fqe", "fqe_steps": 300, "fqe_models": 1, "bootstrap": 50},
    )
    canary = Canary()
    the_loop = make_loop(tmp_path, box_registry, cfg, canary)
    _joined(tmp_path, the_loop)
    it = the_loop.run_once()
    assert it["stage"] == loop.DONE, it
    assert it["action_space"] == "Box"
    # The champion sits near the bounds whatever it sees; TD3+BC on the bandit's logs does better.
    assert it["gate"]["promote"] is True, it["gate"]["reason"]
    card = Registry(box_registry).card(POLICY, it["version"])
    assert card["action_space"]["type"] == "Box"
    assert card["policy"]["score_kind"] == "action"
    assert card["policy"]["selection"]["std"] == 0.2
    assert card["evaluation"]["data"]["action_space"] == "Box"
    assert canary.versions == [it["version"]]


def test_td3bc_on_discrete_logs_says_what_is_accepted(
    tmp_path: Path, poor_champion: Path, cartpole_data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rlops_delivery import opegate

    monkeypatch.setattr(opegate, "load_dataset", lambda path: cartpole_data)
    the_loop = make_loop(tmp_path, poor_champion, config(algorithm="td3bc", train={}), Canary())
    _joined(tmp_path, the_loop)
    with pytest.raises(
        loop_config.LoopError,
        match=r"the joined logs of cartpole have Discrete actions: td3bc trains on Box actions only; "
        r"for Discrete actions the algorithms are bc, cql, iql",
    ):
        the_loop.run_once()
