"""The policy registry: immutable, numbered versions of policy directories, and aliases that move.

Layout, the same on a local folder and on the model volume::

    <root>/<name>/<version>/      policy.pt, model-card.json (versions 1, 2, 3 …; never modified)
    <root>/<name>/aliases.json    {"champion": 3, "candidate": 4}
    <root>/<name>/history.jsonl   one line per alias change: at, who, action, alias, from, to, reason
    <root>/<name>/.lock           held (flock) by every writer of <name>

A version directory is built under a temporary name and renamed into place once every file is synced,
so readers never see a half-written version; leftovers of a writer that died are removed by the next
writer. ``aliases.json`` is replaced atomically before its history line is appended, and promotions
and rollbacks live only there and in the history: a published card is never rewritten.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import fcntl
import getpass
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rlops_contracts import CANDIDATE, CHAMPION, MODEL_CARD_FILE

from rlops_trainer.card import NAME_RE, CardError, jsonable, sha256_file, utc_now, validate_card
from rlops_trainer.export import (
    PolicyDirError,
    card_bytes,
    fsync_path,
    load_policy_dir,
    read_card,
    replace_file_atomic,
    verify_files,
)

DEFAULT_ROOT = Path(".rlops/registry")
ENV_VAR = "RLOPS_REGISTRY"
ALIASES_FILE = "aliases.json"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"

ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_VERSION_RE = re.compile(r"^[1-9][0-9]*$")
_CHUNK = 1 << 20


class RegistryError(ValueError):
    """A registry operation that cannot be done; the message says why and what exists instead."""


@dataclass(frozen=True)
class PolicySummary:
    """One policy of the registry: its versions and where its aliases point."""

    name: str
    versions: list[int]
    aliases: dict[str, int]


def actor() -> str:
    """Who is acting, for the history: ``$RLOPS_ACTOR`` or ``user@host``."""
    if os.environ.get("RLOPS_ACTOR"):
        return os.environ["RLOPS_ACTOR"]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, as in some containers
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise RegistryError(
            f"invalid policy name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


def _copy_file(src: Path, dst: Path) -> None:
    """Copy bytes to a new file and fsync it."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        for chunk in iter(lambda: fin.read(_CHUNK), b""):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())


def _describe(version: int | None) -> str:
    return "no champion" if version is None else f"version {version}"


