"""Serving: is the policy server answering, how fast, and what is it answering with?

The on-call view of TorchServe and the rlops handler, per policy and version: request and rejection
rates, handler latency p50/p99 next to the 100 ms alert threshold, TorchServe's queue time, the action
mix, fallbacks, workers and scrape targets.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard
from rlops_contracts import metrics as m
from rlops_stack.dashboards import (
    POLICY_FILTER,
    RATE,
    Q,
    label_variable,
    make_dashboard,
    rate_sum,
    ratio,
    row,
    stat,
    timeseries,
    zero_filled,
)

PV = ("policy", "version")
TS_FILTER = 'model_name=~"$policy", model_version=~"$version|default"'
"""TorchServe's own labels; requests to the default version (the champion) are labelled ``default``."""
TS = ("model_name", "model_version")
JOBS = "|".join((m.JOB_TORCHSERVE, m.JOB_FEEDBACK, m.JOB_TRAINER, m.JOB_ACTIONS))

answered = rate_sum(f"{m.INFERENCE_LATENCY}_count", PV)
rejected = rate_sum(m.REJECTED_REQUESTS, PV)
fallbacks = rate_sum(m.FALLBACK, PV)
actions = rate_sum(m.ACTIONS, PV)


# Recording rules of alerts/rules/serving.yaml: panels that show what an alert evaluates use them.
P99 = "policy_version:rlops_inference_latency_seconds:p99_rate5m"
P50 = "policy_version:rlops_inference_latency_seconds:p50_rate5m"
SERVER_ERRORS = "job:ts_requests_5xx:ratio_rate5m"
QUEUE = "policy_model_version:ts_queue_latency_seconds:mean_rate5m"


def ts_mean(counter: str) -> str:
    """Mean per request of a TorchServe time counter (microseconds summed), in seconds."""
    requests = f"sum by ({', '.join(TS)}) (rate({m.TS_INFERENCE_REQUESTS}{{{TS_FILTER}}}[{RATE}]))"
    return f"sum by ({', '.join(TS)}) (rate({counter}{{{TS_FILTER}}}[{RATE}])) / {requests} / 1e6"


