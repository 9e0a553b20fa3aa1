"""Fixtures of the delivery tests; the builders they use live in delivery_testkit (a module name unique across
the test folders, so tests import it rather than conftest)."""

from delivery_testkit import *  # noqa: F403