class Registry:
    """Policies under ``root``, each a sequence of immutable versions with aliases."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # --- reading -----------------------------------------------------------------------------------

    def names(self) -> builtins.list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.match(p.name))

    def list(self) -> builtins.list[PolicySummary]:
        """Every policy with its versions and aliases."""
        return [PolicySummary(n, self.versions(n), self.aliases(n)) for n in self.names()]

    def _policy_dir(self, name: str) -> Path:
        if not NAME_RE.match(name) or not (self.root / name).is_dir():
            known = ", ".join(self.names()) or "none, the registry is empty"
            raise RegistryError(f"unknown policy {name!r} in registry {self.root}; known policies: {known}")
        return self.root / name

    def versions(self, name: str) -> builtins.list[int]:
        """Published versions of ``name``, oldest first."""
        d = self._policy_dir(name)
        return sorted(int(p.name) for p in d.iterdir() if _VERSION_RE.match(p.name) and p.is_dir())

    def aliases(self, name: str) -> dict[str, int]:
        path = self._policy_dir(name) / ALIASES_FILE
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise self._corrupt(path, f"not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise self._corrupt(path, f"expected an object {{alias: version}}, got {type(data).__name__}")
        for alias, version in data.items():
            if not ALIAS_RE.match(alias) or type(version) is not int or version < 1:
                raise self._corrupt(path, f"entry {alias!r}: {version!r} is not an alias → version number")
        return dict(data)

    @staticmethod
    def _corrupt(path: Path, why: str) -> RegistryError:
        return RegistryError(
            f"corrupt aliases file {path}: {why}; {HISTORY_FILE} beside it records every alias change"
        )

    def history(self, name: str) -> builtins.list[dict[str, Any]]:
        """Alias changes of ``name``, oldest first."""
        path = self._policy_dir(name) / HISTORY_FILE
        if not path.exists():
            return []
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")
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
        """The version number that ``ref`` (a version number or an alias) names."""
        versions = self.versions(name)
        text = str(ref)
        if _VERSION_RE.match(text):
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
            raise self._corrupt(
                self.root / name / ALIASES_FILE, f"{text} points at missing version {aliases[text]}"
            )
        return aliases[text]

    def resolve(self, name: str, ref: str | int) -> Path:
        """Directory of the version that ``ref`` (a version number or an alias) names."""
        return self.root / name / str(self.resolve_version(name, ref))

    def card(self, name: str, ref: str | int) -> dict[str, Any]:
        """The model card of a version (validated against the schema)."""
        try:
            return read_card(self.resolve(name, ref))
        except PolicyDirError as e:
            raise RegistryError(f"policy {name!r} {ref}: {e}") from e

    def verify(self, name: str, ref: str | int) -> dict[str, Any]:
        """The card of a version after checking every file against its sha256."""
        path = self.resolve(name, ref)
        try:
            card = read_card(path)
            verify_files(path, card)
        except PolicyDirError as e:
            raise RegistryError(f"policy {name!r} version {path.name} cannot be trusted: {e}") from e
        return card

    def load(self, name: str, ref: str | int) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
        """The TorchScript policy and card of a version, after checking every file's sha256."""
        path = self.resolve(name, ref)
        try:
            return load_policy_dir(path)
        except PolicyDirError as e:
            raise RegistryError(f"policy {name!r} version {path.name} cannot be loaded: {e}") from e

    # --- writing -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, name: str, *, create: bool = False) -> Iterator[Path]:
        """Hold the writer lock of ``name``; only a publish may create a new policy."""
        if create:
            d = self.root / check_name(name)
            d.mkdir(parents=True, exist_ok=True)
        else:
            d = self._policy_dir(name)
        fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield d
        finally:
            os.close(fd)  # closing releases the lock, as does the death of the process

    @staticmethod
    def _remove_stale(d: Path) -> None:
        # Called with the lock held: a temporary entry now belongs to a writer that died.
        for p in d.iterdir():
            if p.name.startswith(TMP_PREFIX) or (p.name.startswith(".") and ".tmp-" in p.name):
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()

    def _move_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        action: str,
        who: str | None,
        reason: str | None = None,
        forced: bool = False,
    ) -> int | None:
        d = self.root / name
        aliases = self.aliases(name)
        previous = aliases.get(alias)
        aliases[alias] = version
        replace_file_atomic(d / ALIASES_FILE, (json.dumps(aliases, indent=2, sort_keys=True) + "\n").encode())
        event = {
            "at": utc_now(),
            "who": who or actor(),
            "action": action,
            "alias": alias,
            "from": previous,
            "to": version,
            "reason": reason,
            "forced": forced,
        }
        with open(d / HISTORY_FILE, "a+b") as f:
            # A line cut short by a crash would swallow this one: cut it off first (we hold the lock).
            f.seek(0)
            content = f.read()
            if content and not content.endswith(b"\n"):
                f.truncate(content.rfind(b"\n") + 1)
            f.write((json.dumps(event) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        return previous

    def publish(
        self,
        policy_dir: Path,
        name: str,
        evaluation: dict[str, Any] | None = None,
        gate: dict[str, Any] | None = None,
        *,
        who: str | None = None,
    ) -> int:
        """Copy a policy directory in as the next version of ``name`` and point ``candidate`` at it."""
        src = Path(policy_dir)
        check_name(name)
        try:
            card = read_card(src)
            verify_files(src, card)
        except PolicyDirError as e:
            raise RegistryError(f"cannot publish {src}: {e}") from e
        gate = self._normalise_gate(gate, name) if gate is not None else None
        with self._locked(name, create=True) as d:
            self._remove_stale(d)
            self.aliases(name)  # a corrupt aliases file stops the publish before anything is written
            versions = self.versions(name)
            version = versions[-1] + 1 if versions else 1
            tmp = d / f"{TMP_PREFIX}{version}-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                for fname in card["files"]:
                    _copy_file(src / fname, tmp / fname)
                self._write_card(tmp, card, name, version, evaluation, gate, who)
                for p in tmp.iterdir():
                    p.chmod(0o444)
                fsync_path(tmp)
                os.rename(tmp, d / str(version))
                fsync_path(d)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._move_alias(name, CANDIDATE, version, action="publish", who=who)
        return version

    def _write_card(
        self,
        tmp: Path,
        source: dict[str, Any],
        name: str,
        version: int,
        evaluation: dict[str, Any] | None,
        gate: dict[str, Any] | None,
        who: str | None,
    ) -> None:
        card = copy.deepcopy(source)
        now = utc_now()
        card.update(name=name, version=version, evaluation=jsonable(evaluation, "evaluation"), gate=gate)
        if gate is not None:
            card["lineage"].append(
                {
                    "event": "gate",
                    "at": now,
                    "promote": gate["promote"],
                    "incumbent_version": gate["incumbent_version"],
                }
            )
        card["lineage"].append({"event": "published", "at": now, "version": version, "who": who or actor()})
        card["files"] = {fname: sha256_file(tmp / fname) for fname in source["files"]}
        changed = [f for f in card["files"] if card["files"][f] != source["files"][f]]
        if changed:
            raise RegistryError(f"{', '.join(changed)} changed while being copied; publish again")
        try:
            validate_card(card, source=f"model card of {name} version {version}")
        except CardError as e:
            raise RegistryError(str(e)) from e
        (tmp / MODEL_CARD_FILE).write_bytes(card_bytes(card))
        fsync_path(tmp / MODEL_CARD_FILE)

    @staticmethod
    def _normalise_gate(gate: dict[str, Any], name: str) -> dict[str, Any]:
        """The gate decision as the card stores it: promote, incumbent_version, reason, and the rest.

        ``incumbent_version`` is the champion version the candidate was compared with (null: none,
        the behaviour policy was the baseline). A decision of :func:`rlops_trainer.gate.decide` without
        it (missing or null) is accepted when its baseline is the behaviour policy, or an incumbent
        labelled ``NAME@VERSION``.
        """
        gate = dict(jsonable(gate, "gate"))
        if not isinstance(gate.get("promote"), bool):
            raise RegistryError(
                f"gate decision: 'promote' must be true or false, got {gate.get('promote')!r}"
            )
        # A null version next to an incumbent baseline says nothing: the label must tell.
        unresolved = gate.get("incumbent_version") is None and gate.get("baseline") == "incumbent"
        if "incumbent_version" not in gate or unresolved:
            label = parse_ref(str(gate.get("baseline_label", "")))
            if gate.get("baseline") == "behavior":
                gate["incumbent_version"] = None
            elif label is not None and label[0] == name and _VERSION_RE.match(label[1]):
                gate["incumbent_version"] = int(label[1])
            else:
                raise RegistryError(
                    "gate decision: 'incumbent_version' is missing: the version of "
                    f"{name!r} the candidate was compared with, or null when the baseline was the behaviour "
                    f"policy (baseline: {gate.get('baseline')!r}, label: {gate.get('baseline_label')!r})"
                )
        incumbent = gate["incumbent_version"]
        if incumbent is not None and (type(incumbent) is not int or incumbent < 1):
            raise RegistryError(
                f"gate decision: 'incumbent_version' must be a version number or null, got {incumbent!r}"
            )
        if not isinstance(gate.setdefault("reason", ""), str):
            raise RegistryError(f"gate decision: 'reason' must be text, got {gate['reason']!r}")
        return gate

    def set_alias(
        self, name: str, alias: str, version: str | int, *, reason: str | None = None, who: str | None = None
    ) -> int | None:
        """Point ``alias`` at a version; returns the version it pointed at before. Not for ``champion``."""
        if alias == CHAMPION:
            raise RegistryError(f"'{CHAMPION}' moves only through promote (gated) and rollback")
        if not ALIAS_RE.match(alias):
            raise RegistryError(f"invalid alias {alias!r}: use lowercase letters, digits, '_' or '-'")
        with self._locked(name):
            v = self.resolve_version(name, version)
            return self._move_alias(name, alias, v, action="set_alias", reason=reason, who=who)

    def gate_problem(self, name: str, version: int) -> str | None:
        """Why the gate does not allow promoting ``version`` now, or None when it does."""
        gate = self.card(name, version)["gate"]
        champion = self.aliases(name).get(CHAMPION)
        if gate is None:
            return "it has no gate decision (publish it with an evaluation report)"
        if not gate["promote"]:
            return f"the gate rejected it: {gate.get('reason') or 'no reason recorded'}"
        if gate["incumbent_version"] != champion:
            return (
                f"the gate compared it with {_describe(gate['incumbent_version'])}, but the champion is now "
                f"{_describe(champion)}; evaluate it against the current champion and publish it again"
            )
        return None

    def promote(
        self,
        name: str,
        version: str | int,
        *,
        require_gate: bool = True,
        force_reason: str | None = None,
        who: str | None = None,
    ) -> int | None:
        """Make a version the champion; returns the previous champion.

        The version's gate decision must say promote, against the current champion. With
        ``require_gate=False`` a failing gate is overridden, which needs ``force_reason`` and is
        recorded as forced in the history.
        """
        with self._locked(name):
            v = self.resolve_version(name, version)
            current = self.aliases(name).get(CHAMPION)
            if current == v:
                raise RegistryError(f"policy {name!r} version {v} is already the champion")
            self.verify(name, v)
            problem = self.gate_problem(name, v)
            if problem and require_gate:
                raise RegistryError(
                    f"cannot promote {name} version {v}: {problem} (or force it with a reason)"
                )
            if problem and not (force_reason and force_reason.strip()):
                raise RegistryError(f"promoting {name} version {v} past the gate needs a reason: {problem}")
            reason = force_reason if problem else (force_reason or self.card(name, v)["gate"].get("reason"))
            return self._move_alias(
                name, CHAMPION, v, action="promote", reason=reason, forced=problem is not None, who=who
            )

    def champion_stack(self, name: str) -> builtins.list[int]:
        """Champions in the order they took over, with rolled-back ones removed (the last is current)."""
        stack: builtins.list[int] = []
        for event in self.history(name):
            if event.get("alias") != CHAMPION:
                continue
            if event.get("action") == "rollback":
                if stack:
                    stack.pop()
            else:
                stack.append(int(event["to"]))
        return stack

    def rollback(self, name: str, reason: str, *, who: str | None = None) -> int:
        """Point ``champion`` back at the previous champion; returns that version."""
        if not reason.strip():
            raise RegistryError("a rollback needs a reason (it is recorded in the history)")
        with self._locked(name):
            current = self.aliases(name).get(CHAMPION)
            if current is None:
                raise RegistryError(f"policy {name!r} has no champion to roll back")
            stack = self.champion_stack(name)
            # The current champion may be missing on top if its history line was lost in a crash.
            while stack and stack[-1] == current:
                stack.pop()
            if not stack:
                raise RegistryError(
                    f"policy {name!r} has no previous champion to roll back to (champion is {current})"
                )
            target = stack[-1]
            self.verify(name, target)
            self._move_alias(name, CHAMPION, target, action="rollback", reason=reason, who=who)
            return target


def parse_ref(ref: str) -> tuple[str, str] | None:
    """``NAME@VERSION`` or ``NAME@ALIAS`` as (name, version or alias); None for anything else."""
    name, sep, tail = ref.partition("@")
    if sep and NAME_RE.match(name) and (_VERSION_RE.match(tail) or ALIAS_RE.match(tail)):
        return name, tail
    return None


def resolve_policy_ref(ref: str, registry: Path | str = DEFAULT_ROOT) -> Path:
    """The directory a command-line policy reference names: a directory or ``NAME@VERSION|ALIAS``."""
    path = Path(ref)
    if path.is_dir():
        return path
    parsed = parse_ref(ref)
    if parsed is None:
        raise RegistryError(
            f"policy {ref!r}: not a directory, nor NAME@VERSION or NAME@ALIAS (e.g. cartpole@champion)"
        )
    return Registry(registry).resolve(*parsed)
