"""Build a TorchServe model archive (.mar) from a policy version in the registry.

The archive holds ``policy.pt`` and ``model-card.json`` as they are in the registry (their sha256 is
checked before packing and again by the handler when a worker starts), the handler module
(``rlops_server/handler.py``), and ``model-config.yaml`` with TorchServe's per-model settings and the
handler's settings. Archive name and version are the policy's name and registry version, so two
versions of one policy load side by side as two versions of one TorchServe model.

The rest of ``rlops_server`` is not packed: the worker runs in the Python environment TorchServe was
started from, where ``rlops_server`` and its dependencies (torch, numpy, jsonschema) are installed
anyway. Packing the package as extra files would put a second copy of ``rlops_server`` on the worker's
path that could silently differ from the installed one; instead the archive records the version of
``rlops-server`` that built it and the handler refuses to start under another.

Registry layout (the artifact contract): ``<registry>/<name>/<version>/`` and
``<registry>/<name>/aliases.json`` (``{"champion": 3, "candidate": 4}``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from rlops_contracts import MODEL_CARD_FILE, POLICY_FILE

from rlops_server.runtime import PolicyLoadError, ServingSettings, read_card, verify_files
from rlops_server.tsconfig import ModelSettings

DEFAULT_REGISTRY = Path(".rlops/registry")
REGISTRY_ENV = "RLOPS_REGISTRY"
ALIASES_FILE = "aliases.json"
HANDLER_FILE = "handler.py"
MODEL_CONFIG_FILE = "model-config.yaml"
VERSION_KEY = "rlops_server_version"
"""Key of the handler section that records which rlops-server built the archive."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_ARCHIVER_TIMEOUT_S = 300


class ArchiveError(RuntimeError):
    """An archive that cannot be built; the message names the policy, version or file."""


@dataclass(frozen=True)
class Archive:
    path: Path
    name: str
    version: int


def default_registry() -> Path:
    return Path(os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY)


def server_version() -> str:
    """Version of the installed rlops-server distribution."""
    return importlib.metadata.version("rlops-server")


def archive_file_name(name: str, version: int) -> str:
    return f"{name}-v{version}.mar"


# --- reading the registry --------------------------------------------------------------------------


def registry_policies(registry: Path) -> list[str]:
    """Names of the policies in the registry."""
    if not registry.is_dir():
        return []
    return sorted(p.name for p in registry.iterdir() if p.is_dir() and _NAME_RE.match(p.name))


def registry_versions(registry: Path, name: str) -> list[int]:
    """Published versions of ``name``, oldest first; raises ArchiveError for an unknown policy."""
    if not _NAME_RE.match(name):
        raise ArchiveError(f"invalid policy name {name!r}: letters, digits, '.', '_' or '-'")
    d = registry / name
    if not d.is_dir():
        known = registry_policies(registry)
        raise ArchiveError(
            f"unknown policy {name!r} in registry {registry}; known policies: {', '.join(known) or 'none'}"
        )
    return sorted(int(p.name) for p in d.iterdir() if re.fullmatch(r"[1-9][0-9]*", p.name) and p.is_dir())


def registry_aliases(registry: Path, name: str) -> dict[str, int]:
    """``aliases.json`` of a policy (alias → version); empty when there is none."""
    path = registry / name / ALIASES_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArchiveError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict) or not all(type(v) is int and v >= 1 for v in data.values()):
        raise ArchiveError(f"{path}: expected an object {{alias: version number}}, got {data!r}")
    return dict(data)


def resolve_version(registry: Path, name: str, ref: str | int) -> int:
    """The version number that ``ref`` (a number or an alias such as ``champion``) names."""
    versions = registry_versions(registry, name)
    text = str(ref)
    if re.fullmatch(r"[1-9][0-9]*", text):
        if int(text) not in versions:
            raise ArchiveError(
                f"policy {name!r} has no version {text}; versions: {', '.join(map(str, versions)) or 'none'}"
            )
        return int(text)
    aliases = registry_aliases(registry, name)
    if text not in aliases:
        listed = ", ".join(f"{a} → {v}" for a, v in sorted(aliases.items())) or "none"
        raise ArchiveError(f"policy {name!r} has no version or alias {text!r}; aliases: {listed}")
    if aliases[text] not in versions:
        raise ArchiveError(
            f"{registry / name / ALIASES_FILE}: {text} points at missing version {aliases[text]}"
        )
    return aliases[text]


