"""The model-card schema: a valid draft 2020-12 schema that accepts a real card and rejects broken ones."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
import rlops_contracts
from rlops_contracts import load_schema

SHA = "sha256:" + "ab" * 32

CARD: dict[str, Any] = {
    "schema_version": 1,
    "name": "cartpole",
    "version": 3,
    "created_at": "2025-01-31T12:00:00Z",
    "algorithm": "cql",
    "hyperparameters": {"alpha": 1.0, "hidden": [256, 256]},
    "dataset": {
        "fingerprint": SHA,
        "env_id": "CartPole-v1",
        "n_transitions": 100_000,
        "n_episodes": 800,
        "source": "collect",
        "behavior_policy": "mixture:random=0.5,eps-greedy:0.3=0.5",
    },
    "observation_space": {
        "type": "Box",
        "shape": [2],
        "dtype": "float32",
        "low": [-4.8, "-inf"],
        "high": [4.8, "inf"],
    },
    "action_space": {"type": "Discrete", "n": 2},
    "policy": {
        "file": "policy.pt",
        "score_kind": "q_values",
        "input": {"dtype": "float32", "shape": [-1, 2]},
        "selection": {"temperature": 0.0, "epsilon": 0.0},
        "torch_version": "2.13.0",
    },
    "training": {
        "steps": 20000,
        "wall_time_s": 61.5,
        "device": "cpu",
        "final_metrics": {"loss": 0.1, "q": None},
    },
    "evaluation": {"estimates": [{"estimator": "fqe", "value": 410.0, "lower": 395.0, "upper": 425.0}]},
    "gate": {"promote": True, "incumbent_version": 2, "reason": "lower bound 395 > 380 + 5"},
    "reference": {
        "observation": {
            "n": 100_000,
            "mean": [0.0, 0.1],
            "std": [1.0, 0.5],
            "min": [-2.0, -1.5],
            "max": [2.0, 1.5],
            "bins": [
                {"edges": [-1.0, 0.0, 1.0], "proportions": [0.2, 0.3, 0.3, 0.2]},
                {"edges": [1.0], "proportions": [0.6, 0.4]},
            ],
        },
        "actions": {"n": 100_000, "proportions": [0.55, 0.45]},
    },
    "lineage": [
        {
            "event": "trained",
            "at": "2025-01-31T11:59:00Z",
            "algorithm": "cql",
            "dataset_fingerprint": SHA,
            "steps": 20000,
        },
        {"event": "gate", "at": "2025-01-31T12:00:00Z", "promote": True, "incumbent_version": 2},
        {"event": "published", "at": "2025-01-31T12:00:00+00:00", "version": 3, "who": "ci@build"},
    ],
    "files": {"policy.pt": SHA, "cartpole.mar": SHA},
}


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = load_schema("model-card")
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def messages(validator: jsonschema.Draft202012Validator, card: dict[str, Any]) -> list[str]:
    """Every error message, with those under a failed oneOf / anyOf branch listed instead of it."""

    def flat(errors: Any) -> list[str]:
        return [m for e in errors for m in (flat(e.context) if e.context else [e.message])]

    return flat(validator.iter_errors(card))


def test_schema_is_draft_2020_12_and_listed() -> None:
    assert load_schema("model-card")["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert rlops_contracts.schema_names() == ["model-card"]
    with pytest.raises(KeyError, match="unknown schema 'card'; known schemas: model-card"):
        load_schema("card")


def test_constants() -> None:
    assert (rlops_contracts.POLICY_FILE, rlops_contracts.MODEL_CARD_FILE) == ("policy.pt", "model-card.json")
    assert rlops_contracts.ALIASES == ("champion", "candidate")
    assert (
        load_schema("model-card")["properties"]["schema_version"]["const"]
        == rlops_contracts.MODEL_CARD_SCHEMA_VERSION
    )


def test_valid_card_passes(validator: jsonschema.Draft202012Validator) -> None:
    assert messages(validator, CARD) == []
    unpublished = copy.deepcopy(CARD)
    unpublished.update(version=None, evaluation=None, gate=None, lineage=CARD["lineage"][:1])
    assert messages(validator, unpublished) == []


def test_top_level_keys_are_all_required(validator: jsonschema.Draft202012Validator) -> None:
    for key in CARD:
        card = {k: v for k, v in CARD.items() if k != key}
        assert messages(validator, card) == [f"'{key}' is a required property"]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ((), ("owner", "me"), "Additional properties are not allowed ('owner' was unexpected)"),
        (("version",), 0, "0 is less than the minimum of 1"),
        (("name",), "../etc", "'../etc' does not match"),
        (("created_at",), "yesterday", "'yesterday' does not match"),
        (("dataset", "n_transitions"), "many", "'many' is not of type 'integer'"),
        (("dataset", "fingerprint"), "md5:00", "'md5:00' does not match"),
        (
            ("observation_space", "low"),
            [float("-1"), "-infinity"],
            "'-infinity' is not one of ['-inf', 'inf']",
        ),
        (("action_space", "type"), "Box", "'Discrete' was expected"),
        (("policy", "input", "shape"), [2], "-1 was expected"),
        (("policy", "selection", "epsilon"), 1.5, "1.5 is greater than the maximum of 1"),
        (("reference", "actions", "proportions"), [], "[] should be non-empty"),
        (("files",), {"policy.pt": "abc"}, "'abc' does not match"),
        (
            ("files",),
            {"model-card.json": SHA, "policy.pt": SHA},
            "should not be valid under {'const': 'model-card.json'}",
        ),
        (("gate",), {"promote": True, "reason": "x"}, "'incumbent_version' is a required property"),
        (
            ("gate",),
            {"promote": "yes", "incumbent_version": None, "reason": "x"},
            "'yes' is not of type 'boolean'",
        ),
        (("lineage",), [], "[] should be non-empty"),
        (
            ("lineage",),
            [{"event": "trained", "at": "2025-01-31T11:59:00Z"}],
            "'algorithm' is a required property",
        ),
        (("lineage",), [{"event": "deleted", "at": "2025-01-31T11:59:00Z"}], "'deleted' is not one of"),
        (
            ("lineage",),
            [{"event": "published", "at": "2025-01-31T11:59:00Z"}],
            "'version' is a required property",
        ),
    ],
)
def test_broken_cards_fail_with_the_reason(
    validator: jsonschema.Draft202012Validator, path: tuple[str, ...], value: Any, message: str
) -> None:
    card = copy.deepcopy(CARD)
    if not path:
        card[value[0]] = value[1]
    else:
        target = card
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    found = messages(validator, card)
    assert any(message in m for m in found), found
