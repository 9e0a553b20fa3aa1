"""Every canary analysis query, tested by promtool against synthetic series (alerts/canary/tests/)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from delivery_testkit import ANALYSIS, ANALYSIS_TEST
from rlops_delivery import analysis as a

ARGS = {"policy": "cartpole", "candidate": "2", "champion": "1"}
RULES_FILE = "canary-analysis-rules.yaml"

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")


def _record(check: a.Check, kind: str) -> str:
    return f"canary:{check.name.replace('-', '_')}:{kind}"


def _rules(spec: a.Analysis) -> dict[str, Any]:
    rules = []
    for check in spec.checks:
        rules.append({"record": _record(check, "value"), "expr": a.render(check.query, ARGS)})
        rules.append({"record": _record(check, "samples"), "expr": a.render(check.min_samples_query, ARGS)})
    return {"groups": [{"name": "canary-analysis", "rules": rules}]}


def _expectations(test_file: Path) -> dict[str, list[float | None]]:
    """Expected values per recorded series across every test (None: expected empty)."""
    out: dict[str, list[float | None]] = {}
    for test in yaml.safe_load(test_file.read_text())["tests"]:
        for t in test.get("promql_expr_test", []):
            samples = t["exp_samples"]
            values: list[float | None] = [float(s["value"]) for s in samples] or [None]
            out.setdefault(t["expr"], []).extend(values)
    return out


def test_promtool_passes_every_query_test(tmp_path: Path) -> None:
    spec = a.load(ANALYSIS)
    (tmp_path / RULES_FILE).write_text(yaml.safe_dump(_rules(spec), sort_keys=False))
    shutil.copy(ANALYSIS_TEST, tmp_path / ANALYSIS_TEST.name)
    check = subprocess.run(
        ["promtool", "check", "rules", RULES_FILE], cwd=tmp_path, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run(
        ["promtool", "test", "rules", ANALYSIS_TEST.name], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_check_is_tested_passing_failing_short_of_samples_and_without_traffic() -> None:
    spec = a.load(ANALYSIS)
    expected = _expectations(ANALYSIS_TEST)
    for check in spec.checks:
        values = expected.get(_record(check, "value"), [])
        samples = expected.get(_record(check, "samples"), [])
        numbers = [v for v in values if v is not None]
        assert any(check.holds(v) for v in numbers), f"{check.name}: no test where the value passes"
        assert any(not check.holds(v) for v in numbers), f"{check.name}: no test where the value fails"
        assert None in values, f"{check.name}: no test where the value is empty (no traffic)"
        assert any(s is not None and s >= check.min_samples for s in samples), (
            f"{check.name}: no test with enough samples"
        )
        assert any(s is not None and 0 < s < check.min_samples for s in samples), (
            f"{check.name}: no test with some but too few samples"
        )
        assert 0.0 in samples, f"{check.name}: no test where the samples query gives 0 without traffic"


def test_the_tests_name_only_recorded_checks() -> None:
    spec = a.load(ANALYSIS)
    known = {_record(c, k) for c in spec.checks for k in ("value", "samples")}
    unknown = set(_expectations(ANALYSIS_TEST)) - known
    assert not unknown, f"{ANALYSIS_TEST} tests series no check records: {sorted(unknown)}"
