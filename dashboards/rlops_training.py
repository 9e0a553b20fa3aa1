"""Training: is the run learning, and is it still running?

Every trainer (offline BC/CQL/IQL and online PPO/APPO) exports the same metric names with the labels
``run``, ``algorithm`` and ``policy``, so one dashboard serves them all; a series an algorithm has no
use for (exploration rate offline, episode return without an environment) simply stays empty for it.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard
from rlops_contracts import metrics as m
from rlops_stack.dashboards import (
    RATE,
    Q,
    label_variable,
    make_dashboard,
    row,
    stat,
    timeseries,
    zero_filled,
)

RUN_FILTER = 'policy=~"$policy", run=~"$run"'
RUN = "{{run}} ({{algorithm}})"
KEYS = "policy, run, algorithm"


def gauge(metric: str, extra: str = "") -> str:
    return f"max by ({KEYS}{extra}) ({metric}{{{RUN_FILTER}}})"


def per_second(metric: str) -> str:
    return f"sum by ({KEYS}) (rate({metric}{{{RUN_FILTER}}}[{RATE}]))"


def dashboard() -> Dashboard:
    return (
        make_dashboard(
            "rlops-training",
            "rlops / Training",
            "Training runs of every algorithm: returns, losses, exploration, entropy, Q-values, gradients, "
            "throughput and progress.",
            label_variable("policy", "Policy", m.TRAIN_STEPS, "policy"),
            label_variable("run", "Run", m.TRAIN_STEPS, "run", 'policy=~"$policy"'),
            tags=["training"],
        )
        .with_row(row("Progress"))
        .with_panel(
            stat(
                "Since last progress",
                "Time since each run last completed a training step (the stalled-training alert watches it).",
                "s",
                Q(f"time() - {gauge(m.TRAIN_LAST_PROGRESS)}", RUN),
                width=8,
            )
        )
        .with_panel(
            stat(
                "Updates",
                "Gradient steps (offline) or learner updates (online) so far.",
                "short",
                Q(f"sum by ({KEYS}) ({m.TRAIN_STEPS}{{{RUN_FILTER}}})", RUN),
                width=8,
            )
        )
        .with_panel(
            stat(
                "Non-finite events",
                "Non-finite losses or gradients seen over the last hour (a diverging run).",
                "short",
                Q(
                    zero_filled(
                        f"sum by ({KEYS}) (increase({m.TRAIN_NONFINITE}{{{RUN_FILTER}}}[1h]))",
                        f"sum by ({KEYS}) ({m.TRAIN_STEPS}{{{RUN_FILTER}}})",
                    ),
                    RUN,
                ),
                width=8,
            )
        )
        .with_row(row("Returns"))
        .with_panel(
            timeseries(
                "Episode return",
                "Return of training episodes, the latest evaluation return, and the baseline the evaluation "
                "regression alert compares it with.",
                "none",
                Q(gauge(m.TRAIN_EPISODE_RETURN), RUN + " episode"),
                Q(gauge(m.TRAIN_EVAL_RETURN), RUN + " evaluation"),
                Q(gauge(m.TRAIN_BASELINE_RETURN), RUN + " baseline"),
                soft_min=None,
            )
        )
        .with_panel(
            timeseries(
                "Episode length",
                "Steps per training episode.",
                "short",
                Q(gauge(m.TRAIN_EPISODE_LENGTH), RUN),
            )
        )
        .with_row(row("Optimisation"))
        .with_panel(
            timeseries(
                "Loss",
                "Training losses by component (total, policy, value, td, cql_penalty, ...).",
                "none",
                Q(gauge(m.TRAIN_LOSS, ", loss"), RUN + " {{loss}}"),
                soft_min=None,
            )
        )
        .with_panel(
            timeseries(
                "Gradient norm",
                "Norm of the gradient before clipping; a climb precedes divergence.",
                "none",
                Q(gauge(m.TRAIN_GRAD_NORM), RUN),
            )
        )
        .with_panel(
            timeseries(
                "Q estimate",
                "Mean Q-value estimate of the learner (value-based and actor-critic algorithms).",
                "none",
                Q(gauge(m.TRAIN_Q_ESTIMATE), RUN),
                width=8,
                soft_min=None,
            )
        )
        .with_panel(
            timeseries(
                "Policy entropy",
                "Mean entropy (nats) of the learner's action distributions.",
                "none",
                Q(gauge(m.TRAIN_POLICY_ENTROPY), RUN),
                width=8,
            )
        )
        .with_panel(
            timeseries(
                "Exploration rate",
                "Epsilon or temperature the collecting policy explores with (online training).",
                "none",
                Q(gauge(m.TRAIN_EXPLORATION_RATE), RUN),
                width=8,
            )
        )
        .with_row(row("Throughput"))
        .with_panel(
            timeseries(
                "Environment steps per second",
                "Environment steps collected per second, as the trainer measures it and from its counter.",
                "short",
                Q(gauge(m.TRAIN_ENV_STEPS_PER_SECOND), RUN + " reported"),
                Q(per_second(m.TRAIN_ENV_STEPS), RUN + " counted"),
            )
        )
        .with_panel(
            timeseries(
                "Updates per second",
                "Gradient steps (offline) or learner updates (online) per second.",
                "short",
                Q(per_second(m.TRAIN_STEPS), RUN),
            )
        )
    )
