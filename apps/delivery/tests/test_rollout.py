"""The rollout controller against a scripted Prometheus and a recording serving double.

The real registry, analysis file and rollback action are used; only Prometheus' answers and TorchServe
are stand-ins (the end-to-end test runs the real ones).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from delivery_testkit import ANALYSIS, POLICY, publish, train_policy_dir
from rlops_delivery import analysis as a
from rlops_delivery import records
from rlops_delivery.config import parse_steps
from rlops_delivery.rollout import Rollout, RolloutError, RolloutSettings
from rlops_delivery.split import Split
from rlops_stack.prometheus import PrometheusError
from rlops_trainer.registry import Registry

GOOD = {
    "error-ratio": (500, 0.0),
    "latency-p99": (500, 0.02),
    "nonfinite-outputs": (500, 0.0),
    "action-divergence": (500, 0.05),
    "reward-rate": (500, 0.0),
}


class Prometheus:
    """Answers each check's queries from ``values[check] = (samples, value)`` (value None: empty)."""

    def __init__(self, spec: a.Analysis, args: dict[str, str]) -> None:
        self.values: dict[str, tuple[float, float | None]] = dict(GOOD)
        self.by_query: dict[str, tuple[str, str]] = {}
        for c in spec.checks:
            self.by_query[a.render(c.query, args)] = (c.name, "value")
            self.by_query[a.render(c.min_samples_query, args)] = (c.name, "samples")
        self.down = False
        self.asked = 0

    def __call__(self, expr: str) -> list[dict[str, Any]]:
        self.asked += 1
        if self.down:
            raise PrometheusError("Prometheus at http://x cannot be reached")
        if expr not in self.by_query:  # the traffic counts of the record
            return [{"metric": {}, "value": [0, "1000" if 'version="1"' in expr else "100"]}]
        name, kind = self.by_query[expr]
        samples, value = self.values[name]
        v = samples if kind == "samples" else value
        return [] if v is None else [{"metric": {}, "value": [0, str(v)]}]


class Serving:
    def __init__(self) -> None:
        self.run_dir: Path | None = None
        self.splits: list[float | None] = []
        self.defaults: list[int] = []

    def check(self, policy: str, champion: int, candidate: int) -> None:
        pass

    def publish_split(self, split: Split | None) -> None:
        self.splits.append(None if split is None else split.share)

    def make_default(self, policy: str, version: int) -> None:
        self.defaults.append(version)

    def record_aliases(self, policy: str, aliases: dict[str, int]) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


SETTINGS = RolloutSettings(steps=(0.1, 0.5), interval_s=10, step_min_s=20, step_timeout_s=60, failure_limit=1)


@dataclass
class Setup:
    rollout: Rollout
    prom: Prometheus
    serving: Serving
    clock: Clock


def _rollout(
    registry: Path, settings: RolloutSettings = SETTINGS, candidate: int = 2, **kwargs: Any
) -> Setup:
    spec = a.load(ANALYSIS)
    prom = Prometheus(spec, {"policy": POLICY, "candidate": str(candidate), "champion": "1"})
    serving, clock = Serving(), Clock()
    rollout = Rollout(
        registry,
        POLICY,
        candidate,
        analysis=spec,
        settings=settings,
        query=prom,
        serving=serving,
        clock=clock,
        sleep=kwargs.pop("sleep", clock.sleep),
        **kwargs,
    )
    return Setup(rollout, prom, serving, clock)


def _history(registry: Path) -> list[dict[str, Any]]:
    return Registry(registry).history(POLICY)


def test_steps_parse_and_validate() -> None:
    assert parse_steps("10, 50,100") == (0.1, 0.5, 1.0)
    for bad in ("", "0", "50,10", "10,10", "150", "ten"):
        with pytest.raises(ValueError, match="strictly increasing percentages"):
            parse_steps(bad)
    with pytest.raises(ValueError, match="step timeout"):
        RolloutSettings(steps=(0.1,), interval_s=10, step_min_s=60, step_timeout_s=30)


