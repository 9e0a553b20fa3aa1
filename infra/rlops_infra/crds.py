"""Download the pinned CRDs the render checks custom resources against, from their upstream tags.

    python -m rlops_infra.crds --out ~/rlops-schemas
    export RLOPS_SCHEMAS_DIR=~/rlops-schemas

The versions are the ones the stack installs: KubeRay 1.7.0, prometheus-operator v0.93.1 (shipped by
kube-prometheus-stack 88.5.3) and Argo Rollouts v1.9.1.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from pathlib import Path

from rlops_contracts.durable import replace_atomic

_KUBERAY = "https://raw.githubusercontent.com/ray-project/kuberay/v1.7.0/ray-operator/config/crd/bases"
_OPERATOR = "https://raw.githubusercontent.com/prometheus-operator/prometheus-operator/v0.93.1/example/prometheus-operator-crd"
_ARGO = "https://raw.githubusercontent.com/argoproj/argo-rollouts/v1.9.1/manifests/crds"

PINNED: dict[str, str] = {
    "ray.io_rayclusters.yaml": f"{_KUBERAY}/ray.io_rayclusters.yaml",
    "ray.io_rayjobs.yaml": f"{_KUBERAY}/ray.io_rayjobs.yaml",
    "ray.io_rayservices.yaml": f"{_KUBERAY}/ray.io_rayservices.yaml",
    "monitoring.coreos.com_prometheusrules.yaml": f"{_OPERATOR}/monitoring.coreos.com_prometheusrules.yaml",
    "monitoring.coreos.com_servicemonitors.yaml": f"{_OPERATOR}/monitoring.coreos.com_servicemonitors.yaml",
    "monitoring.coreos.com_podmonitors.yaml": f"{_OPERATOR}/monitoring.coreos.com_podmonitors.yaml",
    "monitoring.coreos.com_alertmanagerconfigs.yaml": (
        f"{_OPERATOR}/monitoring.coreos.com_alertmanagerconfigs.yaml"
    ),
    "argoproj.io_rollout.yaml": f"{_ARGO}/rollout-crd.yaml",
    "argoproj.io_analysis-template.yaml": f"{_ARGO}/analysis-template-crd.yaml",
    "argoproj.io_analysis-run.yaml": f"{_ARGO}/analysis-run-crd.yaml",
}
"""File name in ``<dir>/crds/`` → upstream URL."""


def download(out: Path, timeout: float = 60.0) -> list[Path]:
    """Fetch every pinned CRD into ``out/crds`` (each written whole or not at all)."""
    crds = out / "crds"
    crds.mkdir(parents=True, exist_ok=True)
    written = []
    for name, url in PINNED.items():
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read()
        target = crds / name
        replace_atomic(target, f"# {url}\n".encode() + body)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download the pinned CRDs for the infra render checks.")
    parser.add_argument("--out", type=Path, required=True, help="folder to fill (crds/ is created inside)")
    ns = parser.parse_args(argv)
    try:
        paths = download(ns.out)
    except OSError as exc:
        print(f"download failed: {exc}", file=sys.stderr)
        return 1
    print(f"{len(paths)} CRDs in {ns.out / 'crds'}; export RLOPS_SCHEMAS_DIR={ns.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
