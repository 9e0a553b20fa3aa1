"""MLflow tracking of online runs: off without MLFLOW_TRACKING_URI, a warning without mlflow, and a real
MLflow file store: parameters, per-iteration metrics, artifacts, and the same run continued on resume."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pytest
from rlops_trainer.online.config import parse_config
from rlops_trainer.online.tracking import ENV_VAR, flatten, start_tracking

CFG = parse_config(
    {"algorithm": "PPO", "env": "CartPole-v1", "training": {"lr": 3e-4}, "tracking": {"experiment": "exp"}},
    "t",
)


def test_nothing_is_tracked_without_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert start_tracking(CFG, tmp_path, None) is None


def test_missing_mlflow_only_warns(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(ENV_VAR, f"file://{tmp_path / 'mlruns'}")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an environment without the extra looks like
    with caplog.at_level(logging.WARNING):
        assert start_tracking(CFG, tmp_path, None) is None
    assert "mlflow is not installed" in caplog.text


def test_flatten_names_nested_keys() -> None:
    flat = flatten({"training": {"lr": 0.001, "hidden": [64, 64]}, "seed": 0, "env_kwargs": {}})
    assert flat == {"training.lr": "0.001", "training.hidden": "[64, 64]", "seed": "0", "env_kwargs": "{}"}


def test_a_run_is_tracked_and_continued(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    uri = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv(ENV_VAR, uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "run"
    (out / "policy").mkdir(parents=True)
    (out / "policy" / "model-card.json").write_text("{}\n")
    (out / "config.yaml").write_text("algorithm: PPO\n")

    tracker = start_tracking(CFG, out, None)
    assert tracker is not None
    tracker.log({"iteration": 1.0, "loss": 2.0, "episode_return_mean": math.nan})
    tracker.log({"iteration": 2.0, "loss": 1.0, "episode_return_mean": 30.0})
    run_id = tracker.run_id
    resumed = start_tracking(CFG, out, run_id)
    assert resumed is not None
    assert resumed.run_id == run_id
    resumed.log({"iteration": 3.0, "loss": 0.5, "episode_return_mean": 60.0})
    resumed.finish(out / "policy", status="FINISHED")

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    assert run.data.params["training.lr"] == "0.0003"
    assert run.data.params["algorithm"] == "PPO"
    assert run.data.tags["rlops.env"] == "CartPole-v1"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (1, 2.0),
        (2, 1.0),
        (3, 0.5),
    ]
    # A NaN (no episode had ended yet) is left out rather than logged.
    assert [m.step for m in client.get_metric_history(run_id, "episode_return_mean")] == [2, 3]
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["config.yaml", "model-card.json"]
    assert client.get_experiment(run.info.experiment_id).name == "exp"
