"""Render a stack without a cluster: run the real program under Pulumi's mocks and record every resource
it registers with the inputs it would send to the providers. Kubernetes objects come out exactly as
Pulumi would apply them; Helm releases and cloud resources come out as their inputs.

    python -m rlops_infra.render --stack dev [--out rendered.yaml]

Secrets the stack references but this machine cannot decrypt are replaced by placeholders (marked as
secrets, so the program treats them as it would the real ones).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml

from rlops_infra import config as cfg
from rlops_infra.files import ROOT, RepoFiles
from rlops_infra.program import build, plan

PROJECT = "rlops"
STACKS_DIR = ROOT / "stacks"
_SECRET_SIG = "4dabf18193072939515e22adb298388d"
"""Pulumi's marker key for a secret value in serialised inputs."""


@dataclass(frozen=True)
class Recorded:
    type: str
    name: str
    inputs: dict[str, Any]
    secret: bool = False
    """Some input held a Pulumi secret."""

    @property
    def component(self) -> str:
        return self.name.split("-", 1)[0]


@dataclass
class Render:
    stack: str
    resources: list[Recorded] = field(default_factory=list)

    def objects(self) -> list[dict[str, Any]]:
        """The Kubernetes objects, as applied."""
        return [r.inputs for r in self.kubernetes()]

    def kubernetes(self) -> list[Recorded]:
        return [
            r
            for r in self.resources
            if r.type.startswith("kubernetes:") and "apiVersion" in r.inputs and "kind" in r.inputs
        ]

    def releases(self) -> list[Recorded]:
        return [r for r in self.resources if r.type == "kubernetes:helm.sh/v3:Release"]

    def cloud(self) -> list[Recorded]:
        return [r for r in self.resources if r.type.split(":")[0] in ("aws", "eks")]

    def find(self, kind: str, name: str) -> dict[str, Any]:
        for obj in self.objects():
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                return obj
        raise KeyError(f"{kind}/{name} is not in the render of {self.stack}")

    def release(self, chart: str) -> Recorded:
        for r in self.releases():
            if r.inputs.get("chart") == chart:
                return r
        raise KeyError(f"no release of chart {chart} in the render of {self.stack}")


def _normalise(value: Any) -> tuple[Any, bool]:
    """Unwrap secret markers and the float encoding of integers (inputs travel as protobuf Structs)."""
    if isinstance(value, dict):
        if _SECRET_SIG in value:
            inner, _ = _normalise(value.get("value"))
            return inner, True
        out, secret = {}, False
        for k, v in value.items():
            out[k], s = _normalise(v)
            secret |= s
        return out, secret
    if isinstance(value, list):
        items = [_normalise(v) for v in value]
        return [v for v, _ in items], any(s for _, s in items)
    if isinstance(value, float) and value.is_integer():
        return int(value), False
    return value, False


class Mocks(pulumi.runtime.Mocks):
    """Records every registered resource; echoes inputs as outputs."""

    def __init__(self) -> None:
        self.recorded: list[Recorded] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        inputs, secret = _normalise(args.inputs)
        self.recorded.append(Recorded(args.typ, args.name, inputs, secret))
        # Remote components get no echoed inputs: those hold resource references, which the SDK would
        # rehydrate with further lookups that the mocks cannot serve.
        outputs = {} if args.typ.startswith("eks:") else dict(args.inputs)
        if args.typ == "aws:iam/role:Role":
            outputs.update(arn=f"arn:aws:iam::123456789012:role/{args.name}", name=args.name)
        if args.typ == "eks:index:Cluster":
            outputs["kubeconfigJson"] = "{}"
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[Any, Any], list[tuple[str, str]] | None]:
        return {}, None


class _Monitor(pulumi.runtime.mocks.MockMonitor):
    """The mock monitor without resource references: inputs that name another resource (an EKS node
    group's cluster and role) arrive as its URN instead of being rehydrated into a resource, which the
    mock monitor would do on its own thread and event loop."""

    def SupportsFeature(self, request: Any) -> Any:
        if request.id == "resourceReferences":
            return type("SupportsFeatureResponse", (object,), {"hasSupport": False})
        return super().SupportsFeature(request)

    def GetDeploymentInfo(self, request: Any) -> Any:
        from pulumi.runtime.proto import resource_pb2

        info = super().GetDeploymentInfo(request)
        features = [
            f
            for f in info.supportedFeatures
            if f != resource_pb2.RESOURCE_MONITOR_FEATURE_RESOURCE_REFERENCES
        ]
        return resource_pb2.DeploymentInfo(supportedFeatures=features)


