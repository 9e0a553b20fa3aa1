"""Progressive delivery: Argo Rollouts from its pinned chart and the AnalysisTemplates a serving Rollout
runs. The canary checks are rendered from ``alerts/canary/analysis.yaml`` (the same file the local
rollout reads), each as a Prometheus-provider metric; the OPE gate is a Job-provider metric running
``rlops rollout ope-gate`` in the trainer image before any traffic moves.

Box (continuous-action) policies: the file's ``action-divergence`` compares discrete action distributions,
and every Box decision is counted under one ``action`` label, so for them it measures 0 and passes
whatever the candidate does. Its per-dimension counterpart compares each version's binned actions using
the bin edges of each model card, which no PromQL query can do: the canary template runs it as one more
metric, a Job running ``rlops rollout check`` in the trainer image with the registry and the analysis file
mounted (the same Python as the local rollout). The template is rendered before the action space is
known, so the metric is there for every policy; for Discrete ones the command has nothing to add and
exits 0 at once.

No traffic is not success. Each check's query is guarded by its minimum sample count and always answers
exactly one value: the check's value when enough samples stand behind it, NaN otherwise (no traffic yet,
or a quantile of nothing). A NaN measurement meets neither condition, so Argo records it Inconclusive;
more than ``inconclusive_limit`` of them pause the rollout for a human instead of promoting it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
from rlops_delivery.analysis import parse_duration

from rlops_infra import charts
from rlops_infra import config as cfg
from rlops_infra.base import Component
from rlops_infra.files import Analysis, Check
from rlops_infra.k8s import (
    DATA_MOUNT,
    MODELS_MOUNT,
    REGISTRY_DIR,
    container_security,
    metadata,
    mount,
    pod_security,
    pvc_volume,
    resources,
    scratch_volume,
)

NAMESPACE = "argo-rollouts"
CANARY_TEMPLATE = "rlops-canary"
OPE_TEMPLATE = "rlops-ope-gate"
ARGS = ("policy", "candidate", "champion")
CHECK_METRIC = "action-divergence-per-dimension"
"""The canary metric running ``rlops rollout check``, named after the check it measures for Box policies."""
ANALYSIS_CONFIG_MAP = "rlops-canary-analysis"
"""The analysis file, for ``rlops rollout check`` in the check Jobs."""
ANALYSIS_DIR = "/etc/rlops-canary"
ANALYSIS_FILE = "analysis.yaml"
CHECK_STARTUP_S = 300
"""Time a check Job may take beyond its wait: scheduling, pulling the trainer image, imports."""


@dataclass(frozen=True)
class DeliveryArgs:
    delivery: cfg.Delivery
    analysis: Analysis
    namespace: str
    prometheus_url: str
    trainer_image: str
    data_claim: str
    models_claim: str
    logs: str
    """Log root inside the data volume (``storage.logs``), with serving's decisions and the rewards."""


def _number(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() else repr(value)


def guarded_query(check: Check) -> str:
    """The check's value if ``min_samples`` stand behind it, else NaN: one sample either way."""
    return (
        f"(({check.query}) and on() (({check.min_samples_query}) >= {_number(check.min_samples)}))"
        " or on() vector(NaN)"
    )


def conditions(check: Check) -> tuple[str, str]:
    """Argo success and failure conditions; a NaN or missing value meets neither (Inconclusive)."""
    known = "len(result) == 1 && !isNaN(result[0])"
    threshold = _number(check.threshold)
    return (
        f"{known} && result[0] {check.comparison} {threshold}",
        f"{known} && !(result[0] {check.comparison} {threshold})",
    )


def trainer_job(
    args: DeliveryArgs,
    name: str,
    command: list[str],
    *,
    cpu: str,
    memory: str,
    scratch: str,
    deadline_s: int,
    volumes: Sequence[tuple[dict[str, Any], dict[str, Any]]] = (),
) -> dict[str, Any]:
    """The Job of a Job-provider metric: ``command`` once in the trainer image, with ``volumes`` (each a
    volume and its mount), the models volume read-only (the registry) and a scratch ``/tmp``."""
    return {
        # The verdict is the command's exit code (0 pass, else fail); a retry would not change it.
        "backoffLimit": 0,
        "activeDeadlineSeconds": deadline_s,
        "template": {
            "spec": {
                "restartPolicy": "Never",
                "securityContext": pod_security(),
                "containers": [
                    {
                        "name": name,
                        "image": args.trainer_image,
                        "command": command,
                        "env": [{"name": "HOME", "value": "/tmp"}],
                        "resources": resources(cpu, memory),
                        "securityContext": container_security(),
                        "volumeMounts": [
                            *(m for _, m in volumes),
                            mount("models", MODELS_MOUNT, read_only=True),
                            mount("tmp", "/tmp"),
                        ],
                    }
                ],
                "volumes": [
                    *(v for v, _ in volumes),
                    pvc_volume("models", args.models_claim, read_only=True),
                    scratch_volume("tmp", scratch),
                ],
            }
        },
    }


def check_wait_s(args: DeliveryArgs) -> int:
    """How long one check Job waits for enough samples: as long as the rendered Prometheus checks go on
    measuring the same traffic inconclusively (``inconclusive_limit`` + 1 intervals) before they pause
    the rollout for a human."""
    interval = parse_duration(args.analysis.interval, "alerts/canary/analysis.yaml: interval")
    return math.ceil((args.delivery.inconclusive_limit + 1) * interval)


def check_command(args: DeliveryArgs) -> list[str]:
    return [
        "rlops", "rollout", "check", "{{args.policy}}", "{{args.candidate}}", "{{args.champion}}",
        "--prometheus-url", args.prometheus_url,
        "--registry", REGISTRY_DIR,
        "--analysis", f"{ANALYSIS_DIR}/{ANALYSIS_FILE}",
        "--wait-s", str(check_wait_s(args)),
    ]  # fmt: skip


def check_metric(args: DeliveryArgs) -> dict[str, Any]:
    """``rlops rollout check`` as a Job metric of the canary's background analysis. Each Job is one
    measurement: it measures every ``interval`` of the file until the check is conclusive, and exits 0
    (pass) or 1 (fail, or still inconclusive after ``--wait-s``: a Job can only succeed or fail, and no
    traffic is not success)."""
    a = args.analysis
    wait = check_wait_s(args)
    analysis_volume = {"name": "analysis", "configMap": {"name": ANALYSIS_CONFIG_MAP}}
    job = trainer_job(
        args,
        "check",
        check_command(args),
        cpu="500m",
        memory="1Gi",
        scratch="1Gi",
        deadline_s=wait + CHECK_STARTUP_S,
        volumes=[(analysis_volume, mount("analysis", ANALYSIS_DIR, read_only=True))],
    )
    return {
        "name": CHECK_METRIC,
        # No count: Argo starts the next Job `interval` after one finishes, until the rollout ends (a Job
        # still running then is stopped and counts as successful). A long canary step is re-measured as
        # the candidate's traffic grows, at the file's pace; a count would stop measuring partway through.
        "interval": a.interval,
        # The file's: one failed Job more than it aborts the rollout, as for the Prometheus checks.
        "failureLimit": a.failure_limit,
        # Argo v1.9 never ends a Job measurement Inconclusive (later releases do when the image cannot
        # be pulled); the stack's limit then holds as for the other checks.
        "inconclusiveLimit": args.delivery.inconclusive_limit,
        "provider": {"job": {"spec": job}},
    }


def analysis_config_map(args: DeliveryArgs) -> dict[str, Any]:
    meta = metadata(ANALYSIS_CONFIG_MAP, args.namespace, "delivery")
    meta["annotations"] = {"rlops.dev/source": "alerts/canary/analysis.yaml"}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {ANALYSIS_FILE: args.analysis.text},
    }


