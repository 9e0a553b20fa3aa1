"""The local traffic split of a canary: a small file beside the server, and the client that follows it.

TorchServe serves the champion (its default version) and the candidate as two versions of one model,
but has no weighted routing. Locally the split is done by the client, not by a router in front of
TorchServe:

- no extra hop and no extra process on a path whose whole budget is the client's deadline (100 ms), and
  nothing new that the champion's traffic depends on: without a split file, or with a broken one, every
  request goes to the default version exactly as with :class:`rlops_server.client.PolicyClient`;
- the client knows the ``episode_id``, so a whole episode stays on one version. Mixing versions inside an
  episode would blur what each version's rewards say, and a product's users expect one behaviour per
  session; hashing ``(rollout id, episode)`` keeps an episode on the candidate as its share grows.

The cost is that only clients built with :class:`SplitClient` take part in a local canary. On Kubernetes
the split is Argo Rollouts' (stable and canary pods behind one Service), and clients do not change.

``rlops rollout start`` writes ``<serve run dir>/canary.json``; :class:`SplitClient` rereads it when it
changes (checked at most every ``refresh_s`` seconds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlops_contracts.durable import replace_atomic
from rlops_server.client import Decision, PolicyClient

log = logging.getLogger(__name__)

SPLIT_FILE = "canary.json"
DEFAULT = "default"
"""Key of :attr:`SplitClient.routed` for requests sent to the server's default version (the champion)."""


