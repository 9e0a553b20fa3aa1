"""``rlops evaluate`` end to end on a small CartPole dataset: estimates, rollouts, gate, report files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from rlops_trainer import datasets
from rlops_trainer.collect import collect
from rlops_trainer.commands.evaluate import evaluate
from rlops_trainer.commands.registry import report_entry
from rlops_trainer.ope import ESTIMATORS
from rlops_trainer.policy import Selection
from rlops_trainer.registry import Registry
from rlops_trainer.rollout import RolloutError, rollout
from trainer_testkit import linear_policy, policy_dir
from typer.testing import CliRunner

app = typer.Typer()
app.command()(evaluate)
runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    data = collect("CartPole-v1", "random", episodes=40, seed=0, progress=False)
    data_path = datasets.save(data, root / "data.parquet")
    good = policy_dir(root, data, "cartpole", [0.0, 0.5, 10.0, 2.0], Selection(temperature=1.0, epsilon=0.0))
    weak = policy_dir(root / "weak", data, "cartpole", [0.0, 0.0, 1.0, 0.0], Selection(0.0, 0.2))
    registry = root / "registry"
    reg = Registry(registry)
    reg.publish(weak, "cartpole")
    reg.promote("cartpole", 1, require_gate=False, force_reason="first champion")
    # The same dataset without behaviour propensities.
    blind = replace(data, behavior_logp=np.full(len(data), np.nan, dtype=np.float32))
    blind_path = datasets.save(blind, root / "blind.parquet")
    return {
        "root": root,
        "data": data_path,
        "blind": blind_path,
        "good": good,
        "weak": weak,
        "registry": registry,
    }


def run(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args])


FAST = ("--fqe-steps", "300", "--bootstrap", "200")


def test_end_to_end_report_with_champion_and_rollouts(setup: dict[str, Path]) -> None:
    out = setup["root"] / "out"
    res = run(
        "--data", setup["data"], "--policy", setup["good"], "--registry", setup["registry"],
        "--champion", "cartpole", "--env-episodes", "3", "--margin", "0.5", "--out", out, *FAST,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert report["data"]["n_episodes"] == 40
    assert report["data"]["has_propensities"] is True
    assert report["settings"]["estimators"] == list(ESTIMATORS)
    assert report["settings"]["gate"]["estimator"] == "dr"
    behavior = report["behavior"]
    assert behavior["lower"] <= behavior["value"] <= behavior["upper"]

    champion, candidate = report["policies"]
    assert (champion["role"], champion["label"], champion["version"]) == ("champion", "cartpole@1", 1)
    assert champion["gate"] is None
    assert candidate["role"] == "candidate"
    assert candidate["ref"] == str(setup["good"])
    assert candidate["selection"] == {"temperature": 1.0, "epsilon": 0.0}
    for p in (champion, candidate):
        assert set(p["estimates"]) == set(ESTIMATORS)
        for e in p["estimates"].values():
            assert e["lower"] <= e["upper"]
            assert e["n_episodes"] == 40
        assert p["rollout"]["episodes"] == 3
        assert p["rollout"]["gamma"] == 0.99
    # The hand-made controller balances far longer than the weak champion: the rollouts say so.
    assert candidate["rollout"]["return"]["value"] > 2 * champion["rollout"]["return"]["value"]

    gate = candidate["gate"]
    assert gate["baseline"] == "incumbent"
    assert gate["incumbent_version"] == 1
    assert gate["estimator"] == "dr"
    assert gate["baseline_value"] == pytest.approx(champion["estimates"]["dr"]["value"])
    assert gate["candidate_lower"] == pytest.approx(candidate["estimates"]["dr"]["lower"])
    assert gate["required"] == pytest.approx(gate["baseline_value"] + 0.5)
    assert gate["promote"] == (gate["candidate_lower"] > gate["required"])
    assert gate["reason"] in " ".join(res.stdout.split())  # printed, whatever the verdict
    assert "report.json" in res.stdout

    # The registry copies this candidate's estimates and gate decision into its model card.
    evaluation, card_gate = report_entry(out / "report.json", setup["good"], "cartpole")
    assert card_gate == gate
    assert evaluation["estimates"]["fqe"] == candidate["estimates"]["fqe"]
    version = Registry(setup["registry"]).publish(setup["good"], "cartpole", evaluation, card_gate)
    card = Registry(setup["registry"]).card("cartpole", version)
    assert card["gate"]["incumbent_version"] == 1
    assert card["gate"]["promote"] == gate["promote"]


def test_without_champion_the_behaviour_policy_is_the_baseline(setup: dict[str, Path]) -> None:
    out = setup["root"] / "out-behaviour"
    res = run(
        "--data", setup["data"], "--policy", setup["good"], "--policy", setup["weak"],
        "--estimators", "fqe,pdis", "--gate-estimator", "fqe", "--out", out, *FAST,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["champion"] is None
    assert [p["label"] for p in report["policies"]] == ["cartpole bc", "cartpole bc#2"]
    for p in report["policies"]:
        assert set(p["estimates"]) == {"fqe", "pdis"}
        assert p["rollout"] is None
        assert p["gate"]["baseline"] == "behavior"
        assert p["gate"]["incumbent_version"] is None
        assert p["gate"]["baseline_value"] == pytest.approx(report["behavior"]["value"])


def test_data_without_propensities_falls_back_to_fqe(setup: dict[str, Path]) -> None:
    out = setup["root"] / "out-blind"
    res = run("--data", setup["blind"], "--policy", setup["good"], "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    assert "no behaviour propensities" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["estimators"] == ["fqe"]
    assert report["policies"][0]["gate"]["estimator"] == "fqe"

    res = run("--data", setup["blind"], "--policy", setup["good"], "--estimators", "fqe,dr", *FAST)
    assert res.exit_code == 2
    assert "--estimators dr need behaviour propensities" in res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{root}/missing.parquet", "--policy", "{good}"], "missing.parquet: no such file"),
        (["--data", "{data}", "--policy", "{root}/nowhere"], "not a directory, nor NAME@VERSION"),
        (["--data", "{data}", "--policy", "cartpole@7", "--registry", "{registry}"], "has no version"),
        (["--data", "{data}"], "nothing to evaluate"),
        (["--data", "{data}", "--policy", "{good}", "--gamma", "1.5"], "--gamma must be in (0, 1]"),
        (["--data", "{data}", "--policy", "{good}", "--estimators", "fqe,magic"], "unknown magic"),
        (
            ["--data", "{data}", "--policy", "{good}", "--estimators", "fqe", "--gate-estimator", "dr"],
            "--gate-estimator dr is not among the estimators run (fqe)",
        ),
        (["--data", "{data}", "--policy", "{good}", "--margin", "-1"], "--margin must be >= 0"),
    ],
)
def test_bad_input_exits_2_with_a_message(setup: dict[str, Path], args: list[str], message: str) -> None:
    res = run(*[a.format(**{k: str(v) for k, v in setup.items()}) for a in args])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.stderr.split())
    assert "Traceback" not in res.output


def test_policy_for_another_observation_space_is_rejected(setup: dict[str, Path], tmp_path: Path) -> None:
    data = datasets.load(setup["data"])
    wide = replace(
        data,
        observation=np.pad(data.observation, ((0, 0), (0, 1))),
        next_observation=np.pad(data.next_observation, ((0, 0), (0, 1))),
        meta=replace(
            data.meta,
            observation_space={"type": "Box", "shape": [5], "low": [-1e9] * 5, "high": [1e9] * 5},
        ),
    )
    res = run("--data", datasets.save(wide, tmp_path / "wide.parquet"), "--policy", setup["good"], *FAST)
    assert res.exit_code == 2
    assert "takes observations of shape [4], but the dataset's have 5 features" in res.stderr


def test_rollout_is_seeded_and_independent_of_the_batch_size() -> None:
    policy = linear_policy([0.0, 0.0, 1.0, 0.5])
    sel = Selection(temperature=0.5, epsilon=0.1)
    one = rollout(policy, sel, "CartPole-v1", 6, seed=3, gamma=0.9, batch_size=1)
    four = rollout(policy, sel, "CartPole-v1", 6, seed=3, gamma=0.9, batch_size=4)
    np.testing.assert_array_equal(one.returns, four.returns)
    np.testing.assert_array_equal(one.lengths, four.lengths)
    other = rollout(policy, sel, "CartPole-v1", 6, seed=4, gamma=0.9)
    assert not np.array_equal(one.lengths, other.lengths)
    # CartPole pays 1 per step: the discounted return is a geometric sum over the episode's length.
    np.testing.assert_allclose(one.returns, one.lengths)
    np.testing.assert_allclose(one.discounted_returns, (1 - 0.9**one.lengths) / (1 - 0.9))
    est = one.estimate(confidence=0.9, n_bootstrap=200)
    assert est.value == pytest.approx(one.discounted_returns.mean())
    assert est.lower <= est.value <= est.upper
    summary = one.to_dict()
    assert summary["episodes"] == 6
    assert summary["return"]["value"] == pytest.approx(one.returns.mean())


def test_rollout_accepts_a_probs_fn_and_rejects_bad_requests() -> None:
    def always_left(obs: np.ndarray) -> np.ndarray:
        return np.tile([1.0, 0.0], (len(obs), 1))

    res = rollout(always_left, Selection(), "CartPole-v1", 3, seed=0)
    assert (res.lengths < 20).all()  # pushing one way topples the pole quickly
    with pytest.raises(RolloutError, match="cannot create environment 'NoSuchEnv-v0'"):
        rollout(always_left, Selection(), "NoSuchEnv-v0", 1)
    with pytest.raises(RolloutError, match="episodes must be >= 1"):
        rollout(always_left, Selection(), "CartPole-v1", 0)
    with pytest.raises(RolloutError, match=r"shape \(1, 3\)"):
        rollout(lambda o: np.full((len(o), 3), 1 / 3), Selection(), "CartPole-v1", 1)


def test_plot_draws_an_interval_that_misses_its_point_estimate(tmp_path: Path) -> None:
    from rlops_trainer import report

    # A bootstrap interval need not contain the point estimate; the picture must still be drawn.
    estimate = {"value": 10.0, "lower": 11.0, "upper": 14.0, "estimator": "fqe"}
    doc = {
        "settings": {"gamma": 0.99, "confidence": 0.95, "estimators": ["fqe"]},
        "behavior": None,
        "policies": [{"label": "p", "role": "candidate", "estimates": {"fqe": estimate}, "rollout": None}],
    }
    out = report.plot(doc, tmp_path / "r.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
