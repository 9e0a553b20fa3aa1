"""Metric names and label values shared by everything that exports or queries rlops metrics.

Names start with ``rlops_`` and carry their unit; every serving metric has the labels ``policy`` and
``version``. Alert rules and dashboards query these names; the exporters import them from here.
"""

from __future__ import annotations

POLICY_LABELS: tuple[str, str] = ("policy", "version")

INFERENCE_LATENCY = "rlops_inference_latency_seconds"
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
"""Upper bounds (seconds) of the latency histogram's buckets, ``+Inf`` not included. The ``le`` label
of ``rlops_inference_latency_seconds_bucket`` is ``str(bound)`` (``"0.1"``, ``"1.0"``) or ``"+Inf"``.
Sub-millisecond bounds first; from 5 ms on they are the Prometheus clients' defaults."""
ACTIONS = "rlops_actions_total"
REJECTED_REQUESTS = "rlops_rejected_requests_total"
NONFINITE_OUTPUTS = "rlops_nonfinite_outputs_total"
FALLBACK = "rlops_fallback_total"
POLICY_ENTROPY = "rlops_policy_entropy"
VALUE_ESTIMATE = "rlops_value_estimate"
OBSERVATION_DRIFT_BIN = "rlops_observation_drift_bin_total"
OBSERVATION_REFERENCE = "rlops_observation_reference_ratio"
ACTION_REFERENCE = "rlops_action_reference_ratio"
# Box (continuous) policies: per action dimension, drift against the card's reference.actions bins, the
# card's share per bin, and the answered action values (a summary: mean = rate(_sum) / rate(_count)).
ACTION_DRIFT_BIN = "rlops_action_drift_bin_total"
ACTION_BIN_REFERENCE = "rlops_action_bin_reference_ratio"
ACTION_VALUE_SUM = "rlops_action_value_sum"
ACTION_VALUE_COUNT = "rlops_action_value_count"
CONTINUOUS_ACTION = "continuous"
"""The ``action`` label of rlops_actions_total for Box policies: their actions are no categories, so
every decision is counted under this one value (decision and fallback rates stay comparable)."""
DECISIONS_LOGGED = "rlops_decisions_logged_total"
DECISION_LOG_DROPPED = "rlops_decision_log_dropped_total"

# Values of the ``reason`` label of rlops_rejected_requests_total (a closed set, so cardinality is bounded).
R_MALFORMED_JSON = "malformed_json"
R_NOT_AN_OBJECT = "not_an_object"
R_BAD_FIELD = "bad_field"
R_MISSING_OBSERVATION = "missing_observation"
R_BAD_OBSERVATION = "bad_observation"
R_NONFINITE_OBSERVATION = "nonfinite_observation"
R_EMPTY_BATCH = "empty_batch"
R_BATCH_TOO_LARGE = "batch_too_large"
R_BAD_MASK = "bad_mask"
R_BAD_OPTION = "bad_option"
REJECT_REASONS: tuple[str, ...] = (
    R_MALFORMED_JSON,
    R_NOT_AN_OBJECT,
    R_BAD_FIELD,
    R_MISSING_OBSERVATION,
    R_BAD_OBSERVATION,
    R_NONFINITE_OBSERVATION,
    R_EMPTY_BATCH,
    R_BATCH_TOO_LARGE,
    R_BAD_MASK,
    R_BAD_OPTION,
)

# Values of the ``reason`` label of rlops_fallback_total.
F_NONFINITE_OUTPUT = "nonfinite_output"
F_INFERENCE_ERROR = "inference_error"
FALLBACK_REASONS: tuple[str, ...] = (F_NONFINITE_OUTPUT, F_INFERENCE_ERROR)

# Reward feedback service (labels ``policy``, ``version`` where a reward names its decision's policy).
REWARDS_RECEIVED = "rlops_rewards_received_total"
REWARDS_REJECTED = "rlops_rewards_rejected_total"
REWARD_POSITIVE_SUM = "rlops_reward_positive_sum_total"
REWARD_NEGATIVE_SUM = "rlops_reward_negative_sum_total"

# Training (offline and online trainers export the same names; labels ``run``, ``algorithm``, ``policy``).
TRAINING_LABELS: tuple[str, str, str] = ("run", "algorithm", "policy")
TRAIN_EPISODE_RETURN = "rlops_train_episode_return"
TRAIN_EPISODE_LENGTH = "rlops_train_episode_length"
TRAIN_LOSS = "rlops_train_loss"  # extra label ``loss`` (total, policy, value, td, cql_penalty, ...)
TRAIN_GRAD_NORM = "rlops_train_grad_norm"
TRAIN_POLICY_ENTROPY = "rlops_train_policy_entropy"
TRAIN_Q_ESTIMATE = "rlops_train_q_estimate"
TRAIN_EXPLORATION_RATE = "rlops_train_exploration_rate"
TRAIN_STEPS = "rlops_train_steps_total"  # gradient steps (offline) or learner updates (online)
TRAIN_ENV_STEPS = "rlops_train_env_steps_total"
TRAIN_ENV_STEPS_PER_SECOND = "rlops_train_env_steps_per_second"
TRAIN_LAST_PROGRESS = "rlops_train_last_progress_timestamp_seconds"
TRAIN_EVAL_RETURN = "rlops_train_eval_return"
TRAIN_BASELINE_RETURN = "rlops_train_baseline_return"
TRAIN_NONFINITE = "rlops_train_nonfinite_total"

# Default local ports (the cluster uses the same container ports).
PORT_TS_INFERENCE = 8080
PORT_TS_MANAGEMENT = 8081
PORT_TS_METRICS = 8082
PORT_FEEDBACK = 8090
PORT_TRAINER_METRICS = 9108
PORT_PROMETHEUS = 9090
PORT_ALERTMANAGER = 9093
PORT_ACTIONS_WEBHOOK = 9095

# Prometheus job names of the scrape targets (local stack and cluster alike); alert rules select on them.
JOB_TORCHSERVE = "torchserve"
JOB_FEEDBACK = "rlops-feedback"
JOB_TRAINER = "rlops-trainer"
JOB_ACTIONS = "rlops-actions"

# Exported by the actions service (rlops_stack.webhook), which reads TorchServe's management API:
# labels ``policy``, ``version``.
SERVING_WORKERS = "rlops_serving_workers"
SERVING_READY_WORKERS = "rlops_serving_ready_workers"
# Labels ``action`` (rollback, scale_up) and ``outcome`` (done, skipped, failed).
ACTIONS_TAKEN = "rlops_alert_actions_total"

# TorchServe's own metrics that rlops dashboards and rules query (names and labels are TorchServe's:
# ``model_name``, ``model_version``, where requests to the default version say ``default``; the
# Requests* counters carry no model label). The *_microseconds ones are counters of summed time.
TS_INFERENCE_REQUESTS = "ts_inference_requests_total"
TS_INFERENCE_LATENCY = "ts_inference_latency_microseconds"
TS_QUEUE_LATENCY = "ts_queue_latency_microseconds"
TS_REQUESTS_2XX = "Requests2XX"
TS_REQUESTS_4XX = "Requests4XX"
TS_REQUESTS_5XX = "Requests5XX"
