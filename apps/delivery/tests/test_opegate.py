"""The OPE gate on in-memory logs of Box policies (the served-log join of Box decisions lands with serving).

The logs are a one-step contextual bandit whose best action is known, logged by a uniform behaviour with
exact log-densities: a candidate that acts near the best action must be valued above a champion stuck
near the bounds, and the gate must refuse what the logs cannot support.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from delivery_testkit import GOOD_BOX, POLICY, box_bandit, box_meta, box_policy_dir
from rlops_delivery.config import OPEGateError, OPESettings
from rlops_delivery.opegate import gate

FAST = OPESettings(fqe_steps=400, fqe_models=1, n_bootstrap=50)


def test_fqe_prefers_the_candidate_near_the_best_action(box_registry: Path) -> None:
    data = box_bandit()
    result = gate(box_registry, POLICY, 2, data, dataclasses.replace(FAST, estimator="fqe"))
    cand, champ = result["estimates"]["candidate"], result["estimates"]["champion"]
    # The true values: about -0.1 for the candidate (only its exploration noise costs), about -2 for the
    # champion (near opposite bounds); FQE on the logged rewards must order them with room to spare.
    assert cand["value"] > champ["value"] + 0.5
    assert result["promote"] is True
    assert result["data"]["action_space"] == "Box"
    # Both explore (std 0.3) and the logs carry log-densities: every estimator is possible.
    assert result["possible_estimators"] == ["pdis", "wpdis", "fqe", "dr", "wdr"]


def test_doubly_robust_is_the_default_when_both_explore(box_registry: Path) -> None:
    result = gate(box_registry, POLICY, 2, box_bandit(), FAST)
    assert result["settings"]["estimator"] == "dr"
    assert result["estimates"]["candidate"]["value"] > result["estimates"]["champion"]["value"]


def test_a_deterministic_policy_is_valued_by_fqe_only(box_registry: Path, tmp_path: Path) -> None:
    data = box_bandit()
    deterministic = box_policy_dir(data, tmp_path / "det", *GOOD_BOX, std=0.0)
    result = gate(box_registry, POLICY, deterministic, data, FAST)
    assert result["settings"]["estimator"] == "fqe"
    assert result["possible_estimators"] == ["fqe"]
    with pytest.raises(
        OPEGateError,
        match=r"estimator dr needs importance weights.*candidate policy is "
        r"deterministic.*accepted here: fqe",
    ):
        gate(box_registry, POLICY, deterministic, data, dataclasses.replace(FAST, estimator="dr"))


def test_logs_without_log_densities_allow_fqe_only(box_registry: Path) -> None:
    data = box_bandit()
    data.behavior_logp[:] = np.nan
    with pytest.raises(
        OPEGateError, match="estimator wdr needs behaviour propensities, and the logs have none"
    ):
        gate(box_registry, POLICY, 2, data, dataclasses.replace(FAST, estimator="wdr"))


def test_the_spaces_must_match_the_logs(box_registry: Path, cartpole_data: Any) -> None:
    wider = box_bandit(meta=box_meta(high=np.array([3.0, 1.0])))
    with pytest.raises(
        OPEGateError,
        match=r"candidate \(2\) acts within \[\[-2.0, 0.0\], \[2.0, 1.0\]\], but "
        r"the logs' action space is \[\[-2.0, 0.0\], \[3.0, 1.0\]\]",
    ):
        gate(box_registry, POLICY, 2, wider, FAST)
    one_dim = box_bandit(meta=box_meta(low=np.array([-2.0]), high=np.array([2.0])))
    with pytest.raises(OPEGateError, match=r"gives actions of 2 dimensions, but the logs' have 1"):
        gate(box_registry, POLICY, 2, one_dim, FAST)
    with pytest.raises(OPEGateError, match=r"takes 3 observation features, but the logs have 4"):
        gate(box_registry, POLICY, 2, cartpole_data, FAST)
    with pytest.raises(OPEGateError, match=r"acts in a Box action space, but the logs' is Discrete"):
        gate(box_registry, POLICY, 2, _discrete_with_obs(3), FAST)


def _discrete_with_obs(obs_dim: int) -> Any:
    from rlops_trainer.datasets import DatasetMeta, Transitions

    n = 10
    rng = np.random.default_rng(0)
    meta = DatasetMeta(
        env_id="ToyDiscrete-v0",
        observation_space={
            "type": "Box",
            "shape": [obs_dim],
            "low": ["-inf"] * obs_dim,
            "high": ["inf"] * obs_dim,
        },
        action_space={"type": "Discrete", "n": 2},
        behavior_policy="uniform",
        source="test",
    )
    return Transitions(
        episode_id=np.arange(n, dtype=np.int64),
        step=np.zeros(n, dtype=np.int64),
        observation=rng.normal(size=(n, obs_dim)).astype(np.float32),
        action=rng.integers(0, 2, size=n).astype(np.int64),
        reward=np.zeros(n, dtype=np.float32),
        next_observation=rng.normal(size=(n, obs_dim)).astype(np.float32),
        terminated=np.ones(n, dtype=bool),
        truncated=np.zeros(n, dtype=bool),
        behavior_logp=np.full(n, np.log(0.5), dtype=np.float32),
        meta=meta,
    )
