"""Shared fixtures for the infra tests: the Pulumi program (infra/) on the path, one render per stack."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

INFRA = Path(__file__).resolve().parents[2] / "infra"
if str(INFRA) not in sys.path:
    sys.path.insert(0, str(INFRA))

from rlops_infra.render import Render, read_stack_file, render_stack, stack_file, with_placeholders  # noqa: E402

STACKS = ("dev", "staging", "prod")


@pytest.fixture(scope="session")
def renders() -> dict[str, Render]:
    return {s: render_stack(s) for s in STACKS}


@pytest.fixture
def stack_values():
    """A stack file's config with placeholder secrets, as (values, secret_keys); fresh per call."""

    def load(stack: str) -> tuple[dict, set[str]]:
        values, keys = read_stack_file(stack_file(stack))
        return with_placeholders(values, keys)

    return load
