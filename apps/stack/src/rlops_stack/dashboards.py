"""Grafana dashboards as code: the panel vocabulary and the build to JSON (the push: rlops_stack.grafana).

The dashboards themselves are the Python files in the repository's ``dashboards/`` folder, one per
dashboard and named after its uid (``rlops_serving.py`` builds ``rlops-serving``), each with a function
``dashboard()`` that returns a grafana-foundation-sdk ``Dashboard`` builder made with the helpers below.
``rlops dashboards build`` imports them, numbers the panels and writes ``dashboards/build/<uid>.json``
(sorted keys, so a rebuild of unchanged sources is byte for byte the same); infra/ loads those files into
the cluster's Grafana and ``rlops report`` runs their queries against a Prometheus.

Every query selects the data source through the ``datasource`` variable and filters with ``=~`` on the
dashboard's label variables, whose "All" value is ``.*``: Grafana and the report fill them in the same way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import table as table_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.variants import Dataquery
from grafana_foundation_sdk.models import common as common_m
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as prom_m
from rlops_contracts.durable import replace_atomic

DASHBOARDS_ENV = "RLOPS_DASHBOARDS_DIR"
BUILD_SUBDIR = "build"
TAG = "rlops"
UID_RE = re.compile(r"^rlops-[a-z0-9-]{1,34}$")
"""Grafana allows 40 characters; the prefix keeps rlops dashboards apart from everything else there."""

DATASOURCE_VARIABLE = "datasource"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${" + DATASOURCE_VARIABLE + "}")
ALL = ".*"
"""What a label variable's "All" stands for in a query (Grafana's allValue; the report uses the same)."""
RATE = "$__rate_interval"
"""Grafana's rate window: at least four scrape intervals, so a rate always has two samples."""
WINDOW = "5m"
"""The window of "now" panels and tables: the same five minutes the canary analysis uses."""

POLICY_FILTER = 'policy=~"$policy", version=~"$version"'
"""The label filter of every serving metric on a dashboard with policy and version variables."""


class DashboardError(ValueError):
    """A dashboard source, a built file or a Grafana answer is not what it must be; the message says how."""


# --- variables -------------------------------------------------------------------------------------------


def datasource_variable() -> db.DatasourceVariable:
    return (
        db.DatasourceVariable(DATASOURCE_VARIABLE)
        .label("Data source")
        .type("prometheus")
        .description("The Prometheus that scrapes TorchServe, the feedback service and the trainer.")
    )


def label_variable(
    name: str, label: str, metric: str, label_name: str, selector: str = ""
) -> db.QueryVariable:
    """A multi-value variable over the values of ``label_name`` on ``metric``; "All" (``.*``) by default."""
    return (
        db.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(
            f"label_values({metric}{{{selector}}}, {label_name})"
            if selector
            else f"label_values({metric}, {label_name})"
        )
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.NATURAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(ALL)
        .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"]))
    )


# --- queries and panels -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Q:
    """One PromQL query of a panel and the legend of its series (``{{label}}`` placeholders)."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Column:
    """One column of a table panel: an instant query whose value per label set fills the column."""

    title: str
    expr: str
    unit: str = "short"


def _ref(i: int) -> str:
    return chr(ord("A") + i)


def _targets(queries: Sequence[Q], instant: bool = False) -> list[cogbuilder.Builder[Dataquery]]:
    if not 1 <= len(queries) <= 26:
        raise DashboardError(f"a panel needs 1 to 26 queries (refIds A-Z), got {len(queries)}")
    out: list[cogbuilder.Builder[Dataquery]] = []
    for i, q in enumerate(queries):
        target = prom_b.Dataquery().expr(q.expr).ref_id(_ref(i)).datasource(DATASOURCE)
        if q.legend:
            target = target.legend_format(q.legend)
        out.append(target.instant().format(prom_m.PromQueryFormat.TABLE) if instant else target.range())
    return out


def timeseries(
    title: str,
    description: str,
    unit: str,
    *queries: Q,
    width: int = 12,
    height: int = 8,
    soft_min: float | None = 0,
    threshold: float | Sequence[float] = (),
) -> ts_b.Panel:
    """A time series panel; each ``threshold`` (an alert's) is drawn as a dashed line, the highest red."""
    panel = (
        ts_b.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(height)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common_m.VisibilityMode.NEVER)
        .legend(
            common_b.VizLegendOptions()
            .show_legend(True)
            .display_mode(common_m.LegendDisplayMode.TABLE)
            .placement(common_m.LegendPlacement.BOTTOM)
            .calcs(["lastNotNull", "max"])
        )
        .tooltip(
            common_b.VizTooltipOptions()
            .mode(common_m.TooltipDisplayMode.MULTI)
            .sort(common_m.SortOrder.DESCENDING)
        )
        .targets(_targets(queries))
    )
    if soft_min is not None:
        panel = panel.axis_soft_min(soft_min)
    levels = sorted([threshold] if isinstance(threshold, int | float) else threshold)
    if levels:
        steps = [dm.Threshold(value=None, color="green")]
        steps += [dm.Threshold(value=v, color="red" if v == levels[-1] else "orange") for v in levels]
        panel = panel.thresholds(
            db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(steps)
        ).thresholds_style(
            common_b.GraphThresholdsStyleConfig().mode(common_m.GraphThresholdsStyleMode.DASHED)
        )
    return panel


