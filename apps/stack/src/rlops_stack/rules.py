"""The alert rules as data, and the checks that keep every alert answerable at 3 a.m.

:func:`problems` lists what is missing in an ``alerts/`` folder: each alert must have

- a CamelCase name with the ``Rlops`` prefix, a positive ``for:``, ``severity`` critical, warning or info,
  and the annotations ``summary``, ``description`` (showing ``$value``), ``runbook_url`` (this repository's
  runbook of that name) and ``dashboard_url`` (one of the rlops dashboards);
- a runbook ``runbooks/<AlertName>.md`` with the sections what it means, how to confirm, what to do (with
  the ``rlops`` commands) and when to escalate;
- promtool tests (``tests/*.yaml``): one evaluation where it fires with exactly the rule's labels and
  annotations, the evaluation just before it (nothing fires) and, in another test, a healthy case.

``tests/test_alerts.py`` runs it against the repository and against broken copies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PREFIX = "Rlops"
NAME_RE = re.compile(rf"^{PREFIX}[A-Z][A-Za-z0-9]+$")
SEVERITIES = ("critical", "warning", "info")
ANNOTATIONS = ("summary", "description", "runbook_url", "dashboard_url")
RUNBOOK_BASE = "https://github.com/rlops/rlops/blob/main/alerts/runbooks/"
DASHBOARD_UIDS = ("rlops-training", "rlops-serving", "rlops-policy-health", "rlops-slo")
ACTION_VALUES = ("rollback", "scale_up")
RUNBOOK_SECTIONS = ("## What it means", "## How to confirm", "## What to do", "## When to escalate")
_DURATION_RE = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


@dataclass(frozen=True)
class AlertRule:
    name: str
    file: Path
    group: str
    expr: str
    for_s: float
    labels: dict[str, str]
    annotations: dict[str, str]


def parse_duration(text: Any) -> float:
    """A Prometheus duration (``1h30m``, ``90s``, ``500ms``) in seconds."""
    text = str(text)
    parts = _DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a Prometheus duration (such as 30s, 5m, 1h30m)")
    return sum(int(n) * _UNIT_S[u] for n, u in parts)


def _load(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_alerts(alerts: Path) -> list[AlertRule]:
    """Every alerting rule of ``alerts/rules/*.yaml``, in file order."""
    found = []
    for path in sorted((alerts / "rules").glob("*.yaml")):
        for group in (_load(path) or {}).get("groups") or []:
            for rule in group.get("rules") or []:
                if "alert" not in rule:
                    continue
                found.append(
                    AlertRule(
                        name=str(rule["alert"]),
                        file=path,
                        group=str(group.get("name")),
                        expr=str(rule.get("expr", "")),
                        for_s=parse_duration(rule["for"]) if "for" in rule else 0.0,
                        labels={str(k): str(v) for k, v in (rule.get("labels") or {}).items()},
                        annotations={str(k): str(v) for k, v in (rule.get("annotations") or {}).items()},
                    )
                )
    return found


def _rule_problems(alert: AlertRule) -> list[str]:
    where = f"{alert.file.name}: {alert.name}"
    out = []
    if not NAME_RE.match(alert.name):
        out.append(f"{where}: name must be CamelCase with the prefix {PREFIX!r}")
    if alert.for_s <= 0:
        out.append(f"{where}: needs a positive for: (so that a test can show it holding back)")
    if alert.labels.get("severity") not in SEVERITIES:
        out.append(f"{where}: label severity must be one of {', '.join(SEVERITIES)}")
    if "action" in alert.labels and alert.labels["action"] not in ACTION_VALUES:
        out.append(f"{where}: label action must be one of {', '.join(ACTION_VALUES)}")
    for key in ANNOTATIONS:
        if not alert.annotations.get(key, "").strip():
            out.append(f"{where}: annotation {key} is missing")
    if "$value" not in alert.annotations.get("description", ""):
        out.append(f"{where}: the description must show the value ($value)")
    if (
        alert.annotations.get("runbook_url", RUNBOOK_BASE + alert.name + ".md")
        != RUNBOOK_BASE + alert.name + ".md"
    ):
        out.append(f"{where}: runbook_url must be {RUNBOOK_BASE}{alert.name}.md")
    dashboard = alert.annotations.get("dashboard_url", "")
    if dashboard and not any(dashboard.startswith(f"/d/{uid}/") for uid in DASHBOARD_UIDS):
        out.append(f"{where}: dashboard_url must point at one of the dashboards {', '.join(DASHBOARD_UIDS)}")
    return out


def _runbook_problems(alerts: Path, names: set[str]) -> list[str]:
    out = []
    runbooks = alerts / "runbooks"
    for name in sorted(names):
        path = runbooks / f"{name}.md"
        if not path.is_file():
            out.append(f"{name}: no runbook runbooks/{name}.md")
            continue
        text = path.read_text(encoding="utf-8")
        if not text.startswith(f"# {name}\n"):
            out.append(f"runbooks/{name}.md: must start with the heading '# {name}'")
        positions = [text.find(f"\n{s}\n") for s in RUNBOOK_SECTIONS]
        for section, pos in zip(RUNBOOK_SECTIONS, positions, strict=True):
            if pos < 0:
                out.append(f"runbooks/{name}.md: section '{section}' is missing")
        if all(p >= 0 for p in positions):
            if positions != sorted(positions):
                out.append(
                    f"runbooks/{name}.md: sections must come in the order {', '.join(RUNBOOK_SECTIONS)}"
                )
            todo = text[positions[2] : positions[3]]
            if not re.search(r"^\s*rlops \S+", todo, re.MULTILINE):
                out.append(f"runbooks/{name}.md: 'What to do' names no rlops command")
    if runbooks.is_dir():
        for path in sorted(runbooks.glob("*.md")):
            if path.stem not in names:
                out.append(f"runbooks/{path.name}: no alert of that name")
    return out


def _test_problems(alerts: Path, by_name: dict[str, AlertRule]) -> list[str]:
    out = []
    firing: dict[str, list[tuple[str, float, float]]] = {}
    quiet: dict[str, list[tuple[str, float]]] = {}
    tested_files: set[str] = set()
    for path in sorted((alerts / "tests").glob("*.yaml")):
        data = _load(path) or {}
        for rf in data.get("rule_files") or []:
            tested_files.add((path.parent / rf).resolve().name)
        interval = parse_duration(data.get("evaluation_interval", "1m"))
        for i, test in enumerate(data.get("tests") or []):
            group = f"{path.name} test {test.get('name', i)!r}"
            for case in test.get("alert_rule_test") or []:
                name, at = str(case.get("alertname")), parse_duration(case.get("eval_time"))
                expected = case.get("exp_alerts") or []
                rule = by_name.get(name)
                if rule is None:
                    out.append(f"{group}: tests {name}, which is no alert")
                    continue
                if not expected:
                    quiet.setdefault(name, []).append((group, at))
                    continue
                firing.setdefault(name, []).append((group, at, interval))
                for alert in expected:
                    labels = {str(k): str(v) for k, v in (alert.get("exp_labels") or {}).items()}
                    annotations = {str(k) for k in (alert.get("exp_annotations") or {})}
                    for key, value in rule.labels.items():
                        if labels.get(key) != value:
                            out.append(
                                f"{group}: {name} at {case.get('eval_time')} must expect {key}={value}"
                            )
                    if annotations != set(rule.annotations):
                        out.append(
                            f"{group}: {name} at {case.get('eval_time')} must expect exactly the annotations "
                            f"{', '.join(sorted(rule.annotations))}"
                        )
    for name in sorted(by_name):
        fires = firing.get(name, [])
        if not fires:
            out.append(f"{name}: no promtool test where it fires")
        elif not any(
            g == fg and at - interval <= before < at
            for fg, at, interval in fires
            for g, before in quiet.get(name, [])
        ):
            out.append(
                f"{name}: no test of the evaluation just before it fires (same test, one interval earlier)"
            )
        if not any(g not in {fg for fg, _, _ in fires} for g, _ in quiet.get(name, [])):
            out.append(f"{name}: no healthy case (a test where it never fires)")
    for rule in by_name.values():
        if rule.file.name not in tested_files:
            out.append(f"{rule.file.name}: no promtool test file loads it")
            tested_files.add(rule.file.name)
    return out


def problems(alerts: Path) -> list[str]:
    """Everything that keeps the alerts under ``alerts`` from being complete; empty when all is well."""
    alerts = Path(alerts)
    rules = load_alerts(alerts)
    out: list[str] = []
    by_name: dict[str, AlertRule] = {}
    for rule in rules:
        if rule.name in by_name:
            out.append(f"{rule.file.name}: alert {rule.name} is defined twice")
        by_name[rule.name] = rule
        out += _rule_problems(rule)
    for path in sorted((alerts / "rules").glob("*.yaml")):
        for group in (_load(path) or {}).get("groups") or []:
            if "interval" in group:
                out.append(
                    f"{path.name}: group {group.get('name')} sets interval: (rules follow the global "
                    "evaluation "
                    "interval, so the local profiles can shorten it)"
                )
    out += _runbook_problems(alerts, set(by_name))
    out += _test_problems(alerts, by_name)
    return out
