"""Experiment tracking in MLflow, when ``MLFLOW_TRACKING_URI`` is set.

MLflow is optional (``pip install 'rlops-trainer[tracking]'``): without the variable nothing is
tracked; with the variable but without mlflow installed, the run warns once and goes on untracked.
A run logs its config as parameters (flattened keys such as ``training.lr``), every iteration's
record as metrics (step = iteration), and at the end the model card and the run's config.yaml as
artifacts. The MLflow run id is kept in the checkpoint, so ``--resume`` continues the same MLflow run.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from rlops_contracts import MODEL_CARD_FILE

from rlops_trainer.online.config import OnlineConfig

ENV_VAR = "MLFLOW_TRACKING_URI"
_MAX_PARAM = 500  # MLflow refuses longer parameter values

log = logging.getLogger(__name__)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config data as ``{"section.key": "value"}`` strings (MLflow parameters)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = str(value)[:_MAX_PARAM]
    return flat


class Tracker:
    """One MLflow run: parameters once, metrics per iteration, artifacts at the end."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        """An ``mlflow.tracking.MlflowClient`` bound to the tracking URI."""
        self.run_id = run_id

    def log(self, record: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record["iteration"])
        metrics = [
            Metric(k, float(v), now, step) for k, v in record.items() if k != "iteration" and math.isfinite(v)
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, policy_dir: Path | None, status: str) -> None:
        if policy_dir is not None and (policy_dir / MODEL_CARD_FILE).is_file():
            self.client.log_artifact(self.run_id, str(policy_dir / MODEL_CARD_FILE))
            self.client.log_artifact(self.run_id, str(policy_dir.parent / "config.yaml"))
        self.client.set_terminated(self.run_id, status=status)


def start_tracking(cfg: OnlineConfig, out_dir: Path, run_id: str | None) -> Tracker | None:
    """A Tracker when MLFLOW_TRACKING_URI is set and mlflow is installed; continues ``run_id``."""
    uri = os.environ.get(ENV_VAR)
    if not uri:
        return None
    try:
        import mlflow
    except ImportError:
        log.warning(
            "%s is set but mlflow is not installed; this run is not tracked "
            "(pip install 'rlops-trainer[tracking]')",
            ENV_VAR,
        )
        return None
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    if run_id is None:
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(cfg.tracking.experiment)
        )
        run = client.create_run(
            experiment_id,
            run_name=cfg.tracking.run_name or Path(out_dir).resolve().name,
            tags={"rlops.algorithm": cfg.algorithm, "rlops.env": cfg.env, "rlops.run_dir": str(out_dir)},
        )
        run_id = str(run.info.run_id)
        for key, value in flatten(cfg.to_dict()).items():
            client.log_param(run_id, key, value)
    else:
        client.update_run(run_id, status="RUNNING")
    return Tracker(client, run_id)