def stat(
    title: str, description: str, unit: str, *queries: Q, width: int = 6, height: int = 4
) -> stat_b.Panel:
    """Single numbers (one per series) of the last value of each query."""
    return (
        stat_b.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(height)
        .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .color_mode(common_m.BigValueColorMode.NONE)
        .graph_mode(common_m.BigValueGraphMode.AREA)
        .targets(_targets(queries))
    )


def table(
    title: str, description: str, key: Sequence[str], *columns: Column, width: int = 24, height: int = 7
) -> table_b.Panel:
    """One row per value of the ``key`` labels, one column per instant query (merged, as Grafana shows it)."""
    if not columns:
        raise DashboardError(f"table {title!r} needs at least one column")
    panel = (
        table_b.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(width)
        .height(height)
        .targets(_targets([Q(c.expr) for c in columns], instant=True))
        .with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            dm.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True},
                    "indexByName": {k: i for i, k in enumerate(key)},
                    "renameByName": {},
                },
            )
        )
    )
    for i, column in enumerate(columns):
        panel = panel.override_by_name(
            f"Value #{_ref(i)}",
            [
                dm.DynamicConfigValue(id_val="displayName", value=column.title),
                dm.DynamicConfigValue(id_val="unit", value=column.unit),
            ],
        )
    return panel


def row(title: str) -> db.Row:
    return db.Row(title)


def make_dashboard(
    uid: str, title: str, description: str, *variables: Any, tags: Sequence[str] = ()
) -> db.Dashboard:
    """A dashboard: the datasource variable first, then ``variables``; rlops's time and refresh defaults."""
    if not UID_RE.match(uid):
        raise DashboardError(f"dashboard uid {uid!r} must match {UID_RE.pattern}")
    made = (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG, *tags])
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .timezone("browser")
        .refresh("30s")
        .with_variable(datasource_variable())
    )
    for variable in variables:
        made = made.with_variable(variable)
    return made


# --- PromQL fragments shared by several dashboards -----------------------------------------------------


def by(labels: Iterable[str]) -> str:
    return ", ".join(labels)


def rate_sum(metric: str, labels: Sequence[str], selector: str = POLICY_FILTER, window: str = RATE) -> str:
    return f"sum by ({by(labels)}) (rate({metric}{{{selector}}}[{window}]))"


def zero_filled(numerator: str, denominator: str) -> str:
    """``numerator``, or 0 for every series of ``denominator`` it lacks.

    Counters such as fallbacks appear only after their first event: without this a healthy policy would
    show "no data" where the truth is zero. The zeros exist only where the denominator has data, so a
    stopped server still shows nothing rather than a reassuring 0.
    """
    return f"({numerator} or ({denominator}) * 0)"


def ratio(numerator: str, denominator: str) -> str:
    """``numerator / denominator`` with a missing numerator counted as 0 (see :func:`zero_filled`)."""
    return f"{zero_filled(numerator, denominator)} / {denominator}"


# --- sources, build and check --------------------------------------------------------------------------


def dashboards_dir(explicit: Path | None = None) -> Path:
    """The ``dashboards/`` folder: ``explicit``, ``$RLOPS_DASHBOARDS_DIR``, the nearest one above the
    working directory, or the one of the source tree this package is installed from."""
    if explicit is not None:
        candidates = [Path(explicit)]
    elif os.environ.get(DASHBOARDS_ENV):
        candidates = [Path(os.environ[DASHBOARDS_ENV])]
    else:
        cwd = Path.cwd().resolve()
        candidates = [p / "dashboards" for p in (cwd, *cwd.parents)]
        candidates.append(Path(__file__).resolve().parents[4] / "dashboards")
    for path in candidates:
        if path.is_dir() and any(_source_files(path)):
            return path
    where = ", ".join(str(p) for p in candidates[:3]) + (" …" if len(candidates) > 3 else "")
    raise DashboardError(
        f"no dashboards folder (with dashboard sources *.py) found at {where}; run from the rlops "
        f"repository, or pass --dir / set {DASHBOARDS_ENV}"
    )


def _source_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.py") if not p.name.startswith("_"))


def _import(path: Path) -> ModuleType:
    name = f"rlops_dashboard_source_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DashboardError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except DashboardError as e:
        raise DashboardError(f"{path}: {e}") from e
    except Exception as e:  # a dashboard source is code: say which file broke and how
        raise DashboardError(f"{path}: cannot be imported: {type(e).__name__}: {e}") from e
    finally:
        sys.modules.pop(name, None)
    return module


