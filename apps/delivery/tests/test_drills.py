"""Drill candidates: what they answer, and that their cards are the source's with the fault recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from delivery_testkit import BOX_HIGH, BOX_LOW, BOX_OBS, GOOD_BOX, box_bandit, box_policy_dir
from rlops_contracts.card import read_card
from rlops_delivery.drills import write_constant_policy_dir, write_drill_policy_dir
from rlops_trainer.export import load_policy_dir


@pytest.fixture
def box_source(tmp_path: Path) -> Path:
    return box_policy_dir(box_bandit(n=50), tmp_path / "source", *GOOD_BOX, std=0.3)


@pytest.mark.parametrize(("bound", "expected"), [("high", BOX_HIGH), ("low", BOX_LOW)])
def test_a_box_constant_drill_acts_at_one_bound(
    box_source: Path, tmp_path: Path, bound: str, expected: np.ndarray
) -> None:
    out = write_constant_policy_dir(box_source, tmp_path / "drill", bound=bound)
    module, card = load_policy_dir(out)  # hashes and card checked, as the registry does
    obs = torch.as_tensor(np.random.default_rng(0).normal(size=(5, BOX_OBS)) * 10, dtype=torch.float32)
    half = (BOX_HIGH - BOX_LOW) / 2
    action = module(obs).double().numpy()
    assert np.allclose(action, np.broadcast_to(expected, action.shape), atol=1e-5 * half.max())
    # The methods serving calls: exploring stays at the bound (the tanh saturates), log-densities exist.
    explored, logp = module.act(obs, 0.3)
    assert explored.shape == (5, 2)
    assert np.allclose(explored.numpy(), expected, atol=1e-3)
    assert torch.isfinite(logp).all()
    assert torch.isfinite(module.log_prob(obs, explored, 0.3)).all()
    assert torch.isnan(module.act(obs, 0.0)[1]).all()
    assert module.pre_squash(obs).shape == (5, 2)
    source = read_card(box_source)
    assert card["action_space"] == source["action_space"]
    assert card["reference"] == source["reference"]
    assert card["policy"]["selection"] == source["policy"]["selection"]
    assert card["hyperparameters"]["fault"] == {"kind": "constant_action", "bound": bound}


def test_box_drills_refuse_what_does_not_apply(box_source: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="a Box policy has no numbered actions"):
        write_constant_policy_dir(box_source, tmp_path / "a", action=1)
    with pytest.raises(ValueError, match=r"bound 'middle': choose from low, high"):
        write_constant_policy_dir(box_source, tmp_path / "b", bound="middle")


def test_a_box_slow_drill_answers_like_its_source_but_later(box_source: Path, tmp_path: Path) -> None:
    out = write_drill_policy_dir(box_source, tmp_path / "drill", "slow", seconds=0.05)
    slow, card = load_policy_dir(out)
    fast, source = load_policy_dir(box_source)
    obs = torch.as_tensor(np.random.default_rng(0).normal(size=(6, BOX_OBS)), dtype=torch.float32)
    actions = np.random.default_rng(1).uniform(BOX_LOW, BOX_HIGH, size=(6, 2)).astype(np.float32)
    torch.testing.assert_close(slow(obs), fast(obs))
    torch.testing.assert_close(slow.pre_squash(obs), fast.pre_squash(obs))
    torch.testing.assert_close(
        slow.log_prob(obs, torch.as_tensor(actions), 0.3), fast.log_prob(obs, torch.as_tensor(actions), 0.3)
    )
    torch.manual_seed(0)
    explored_slow = slow.act(obs, 0.3)
    torch.manual_seed(0)
    torch.testing.assert_close(explored_slow, fast.act(obs, 0.3))
    assert slow.rounds == card["hyperparameters"]["fault"]["rounds"] >= 1  # the matrix products per pass
    assert card["action_space"] == source["action_space"]
    assert card["hyperparameters"]["fault"]["kind"] == "slow_forward"


def test_a_discrete_constant_drill_answers_its_action(cartpole_data: Any, tmp_path: Path) -> None:
    from delivery_testkit import train_policy_dir

    source = train_policy_dir(cartpole_data, tmp_path / "source", steps=5)
    module, card = load_policy_dir(write_drill_policy_dir(source, tmp_path / "drill", "constant", action=1))
    probs = module.action_probs(torch.zeros(3, 4), 0.0, 0.0)
    assert probs.argmax(dim=-1).tolist() == [1, 1, 1]
    assert card["hyperparameters"]["fault"] == {"kind": "constant_action", "action": 1}
    with pytest.raises(ValueError, match=r"action 2 is not one of the policy's 2 actions"):
        write_constant_policy_dir(source, tmp_path / "bad", action=2)