def dashboard() -> Dashboard:
    return (
        make_dashboard(
            "rlops-serving",
            "rlops / Serving",
            "TorchServe and the rlops handler per policy version: traffic, errors, latency, actions, "
            "workers.",
            label_variable("policy", "Policy", m.ACTIONS, "policy"),
            label_variable("version", "Version", m.ACTIONS, "version", 'policy=~"$policy"'),
            tags=["serving"],
        )
        .with_row(row("Now"))
        .with_panel(
            stat(
                "Requests",
                "Requests the handler answered per second, all selected versions.",
                "reqps",
                Q(f"sum({answered})", "requests/s"),
            )
        )
        .with_panel(
            stat(
                "Latency p99 (worst version)",
                "The highest 5-minute p99 handler latency among the selected versions (alert above 100 ms).",
                "s",
                Q(f"max({P99}{{{POLICY_FILTER}}})", "p99"),
            )
        )
        .with_panel(
            stat(
                "Rejected",
                "Share of requests answered 4xx (malformed or invalid input).",
                "percentunit",
                Q(ratio(f"sum({rejected})", f"sum({answered})"), "rejected"),
            )
        )
        .with_panel(
            stat(
                "Ready workers",
                "TorchServe workers in state READY, all selected versions (from the actions service).",
                "short",
                Q(f"sum({m.SERVING_READY_WORKERS}{{{POLICY_FILTER}}})", "ready"),
            )
        )
        .with_row(row("Traffic and errors"))
        .with_panel(
            timeseries(
                "Requests per version",
                "Requests that reached the rlops handler per second (every request, answered or rejected).",
                "reqps",
                Q(answered, "{{policy}} v{{version}}"),
            )
        )
        .with_panel(
            timeseries(
                "Rejected requests by reason",
                "Requests answered 4xx per second by reason (the reason label of "
                "rlops_rejected_requests_total); 'all reasons' is 0 while traffic flows without rejections.",
                "reqps",
                Q(rate_sum(m.REJECTED_REQUESTS, (*PV, "reason")), "{{policy}} v{{version}} {{reason}}"),
                Q(zero_filled(rejected, answered), "{{policy}} v{{version}} all reasons"),
            )
        )
        .with_panel(
            timeseries(
                "Error ratio",
                "Rejected requests and fallback decisions (the policy's output could not be used) as a share "
                "of the version's requests, and TorchServe's 5xx answers as a share of all it answered over "
                "5 minutes (the server error alert fires above 1%, dashed).",
                "percentunit",
                Q(ratio(rejected, answered), "{{policy}} v{{version}} rejected"),
                Q(ratio(fallbacks, answered), "{{policy}} v{{version}} fallback"),
                Q(f'{SERVER_ERRORS}{{job="{m.JOB_TORCHSERVE}"}}', "5xx, whole server"),
                threshold=0.01,
            )
        )
        .with_panel(
            timeseries(
                "HTTP responses (whole server)",
                "TorchServe's response counters by status class; they carry no model label.",
                "reqps",
                Q(f"sum(rate({m.TS_REQUESTS_2XX}[{RATE}]))", "2xx"),
                Q(
                    zero_filled(
                        f"sum(rate({m.TS_REQUESTS_4XX}[{RATE}]))", f"sum(rate({m.TS_REQUESTS_2XX}[{RATE}]))"
                    ),
                    "4xx",
                ),
                Q(
                    zero_filled(
                        f"sum(rate({m.TS_REQUESTS_5XX}[{RATE}]))", f"sum(rate({m.TS_REQUESTS_2XX}[{RATE}]))"
                    ),
                    "5xx",
                ),
            )
        )
        .with_row(row("Latency"))
        .with_panel(
            timeseries(
                "Handler latency p50 / p99",
                "Time from the start of the server batch to its answers, per request (histogram "
                "rlops_inference_latency_seconds) over 5 minutes, as the latency alert sees it. The dashed "
                "line is its threshold, 100 ms: above it for a minute, serving is scaled up.",
                "s",
                Q(f"{P99}{{{POLICY_FILTER}}}", "{{policy}} v{{version}} p99"),
                Q(f"{P50}{{{POLICY_FILTER}}}", "{{policy}} v{{version}} p50"),
                threshold=0.1,
            )
        )
        .with_panel(
            timeseries(
                "TorchServe queue and inference time (mean)",
                "Mean time a request waited in TorchServe's queue over 5 minutes (the queue alert fires "
                "above 50 ms, dashed), and its mean time in TorchServe overall. TorchServe labels the "
                "default version (the champion) 'default'.",
                "s",
                Q(f"{QUEUE}{{{TS_FILTER}}}", "{{model_name}} {{model_version}} queue"),
                Q(ts_mean(m.TS_INFERENCE_LATENCY), "{{model_name}} {{model_version}} in TorchServe"),
                threshold=0.05,
            )
        )
        .with_row(row("What the policy answers"))
        .with_panel(
            timeseries(
                "Action distribution",
                "Share of each action among the decisions of each version.",
                "percentunit",
                Q(
                    f"{rate_sum(m.ACTIONS, (*PV, 'action'))} / ignoring (action) group_left {actions}",
                    "{{policy}} v{{version}} action {{action}}",
                ),
                soft_min=None,
            )
        )
        .with_panel(
            timeseries(
                "Fallback decisions",
                "Decisions answered with the fallback action per second, by reason (non-finite model output, "
                "inference error); 'all' is 0 while the policy answers everything itself.",
                "reqps",
                Q(rate_sum(m.FALLBACK, (*PV, "reason")), "{{policy}} v{{version}} {{reason}}"),
                Q(zero_filled(fallbacks, actions), "{{policy}} v{{version}} all"),
            )
        )
        .with_row(row("Capacity and plumbing"))
        .with_panel(
            timeseries(
                "Workers",
                "TorchServe workers per version, all and READY (the actions service reads TorchServe's "
                "management API).",
                "short",
                Q(
                    f"sum by (policy, version) ({m.SERVING_WORKERS}{{{POLICY_FILTER}}})",
                    "{{policy}} v{{version}} workers",
                ),
                Q(
                    f"sum by (policy, version) ({m.SERVING_READY_WORKERS}{{{POLICY_FILTER}}})",
                    "{{policy}} v{{version}} ready",
                ),
                width=8,
            )
        )
        .with_panel(
            timeseries(
                "Decision log",
                "Decision records written per second, and dropped because the log queue was full.",
                "ops",
                Q(rate_sum(m.DECISIONS_LOGGED, PV), "{{policy}} v{{version}} written"),
                Q(
                    zero_filled(rate_sum(m.DECISION_LOG_DROPPED, PV), rate_sum(m.DECISIONS_LOGGED, PV)),
                    "{{policy}} v{{version}} dropped",
                ),
                width=8,
            )
        )
        .with_panel(
            timeseries(
                "Scrape targets up",
                "1 while Prometheus scrapes the target, 0 when it cannot.",
                "short",
                Q(f'up{{job=~"{JOBS}"}}', "{{job}} {{instance}}"),
                width=8,
            )
        )
    )
