"""Progressive delivery: Argo Rollouts from its pinned chart and the AnalysisTemplates a serving Rollout
runs. The canary checks are rendered from ``alerts/canary/analysis.yaml`` (the same file the local
rollout reads), each as a Prometheus-provider metric; the OPE gate is a Job-provider metric running
``rlops rollout ope-gate`` in the trainer image before any traffic moves.

No traffic is not success. Each check's query is guarded by its minimum sample count and always answers
exactly one value: the check's value when enough samples stand behind it, NaN otherwise (no traffic yet,
or a quantile of nothing). A NaN measurement meets neither condition, so Argo records it Inconclusive;
more than ``inconclusive_limit`` of them pause the rollout for a human instead of promoting it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi

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
    job_spec = {
        # The gate's verdict is its exit code (0 pass, 1 fail); a retry would not change it.
        "backoffLimit": 0,
        "activeDeadlineSeconds": 3600,
        "template": {
            "spec": {
                "restartPolicy": "Never",
                "securityContext": pod_security(),
                "containers": [
                    {
                        "name": "ope-gate",
                        "image": args.trainer_image,
                        "command": ope_command(),
                        "env": [{"name": "HOME", "value": "/tmp"}],
                        "resources": resources("2", "8Gi"),
                        "securityContext": container_security(),
                        "volumeMounts": [
                            mount("data", DATA_MOUNT, read_only=True),
                            mount("models", MODELS_MOUNT, read_only=True),
                            mount("tmp", "/tmp"),
                        ],
                    }
                ],
                "volumes": [
                    pvc_volume("data", args.data_claim, read_only=True),
                    pvc_volume("models", args.models_claim, read_only=True),
                    scratch_volume("tmp", "8Gi"),
                ],
            }
        },
    }
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
    out = [canary_template(args)]
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
