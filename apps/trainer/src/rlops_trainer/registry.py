"""The policy registry's write side: publish, promote, rollback and other alias moves.

The layout and every read (versions, aliases, history, verified cards) are the artifact contract's
(:mod:`rlops_contracts.registry`); :class:`Registry` adds the writes, each under the policy's lock:

- a version directory is built under a temporary name and renamed into place once every file is synced,
  so readers never see a half-written version; leftovers of a writer that died are removed by the next
  writer;
- ``aliases.json`` is replaced atomically before its history line is appended;
- promotions and rollbacks live only in the aliases and the history: a published card is never rewritten.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import fcntl
import getpass
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rlops_contracts import CANDIDATE, CHAMPION
from rlops_contracts.artifact import seal, verify_policy_dir
from rlops_contracts.card import ArtifactError
from rlops_contracts.durable import fsync_path, replace_atomic
from rlops_contracts.registry import (
    ALIAS_RE,
    ALIASES_FILE,
    HISTORY_FILE,
    LOCK_FILE,
    TMP_PREFIX,
    VERSION_RE,
    RegistryError,
    RegistryReader,
    check_name,
    parse_ref,
)

from rlops_trainer.card import jsonable, utc_now
from rlops_trainer.export import load_policy_dir

_CHUNK = 1 << 20


def actor() -> str:
    """Who is acting, for the history: ``$RLOPS_ACTOR`` or ``user@host``."""
    if os.environ.get("RLOPS_ACTOR"):
        return os.environ["RLOPS_ACTOR"]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, as in some containers
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _copy_file(src: Path, dst: Path) -> None:
    """Copy bytes to a new file and fsync it."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        for chunk in iter(lambda: fin.read(_CHUNK), b""):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())


def _describe(version: int | None) -> str:
    return "no champion" if version is None else f"version {version}"


class Registry(RegistryReader):
    """Policies under ``root``, each a sequence of immutable versions with aliases; reads and writes."""

    def load(self, name: str, ref: str | int) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
        """The TorchScript policy and card of a version, after checking every file's sha256."""
        path = self.resolve(name, ref)
        try:
            return load_policy_dir(path)
        except ArtifactError as e:
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
        replace_atomic(d / ALIASES_FILE, json.dumps(aliases, indent=2, sort_keys=True) + "\n")
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
            source = verify_policy_dir(src)
        except ArtifactError as e:
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
                for fname in source["files"]:
                    _copy_file(src / fname, tmp / fname)
                self._seal_version(tmp, source, name, version, evaluation, gate, who)
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

    def _seal_version(
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
        try:
            card = seal(tmp, card)
        except ArtifactError as e:
            raise RegistryError(f"model card of {name} version {version}: {e}") from e
        changed = [f for f in card["files"] if card["files"][f] != source["files"][f]]
        if changed:
            raise RegistryError(f"{', '.join(changed)} changed while being copied; publish again")

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
            elif label is not None and label[0] == name and VERSION_RE.match(label[1]):
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


__all__ = ["Registry", "RegistryError", "actor"]
