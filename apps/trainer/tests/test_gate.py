"""The promotion gate: lower bound against the baseline plus margin, refusals, and its JSON form."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
from rlops_trainer.gate import GateError, decide, default_estimator
from rlops_trainer.ope import Estimate


def est(value: float, lower: float, upper: float, name: str = "dr", **kw: Any) -> Estimate:
    return Estimate(name, value, lower, upper, 0.95, 500, **kw)


BEHAVIOR = est(40.0, 38.0, 42.0, "behavior")


def test_candidate_is_compared_with_the_behaviour_policy_without_an_incumbent() -> None:
    d = decide(est(50.0, 41.5, 58.0), None, BEHAVIOR, margin=1.0)
    assert d.promote
    assert d.baseline == "behavior"
    assert d.required == 41.0
    assert d.incumbent_version is None
    assert d.reason == ("promoted: DR lower bound 41.5 (95 % interval) > behaviour policy 40 + margin 1 = 41")
    d = decide(est(50.0, 40.5, 58.0), None, BEHAVIOR, margin=1.0)
    assert not d.promote
    assert d.reason.startswith("not promoted: DR lower bound 40.5 (95 % interval) <= behaviour policy 40")


def test_the_incumbent_replaces_the_behaviour_policy_as_baseline() -> None:
    champion = est(43.0, 39.0, 47.0)
    d = decide(
        est(45.0, 41.2, 49.0),
        champion,
        BEHAVIOR,
        margin=1.0,
        incumbent_label="champion cp@3",
        incumbent_version=3,
    )
    assert not d.promote
    assert (d.baseline, d.baseline_value, d.incumbent_version) == ("incumbent", 43.0, 3)
    assert d.reason == "not promoted: DR lower bound 41.2 (95 % interval) <= champion cp@3 43 + margin 1 = 44"
    assert decide(est(50.0, 44.1, 55.0), champion, BEHAVIOR, margin=1.0).promote


def test_equal_is_not_better() -> None:
    assert not decide(est(50.0, 41.0, 58.0), None, BEHAVIOR, margin=1.0).promote


def test_relative_margin_scales_with_the_baseline() -> None:
    d = decide(est(50.0, 41.9, 58.0), None, BEHAVIOR, margin=0.05, relative=True)
    assert d.required == pytest.approx(42.0)
    assert not d.promote
    assert "margin 5 % (2)" in d.reason
    # A negative baseline: the margin still asks for more, not less.
    neg = est(-10.0, -12.0, -8.0, "behavior")
    d = decide(est(0.0, -9.6, 5.0), None, neg, margin=0.05, relative=True)
    assert d.required == pytest.approx(-9.5)
    assert not d.promote


def test_against_upper_bound_is_stricter() -> None:
    cand = est(50.0, 41.5, 58.0)
    assert decide(cand, None, BEHAVIOR).promote
    strict = decide(cand, None, BEHAVIOR, against="upper")
    assert not strict.promote
    assert strict.required == 42.0
    assert "behaviour policy upper bound 42" in strict.reason


def test_refuses_on_collapsed_importance_weights_for_pure_is() -> None:
    collapsed = {"ess": 2.5, "ess_fraction": 0.005, "ess_collapsed": True}
    d = decide(est(90.0, 80.0, 99.0, "wpdis", **collapsed), None, BEHAVIOR)
    assert not d.promote
    assert d.refused
    assert "collapsed importance weights (ESS 2.5 of 500 episodes)" in d.reason
    assert "gate on dr or fqe" in d.reason
    # Doubly robust estimates fall back on their model: collapse alone does not stop them.
    d = decide(est(90.0, 80.0, 99.0, "dr", **collapsed), None, BEHAVIOR)
    assert d.promote
    assert not d.refused
    # Which estimators refuse is configurable.
    d = decide(est(90.0, 80.0, 99.0, "dr", **collapsed), None, BEHAVIOR, refuse_on_collapse=("dr",))
    assert d.refused


def test_refuses_on_non_finite_estimates() -> None:
    d = decide(est(float("nan"), float("nan"), float("nan")), None, BEHAVIOR)
    assert d.refused
    assert not d.promote
    assert "not a number" in d.reason
    d = decide(est(50.0, 45.0, 55.0), est(float("inf"), 1.0, float("inf")), BEHAVIOR)
    assert d.refused


def test_mismatched_estimators_and_bad_arguments_raise() -> None:
    with pytest.raises(GateError, match="candidate estimated with dr but incumbent with fqe"):
        decide(est(1, 0, 2), est(1, 0, 2, "fqe"), BEHAVIOR)
    with pytest.raises(GateError, match="margin must be >= 0"):
        decide(est(1, 0, 2), None, BEHAVIOR, margin=-1)
    with pytest.raises(GateError, match="against must be"):
        decide(est(1, 0, 2), None, BEHAVIOR, against=cast(Any, "lower"))


def test_to_dict_is_strict_json() -> None:
    d = decide(est(float("nan"), float("nan"), 1.0), None, BEHAVIOR)
    data = d.to_dict()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text)["candidate_value"] is None
    assert {"promote", "incumbent_version", "reason", "baseline", "estimator", "required"} <= data.keys()


def test_default_estimator() -> None:
    assert default_estimator(True) == "dr"
    assert default_estimator(False) == "fqe"
