"""Canary analysis: the checks of ``alerts/canary/analysis.yaml`` and one measurement of each.

The file is shared with infra/, which renders the same checks into Argo Rollouts AnalysisTemplates, so
its format is the contract (see the file's header). A measurement evaluates a check's
``min_samples_query`` and ``query`` against Prometheus and gives one of three verdicts:

- ``inconclusive``: fewer samples than ``min_samples``, or no value (an empty result or NaN). No traffic
  is not success: an inconclusive check never lets a rollout step pass.
- ``pass``: ``value <comparison> threshold`` holds.
- ``fail``: it does not.

Box (continuous-action) policies: a check that compares discrete action distributions (its query
aggregates ``by (action)``) does not apply to them. :func:`for_policies` skips it with the reason and
puts in its place an :class:`ActionBinDivergence`: the same distance, per action dimension, between the
candidate's and the champion's actions as serving bins them against each card's ``reference.actions``
(``rlops_action_drift_bin_total{dimension, bin}``). Each card has its own bin edges, so no PromQL query
can compare them: the replacement is measured here, in Python, and :func:`beyond_prometheus` names such
checks. Argo Rollouts renders the file's checks as Prometheus metrics and runs ``rlops rollout check``
(:func:`measure_until_conclusive` over those checks) as a Job metric beside them.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rlops_contracts.metrics import ACTION_DRIFT_BIN

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

    def measure(self, args: Mapping[str, str], query: QueryFn, at: float) -> Measurement:
        return measure(self, args, query, at)


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


# --- Box policies -------------------------------------------------------------------------------------

_BY_ACTION_RE = re.compile(r"\bby\s*\(\s*action\s*\)")
_RANGE_RE = re.compile(r"\[(\d+(?:ms|s|m|h))\]")
DEFAULT_WINDOW = "5m"
"""Range of the action-bin queries when the replaced check has no single one (the file's windows)."""


def compares_discrete_actions(check: Check) -> bool:
    """Whether ``check`` compares distributions over discrete actions (aggregates by the ``action``
    label), which a Box policy's actions are not."""
    return bool(_BY_ACTION_RE.search(check.query) or _BY_ACTION_RE.search(check.min_samples_query))


@dataclass(frozen=True)
class ActionBins:
    """How serving bins one version's actions: per dimension, the card's ``reference.actions`` edges
    inside the action bounds. Bin ``b`` of a dimension holds the actions in ``[bounds[b], bounds[b+1]]``
    (``bounds`` = low, the edges, high), as ``searchsorted(edges, a, side="right")`` numbers them."""

    bounds: tuple[tuple[float, ...], ...]

    @classmethod
    def from_card(cls, card: Mapping[str, Any], where: str) -> ActionBins:
        space = card["action_space"]
        if space.get("type") != "Box":
            raise AnalysisError(f"{where}: not a Box policy (its action space is {space.get('type')})")
        try:
            bins = card["reference"]["actions"]["bins"]
            low, high = space["low"], space["high"]
            bounds = tuple(
                (float(lo), *(min(max(float(e), float(lo)), float(hi)) for e in b["edges"]), float(hi))
                for lo, hi, b in zip(low, high, bins, strict=True)
            )
        except (KeyError, TypeError, ValueError) as e:
            raise AnalysisError(
                f"{where}: the card's reference.actions needs one bins entry (edges) per action "
                f"dimension of action_space.low/high ({type(e).__name__}: {e})"
            ) from None
        return cls(bounds)

    @property
    def dims(self) -> int:
        return len(self.bounds)


def _cells(bounds: np.ndarray, masses: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``masses`` of the bins between ``bounds``, each spread evenly over its bin (a bin of zero width
    is a point), as masses of the cells of ``grid`` (a sorted superset of ``bounds``): each grid point,
    then each open interval between two of them."""
    points = np.zeros(len(grid))
    spans = np.zeros(len(grid) - 1)
    for lo, hi, m in zip(bounds[:-1], bounds[1:], masses, strict=True):
        if m == 0:
            continue
        if hi <= lo:
            points[np.searchsorted(grid, lo)] += m
            continue
        overlap = np.clip(np.minimum(grid[1:], hi) - np.maximum(grid[:-1], lo), 0.0, None)
        spans += m * overlap / (hi - lo)
    return np.concatenate([points, spans])


def binned_tvd(
    bounds_a: Sequence[float] | np.ndarray,
    counts_a: Sequence[float] | np.ndarray,
    bounds_b: Sequence[float] | np.ndarray,
    counts_b: Sequence[float] | np.ndarray,
) -> float:
    """Total variation distance (0 same, 1 disjoint) between two histograms of one action dimension.

    Each histogram's bins may differ (the champion's and the candidate's cards have their own edges):
    both are read as piecewise-uniform densities and compared on the union of their edges, which is
    exact when the edges are the same."""
    ba, bb = np.asarray(bounds_a, dtype=np.float64), np.asarray(bounds_b, dtype=np.float64)
    pa, pb = np.asarray(counts_a, dtype=np.float64), np.asarray(counts_b, dtype=np.float64)
    if len(pa) != len(ba) - 1 or len(pb) != len(bb) - 1:
        raise ValueError("a histogram needs one count per bin (one fewer than its bounds)")
    if not (pa.sum() > 0 and pb.sum() > 0):
        raise ValueError("a histogram needs a positive total count")
    grid = np.union1d(ba, bb)
    diff = _cells(ba, pa / pa.sum(), grid) - _cells(bb, pb / pb.sum(), grid)
    return float(0.5 * np.abs(diff).sum())


@dataclass(frozen=True)
class ActionBinDivergence:
    """For Box policies: the largest, over action dimensions, total variation distance between the
    candidate's and the champion's binned actions over ``window`` (the continuous counterpart of a check
    that compares discrete action distributions, with its comparison, threshold and minimum samples).

    Samples are the fewest decisions either version made in the window (each decision counts once per
    dimension), taken from the same query as the value."""

    name: str
    description: str
    comparison: str
    threshold: float
    min_samples: float
    candidate_bins: ActionBins
    champion_bins: ActionBins
    window: str = DEFAULT_WINDOW

    def holds(self, value: float) -> bool:
        return value <= self.threshold if self.comparison == "<=" else value >= self.threshold

    def query(self, args: Mapping[str, str]) -> str:
        versions = f"{args['candidate']}|{args['champion']}"
        return (
            f"sum by (version, dimension, bin) (increase({ACTION_DRIFT_BIN}"
            f'{{policy="{args["policy"]}",version=~"{versions}"}}[{self.window}]))'
        )

    def _counts(
        self, result: list[dict[str, Any]], expr: str, args: Mapping[str, str]
    ) -> dict[str, list[np.ndarray]]:
        """Per version (candidate and champion), the count in each bin of each dimension; a bin that no
        series names has 0."""
        roles = {args["candidate"]: self.candidate_bins, args["champion"]: self.champion_bins}
        counts = {v: [np.zeros(len(b) - 1) for b in bins.bounds] for v, bins in roles.items()}
        for series in result:
            labels = series.get("metric", {})
            try:
                version, dim, b = labels["version"], int(labels["dimension"]), int(labels["bin"])
                value = float(series["value"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                raise AnalysisError(f"{expr!r}: unexpected sample {series!r}") from None
            if version not in counts:
                continue
            if not (0 <= dim < len(counts[version]) and 0 <= b < len(counts[version][dim])):
                raise AnalysisError(
                    f"{expr!r}: version {version} has no dimension {dim} bin {b} in its card's "
                    f"reference.actions ({len(counts[version])} dimensions)"
                )
            if math.isfinite(value):
                counts[version][dim][b] += value
        return counts

    def measure(self, args: Mapping[str, str], query: QueryFn, at: float) -> Measurement:
        q = " ".join(self.query(args).split())
        counts = self._counts(query(q), q, args)
        cand, champ = counts[args["candidate"]], counts[args["champion"]]
        samples = float(min(c.sum() for c in [*cand, *champ]))
        value: float | None = None
        worst = -1
        if samples > 0:
            distances = [
                binned_tvd(cb, cc, hb, hc)
                for cb, cc, hb, hc in zip(
                    self.candidate_bins.bounds, cand, self.champion_bins.bounds, champ, strict=True
                )
            ]
            worst = int(np.argmax(distances))
            value = distances[worst]

        def result(verdict: str, detail: str) -> Measurement:
            return Measurement(
                check=self.name,
                verdict=verdict,
                value=value,
                comparison=self.comparison,
                threshold=self.threshold,
                samples=samples,
                min_samples=self.min_samples,
                query=q,
                min_samples_query=q,
                at=at,
                detail=detail,
            )

        if samples < self.min_samples:
            return result(INCONCLUSIVE, f"{samples:.0f} of {self.min_samples:.0f} samples needed")
        assert value is not None  # samples > 0 gave a distance
        ok = self.holds(value)
        relation = self.comparison if ok else {"<=": ">", ">=": "<"}[self.comparison]
        return result(
            PASS if ok else FAIL,
            f"{value:.4g} {relation} {self.threshold:g} in action dimension {worst} ({samples:.0f} samples)",
        )


Measurable = Check | ActionBinDivergence
"""Anything a rollout measures: ``name`` and ``measure(args, query, at)``."""


def _window(check: Check) -> str:
    ranges = set(_RANGE_RE.findall(check.query))
    return ranges.pop() if len(ranges) == 1 else DEFAULT_WINDOW


def for_policies(
    analysis: Analysis, candidate_card: Mapping[str, Any], champion_card: Mapping[str, Any]
) -> tuple[list[Measurable], dict[str, str]]:
    """The checks to measure for a candidate and champion with these model cards, and the checks
    skipped with the reason (for Box policies: those comparing discrete actions, each replaced by an
    :class:`ActionBinDivergence` named ``<check>-per-dimension``)."""
    kinds = {candidate_card["action_space"]["type"], champion_card["action_space"]["type"]}
    if kinds == {"Discrete"}:
        return list(analysis.checks), {}
    if len(kinds) > 1:
        raise AnalysisError(
            f"the candidate acts in a {candidate_card['action_space']['type']} action space and the "
            f"champion in a {champion_card['action_space']['type']} one; a canary compares like with like"
        )
    candidate_bins = ActionBins.from_card(candidate_card, "the candidate's model card")
    champion_bins = ActionBins.from_card(champion_card, "the champion's model card")
    if candidate_bins.dims != champion_bins.dims:
        raise AnalysisError(
            f"the candidate's actions have {candidate_bins.dims} dimensions and the champion's "
            f"{champion_bins.dims}; a canary compares like with like"
        )
    checks: list[Measurable] = []
    skipped: dict[str, str] = {}
    for c in analysis.checks:
        if not compares_discrete_actions(c):
            checks.append(c)
            continue
        replacement = f"{c.name}-per-dimension"
        skipped[c.name] = (
            "compares discrete action distributions (by the action label); the policies act in a Box "
            f"space, so {replacement} compares their binned actions per dimension instead"
        )
        checks.append(
            ActionBinDivergence(
                name=replacement,
                description=f"Per action dimension, the largest distance of: {c.description}",
                comparison=c.comparison,
                threshold=c.threshold,
                min_samples=c.min_samples,
                candidate_bins=candidate_bins,
                champion_bins=champion_bins,
                window=_window(c),
            )
        )
    return checks, skipped


def beyond_prometheus(analysis: Analysis, checks: Sequence[Measurable]) -> list[Measurable]:
    """Those of ``checks`` (from :func:`for_policies`) that are not the analysis file's: the per-dimension
    replacements, which Python measures from two model cards and which Argo's Prometheus metrics (the
    file's checks, rendered) therefore cannot. Empty for Discrete policies."""
    in_file = {c.name for c in analysis.checks}
    return [c for c in checks if c.name not in in_file]


# --- measuring until conclusive -----------------------------------------------------------------------


@dataclass
class Watch:
    """Checks measured until they were conclusive or the time ran out."""

    verdict: str
    """pass (every check passed), fail (one failed) or inconclusive (time ran out before either)."""
    measurements: list[Measurement]
    """The last round: one measurement per check."""
    rounds: int
    elapsed_s: float
    """Seconds from the first measurement to the last."""

    def shortfall(self) -> str:
        """The checks that were not conclusive in the last round, with their samples."""

        def samples(m: Measurement) -> str:
            have = 0.0 if m.samples is None or math.isnan(m.samples) else m.samples
            return f"{m.check}: samples {have:.0f} of {m.min_samples:.0f}" + (
                "" if have < m.min_samples else ", no value yet"
            )

        return "; ".join(samples(m) for m in self.measurements if m.verdict == INCONCLUSIVE)


def measure_until_conclusive(
    checks: Sequence[Measurable],
    args: Mapping[str, str],
    query: QueryFn,
    *,
    interval_s: float,
    wait_s: float,
    report: Callable[[list[Measurement]], None] = lambda round_: None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> Watch:
    """Measure every check now and then every ``interval_s`` until one fails (fail), all pass in one
    round (pass), or the next round would come later than ``wait_s`` after the first (inconclusive: no
    traffic is not success). Errors of ``query`` propagate: the caller decides whether to retry."""
    start = clock()
    rounds = 0
    while True:
        at = clock()
        round_ = [c.measure(args, query, at) for c in checks]
        rounds += 1
        report(round_)
        elapsed = clock() - start
        if any(m.verdict == FAIL for m in round_):
            return Watch(FAIL, round_, rounds, elapsed)
        if all(m.verdict == PASS for m in round_):
            return Watch(PASS, round_, rounds, elapsed)
        if elapsed + interval_s > wait_s:
            return Watch(INCONCLUSIVE, round_, rounds, elapsed)
        sleep(interval_s)
