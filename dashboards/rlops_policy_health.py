"""Policy health: is each served version still the policy it was when it passed the gate?

Per version, so a candidate is read next to the champion: the reward it earns (feedback counters)
against the policy's baseline, its action mix against the policy's traffic and its own training data,
observation drift (PSI against the model card's reference bins), action drift of Box policies (PSI per
action dimension, the action shares per reference bin and the mean action), non-finite outputs,
fallbacks, entropy and value estimates. The table at the top puts the versions side by side. Where an
alert watches a signal, the panel shows the alert's own recording rule (alerts/rules/policy.yaml) and
its threshold.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.models.dashboard import DynamicConfigValue
from rlops_contracts import metrics as m
from rlops_stack.dashboards import (
    POLICY_FILTER,
    WINDOW,
    Column,
    Q,
    label_variable,
    make_dashboard,
    rate_sum,
    ratio,
    row,
    table,
    timeseries,
)

PV = ("policy", "version")
PER_VERSION = "{{policy}} v{{version}}"

# Recording rules of alerts/rules/policy.yaml.
REWARD = "policy_version:rlops_reward_per_decision:ratio_rate15m"
BASELINE = "policy:rlops_reward_per_decision:ratio_rate6h"
SHARE = "policy_version_action:rlops_actions:share_rate15m"
REFERENCE_SHARE = "policy_version_action:rlops_action_reference:ratio"
TVD_POLICY = "policy_version:rlops_actions_vs_policy:tvd_rate15m"
TVD_TRAINING = "policy_version:rlops_actions_vs_training:tvd_rate15m"
PSI = "policy_version_feature:rlops_observation_psi:rate30m"
ACTION_PSI = "policy_version_dimension:rlops_action_psi:rate30m"
ACTION_BIN_SHARE = "policy_version_dimension_bin:rlops_actions:share_rate30m"
ACTION_BIN_REFERENCE = "policy_version_dimension_bin:rlops_action_reference:ratio"
ACTION_MEAN = "policy_version_dimension:rlops_action_value:mean_rate5m"
BOX_PANELS = ("Action drift (PSI) per dimension", "Actions per reference bin", "Mean action per dimension")
"""Panels with data only while a policy with a Box action space is served."""


def pv(metric: str) -> str:
    return f"{metric}{{{POLICY_FILTER}}}"


def share_of_decisions(metric: str, window: str | None = None) -> str:
    """Events of a counter per decision of the same version; 0 while decisions come without events."""
    w = {"window": window} if window else {}
    return ratio(rate_sum(metric, PV, **w), rate_sum(m.ACTIONS, PV, **w))


def dashboard() -> Dashboard:
    return (
        make_dashboard(
            "rlops-policy-health",
            "rlops / Policy health",
            "Per policy version, candidate next to champion: reward, actions against the policy's traffic "
            "and the training data, observation drift, action drift of Box policies, non-finite outputs, "
            "fallbacks, entropy, value estimates.",
            label_variable("policy", "Policy", m.ACTIONS, "policy"),
            label_variable("version", "Version", m.ACTIONS, "version", 'policy=~"$policy"'),
            tags=["policy"],
        )
        .with_row(row("Versions side by side"))
        .with_panel(
            table(
                "Versions",
                "One row per served version. Reward: mean reward per rewarded decision over 15 minutes. "
                "Action distance: total variation distance of its actions from the policy's traffic over all "
                "versions (15 minutes). PSI: the largest per-feature population stability index over 30 "
                "minutes. Non-finite and fallback: shares of its decisions over 5 minutes.",
                ["policy", "version"],
                Column("decisions/s", rate_sum(m.ACTIONS, PV, window=WINDOW), "ops"),
                Column("reward per decision", pv(REWARD), "none"),
                Column("action distance", pv(TVD_POLICY), "percentunit"),
                Column("max PSI", f"max by (policy, version) ({pv(PSI)})", "none"),
                Column("non-finite", share_of_decisions(m.NONFINITE_OUTPUTS, WINDOW), "percentunit"),
                Column("fallback", share_of_decisions(m.FALLBACK, WINDOW), "percentunit"),
                Column("entropy", f"avg by (policy, version) ({pv(m.POLICY_ENTROPY)})", "none"),
            )
        )
        .with_row(row("Reward"))
        .with_panel(
            timeseries(
                "Reward per rewarded decision",
                "Mean reward per rewarded decision of each version over 15 minutes (feedback service "
                "counters), the policy's 6-hour baseline over all versions, and the rollback threshold: "
                "below 0.9 x baseline for 10 minutes, the champion is rolled back.",
                "none",
                Q(pv(REWARD), PER_VERSION),
                Q(f'{BASELINE}{{policy=~"$policy"}}', "{{policy}} 6 h baseline"),
                Q(
                    f'{BASELINE}{{policy=~"$policy"}} - 0.1 * abs({BASELINE}{{policy=~"$policy"}})',
                    "{{policy}} rollback threshold",
                ),
                soft_min=None,
            ).override_by_regexp(
                ".* rollback threshold",
                [
                    DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
                    DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
                ],
            )
        )
        .with_panel(
            timeseries(
                "Rewards received",
                "Rewards the feedback service accepted per second, per version; and refused, by reason "
                "('all refused' is 0 while every reward is accepted).",
                "ops",
                Q(rate_sum(m.REWARDS_RECEIVED, PV), PER_VERSION),
                Q(f"sum by (reason) (rate({m.REWARDS_REJECTED}[$__rate_interval]))", "refused: {{reason}}"),
                Q(
                    f"(sum(rate({m.REWARDS_REJECTED}[$__rate_interval])) or "
                    f"sum(rate({m.REWARDS_RECEIVED}[$__rate_interval])) * 0)",
                    "all refused",
                ),
            )
        )
        .with_row(row("Actions"))
        .with_panel(
            timeseries(
                "Action shares: served and in the training data",
                "Share of each action among the version's decisions over 15 minutes, and the share the model "
                "card records for the data the version was trained on (dashed).",
                "percentunit",
                Q(pv(SHARE), PER_VERSION + " action {{action}}"),
                Q(pv(REFERENCE_SHARE), PER_VERSION + " action {{action}} training data"),
                soft_min=None,
            ).override_by_regexp(
                ".* training data",
                [DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]})],
            )
        )
        .with_panel(
            timeseries(
                "Action distance",
                "Total variation distance (0 the same, 1 disjoint) over 15 minutes of each version's actions "
                "from the policy's traffic over all versions, which the champion dominates (alert above 0.2, "
                "dashed), and from its own training data (alert, info only, above 0.5).",
                "percentunit",
                Q(pv(TVD_POLICY), PER_VERSION + " vs policy traffic"),
                Q(pv(TVD_TRAINING), PER_VERSION + " vs training data"),
                threshold=0.2,
            )
        )
        .with_row(row("Observation drift"))
        .with_panel(
            timeseries(
                "Observation drift (PSI) per feature",
                "Population stability index of each observation feature over 30 minutes, against the model "
                "card's reference bins. Below 0.1 stable, 0.1-0.25 moving, above 0.25 shifted (the drift "
                "alert's threshold, dashed).",
                "none",
                Q(pv(PSI), PER_VERSION + " feature {{feature}}"),
                threshold=0.25,
            )
        )
        .with_panel(
            timeseries(
                "Observation drift (largest PSI)",
                "The largest per-feature PSI of each version.",
                "none",
                Q(f"max by (policy, version) ({pv(PSI)})", PER_VERSION),
                threshold=0.25,
            )
        )
        .with_row(row("Action drift (Box policies)"))
        .with_panel(
            timeseries(
                BOX_PANELS[0],
                "Policies with continuous actions: population stability index of each action dimension over "
                "30 minutes, against the model card's action bins. Above 0.25 shifted (the action drift "
                "alert's threshold, dashed).",
                "none",
                Q(pv(ACTION_PSI), PER_VERSION + " dimension {{dimension}}"),
                width=8,
                threshold=0.25,
            )
        )
        .with_panel(
            timeseries(
                BOX_PANELS[1],
                "The distribution of the answered actions: share of each reference bin per dimension over 30 "
                "minutes, next to the training data's share of the same bin.",
                "percentunit",
                Q(pv(ACTION_BIN_SHARE), PER_VERSION + " dim {{dimension}} bin {{bin}}"),
                Q(pv(ACTION_BIN_REFERENCE), PER_VERSION + " dim {{dimension}} bin {{bin}} training"),
                width=8,
            )
        )
        .with_panel(
            timeseries(
                BOX_PANELS[2],
                "Mean answered action per dimension over 5 minutes, in the action's own units.",
                "none",
                Q(pv(ACTION_MEAN), PER_VERSION + " dimension {{dimension}}"),
                width=8,
                soft_min=None,
            )
        )
        .with_row(row("Model outputs"))
        .with_panel(
            timeseries(
                "Non-finite outputs",
                "Share of decisions whose model output held NaN or infinity (answered by the fallback).",
                "percentunit",
                Q(share_of_decisions(m.NONFINITE_OUTPUTS), PER_VERSION),
                width=6,
            )
        )
        .with_panel(
            timeseries(
                "Fallback decisions",
                "Share of decisions answered by the fallback action, for any reason (alert above 1%, "
                "dashed).",
                "percentunit",
                Q(share_of_decisions(m.FALLBACK), PER_VERSION),
                width=6,
                threshold=0.01,
            )
        )
        .with_panel(
            timeseries(
                "Policy entropy",
                "Mean entropy (nats) of the action distributions the version served; 0 is deterministic.",
                "none",
                Q(f"avg by (policy, version) ({pv(m.POLICY_ENTROPY)})", PER_VERSION),
                width=6,
            )
        )
        .with_panel(
            timeseries(
                "Value estimate",
                "Mean of the best action's Q-value per decision (policies that score with Q-values only).",
                "none",
                Q(f"avg by (policy, version) ({pv(m.VALUE_ESTIMATE)})", PER_VERSION),
                width=6,
                soft_min=None,
            )
        )
    )
