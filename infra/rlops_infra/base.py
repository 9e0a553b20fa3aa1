"""What every rlops component shares: children named ``<name>-<suffix>`` and parented to the component."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pulumi

from rlops_infra.k8s import apply


class Component(pulumi.ComponentResource):
    def __init__(self, type_name: str, name: str, opts: pulumi.ResourceOptions | None) -> None:
        super().__init__(f"rlops:infra:{type_name}", name, None, opts)
        self.name = name

    def child_opts(self, depends_on: Sequence[pulumi.Resource] = (), **extra: Any) -> pulumi.ResourceOptions:
        return pulumi.ResourceOptions(parent=self, depends_on=list(depends_on), **extra)

    def add(
        self,
        suffix: str,
        manifest: dict[str, Any],
        depends_on: Sequence[pulumi.Resource] = (),
        **extra: Any,
    ) -> pulumi.CustomResource:
        return apply(f"{self.name}-{suffix}", manifest, self.child_opts(depends_on, **extra))
