"""Storage: the classes the stack needs, the data volume (datasets, decision logs) and the model volume
(the registry and TorchServe's model store, read by every serving pod), and one Job per served version
that builds its TorchServe archive from the registry into the model store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi

from rlops_infra import config as cfg
from rlops_infra.base import Component
from rlops_infra.k8s import (
    MODEL_STORE_DIR,
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

DATA_CLAIM = "rlops-data"
MODELS_CLAIM = "rlops-models"


@dataclass(frozen=True)
class ArchiveSpec:
    """What the model store must hold: a policy's versions, archived with the serving settings."""

    policy: str
    versions: tuple[int, ...]
    workers: int
    batch_size: int
    max_batch_delay_ms: int
    batcher: str = "adaptive"


@dataclass(frozen=True)
class StorageArgs:
    storage: cfg.Storage
    namespace: str
    server_image: str
    archives: ArchiveSpec | None = None


def storage_class(spec: cfg.StorageClassSpec) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": metadata(spec.name, None, "storage"),
        "provisioner": spec.provisioner,
        "reclaimPolicy": spec.reclaim_policy,
        "volumeBindingMode": spec.volume_binding_mode,
        "allowVolumeExpansion": True,
    }
    if spec.parameters:
        obj["parameters"] = dict(spec.parameters)
    return obj


def claim(name: str, namespace: str, volume: cfg.Volume) -> dict[str, Any]:
    meta = metadata(name, namespace, "storage")
    # On a WaitForFirstConsumer class a claim stays Pending until a pod mounts it: do not wait for Bound.
    meta["annotations"] = {"pulumi.com/skipAwait": "true"}
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": meta,
        "spec": {
            "accessModes": [volume.access_mode],
            "storageClassName": volume.storage_class,
            "resources": {"requests": {"storage": volume.size}},
        },
    }


def archive_job_name(policy: str, version: int) -> str:
    return f"archive-{policy}-v{version}"


def archive_job(spec: ArchiveSpec, version: int, namespace: str, image: str) -> dict[str, Any]:
    command = [
        "rlops", "serve", "archive", spec.policy, str(version),
        "--registry", REGISTRY_DIR,
        "--store", MODEL_STORE_DIR,
        "--workers", str(spec.workers),
        "--batch-size", str(spec.batch_size),
        "--max-batch-delay-ms", str(spec.max_batch_delay_ms),
        "--batcher", spec.batcher,
    ]  # fmt: skip
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(archive_job_name(spec.policy, version), namespace, "model-store"),
        "spec": {
            "backoffLimit": 2,
            "activeDeadlineSeconds": 1800,
            "template": {
                "metadata": {
                    "labels": {"app.kubernetes.io/name": "model-store", "app.kubernetes.io/part-of": "rlops"}
                },
                "spec": {
                    "restartPolicy": "OnFailure",
                    "securityContext": pod_security(),
                    "containers": [
                        {
                            "name": "archive",
                            "image": image,
                            "command": command,
                            "env": [{"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/tmp"}],
                            "resources": resources("1", "2Gi"),
                            "securityContext": container_security(),
                            "volumeMounts": [mount("models", MODELS_MOUNT), mount("tmp", "/tmp")],
                        }
                    ],
                    "volumes": [pvc_volume("models", MODELS_CLAIM), scratch_volume("tmp", "4Gi")],
                },
            },
        },
    }


def objects(args: StorageArgs) -> list[dict[str, Any]]:
    out = [storage_class(s) for s in args.storage.classes]
    out += [
        claim(DATA_CLAIM, args.namespace, args.storage.data),
        claim(MODELS_CLAIM, args.namespace, args.storage.models),
    ]
    if args.archives:
        out += [
            archive_job(args.archives, v, args.namespace, args.server_image) for v in args.archives.versions
        ]
    return out


class Storage(Component):
    """Outputs ``data_claim``, ``models_claim`` (claim names) and ``archive_jobs`` (resources to wait for)."""

    def __init__(
        self,
        name: str,
        args: StorageArgs,
        opts: pulumi.ResourceOptions | None = None,
        depends_on: list[pulumi.Resource] | None = None,
    ) -> None:
        super().__init__("Storage", name, opts)
        deps = depends_on or []
        classes: list[pulumi.Resource] = []
        claims: list[pulumi.Resource] = []
        self.archive_jobs: list[pulumi.Resource] = []
        for obj in objects(args):
            kind, obj_name = obj["kind"], obj["metadata"]["name"]
            if kind == "StorageClass":
                classes.append(self.add(f"class-{obj_name}", obj, depends_on=deps))
            elif kind == "PersistentVolumeClaim":
                claims.append(self.add(obj_name, obj, depends_on=[*deps, *classes]))
            else:
                self.archive_jobs.append(self.add(obj_name, obj, depends_on=claims))
        self.data_claim = DATA_CLAIM
        self.models_claim = MODELS_CLAIM
        self.register_outputs({"data_claim": DATA_CLAIM, "models_claim": MODELS_CLAIM})
