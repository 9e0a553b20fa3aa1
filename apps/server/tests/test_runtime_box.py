"""Serving a policy with a Box action space, without TorchServe: loading, requests, actions, log-densities,
fallback, decision-log records and the per-dimension action metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rlops_contracts import DECISION_FIELDS
from rlops_contracts.artifact import seal, sha256_file
from rlops_contracts.card import read_card
from rlops_server import metrics as m
from rlops_server.requests import MAX_STD, RequestError
from rlops_server.runtime import PolicyLoadError, PolicyRuntime
from rlops_server.settings import ServingSettings
from server_testkit import (
    BOX_EDGES,
    BOX_HIGH,
    BOX_LOW,
    BOX_MEAN,
    POISON,
    write_box_policy_dir,
    write_policy_dir,
)

OBS = [0.5, -2.0, 0.0, 0.3]
"""Pre-squash mean +obs[:2] = [0.5, -2.0]."""
MID = (np.array(BOX_HIGH) + np.array(BOX_LOW)) / 2.0
HALF = (np.array(BOX_HIGH) - np.array(BOX_LOW)) / 2.0


def load(tmp_path: Path, std: float = 0.0, **card: Any) -> PolicyRuntime:
    return PolicyRuntime.load(
        write_box_policy_dir(tmp_path / "box", std=std, **card), ServingSettings(seed=0)
    )


def decide(rt: PolicyRuntime, *bodies: dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    reqs = [rt.parse(b) for b in bodies]
    decisions = rt.decide(reqs)
    return [rt.answer(r, decisions, i, rt.decision_ids(r)) for i, r in enumerate(reqs)], decisions


def squashed_gaussian_logp(action: np.ndarray, u: np.ndarray, std: float) -> float:
    """log-density of ``action`` = mid + half * tanh(z), z ~ N(u, std^2), by hand."""
    y = (action - MID) / HALF
    z = np.arctanh(y)
    gaussian = -0.5 * ((z - u) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
    jacobian = np.log(HALF * (1.0 - y**2))
    return float((gaussian - jacobian).sum())


def rejection(rt: PolicyRuntime, body: dict[str, Any]) -> RequestError:
    with pytest.raises(RequestError) as e:
        rt.parse(body)
    return e.value


# --- loading ---------------------------------------------------------------------------------------


def test_load_reads_a_box_card(tmp_path: Path) -> None:
    rt = load(tmp_path, std=0.3)
    assert rt.continuous
    assert (rt.action_dim, rt.std, rt.obs_dim) == (2, 0.3, 4)
    assert rt.fallback_box.tolist() == BOX_MEAN
    assert rt.action_bins is not None
    assert rt.action_bins.bins.tolist() == [4, 4]


def test_fallback_is_the_reference_mean_clipped_into_the_bounds(tmp_path: Path) -> None:
    rt = load(tmp_path, mean=[2.0, -0.5])
    assert rt.fallback_box.tolist() == [1.0, 0.0]


def test_an_action_index_fallback_is_refused_for_a_box_policy(tmp_path: Path) -> None:
    d = write_box_policy_dir(tmp_path / "box")
    with pytest.raises(PolicyLoadError, match=r"fallback_action 0 is an action index.*Box action space"):
        PolicyRuntime.load(d, ServingSettings(fallback_action=0))


def test_a_policy_whose_actions_do_not_fit_the_card_stops_at_load(tmp_path: Path) -> None:
    d = write_box_policy_dir(tmp_path / "box")
    card = read_card(d)
    card["action_space"].update(shape=[3], low=[-1.0] * 3, high=[1.0] * 3)
    actions = card["reference"]["actions"]
    for key in ("mean", "std", "min", "max"):
        actions[key] = [0.0] * 3
    actions["bins"] = [{"edges": [0.0], "proportions": [0.5, 0.5]}] * 3
    seal(d, card, replace=True)
    with pytest.raises(PolicyLoadError, match=r"expected \(1, 3\), \(1, 3\) and \(1,\)"):
        PolicyRuntime.load(d)


def test_a_box_card_needs_an_act_method(tmp_path: Path) -> None:
    # A Discrete policy file under a Box card: no act(obs, std).
    d = write_policy_dir(tmp_path / "discrete")
    box = write_box_policy_dir(tmp_path / "box")
    card = read_card(box)
    (box / "policy.pt").write_bytes((d / "policy.pt").read_bytes())
    card["files"]["policy.pt"] = sha256_file(box / "policy.pt")
    seal(box, card, replace=True)
    with pytest.raises(PolicyLoadError, match=r"no exported act\(obs, std\) method"):
        PolicyRuntime.load(box)


# --- requests --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"observation": OBS, "temperature": 0.5}, "temperature"),
        ({"observation": OBS, "epsilon": 0.1}, "epsilon"),
        ({"observation": OBS, "action_mask": [1, 0]}, "action_mask"),
        ({"observations": [OBS], "action_masks": [[1, 0]]}, "action_masks"),
    ],
)
def test_discrete_fields_are_refused_naming_what_a_box_policy_accepts(
    tmp_path: Path, body: dict[str, Any], field: str
) -> None:
    e = rejection(load(tmp_path), body)
    assert e.status == 422
    assert e.reason == m.R_BAD_OPTION
    assert f"'{field}' is for policies with a Discrete action space" in e.message
    assert "Box action space of 2 dimension(s)" in e.message
    assert "'std'" in e.accepted
    assert "'deterministic'" in e.accepted


def test_probabilities_are_refused_for_a_box_policy(tmp_path: Path) -> None:
    e = rejection(load(tmp_path), {"observation": OBS, "return": ["probabilities"]})
    assert (e.status, e.reason) == (422, m.R_BAD_OPTION)
    assert "'probabilities'" in e.message
    assert "['scores']" in e.accepted


def test_std_is_refused_for_a_discrete_policy(policy_dir: Path) -> None:
    e = rejection(PolicyRuntime.load(policy_dir), {"observation": OBS, "std": 0.1})
    assert (e.status, e.reason) == (422, m.R_BAD_OPTION)
    assert "'std' is for policies with a Box action space; this policy has 3 discrete actions" in e.message


@pytest.mark.parametrize("std", [-0.1, MAX_STD + 1, "0.1", True, None, float("inf")])
def test_std_out_of_range_is_refused(tmp_path: Path, std: Any) -> None:
    e = rejection(load(tmp_path), {"observation": OBS, "std": std})
    assert (e.status, e.reason) == (422, m.R_BAD_OPTION)
    assert f"[0, {MAX_STD:g}]" in e.accepted


def test_deterministic_and_std_together_are_refused(tmp_path: Path) -> None:
    e = rejection(load(tmp_path), {"observation": OBS, "deterministic": True, "std": 0.2})
    assert e.status == 422
    assert "cannot be combined with 'std'" in e.message


def test_std_defaults_to_the_card_and_deterministic_means_zero(tmp_path: Path) -> None:
    rt = load(tmp_path, std=0.3)
    assert rt.parse({"observation": OBS}).std == 0.3
    assert rt.parse({"observation": OBS, "std": 1.5}).std == 1.5
    assert rt.parse({"observation": OBS, "deterministic": True}).std == 0.0


# --- deciding --------------------------------------------------------------------------------------


def test_deterministic_action_is_the_squashed_mean_without_a_density(tmp_path: Path) -> None:
    [answer], _ = decide(load(tmp_path), {"observation": OBS, "return": ["scores"]})
    expected = MID + HALF * np.tanh(np.array(OBS[:2]))
    assert answer["action"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert answer["log_density"] is None
    assert answer["scores"] == pytest.approx(OBS[:2])
    assert "propensity" not in answer
    assert answer["fallback"] is False
    json.dumps(answer, allow_nan=False)


def test_explored_action_carries_its_log_density(tmp_path: Path) -> None:
    rt = load(tmp_path, std=0.4)
    [answer], _ = decide(rt, {"observations": [OBS] * 50})
    actions = np.array([d["action"] for d in answer["decisions"]], dtype=np.float64)
    logps = [d["log_density"] for d in answer["decisions"]]
    assert len({tuple(a) for a in actions.tolist()}) == 50  # noise: every draw differs
    for a, logp in zip(actions, logps, strict=True):
        assert logp == pytest.approx(squashed_gaussian_logp(a, np.array(OBS[:2]), 0.4), abs=2e-3)
    # The policy's own log_prob agrees with what was answered.
    again = rt.module.log_prob(torch.tensor([OBS] * 50), torch.tensor(actions, dtype=torch.float32), 0.4)
    assert again.numpy() == pytest.approx(logps, abs=2e-3)


def test_actions_stay_inside_the_bounds_even_with_the_largest_noise(tmp_path: Path) -> None:
    rt = load(tmp_path)
    [answer], _ = decide(rt, {"observations": [OBS] * 500, "std": MAX_STD})
    actions = np.array([d["action"] for d in answer["decisions"]])
    assert (actions >= BOX_LOW).all()
    assert (actions <= BOX_HIGH).all()


def test_a_server_batch_with_several_stds_calls_act_once_per_std(tmp_path: Path) -> None:
    rt = load(tmp_path, std=0.2)
    answers, decisions = decide(
        rt,
        {"observation": OBS, "deterministic": True},
        {"observations": [OBS, OBS]},
        {"observation": OBS, "std": 0.0},
    )
    assert answers[0]["log_density"] is None
    assert answers[2]["log_density"] is None
    assert answers[0]["action"] == answers[2]["action"]
    assert all(d["log_density"] is not None for d in answers[1]["decisions"])
    assert decisions.log_densities is not None
    assert np.isnan(decisions.log_densities[[0, 3]]).all()


def test_nonfinite_actions_answer_the_fallback(tmp_path: Path) -> None:
    rt = load(tmp_path, std=0.5, mean=[2.0, 3.0])
    poisoned = [0.0, 0.0, 0.0, POISON]
    [answer], decisions = decide(rt, {"observations": [OBS, poisoned]})
    good, bad = answer["decisions"]
    assert not good["fallback"]
    assert good["log_density"] is not None
    assert bad["fallback"] is True
    assert bad["action"] == [1.0, 3.0]  # the reference mean, clipped into the bounds
    assert bad["log_density"] is None
    assert (decisions.nonfinite, decisions.errors) == (1, 0)


class BrokenBox(torch.nn.Module):
    def act(self, obs: torch.Tensor, std: float) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("shape mismatch")


def test_a_failing_act_answers_the_fallback(tmp_path: Path) -> None:
    rt = load(tmp_path)
    rt.module = BrokenBox()  # type: ignore[assignment]
    [answer], decisions = decide(rt, {"observations": [OBS, OBS]})
    assert [d["action"] for d in answer["decisions"]] == [BOX_MEAN, BOX_MEAN]
    assert (decisions.errors, decisions.nonfinite) == (2, 0)


def test_seeded_runtimes_draw_the_same_actions(tmp_path: Path) -> None:
    d = write_box_policy_dir(tmp_path / "box", std=0.5)
    first = decide(PolicyRuntime.load(d, ServingSettings(seed=3)), {"observations": [OBS] * 4})[0]
    second = decide(PolicyRuntime.load(d, ServingSettings(seed=3)), {"observations": [OBS] * 4})[0]
    assert [x["action"] for x in first[0]["decisions"]] == [x["action"] for x in second[0]["decisions"]]


# --- decision log ----------------------------------------------------------------------------------


def test_records_of_a_box_policy(tmp_path: Path) -> None:
    rt = load(tmp_path, std=0.3)
    req = rt.parse({"observations": [OBS, OBS], "episode_ids": ["e", "e"], "steps": [0, 1]})
    decisions = rt.decide([req])
    ids = rt.decision_ids(req)
    records = rt.records(req, decisions, 0, ids)
    assert all(tuple(r) == DECISION_FIELDS for r in records)
    first = records[0]
    assert first["action"] == pytest.approx(decisions.actions[0].tolist())
    assert isinstance(first["action"], list)
    assert len(first["action"]) == 2
    assert (first["propensity"], first["temperature"], first["epsilon"], first["action_mask"]) == (
        None,
        None,
        None,
        None,
    )
    assert first["std"] == 0.3
    assert decisions.log_densities is not None
    assert first["log_density"] == pytest.approx(float(decisions.log_densities[0]))
    json.dumps(records, allow_nan=False)
    deterministic = rt.parse({"observation": OBS, "deterministic": True})
    [record] = rt.records(deterministic, rt.decide([deterministic]), 0, ["d"])
    assert (record["log_density"], record["std"]) == (None, 0.0)


def test_discrete_records_have_null_box_fields(policy_dir: Path) -> None:
    rt = PolicyRuntime.load(policy_dir)
    req = rt.parse({"observation": OBS})
    [record] = rt.records(req, rt.decide([req]), 0, ["d"])
    assert tuple(record) == DECISION_FIELDS
    assert (record["log_density"], record["std"]) == (None, None)


# --- metrics ---------------------------------------------------------------------------------------


def test_action_drift_bins_values_and_reference_per_dimension(tmp_path: Path) -> None:
    rt = load(tmp_path)
    sent: list[tuple[str, float, list[str]]] = []
    assert rt.action_bins is not None
    rec = m.MetricsRecorder(
        lambda name, value, labels: sent.append((name, value, labels)),
        rt.name,
        rt.version,
        rt.n_actions,
        rt.drift_counts,
        rt.drift_bins,
        reference=(rt.observation_bins.proportions, []),
        action_bins=rt.action_bins,
    )
    # Deterministic actions of these observations: dimension 0 = tanh(x0), dimension 1 = 2 + 2 tanh(x1).
    obs = [[-2.0, -2.0, 0, 0], [0.1, 0.0, 0, 0], [0.1, 2.0, 0, 0]]
    req = rt.parse({"observations": obs, "deterministic": True})
    decisions = rt.decide([req])
    rec.record_batch(decisions)
    rec.flush()
    drift = {(lb[2], lb[3]): v for name, v, lb in sent if name == m.ACTION_DRIFT_BIN}
    expected: dict[tuple[str, str], int] = {}
    for j, edges in enumerate(BOX_EDGES):
        for a in decisions.actions[:, j].tolist():
            key = (str(j), str(int(np.searchsorted(edges, a, side="right"))))
            expected[key] = expected.get(key, 0) + 1
    assert drift == expected
    assert drift == {("0", "0"): 1, ("0", "2"): 2, ("1", "0"): 1, ("1", "2"): 1, ("1", "3"): 1}
    sums = {lb[2]: v for name, v, lb in sent if name == m.ACTION_VALUE_SUM}
    assert sums["0"] == pytest.approx(float(np.tanh(-2.0) + 2 * np.tanh(0.1)), abs=1e-5)
    assert sums["1"] == pytest.approx(float(3 * 2.0 + 2 * (np.tanh(-2.0) + np.tanh(2.0))), abs=1e-5)
    assert {lb[2]: v for name, v, lb in sent if name == m.ACTION_VALUE_COUNT} == {"0": 3, "1": 3}
    assert [(v, lb[2]) for name, v, lb in sent if name == m.ACTIONS] == [(3, m.CONTINUOUS_ACTION)]
    reference = {(lb[2], lb[3]): v for name, v, lb in sent if name == m.ACTION_BIN_REFERENCE}
    assert reference == {(str(j), str(b)): 0.25 for j in range(2) for b in range(4)}
    assert not [s for s in sent if s[0] in (m.ACTION_REFERENCE, m.POLICY_ENTROPY)]
    # Gauges of the reference are sent once per worker.
    sent.clear()
    rec.flush()
    assert not [s for s in sent if s[0] == m.ACTION_BIN_REFERENCE]