def run_mocked(
    fn: Any, stack: str, values: dict[str, Any], secret_keys: set[str], mocks: Mocks | None = None
) -> list[Recorded]:
    """Run ``fn`` under mocks with the given config; returns what it registered (also in ``mocks``)."""
    mocks = mocks or Mocks()
    # A fresh root stack per run: the previous run's root is bound to the event loop that ran it.
    pulumi.runtime.settings.reset_options(project=PROJECT, stack=stack, preview=False)
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=False, monitor=_Monitor(mocks))
    pulumi.runtime.set_all_config(
        {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}, sorted(secret_keys)
    )

    @pulumi.runtime.test
    def _run() -> None:
        fn()

    _run()
    return mocks.recorded


def render(
    stack: str, values: dict[str, Any], secret_keys: set[str], files: RepoFiles | None = None
) -> Render:
    """Validate, then build the program under mocks; raises :class:`config.ConfigError` like ``pulumi up``."""
    p = plan(values, secret_keys, files)
    return Render(stack=stack, resources=run_mocked(lambda: build(p), stack, values, secret_keys))


def stack_file(stack: str, stacks_dir: Path = STACKS_DIR) -> Path:
    return stacks_dir / f"Pulumi.{stack}.yaml"


def read_stack_file(path: Path) -> tuple[dict[str, Any], set[str]]:
    """The config of a stack file and its secret keys (``secure:`` values, which stay encrypted here)."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise cfg.ConfigError([f"{path}: cannot read the stack file ({exc})"]) from None
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict):
        raise cfg.ConfigError([f"{path}: needs a top-level 'config:' mapping"])
    values: dict[str, Any] = {}
    secret_keys: set[str] = set()
    for key, value in config.items():
        if isinstance(value, dict) and set(value) == {"secure"}:
            secret_keys.add(key)
            value = "encrypted"
        values[key] = value
    return values, secret_keys


def placeholder(key: str, receivers: list[dict[str, Any]]) -> str:
    """A stand-in for a secret this machine cannot read, shaped like the real one."""
    for r in receivers:
        if isinstance(r, dict) and r.get("secret") == key and r.get("type") in ("slack", "webhook"):
            return f"https://secret.invalid/{key}"
    return f"placeholder-{key}"


def with_placeholders(values: dict[str, Any], secret_keys: set[str]) -> tuple[dict[str, Any], set[str]]:
    """Add a placeholder secret for every secret key the config references and does not set."""
    out, keys = dict(values), set(secret_keys)
    monitoring = values.get(f"{cfg.NAMESPACE}:monitoring") or {}
    alerting = values.get(f"{cfg.NAMESPACE}:alerting") or {}
    receivers = alerting.get("receivers", []) if isinstance(alerting, dict) else []
    wanted = [
        monitoring.get("grafana_admin_password", "grafanaAdminPassword")
        if isinstance(monitoring, dict)
        else None
    ]
    wanted += [r.get("secret") for r in receivers if isinstance(r, dict)]
    files = alerting.get("secrets", {}) if isinstance(alerting, dict) else {}
    wanted += list(files.values()) if isinstance(files, dict) else []
    feedback = values.get(f"{cfg.NAMESPACE}:feedback") or {}
    if isinstance(feedback, dict) and feedback.get("enabled", cfg.Feedback().enabled):
        wanted.append(feedback.get("token", cfg.Feedback().token))
    for name in wanted:
        if not isinstance(name, str):
            continue
        full = f"{cfg.NAMESPACE}:{name}"
        if full not in out or out[full] == "encrypted":
            out[full] = placeholder(name, receivers)
            keys.add(full)
    return out, keys


def render_stack(stack: str, stacks_dir: Path = STACKS_DIR, files: RepoFiles | None = None) -> Render:
    values, secret_keys = read_stack_file(stack_file(stack, stacks_dir))
    values, secret_keys = with_placeholders(values, secret_keys)
    return render(stack, values, secret_keys, files)


def to_yaml(r: Render) -> str:
    docs = [*r.objects()]
    docs += [{"helmRelease": rel.inputs} for rel in r.releases()]
    docs += [{"cloudResource": {"type": c.type, "name": c.name, "inputs": c.inputs}} for c in r.cloud()]
    return yaml.safe_dump_all(docs, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack", required=True, help="stack name: stacks/Pulumi.<stack>.yaml")
    parser.add_argument("--stacks-dir", type=Path, default=STACKS_DIR, help="folder of the stack files")
    parser.add_argument("--out", type=Path, help="write the YAML here instead of stdout")
    ns = parser.parse_args(argv)
    if not stack_file(ns.stack, ns.stacks_dir).is_file():
        print(f"{stack_file(ns.stack, ns.stacks_dir)}: no such stack file", file=sys.stderr)
        return 2
    try:
        r = render_stack(ns.stack, ns.stacks_dir)
    except cfg.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    text = to_yaml(r)
    if ns.out:
        ns.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
