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


# --- Box policies ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a_bounds", "a_counts", "b_bounds", "b_counts", "distance"),
    [
        ([0, 1, 2], [3, 1], [0, 1, 2], [3, 1], 0.0),  # the same histogram
        ([0, 1, 2], [1, 0], [0, 1, 2], [0, 5], 1.0),  # disjoint
        # Half of a uniform [0, 2] lies on [0, 1]: |1 - 0.5| + |0 - 0.5|, halved.
        ([0, 1, 2], [1, 0], [0, 2], [1], 0.5),
        # A bin of zero width is a point mass (actions on a bound): nothing uniform matches it.
        ([0, 2, 2], [0, 1], [0, 2], [1], 1.0),
        ([0, 2, 2], [1, 1], [0, 2, 2], [1, 1], 0.0),
    ],
)
def test_binned_tvd_by_hand(
    a_bounds: list[float],
    a_counts: list[float],
    b_bounds: list[float],
    b_counts: list[float],
    distance: float,
) -> None:
    assert a.binned_tvd(a_bounds, a_counts, b_bounds, b_counts) == pytest.approx(distance)
    assert a.binned_tvd(b_bounds, b_counts, a_bounds, a_counts) == pytest.approx(distance)


def test_binned_tvd_with_different_edges_by_hand() -> None:
    # A: 1/4 on [0, 0.5], 3/4 spread over [0.5, 2] (1/2 per unit). B: everything uniform on [0, 1].
    # On the cells [0, 0.5], [0.5, 1], [1, 2]: A 1/4, 1/4, 1/2; B 1/2, 1/2, 0. TVD = (1/4 + 1/4 + 1/2) / 2.
    assert a.binned_tvd([0, 0.5, 2], [1, 3], [0, 1, 2], [1, 0]) == pytest.approx(0.5)


def _box_card(low: list[float], high: list[float], edges: list[list[float]]) -> dict[str, Any]:
    return {
        "action_space": {"type": "Box", "shape": [len(low)], "low": low, "high": high},
        "reference": {
            "actions": {"bins": [{"edges": e, "proportions": [0.0] * (len(e) + 1)} for e in edges]}
        },
    }


DISCRETE_CARD = {"action_space": {"type": "Discrete", "n": 2}}
BOX_CARD = _box_card([-1.0, 0.0], [1.0, 4.0], [[0.0], [1.0, 2.0, 3.0]])


def test_only_the_action_distribution_check_compares_discrete_actions() -> None:
    spec = a.load(ANALYSIS)
    assert [c.name for c in spec.checks if a.compares_discrete_actions(c)] == ["action-divergence"]


def test_checks_for_discrete_policies_are_the_files() -> None:
    spec = a.load(ANALYSIS)
    checks, skipped = a.for_policies(spec, DISCRETE_CARD, DISCRETE_CARD)
    assert checks == list(spec.checks)
    assert skipped == {}


def test_for_box_policies_the_action_check_is_replaced_per_dimension() -> None:
    spec = a.load(ANALYSIS)
    checks, skipped = a.for_policies(spec, BOX_CARD, BOX_CARD)
    assert [c.name for c in checks] == [
        "error-ratio",
        "latency-p99",
        "nonfinite-outputs",
        "action-divergence-per-dimension",
        "reward-rate",
    ]
    assert "compares discrete action distributions" in skipped["action-divergence"]
    replacement = checks[3]
    assert isinstance(replacement, a.ActionBinDivergence)
    original = next(c for c in spec.checks if c.name == "action-divergence")
    assert (replacement.comparison, replacement.threshold, replacement.min_samples, replacement.window) == (
        original.comparison,
        original.threshold,
        original.min_samples,
        "5m",
    )
    assert replacement.candidate_bins.bounds == ((-1.0, 0.0, 1.0), (0.0, 1.0, 2.0, 3.0, 4.0))
    with pytest.raises(a.AnalysisError, match="a canary compares like with like"):
        a.for_policies(spec, BOX_CARD, DISCRETE_CARD)
    with pytest.raises(a.AnalysisError, match="have 1 dimensions and the champion's 2"):
        a.for_policies(spec, _box_card([-1.0], [1.0], [[0.0]]), BOX_CARD)


def _bin_answers(per_version: dict[str, Any], asked: list[str]) -> a.QueryFn:
    """Prometheus as a function: ``per_version[version][dimension][bin]`` counts, as series."""

    def query(expr: str) -> list[dict[str, Any]]:
        asked.append(expr)
        return [
            {"metric": {"version": v, "dimension": str(d), "bin": str(b)}, "value": [0, str(count)]}
            for v, dims in per_version.items()
            for d, counts in enumerate(dims)
            for b, count in enumerate(counts)
            if count
        ]

    return query


def _bin_check(min_samples: float = 100) -> a.ActionBinDivergence:
    bins = a.ActionBins.from_card(BOX_CARD, "card")
    return a.ActionBinDivergence("action-divergence-per-dimension", "", "<=", 0.25, min_samples, bins, bins)


