"""Canary analysis: the checks of ``alerts/canary/analysis.yaml`` and one measurement of each.

The file is shared with infra/, which renders the same checks into Argo Rollouts AnalysisTemplates, so
its format is the contract (see the file's header). A measurement evaluates a check's
``min_samples_query`` and ``query`` against Prometheus and gives one of three verdicts:

- ``inconclusive``: fewer samples than ``min_samples``, or no value (an empty result or NaN). No traffic
  is not success: an inconclusive check never lets a rollout step pass.
- ``pass``: ``value <comparison> threshold`` holds.
- ``fail``: it does not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_ANALYSIS = Path("alerts/canary/analysis.yaml")
PLACEHOLDERS: tuple[str, ...] = ("policy", "candidate", "champion")
COMPARISONS: tuple[str, ...] = ("<=", ">=")

PASS = "pass"
FAIL = "fail"
INCONCLUSIVE = "inconclusive"

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_PLACEHOLDER_RE = re.compile(r"\{\{\s*args\.([A-Za-z0-9_-]+)\s*\}\}")
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_TOP_KEYS = ("interval", "failure_limit", "checks")
_CHECK_KEYS = (
    "name",
    "description",
    "query",
    "comparison",
    "threshold",
    "min_samples_query",
    "min_samples",
)

QueryFn = Callable[[str], list[dict[str, Any]]]
"""An instant query: PromQL in, Prometheus' ``result`` list (``[{metric, value: [time, "text"]}]``) out."""


class AnalysisError(ValueError):
    """The analysis file, or a query's answer, is not what the checks need; the message says where."""


def parse_duration(text: str, where: str) -> float:
    """Seconds in a duration written like Prometheus and Argo do: ``500ms``, ``15s``, ``5m``, ``1h``."""
    match = _DURATION_RE.match(str(text).strip())
    if not match or float(match.group(1)) <= 0:
        raise AnalysisError(f"{where}: {text!r} is not a positive duration such as 500ms, 15s, 5m or 1h")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class Check:
    """One check; queries still hold their ``{{args.*}}`` placeholders."""

    name: str
    description: str
    query: str
    comparison: str
    threshold: float
    min_samples_query: str
    min_samples: float

    def holds(self, value: float) -> bool:
        return value <= self.threshold if self.comparison == "<=" else value >= self.threshold


@dataclass(frozen=True)
class Analysis:
    interval_s: float
    failure_limit: int
    """Failed measurements of one check allowed in a rollout; one more aborts it."""
    checks: tuple[Check, ...]
    source: str


