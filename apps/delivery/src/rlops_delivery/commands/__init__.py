"""``rlops`` sub-commands of the delivery package, mounted through the ``rlops.commands`` entry points."""

from __future__ import annotations

from pathlib import Path

from rlops_contracts.metrics import PORT_PROMETHEUS
from rlops_stack import local

from rlops_delivery.analysis import AnalysisError

CANARY_ANALYSIS = Path("canary") / "analysis.yaml"


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