def test_action_bin_divergence_measures_the_worst_dimension() -> None:
    asked: list[str] = []
    champion = [[100, 100], [50, 50, 50, 50]]
    same = a.ActionBinDivergence.measure(
        _bin_check(), ARGS, _bin_answers({"1": champion, "2": champion}, asked), 3.0
    )
    assert (same.verdict, same.value, same.samples) == (a.PASS, 0.0, 200.0)
    assert asked[0] == (
        "sum by (version, dimension, bin) "
        '(increase(rlops_action_drift_bin_total{policy="p",version=~"2|1"}[5m]))'
    )
    # Collapsed onto the upper bound: dimension 0 moves half its mass (0.5), dimension 1 three quarters.
    collapsed = [[0, 200], [0, 0, 0, 200]]
    m = _bin_check().measure(ARGS, _bin_answers({"1": champion, "2": collapsed}, asked), 3.0)
    assert m.verdict == a.FAIL
    assert m.value == pytest.approx(0.75)
    assert m.detail == "0.75 > 0.25 in action dimension 1 (200 samples)"
    # A version without traffic, or too little: inconclusive, never passed.
    m = _bin_check().measure(ARGS, _bin_answers({"1": champion}, asked), 3.0)
    assert (m.verdict, m.detail) == (a.INCONCLUSIVE, "0 of 100 samples needed")
    m = _bin_check(min_samples=500).measure(ARGS, _bin_answers({"1": champion, "2": champion}, asked), 3.0)
    assert m.verdict == a.INCONCLUSIVE
    # Series of other versions are left out; a bin the card does not have is named.
    m = _bin_check().measure(ARGS, _bin_answers({"1": champion, "2": champion, "7": collapsed}, asked), 3.0)
    assert m.value == 0.0
    with pytest.raises(a.AnalysisError, match="version 2 has no dimension 0 bin 5"):
        _bin_check().measure(ARGS, _bin_answers({"1": champion, "2": [[0, 0, 0, 0, 0, 1], [1]]}, asked), 3.0)


def test_only_the_replacements_are_beyond_prometheus() -> None:
    spec = a.load(ANALYSIS)
    assert a.beyond_prometheus(spec, a.for_policies(spec, DISCRETE_CARD, DISCRETE_CARD)[0]) == []
    box = a.beyond_prometheus(spec, a.for_policies(spec, BOX_CARD, BOX_CARD)[0])
    assert [c.name for c in box] == ["action-divergence-per-dimension"]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _watch(rounds: list[dict[str, Any]], wait_s: float) -> tuple[a.Watch, _Clock, list[list[a.Measurement]]]:
    """Measure the bin check against ``rounds`` (one Prometheus answer per round, the last repeating)."""
    answers = list(rounds)
    clock, reported = _Clock(), []
    settings: dict[str, Any] = {"interval_s": 15, "wait_s": wait_s, "clock": clock, "sleep": clock.sleep}

    def query(expr: str) -> list[dict[str, Any]]:
        per_version = answers.pop(0) if len(answers) > 1 else answers[0]
        return _bin_answers(per_version, [])(expr)

    watch = a.measure_until_conclusive([_bin_check()], ARGS, query, report=reported.append, **settings)
    return watch, clock, reported


def test_measure_until_conclusive_waits_for_samples_then_decides() -> None:
    champion = [[100, 100], [50, 50, 50, 50]]
    few = [[10, 10], [5, 5, 5, 5]]
    watch, clock, reported = _watch(
        [{"1": champion}, {"1": champion, "2": few}, {"1": champion, "2": champion}], 60
    )
    assert (watch.verdict, watch.rounds, watch.elapsed_s) == (a.PASS, 3, 30.0)
    assert clock.slept == [15, 15]
    assert [r[0].verdict for r in reported] == [a.INCONCLUSIVE, a.INCONCLUSIVE, a.PASS]
    # A failure ends it at once, whatever time is left.
    collapsed = [[0, 200], [0, 0, 0, 200]]
    watch, clock, _ = _watch([{"1": champion, "2": collapsed}], 600)
    assert (watch.verdict, watch.rounds, clock.slept) == (a.FAIL, 1, [])


def test_measure_until_conclusive_gives_up_inconclusive_when_time_runs_out() -> None:
    champion = [[100, 100], [50, 50, 50, 50]]
    few = [[10, 10], [5, 5, 5, 5]]
    # Rounds at 0, 15, 30 and 45 s; one at 60 s would come later than the 50 s allowed.
    watch, clock, _ = _watch([{"1": champion, "2": few}], 50)
    assert (watch.verdict, watch.rounds, watch.elapsed_s) == (a.INCONCLUSIVE, 4, 45.0)
    assert watch.shortfall() == "action-divergence-per-dimension: samples 20 of 100"
    # No time to wait: one measurement.
    watch, clock, _ = _watch([{"1": champion}], 0)
    assert (watch.verdict, watch.rounds, clock.slept) == (a.INCONCLUSIVE, 1, [])
    assert watch.shortfall() == "action-divergence-per-dimension: samples 0 of 100"
