"""Export: TorchScript parity with the eager policy, plain-torch loading, the model card, atomic writes."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rlops_contracts import MODEL_CARD_FILE, POLICY_FILE
from rlops_contracts.artifact import CHECKSUMS_FILE, seal, sha256_file
from rlops_contracts.card import ArtifactError, CardError, validate_card
from rlops_trainer import export
from rlops_trainer.card import build_card, reference_stats
from rlops_trainer.datasets import DatasetMeta, Transitions
from rlops_trainer.export import (
    ExportError,
    check_parity,
    load_policy_dir,
    probe_observations,
    script_policy,
    write_policy_dir,
)
from rlops_trainer.policy import PolicyModule, Selection, mlp
from rlops_trainer.training import TrainResult

OBS_DIM, N_ACTIONS = 4, 3


def make_transitions(n_episodes: int = 8, length: int = 25, seed: int = 0) -> Transitions:
    """Random transitions; feature 3 is binary and feature 0 lies in the space's bounds [-2, 2]."""
    rng = np.random.default_rng(seed)
    n = n_episodes * length
    obs = rng.normal(size=(n + 1, OBS_DIM)).astype(np.float32)
    obs[:, 0] = np.clip(obs[:, 0], -2, 2)
    obs[:, 3] = rng.integers(0, 2, n + 1)
    last = np.arange(n) % length == length - 1
    meta = DatasetMeta(
        env_id="Toy-v0",
        observation_space={
            "type": "Box",
            "shape": [OBS_DIM],
            "low": [-2.0, -np.inf, -3.4e38, 0.0],
            "high": [2.0, np.inf, 3.4e38, 1.0],
        },
        action_space={"type": "Discrete", "n": N_ACTIONS},
        behavior_policy="random",
        source="test",
    )
    return Transitions(
        episode_id=np.repeat(np.arange(n_episodes), length).astype(np.int64),
        step=np.tile(np.arange(length), n_episodes).astype(np.int64),
        observation=obs[:-1],
        action=rng.integers(0, N_ACTIONS, n).astype(np.int64),
        reward=rng.normal(size=n).astype(np.float32),
        next_observation=obs[1:],
        terminated=last,
        truncated=np.zeros(n, dtype=bool),
        behavior_logp=np.full(n, np.log(1 / N_ACTIONS), dtype=np.float32),
        meta=meta,
    )


def make_result(data: Transitions, seed: int = 0, selection: Selection | None = None) -> TrainResult:
    torch.manual_seed(seed)
    obs = data.observation
    policy = PolicyModule(mlp(OBS_DIM, N_ACTIONS, (16, 16)), obs.mean(0), obs.std(0), "q_values").eval()
    return TrainResult(
        algorithm="cql",
        policy=policy,
        selection=selection or Selection(temperature=0.0, epsilon=0.05),
        config={"hidden": (16, 16), "alpha": 1.0, "log_dir": Path("runs")},
        dataset_fingerprint=data.fingerprint(),
        steps=10,
        wall_time_s=0.25,
        final_metrics={"loss": 0.5, "diverged_metric": float("nan")},
        metrics_path=None,
        device="cpu",
    )


def make_policy_dir(root: Path, name: str = "toy", seed: int = 0) -> Path:
    data = make_transitions()
    return write_policy_dir(make_result(data, seed=seed), data, root / f"{name}-{seed}", name)


@pytest.fixture(scope="module")
def data() -> Transitions:
    return make_transitions()


@pytest.fixture(scope="module")
def result(data: Transitions) -> TrainResult:
    return make_result(data)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory, data: Transitions, result: TrainResult) -> Path:
    return write_policy_dir(result, data, tmp_path_factory.mktemp("export") / "policy", "toy")


