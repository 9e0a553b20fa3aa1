"""Export of Box (continuous-action) policies: the model card, TorchScript parity, plain-torch loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from continuous_testkit import ACTION_DIM, HIGH, LOW, OBS_DIM, box_result, box_transitions, linear_policy
from rlops_contracts import MODEL_CARD_FILE, POLICY_FILE
from rlops_contracts.card import validate_card
from rlops_trainer.card import N_BINS, build_card
from rlops_trainer.datasets import Transitions
from rlops_trainer.export import (
    ExportError,
    check_continuous_parity,
    load_policy_dir,
    probe_observations,
    script_policy,
    write_policy_dir,
)
from rlops_trainer.policy import ContinuousPolicyModule, Selection


@pytest.fixture(scope="module")
def data() -> Transitions:
    return box_transitions()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory, data: Transitions) -> Path:
    return write_policy_dir(box_result(data, std=0.2), data, tmp_path_factory.mktemp("box") / "p", "box")


def test_box_card_records_the_space_the_selection_and_the_action_reference(data: Transitions) -> None:
    card = build_card(box_result(data, std=0.2), data, "box")
    validate_card({**card, "files": {POLICY_FILE: "sha256:" + "0" * 64}})
    assert card["action_space"] == {
        "type": "Box",
        "shape": [ACTION_DIM],
        "dtype": "float32",
        "low": [-2.0, 0.0],
        "high": [2.0, 1.0],
    }
    assert card["policy"]["score_kind"] == "action"
    assert card["policy"]["selection"] == {"temperature": 0.0, "epsilon": 0.0, "std": 0.2}
    actions = card["reference"]["actions"]
    assert actions["n"] == len(data)
    np.testing.assert_allclose(actions["mean"], data.action.astype(np.float64).mean(axis=0))
    np.testing.assert_allclose(actions["min"], data.action.min(axis=0))
    np.testing.assert_allclose(actions["max"], data.action.max(axis=0))
    for j, b in enumerate(actions["bins"]):
        # Uniform actions: N_BINS quantile bins of about equal mass, counted with the edges recorded.
        assert len(b["edges"]) == N_BINS - 1
        counts = np.bincount(np.searchsorted(b["edges"], data.action[:, j], side="right"), minlength=N_BINS)
        np.testing.assert_allclose(b["proportions"], counts / len(data))
        assert max(b["proportions"]) < 0.15


def test_exported_box_policy_matches_eager_and_stays_in_bounds(policy_dir: Path, data: Transitions) -> None:
    module, card = load_policy_dir(policy_dir)
    eager = cast(ContinuousPolicyModule, box_result(data).policy)
    probe = probe_observations(data)
    deviations = check_continuous_parity(eager, module, probe, Selection(std=0.2))
    assert set(deviations) >= {
        "forward",
        "pre_squash",
        "log_prob(std=0.2)",
        "log_prob(std=0.3)",
        "act(std=0.2).action",
        "act(std=0.3).log_density",
    }
    x = torch.as_tensor(probe)
    with torch.no_grad():
        action = module(x)
    assert (
        (action >= torch.tensor(LOW, dtype=torch.float32))
        & (action <= torch.tensor(HIGH, dtype=torch.float32))
    ).all()
    assert card["policy"]["selection"]["std"] == 0.2


def test_a_std_of_zero_still_checks_exploration_at_the_probe_std(data: Transitions) -> None:
    eager = cast(ContinuousPolicyModule, box_result(data).policy)
    deviations = check_continuous_parity(eager, script_policy(eager), probe_observations(data), Selection())
    assert "log_prob(std=0.3)" in deviations
    assert not any("std=0)" in k for k in deviations)


class _Drifting(torch.nn.Module):
    """A network whose compiled copy differs from the eager one (a scripted branch the eager run skips)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(OBS_DIM, ACTION_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.lin(x) + 0.5
        return self.lin(x)


def test_parity_failure_names_the_output(data: Transitions) -> None:
    eager = ContinuousPolicyModule(_Drifting(), np.zeros(OBS_DIM), np.ones(OBS_DIM), LOW, HIGH).eval()
    with pytest.raises(ExportError, match=r"max deviation .* in (forward|pre_squash|act|log_prob)"):
        check_continuous_parity(eager, script_policy(eager), probe_observations(data), Selection(std=0.1))


def test_non_finite_actions_fail_export(tmp_path: Path, data: Transitions) -> None:
    policy = linear_policy(np.full((ACTION_DIM, OBS_DIM), np.nan), np.zeros(ACTION_DIM))
    with pytest.raises(ExportError, match="non-finite actions on probe inputs"):
        write_policy_dir(box_result(data, policy), data, tmp_path / "nan", "nan")
    assert not (tmp_path / "nan").exists()


def test_policy_and_dataset_must_share_the_action_space(tmp_path: Path, data: Transitions) -> None:
    other = linear_policy(np.zeros((ACTION_DIM, OBS_DIM)), np.zeros(ACTION_DIM), LOW, HIGH + 1.0)
    with pytest.raises(ExportError, match=r"squashes actions into .* but the dataset's action space"):
        write_policy_dir(box_result(data, other), data, tmp_path / "bounds", "bounds")
    from test_export import make_result, make_transitions

    discrete = make_transitions()
    with pytest.raises(ExportError, match="Box needs a ContinuousPolicyModule"):
        write_policy_dir(box_result(discrete), discrete, tmp_path / "d", "d")
    result = make_result(discrete)
    result.dataset_fingerprint = data.fingerprint()
    with pytest.raises(ExportError, match="Box needs a ContinuousPolicyModule"):
        write_policy_dir(result, data, tmp_path / "e", "e")


def test_box_artifact_loads_and_acts_with_plain_torch(policy_dir: Path) -> None:
    card = json.loads((policy_dir / MODEL_CARD_FILE).read_text())
    low, high = card["action_space"]["low"], card["action_space"]["high"]
    script = f"""
import sys, torch
sys.modules['rlops_trainer'] = None  # plain torch only
m = torch.jit.load({str(policy_dir / POLICY_FILE)!r})
x = torch.randn(5, {OBS_DIM})
a = m(x)
torch.manual_seed(0)
b, logp = m.act(x, 0.2)
lp = m.log_prob(x, b, 0.2)
low, high = torch.tensor({low}), torch.tensor({high})
assert a.shape == (5, {ACTION_DIM}) and bool(((a >= low) & (a <= high)).all())
assert bool(torch.allclose(lp, logp, atol=1e-3)), (lp, logp)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