def test_a_healthy_candidate_is_promoted_with_its_evidence(registry: Path) -> None:
    t = _rollout(registry)
    record = t.rollout.run()
    assert record.state == records.PROMOTED
    assert t.serving.splits == [0.1, 0.5, None]
    assert t.serving.defaults == [2]
    reg = Registry(registry)
    assert reg.aliases(POLICY)["champion"] == 2
    last = _history(registry)[-1]
    assert (last["action"], last["to"], last["forced"]) == ("promote", 2, False)
    assert record.id in last["reason"]
    # Each step lasted its minimum (two measurements of 10 s) and then passed.
    assert [s.get("outcome") for s in record.steps] == ["passed", "passed", None]
    assert [len(s["measurements"]) for s in record.steps[:2]] == [2, 2]
    assert t.clock.now == 1040.0
    # The record on disk holds the decision, every check's evidence and the traffic.
    stored = json.loads((registry / POLICY / "rollouts" / f"{record.id}.json").read_text())
    assert stored["state"] == "promoted"
    evidence = {m["check"]: m for m in stored["decision"]["evidence"]}
    assert set(evidence) == set(GOOD)
    assert evidence["latency-p99"]["value"] == 0.02
    assert 'version="2"' in evidence["latency-p99"]["query"]
    assert evidence["latency-p99"]["threshold"] == 0.1
    assert stored["traffic"]["candidate_requests"] == 100
    assert stored["traffic"]["champion_requests"] == 1000
    assert stored["traffic"]["candidate_share"] == pytest.approx(100 / 1100)


def test_a_failing_check_rolls_back_after_the_failure_limit(registry: Path) -> None:
    t = _rollout(registry)
    t.prom.values["action-divergence"] = (500, 0.5)
    record = t.rollout.run()
    assert record.state == records.ROLLED_BACK
    # failure_limit 1: the second failed measurement decides, 20 s after the start.
    assert t.clock.now == 1020.0
    assert t.serving.splits == [0.1, None]
    assert t.serving.defaults == []
    assert record.decision is not None
    assert record.decision["failed_checks"] == ["action-divergence"]
    assert "action-divergence failed more than 1 time(s)" in record.decision["reason"]
    aliases = Registry(registry).aliases(POLICY)
    assert aliases == {"champion": 1, "candidate": 1}
    last = _history(registry)[-1]
    assert (last["alias"], last["from"], last["to"]) == ("candidate", 2, 1)
    assert record.id in last["reason"]


def test_no_traffic_is_not_success(registry: Path) -> None:
    t = _rollout(registry)
    t.prom.values = {name: (3, None) for name in GOOD}
    record = t.rollout.run()
    assert record.state == records.ROLLED_BACK
    assert t.clock.now == 1060.0
    assert record.decision is not None
    assert "not enough traffic to judge the candidate" in record.decision["reason"]
    assert "3 of 100 samples needed" in record.decision["reason"]
    assert Registry(registry).aliases(POLICY)["champion"] == 1


def test_a_failure_after_promotion_puts_the_previous_champion_back(registry: Path) -> None:
    settings = RolloutSettings(steps=(0.5, 1.0), interval_s=10, step_min_s=20, step_timeout_s=60)
    calls = []
    t = _rollout(registry, settings)
    original_step = t.rollout._step

    def step(share: float) -> tuple[str, str]:
        if share >= 1.0:
            calls.append(Registry(registry).aliases(POLICY)["champion"])
            t.prom.values["latency-p99"] = (500, 0.4)
        return original_step(share)

    t.rollout._step = step  # type: ignore[method-assign]
    record = t.rollout.run()
    assert calls == [2], "the 100 % step runs after promotion"
    assert record.state == records.ROLLED_BACK
    assert Registry(registry).aliases(POLICY)["champion"] == 1
    assert [h["action"] for h in _history(registry)[-2:]] == ["promote", "rollback"]
    assert record.decision is not None
    assert record.decision["actions"][0]["outcome"] == "done"