def render(text: str, args: Mapping[str, str]) -> str:
    """``text`` with every ``{{args.NAME}}`` replaced by ``args[NAME]``."""

    def value(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in args:
            raise AnalysisError(f"no value for placeholder {{{{args.{key}}}}}; given: {', '.join(args)}")
        return str(args[key])

    return _PLACEHOLDER_RE.sub(value, text)


def _number(value: Any, where: str, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AnalysisError(f"{where}: {value!r} is not a finite number")
    if minimum is not None and value < minimum:
        raise AnalysisError(f"{where}: {value!r} must be at least {minimum:g}")
    return float(value)


def _query(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise AnalysisError(f"{where}: expected a PromQL expression (a non-empty string), got {value!r}")
    unknown = sorted({m for m in _PLACEHOLDER_RE.findall(value) if m not in PLACEHOLDERS})
    if unknown:
        raise AnalysisError(
            f"{where}: unknown placeholder(s) {', '.join('{{args.' + u + '}}' for u in unknown)}; "
            f"accepted: {', '.join('{{args.' + p + '}}' for p in PLACEHOLDERS)}"
        )
    if "{{" in _PLACEHOLDER_RE.sub("", value):
        raise AnalysisError(f"{where}: a '{{{{' that is not a placeholder {{{{args.NAME}}}}")
    return " ".join(value.split())


def _check(raw: Any, where: str) -> Check:
    if not isinstance(raw, dict):
        raise AnalysisError(f"{where}: expected a mapping with {', '.join(_CHECK_KEYS)}")
    extra = sorted(set(raw) - set(_CHECK_KEYS))
    missing = [k for k in _CHECK_KEYS if k not in raw]
    if extra or missing:
        raise AnalysisError(
            f"{where}: "
            + "; ".join(
                ([f"unknown key(s) {', '.join(map(str, extra))}"] if extra else [])
                + ([f"missing key(s) {', '.join(missing)}"] if missing else [])
            )
            + f"; accepted keys: {', '.join(_CHECK_KEYS)}"
        )
    name = raw["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise AnalysisError(f"{where}.name: {name!r} is not a kebab-case name such as error-ratio")
    where = f"{where} ({name})"
    if raw["comparison"] not in COMPARISONS:
        raise AnalysisError(
            f"{where}.comparison: {raw['comparison']!r}; accepted: {', '.join(repr(c) for c in COMPARISONS)}"
        )
    if not isinstance(raw["description"], str):
        raise AnalysisError(f"{where}.description: expected text, got {raw['description']!r}")
    min_samples = _number(raw["min_samples"], f"{where}.min_samples", minimum=1)
    return Check(
        name=name,
        description=" ".join(raw["description"].split()),
        query=_query(raw["query"], f"{where}.query"),
        comparison=raw["comparison"],
        threshold=_number(raw["threshold"], f"{where}.threshold"),
        min_samples_query=_query(raw["min_samples_query"], f"{where}.min_samples_query"),
        min_samples=min_samples,
    )


def parse(data: Any, source: str) -> Analysis:
    """Validate the parsed YAML of an analysis file."""
    if not isinstance(data, dict):
        raise AnalysisError(f"{source}: expected a mapping with {', '.join(_TOP_KEYS)}")
    extra = sorted(set(map(str, data)) - set(_TOP_KEYS))
    if extra:
        raise AnalysisError(
            f"{source}: unknown key(s) {', '.join(extra)}; accepted keys: {', '.join(_TOP_KEYS)}"
        )
    for key in _TOP_KEYS:
        if key not in data:
            raise AnalysisError(f"{source}: missing key {key!r}")
    interval = parse_duration(data["interval"], f"{source}: interval")
    limit = data["failure_limit"]
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise AnalysisError(f"{source}: failure_limit: {limit!r} is not an integer >= 0")
    raw_checks = data["checks"]
    if not isinstance(raw_checks, list) or not raw_checks:
        raise AnalysisError(f"{source}: checks: expected a non-empty list of checks")
    checks = tuple(_check(c, f"{source}: checks[{i}]") for i, c in enumerate(raw_checks))
    names = [c.name for c in checks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise AnalysisError(f"{source}: check name(s) used twice: {', '.join(twice)}")
    return Analysis(interval_s=interval, failure_limit=limit, checks=checks, source=source)


def load(path: Path = DEFAULT_ANALYSIS) -> Analysis:
    """Read and validate an analysis file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AnalysisError(
            f"{path}: no such analysis file (the repository keeps it at {DEFAULT_ANALYSIS}; run from the "
            "repository root or pass --analysis)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise AnalysisError(f"{path}: cannot be read: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise AnalysisError(f"{path}: not valid YAML: {e}") from None
    return parse(data, str(path))


# --- measuring --------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One check evaluated once, with everything needed to audit the verdict."""

    check: str
    verdict: str
    """pass, fail or inconclusive."""
    value: float | None
    comparison: str
    threshold: float
    samples: float | None
    min_samples: float
    query: str
    min_samples_query: str
    at: float
    """Unix time of the evaluation."""
    detail: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("value", "samples"):
            if isinstance(d[key], float) and not math.isfinite(d[key]):
                d[key] = None
        return d


def scalar(result: list[dict[str, Any]], expr: str) -> float | None:
    """The one value of an instant-query result; None when it is empty. NaN stays NaN."""
    if not result:
        return None
    if len(result) > 1:
        labels = [r.get("metric", {}) for r in result[:3]]
        raise AnalysisError(
            f"{expr!r} returned {len(result)} series ({labels} …); a check's query must aggregate to one"
        )
    try:
        return float(result[0]["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        raise AnalysisError(f"{expr!r}: unexpected sample {result[0]!r}") from None


def measure(check: Check, args: Mapping[str, str], query: QueryFn, at: float) -> Measurement:
    """Evaluate ``check`` once; ``query`` runs PromQL against Prometheus."""
    q = render(check.query, args)
    sq = render(check.min_samples_query, args)
    samples = scalar(query(sq), sq)
    value = scalar(query(q), q)

    def result(verdict: str, detail: str) -> Measurement:
        return Measurement(
            check=check.name,
            verdict=verdict,
            value=value,
            comparison=check.comparison,
            threshold=check.threshold,
            samples=samples,
            min_samples=check.min_samples,
            query=q,
            min_samples_query=sq,
            at=at,
            detail=detail,
        )

    have = 0.0 if samples is None or math.isnan(samples) else samples
    if have < check.min_samples:
        return result(INCONCLUSIVE, f"{have:.0f} of {check.min_samples:.0f} samples needed")
    if value is None or math.isnan(value):
        return result(INCONCLUSIVE, "no value yet")
    ok = check.holds(value)
    relation = check.comparison if ok else {"<=": ">", ">=": "<"}[check.comparison]
    return result(PASS if ok else FAIL, f"{value:.4g} {relation} {check.threshold:g} ({have:.0f} samples)")
