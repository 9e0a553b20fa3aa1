"""The model card: the one validation that the trainer applies before it writes a card and the server
applies before it serves one.

``model-card.schema.json`` says what each field is; :func:`validate_card` adds the rules that tie fields
together (one reference entry per feature and per action, sorted finite drift bins, a policy output that
fits the action space: scores per action for Discrete, the action itself for Box …), so that a card the
trainer writes is exactly a card the server accepts. Errors name the file and the field
(``card.reference.observation.bins[2].edges``) and say what is accepted.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from rlops_contracts import MODEL_CARD_FILE, MODEL_CARD_SCHEMA, POLICY_FILE, load_schema

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
"""Policy names: they become directory names in the registry (the schema says the same)."""


class ArtifactError(ValueError):
    """A policy artifact that cannot be trusted or used; the message names the file and what is wrong."""


class CardError(ArtifactError):
    """A model card that does not follow the schema or its cross-field rules."""


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema(MODEL_CARD_SCHEMA))


def _where(error: jsonschema.ValidationError) -> str:
    return "card" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


def _cross_field_problem(card: dict[str, Any]) -> str | None:
    """The first inconsistency between fields that the schema alone cannot express, or None."""
    shape = card["policy"]["input"]["shape"]
    if len(shape) != 2:
        return f"card.policy.input.shape: expected [-1, n_features] (serving takes flat rows), got {shape}"
    dim = shape[1]
    space = card["observation_space"]
    if math.prod(space["shape"]) != dim:
        return f"card.policy.input.shape: {dim} features but card.observation_space.shape is {space['shape']}"
    for key in ("low", "high"):
        if len(space[key]) != dim:
            return (
                f"card.observation_space.{key}: {len(space[key])} entries, expected one per observation "
                f"feature ({dim})"
            )
    problem = _stats_problem(card["reference"]["observation"], dim, "observation", "observation feature")
    if problem:
        return problem
    return _action_problem(card)


def _stats_problem(stats: dict[str, Any], dim: int, key: str, what: str) -> str | None:
    """The first inconsistency in per-feature reference statistics (``card.reference.<key>``) of ``dim``
    features, or None."""
    for field in ("mean", "std", "min", "max", "bins"):
        if len(stats[field]) != dim:
            return (
                f"card.reference.{key}.{field}: {len(stats[field])} entries, expected one per {what} ({dim})"
            )
    for j, b in enumerate(stats["bins"]):
        edges = b["edges"]
        if len(b["proportions"]) != len(edges) + 1:
            return (
                f"card.reference.{key}.bins[{j}]: {len(edges)} edges need {len(edges) + 1} "
                f"proportions, got {len(b['proportions'])}"
            )
        if not all(math.isfinite(e) for e in edges) or any(b2 < b1 for b1, b2 in itertools.pairwise(edges)):
            return f"card.reference.{key}.bins[{j}].edges: must be finite and ascending, got {edges}"
    return None


def _action_problem(card: dict[str, Any]) -> str | None:
    """The first inconsistency between the action space, the policy's output kind, its selection and
    the action reference statistics, or None."""
    space = card["action_space"]
    score_kind = card["policy"]["score_kind"]
    actions = card["reference"]["actions"]
    if space["type"] == "Discrete":
        if score_kind == "action":
            return (
                "card.policy.score_kind: 'action' is for Box action spaces; a Discrete policy scores its "
                "actions ('logits' or 'q_values')"
            )
        if card["policy"]["selection"].get("std", 0.0) != 0.0:
            return (
                "card.policy.selection.std: exploration noise is for Box action spaces; a Discrete policy "
                "has 0"
            )
        if "proportions" not in actions:
            return (
                "card.reference.actions: a Discrete action space needs {n, proportions}, one share per action"
            )
        n_actions = space["n"]
        if len(actions["proportions"]) != n_actions:
            return (
                f"card.reference.actions.proportions: {len(actions['proportions'])} entries, expected one "
                f"per action ({n_actions})"
            )
        return None
    if score_kind != "action":
        return (
            f"card.policy.score_kind: a Box action space needs 'action' (the policy returns the action), "
            f"got {score_kind!r}"
        )
    k = space["shape"][0]
    for key in ("low", "high"):
        if len(space[key]) != k:
            return (
                f"card.action_space.{key}: {len(space[key])} entries, expected one per action dimension ({k})"
            )
    bad = [j for j, (lo, hi) in enumerate(zip(space["low"], space["high"], strict=True)) if not lo < hi]
    if bad:
        return f"card.action_space: low must be below high in every dimension, not in dimension(s) {bad}"
    if "bins" not in actions:
        return (
            "card.reference.actions: a Box action space needs per-dimension statistics "
            "{n, mean, std, min, max, bins} like card.reference.observation"
        )
    return _stats_problem(actions, k, "actions", "action dimension")


def validate_card(card: Any, source: str = "model card") -> dict[str, Any]:
    """``card`` checked against the schema and the cross-field rules; raises CardError naming ``source``."""
    errors = list(_validator().iter_errors(card))
    if errors:
        first = jsonschema.exceptions.best_match(errors)
        detail = f" ({'; '.join(e.message for e in first.context)})" if first.context else ""
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise CardError(f"{source}: {_where(first)}: {first.message}{detail}{more}")
    problem = _cross_field_problem(card)
    if problem:
        raise CardError(f"{source}: {problem}")
    return dict(card)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def parse_card(data: bytes | str, source: str) -> dict[str, Any]:
    """A card from its JSON text (strict: NaN and Infinity are refused), validated."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        card = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise CardError(f"{source}: not valid JSON: {e}") from e
    return validate_card(card, source=source)


def read_card(policy_dir: Path | str) -> dict[str, Any]:
    """The validated model card of a policy directory."""
    path = Path(policy_dir) / MODEL_CARD_FILE
    if not path.is_file():
        raise CardError(
            f"{policy_dir}: not a policy directory: no {MODEL_CARD_FILE} (a policy directory holds "
            f"{POLICY_FILE} and {MODEL_CARD_FILE})"
        )
    return parse_card(path.read_bytes(), source=str(path))


def card_bytes(card: dict[str, Any]) -> bytes:
    """The card as strict JSON text (no NaN or Infinity, which other JSON parsers reject)."""
    return (json.dumps(card, indent=2, allow_nan=False) + "\n").encode()
