"""SLOs: how much of the error budget is left, and how fast is it burning?

Two objectives, both defined in alerts/rules/slo.yaml, whose recording rules these panels read:

- availability: 99.9% of the requests TorchServe answers are not server errors (budget 0.1%);
- latency: 99% of the requests to a policy are answered by the handler within 100 ms (budget 1%).

A burn rate is the error ratio divided by the budget: 1 spends the budget in exactly 30 days. The
alerts page at 14.4x (1 h and 5 min windows) and 6x (6 h and 30 min), and open a ticket at 1x (3 days
and 6 h), each only with at least 10 bad requests in the long window.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard
from rlops_contracts import metrics as m
from rlops_stack.dashboards import (
    Q,
    label_variable,
    make_dashboard,
    rate_sum,
    row,
    stat,
    timeseries,
)

AVAILABILITY_BUDGET = 0.001
LATENCY_BUDGET = 0.01
LATENCY_LIMIT = "0.1"
"""The latency objective's bucket boundary (le label of rlops_inference_latency_seconds), seconds."""
BURN_RATES = (1.0, 6.0, 14.4)
WINDOWS = ("5m", "30m", "1h", "6h", "3d")
DAYS_IN_WINDOW = {"1h": 1 / 24, "6h": 0.25, "3d": 3.0}
BUDGET_DAYS = 30.0

TS = f'job="{m.JOB_TORCHSERVE}"'
PV = ("policy", "version")
POLICY = 'policy=~"$policy"'
WITHIN_LIMIT = f'{POLICY}, le="{LATENCY_LIMIT}"'


def errors(window: str) -> str:
    return f"job:rlops_serving_errors:ratio_rate{window}{{{TS}}}"


def misses(window: str) -> str:
    return f"policy:rlops_latency_slo_misses:ratio_rate{window}{{{POLICY}}}"


def zero_when_up(expr: str, by: str) -> str:
    """``expr`` or 0 while TorchServe is scraped: bad-event counters appear only after the first one."""
    return f"({expr} or 0 * sum by ({by}) (up{{{TS}}}))"


def dashboard() -> Dashboard:
    return (
        make_dashboard(
            "rlops-slo",
            "rlops / SLOs",
            "Availability (99.9% of requests without a server error) and latency (99% of requests within "
            "100 ms) of serving: error budgets and burn rates, as the multi-window burn-rate alerts see "
            "them.",
            label_variable("policy", "Policy", m.ACTIONS, "policy"),
            tags=["slo"],
        )
        .with_row(row("Availability: 99.9% of requests answered without a server error"))
        .with_panel(
            stat(
                "Availability",
                "Share of the requests TorchServe answered that were not 5xx, over each window.",
                "percentunit",
                *(Q(f"1 - {errors(w)}", w) for w in ("1h", "6h", "3d")),
                width=8,
            )
        )
        .with_panel(
            stat(
                "Availability budget spent in the last 3 days",
                "Share of the 30-day error budget (0.1% of requests) that the last 3 days used; 10% is the "
                "pace that spends it exactly in 30 days.",
                "percentunit",
                Q(
                    f"{errors('3d')} / {AVAILABILITY_BUDGET} * {DAYS_IN_WINDOW['3d'] / BUDGET_DAYS:g}",
                    "spent",
                ),
                width=8,
            )
        )
        .with_panel(
            stat(
                "Server errors in the alert windows",
                "5xx answers counted in each long window; an availability alert needs at least 10.",
                "short",
                *(
                    Q(zero_when_up(f"job:rlops_serving_errors:increase{w}{{{TS}}}", "job"), w)
                    for w in ("1h", "6h", "3d")
                ),
                width=8,
            )
        )
        .with_panel(
            timeseries(
                "Availability burn rate",
                "Server error ratio over each window divided by the budget (0.1%). The dashed lines are the "
                "alerts' burn rates: 1x (ticket), 6x and 14.4x (page).",
                "short",
                *(Q(f"{errors(w)} / {AVAILABILITY_BUDGET}", w) for w in WINDOWS),
                width=24,
                threshold=BURN_RATES,
            )
        )
        .with_row(row("Latency: 99% of requests answered within 100 ms"))
        .with_panel(
            stat(
                "Requests within 100 ms",
                "Share of the requests to each policy that the handler answered within 100 ms.",
                "percentunit",
                *(Q(f"1 - {misses(w)}", "{{policy}} " + w) for w in ("1h", "6h", "3d")),
                width=8,
            )
        )
        .with_panel(
            stat(
                "Latency budget spent in the last 3 days",
                "Share of the 30-day latency budget (1% of requests slower than 100 ms) the last 3 days "
                "used; 10% is the pace that spends it exactly in 30 days.",
                "percentunit",
                Q(
                    f"{misses('3d')} / {LATENCY_BUDGET} * {DAYS_IN_WINDOW['3d'] / BUDGET_DAYS:g}",
                    "{{policy}}",
                ),
                width=8,
            )
        )
        .with_panel(
            stat(
                "Slow requests in the alert windows",
                "Requests slower than 100 ms counted in each long window; a latency alert needs at least 10.",
                "short",
                *(
                    Q(f"policy:rlops_latency_slo_misses:increase{w}{{{POLICY}}}", "{{policy}} " + w)
                    for w in ("1h", "6h", "3d")
                ),
                width=8,
            )
        )
        .with_panel(
            timeseries(
                "Latency burn rate",
                "Share of requests slower than 100 ms over each window divided by the budget (1%), per "
                "policy. The dashed lines are the alerts' burn rates: 1x, 6x and 14.4x.",
                "short",
                *(Q(f"{misses(w)} / {LATENCY_BUDGET}", "{{policy}} " + w) for w in WINDOWS),
                threshold=BURN_RATES,
            )
        )
        .with_panel(
            timeseries(
                "Requests slower than 100 ms, per version",
                "Share of each version's requests the handler answered in more than 100 ms: a candidate that "
                "spends the budget shows here before it moves the policy's burn rate.",
                "percentunit",
                Q(
                    f"1 - {rate_sum(f'{m.INFERENCE_LATENCY}_bucket', PV, WITHIN_LIMIT)}"
                    f" / {rate_sum(f'{m.INFERENCE_LATENCY}_count', PV, POLICY)}",
                    "{{policy}} v{{version}}",
                ),
            )
        )
    )
