"""Namespaces, and per team a ResourceQuota and a LimitRange, so that many concurrent jobs share the GPUs
without one team starving the others and without a pod that forgot its resources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi

from rlops_infra import config as cfg
from rlops_infra.base import Component
from rlops_infra.k8s import GPU_RESOURCE, metadata

TEAM_LABEL = "rlops.dev/team"


@dataclass(frozen=True)
class TenancyArgs:
    tenancy: cfg.Tenancy
    extra_namespaces: tuple[str, ...] = ()
    """Namespaces other components deploy into (monitoring, operators)."""


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata(name, None, "namespace", **labels)}


def quota(team: cfg.Team) -> dict[str, Any]:
    hard = {
        f"requests.{GPU_RESOURCE}": str(team.gpus),
        "requests.cpu": team.cpu,
        "requests.memory": team.memory,
        "limits.cpu": team.cpu,
        "limits.memory": team.memory,
        "count/jobs.batch": str(team.max_jobs),
        "count/rayjobs.ray.io": str(team.max_jobs),
    }
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": metadata("team-quota", team.name, "tenancy"),
        "spec": {"hard": hard},
    }


def limit_range(team: cfg.Team) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": metadata("team-defaults", team.name, "tenancy"),
        "spec": {
            "limits": [
                {
                    "type": "Container",
                    # A quota on requests/limits rejects pods that set none; these fill them in.
                    "default": {"cpu": team.default_cpu, "memory": team.default_memory},
                    "defaultRequest": {"cpu": team.default_cpu, "memory": team.default_memory},
                    "max": {GPU_RESOURCE: str(team.max_container_gpus)},
                }
            ]
        },
    }


def objects(args: TenancyArgs) -> list[dict[str, Any]]:
    t = args.tenancy
    out = [namespace(t.namespace)]
    out += [namespace(n) for n in args.extra_namespaces if n != t.namespace]
    for team in t.teams:
        out += [namespace(team.name, **{TEAM_LABEL: team.name}), quota(team), limit_range(team)]
    return out


class Tenancy(Component):
    """Outputs ``namespaces``: the Namespace resources by name, for other components to depend on."""

    def __init__(self, name: str, args: TenancyArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("Tenancy", name, opts)
        self.namespaces: dict[str, pulumi.Resource] = {}
        for obj in objects(args):
            if obj["kind"] == "Namespace":
                ns = obj["metadata"]["name"]
                self.namespaces[ns] = self.add(f"ns-{ns}", obj)
        for obj in objects(args):
            if obj["kind"] != "Namespace":
                ns = obj["metadata"]["namespace"]
                self.add(f"{ns}-{obj['kind'].lower()}", obj, depends_on=[self.namespaces[ns]])
        self.register_outputs({"namespaces": list(self.namespaces)})
