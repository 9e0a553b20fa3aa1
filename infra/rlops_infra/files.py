"""The repository files the stack deploys, loaded at render time: alert rules, the Alertmanager config,
the canary analysis checks and the built dashboards. Nothing here copies their content into Python.

Rule files are recognised by content (a mapping with ``groups:``), so the layout of ``alerts/`` can grow
without touching this module; promtool test files (``rule_files:``/``tests:``) are not rules.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (infra/rlops_infra/files.py → ../..)."""

ANALYSIS_FILE = Path("alerts/canary/analysis.yaml")
DASHBOARDS_GLOB = "dashboards/build/*.json"
PLACEHOLDERS = ("{{args.policy}}", "{{args.candidate}}", "{{args.champion}}")


class FilesError(ValueError):
    """A repository file the stack deploys is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class RuleFile:
    path: Path
    """Relative to the repository root."""
    name: str
    """Kubernetes name of its PrometheusRule."""
    groups: list[dict[str, Any]]


@dataclass(frozen=True)
class Dashboard:
    path: Path
    uid: str
    name: str
    """Kubernetes name of its ConfigMap."""
    text: str
    """The file's exact content (what Grafana's sidecar loads)."""


@dataclass(frozen=True)
class Check:
    name: str
    description: str
    query: str
    comparison: str
    threshold: float
    min_samples_query: str
    min_samples: float


@dataclass(frozen=True)
class Analysis:
    interval: str
    failure_limit: int
    checks: tuple[Check, ...]
    text: str
    """The file's exact content (what ``rlops loop run-once --analysis`` reads in the cluster)."""


@dataclass(frozen=True)
class RepoFiles:
    rule_files: tuple[RuleFile, ...]
    alertmanager: dict[str, Any] | None
    alertmanager_path: Path | None
    analysis: Analysis | None
    dashboards: tuple[Dashboard, ...]

    @classmethod
    def load(cls, root: Path = ROOT) -> RepoFiles:
        rules, alertmanager, am_path = _load_alerts(root)
        analysis_path = root / ANALYSIS_FILE
        analysis = load_analysis(analysis_path, root) if analysis_path.is_file() else None
        return cls(
            rule_files=tuple(rules),
            alertmanager=alertmanager,
            alertmanager_path=am_path,
            analysis=analysis,
            dashboards=tuple(load_dashboards(root)),
        )


