"""Schema validation of rendered objects, offline: core kinds against the Kubernetes OpenAPI schema
(``kubernetes-validate``'s strict schemas: unknown fields are errors), custom resources against the
pinned CRDs of the operators the stack installs.

The CRDs are read from ``$RLOPS_SCHEMAS_DIR`` (a folder with ``crds/*.yaml``), else from
``../shared/schemas`` beside the repository when present. ``python -m rlops_infra.crds --out DIR``
downloads the same pinned files from upstream.

The API server prunes fields a CRD schema does not declare, silently. Here an object schema that lists
its properties and does not preserve unknown fields rejects others, so a misspelt field fails the check
instead of disappearing on apply.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

from rlops_infra.files import ROOT

KUBERNETES_VERSION = "1.33.0"
"""The Kubernetes version objects are validated for (the EKS stacks' version)."""
SCHEMAS_ENV = "RLOPS_SCHEMAS_DIR"


@functools.cache
def _k8s_schema_file(name: str) -> dict[str, Any]:
    ref = importlib.resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict/{name}"
    )
    with importlib.resources.as_file(ref) as path:
        data: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    return data


@functools.cache
def _k8s_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = _k8s_schema_file(f"{kind.lower()}-{group_version}.json")
    except FileNotFoundError:
        return None
    registry: Registry = Resource.from_contents(schema) @ Registry()
    registry = Resource.from_contents(_k8s_schema_file("_definitions.json")) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _errors(validator: jsonschema.protocols.Validator, obj: dict[str, Any]) -> list[str]:
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors]


def is_core(obj: dict[str, Any]) -> bool:
    group = obj["apiVersion"].rsplit("/", 1)[0] if "/" in obj["apiVersion"] else ""
    return group == "" or "." not in group or group.endswith(".k8s.io")


def validate_core(obj: dict[str, Any]) -> list[str]:
    """Schema errors of a built-in kind (empty when valid)."""
    validator = _k8s_validator(obj["apiVersion"], obj["kind"])
    if validator is None:
        return [f"no Kubernetes {KUBERNETES_VERSION} schema for {obj['apiVersion']} {obj['kind']}"]
    return _errors(validator, obj)


def schemas_dir() -> Path | None:
    """Where the pinned CRDs are, or None: ``$RLOPS_SCHEMAS_DIR``, then ``../shared/schemas``."""
    env = os.environ.get(SCHEMAS_ENV)
    if env:
        return Path(env)
    beside = ROOT.parent / "shared" / "schemas"
    return beside if (beside / "crds").is_dir() else None


def _strict(schema: Any, root: bool = True) -> Any:
    if isinstance(schema, dict):
        out = {k: _strict(v, False) for k, v in schema.items() if k != "properties"}
        if "properties" in schema:
            out["properties"] = {
                # ObjectMeta is validated by the API server, not by the CRD schema.
                k: (v if root and k == "metadata" else _strict(v, False))
                for k, v in schema["properties"].items()
            }
            if "additionalProperties" not in schema and not schema.get(
                "x-kubernetes-preserve-unknown-fields"
            ):
                out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v, False) for v in schema]
    return schema


class _CrdLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML 1.1 reads a bare ``=`` as a 'value' tag; in CRDs it is just a string (an enum member)."""


_CrdLoader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


@functools.cache
def crd_validators(directory: Path) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) → validator, for every served version of every CRD in ``directory/crds``."""
    out: dict[tuple[str, str], jsonschema.protocols.Validator] = {}
    crd_dir = directory / "crds"
    if not crd_dir.is_dir():
        raise FileNotFoundError(f"{crd_dir}: no such folder (expected the pinned CRDs, crds/*.yaml)")
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(encoding="utf-8"), Loader=_CrdLoader):
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                schema = version.get("schema", {}).get("openAPIV3Schema")
                if schema and version.get("served", True):
                    strict = _strict(copy.deepcopy(schema))
                    out[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(strict)
    return out


def validate_custom(obj: dict[str, Any], directory: Path) -> list[str]:
    validator = crd_validators(directory).get((obj["apiVersion"], obj["kind"]))
    if validator is None:
        return [f"no pinned CRD for {obj['apiVersion']} {obj['kind']} in {directory / 'crds'}"]
    return _errors(validator, obj)


def validate_all(objects: Iterable[dict[str, Any]], directory: Path | None) -> dict[str, list[str]]:
    """``kind/namespace/name`` → errors, for every object with any; custom resources only with a directory."""
    problems: dict[str, list[str]] = {}
    for obj in objects:
        meta = obj.get("metadata", {})
        key = f"{obj['kind']}/{meta.get('namespace', '-')}/{meta.get('name')}"
        if is_core(obj):
            errors = validate_core(obj)
        elif directory is not None:
            errors = validate_custom(obj, directory)
        else:
            continue
        if errors:
            problems[key] = errors
    return problems