# --- building --------------------------------------------------------------------------------------


def handler_source() -> Path:
    spec = importlib.util.find_spec("rlops_server.handler")
    if spec is None or spec.origin is None:
        raise ArchiveError("rlops_server.handler is not importable; is rlops-server installed?")
    return Path(spec.origin)


def build_archive(
    registry: Path,
    name: str,
    version: str | int,
    store: Path,
    *,
    model_settings: ModelSettings | None = None,
    serving: ServingSettings | None = None,
) -> Archive:
    """Write ``<store>/<name>-v<version>.mar`` for a registry version (atomically, replacing an old one)."""
    registry, store = Path(registry), Path(store)
    number = resolve_version(registry, name, version)
    version_dir = registry / name / str(number)
    try:
        card = read_card(version_dir)
        verify_files(version_dir, card)
    except PolicyLoadError as e:
        raise ArchiveError(f"policy {name!r} version {number} cannot be archived: {e}") from e
    if card["name"] != name or card["version"] != number:
        raise ArchiveError(
            f"{version_dir / MODEL_CARD_FILE}: says {card['name']!r} version {card['version']}, but it is "
            f"{name!r} version {number} in the registry"
        )
    extra = sorted(set(card["files"]) - {POLICY_FILE})
    if extra:
        raise ArchiveError(
            f"{version_dir}: files beyond {POLICY_FILE} are not served yet: {', '.join(extra)}"
        )
    settings = model_settings or ModelSettings()
    config = settings.model_config(serving or ServingSettings(), {VERSION_KEY: server_version()})

    store.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-v{number}.tmp-", dir=store))
    try:
        (staging / "export").mkdir()
        (staging / "tmp").mkdir()
        shutil.copyfile(handler_source(), staging / HANDLER_FILE)
        (staging / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        cmd = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            name,
            "--version",
            str(number),
            "--serialized-file",
            str(version_dir / POLICY_FILE),
            "--handler",
            str(staging / HANDLER_FILE),
            "--extra-files",
            str(version_dir / MODEL_CARD_FILE),
            "--config-file",
            str(staging / MODEL_CONFIG_FILE),
            "--export-path",
            str(staging / "export"),
            "--archive-format",
            "default",
            "--force",
        ]
        # The archiver stages files in $TMPDIR/<model name> and deletes that directory first: a private
        # TMPDIR keeps two builds of one model name from removing each other's files.
        env = {**os.environ, "TMPDIR": str(staging / "tmp")}
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=_ARCHIVER_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise ArchiveError(
                f"torch-model-archiver took more than {_ARCHIVER_TIMEOUT_S} s for {name} v{number}"
            ) from e
        built = staging / "export" / f"{name}.mar"
        if done.returncode != 0 or not built.is_file():
            tail = (done.stderr or done.stdout).strip()[-2000:]
            raise ArchiveError(f"torch-model-archiver failed for {name} version {number}: {tail}")
        check_archive(built, name, number)
        with open(built, "rb") as f:
            os.fsync(f.fileno())
        target = store / archive_file_name(name, number)
        os.replace(built, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Archive(path=target, name=name, version=number)


def check_archive(path: Path, name: str, version: int) -> dict[str, object]:
    """The archive's manifest, after checking that it holds what serving needs; raises ArchiveError."""
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise ArchiveError(f"{path}: not a readable model archive: {e}") from e
    missing = {POLICY_FILE, MODEL_CARD_FILE, HANDLER_FILE, MODEL_CONFIG_FILE} - names
    model = manifest.get("model", {})
    if missing:
        raise ArchiveError(f"{path}: missing {', '.join(sorted(missing))}")
    if model.get("modelName") != name or model.get("modelVersion") != str(version):
        raise ArchiveError(
            f"{path}: manifest names {model.get('modelName')!r} version {model.get('modelVersion')!r}, "
            f"expected {name!r} version {version}"
        )
    return dict(manifest)