def test_the_registry_gate_must_allow_the_candidate_unless_forced(
    registry: Path, cartpole_data: Any, tmp_path: Path
) -> None:
    v3 = publish(registry, train_policy_dir(cartpole_data, tmp_path / "p3", seed=3), gate=False)
    with pytest.raises(
        RolloutError, match=r"gate does not allow promoting cartpole version 3.*--force-reason"
    ):
        _rollout(registry, candidate=v3)
    t = _rollout(registry, candidate=v3, force_reason="canary decides")
    record = t.rollout.run()
    assert record.state == records.PROMOTED
    assert record.forced == "canary decides"
    last = _history(registry)[-1]
    assert last["forced"] is True
    assert "canary decides" in last["reason"]
    with pytest.raises(RolloutError, match="already the champion"):
        _rollout(registry, candidate=v3)


def test_an_interruption_sends_traffic_back_and_is_recorded(registry: Path) -> None:
    clock = Clock()

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now > 1015:
            raise KeyboardInterrupt

    t = _rollout(registry, sleep=sleep)
    rollout, serving = t.rollout, t.serving
    rollout.clock = clock
    with pytest.raises(KeyboardInterrupt):
        rollout.run()
    assert serving.splits == [0.1, None]
    stored = records.read_all(registry, POLICY)[-1]
    assert stored.state == records.ABORTED
    assert stored.decision is not None
    assert "KeyboardInterrupt" in stored.decision["reason"]
    assert Registry(registry).aliases(POLICY)["champion"] == 1


def test_prometheus_out_of_reach_rolls_back(registry: Path) -> None:
    t = _rollout(registry)
    t.prom.down = True
    record = t.rollout.run()
    assert record.state == records.ROLLED_BACK
    assert record.decision is not None
    assert "5 measurements in a row failed" in record.decision["reason"]


def test_the_ope_gate_stops_it_before_any_traffic_moves(registry: Path) -> None:
    t = _rollout(registry, ope=lambda: {"promote": False, "reason": "worse"})
    record = t.rollout.run()
    assert record.state == records.REJECTED
    assert t.serving.splits == []
    assert record.ope == {"promote": False, "reason": "worse"}


def test_one_rollout_per_policy_at_a_time(registry: Path) -> None:
    with records.locked(registry, POLICY):
        assert records.is_locked(registry, POLICY)
        rollout = _rollout(registry).rollout
        with pytest.raises(records.RolloutBusy, match="already running"):
            rollout.run()
    assert not records.is_locked(registry, POLICY)


