"""Reading the policy registry: the layout, versions, aliases, history, and verified versions.

The layout, the same on a local folder and on the model volume::

    <root>/<name>/<version>/      a policy directory (rlops_contracts.artifact): versions 1, 2, 3 …, never
                                  modified once in place
    <root>/<name>/aliases.json    {"champion": 3, "candidate": 4}
    <root>/<name>/history.jsonl   one line per alias change: at, who, action, alias, from, to, reason
    <root>/<name>/.lock           held (flock) by every writer of <name>
    <root>/<name>/.tmp-*          a version being written (or left by a writer that died)

Only the trainer writes (``rlops_trainer.registry.Registry`` adds publish, promote and rollback to this
reader); the server and every other reader use :class:`RegistryReader`, which never writes.
"""

from __future__ import annotations

import builtins
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlops_contracts.artifact import verify_policy_dir
from rlops_contracts.card import NAME_RE, ArtifactError, read_card

DEFAULT_REGISTRY = Path(".rlops/registry")
REGISTRY_ENV = "RLOPS_REGISTRY"
ALIASES_FILE = "aliases.json"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"

ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"^[1-9][0-9]*$")


class RegistryError(ArtifactError):
    """A registry lookup or operation that cannot be done; the message says why and what exists instead."""


def default_registry() -> Path:
    """The registry a command uses when none is given: ``$RLOPS_REGISTRY`` or ``.rlops/registry``."""
    return Path(os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY)


@dataclass(frozen=True)
class PolicySummary:
    """One policy of the registry: its versions and where its aliases point."""

    name: str
    versions: list[int]
    aliases: dict[str, int]


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise RegistryError(
            f"invalid policy name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


def parse_ref(ref: str) -> tuple[str, str] | None:
    """``NAME@VERSION`` or ``NAME@ALIAS`` as (name, version or alias); None for anything else."""
    name, sep, tail = ref.partition("@")
    if sep and NAME_RE.match(name) and (VERSION_RE.match(tail) or ALIAS_RE.match(tail)):
        return name, tail
    return None


class RegistryReader:
    """Policies under ``root``, each a sequence of immutable versions with aliases; read only."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def names(self) -> builtins.list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.match(p.name))

    def list(self) -> builtins.list[PolicySummary]:
        """Every policy with its versions and aliases."""
        return [PolicySummary(n, self.versions(n), self.aliases(n)) for n in self.names()]

    def _policy_dir(self, name: str) -> Path:
        if not NAME_RE.match(name):
            check_name(name)
        if not (self.root / name).is_dir():
            known = ", ".join(self.names()) or "none, the registry is empty"
            raise RegistryError(f"unknown policy {name!r} in registry {self.root}; known policies: {known}")
        return self.root / name

    def versions(self, name: str) -> builtins.list[int]:
        """Published versions of ``name``, oldest first."""
        d = self._policy_dir(name)
        return sorted(int(p.name) for p in d.iterdir() if VERSION_RE.match(p.name) and p.is_dir())

    def aliases(self, name: str) -> dict[str, int]:
        """``aliases.json`` of a policy (alias → version); empty when there is none."""
        path = self._policy_dir(name) / ALIASES_FILE
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise self.corrupt(path, f"not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise self.corrupt(path, f"expected an object {{alias: version}}, got {type(data).__name__}")
        for alias, version in data.items():
            if not ALIAS_RE.match(alias) or type(version) is not int or version < 1:
                raise self.corrupt(path, f"entry {alias!r}: {version!r} is not an alias → version number")
        return dict(data)

    @staticmethod
    def corrupt(path: Path, why: str) -> RegistryError:
        return RegistryError(
            f"corrupt aliases file {path}: {why}; {HISTORY_FILE} beside it records every alias change"
        )

    def history(self, name: str) -> builtins.list[dict[str, Any]]:
        """Alias changes of ``name``, oldest first (a last line cut short by a crash is skipped)."""
        path = self._policy_dir(name) / HISTORY_FILE
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8").split("\n")
        events: builtins.list[dict[str, Any]] = []
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as e:
                if i == len(lines):  # no trailing newline: an append cut short by a crash
                    break
                raise RegistryError(f"corrupt history file {path}, line {i}: {e}") from e
            events.append(event)
        return events

    def resolve_version(self, name: str, ref: str | int) -> int:
        """The version number that ``ref`` (a version number or an alias such as ``champion``) names."""
        versions = self.versions(name)
        text = str(ref)
        if VERSION_RE.match(text):
            if int(text) not in versions:
                listed = ", ".join(map(str, versions)) or "none"
                raise RegistryError(f"policy {name!r} has no version {text}; versions: {listed}")
            return int(text)
        aliases = self.aliases(name)
        if text not in aliases:
            listed = ", ".join(f"{a} → {v}" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(
                f"policy {name!r} has no version or alias {text!r}; aliases: {listed}; "
                f"versions: {', '.join(map(str, versions)) or 'none'}"
            )
        if aliases[text] not in versions:
            raise self.corrupt(
                self.root / name / ALIASES_FILE, f"{text} points at missing version {aliases[text]}"
            )
        return aliases[text]

    def resolve(self, name: str, ref: str | int) -> Path:
        """Directory of the version that ``ref`` (a version number or an alias) names."""
        return self.root / name / str(self.resolve_version(name, ref))

    def card(self, name: str, ref: str | int) -> dict[str, Any]:
        """The model card of a version (validated, files not hashed: for listing)."""
        try:
            return read_card(self.resolve(name, ref))
        except RegistryError:
            raise
        except ArtifactError as e:
            raise RegistryError(f"policy {name!r} {ref}: {e}") from e

    def verify(self, name: str, ref: str | int) -> dict[str, Any]:
        """The card of a version after checking every file, the card included, against its sha256, and
        that the card says it is this version of this policy."""
        path = self.resolve(name, ref)
        try:
            card = verify_policy_dir(path)
        except ArtifactError as e:
            raise RegistryError(f"policy {name!r} version {path.name} cannot be trusted: {e}") from e
        if card["name"] != name or card["version"] != int(path.name):
            raise RegistryError(
                f"{path}: its model card says {card['name']!r} version {card['version']}, but it is {name!r} "
                f"version {path.name} in the registry"
            )
        return card


def resolve_policy_ref(ref: str, registry: Path | str | None = None) -> Path:
    """The directory a command-line policy reference names: a directory or ``NAME@VERSION|ALIAS``."""
    path = Path(ref)
    if path.is_dir():
        return path
    parsed = parse_ref(ref)
    if parsed is None:
        raise RegistryError(
            f"policy {ref!r}: not a directory, nor NAME@VERSION or NAME@ALIAS (e.g. cartpole@champion)"
        )
    return RegistryReader(registry if registry is not None else default_registry()).resolve(*parsed)
