"""Fixtures of the server tests; the builders they use live in server_testkit (a module name unique across
the test folders, so tests import it rather than conftest)."""

from server_testkit import *  # noqa: F403
