"""Model cards of Box (continuous-action) policies: the schema and the cross-field rules."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from rlops_contracts.card import CardError, validate_card
from test_schema import CARD

BOX_CARD: dict[str, Any] = copy.deepcopy(CARD)
BOX_CARD["action_space"] = {
    "type": "Box",
    "shape": [2],
    "dtype": "float32",
    "low": [-2.0, 0.0],
    "high": [2.0, 1.0],
}
BOX_CARD["policy"]["score_kind"] = "action"
BOX_CARD["policy"]["selection"] = {"temperature": 0.0, "epsilon": 0.0, "std": 0.3}
BOX_CARD["reference"]["actions"] = {
    "n": 100_000,
    "mean": [0.1, 0.5],
    "std": [1.1, 0.3],
    "min": [-2.0, 0.0],
    "max": [2.0, 1.0],
    "bins": [
        {"edges": [-1.0, 0.0, 1.0], "proportions": [0.25, 0.25, 0.25, 0.25]},
        {"edges": [0.5], "proportions": [0.5, 0.5]},
    ],
}


def test_box_card_is_valid_and_the_discrete_card_still_is() -> None:
    assert validate_card(copy.deepcopy(BOX_CARD))["action_space"]["type"] == "Box"
    assert validate_card(copy.deepcopy(CARD))["action_space"]["type"] == "Discrete"
    without_std = copy.deepcopy(BOX_CARD)
    del without_std["policy"]["selection"]["std"]
    validate_card(without_std)


def _set(path: str, value: Any) -> Any:
    def mutate(card: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = card
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(last) if last.isdigit() else last] = value

    return mutate


@pytest.mark.parametrize(
    ("base", "mutate", "message"),
    [
        (
            BOX_CARD,
            _set("policy.score_kind", "q_values"),
            "card.policy.score_kind: a Box action space needs 'action'",
        ),
        (
            CARD,
            _set("policy.score_kind", "action"),
            "card.policy.score_kind: 'action' is for Box action spaces",
        ),
        (CARD, _set("policy.selection.std", 0.5), "card.policy.selection.std"),
        (BOX_CARD, _set("policy.selection.std", -0.1), "card.policy.selection.std"),
        (
            BOX_CARD,
            _set("action_space.low", [-2.0]),
            "card.action_space.low: 1 entries, expected one per action",
        ),
        (BOX_CARD, _set("action_space.high", [2.0, 0.0]), "card.action_space: low must be below high"),
        (BOX_CARD, _set("action_space.low", ["-inf", 0.0]), "card.action_space"),
        (BOX_CARD, _set("action_space.dtype", "float64"), "card.action_space"),
        (BOX_CARD, _set("action_space.shape", [2, 1]), "card.action_space"),
        (
            BOX_CARD,
            _set("reference.actions.mean", [0.0]),
            "card.reference.actions.mean: 1 entries, expected one per action dimension (2)",
        ),
        (
            BOX_CARD,
            _set("reference.actions.bins.1.proportions", [1.0]),
            "card.reference.actions.bins[1]: 1 edges need 2",
        ),
        (
            BOX_CARD,
            _set("reference.actions.bins.0.edges", [1.0, 0.0, 2.0]),
            "card.reference.actions.bins[0].edges",
        ),
        (
            BOX_CARD,
            _set("reference.actions", {"n": 10, "proportions": [0.5, 0.5]}),
            "card.reference.actions: a Box action space needs",
        ),
        (
            CARD,
            _set("reference.actions", BOX_CARD["reference"]["actions"]),
            "card.reference.actions: a Discrete action space needs",
        ),
    ],
)
def test_inconsistent_box_cards_are_rejected_naming_the_field(
    base: dict[str, Any], mutate: Any, message: str
) -> None:
    card = copy.deepcopy(base)
    mutate(card)
    with pytest.raises(CardError, match=None) as info:
        validate_card(card, source="x/model-card.json")
    assert message in str(info.value)
    assert str(info.value).startswith("x/model-card.json: ")