def test_policy_dir_holds_script_and_valid_card(policy_dir: Path, data: Transitions) -> None:
    assert sorted(p.name for p in policy_dir.iterdir()) == sorted(
        [MODEL_CARD_FILE, POLICY_FILE, CHECKSUMS_FILE]
    )
    assert not [p for p in policy_dir.parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"
    module, card = load_policy_dir(policy_dir)
    assert isinstance(module, torch.jit.ScriptModule)
    assert card["name"] == "toy"
    assert card["version"] is None
    assert card["files"] == {POLICY_FILE: sha256_file(policy_dir / POLICY_FILE)}
    assert card["dataset"]["fingerprint"] == data.fingerprint()
    assert card["dataset"]["n_episodes"] == 8
    assert card["dataset"]["n_transitions"] == 200
    assert card["policy"]["input"] == {"dtype": "float32", "shape": [-1, OBS_DIM]}
    assert card["policy"]["selection"] == {"temperature": 0.0, "epsilon": 0.05}
    assert card["observation_space"]["low"][1] == "-inf"
    assert card["observation_space"]["high"][1] == "inf"
    assert card["hyperparameters"] == {"hidden": [16, 16], "alpha": 1.0, "log_dir": "runs"}
    assert card["training"]["final_metrics"] == {"loss": 0.5, "diverged_metric": None}
    assert [e["event"] for e in card["lineage"]] == ["trained"]
    # Strict JSON: other parsers reject NaN and Infinity.
    assert "NaN" not in (policy_dir / MODEL_CARD_FILE).read_text()


def test_exported_matches_eager_on_probe_set(
    policy_dir: Path, data: Transitions, result: TrainResult
) -> None:
    module, _card = load_policy_dir(policy_dir)
    probe = torch.as_tensor(probe_observations(data))
    with torch.no_grad():
        eager, exported = result.policy(probe), module(probe)
        assert torch.equal(eager.argmax(-1), exported.argmax(-1))
        assert (eager - exported).abs().max().item() <= 1e-5
        for temperature, epsilon in [(0.0, 0.05), (0.5, 0.0), (2.0, 0.3)]:
            p_eager = result.policy.action_probs(probe, temperature, epsilon)
            p_exported = module.action_probs(probe, temperature, epsilon)
            assert (p_eager - p_exported).abs().max().item() <= 1e-5
            assert torch.allclose(p_exported.sum(-1), torch.ones(len(probe)))


class _Fixed(torch.nn.Module):
    """A network whose scores are the observation itself, to check the selection rule exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "torchscript"])
def test_selection_rule_gives_exact_distributions(scripted: bool) -> None:
    policy = PolicyModule(_Fixed(), np.zeros(3), np.ones(3), "q_values")
    module: Any = torch.jit.script(policy) if scripted else policy
    scores = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 0.0], [0.0, float("nan"), 1.0]])
    greedy = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # ties: the first; NaN wins
    assert torch.equal(module.action_probs(scores, 0.0, 0.0), greedy)
    s, p = module.scores_and_probs(scores, 0.0, 0.25)
    torch.testing.assert_close(s, scores, equal_nan=True)
    assert torch.allclose(p, greedy * 0.75 + 0.25 / 3)
    soft = module.action_probs(scores[:2], 1.0, 0.0)
    assert torch.allclose(soft, torch.softmax(scores[:2], dim=-1))
    mixed = module.action_probs(scores[:2], 0.5, 0.3)
    assert torch.allclose(mixed, 0.7 * torch.softmax(scores[:2] / 0.5, dim=-1) + 0.1)


def test_probe_set_is_deterministic_and_inside_the_space(data: Transitions) -> None:
    probe = probe_observations(data)
    np.testing.assert_array_equal(probe, probe_observations(data))
    assert np.isfinite(probe).all()
    assert probe[:, 0].min() == -2.0
    assert probe[:, 0].max() == 2.0
    assert probe[:, 3].min() == 0.0
    assert probe[:, 3].max() == 1.0
    assert np.abs(probe[:, 1]).max() > 3 * np.abs(data.observation[:, 1]).max()  # unbounded: beyond the data


def test_parity_failure_reports_the_max_deviation(data: Transitions, result: TrainResult) -> None:
    drifted = copy.deepcopy(result.policy)
    with torch.no_grad():
        last = list(drifted.net.modules())[-1]
        assert isinstance(last, torch.nn.Linear)
        last.bias.add_(1e-3)  # same ranking of actions, scores off by 1e-3
    with pytest.raises(ExportError, match=r"max deviation 0\.001 in scores"):
        check_parity(result.policy, script_policy(drifted), probe_observations(data), result.selection)


def test_parity_failure_on_different_actions(data: Transitions, result: TrainResult) -> None:
    other = make_result(data, seed=1).policy
    with pytest.raises(ExportError, match="choose different actions"):
        check_parity(result.policy, script_policy(other), probe_observations(data), result.selection)


def test_non_finite_scores_fail_export(tmp_path: Path, data: Transitions) -> None:
    result = make_result(data)
    with torch.no_grad():
        first = next(m for m in result.policy.net.modules() if isinstance(m, torch.nn.Linear))
        first.weight[0, 0] = float("inf")
    with pytest.raises(ExportError, match="non-finite scores"):
        write_policy_dir(result, data, tmp_path / "policy", "toy")
    assert list(tmp_path.iterdir()) == []


PLAIN_TORCH = """
import importlib.abc, json, sys

class NoRlops(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0].startswith("rlops"):
            raise ImportError("policy artifacts must load without rlops: tried to import " + name)
        return None

sys.meta_path.insert(0, NoRlops())
import torch

d = sys.argv[1]
card = json.load(open(d + "/model-card.json"))
m = torch.jit.load(d + "/" + card["policy"]["file"])
x = torch.zeros(5, card["policy"]["input"]["shape"][1])
sel = card["policy"]["selection"]
p = m.action_probs(x, sel["temperature"], sel["epsilon"])
print(json.dumps({"scores": list(m(x).shape), "probs": list(p.shape), "sum": float(p.sum()),
                  "rlops": sorted(k for k in sys.modules if k.startswith("rlops"))}))
"""


def test_artifact_loads_with_plain_torch(policy_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PLAIN_TORCH, str(policy_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report == {
        "scores": [5, N_ACTIONS],
        "probs": [5, N_ACTIONS],
        "sum": pytest.approx(5.0),
        "rlops": [],
    }


def test_tampered_policy_refuses_to_load(tmp_path: Path) -> None:
    d = make_policy_dir(tmp_path)
    raw = bytearray((d / POLICY_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (d / POLICY_FILE).write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"policy\.pt: sha256 does not match .*SHA256SUMS"):
        load_policy_dir(d)
    (d / POLICY_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"policy\.pt: listed in .*SHA256SUMS but missing"):
        load_policy_dir(d)


def test_bad_card_refuses_to_load(tmp_path: Path) -> None:
    d = make_policy_dir(tmp_path)
    card = json.loads((d / MODEL_CARD_FILE).read_text())
    card["training"]["steps"] = "ten"
    (d / MODEL_CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match=r"model-card\.json: sha256 does not match .*SHA256SUMS"):
        load_policy_dir(d)
    with pytest.raises(CardError, match=r"model-card\.json: card\.training\.steps: 'ten' is not of type"):
        seal(d, card, replace=True)
    (d / CHECKSUMS_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"no SHA256SUMS"):
        load_policy_dir(d)
    with pytest.raises(ArtifactError, match="no such policy directory"):
        load_policy_dir(tmp_path / "nowhere")


@pytest.fixture
def card(data: Transitions, result: TrainResult) -> dict[str, Any]:
    c = build_card(result, data, "toy")
    c["files"] = {POLICY_FILE: "sha256:" + "0" * 64}
    return c


def test_card_schema_accepts_a_built_card(card: dict[str, Any]) -> None:
    assert validate_card(card) == card


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.pop("dataset"), "card: 'dataset' is a required property"),
        (
            lambda c: c["dataset"].update(n_transitions="200"),
            "card.dataset.n_transitions: '200' is not of type",
        ),
        (lambda c: c.update(owner="me"), "Additional properties are not allowed"),
        (lambda c: c["lineage"][0].pop("steps"), r"card.lineage\[0\]: 'steps' is a required property"),
        (lambda c: c.update(files={}), "card.files: 'policy.pt' is a required property"),
        (lambda c: c["policy"].update(score_kind="probs"), "card.policy.score_kind: 'probs' is not one of"),
        (
            lambda c: c["observation_space"]["low"].__setitem__(0, "-infinity"),
            r"card.observation_space.low\[0\]: .*'-infinity' is not one of \['-inf', 'inf'\]",
        ),
        (
            lambda c: c["reference"]["actions"]["proportions"].pop(),
            "card.reference.actions.proportions: 2 entries",
        ),
        (
            lambda c: c["reference"]["observation"]["bins"][0]["edges"].pop(),
            r"bins\[0\]: 8 edges need 9 proportions",
        ),
    ],
)
def test_card_schema_rejects_with_a_clear_message(card: dict[str, Any], mutate: Any, message: str) -> None:
    mutate(card)
    with pytest.raises(CardError, match=message):
        validate_card(card)


def test_reference_stats_bins(data: Transitions) -> None:
    ref = reference_stats(data)
    obs = ref["observation"]
    assert obs["n"] == len(data)
    np.testing.assert_allclose(obs["mean"], data.observation.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(obs["max"], data.observation.max(0))
    # A binary feature gets one bin per value; the proportions are the value frequencies.
    binary = obs["bins"][3]
    assert binary["edges"] == [1.0]
    assert binary["proportions"] == pytest.approx(
        [np.mean(data.observation[:, 3] == 0), np.mean(data.observation[:, 3] == 1)]
    )
    # A continuous feature gets 10 bins of about a tenth each, all non-empty.
    cont = obs["bins"][1]
    assert len(cont["edges"]) == 9
    assert np.all(np.diff(cont["edges"]) > 0)
    assert all(0.05 <= p <= 0.15 for p in cont["proportions"])
    for b in obs["bins"]:
        assert sum(b["proportions"]) == pytest.approx(1.0)
        assert min(b["proportions"]) > 0
    counts = np.bincount(data.action, minlength=N_ACTIONS) / len(data)
    assert ref["actions"]["proportions"] == pytest.approx(counts.tolist())


def test_constant_feature_gets_one_bin(data: Transitions) -> None:
    flat = data.select(np.arange(len(data)))
    flat.observation = flat.observation.copy()
    flat.observation[:, 2] = 7.0
    assert reference_stats(flat)["observation"]["bins"][2] == {"edges": [], "proportions": [1.0]}


def test_export_replaces_a_previous_export_only(tmp_path: Path, data: Transitions) -> None:
    target = tmp_path / "policy"
    write_policy_dir(make_result(data, seed=0), data, target, "toy")
    first = sha256_file(target / POLICY_FILE)
    write_policy_dir(make_result(data, seed=1), data, target, "toy")
    assert sha256_file(target / POLICY_FILE) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match="is not a policy directory"):
        write_policy_dir(make_result(data), data, other, "toy")
    assert (other / "todo.txt").read_text() == "keep me"


def test_failed_export_leaves_the_previous_one(
    tmp_path: Path, data: Transitions, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = write_policy_dir(make_result(data, seed=0), data, tmp_path / "policy", "toy")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(export, "seal", fail)
    with pytest.raises(OSError, match="disk full"):
        write_policy_dir(make_result(data, seed=1), data, target, "toy")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_export_checks_the_name(tmp_path: Path, data: Transitions, result: TrainResult) -> None:
    with pytest.raises(ExportError, match="invalid policy name 'cart/pole'"):
        write_policy_dir(result, data, tmp_path / "policy", "cart/pole")


def test_export_checks_the_dataset_is_the_training_one(tmp_path: Path, data: Transitions) -> None:
    result = make_result(make_transitions(seed=5))
    with pytest.raises(ExportError, match="not the one the policy was trained on"):
        write_policy_dir(result, data, tmp_path / "policy", "toy")
