"""The continuous-learning loop on a schedule: a CronJob running ``rlops loop run-once`` in the trainer image,
one iteration per run, never two at once.

The loop config is generated from the stack's ``loop:`` section (its policy is ``serving.policy``) and
checked by the loop's own parser (``rlops_delivery.config.parse_config``) before any resource exists; it
reaches the pod as a ConfigMap, with the canary analysis file the command reads at start. The pod reads
the log root of the data volume (serving's ``decisions/``, the feedback service's ``rewards/``), keeps its
state and iterations in ``loop/`` of the data volume, and publishes into the registry on the model volume.

What a run does in the cluster: join the new decision files with their rewards, retrain when enough new
transitions arrived, gate the candidate off-policy against the champion, publish it and point the
registry's ``candidate`` alias at it. The pod has no TorchServe, so the command runs with ``--canary none``:
the iteration ends there (outcome ``handed_off``, exit 0), its decision files consumed, and the next run
looks for new data. The cluster's canary is the Argo Rollout of the serving component, started by setting
``serving.version`` to the published version; infra/README.md says how, and that Argo's verdict does not
come back to the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import yaml
from rlops_delivery import config as delivery_config

from rlops_infra import config as cfg
from rlops_infra.base import Component
from rlops_infra.k8s import (
    DATA_MOUNT,
    MODELS_MOUNT,
    REGISTRY_DIR,
    container_security,
    gpu_placement,
    metadata,
    mount,
    pod_security,
    pvc_volume,
    resources,
    scratch_volume,
    selector,
)

COMPONENT = "loop"
NAME = "rlops-loop"
"""The CronJob and its ConfigMap: one loop per stack, for the policy the stack serves."""
CONFIG_DIR = "/etc/rlops-loop"
CONFIG_FILE = "loop.yaml"
ANALYSIS_FILE = "analysis.yaml"
STATE_DIR = f"{DATA_MOUNT}/loop"
"""The loop's state and iterations (joined data, training runs, gate results) in the data volume."""
CONFIG_KEYS = ("algorithm", "train", "min_new_transitions", "reward_wait", "max_decision_files", "gate")
"""Keys of the stack's ``loop:`` section that are keys of the loop config."""
USAGE_ERROR = 2
"""``rlops loop run-once``'s exit code for bad input: a retry would fail the same way."""


@dataclass(frozen=True)
class LoopArgs:
    loop: cfg.Loop
    policy: str
    namespace: str
    trainer_image: str
    data_claim: str
    models_claim: str
    logs: str
    """Log root inside the data volume (``storage.logs``)."""
    analysis: str
    """The canary analysis file's text (alerts/canary/analysis.yaml)."""
    prometheus_url: str | None
    """The in-cluster Prometheus (None when monitoring is off)."""


def loop_config(loop: cfg.Loop, policy: str) -> dict[str, Any]:
    """The loop config (``rlops loop run-once --config``) for ``policy``: only the keys the stack sets, so
    the loop's own defaults hold for the rest."""
    doc: dict[str, Any] = {"policy": policy}
    for key, value in loop.model_dump(include=set(CONFIG_KEYS), exclude_none=True).items():
        if value != {}:
            doc[key] = value
    return doc


def config_text(loop: cfg.Loop, policy: str) -> str:
    return yaml.safe_dump(loop_config(loop, policy), sort_keys=False)


def check(c: cfg.StackConfig) -> list[str]:
    """Problems the loop's own parser finds in the config this stack would deploy (none: it is valid)."""
    try:
        delivery_config.parse_config(
            yaml.safe_load(config_text(c.loop, c.serving.policy)), f"{cfg.NAMESPACE}:loop"
        )
    except delivery_config.LoopError as exc:
        return [str(exc)]
    return []


def command(args: LoopArgs) -> list[str]:
    out = [
        "rlops", "loop", "run-once",
        "--config", f"{CONFIG_DIR}/{CONFIG_FILE}",
        "--logs", f"{DATA_MOUNT}/{args.logs}",
        "--registry", REGISTRY_DIR,
        "--state-dir", STATE_DIR,
        "--analysis", f"{CONFIG_DIR}/{ANALYSIS_FILE}",
        # The canary is the serving component's Argo Rollout, not a TorchServe in this pod.
        "--canary", "none",
    ]  # fmt: skip
    if args.prometheus_url:
        out += ["--prometheus-url", args.prometheus_url]
    return [*out, "--json"]


def config_map(args: LoopArgs) -> dict[str, Any]:
    meta = metadata(NAME, args.namespace, COMPONENT)
    meta["annotations"] = {"rlops.dev/source": "rlops:loop, alerts/canary/analysis.yaml"}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {CONFIG_FILE: config_text(args.loop, args.policy), ANALYSIS_FILE: args.analysis},
    }


def cron_job(args: LoopArgs) -> dict[str, Any]:
    lp = args.loop
    container = {
        "name": "loop",
        "image": args.trainer_image,
        "command": command(args),
        # Relative paths and temporary files (the join's links, torch's caches) land in the scratch volume.
        "workingDir": "/tmp",
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/tmp"}],
        "resources": resources(lp.resources.cpu, lp.resources.memory, lp.resources.gpus),
        "securityContext": container_security(),
        "volumeMounts": [
            mount("config", CONFIG_DIR, read_only=True),
            # Its state and the joined data go to the data volume; candidates into the registry.
            mount("data", DATA_MOUNT),
            mount("models", MODELS_MOUNT),
            mount("tmp", "/tmp"),
        ],
    }
    pod = {
        "restartPolicy": "Never",
        "securityContext": pod_security(),
        **gpu_placement(lp.resources.gpus),
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": NAME}},
            pvc_volume("data", args.data_claim),
            pvc_volume("models", args.models_claim),
            scratch_volume("tmp", "20Gi"),
        ],
    }
    job_spec = {
        "backoffLimit": lp.backoff_limit,
        "activeDeadlineSeconds": lp.active_deadline_seconds,
        # Exit 1 (stopped, resumable) is retried; bad input is not: a retry would fail the same way.
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": "loop", "operator": "In", "values": [USAGE_ERROR]},
                }
            ]
        },
        "template": {"metadata": {"labels": selector(COMPONENT)}, "spec": pod},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": metadata(NAME, args.namespace, COMPONENT),
        "spec": {
            "schedule": lp.schedule,
            "timeZone": lp.time_zone,
            # One iteration at a time: two would train on the same new files and publish twice.
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": lp.starting_deadline_seconds,
            "successfulJobsHistoryLimit": lp.successful_jobs_history_limit,
            "failedJobsHistoryLimit": lp.failed_jobs_history_limit,
            "jobTemplate": {"metadata": {"labels": selector(COMPONENT)}, "spec": job_spec},
        },
    }


def objects(args: LoopArgs) -> list[dict[str, Any]]:
    return [config_map(args), cron_job(args)]


class Loop(Component):
    def __init__(
        self,
        name: str,
        args: LoopArgs,
        opts: pulumi.ResourceOptions | None = None,
        depends_on: list[pulumi.Resource] | None = None,
    ) -> None:
        super().__init__("Loop", name, opts)
        deps = depends_on or []
        config, job = objects(args)
        read = self.add("config", config, depends_on=deps)
        self.add("cronjob", job, depends_on=[*deps, read])
        self.register_outputs({})
