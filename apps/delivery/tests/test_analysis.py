"""The canary analysis file: validation with errors that say where, and one measurement per check."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from delivery_testkit import ANALYSIS
from rlops_delivery import analysis as a


def _raw() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ANALYSIS.read_text())
    return data


def test_the_repository_file_is_valid_and_has_every_required_check() -> None:
    spec = a.load(ANALYSIS)
    names = {c.name for c in spec.checks}
    assert {"error-ratio", "latency-p99", "nonfinite-outputs", "action-divergence", "reward-rate"} <= names
    assert spec.interval_s == 15.0
    for check in spec.checks:
        assert check.min_samples >= 1
        assert "{{args.candidate}}" in check.query
        assert "{{args.candidate}}" in check.min_samples_query


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("15s", 15.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert a.parse_duration(text, "x") == seconds


@pytest.mark.parametrize("text", ["15", "0s", "-1s", "1d", "fast", ""])
def test_bad_durations_name_the_place(text: str) -> None:
    with pytest.raises(a.AnalysisError, match=r"^here: .* is not a positive duration"):
        a.parse_duration(text, "here")


def _error(mutate: Any) -> str:
    raw = copy.deepcopy(_raw())
    mutate(raw)
    with pytest.raises(a.AnalysisError) as e:
        a.parse(raw, "f.yaml")
    return str(e.value)


def test_validation_messages_name_file_check_and_what_is_accepted() -> None:
    msg = _error(lambda r: r["checks"][0].update(comparison="<"))
    assert msg.startswith("f.yaml: checks[0] (error-ratio).comparison: '<'")
    assert "'<=', '>='" in msg
    msg = _error(lambda r: r["checks"][1].update(query='up{x="{{args.version}}"}'))
    assert "checks[1] (latency-p99).query: unknown placeholder(s) {{args.version}}" in msg
    assert "{{args.champion}}" in msg
    msg = _error(lambda r: r["checks"][0].update(extra=1))
    assert "unknown key(s) extra" in msg
    assert "accepted keys: name, description" in msg
    msg = _error(lambda r: r["checks"][0].pop("min_samples"))
    assert "missing key(s) min_samples" in msg
    msg = _error(lambda r: r["checks"][0].update(min_samples=0))
    assert "min_samples: 0 must be at least 1" in msg
    msg = _error(lambda r: r["checks"][0].update(threshold="low"))
    assert "threshold: 'low' is not a finite number" in msg
    msg = _error(lambda r: r["checks"][1].update(name="error-ratio"))
    assert "check name(s) used twice: error-ratio" in msg
    msg = _error(lambda r: r["checks"][0].update(name="Error_Ratio"))
    assert "is not a kebab-case name" in msg
    msg = _error(lambda r: r.update(failure_limit=-1))
    assert "failure_limit: -1 is not an integer >= 0" in msg
    msg = _error(lambda r: r.update(interval="soon"))
    assert "interval: 'soon' is not a positive duration" in msg
    msg = _error(lambda r: r.update(checks=[]))
    assert "non-empty list" in msg
    msg = _error(lambda r: r.update(window="5m"))
    assert "unknown key(s) window" in msg


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(a.AnalysisError, match="no such analysis file"):
        a.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("checks: [\n")
    with pytest.raises(a.AnalysisError, match=r"bad.yaml: not valid YAML"):
        a.load(bad)


def test_render_fills_placeholders_and_refuses_missing_ones() -> None:
    text = 'x{policy="{{args.policy}}",version="{{ args.candidate }}"}'
    assert a.render(text, {"policy": "p", "candidate": "3"}) == 'x{policy="p",version="3"}'
    with pytest.raises(a.AnalysisError, match=r"no value for placeholder \{\{args.candidate\}\}"):
        a.render(text, {"policy": "p"})


def _answers(samples: list[Any], value: list[Any]) -> a.QueryFn:
    """Prometheus as a function: the samples query answers ``samples``, the value query ``value``."""

    def query(expr: str) -> list[dict[str, Any]]:
        result = samples if expr.endswith("or vector(0)") else value
        return [{"metric": {}, "value": [0, str(v)]} for v in result]

    return query


CHECK = a.Check(
    name="error-ratio",
    description="",
    query='sum(x{v="{{args.candidate}}"})',
    comparison="<=",
    threshold=0.01,
    min_samples_query='sum(increase(n{v="{{args.candidate}}"}[5m])) or vector(0)',
    min_samples=100,
)
ARGS = {"policy": "p", "candidate": "2", "champion": "1"}


@pytest.mark.parametrize(
    ("samples", "value", "verdict", "detail"),
    [
        ([250], [0.001], a.PASS, "0.001 <= 0.01 (250 samples)"),
        ([250], [0.5], a.FAIL, "0.5 > 0.01 (250 samples)"),
        ([99], [0.0], a.INCONCLUSIVE, "99 of 100 samples needed"),
        ([0], [], a.INCONCLUSIVE, "0 of 100 samples needed"),
        ([], [], a.INCONCLUSIVE, "0 of 100 samples needed"),
        ([250], [], a.INCONCLUSIVE, "no value yet"),
        ([250], ["NaN"], a.INCONCLUSIVE, "no value yet"),
    ],
)
def test_measure_verdicts(samples: list[Any], value: list[Any], verdict: str, detail: str) -> None:
    m = a.measure(CHECK, ARGS, _answers(samples, value), at=5.0)
    assert (m.verdict, m.detail) == (verdict, detail)
    assert m.query == 'sum(x{v="2"})'
    assert m.at == 5.0
    d = m.to_dict()
    assert d["value"] is None or math.isfinite(d["value"])


def test_measure_of_a_greater_or_equal_check() -> None:
    check = a.Check("reward-rate", "", "q", ">=", -0.05, "s or vector(0)", 10)
    assert a.measure(check, ARGS, _answers([20], [-0.01]), 0).verdict == a.PASS
    assert a.measure(check, ARGS, _answers([20], [-0.2]), 0).detail == "-0.2 < -0.05 (20 samples)"


def test_a_query_must_aggregate_to_one_series() -> None:
    def query(expr: str) -> list[dict[str, Any]]:
        return [{"metric": {"action": str(i)}, "value": [0, "1"]} for i in range(2)]

    with pytest.raises(a.AnalysisError, match="returned 2 series"):
        a.measure(CHECK, ARGS, query, 0)