@dataclass(frozen=True)
class Split:
    """Send ``share`` of the episodes (or of the decisions without an episode) of ``policy`` to
    ``candidate``; the rest go to the default version, which is ``champion``."""

    policy: str
    champion: int
    candidate: int
    share: float
    rollout: str
    """The rollout's id; it salts the assignment so that each rollout picks its own episodes."""

    def __post_init__(self) -> None:
        if not (isinstance(self.share, int | float) and math.isfinite(self.share) and 0 <= self.share <= 1):
            raise ValueError(f"share must be a fraction in [0, 1], got {self.share!r}")

    def to_candidate(self, key: str) -> bool:
        """Whether the episode or decision ``key`` goes to the candidate (the same answer every time)."""
        digest = hashlib.sha256(f"{self.rollout}\0{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64 < self.share


def split_path(run_dir: Path) -> Path:
    return Path(run_dir) / SPLIT_FILE


def write_split(run_dir: Path, split: Split | None) -> None:
    """Publish ``split`` to the clients (atomically); ``None`` sends everything to the default version."""
    path = split_path(run_dir)
    if split is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {**asdict(split), "updated_at": time.time()}
    replace_atomic(path, json.dumps(body, indent=2) + "\n")


def read_split(run_dir: Path) -> Split | None:
    """The split in force, or None. Raises ValueError naming the file when it is not a split."""
    path = split_path(run_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a canary split file: {e}") from None
    try:
        return Split(
            policy=str(data["policy"]),
            champion=int(data["champion"]),
            candidate=int(data["candidate"]),
            share=float(data["share"]),
            rollout=str(data["rollout"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a canary split file: {e}") from None


class SplitClient(PolicyClient):
    """A :class:`PolicyClient` that takes part in local canaries (see the module docstring).

    It asks the default version unless the split file in ``run_dir`` sends this episode to a candidate.
    :attr:`routed` counts requests by where they were sent (``default`` or the candidate's version),
    :attr:`answered` the decisions each version answered in time (not the client's fallback).
    """

    def __init__(
        self, base_url: str, model: str, *, run_dir: Path, refresh_s: float = 0.5, **kwargs: Any
    ) -> None:
        if "version" in kwargs:
            raise ValueError("a SplitClient asks the default version; the split file chooses the candidate")
        super().__init__(base_url, model, **kwargs)
        self._base_url = base_url
        self._kwargs = kwargs
        self._run_dir = Path(run_dir)
        self._refresh_s = refresh_s
        self._split_lock = threading.Lock()
        self._checked = -math.inf
        self._stamp: tuple[int, int] | None = None
        self._split: Split | None = None
        self._candidates: dict[int, PolicyClient] = {}
        self.routed: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.returned: Counter[str] = Counter()
        """Requests that came back (answered or not), keyed as :attr:`routed`; fewer while some are in
        flight."""
        self._returned_cv = threading.Condition(self._split_lock)

    def current_split(self) -> Split | None:
        """The split in force for this model (the file is rechecked at most every ``refresh_s``)."""
        now = time.monotonic()
        with self._split_lock:
            if now - self._checked >= self._refresh_s:
                self._checked = now
                self._reload()
            split = self._split
        return split if split is not None and split.policy == self.model and split.share > 0 else None

    def _reload(self) -> None:
        path = split_path(self._run_dir)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._stamp, self._split = None, None
            return
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._split = read_split(self._run_dir)
        except ValueError as e:
            # A broken file must never break the champion's traffic: everything goes to the default.
            log.warning("%s; sending every request to the default version", e)
            self._split = None

    def _target(self, key: str) -> tuple[PolicyClient, str]:
        """The client for the episode (or decision) ``key``, and the :attr:`routed` key it counted under."""
        split = self.current_split()
        if split is None or not split.to_candidate(key):
            with self._split_lock:
                self.routed[DEFAULT] += 1
            return self, DEFAULT
        with self._split_lock:
            client = self._candidates.get(split.candidate)
            if client is None:
                client = PolicyClient(self._base_url, self.model, version=split.candidate, **self._kwargs)
                self._candidates[split.candidate] = client
            self.routed[str(split.candidate)] += 1
        return client, str(split.candidate)

    def _returned(self, where: str, n: int) -> None:
        with self._returned_cv:
            self.returned[where] += n
            self._returned_cv.notify_all()

    def settle(self, timeout_s: float = 10.0) -> bool:
        """Wait until every request routed so far has come back, so that :attr:`routed` and
        :attr:`answered` compare (traffic may go on meanwhile); False if some are still in flight after
        ``timeout_s``."""
        with self._returned_cv:
            routed = dict(self.routed)
            return self._returned_cv.wait_for(
                lambda: all(self.returned[k] >= n for k, n in routed.items()), timeout_s
            )

    def act(
        self,
        observation: Sequence[float] | Any,
        *,
        decision_id: str | None = None,
        episode_id: str | None = None,
        step: int | None = None,
        deterministic: bool | None = None,
        action_mask: Sequence[bool | int] | None = None,
    ) -> Decision:
        decision_id = decision_id or uuid.uuid4().hex
        target, where = self._target(episode_id if episode_id is not None else decision_id)
        act = super().act if target is self else target.act
        try:
            decision = act(
                observation,
                decision_id=decision_id,
                episode_id=episode_id,
                step=step,
                deterministic=deterministic,
                action_mask=action_mask,
            )
            self._tally([decision])
        finally:
            self._returned(where, 1)
        return decision

    def _tally(self, decisions: list[Decision]) -> None:
        with self._split_lock:
            self.answered.update(str(d.version) for d in decisions if d.version is not None)

    def act_batch(
        self,
        observations: Sequence[Sequence[float]] | Any,
        *,
        decision_ids: Sequence[str] | None = None,
        episode_ids: Sequence[str | None] | None = None,
        steps: Sequence[int | None] | None = None,
        deterministic: bool | None = None,
    ) -> list[Decision]:
        """Decisions for several observations; each goes where its episode (or decision) is assigned."""
        obs = list(observations)
        n = len(obs)
        ids = list(decision_ids) if decision_ids is not None else [uuid.uuid4().hex for _ in range(n)]
        episodes = list(episode_ids) if episode_ids is not None else [None] * n
        step_list = list(steps) if steps is not None else [None] * n
        if not len(ids) == len(episodes) == len(step_list) == n:
            raise ValueError(f"decision_ids, episode_ids and steps need one entry per observation ({n})")
        groups: dict[str, tuple[PolicyClient, list[int]]] = {}
        for i in range(n):
            episode = episodes[i]
            target, where = self._target(episode if episode is not None else ids[i])
            groups.setdefault(where, (target, []))[1].append(i)
        out: list[Decision | None] = [None] * n
        try:
            for target, rows in groups.values():
                act_batch = super().act_batch if target is self else target.act_batch
                answers = act_batch(
                    [obs[i] for i in rows],
                    decision_ids=[ids[i] for i in rows],
                    episode_ids=[episodes[i] for i in rows] if episode_ids is not None else None,
                    steps=[step_list[i] for i in rows] if steps is not None else None,
                    deterministic=deterministic,
                )
                for i, answer in zip(rows, answers, strict=True):
                    out[i] = answer
                self._tally(answers)
        finally:
            for where, (_, rows) in groups.items():
                self._returned(where, len(rows))
        return [d for d in out if d is not None]

    def stats(self) -> dict[str, Any]:
        """Counters of every version asked, summed, plus ``routed``: requests by where they were sent."""
        total = super().stats()
        fallbacks: Counter[str] = Counter(total["fallbacks"])
        with self._split_lock:
            candidates = list(self._candidates.values())
            routed = dict(self.routed)
            answered = dict(self.answered)
        for client in candidates:
            s = client.stats()
            total["requests"] += s["requests"]
            total["retries"] += s["retries"]
            fallbacks.update(s["fallbacks"])
        total["fallbacks"] = dict(fallbacks)
        total["routed"] = routed
        total["answered"] = answered
        return total

    def close(self) -> None:
        with self._split_lock:
            candidates, self._candidates = list(self._candidates.values()), {}
        for client in candidates:
            client.close()
        super().close()