def test_status_shows_the_decision_and_its_evidence(registry: Path) -> None:
    from rlops_delivery.commands.rollout import app
    from typer.testing import CliRunner

    t = _rollout(registry)
    t.prom.values["reward-rate"] = (500, -0.5)
    record = t.rollout.run()
    result = CliRunner().invoke(app, ["status", "--registry", str(registry)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"rollout {record.id}: cartpole version 2 against 1: rolled_back" in result.output
    assert "reward-rate" in result.output
    assert ">= -0.05" in result.output
    assert "9.09 % to the candidate" in result.output
    assert "step 1: 10 %: failed (reward-rate failed more than 1 time(s)" in result.output
    as_json = CliRunner().invoke(app, ["status", "--registry", str(registry), "--json", "--all"])
    assert as_json.exit_code == 0
    assert '"state": "rolled_back"' in as_json.output


def test_traffic_follows_the_servers_new_keys_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop restarts TorchServe with the candidate (new keys) while `rollout traffic` keeps running:
    # its client must be given the key file to read again, not the key it found at the start.
    from rlops_delivery import split
    from rlops_delivery.commands.rollout import app
    from typer.testing import CliRunner

    def keys(inference: str) -> None:
        (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": inference}}))

    given: dict[str, Any] = {}

    class Captured(Exception):
        pass

    def capture(*args: Any, **kwargs: Any) -> None:
        given.update(kwargs)
        raise Captured

    keys("before")
    monkeypatch.delenv("RLOPS_INFERENCE_TOKEN", raising=False)
    monkeypatch.setattr(split, "SplitClient", capture)
    result = CliRunner().invoke(app, ["traffic", "--model", POLICY, "--serve-run-dir", str(tmp_path)])
    assert isinstance(result.exception, Captured), result.output
    token = given["token"]
    assert callable(token)
    assert token() == "before"
    keys("after")
    assert token() == "after"


# --- Box policies ---------------------------------------------------------------------------------------


class BoxPrometheus(Prometheus):
    """Also answers the per-dimension action-bin query: ``bins[version][dimension][bin]`` counts."""

    def __init__(self, spec: a.Analysis, args: dict[str, str], bins: dict[str, list[list[float]]]) -> None:
        super().__init__(spec, args)
        self.bins = bins

    def __call__(self, expr: str) -> list[dict[str, Any]]:
        if "rlops_action_drift_bin_total" not in expr:
            return super().__call__(expr)
        self.asked += 1
        return [
            {"metric": {"version": v, "dimension": str(d), "bin": str(b)}, "value": [0, str(n)]}
            for v, dims in self.bins.items()
            for d, counts in enumerate(dims)
            for b, n in enumerate(counts)
        ]


def _box_rollout(registry: Path, candidate_bins: str) -> Setup:
    """A canary of Box version 2 against Box champion 1: the champion's actions spread as its reference
    says, the candidate's the same way (``same``) or all at the upper bound (``collapsed``)."""
    spec = a.load(ANALYSIS)
    reference = Registry(registry).card(POLICY, 1)["reference"]["actions"]["bins"]
    spread = [[1000 * p for p in b["proportions"]] for b in reference]
    same = [[300 * p for p in b["proportions"]] for b in reference]
    collapsed = [[0.0] * (len(b["proportions"]) - 1) + [300.0] for b in reference]
    bins = {"1": spread, "2": same if candidate_bins == "same" else collapsed}
    prom = BoxPrometheus(spec, {"policy": POLICY, "candidate": "2", "champion": "1"}, bins)
    serving, clock = Serving(), Clock()
    rollout = Rollout(
        registry,
        POLICY,
        2,
        analysis=spec,
        settings=SETTINGS,
        query=prom,
        serving=serving,
        clock=clock,
        sleep=clock.sleep,
    )
    return Setup(rollout, prom, serving, clock)


def test_a_box_candidate_is_judged_per_action_dimension(box_registry: Path) -> None:
    t = _box_rollout(box_registry, "same")
    record = t.rollout.run()
    assert record.state == records.PROMOTED
    assert "action-divergence" not in record.settings["checks"]
    assert "action-divergence-per-dimension" in record.settings["checks"]
    assert "Box" in record.settings["skipped_checks"]["action-divergence"]
    assert record.decision is not None
    evidence = {m["check"]: m for m in record.decision["evidence"]}
    assert evidence["action-divergence-per-dimension"]["value"] == pytest.approx(0.0)
    assert evidence["action-divergence-per-dimension"]["samples"] == pytest.approx(300)
    # The reward-based check still runs as it is.
    assert evidence["reward-rate"]["verdict"] == "pass"


def test_a_box_candidate_collapsed_onto_a_bound_rolls_back(box_registry: Path) -> None:
    t = _box_rollout(box_registry, "collapsed")
    record = t.rollout.run()
    assert record.state == records.ROLLED_BACK
    assert record.decision is not None
    assert record.decision["failed_checks"] == ["action-divergence-per-dimension"]
    assert Registry(box_registry).aliases(POLICY) == {"champion": 1, "candidate": 1}
