"""The serving core without TorchServe: loading and checking a policy version, validation, decisions."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rlops_contracts.artifact import seal, sha256_file
from rlops_server.requests import RequestError
from rlops_server.runtime import PolicyLoadError, PolicyRuntime, uuid4_batch
from rlops_server.settings import ServingSettings
from server_testkit import ACTION_PROPORTIONS, EDGES, N_ACTIONS, OBS_DIM, POISON, write_policy_dir

OBS = [0.5, 2.0, -1.0, 0.3]
"""Scores +obs[:3] = [0.5, 2.0, -1.0]: the greedy action of a sign=+1 policy is 1."""


@pytest.fixture
def runtime(policy_dir: Path) -> PolicyRuntime:
    return PolicyRuntime.load(policy_dir, ServingSettings(seed=0))


def stochastic(tmp_path: Path, **settings: Any) -> PolicyRuntime:
    """A logits policy scoring -obs, served with temperature 1 and epsilon 0.1."""
    d = write_policy_dir(
        tmp_path / "stochastic", sign=-1.0, score_kind="logits", temperature=1.0, epsilon=0.1
    )
    return PolicyRuntime.load(d, ServingSettings(seed=0, **settings))


def decide_one(rt: PolicyRuntime, body: dict[str, Any]) -> dict[str, Any]:
    req = rt.parse(body)
    decisions = rt.decide([req])
    return rt.answer(req, decisions, 0, rt.decision_ids(req))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# --- loading ---------------------------------------------------------------------------------------


def test_load_reads_the_card(runtime: PolicyRuntime) -> None:
    assert (runtime.name, runtime.version, runtime.n_actions, runtime.obs_dim) == (
        "toy",
        1,
        N_ACTIONS,
        OBS_DIM,
    )
    assert runtime.score_kind == "q_values"
    assert (runtime.temperature, runtime.epsilon) == (0.0, 0.0)
    assert runtime.fallback_action == int(np.argmax(ACTION_PROPORTIONS)) == 1


def test_sha256_mismatch_refuses_to_load(policy_dir: Path) -> None:
    expected = json.loads((policy_dir / "model-card.json").read_text())["files"]["policy.pt"]
    with open(policy_dir / "policy.pt", "ab") as f:
        f.write(b"tampered")
    actual = sha256_file(policy_dir / "policy.pt")
    with pytest.raises(PolicyLoadError) as e:
        PolicyRuntime.load(policy_dir)
    message = str(e.value)
    assert str(policy_dir / "policy.pt") in message
    assert expected in message
    assert actual in message
    assert "refusing" in message


def test_missing_policy_file_refuses_to_load(policy_dir: Path) -> None:
    (policy_dir / "policy.pt").unlink()
    with pytest.raises(PolicyLoadError, match=r"policy\.pt: listed in .*SHA256SUMS but missing"):
        PolicyRuntime.load(policy_dir)


def test_card_against_schema(policy_dir: Path) -> None:
    card = json.loads((policy_dir / "model-card.json").read_text())
    card["action_space"]["n"] = 0
    (policy_dir / "model-card.json").write_text(json.dumps(card))
    # Changed after it was written: the recorded hash catches it before the content is even read.
    with pytest.raises(PolicyLoadError, match=r"model-card\.json: sha256 does not match .*SHA256SUMS"):
        PolicyRuntime.load(policy_dir)
    with pytest.raises(ValueError, match=r"card\.action_space\.n"):
        seal(policy_dir, card, replace=True)


def test_card_cross_field_checks(policy_dir: Path) -> None:
    card = json.loads((policy_dir / "model-card.json").read_text())
    card["reference"]["observation"]["bins"] = card["reference"]["observation"]["bins"][:2]
    # A card written without the contract's checks (SHA256SUMS made to match by hand).
    data = (json.dumps(card) + "\n").encode()
    (policy_dir / "model-card.json").write_bytes(data)
    sums = (policy_dir / "SHA256SUMS").read_text().splitlines()
    digest = sha256_file(policy_dir / "model-card.json").removeprefix("sha256:")
    sums = [f"{digest}  model-card.json" if line.endswith("model-card.json") else line for line in sums]
    (policy_dir / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    with pytest.raises(
        PolicyLoadError,
        match=r"reference\.observation\.bins: 2 entries, expected one per observation feature",
    ):
        PolicyRuntime.load(policy_dir)


def test_fallback_action_must_exist(policy_dir: Path) -> None:
    with pytest.raises(PolicyLoadError, match="fallback_action 7 is not an action"):
        PolicyRuntime.load(policy_dir, ServingSettings(fallback_action=7))


def test_settings_from_mapping() -> None:
    assert ServingSettings.from_mapping(None) == ServingSettings()
    assert ServingSettings.from_mapping({"max_batch_observations": 8}).max_batch_observations == 8
    with pytest.raises(ValueError, match=r"unknown setting.*max_batch; known: max_batch_observations"):
        ServingSettings.from_mapping({"max_batch": 8}, source="x")
    with pytest.raises(ValueError, match="metrics_flush_seconds must be a number in"):
        ServingSettings.from_mapping({"metrics_flush_seconds": 0})
    with pytest.raises(ValueError, match="worker_log_level must be one of"):
        ServingSettings(worker_log_level="LOUD")


# --- validation ------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("not json", b'{"observation": [1, 2', 400, "malformed_json"),
    ("empty body", b"", 400, "malformed_json"),
    ("not utf-8", b"\xff\xfe{}", 400, "malformed_json"),
    ("NaN literal", b'{"observation": [NaN, 0, 0, 0]}', 422, "nonfinite_observation"),
    ("not an object", [1, 2, 3, 4], 400, "not_an_object"),
    ("no observation", {"obs": OBS}, 400, "missing_observation"),
    ("both forms", {"observation": OBS, "observations": [OBS]}, 400, "bad_field"),
    ("unknown field", {"observation": OBS, "temprature": 1.0}, 400, "bad_field"),
    ("batch field in single", {"observation": OBS, "steps": [1]}, 400, "bad_field"),
    ("wrong dimension", {"observation": [1.0, 2.0, 3.0]}, 422, "bad_observation"),
    ("nested too deep", {"observation": [[1.0, 2.0, 3.0, 4.0]]}, 422, "bad_observation"),
    ("not a list", {"observation": "1,2,3,4"}, 422, "bad_observation"),
    ("strings", {"observation": ["1", "2", "3", "4"]}, 422, "bad_observation"),
    ("null inside", {"observation": [1.0, None, 3.0, 4.0]}, 422, "bad_observation"),
    ("booleans", {"observation": [True, False, True, False]}, 422, "bad_observation"),
    ("ragged batch", {"observations": [OBS, [1.0]]}, 422, "bad_observation"),
    ("NaN value", {"observation": [float("nan"), 0.0, 0.0, 0.0]}, 422, "nonfinite_observation"),
    ("inf value", {"observation": [float("inf"), 0.0, 0.0, 0.0]}, 422, "nonfinite_observation"),
    ("beyond float32", {"observation": [1e39, 0.0, 0.0, 0.0]}, 422, "nonfinite_observation"),
    ("empty batch", {"observations": []}, 422, "empty_batch"),
    ("oversized batch", {"observations": [OBS] * 9}, 413, "batch_too_large"),
    ("mask length", {"observation": OBS, "action_mask": [1, 0]}, 422, "bad_mask"),
    ("mask values", {"observation": OBS, "action_mask": [1, 2, 0]}, 422, "bad_mask"),
    ("mask floats", {"observation": OBS, "action_mask": [1.0, 0.0, 1.0]}, 422, "bad_mask"),
    ("mask allows nothing", {"observation": OBS, "action_mask": [0, 0, 0]}, 422, "bad_mask"),
    ("masks per obs mismatch", {"observations": [OBS, OBS], "action_masks": [[1, 1, 1]]}, 422, "bad_mask"),
    (
        "both mask forms",
        {"observations": [OBS], "action_mask": [1, 1, 1], "action_masks": [[1, 1, 1]]},
        400,
        "bad_field",
    ),
    ("temperature range", {"observation": OBS, "temperature": 11}, 422, "bad_option"),
    ("negative temperature", {"observation": OBS, "temperature": -0.5}, 422, "bad_option"),
    ("epsilon range", {"observation": OBS, "epsilon": 1.5}, 422, "bad_option"),
    ("epsilon type", {"observation": OBS, "epsilon": "0.1"}, 422, "bad_option"),
    ("deterministic type", {"observation": OBS, "deterministic": "yes"}, 422, "bad_option"),
    (
        "deterministic and override",
        {"observation": OBS, "deterministic": True, "temperature": 1},
        422,
        "bad_option",
    ),
    ("return option", {"observation": OBS, "return": ["logits"]}, 422, "bad_option"),
    ("decision id type", {"observation": OBS, "decision_id": 12}, 422, "bad_option"),
    ("decision id length", {"observation": OBS, "decision_id": "x" * 129}, 422, "bad_option"),
    ("step negative", {"observation": OBS, "step": -1}, 422, "bad_option"),
    ("step bool", {"observation": OBS, "step": True}, 422, "bad_option"),
    ("steps length", {"observations": [OBS, OBS], "steps": [1]}, 422, "bad_option"),
]


@pytest.mark.parametrize(
    ("body", "status", "reason"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests_are_answered_with_what_is_accepted(
    policy_dir: Path, body: Any, status: int, reason: str
) -> None:
    rt = PolicyRuntime.load(policy_dir, ServingSettings(max_batch_observations=8))
    with pytest.raises(RequestError) as e:
        rt.parse(body)
    err = e.value
    assert (err.status, err.reason) == (status, reason), err.message
    body_out = err.body()
    assert body_out["error"]
    assert body_out["accepted"]
    assert body_out["status"] == status
    json.dumps(body_out, allow_nan=False)


def test_error_names_the_offending_position(runtime: PolicyRuntime) -> None:
    with pytest.raises(RequestError, match=r"observations\[1\]\[2\] is .*nan"):
        runtime.parse({"observations": [OBS, [0.0, 0.0, float("nan"), 0.0]]})


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b"[" * 100_000,
        b'{"observation": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}",
        '{"observation": [0, 0, 0, 0], "decision_id": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}",
    ],
    ids=["array", "unclosed", "observation", "decision_id text"],
)
def test_json_nested_too_deeply_is_a_bad_request(runtime: PolicyRuntime, body: bytes | str) -> None:
    # Python's json parser gives up with RecursionError, which is not a ValueError.
    with pytest.raises(RequestError) as e:
        runtime.parse(body)
    assert (e.value.status, e.value.reason) == (400, "malformed_json")
    assert "nested too deeply" in e.value.message


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    "extra",
    [
        {"decision_id": [0] * 1_000_000},
        {"episode_id": ["é" * 100] * 10_000},
        {"step": "x" * 1_000_000},
        {"deterministic": "y" * 1_000_000},
        {"return": ["x"] * 1_000_000},
        {"step": -(10**4000)},
        {f"k{i}": 0 for i in range(100_000)},
        {"é" * 1_000_000: 1},
        {"decision_id": _nested(800)},
    ],
    ids=["list", "non-ascii list", "long string", "deterministic", "return", "huge integer", "many fields",
         "long field name", "nested"],
)  # fmt: skip
def test_errors_show_what_was_sent_cut_short(runtime: PolicyRuntime, extra: dict[str, Any]) -> None:
    # An answer above TorchServe's max_response_size (6.5 MB by default) makes the frontend drop the
    # worker: a request of a few megabytes must not be echoed back in full, nor grow on the way.
    with pytest.raises(RequestError) as e:
        runtime.parse({"observation": OBS, **extra})
    assert len(json.dumps(e.value.body())) < 2000, e.value.message[:300]


@pytest.mark.parametrize(
    "extra", [{"temperature": 10**400}, {"epsilon": -(10**400)}], ids=["temperature", "epsilon"]
)
def test_integers_beyond_a_float_are_out_of_range(runtime: PolicyRuntime, extra: dict[str, Any]) -> None:
    # JSON integers have no size limit; math.isfinite raises OverflowError for one beyond a float.
    with pytest.raises(RequestError) as e:
        runtime.parse({"observation": OBS, **extra})
    assert (e.value.status, e.value.reason) == (422, "bad_option")
    assert "out of range" in e.value.message


@pytest.mark.parametrize(
    "extra",
    [{"decision_id": "d-\ud800"}, {"episode_id": "\udfff"}, {"step": 2**63}],
    ids=["lone surrogate id", "lone surrogate episode", "step beyond int64"],
)
def test_values_the_decision_log_cannot_hold_are_refused(
    runtime: PolicyRuntime, extra: dict[str, Any]
) -> None:
    # A decision answered but not logged breaks the loop: the log (UTF-8 JSON lines, steps as int64)
    # cannot hold a lone surrogate nor an integer beyond 64 bits, so the request is refused instead.
    with pytest.raises(RequestError) as e:
        runtime.parse(json.dumps({"observation": OBS, **extra}))
    assert (e.value.status, e.value.reason) == (422, "bad_option")


def test_largest_step_is_accepted(runtime: PolicyRuntime) -> None:
    assert runtime.parse({"observation": OBS, "step": 2**63 - 1}).steps == [2**63 - 1]


def test_json_text_and_bytes_bodies(runtime: PolicyRuntime) -> None:
    for body in (json.dumps({"observation": OBS}), json.dumps({"observation": OBS}).encode()):
        req = runtime.parse(body)
        assert req.observations.tolist() == [np.asarray(OBS, dtype=np.float32).tolist()]


def test_integer_observations_and_episode_ids(runtime: PolicyRuntime) -> None:
    req = runtime.parse({"observation": [1, 2, 3, 4], "episode_id": 17, "step": 3, "decision_id": "d-1"})
    assert req.observations.dtype == np.float32
    assert (req.episode_ids, req.steps, req.decision_ids) == (["17"], [3], ["d-1"])


# --- decisions -------------------------------------------------------------------------------------


def test_greedy_policy_answers_argmax_with_propensity_one(runtime: PolicyRuntime) -> None:
    out = decide_one(runtime, {"observation": OBS, "return": ["probabilities", "scores"]})
    assert out["action"] == 1
    assert out["propensity"] == 1.0
    assert out["probabilities"] == [0.0, 1.0, 0.0]
    assert out["scores"] == pytest.approx(OBS[:3])
    assert (out["policy"], out["version"], out["fallback"]) == ("toy", 1, False)
    assert uuid.UUID(out["decision_id"]).version == 4


def test_stochastic_propensity_is_the_probability_of_the_chosen_action(tmp_path: Path) -> None:
    rt = stochastic(tmp_path)
    expected = 0.9 * softmax(-np.array(OBS[:3])) + 0.1 / 3
    for _ in range(20):
        out = decide_one(rt, {"observation": OBS, "return": ["probabilities"]})
        assert out["probabilities"] == pytest.approx(expected.tolist())
        assert out["propensity"] == pytest.approx(out["probabilities"][out["action"]])


def test_sampling_follows_the_served_distribution(tmp_path: Path) -> None:
    rt = stochastic(tmp_path, max_batch_observations=20000)
    req = rt.parse({"observations": [OBS] * 20000})
    decisions = rt.decide([req])
    freq = np.bincount(decisions.actions, minlength=3) / 20000
    expected = 0.9 * softmax(-np.array(OBS[:3])) + 0.1 / 3
    assert freq == pytest.approx(expected, abs=0.015)


def test_deterministic_request_is_greedy(tmp_path: Path) -> None:
    rt = stochastic(tmp_path)
    for _ in range(10):
        out = decide_one(rt, {"observation": OBS, "deterministic": True})
        assert (out["action"], out["propensity"]) == (2, 1.0)  # the stochastic policy scores -obs


def test_overrides_change_the_distribution(tmp_path: Path) -> None:
    rt = stochastic(tmp_path)
    out = decide_one(rt, {"observation": OBS, "epsilon": 1.0, "return": ["probabilities"]})
    assert out["probabilities"] == pytest.approx([1 / 3] * 3)
    hot = decide_one(
        rt, {"observation": OBS, "temperature": 10.0, "epsilon": 0.0, "return": ["probabilities"]}
    )
    assert hot["probabilities"] == pytest.approx(softmax(-np.array(OBS[:3]) / 10.0).tolist())


def test_mask_renormalises_the_distribution(tmp_path: Path) -> None:
    rt = stochastic(tmp_path)
    for _ in range(20):
        out = decide_one(
            rt, {"observation": OBS, "action_mask": [True, False, True], "return": ["probabilities"]}
        )
        p = out["probabilities"]
        assert p[1] == 0.0
        assert sum(p) == pytest.approx(1.0)
        base = 0.9 * softmax(-np.array(OBS[:3])) + 0.1 / 3
        assert p[0] == pytest.approx(base[0] / (base[0] + base[2]))
        assert out["action"] != 1
        assert out["propensity"] == pytest.approx(p[out["action"]])


def test_mask_on_a_greedy_choice_takes_the_best_allowed_score(runtime: PolicyRuntime) -> None:
    out = decide_one(runtime, {"observation": OBS, "action_mask": [1, 0, 1], "return": ["probabilities"]})
    assert (out["action"], out["propensity"], out["fallback"]) == (0, 1.0, False)  # scores 0.5 > -1.0
    assert out["probabilities"] == [1.0, 0.0, 0.0]


def test_nonfinite_outputs_answer_the_fallback_action(runtime: PolicyRuntime) -> None:
    poisoned = [0.5, 2.0, -1.0, POISON]
    req = runtime.parse({"observations": [OBS, poisoned], "return": ["scores"]})
    decisions = runtime.decide([req])
    out = runtime.answer(req, decisions, 0, runtime.decision_ids(req))["decisions"]
    assert [d["fallback"] for d in out] == [False, True]
    assert out[1]["action"] == 1  # the most frequent action in the training data
    assert out[1]["propensity"] == 1.0
    assert out[1]["scores"] is None  # NaN is not JSON
    assert decisions.nonfinite == 1
    assert decisions.errors == 0


def test_fallback_respects_the_mask_and_the_setting(policy_dir: Path) -> None:
    poisoned = [0.0, 0.0, 0.0, POISON]
    rt = PolicyRuntime.load(policy_dir)
    # Action 1 is forbidden: the next most frequent allowed action in the card is 2.
    assert decide_one(rt, {"observation": poisoned, "action_mask": [1, 0, 1]})["action"] == 2
    configured = PolicyRuntime.load(policy_dir, ServingSettings(fallback_action=0))
    assert decide_one(configured, {"observation": poisoned})["action"] == 0


def test_one_pass_for_a_server_batch_with_mixed_settings(tmp_path: Path) -> None:
    rt = stochastic(tmp_path)
    reqs = [
        rt.parse({"observation": OBS, "deterministic": True}),
        rt.parse({"observations": [OBS, OBS], "return": ["probabilities"]}),
        rt.parse({"observation": OBS, "epsilon": 1.0, "return": ["probabilities"]}),
    ]
    decisions = rt.decide(reqs)
    assert decisions.offsets == [0, 1, 3]
    assert len(decisions.actions) == 4
    answers = [rt.answer(r, decisions, i, rt.decision_ids(r)) for i, r in enumerate(reqs)]
    assert answers[0]["action"] == 2
    assert answers[0]["propensity"] == 1.0
    assert len(answers[1]["decisions"]) == 2
    assert answers[2]["probabilities"] == pytest.approx([1 / 3] * 3)


def test_policies_with_and_without_scores_and_probs_decide_alike(tmp_path: Path) -> None:
    poisoned = [0.5, -0.5, 0.2, POISON]
    decisions = []
    for one_pass in (False, True):
        d = write_policy_dir(
            tmp_path / f"one-pass-{one_pass}",
            sign=-1.0,
            score_kind="logits",
            temperature=1.0,
            epsilon=0.1,
            one_pass=one_pass,
        )
        rt = PolicyRuntime.load(d, ServingSettings(seed=0))
        assert rt._one_pass is one_pass
        decisions.append(rt.decide([rt.parse({"observations": [OBS] * 50 + [poisoned]})]))
    old, new = decisions
    assert (old.actions == new.actions).all()
    assert old.probabilities[:50] == pytest.approx(new.probabilities[:50])
    assert old.scores is not None
    assert new.scores is not None
    assert np.array_equal(old.scores, new.scores, equal_nan=True)
    assert old.fallback.tolist() == new.fallback.tolist() == [False] * 50 + [True]


class Broken:
    """Stands in for a policy whose forward pass raises (e.g. a shape bug in a newly exported model)."""

    def forward(self, obs: Any) -> Any:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    def action_probs(self, obs: Any, temperature: float, epsilon: float) -> Any:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")


def test_a_failing_forward_pass_answers_the_fallback(runtime: PolicyRuntime) -> None:
    runtime.module = Broken()  # type: ignore[assignment]
    req = runtime.parse({"observations": [OBS, OBS]})
    decisions = runtime.decide([req])
    assert decisions.fallback.all()
    assert decisions.errors == 2
    assert decisions.nonfinite == 0
    assert decisions.actions.tolist() == [1, 1]
    assert decisions.propensities.tolist() == [1.0, 1.0]


def test_client_decision_ids_are_kept(runtime: PolicyRuntime) -> None:
    req = runtime.parse({"observations": [OBS, OBS], "decision_ids": ["mine", None]})
    ids = runtime.decision_ids(req)
    assert ids[0] == "mine"
    assert uuid.UUID(ids[1]).version == 4


def test_a_server_batch_draws_its_new_ids_at_once(runtime: PolicyRuntime) -> None:
    reqs = [
        runtime.parse({"observations": [OBS, OBS, OBS], "decision_ids": [None, "mine", None]}),
        runtime.parse({"observation": OBS}),
        runtime.parse({"observation": OBS, "decision_id": "theirs"}),
    ]
    assert [runtime.ids_needed(r) for r in reqs] == [2, 1, 0]
    fresh = iter(["n-0", "n-1", "n-2", "unused"])
    assert [runtime.decision_ids(r, fresh) for r in reqs] == [["n-0", "mine", "n-1"], ["n-2"], ["theirs"]]
    assert next(fresh) == "unused"


@pytest.mark.parametrize("k", [0, 1, 7, 8, 500])
def test_uuid4_batch(k: int) -> None:
    ids = uuid4_batch(k)
    assert len(set(ids)) == k
    for i in ids:
        u = uuid.UUID(i)
        assert (u.version, u.variant, str(u)) == (4, uuid.RFC_4122, i)


def test_drift_counts_match_searchsorted(runtime: PolicyRuntime) -> None:
    rng = np.random.default_rng(0)
    obs = rng.normal(scale=2.0, size=(1000, OBS_DIM)).astype(np.float32)
    obs[: len(EDGES)] = np.array(EDGES, dtype=np.float32)[:, None]  # values exactly on the edges
    counts = runtime.drift_counts(obs)
    for j in range(OBS_DIM):
        expected = np.bincount(
            np.searchsorted(EDGES, obs[:, j].astype(np.float64), side="right"), minlength=4
        )
        assert counts[j].tolist() == expected.tolist()


def test_records_carry_the_decision_log_fields(runtime: PolicyRuntime) -> None:
    req = runtime.parse(
        {"observations": [OBS, OBS], "episode_ids": ["e", None], "steps": [4, None], "action_mask": [1, 1, 0]}
    )
    decisions = runtime.decide([req])
    ids = runtime.decision_ids(req)
    records = runtime.records(req, decisions, 0, ids)
    assert [r["decision_id"] for r in records] == ids
    first = records[0]
    assert first["observation"] == pytest.approx(OBS)
    assert (first["episode_id"], first["step"], first["action_mask"]) == ("e", 4, [1, 1, 0])
    assert (first["temperature"], first["epsilon"], first["fallback"]) == (0.0, 0.0, False)
    assert records[1]["episode_id"] is None
    assert records[1]["step"] is None
    assert first["action"] == 1
    assert first["propensity"] == 1.0
    json.dumps(records, allow_nan=False)
