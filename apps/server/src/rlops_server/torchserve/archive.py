"""Build a TorchServe model archive (.mar) from a policy version in the registry.

The archive holds ``policy.pt``, ``model-card.json`` and ``SHA256SUMS`` as they are in the registry (every
file, the card included, is checked against its sha256 before packing and again by the handler when a
worker starts, so a byte changed in the registry or in the archive stops the version), the handler
module (``rlops_server/torchserve/handler.py``), and ``model-config.yaml`` with TorchServe's per-model
settings and the handler's settings. Archive name and version are the policy's name and registry
version, so two versions of one policy load side by side as two versions of one TorchServe model.

The rest of ``rlops_server`` is not packed: the worker runs in the Python environment TorchServe was
started from, where ``rlops_server`` and its dependencies (torch, numpy, jsonschema) are installed
anyway. Packing the package as extra files would put a second copy of ``rlops_server`` on the worker's
path that could silently differ from the installed one; instead the archive records the version of
``rlops-server`` that built it and the handler refuses to start under another.

The registry is read through the artifact contract's reader (:mod:`rlops_contracts.registry`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from rlops_contracts import MODEL_CARD_FILE, POLICY_FILE
from rlops_contracts.artifact import CHECKSUMS_FILE
from rlops_contracts.card import ArtifactError
from rlops_contracts.durable import fsync_path
from rlops_contracts.registry import RegistryReader

from rlops_server.settings import ServingSettings
from rlops_server.torchserve.config import ModelSettings

HANDLER_FILE = "handler.py"
MODEL_CONFIG_FILE = "model-config.yaml"
VERSION_KEY = "rlops_server_version"
"""Key of the handler section that records which rlops-server built the archive."""

_ARCHIVER_TIMEOUT_S = 300


class ArchiveError(RuntimeError):
    """An archive that cannot be built; the message names the policy, version or file."""


@dataclass(frozen=True)
class Archive:
    path: Path
    name: str
    version: int


def server_version() -> str:
    """Version of the installed rlops-server distribution."""
    return importlib.metadata.version("rlops-server")


def archive_file_name(name: str, version: int) -> str:
    return f"{name}-v{version}.mar"


# --- building --------------------------------------------------------------------------------------


def handler_source() -> Path:
    spec = importlib.util.find_spec("rlops_server.torchserve.handler")
    if spec is None or spec.origin is None:
        raise ArchiveError("rlops_server.torchserve.handler is not importable; is rlops-server installed?")
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
    store = Path(store)
    reader = RegistryReader(registry)
    try:
        number = reader.resolve_version(name, version)
        card = reader.verify(name, number)
    except ArtifactError as e:
        raise ArchiveError(f"policy {name!r} version {version} cannot be archived: {e}") from e
    version_dir = reader.resolve(name, number)
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
            f"{version_dir / MODEL_CARD_FILE},{version_dir / CHECKSUMS_FILE}",
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
        fsync_path(built)
        target = store / archive_file_name(name, number)
        os.replace(built, target)
        fsync_path(store)
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
    missing = {POLICY_FILE, MODEL_CARD_FILE, CHECKSUMS_FILE, HANDLER_FILE, MODEL_CONFIG_FILE} - names
    model = manifest.get("model", {})
    if missing:
        raise ArchiveError(f"{path}: missing {', '.join(sorted(missing))}")
    if model.get("modelName") != name or model.get("modelVersion") != str(version):
        raise ArchiveError(
            f"{path}: manifest names {model.get('modelName')!r} version {model.get('modelVersion')!r}, "
            f"expected {name!r} version {version}"
        )
    return dict(manifest)
