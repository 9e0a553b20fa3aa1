"""``rlops`` sub-commands of the delivery package, mounted through the ``rlops.commands`` entry points."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rlops_contracts.metrics import PORT_PROMETHEUS
from rlops_stack import local

from rlops_delivery.analysis import AnalysisError

CANARY_ANALYSIS = Path("canary") / "analysis.yaml"

PrometheusUrlOption = Annotated[
    str | None,
    typer.Option(
        "--prometheus-url",
        help="Prometheus to query (default: the local stack's, rlops stack up, else port 9090).",
    ),
]
"""The Prometheus a command queries; :func:`prometheus_url` resolves it."""
AnalysisOption = Annotated[
    Path | None,
    typer.Option(
        "--analysis", help="Canary analysis file (default: alerts/canary/analysis.yaml).", dir_okay=False
    ),
]
"""The canary analysis file a command reads; :func:`analysis_path` resolves it."""


def analysis_path(explicit: Path | None) -> Path:
    """``explicit``, else ``canary/analysis.yaml`` in the alerts folder the local stack uses."""
    if explicit is not None:
        return explicit
    try:
        return local.alerts_dir() / CANARY_ANALYSIS
    except local.StackError as e:
        raise AnalysisError(f"{e}; or pass --analysis") from None


def prometheus_url(explicit: str | None, stack_root: Path = local.DEFAULT_ROOT) -> str:
    """``explicit``, else the running local stack's Prometheus, else the default local port."""
    if explicit:
        return explicit.rstrip("/")
    try:
        return local.prometheus_url(stack_root)
    except local.StackError:
        return f"http://127.0.0.1:{PORT_PROMETHEUS}"