def k8s_name(text: str) -> str:
    """A DNS-1123 name from a file stem or uid."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return name[:63].rstrip("-") or "unnamed"


def _shown(path: Path, root: Path) -> Path:
    return path.relative_to(root) if path.is_relative_to(root) else path


def _yaml(path: Path, root: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise FilesError(f"{_shown(path, root)}: not valid YAML ({exc})") from None


def _load_alerts(root: Path) -> tuple[list[RuleFile], dict[str, Any] | None, Path | None]:
    rules: list[RuleFile] = []
    alertmanager: dict[str, Any] | None = None
    am_path: Path | None = None
    alerts = root / "alerts"
    paths = sorted([*alerts.rglob("*.yml"), *alerts.rglob("*.yaml")]) if alerts.is_dir() else []
    names: dict[str, Path] = {}
    for path in paths:
        rel = path.relative_to(root)
        doc = _yaml(path, root)
        if not isinstance(doc, dict):
            continue
        if "groups" in doc and "tests" not in doc:
            groups = doc["groups"]
            if not isinstance(groups, list) or not all(isinstance(g, dict) and "rules" in g for g in groups):
                raise FilesError(f"{rel}: 'groups' must be a list of groups with 'rules'")
            name = k8s_name("rlops-" + "-".join(rel.with_suffix("").parts[1:]))
            if name in names:
                raise FilesError(f"{rel} and {names[name]} map to the same PrometheusRule name {name}")
            names[name] = rel
            rules.append(RuleFile(path=rel, name=name, groups=groups))
        elif "route" in doc and "receivers" in doc:
            if alertmanager is not None:
                raise FilesError(f"{rel}: a second Alertmanager config (the first is {am_path})")
            alertmanager, am_path = doc, rel
    return rules, alertmanager, am_path


def load_dashboards(root: Path = ROOT) -> list[Dashboard]:
    out: list[Dashboard] = []
    seen: dict[str, Path] = {}
    for path in sorted(root.glob(DASHBOARDS_GLOB)):
        rel = path.relative_to(root)
        text = path.read_text(encoding="utf-8")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FilesError(f"{rel}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        uid = doc.get("uid") if isinstance(doc, dict) else None
        if not isinstance(uid, str) or not uid:
            raise FilesError(f"{rel}: a dashboard needs a string 'uid'")
        name = k8s_name(f"dashboard-{uid}")
        if name in seen:
            raise FilesError(f"{rel} and {seen[name]} map to the same ConfigMap name {name}")
        seen[name] = rel
        out.append(Dashboard(path=rel, uid=uid, name=name, text=text))
    return out


def load_analysis(path: Path, root: Path = ROOT) -> Analysis:
    """Read and check ``alerts/canary/analysis.yaml`` (format: the delivery docs)."""
    rel = _shown(path, root)
    doc = _yaml(path, root)
    if not isinstance(doc, dict):
        raise FilesError(f"{rel}: must be a mapping with interval, failure_limit, checks")
    interval = doc.get("interval")
    if not isinstance(interval, str) or not re.fullmatch(r"[0-9]+(ms|s|m|h)", interval):
        raise FilesError(f"{rel}: interval must be a duration such as 30s, got {interval!r}")
    limit = doc.get("failure_limit")
    if type(limit) is not int or limit < 0:
        raise FilesError(f"{rel}: failure_limit must be an integer >= 0, got {limit!r}")
    raw = doc.get("checks")
    if not isinstance(raw, list) or not raw:
        raise FilesError(f"{rel}: checks must be a non-empty list")
    checks = []
    names = set()
    for i, item in enumerate(raw):
        where = f"{rel}: checks[{i}]"
        if not isinstance(item, dict):
            raise FilesError(f"{where}: must be a mapping")
        fields = {
            "name",
            "description",
            "query",
            "comparison",
            "threshold",
            "min_samples_query",
            "min_samples",
        }
        missing, extra = fields - item.keys(), item.keys() - fields
        if missing or extra:
            raise FilesError(
                f"{where}: missing {sorted(missing)} / unknown {sorted(extra)}; accepted: {sorted(fields)}"
            )
        name = item["name"]
        if (
            not isinstance(name, str)
            or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
            or name in names
        ):
            raise FilesError(f"{where}: name must be unique kebab-case, got {name!r}")
        names.add(name)
        if item["comparison"] not in ("<=", ">="):
            raise FilesError(f"{where}: comparison must be '<=' or '>=', got {item['comparison']!r}")
        for key in ("threshold", "min_samples"):
            if isinstance(item[key], bool) or not isinstance(item[key], int | float):
                raise FilesError(f"{where}: {key} must be a number, got {item[key]!r}")
        for key in ("query", "min_samples_query"):
            text = item[key]
            if not isinstance(text, str) or not text.strip():
                raise FilesError(f"{where}: {key} must be a PromQL string")
            unknown = set(re.findall(r"\{\{[^}]*\}\}", text)) - set(PLACEHOLDERS)
            if unknown:
                raise FilesError(
                    f"{where}: {key} uses {sorted(unknown)}; accepted: {', '.join(PLACEHOLDERS)}"
                )
        checks.append(
            Check(
                name=name,
                description=str(item["description"]).strip(),
                query=item["query"].strip(),
                comparison=item["comparison"],
                threshold=float(item["threshold"]),
                min_samples_query=item["min_samples_query"].strip(),
                min_samples=float(item["min_samples"]),
            )
        )
    return Analysis(
        interval=interval,
        failure_limit=limit,
        checks=tuple(checks),
        text=path.read_text(encoding="utf-8"),
    )