def number_panels(model: dm.Dashboard) -> dm.Dashboard:
    """Panel ids 1, 2, … in layout order: links to a panel (``viewPanel=<id>``) survive rebuilds."""
    next_id = 1
    for panel in model.panels or []:
        panel.id_val = next_id
        next_id += 1
        for child in getattr(panel, "panels", None) or []:
            child.id_val = next_id
            next_id += 1
    return model


def render(model: dm.Dashboard) -> str:
    """The dashboard as Grafana JSON: sorted keys and a final newline, so equal dashboards are equal bytes."""
    return json.dumps(model, cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


@dataclass
class Built:
    uid: str
    title: str
    source: Path
    json: str


def build_all(source_dir: Path) -> list[Built]:
    """Import every dashboard source of ``source_dir`` and render it; uids and titles must be unique."""
    built: list[Built] = []
    for path in _source_files(source_dir):
        module = _import(path)
        make: Callable[[], Any] | None = getattr(module, "dashboard", None)
        if not callable(make):
            raise DashboardError(
                f"{path}: defines no function dashboard() returning a grafana-foundation-sdk Dashboard"
            )
        try:
            made = make()
        except DashboardError as e:
            raise DashboardError(f"{path}: {e}") from e
        except Exception as e:
            raise DashboardError(f"{path}: dashboard() failed: {type(e).__name__}: {e}") from e
        if not isinstance(made, db.Dashboard):
            raise DashboardError(
                f"{path}: dashboard() returned {type(made).__name__}, not a builders.dashboard.Dashboard"
            )
        model = number_panels(made.build())
        uid, title = model.uid or "", model.title or ""
        if not UID_RE.match(uid):
            raise DashboardError(f"{path}: dashboard uid {uid!r} must match {UID_RE.pattern}")
        if path.stem != uid.replace("-", "_"):
            raise DashboardError(
                f"{path}: defines the dashboard {uid!r}; name the file {uid.replace('-', '_')}.py"
            )
        for other in built:
            if other.uid == uid or other.title == title:
                raise DashboardError(
                    f"{path} and {other.source} both define the dashboard {uid!r} / {title!r}"
                )
        built.append(Built(uid, title, path, render(model)))
    if not built:
        raise DashboardError(f"{source_dir}: no dashboard sources (*.py)")
    return built


@dataclass
class BuildResult:
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)


def build(source_dir: Path, out_dir: Path | None = None) -> BuildResult:
    """Write ``<out_dir>/<uid>.json`` for every source (default ``<source_dir>/build``), each atomically.

    Every source is built before anything is written, so a broken source leaves the old files in place.
    JSON files in ``out_dir`` that no source produces any more are removed: the folder is the build's.
    """
    out = Path(out_dir) if out_dir is not None else Path(source_dir) / BUILD_SUBDIR
    built = build_all(Path(source_dir))
    out.mkdir(parents=True, exist_ok=True)
    result = BuildResult()
    for b in built:
        path = out / f"{b.uid}.json"
        if path.is_file() and path.read_text(encoding="utf-8") == b.json:
            result.unchanged.append(path)
        else:
            replace_atomic(path, b.json)
            result.written.append(path)
    keep = {f"{b.uid}.json" for b in built}
    for path in sorted(out.glob("*.json")):
        if path.name not in keep:
            path.unlink()
            result.removed.append(path)
    return result


def stale(source_dir: Path, out_dir: Path | None = None) -> list[str]:
    """What differs between the built files and a fresh build, in words; empty when they are equal."""
    out = Path(out_dir) if out_dir is not None else Path(source_dir) / BUILD_SUBDIR
    built = build_all(Path(source_dir))
    problems = []
    for b in built:
        path = out / f"{b.uid}.json"
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.read_text(encoding="utf-8") != b.json:
            problems.append(f"{path} differs from a build of {b.source.name}")
    keep = {f"{b.uid}.json" for b in built}
    problems += [f"{p} has no source" for p in sorted(out.glob("*.json")) if p.name not in keep]
    return problems


def load_built(out_dir: Path) -> list[dict[str, Any]]:
    """The built dashboards of ``out_dir`` (sorted by file name), each checked to be a dashboard."""
    files = sorted(Path(out_dir).glob("*.json"))
    if not files:
        raise DashboardError(f"{out_dir}: no built dashboards (*.json); run rlops dashboards build")
    boards = []
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DashboardError(f"{path}: not readable as JSON ({e})") from e
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("uid"), str)
            or not isinstance(data.get("panels"), list)
        ):
            raise DashboardError(f"{path}: not a Grafana dashboard (needs 'uid' and a 'panels' list)")
        boards.append(data)
    return boards
