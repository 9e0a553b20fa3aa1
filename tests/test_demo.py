"""The whole loop on one machine, through the same command ``make demo`` runs, at a tiny size.

Real collection, training, OPE, registry, TorchServe, environment traffic, decision log and join.
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
def test_demo_runs_the_loop_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "rlops_cli.main", "demo", "--dir", str(out), "--episodes", "80",
         "--steps", "400", "--env-episodes", "3", "--traffic-episodes", "3"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

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
    # Every decision the traffic run made came back as a transition with its propensity.
    assert len(joined) == traffic["steps"] == traffic["rewards_posted"] > 0
    assert joined.has_propensities
    assert joined.meta.source == "decision-log"
    assert len(joined.episode_starts()) == 3
    # The server was stopped: nothing listens on its run directory any more.
    assert "stopped the server" in proc.stdout
