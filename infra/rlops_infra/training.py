"""Training workloads, both running the trainer image's ``rlops train``: a RayJob per distributed job (its
own Ray cluster, shut down when the job ends) and a plain batch/v1 Job per single-node job; a PodMonitor
for the training metrics the driver serves (on the Job's pod, on the RayJob's head, where KubeRay runs
the entrypoint)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
from rlops_contracts.metrics import JOB_TRAINER, PORT_TRAINER_METRICS

from rlops_infra import config as cfg
from rlops_infra import ray as ray_mod
from rlops_infra.base import Component
from rlops_infra.k8s import (
    DATA_MOUNT,
    MODELS_MOUNT,
    container_security,
    gpu_placement,
    job_relabeling,
    metadata,
    mount,
    pod_security,
    pvc_volume,
    resources,
    scratch_volume,
)


@dataclass(frozen=True)
class TrainingArgs:
    training: cfg.Training
    ray: cfg.Ray
    namespace: str
    trainer_image: str
    data_claim: str
    models_claim: str
    monitor_labels: dict[str, str] | None = None
    """Labels Prometheus selects monitors by; None when monitoring is off."""


METRICS_LABEL = "rlops.dev/trainer-metrics"
"""On the pods whose driver serves the training metrics (``rlops train`` listens on
:data:`~rlops_contracts.metrics.PORT_TRAINER_METRICS` by default)."""
METRICS_PORT_NAME = "train-metrics"


def _metrics_port() -> dict[str, Any]:
    return {"name": METRICS_PORT_NAME, "containerPort": PORT_TRAINER_METRICS}


def job_metadata(job: cfg.TrainingJob, namespace: str) -> dict[str, Any]:
    meta = metadata(job.name, namespace, "training", **{"rlops.dev/algorithm": job.algorithm})
    # Jobs run to completion on their own schedule; `pulumi up` must not block on them.
    meta["annotations"] = {"pulumi.com/skipAwait": "true"}
    return meta


def train_command(job: cfg.TrainingJob, out: str | None = None) -> list[str]:
    if job.algorithm == "online":
        # Inside a RayJob the driver joins the job's own cluster (RAY_ADDRESS is set by KubeRay).
        return [
            "rlops", "train", "online",
            "--config", f"{cfg.TRAINER_CONFIGS}/{job.config}",
            "--out", out or f"{MODELS_MOUNT}/{job.out}",
            "--no-progress",
        ]  # fmt: skip
    command = [
        "rlops", "train", job.algorithm,
        "--data", f"{DATA_MOUNT}/{job.data}",
        "--out", out or f"{MODELS_MOUNT}/{job.out}",
        "--name", job.name,
        "--device", "cuda" if job.resources.gpus else "cpu",
        "--no-progress",
    ]  # fmt: skip
    if job.runner == "ray":
        command += ["--ray-workers", str(job.ray_workers)]
    return command


def rayjob(args: TrainingArgs, job: cfg.TrainingJob) -> dict[str, Any]:
    workers = ray_mod.WorkerGroup(
        name="train",
        min_replicas=job.ray_workers,
        max_replicas=job.ray_workers,
        replicas=job.ray_workers,
        cpu=job.resources.cpu,
        memory=job.resources.memory,
        gpus=job.resources.gpus,
    )
    cluster = ray_mod.cluster_spec(
        args.ray, args.trainer_image, workers, args.data_claim, args.models_claim, autoscale=False
    )
    # The entrypoint's driver runs on the head: its training metrics are served there.
    head = cluster["headGroupSpec"]["template"]
    head.setdefault("metadata", {}).setdefault("labels", {})[METRICS_LABEL] = "true"
    head["spec"]["containers"][0]["ports"].append(_metrics_port())
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": job_metadata(job, args.namespace),
        "spec": {
            "entrypoint": " ".join(train_command(job)),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": job.ttl_seconds_after_finished,
            "activeDeadlineSeconds": job.active_deadline_seconds,
            "backoffLimit": job.backoff_limit,
            "submissionMode": "K8sJobMode",
            "rayClusterSpec": cluster,
            "submitterPodTemplate": {
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": pod_security(),
                    "containers": [
                        {
                            "name": "ray-job-submitter",
                            "image": args.trainer_image,
                            "env": [{"name": "HOME", "value": "/tmp"}],
                            "resources": resources("200m", "512Mi"),
                            "securityContext": container_security(),
                            "volumeMounts": [mount("tmp", "/tmp")],
                        }
                    ],
                    "volumes": [scratch_volume("tmp")],
                }
            },
        },
    }


def batch_job(args: TrainingArgs, job: cfg.TrainingJob) -> dict[str, Any]:
    indexed = job.parallelism > 1
    # Parallel pods are independent trainers (e.g. seeds): each writes its own run directory.
    out = f"{MODELS_MOUNT}/{job.out}/$(JOB_COMPLETION_INDEX)" if indexed else None
    env: list[dict[str, Any]] = [{"name": "HOME", "value": "/tmp"}]
    if indexed:
        annotation = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": annotation}}})
    spec: dict[str, Any] = {
        "parallelism": job.parallelism,
        "completions": job.parallelism,
        "backoffLimit": job.backoff_limit,
        "ttlSecondsAfterFinished": job.ttl_seconds_after_finished,
        "activeDeadlineSeconds": job.active_deadline_seconds,
        "template": {
            "metadata": {
                "labels": {
                    "app.kubernetes.io/name": "training",
                    "app.kubernetes.io/part-of": "rlops",
                    METRICS_LABEL: "true",
                }
            },
            "spec": {
                "restartPolicy": "OnFailure",
                "securityContext": pod_security(),
                **gpu_placement(job.resources.gpus),
                "containers": [
                    {
                        "name": "train",
                        "image": args.trainer_image,
                        "command": train_command(job, out),
                        "env": env,
                        "ports": [_metrics_port()],
                        "resources": resources(job.resources.cpu, job.resources.memory, job.resources.gpus),
                        "securityContext": container_security(),
                        "volumeMounts": [
                            mount("data", DATA_MOUNT, read_only=True),
                            mount("models", MODELS_MOUNT),
                            mount("tmp", "/tmp"),
                        ],
                    }
                ],
                "volumes": [
                    pvc_volume("data", args.data_claim, read_only=True),
                    pvc_volume("models", args.models_claim),
                    scratch_volume("tmp", "20Gi"),
                ],
            },
        },
    }
    if indexed:
        spec["completionMode"] = "Indexed"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job_metadata(job, args.namespace),
        "spec": spec,
    }


def pod_monitor(namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    meta = metadata(JOB_TRAINER, namespace, "training")
    meta["labels"].update(labels)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": {METRICS_LABEL: "true"}},
            "podMetricsEndpoints": [
                {"port": METRICS_PORT_NAME, "interval": "15s", "relabelings": job_relabeling(JOB_TRAINER)}
            ],
        },
    }


def objects(args: TrainingArgs) -> list[dict[str, Any]]:
    out = [rayjob(args, j) if j.runner == "ray" else batch_job(args, j) for j in args.training.jobs]
    if args.monitor_labels is not None and out:
        out.append(pod_monitor(args.namespace, args.monitor_labels))
    return out


class Training(Component):
    def __init__(
        self,
        name: str,
        args: TrainingArgs,
        opts: pulumi.ResourceOptions | None = None,
        depends_on: list[pulumi.Resource] | None = None,
    ) -> None:
        super().__init__("Training", name, opts)
        for obj in objects(args):
            self.add(f"{obj['kind'].lower()}-{obj['metadata']['name']}", obj, depends_on=depends_on or [])
        self.register_outputs({})
