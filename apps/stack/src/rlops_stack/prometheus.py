"""Reading a Prometheus over its HTTP API: instant and range queries, alerts, targets.

Shared by ``rlops stack status``, the report and the tests; every call names the server and the query
in its error, since a wrong query or a stopped server are the two things that go wrong.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from rlops_server.http import request_json


class PrometheusError(RuntimeError):
    """Prometheus could not be reached or refused the request."""


def _get(url: str, path: str, params: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    full = f"{url.rstrip('/')}{path}"
    if params:
        full += "?" + urllib.parse.urlencode(params)
    try:
        status, body = request_json("GET", full, timeout=timeout)
    except OSError as e:
        raise PrometheusError(
            f"Prometheus at {url} cannot be reached ({e}); is it running (rlops stack status)?"
        ) from None
    if status != 200 or not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error") if isinstance(body, dict) else body
        raise PrometheusError(f"Prometheus at {url} answered {status} to {path} {params or ''}: {error}")
    return body["data"]


def query(url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """The instant vector ``expr`` evaluates to (now, or at unix time ``at``): ``[{metric, value}]``."""
    params: dict[str, Any] = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data = _get(url, "/api/v1/query", params)
    if data.get("resultType") != "vector":
        raise PrometheusError(f"{expr!r} is a {data.get('resultType')}, not an instant vector")
    result: list[dict[str, Any]] = data["result"]
    return result


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    """The range matrix of ``expr`` between unix times ``start`` and ``end``: ``[{metric, values}]``."""
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
    result: list[dict[str, Any]] = _get(url, "/api/v1/query_range", params)["result"]
    return result


def alerts(url: str) -> list[dict[str, Any]]:
    """Pending and firing alerts: ``[{labels, annotations, state, activeAt, value}]``."""
    result: list[dict[str, Any]] = _get(url, "/api/v1/alerts")["alerts"]
    return result


def targets(url: str) -> list[dict[str, Any]]:
    """Active scrape targets: ``[{labels, scrapeUrl, health, lastError, lastScrape}]``."""
    result: list[dict[str, Any]] = _get(url, "/api/v1/targets", {"state": "active"})["activeTargets"]
    return result


def rule_groups(url: str) -> list[dict[str, Any]]:
    """Loaded rule groups with their rules, health and last evaluation."""
    result: list[dict[str, Any]] = _get(url, "/api/v1/rules")["groups"]
    return result