def canary_template(args: DeliveryArgs) -> dict[str, Any]:
    a = args.analysis
    metrics = []
    for check in a.checks:
        success, failure = conditions(check)
        metrics.append(
            {
                "name": check.name,
                "interval": a.interval,
                "failureLimit": a.failure_limit,
                "inconclusiveLimit": args.delivery.inconclusive_limit,
                "successCondition": success,
                "failureCondition": failure,
                "provider": {
                    "prometheus": {
                        "address": args.prometheus_url,
                        "query": guarded_query(check),
                        "timeout": 30,
                    }
                },
            }
        )
    metrics.append(check_metric(args))
    meta = metadata(CANARY_TEMPLATE, args.namespace, "delivery")
    meta["annotations"] = {"rlops.dev/source": "alerts/canary/analysis.yaml"}
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AnalysisTemplate",
        "metadata": meta,
        "spec": {"args": [{"name": n} for n in ARGS], "metrics": metrics},
    }


def ope_command() -> list[str]:
    return [
        "rlops", "rollout", "ope-gate", "{{args.policy}}", "{{args.candidate}}",
        "--logs", f"{DATA_MOUNT}/{{{{args.logs}}}}",
        "--registry", REGISTRY_DIR,
    ]  # fmt: skip


def ope_template(args: DeliveryArgs) -> dict[str, Any]:
    job_spec = trainer_job(
        args,
        "ope-gate",
        ope_command(),
        cpu="2",
        memory="8Gi",
        scratch="8Gi",
        deadline_s=3600,
        volumes=[
            (pvc_volume("data", args.data_claim, read_only=True), mount("data", DATA_MOUNT, read_only=True))
        ],
    )
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AnalysisTemplate",
        "metadata": metadata(OPE_TEMPLATE, args.namespace, "delivery"),
        "spec": {
            "args": [*({"name": n} for n in ARGS), {"name": "logs", "value": args.logs}],
            "metrics": [{"name": "ope-gate", "failureLimit": 0, "provider": {"job": {"spec": job_spec}}}],
        },
    }


def controller_values() -> dict[str, Any]:
    return {
        "installCRDs": True,
        "keepCRDs": True,
        "controller": {
            "replicas": 2,
            "resources": {
                "requests": {"cpu": "100m", "memory": "128Mi"},
                "limits": {"cpu": "500m", "memory": "512Mi"},
            },
        },
    }


def objects(args: DeliveryArgs) -> list[dict[str, Any]]:
    out = [analysis_config_map(args), canary_template(args)]
    if args.delivery.ope_gate:
        out.append(ope_template(args))
    return out


class Delivery(Component):
    """Outputs ``controller`` (the Argo Rollouts release: its CRDs exist once it is installed)."""

    def __init__(
        self,
        name: str,
        args: DeliveryArgs,
        opts: pulumi.ResourceOptions | None = None,
        depends_on: list[pulumi.Resource] | None = None,
    ) -> None:
        super().__init__("Delivery", name, opts)
        deps = depends_on or []
        self.controller = charts.release(
            f"{name}-argo-rollouts",
            charts.ARGO_ROLLOUTS,
            args.delivery.chart_version,
            NAMESPACE,
            controller_values(),
            self.child_opts(depends_on=deps),
        )
        for obj in objects(args):
            self.add(obj["metadata"]["name"], obj, depends_on=[*deps, self.controller])
        self.register_outputs({"controller": self.controller})
