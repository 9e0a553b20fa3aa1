"""TorchServe's metrics config (``metrics.yaml``) with the rlops serving metrics declared in it.

TorchServe 0.12 exports a handler's metrics on its metrics port in prometheus mode once they are declared
under ``model_metrics``; :data:`rlops_server.metrics.SPECS` says which.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import yaml
from rlops_contracts.durable import replace_atomic

from rlops_server.metrics import SPECS


def torchserve_default_metrics_config() -> Path:
    """The metrics.yaml that ships with the installed TorchServe (``ts/configs/metrics.yaml``)."""
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "TorchServe (the 'ts' package) is not installed; pip install torchserve==0.12.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "configs" / "metrics.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: TorchServe's default metrics config is missing from the installation"
        )
    return path


def metrics_config(default: Path | None = None) -> dict[str, Any]:
    """TorchServe's default metrics config with the rlops metrics added under ``model_metrics``.

    A custom config replaces the default one, so TorchServe's own ``ts_metrics`` (and its handler's
    ``model_metrics``) are kept exactly as shipped: the frontend emits them with those dimensions.
    """
    source = default or torchserve_default_metrics_config()
    with open(source, encoding="utf-8") as f:
        base = yaml.safe_load(f)
    if not isinstance(base, dict) or "ts_metrics" not in base:
        raise ValueError(f"{source}: not a TorchServe metrics config (no ts_metrics section)")
    config = copy.deepcopy(base)
    model_metrics = config.get("model_metrics") or {}
    config["model_metrics"] = model_metrics
    for spec in SPECS:
        entries = model_metrics.setdefault(spec.kind, [])
        entries[:] = [e for e in entries if e.get("name") != spec.name]
        entries.append({"name": spec.name, "unit": spec.unit, "dimensions": spec.dimensions})
    return config


def write_metrics_config(path: Path, default: Path | None = None) -> Path:
    """Write :func:`metrics_config` as yaml to ``path``; returns ``path``."""
    return replace_atomic(path, yaml.safe_dump(metrics_config(default), sort_keys=False))
