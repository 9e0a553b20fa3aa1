"""Collection: exact propensities, per-episode mixtures, reproducibility, errors; the ``rlops data`` CLI."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from rlops_trainer.collect import (
    CARTPOLE_MIXED,
    CollectError,
    collect,
    make_env,
    parse_behavior,
    train_greedy_policy,
)
from rlops_trainer.commands.data import app
from rlops_trainer.datasets import load
from typer.testing import CliRunner

ENV = "CartPole-v1"


def test_random_behaviour_logs_uniform_propensities() -> None:
    t = collect(ENV, "random", episodes=5, seed=0, progress=False)
    np.testing.assert_array_equal(t.behavior_logp, np.float32(-math.log(2)))
    assert set(np.unique(t.action)) <= {0, 1}
    assert t.meta.behavior_policy == "random"
    assert t.meta.source == "collect"
    assert t.meta.env_id == ENV
    assert t.meta.action_space == {"type": "Discrete", "n": 2}
    # CartPole's velocities are unbounded: stored as JSON-safe strings.
    assert t.meta.observation_space["high"][1] == "inf"
    assert t.meta.observation_space["low"][0] == pytest.approx(-4.8)
    assert "greedy_policies" not in t.meta.extra
    np.testing.assert_array_equal(np.unique(t.episode_id), np.arange(5))
    # Each episode ends once, on its last row; rows chain: next_observation[i] == observation[i+1].
    ends = t.terminated | t.truncated
    assert ends.sum() == 5
    same_episode = t.episode_id[1:] == t.episode_id[:-1]
    np.testing.assert_array_equal(t.next_observation[:-1][same_episode], t.observation[1:][same_episode])


def test_eps_greedy_propensities_are_exact() -> None:
    eps = 0.3
    t = collect(ENV, f"eps-greedy:{eps}", episodes=8, seed=0, progress=False)
    policy = train_greedy_policy(ENV, 0)
    greedy = np.array([policy.act(o.astype(np.float64)) for o in t.observation])
    expected = np.where(t.action == greedy, 1 - eps + eps / 2, eps / 2)
    np.testing.assert_allclose(np.exp(t.behavior_logp.astype(np.float64)), expected, rtol=1e-6)
    # Exploration really happens, at about the advertised rate (eps / n of rows are non-greedy).
    off_greedy = float(np.mean(t.action != greedy))
    assert 0.08 < off_greedy < 0.22


def test_greedy_policy_is_cached_and_better_than_random() -> None:
    first = train_greedy_policy(ENV, 3)
    assert train_greedy_policy(ENV, 3) is first
    assert first.train_info["greedy_return"] > 100  # a uniform policy averages about 22 on CartPole


def test_mixture_keeps_one_component_per_episode() -> None:
    spec = "mixture:random=0.5,eps-greedy:0.2=0.5"
    t = collect(ENV, spec, episodes=30, seed=1, progress=False)
    p = np.exp(t.behavior_logp.astype(np.float64))
    # eps-greedy:0.2 logs 0.9 or 0.1, never the uniform 0.5: every episode's component is identifiable.
    random_values = {0.5}
    greedy_values = {0.9, 0.1}
    kinds = []
    for e in np.unique(t.episode_id):
        values = {round(v, 6) for v in p[t.episode_id == e]}
        if values <= random_values:
            kinds.append("random")
        else:
            assert values <= greedy_values, f"episode {e} mixes components: {values}"
            kinds.append("eps-greedy:0.2")
    counts = t.meta.extra["episodes_per_component"]
    assert counts == {"random": kinds.count("random"), "eps-greedy:0.2": kinds.count("eps-greedy:0.2")}
    assert 5 <= counts["random"] <= 25


def test_same_seed_same_fingerprint_other_seed_differs() -> None:
    a = collect(ENV, "mixture:random=1,eps-greedy:0.5=1", episodes=6, seed=7, progress=False)
    b = collect(ENV, "mixture:random=1,eps-greedy:0.5=1", episodes=6, seed=7, progress=False)
    c = collect(ENV, "mixture:random=1,eps-greedy:0.5=1", episodes=6, seed=8, progress=False)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()


def test_cartpole_mixed_is_mixed_quality() -> None:
    t = collect(ENV, CARTPOLE_MIXED, episodes=200, seed=0, progress=False)
    returns = t.episode_returns()
    assert 60 <= returns.mean() <= 150
    # A few good episodes from the better policy, many short ones from uniform exploration.
    assert (returns >= 200).sum() >= 10
    assert (returns <= 30).sum() >= 40
    counts = t.meta.extra["episodes_per_component"]
    assert set(counts) == {"eps-greedy:0.1@2000", "eps-greedy:0.3", "random"}
    assert set(t.meta.extra["greedy_policies"]) == {"2000", "20000"}


def test_training_budget_is_a_quality_knob() -> None:
    weak = collect(ENV, "eps-greedy:0@500", episodes=5, seed=0, progress=False)
    strong = collect(ENV, "eps-greedy:0", episodes=5, seed=0, progress=False)
    assert weak.meta.behavior_policy == "eps-greedy:0@500"
    assert weak.episode_returns().mean() < strong.episode_returns().mean()


@pytest.mark.parametrize("spec", ["eps-greedy:0.1@", "eps-greedy:0.1@-5", "eps-greedy:0.1@1e3"])
def test_bad_training_budget_is_refused(spec: str) -> None:
    with pytest.raises(CollectError, match="training budget"):
        parse_behavior(spec)


def test_parse_behavior_canonical_form() -> None:
    b = parse_behavior(" mixture:random=1, eps-greedy:0.30=3 ")
    assert b.spec == "mixture:random=1,eps-greedy:0.3=3"
    assert b.weights == (0.25, 0.75)
    assert [c.epsilon for c in b.components] == [1.0, 0.3]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("greedy", "unknown behaviour component 'greedy'"),
        ("eps-greedy:1.5", "outside \\[0, 1\\]"),
        ("eps-greedy:abc", "bad epsilon 'abc'"),
        ("mixture:random", "is not <component>=<weight>"),
        ("mixture:random=-1", "must be positive"),
        ("mixture:random=1,random=2", "names a component twice"),
    ],
)
def test_bad_behaviour_specs_list_the_accepted_forms(spec: str, expected: str) -> None:
    with pytest.raises(CollectError, match=expected) as e:
        parse_behavior(spec)
    assert "accepted behaviours: for Discrete actions 'random'; 'eps-greedy:<eps>'" in str(e.value)
    assert "for Box actions 'uniform'; 'gaussian:<std>'" in str(e.value)


def test_unknown_env_gives_a_hint() -> None:
    with pytest.raises(CollectError, match=r"CartPol-v1.*did you mean CartPole-v1"):
        collect("CartPol-v1", "random", episodes=1, seed=0, progress=False)


def test_box_actions_are_refused_where_only_discrete_ones_are_asked_for() -> None:
    with pytest.raises(CollectError, match="only Discrete action spaces are supported"):
        make_env("Pendulum-v1")


def test_episode_count_must_be_positive() -> None:
    with pytest.raises(CollectError, match="episodes must be at least 1"):
        collect(ENV, "random", episodes=0, seed=0, progress=False)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_collect_then_inspect(tmp_path: Path) -> None:
    out = tmp_path / "cp.parquet"
    result = runner.invoke(
        app,
        [
            "collect",
            "--env",
            ENV,
            "--behavior",
            "eps-greedy:0.5",
            "--episodes",
            "4",
            "--seed",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout
    assert "cp.parquet" in result.stdout
    assert "Return histogram" in result.stdout
    t = load(out)
    assert t.meta.behavior_policy == "eps-greedy:0.5"

    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_episodes"] == 4
    assert summary["n_transitions"] == len(t)
    assert summary["fingerprint"] == t.fingerprint()

    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert "Actions and propensity coverage" in result.stdout


def test_cli_inspect_bad_file_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    result = runner.invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 2
    assert "error:" in result.stderr
    assert "not a readable Parquet file" in result.stderr
    assert "Traceback" not in result.output


def test_cli_collect_bad_behaviour_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["collect", "--behavior", "greedy", "--out", str(tmp_path / "x.parquet")])
    assert result.exit_code == 2
    assert "accepted behaviours" in result.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_cli_import_pickle_needs_opt_in(tmp_path: Path) -> None:
    source = tmp_path / "d.pkl"
    source.write_bytes(pickle.dumps([]))
    out = tmp_path / "d.parquet"
    result = runner.invoke(
        app, ["import", str(source), "--format", "d4rl-pkl", "--env-id", "x", "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "--allow-pickle" in result.stderr
    assert not out.exists()


def test_cli_import_hdf5(tmp_path: Path) -> None:
    import h5py

    source = tmp_path / "d.hdf5"
    n = 6
    with h5py.File(source, "w") as f:
        f["observations"] = np.zeros((n, 4), dtype=np.float32)
        f["actions"] = np.array([0, 1, 0, 1, 0, 1])
        f["rewards"] = np.ones(n)
        f["terminals"] = np.array([0, 0, 1, 0, 0, 1], dtype=bool)
        f["timeouts"] = np.zeros(n, dtype=bool)
    out = tmp_path / "d.parquet"
    result = runner.invoke(
        app,
        [
            "import",
            str(source),
            "--format",
            "d4rl-hdf5",
            "--env-id",
            "x",
            "--n-actions",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(load(out)) == n
