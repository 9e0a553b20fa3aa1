"""Rendering of an evaluation report: the JSON file, a table for the terminal, and a plot.

The report is plain JSON data (what ``rlops evaluate`` writes to ``report.json``)::

    {"schema_version": 1, "created_at", "data": {...}, "settings": {...},
     "behavior": Estimate, "champion": {"name", "version", "ref"} | null,
     "policies": [{"ref", "path", "label", "name", "version", "role", "algorithm", "selection",
                   "estimates": {estimator: Estimate}, "rollout": {...} | null,
                   "gate": GateDecision | null, "timings": {...}}],
     "timings": {...}}

Each policy entry is self-contained, so ``rlops registry publish --report`` can copy its estimates
into the model card's ``evaluation`` and its ``gate`` into the card's ``gate``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table
from rlops_contracts.durable import replace_atomic

from rlops_trainer.card import jsonable

REPORT_SCHEMA_VERSION = 1
REPORT_FILE = "report.json"
PLOT_FILE = "report.png"

_TITLES = {"pdis": "PDIS", "wpdis": "WPDIS", "fqe": "FQE", "dr": "DR", "wdr": "WDR"}


def write_json(report: dict[str, Any], path: Path) -> Path:
    """Write ``report`` as strict JSON (non-finite numbers become null), atomically."""
    return replace_atomic(path, json.dumps(jsonable(report, "report"), indent=2, allow_nan=False) + "\n")


def _num(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


def _cell(est: dict[str, Any] | None) -> str:
    if not est:
        return "-"
    return f"{_num(est.get('value'))} [{_num(est.get('lower'))}, {_num(est.get('upper'))}]"


def _weights_cell(estimates: dict[str, dict[str, Any]]) -> str:
    # Every importance-weighted estimator sees the same weights: one ESS per policy.
    for e in estimates.values():
        if e.get("ess") is not None:
            text = f"{_num(e['ess'])} ({100 * e['ess_fraction']:.1f} %)"
            return f"[yellow]{text} collapsed[/yellow]" if e.get("ess_collapsed") else text
    return "-"


def _gate_cell(gate: dict[str, Any] | None, role: str) -> str:
    if gate is None:
        return "incumbent" if role == "champion" else "-"
    if gate.get("refused"):
        return "[yellow]no decision[/yellow]"
    return "[green]promote[/green]" if gate["promote"] else "[red]not promoted[/red]"


def table(report: dict[str, Any]) -> Table:
    """Policies by rows; each estimator's value and interval, the weights' ESS, the rollout truth and
    the gate's verdict by columns."""
    estimators = list(report["settings"]["estimators"])
    settings = report["settings"]
    t = Table(
        title=(
            f"Off-policy evaluation (gamma {settings['gamma']}, "
            f"{100 * settings['confidence']:.0f} % intervals)"
        ),
        title_justify="left",
        caption=(
            "truth: mean discounted return of rollouts in the environment; for the behaviour policy, "
            "of the logged episodes"
        ),
        caption_justify="left",
    )
    t.add_column("policy", no_wrap=True)
    for name in estimators:
        t.add_column(_TITLES.get(name, name), justify="right")
    t.add_column("ESS", justify="right")
    t.add_column("truth", justify="right")
    t.add_column("gate")
    behavior = report["behavior"]
    t.add_row(
        "behaviour (logged)",
        *["-"] * len(estimators),
        "-",
        _cell(behavior),
        "baseline" if not report.get("champion") else "-",
    )
    for p in report["policies"]:
        rollout = p.get("rollout")
        truth = _cell(rollout["discounted_return"]) if rollout else "-"
        label = escape(p["label"]) + (" (champion)" if p["role"] == "champion" else "")
        t.add_row(
            label,
            *[_cell(p["estimates"].get(name)) for name in estimators],
            _weights_cell(p["estimates"]),
            truth,
            _gate_cell(p.get("gate"), p["role"]),
        )
    return t


def gate_lines(report: dict[str, Any]) -> list[str]:
    """One line per gated policy: its label and the gate's reason."""
    return [f"{p['label']}: {p['gate']['reason']}" for p in report["policies"] if p.get("gate")]


def warning_lines(report: dict[str, Any]) -> list[str]:
    """Every estimator warning, prefixed with the policy and estimator it concerns."""
    out = []
    for p in report["policies"]:
        for name, est in p["estimates"].items():
            out += [f"{p['label']} {_TITLES.get(name, name)}: {w}" for w in est.get("warnings") or []]
    return out


def plot(report: dict[str, Any], path: Path) -> Path:
    """Dot-and-whisker plot: every estimator's value and interval per policy, the truth as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    estimators = list(report["settings"]["estimators"])
    groups: list[tuple[str, dict[str, dict[str, Any]], dict[str, Any] | None]] = [
        ("behaviour\n(logged)", {}, report["behavior"])
    ]
    for p in report["policies"]:
        truth = p["rollout"]["discounted_return"] if p.get("rollout") else None
        groups.append(
            (p["label"] + ("\n(champion)" if p["role"] == "champion" else ""), p["estimates"], truth)
        )

    width = 0.8 / max(len(estimators), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.5), dpi=120)
    colors = plt.get_cmap("tab10")
    for k, name in enumerate(estimators):
        xs, ys, lo, hi = [], [], [], []
        for i, (_, estimates, _) in enumerate(groups):
            e = estimates.get(name)
            if e and e.get("value") is not None:
                v = e["value"]
                xs.append(i - 0.4 + width * (k + 0.5))
                ys.append(v)
                lo.append(e["lower"] if e.get("lower") is not None else v)
                hi.append(e["upper"] if e.get("upper") is not None else v)
        if xs:
            # Interval and point are drawn apart: a bootstrap interval need not contain the point
            # estimate (a skewed or multi-modal resampling distribution), and the picture must not hide it.
            ax.vlines(xs, lo, hi, color=colors(k), linewidth=1.2)
            ax.plot(xs, ys, "o", ms=5, color=colors(k), label=_TITLES.get(name, name))
    truth_label = "truth (rollouts; behaviour: logged)"
    for i, (_, _, truth) in enumerate(groups):
        if truth and truth.get("value") is not None:
            ax.hlines(truth["value"], i - 0.45, i + 0.45, colors="black", linewidth=2, label=truth_label)
            if truth.get("lower") is not None and truth.get("upper") is not None:
                ax.fill_between(
                    [i - 0.45, i + 0.45], truth["lower"], truth["upper"], color="black", alpha=0.12
                )
            truth_label = "_nolegend_"
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    ax.set_ylabel(f"discounted return (gamma {report['settings']['gamma']})")
    ax.set_title(f"Off-policy estimates with {100 * report['settings']['confidence']:.0f} % intervals")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
