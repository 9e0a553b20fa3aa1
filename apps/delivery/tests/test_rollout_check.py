"""``rlops rollout check``: the per-dimension checks that Argo runs as a Job metric, against a scripted
Prometheus and real model cards in a real registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from delivery_testkit import ANALYSIS, POLICY, publish, train_policy_dir
from rlops_delivery.commands.rollout import app
from rlops_stack import prometheus
from rlops_stack.prometheus import PrometheusError
from rlops_trainer.registry import Registry
from typer.testing import CliRunner

runner = CliRunner()
URL = "http://prometheus.test:9090"


class BinPrometheus:
    """Answers the action-bin query from ``bins[version][dimension][bin]`` counts, one answer per call
    (the last one repeats); any other query is a mistake, since the file's checks are Argo's to query."""

    def __init__(self, *answers: dict[str, list[list[float]]]) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str, str]] = []

    def __call__(self, url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        self.asked.append((url, expr))
        assert "rlops_action_drift_bin_total" in expr, expr
        bins = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return [
            {"metric": {"version": v, "dimension": str(d), "bin": str(b)}, "value": [0, str(n)]}
            for v, dims in bins.items()
            for d, counts in enumerate(dims)
            for b, n in enumerate(counts)
        ]


def _reference(registry: Path, version: int, total: float) -> list[list[float]]:
    """``total`` decisions per dimension, spread over the bins as the version's card says."""
    bins = Registry(registry).card(POLICY, version)["reference"]["actions"]["bins"]
    return [[total * p for p in b["proportions"]] for b in bins]


def _collapsed(registry: Path, version: int, total: float) -> list[list[float]]:
    """``total`` decisions per dimension, all in the top bin (actions at the upper bound)."""
    bins = Registry(registry).card(POLICY, version)["reference"]["actions"]["bins"]
    return [[0.0] * (len(b["proportions"]) - 1) + [total] for b in bins]


def _fast_analysis(tmp_path: Path) -> Path:
    """The repository's analysis file measured every 10 ms, so a test can wait several rounds."""
    path = tmp_path / "analysis.yaml"
    text = ANALYSIS.read_text(encoding="utf-8")
    assert "\ninterval: 15s\n" in text
    path.write_text(text.replace("\ninterval: 15s\n", "\ninterval: 10ms\n"), encoding="utf-8")
    return path


def _check(registry: Path, *args: str, analysis: Path = ANALYSIS) -> Any:
    base = ["check", POLICY, *args, "--registry", str(registry), "--analysis", str(analysis)]
    return runner.invoke(app, [*base, "--prometheus-url", URL])


def test_a_box_candidate_like_its_champion_passes(box_registry: Path, monkeypatch) -> None:
    prom = BinPrometheus({"1": _reference(box_registry, 1, 1000), "2": _reference(box_registry, 2, 300)})
    monkeypatch.setattr(prometheus, "query", prom)
    result = _check(box_registry, "candidate", "champion", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert (answer["verdict"], answer["candidate"], answer["champion"], answer["rounds"]) == ("pass", 2, 1, 1)
    (measured,) = answer["checks"]
    assert measured["check"] == "action-divergence-per-dimension"
    assert measured["value"] == pytest.approx(0.0, abs=1e-9)
    assert measured["samples"] == pytest.approx(300)
    assert "action-divergence" in answer["skipped_checks"]
    # One query per round, to the Prometheus given, for the two resolved versions only.
    ((url, expr),) = prom.asked
    assert url == URL
    assert f'policy="{POLICY}",version=~"2|1"' in expr


def test_a_collapsed_box_candidate_fails(box_registry: Path, monkeypatch) -> None:
    prom = BinPrometheus({"1": _reference(box_registry, 1, 1000), "2": _collapsed(box_registry, 2, 300)})
    monkeypatch.setattr(prometheus, "query", prom)
    result = _check(box_registry, "2", "1")
    assert result.exit_code == 1, result.output
    assert "fail: action-divergence-per-dimension 0.8" in " ".join(result.output.split())
    assert "> 0.25 in action dimension" in result.output


def test_too_little_traffic_is_inconclusive_and_exits_1(
    box_registry: Path, tmp_path: Path, monkeypatch
) -> None:
    prom = BinPrometheus({"1": _reference(box_registry, 1, 1000), "2": _reference(box_registry, 2, 40)})
    monkeypatch.setattr(prometheus, "query", prom)
    result = _check(box_registry, "2", "1", "--wait-s", "0.05", analysis=_fast_analysis(tmp_path))
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    assert "inconclusive after 0 s (action-divergence-per-dimension: samples 40 of 200)" in output
    assert "no traffic is not success" in output
    assert len(prom.asked) > 1  # it kept measuring until the time ran out


def test_it_measures_until_the_traffic_suffices(box_registry: Path, tmp_path: Path, monkeypatch) -> None:
    champion = _reference(box_registry, 1, 1000)
    prom = BinPrometheus(
        {"1": champion},
        {"1": champion, "2": _reference(box_registry, 2, 100)},
        {"1": champion, "2": _reference(box_registry, 2, 250)},
    )
    monkeypatch.setattr(prometheus, "query", prom)
    result = _check(box_registry, "2", "1", "--wait-s", "60", "--json", analysis=_fast_analysis(tmp_path))
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert (answer["verdict"], answer["rounds"]) == ("pass", 3)


def test_discrete_policies_have_nothing_to_add(registry: Path, monkeypatch) -> None:
    def unreachable(url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        raise AssertionError(f"no query expected, got {expr}")

    monkeypatch.setattr(prometheus, "query", unreachable)
    result = _check(registry, "2", "1")
    assert result.exit_code == 0, result.output
    assert "Discrete actions" in result.output
    assert "the rendered Prometheus checks cover them" in " ".join(result.output.split())


def test_policies_of_different_kinds_are_bad_input(
    box_registry: Path, cartpole_data: Any, tmp_path: Path
) -> None:
    discrete = publish(box_registry, train_policy_dir(cartpole_data, tmp_path / "d"))
    result = _check(box_registry, str(discrete), "1")
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert f"cannot check {POLICY} version {discrete} against version 1" in output
    assert "Discrete action space and the champion in a Box one" in output


def test_unknown_versions_policies_and_prometheus_are_named(box_registry: Path, monkeypatch) -> None:
    result = _check(box_registry, "9", "1")
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "the candidate '9'" in output
    assert "has no version 9" in output
    assert f"(registry {box_registry})" in result.output
    result = runner.invoke(app, ["check", "nope", "2", "1", "--registry", str(box_registry)])
    assert result.exit_code == 2
    assert "unknown policy 'nope'" in result.output
    result = _check(box_registry, "1", "champion")
    assert result.exit_code == 2
    assert "both cartpole version 1" in result.output

    def down(url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        raise PrometheusError(f"Prometheus at {url} cannot be reached (connection refused)")

    monkeypatch.setattr(prometheus, "query", down)
    result = _check(box_registry, "2", "1")
    assert result.exit_code == 2
    assert f"Prometheus at {URL} cannot be reached" in " ".join(result.output.split())
