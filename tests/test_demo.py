"""The whole loop on one machine, through the same command ``make demo`` runs, at a tiny size.

Real collection, training, OPE, registry, TorchServe, environment traffic, decision log and join, the
local Prometheus / Alertmanager stack, one iteration of the continuous-learning loop and the report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rlops_trainer.datasets import load
from rlops_trainer.registry import Registry


@pytest.mark.slow
@pytest.mark.timeout(1500)
def run_demo(tmp_path: Path, *args: str) -> tuple[Path, str]:
    """``rlops demo`` at a tiny size in its own process; returns its folder and its output."""
    out = tmp_path / "demo"
    log = tmp_path / "demo.log"
    with log.open("w") as sink:
        proc = subprocess.run(
            [sys.executable, "-m", "rlops_cli.main", "demo", "--dir", str(out), "--env-episodes", "3",
             "--traffic-episodes", "3", "--loop-steps", "300", "--fqe-steps", "1500", *args],
            stdout=sink, stderr=subprocess.STDOUT, text=True, timeout=1400, check=False,
        )  # fmt: skip
    output = log.read_text()
    assert proc.returncode == 0, output[-8000:]
    return out, output


def test_demo_runs_the_loop_end_to_end(tmp_path: Path) -> None:
    out, output = run_demo(tmp_path, "--episodes", "80", "--steps", "400")

    report = json.loads((out / "reports" / "offline" / "report.json").read_text())
    assert {p["role"] for p in report["policies"]} >= {"candidate"}
    assert (out / "reports" / "offline" / "report.png").stat().st_size > 0

    registry = Registry(out / "registry")
    champion = registry.aliases("cartpole")["champion"]
    card = registry.card("cartpole", champion)
    assert card["gate"]["promote"] is True
    assert card["evaluation"] is not None

    traffic = json.loads((out / "reports" / "traffic.json").read_text())
    joined = load(out / "data" / "served-joined.parquet")
    # Every rewarded decision came back as a transition with its propensity. A step the client answered
    # with its fallback (a timeout on a loaded machine) posts no reward, so it is not joined.
    assert len(joined) == traffic["rewards_posted"] > 0
    assert traffic["rewards_posted"] + traffic["rewards_skipped"] == traffic["steps"]
    assert joined.has_propensities
    assert joined.meta.source == "decision-log"
    assert len(joined.episode_starts()) == 3
    # The server was stopped: nothing listens on its run directory any more.
    assert "stopped the server" in output

    # One loop iteration ran to a decision on the logs the served traffic produced.
    state = json.loads((out / "loop" / "cartpole" / "state.json").read_text())
    (iteration,) = state["iterations"]
    assert iteration["stage"] == "done", iteration
    # The gate may honestly reject a candidate retrained on a few hundred served transitions.
    assert iteration["outcome"] in ("promoted", "rolled_back", "rejected", "rejected_by_gate"), iteration
    assert state["consumed"], "the iteration consumed no decision log"
    # The report page charts what the real Prometheus scraped during the demo.
    page = (out / "reports" / "live" / "index.html").read_text()
    assert "<h2>rlops / Serving</h2>" in page
    assert "<h2>Alerts</h2>" in page
    assert page.count("data:image/png;base64,") >= 4
    # The monitoring stack was stopped: no pid file is left behind.
    assert not list((out / "stack").glob("*.pid"))


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_runs_the_loop_with_continuous_actions(tmp_path: Path) -> None:
    out, _ = run_demo(tmp_path, "--env", "Pendulum-v1", "--episodes", "60", "--steps", "3000")

    data = load(out / "data" / "pendulum-mixed.parquet")
    assert data.meta.is_continuous
    assert data.has_propensities  # exact log-densities of the Gaussian behaviour

    registry = Registry(out / "registry")
    champion = registry.aliases("pendulum")["champion"]
    card = registry.card("pendulum", champion)
    assert card["action_space"]["type"] == "Box"
    assert card["policy"]["score_kind"] == "action"
    assert card["gate"]["promote"] is True

    traffic = json.loads((out / "reports" / "traffic.json").read_text())
    joined = load(out / "data" / "served-joined.parquet")
    assert joined.meta.is_continuous
    assert joined.action.shape == (len(joined), 1)
    low, high = joined.meta.action_bounds()
    assert (joined.action >= low).all()
    assert (joined.action <= high).all()
    assert len(joined) == traffic["rewards_posted"] > 0
    assert len(joined.episode_starts()) == 3

    state = json.loads((out / "loop" / "pendulum" / "state.json").read_text())
    (iteration,) = state["iterations"]
    assert iteration["stage"] == "done", iteration
    page = (out / "reports" / "live" / "index.html").read_text()
    assert "<h2>rlops / Policy health</h2>" in page
    assert not list((out / "stack").glob("*.pid"))
