"""Fixtures of the tests that cross folders: the server tests' builders (``server_testkit``: tiny policies in
a registry layout, free ports) are importable here too, so those helpers exist once."""

from __future__ import annotations

import sys
from pathlib import Path

SERVER_TESTS = Path(__file__).resolve().parents[1] / "apps" / "server" / "tests"
if str(SERVER_TESTS) not in sys.path:
    sys.path.insert(0, str(SERVER_TESTS))
