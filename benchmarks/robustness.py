"""Robustness benchmark: how rlops' serving, reward service and registry behave when things go wrong.

    .venv/bin/python benchmarks/robustness.py --quick                      # plumbing check, ~10 minutes
    nice -n 10 .venv/bin/python benchmarks/robustness.py --parts 1,2,3,4   # everything but the soak
    nice -n 10 .venv/bin/python benchmarks/robustness.py --parts 5         # the soak, 30 minutes

It trains a small CartPole-v1 policy through the ``rlops`` CLI in a temporary registry (as
``benchmarks/serving.py`` does), serves it with ``rlops serve start`` (TorchServe, rlops' handler,
decision log on, one worker as shipped) and runs the reward service with ``rlops feedback serve``.
Every server gets its own run directory and free ports. The parts, each a section of the report:

1. Fuzzing. Seeded malformed requests over raw sockets (so that malformed HTTP can be sent too) to
   ``/predictions/<name>``: garbage bytes, broken JSON, wrong shapes and types, NaN/Infinity/1e400
   literals, deep nesting, bodies at and just above every size limit of the server (TorchServe's
   ``max_request_size``, read from the run directory's config.properties, and the handler's
   ``max_batch_observations``), wrong methods, content types, tokens, model names and version paths;
   then to the reward service's ``POST /rewards`` (also huge bodies at its limit, missing or wrong bearer
   tokens). Every 10th request is a good one, checked against the greedy action the version's
   ``policy.pt`` computes here with torch.jit (and its ``version`` field). Counted per category: answers
   per status, 5xx, hangs (no answer within ``--hang-timeout``), answers outside what the case expects;
   TorchServe worker pids are watched throughout and the server's logs read afterwards. After a clean
   stop, every decision answered must be in the decision log and every reward accepted in the reward log.
2. Worker SIGKILL under load. 8 ``rlops_server.client.PolicyClient`` clients at a fixed rate (its
   deadline, retries and fallback as shipped); halfway, one TorchServe worker process is SIGKILLed. An
   answer by the client's fallback (or the server's) counts as a failed request. Time to recover: from the
   kill to the first answer from a fresh worker, and until TorchServe reports every worker READY again.
3. Whole server killed and restarted, under the same load with the decision log on, three ways:
   ``rlops serve stop``, SIGTERM and SIGKILL to the server's process group (frontend and workers);
   then ``rlops serve start`` again on the same ports and, after a clean stop, every decision a client
   got an answer for is looked up in the decision log; every log line must parse as a decision record.
4. Registry crash safety. ``rlops registry publish`` and ``rlops registry promote`` as subprocesses,
   SIGKILLed at seeded random points (half after a random delay, half a random few milliseconds after
   the first temporary file of a write appears); after every kill ``rlops registry list``, aliases.json
   and history.jsonl, ``PolicyRuntime.load`` (what the TorchServe handler runs) of every version,
   ``rlops serve archive`` of every version not archived before, and a next publish.
5. Soak. 4 clients at a fixed rate well below capacity for ``--soak-minutes``; the resident memory of
   TorchServe's frontend and each worker sampled every few seconds (psutil); first minute against the
   last, and the latency of the first minute against the last.

Writes ``results.json`` and ``results.md`` to ``benchmarks/results/robustness/`` (``--out``). A run of
some parts keeps the other parts' earlier results there (each part records its own command and time).
Nothing here changes how a server behaves: what goes wrong is reported, not worked around.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import psutil
import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rlops_contracts import DECISION_FIELDS, REWARD_FIELDS
from rlops_server import feedback as fb
from rlops_server.client import PolicyClient
from rlops_server.decision_log import SUFFIX, TMP_SUFFIX
from rlops_server.join import check_decision, check_reward
from rlops_server.requests import MAX_ID_LENGTH
from rlops_server.runtime import PolicyLoadError, PolicyRuntime
from rlops_server.settings import ServingSettings
from rlops_server.torchserve.config import PROPERTIES_FILE, read_properties
from rlops_server.torchserve.process import inference_token, read_keys
from rlops_trainer.registry import Registry, RegistryError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine_info
import serving as S  # the policy, the rlops server and its helpers, shared with the serving benchmark

DEFAULT_OUT = S.BENCH / "results" / "robustness"
RLOPS = S.RLOPS
RESULTS_SCHEMA = "rlops-robustness/2"

TS_DEFAULT_MAX_REQUEST_SIZE = 6_553_500
"""TorchServe 0.12's ``max_request_size`` when config.properties does not set it (its ConfigManager)."""
NETTY_MAX_INITIAL_LINE = 4096
NETTY_MAX_HEADER_SIZE = 8192
"""Netty's HttpServerCodec defaults, which TorchServe's frontend keeps: request line and header block."""

PARTS = {1: "fuzz", 2: "worker_kill", 3: "restart", 4: "registry", 5: "soak"}
TITLES = {
    "fuzz": "1. Fuzzing",
    "worker_kill": "2. Worker SIGKILL under load",
    "restart": "3. Whole server killed and restarted",
    "registry": "4. Registry crash safety",
    "soak": "5. Soak",
}
GOOD_EVERY = 10
KILL_CLIENTS = 8
SOAK_CLIENTS = 4
RESTART_MODES = ("serve-stop", "sigterm", "sigkill")

# Targets (the task that asked for this benchmark).
TARGET_KILL_FAILURE_RATE = 0.001
TARGET_RSS_GROWTH = 0.10

console = Console(stderr=True)
app = typer.Typer(
    add_completion=False, help=__doc__, rich_markup_mode=None, pretty_exceptions_show_locals=False
)


class BenchError(S.BenchError):
    """A step of the benchmark could not be done (not a finding: the measurement itself failed)."""


# --- settings -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    quick: bool
    seed: int
    fuzz_requests: int
    reward_requests: int
    huge_repeats: int
    fuzz_threads: int
    hang_timeout_s: float
    client_timeout_s: float
    kill_rate: float
    """Requests per second per client in parts 2 and 3."""
    kill_seconds: float
    restart_before_s: float
    restart_after_s: float
    registry_kills: int
    soak_minutes: float
    soak_rate: float
    soak_warmup_s: float
    sample_seconds: float
    workers: int
    """TorchServe workers per policy version (1 as shipped)."""


# --- raw HTTP -------------------------------------------------------------------------------------------


@dataclass
class Reply:
    """What came back for one raw request."""

    outcome: str
    """answered (at least one complete response), closed (no response, the server closed the connection),
    reset, hang (nothing complete within the timeout), refused (no connection)."""
    statuses: list[int]
    body: bytes
    """Body of the first response."""
    seconds: float

    @property
    def status(self) -> int | None:
        return self.statuses[0] if self.statuses else None

    @property
    def key(self) -> str:
        """The status, the statuses in order (several responses on one connection), or the outcome."""
        return ",".join(map(str, self.statuses)) if self.statuses else self.outcome


def _responses(buf: bytes | bytearray, eof: bool, head: bool) -> list[tuple[int, bytes]]:
    """The complete HTTP responses at the start of ``buf`` (1xx interim responses skipped)."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while True:
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            return out
        lines = buf[pos:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            return out
        status = int(parts[1])
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        start = end + 4
        if 100 <= status < 200:
            pos = start
            continue
        if head or status in (204, 304):
            out.append((status, b""))
            pos = start
        elif headers.get("content-length", "").isdigit():
            stop = start + int(headers["content-length"])
            if len(buf) < stop:
                return out
            out.append((status, bytes(buf[start:stop])))
            pos = stop
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body, cursor = bytearray(), start
            while True:
                line_end = buf.find(b"\r\n", cursor)
                if line_end < 0:
                    return out
                try:
                    size = int(buf[cursor:line_end].split(b";")[0], 16)
                except ValueError:
                    return out
                cursor = line_end + 2
                if size == 0:
                    trailer = buf.find(b"\r\n", cursor)
                    if trailer < 0:
                        return out
                    cursor = trailer + 2
                    break
                if len(buf) < cursor + size + 2:
                    return out
                body += buf[cursor : cursor + size]
                cursor += size + 2
            out.append((status, bytes(body)))
            pos = cursor
        elif eof:
            out.append((status, bytes(buf[start:])))
            return out
        else:
            return out


def exchange(
    port: int,
    data: bytes,
    timeout: float,
    *,
    half_close: bool = False,
    responses: int = 1,
    head: bool = False,
) -> Reply:
    """Send ``data`` on a new connection to 127.0.0.1:``port`` and read up to ``responses`` answers.

    ``half_close`` shuts the sending side once everything is sent (for requests that end early on
    purpose: the server sees the end of the stream instead of waiting for bytes that never come).
    """
    start = time.monotonic()
    deadline = start + timeout
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        return Reply("refused", [], b"", time.monotonic() - start)
    buf = bytearray()
    eof = reset = False
    found: list[tuple[int, bytes]] = []
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if data:
                sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except TimeoutError:
            pass  # the server stopped reading; whatever it answered is read below
        except OSError:
            pass  # it closed the connection while the body was on its way (e.g. after a 413)
        while len(found) < responses:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                break
            except OSError:
                reset = True
                break
            if not chunk:
                eof = True
            else:
                buf += chunk
            found = _responses(buf, eof, head)
            if eof:
                break
    seconds = time.monotonic() - start
    if found:
        return Reply("answered", [s for s, _ in found], found[0][1], seconds)
    return Reply("reset" if reset else "closed" if eof else "hang", [], b"", seconds)


def http_bytes(
    method: str,
    path: str,
    body: bytes | None,
    *,
    host: str | None,
    token: str | None,
    content_type: str | None = "application/json",
    length: bool = True,
    close: bool = True,
    version: str = "HTTP/1.1",
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """One HTTP/1.1 request as bytes; the head is Latin-1, so any byte can be put into a path or header."""
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None and content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if body is not None and length:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chunked(body: bytes, size: int = 1 << 16) -> bytes:
    parts = [
        f"{len(body[i : i + size]):x}\r\n".encode() + body[i : i + size] + b"\r\n"
        for i in range(0, len(body), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# --- the policy, computed here ------------------------------------------------------------------------


class Oracle:
    """The served version's ``policy.pt``, loaded with torch.jit: the greedy action of any observation."""

    def __init__(self, version_dir: Path) -> None:
        self.module = torch.jit.load(str(version_dir / "policy.pt"), map_location="cpu").eval()

    def greedy(self, observations: Sequence[Sequence[float]]) -> list[int]:
        with torch.inference_mode():
            scores = self.module(torch.tensor(observations, dtype=torch.float32))
        return [int(a) for a in scores.argmax(dim=1).tolist()]


@dataclass
class Served:
    """What the benchmark serves and how to check answers."""

    work: Path
    registry: Path
    name: str
    version: int
    version_dir: Path
    card: dict[str, Any]
    oracle: Oracle
    pool: list[list[float]]
    """Observations over the range of the training data, rounded to 6 decimals (exact in JSON)."""
    actions: list[int]
    """The oracle's greedy action for each of ``pool``."""


# --- fuzz cases -----------------------------------------------------------------------------------------

ANY = "any"
"""Any answer or a closed connection; only 5xx and hangs are failures."""
REFUSED = "4xx"
REFUSED_OR_CLOSED = "4xx/closed"
ANSWERED = "2xx"
RF, RC, AN = REFUSED, REFUSED_OR_CLOSED, ANSWERED


@dataclass
class Case:
    category: str
    variant: str
    expect: str
    build: Callable[[], bytes]
    half_close: bool = False
    responses: int = 1
    head: bool = False
    actions: list[int] | None = None
    """Greedy actions a decision answered 2xx must carry (None: the body holds no checkable request)."""
    batch: bool = False
    ids: list[str] | None = None
    """decision_ids (inference) or reward ids (rewards) of the request, when it is valid."""
    good: bool = False


@dataclass
class Target:
    """Where a fuzzer sends its requests."""

    port: int
    path: str
    token: str
    other_tokens: dict[str, str]
    max_request_size: int

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


def _const(data: bytes) -> Callable[[], bytes]:
    return lambda: data


class Fuzzer:
    """What the two fuzzers share: the seeded generator, the target and the case plan."""

    CATEGORIES: tuple[str, ...] = ()

    def __init__(self, target: Target, rng: random.Random) -> None:
        self.t, self.rng = target, rng

    def request(
        self,
        body: bytes | None,
        *,
        method: str = "POST",
        path: str | None = None,
        token: str | bool | None = True,
        **kw: Any,
    ) -> bytes:
        """A request to the target; ``token``: True for the right one, None or False for none."""
        tok = self.t.token if token is True else (token or None)
        return http_bytes(method, path or self.t.path, body, host=self.t.host, token=tok, **kw)

    def post(self, body: bytes, **kw: Any) -> Callable[[], bytes]:
        return _const(self.request(body, **kw))

    def head(self, extra: Sequence[tuple[str, str]]) -> bytes:
        """The head of a POST whose body-framing headers (Content-Length, chunked) are ``extra``."""
        return http_bytes(
            "POST",
            self.t.path,
            None,
            host=self.t.host,
            token=self.t.token,
            headers=[("Content-Type", "application/json"), *extra],
        )

    def sized(self, payload: bytes) -> bytes:
        return self.head([("Content-Length", str(len(payload)))]) + payload

    def good(self) -> Case:
        raise NotImplementedError

    def huge_bodies(self, repeats: int) -> list[Case]:
        raise NotImplementedError

    def cases(self, n: int, huge_repeats: int) -> list[Case]:
        """``n`` cases: every 10th good, the huge bodies spread evenly, the other categories round-robin
        in a seeded order (each round shuffled)."""
        huge = self.huge_bodies(huge_repeats)
        slots = [i for i in range(n) if i % GOOD_EVERY != GOOD_EVERY - 1]
        huge_at = set(slots[:: max(1, len(slots) // max(1, len(huge)))][: len(huge)])
        huge_iter = iter(huge)
        order: list[str] = []
        out: list[Case] = []
        for i in range(n):
            if i % GOOD_EVERY == GOOD_EVERY - 1:
                out.append(self.good())
            elif i in huge_at:
                out.append(next(huge_iter))
            else:
                if not order:
                    order = list(self.CATEGORIES)
                    self.rng.shuffle(order)
                out.append(getattr(self, order.pop())())
        return out


class InferenceFuzzer(Fuzzer):
    """Seeded requests to ``/predictions/<name>``: every 10th good, the rest malformed."""

    CATEGORIES = (
        "garbage_bytes", "bad_json", "wrong_shape", "wrong_types", "non_finite", "deep_nesting",
        "http_method", "content_type", "malformed_http", "auth", "unknown_model", "unknown_version",
    )  # fmt: skip

    def __init__(self, served: Served, target: Target, rng: random.Random, max_batch: int) -> None:
        super().__init__(target, rng)
        self.s, self.max_batch = served, max_batch

    def obs(self) -> tuple[list[float], int]:
        """An observation of the pool and the policy's greedy action for it."""
        i = self.rng.randrange(len(self.s.pool))
        return self.s.pool[i], self.s.actions[i]

    def valid(self) -> tuple[bytes, list[int]]:
        """A valid deterministic request body and the action its answer must carry."""
        o, a = self.obs()
        return _json({"observation": o, "deterministic": True}), [a]

    def fresh_id(self) -> str:
        return f"fz-{uuid.UUID(int=self.rng.getrandbits(128)).hex}"

    def good(self) -> Case:
        kind = self.rng.choice(("single", "single at the version path", "single with ids", "batch"))
        if kind == "batch":
            picks = [self.obs() for _ in range(self.rng.randint(2, 32))]
            ids = [self.fresh_id() for _ in picks]
            body = {"observations": [o for o, _ in picks], "decision_ids": ids, "deterministic": True}
            return Case(
                "good",
                f"batch of {len(picks)}",
                AN,
                self.post(_json(body)),
                actions=[a for _, a in picks],
                batch=True,
                ids=ids,
                good=True,
            )
        o, a = self.obs()
        single: dict[str, Any] = {"observation": o, "deterministic": True}
        one_id: list[str] | None = None
        if kind == "single with ids":
            one_id = [self.fresh_id()]
            single |= {
                "decision_id": one_id[0],
                "episode_id": "fuzz",
                "step": self.rng.randint(0, 500),
                "return": ["probabilities", "scores"],
            }
        path = f"{self.t.path}/{self.s.version}" if kind == "single at the version path" else None
        return Case("good", kind, AN, self.post(_json(single), path=path), actions=[a], ids=one_id, good=True)

    def garbage_bytes(self) -> Case:
        rng = self.rng
        n = rng.choice((1, 2, 16, 100, 1000, 4000))
        o, greedy = self.obs()
        a = [greedy]
        text = json.dumps({"observation": o, "deterministic": True})
        variants: list[tuple[str, bytes, str, list[int] | None]] = [
            (f"{n} random bytes", rng.randbytes(n), RF, None),
            (f"a JSON prefix and {n} random bytes", b'{"observation": [' + rng.randbytes(n), RF, None),
            (f"{n} NUL bytes", b"\x00" * n, RF, None),
            ("invalid UTF-8 in a string", b'{"observation":[0,0,0,0],"decision_id":"\xff\xfe"}', RF, None),
            ("UTF-16 with a byte-order mark", text.encode("utf-16"), ANY, a),
            ("UTF-8 byte-order mark before valid JSON", b"\xef\xbb\xbf" + text.encode(), ANY, a),
            ("only whitespace", b" \r\n\t" * rng.randint(1, 100), RF, None),
        ]
        name, raw, expect, actions = rng.choice(variants)
        return Case("garbage_bytes", name, expect, self.post(raw), actions=actions)

    def bad_json(self) -> Case:
        rng = self.rng
        o, greedy = self.obs()
        a = [greedy]
        text = json.dumps({"observation": o, "deterministic": True}, separators=(",", ":"))
        nums = ",".join(map(str, o))
        rest = nums.split(",", 1)[1]
        cut, pos = rng.randrange(1, len(text)), rng.randrange(len(text))
        obs = '{"observation":[' + nums + "]"
        variants: list[tuple[str, str, str, list[int] | None]] = [
            ("truncated", text[:cut], RF, None),
            ("a character deleted", text[:pos] + text[pos + 1 :], ANY, None),
            ("a random character inserted", text[:pos] + chr(rng.randrange(32, 127)) + text[pos:], ANY, None),
            ("trailing comma", '{"observation":[' + nums + ",]}", RF, None),
            ("single quotes", "{'observation':[" + nums + "]}", RF, None),
            ("unquoted keys", "{observation:[" + nums + "]}", RF, None),
            ("a comment", obs + " /* x */}", RF, None),
            ("Python literal True", obs + ',"deterministic":True}', RF, None),
            ("garbage after the object", text + " x", RF, None),
            ("two objects", text + text, RF, None),
            ("hex number", '{"observation":[0x1,' + rest + "]}", RF, None),
            ("leading zero", '{"observation":[01,' + rest + "]}", RF, None),
            ("unterminated string", obs + ',"decision_id":"abc}', RF, None),
            ("raw newline in a string", obs + ',"decision_id":"a\nb"}', RF, None),
            ("key twice (the last wins in JSON)", '{"observation":[9,9,9,9],' + text[1:], ANY, a),
            ("lone surrogate in decision_id", obs + ',"deterministic":true,"decision_id":"\\ud800"}', ANY, a),
        ]
        name, raw, expect, actions = rng.choice(variants)
        return Case("bad_json", name, expect, self.post(raw.encode()), actions=actions)

    def wrong_shape(self) -> Case:
        d = len(self.s.pool[0])
        o, _ = self.obs()
        over = self.max_batch + 1
        variants: list[tuple[str, Any]] = [
            ("an array", [o]), ("a string", "observation"), ("a number", 1), ("null", None), ("true", True),
            ("an empty object", {}), ("no observation field", {"obs": o}),
            ("Observation capitalised", {"Observation": o}), ("empty observation", {"observation": []}),
            (f"observation of {d - 1} numbers", {"observation": o[:-1]}),
            (f"observation of {d + 1} numbers", {"observation": [*o, 0.0]}),
            ("observation of 10,000 numbers", {"observation": [0.0] * 10_000}),
            ("observation nested one level", {"observation": [o]}),
            ("observation as an object", {"observation": {str(i): v for i, v in enumerate(o)}}),
            ("ragged batch", {"observations": [o, o[:-1]]}), ("empty batch", {"observations": []}),
            ("batch of numbers", {"observations": o}), ("batch of empty lists", {"observations": [[], []]}),
            ("both observation and observations", {"observation": o, "observations": [o]}),
            ("unknown field", {"observation": o, "extra": 1}),
            ("action_mask and action_masks",
             {"observations": [o], "action_mask": [1, 1], "action_masks": [[1, 1]]}),
            ("decision_ids of the wrong length", {"observations": [o, o], "decision_ids": ["a"]}),
            ("steps of the wrong length", {"observations": [o, o], "steps": [1, 2, 3]}),
            ("action_masks of the wrong length", {"observations": [o, o], "action_masks": [[1, 1]]}),
            (f"batch of {over} observations (over the limit)", {"observations": [o] * over}),
        ]  # fmt: skip
        name, body = self.rng.choice(variants)
        return Case("wrong_shape", name, RF, self.post(_json(body)))

    def wrong_types(self) -> Case:
        o, _ = self.obs()
        long_id = "x" * (MAX_ID_LENGTH + 1)
        fields: list[tuple[str, dict[str, Any]]] = [
            ("observation of strings", {"observation": [str(v) for v in o]}),
            ("observation of booleans", {"observation": [True] * len(o)}),
            ("observation of nulls", {"observation": [None] * len(o)}),
            ("observation of objects", {"observation": [{}] * len(o)}),
            ("observation with a 400-digit integer", {"observation": [10**400, *o[1:]]}),
            ("observation is a string", {"observation": "0,0,0,0"}),
            ("temperature as a string", {"temperature": "0.5"}), ("temperature true", {"temperature": True}),
            ("temperature 11 (above 10)", {"temperature": 11}), ("temperature -1", {"temperature": -1}),
            ("temperature a 400-digit integer", {"temperature": 10**400}),
            ("epsilon a 400-digit integer", {"epsilon": -(10**400)}),
            ("epsilon 2", {"epsilon": 2}), ("epsilon null", {"epsilon": None}),
            ("deterministic as a string", {"deterministic": "true"}),
            ("deterministic 1", {"deterministic": 1}),
            ("deterministic with temperature", {"deterministic": True, "temperature": 1}),
            ("return as a string", {"return": "probabilities"}),
            ("return unknown option", {"return": ["logits"]}),
            ("return of numbers", {"return": [1]}), ("decision_id a number", {"decision_id": 5}),
            ("decision_id empty", {"decision_id": ""}), ("decision_id a list", {"decision_id": ["a"]}),
            (f"decision_id of {MAX_ID_LENGTH + 1} characters", {"decision_id": long_id}),
            ("episode_id a float", {"episode_id": 1.5}), ("episode_id true", {"episode_id": True}),
            ("step -1", {"step": -1}), ("step 1.5", {"step": 1.5}), ("step as a string", {"step": "3"}),
            ("step of 30 digits (answered or refused)", {"step": 10**30}),
            ("action_mask too short", {"action_mask": [1]}), ("action_mask of 2s", {"action_mask": [2, 0]}),
            ("action_mask allows nothing", {"action_mask": [0, 0]}),
            ("action_mask as a string", {"action_mask": "11"}),
            ("action_mask nested", {"action_mask": [[1, 1]]}),
            ("decision_ids a string", {"observations": [o], "decision_ids": "a"}),
        ]  # fmt: skip
        name, extra = self.rng.choice(fields)
        body = extra if "observations" in extra else {"observation": o, **extra}
        return Case("wrong_types", name, ANY if "answered or refused" in name else RF, self.post(_json(body)))

    def non_finite(self) -> Case:
        rng = self.rng
        o, _ = self.obs()
        lit = rng.choice(("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "3.5e38", "-3.5e38"))
        i = rng.randrange(len(o))
        plain = ",".join(map(str, o))
        cells = [lit if j == i else str(v) for j, v in enumerate(o)]
        tiny_cells = ["1e-400" if j == i else str(v) for j, v in enumerate(o)]
        tiny = [0.0 if j == i else v for j, v in enumerate(o)]
        obs = '{"observation":[' + plain + "]"
        variants: list[tuple[str, str, str, list[int] | None]] = [
            (f"{lit} in observation", '{"observation":[' + ",".join(cells) + "]}", RF, None),
            (f"{lit} in a batch", '{"observations":[[' + plain + "],[" + ",".join(cells) + "]]}", RF, None),
            (f"{lit} as temperature", obs + ',"temperature":' + lit + "}", RF, None),
            (f"{lit} as epsilon", obs + ',"epsilon":' + lit + "}", RF, None),
            (f"{lit} as step", obs + ',"step":' + lit + "}", RF, None),
            (f"{lit} as decision_id", obs + ',"decision_id":' + lit + "}", RF, None),
            ("nan in lower case (not JSON)", '{"observation":[nan,' + plain.split(",", 1)[1] + "]}", RF,
             None),
            ("1e-400 (rounds to 0)", '{"observation":[' + ",".join(tiny_cells) + '],"deterministic":true}',
             AN,
             self.s.oracle.greedy([tiny])),
        ]  # fmt: skip
        name, raw, expect, actions = rng.choice(variants)
        return Case("non_finite", name, expect, self.post(raw.encode()), actions=actions)

    def deep_nesting(self) -> Case:
        d = self.rng.choice((50, 500, 990, 1000, 1001, 5000, 50_000, 500_000))
        o, _ = self.obs()
        obs = b'{"observation":[' + ",".join(map(str, o)).encode() + b"]"
        payloads: list[tuple[str, Callable[[], bytes]]] = [
            (f"array nested {d} deep", lambda: b"[" * d + b"]" * d),
            (f"observation nested {d} deep", lambda: b'{"observation":' + b"[" * d + b"1" + b"]" * d + b"}"),
            (f"decision_id an object nested {d} deep",
             lambda: obs + b',"decision_id":' + b'{"a":' * d + b"1" + b"}" * d + b"}"),
            (f"unknown field nested {d} deep", lambda: obs + b',"x":' + b"[" * d + b"]" * d + b"}"),
            (f"{d} opening brackets, never closed", lambda: b"[" * d),
        ]  # fmt: skip
        name, make = self.rng.choice(payloads)
        return Case("deep_nesting", name, RF, lambda: self.request(make()))

    def huge_bodies(self, repeats: int) -> list[Case]:
        """Bodies at and just above each size limit, built when sent (megabytes each)."""
        limit, k = self.t.max_request_size, self.max_batch
        valid, actions = self.valid()
        o, _ = self.obs()
        obs = b'{"observation":[' + ",".join(map(str, o)).encode() + b"]"
        picks = [self.obs() for _ in range(k)]
        half = (limit - 60) // 2

        def padded(n: int) -> bytes:
            return self.head([("Content-Length", str(n))]) + valid + b" " * (n - len(valid))

        def padded_chunked() -> bytes:
            return self.head([("Transfer-Encoding", "chunked")]) + chunked(
                valid + b" " * (limit + 1 - len(valid))
            )

        def batch(n: int) -> bytes:
            rows = [p for p, _ in picks] + [picks[0][0]] * (n - len(picks))
            return self.sized(_json({"observations": rows, "deterministic": True}))

        variants: list[tuple[str, str, Callable[[], bytes], dict[str, Any]]] = [
            (f"valid, padded to max_request_size ({limit:,} bytes)", AN, lambda: padded(limit),
             {"actions": actions}),
            (f"valid, padded to max_request_size + 1 ({limit + 1:,} bytes)", RC, lambda: padded(limit + 1),
             {}),
            ("valid, padded to max_request_size + 1, chunked", RC, padded_chunked, {}),
            ("Content-Length 10^12, then the sender stops", RC,
             lambda: self.head([("Content-Length", str(10**12))]) + valid, {"half_close": True}),
            (f"batch of max_batch_observations ({k}) observations", AN, lambda: batch(k),
             {"actions": [a for _, a in picks], "batch": True}),
            (f"batch of max_batch_observations + 1 ({k + 1})", RF, lambda: batch(k + 1), {}),
            ("decision_id: a list of zeros, just under max_request_size", RF,
             lambda: self.sized(b'{"observation":[0,0,0,0],"decision_id":[' + b"0," * half + b"0]}"), {}),
            ("unknown field named by 'é' × half of max_request_size", RF,
             lambda: self.sized(obs + b',"' + "é".encode() * half + b'":1}'), {}),
            ("decision_id: a string just under max_request_size", RF,
             lambda: self.sized(obs + b',"decision_id":"' + b"a" * (limit - 100) + b'"}'), {}),
            ("observation of numbers, just under max_request_size", RF,
             lambda: self.sized(b'{"observation":[' + b"0," * half + b"0]}"), {}),
            ("max_request_size bytes of '['", RF, lambda: self.sized(b"[" * limit), {}),
            ("return: unknown options, just under max_request_size", RF,
             lambda: self.sized(obs + b',"return":[' + b'"x",' * ((limit - 100) // 4) + b'"x"]}'), {}),
            ("max_request_size random bytes", RF,
             lambda: self.sized(random.Random(limit).randbytes(limit)), {}),
        ]  # fmt: skip
        return [Case("huge_body", name, expect, build, **extra)
                for _ in range(repeats) for name, expect, build, extra in variants]  # fmt: skip

    def http_method(self) -> Case:
        valid, a = self.valid()
        method = self.rng.choice(
            (
                "GET",
                "HEAD",
                "OPTIONS",
                "DELETE",
                "PATCH",
                "PUT",
                "TRACE",
                "CONNECT",
                "FOO",
                "post",
                "GET+body",
            )
        )
        with_body = method in ("PATCH", "PUT", "DELETE", "post", "FOO", "GET+body")
        data = self.request(valid if with_body else None, method=method.removesuffix("+body"))
        return Case("http_method", method.replace("+", " with a "), ANY, _const(data), head=method == "HEAD",
                    actions=a if with_body else None)  # fmt: skip

    def content_type(self) -> Case:
        o, greedy = self.obs()
        a = [greedy]
        body = {"observation": o, "deterministic": True}
        ct = self.rng.choice(
            ("text/plain", "application/octet-stream", None, "application/x-www-form-urlencoded",
             "multipart/form-data", "multipart/form-data; boundary=xyz", "image/png", "",
             "application/json; charset=utf-16", "APPLICATION/JSON", "application/json; charset=latin-1")
        )  # fmt: skip
        raw = json.dumps(body).encode("utf-16") if ct == "application/json; charset=utf-16" else _json(body)
        name = f"Content-Type {ct!r}" if ct is not None else "no Content-Type"
        return Case("content_type", name, ANY, self.post(raw, content_type=ct), actions=a)

    def malformed_http(self) -> Case:
        t = self.t
        raw, a = self.valid()
        std = (f"Host: {t.host}\r\nAuthorization: Bearer {t.token}\r\nContent-Type: application/json\r\n"
               "Connection: close\r\n")  # fmt: skip
        line_pad = NETTY_MAX_INITIAL_LINE - len(f"POST {t.path}?q= HTTP/1.1")

        def head(first: str, headers: str = "", version: str = "HTTP/1.1") -> bytes:
            return f"{first} {version}\r\n{std}{headers}\r\n".encode("latin-1")

        post = f"POST {t.path}"
        length = f"Content-Length: {len(raw)}\r\n"
        close = {"half_close": True}
        good = {"actions": a}
        variants: list[tuple[str, str, Callable[[], bytes], dict[str, Any]]] = [
            ("garbage request line", RC, lambda: b"GARBAGE\r\n\r\n", close),
            ("request line without a path", RC, lambda: b"POST\r\n\r\n", close),
            ("HTTP/9.9", ANY, lambda: head(post, length, "HTTP/9.9") + raw, {}),
            ("HTTP/0.9 style request", ANY, lambda: b"GET /ping\r\n", close),
            ("LF line endings", ANY, lambda: self.request(raw).replace(b"\r\n", b"\n"), good),
            ("header without a colon", ANY, lambda: head(post, "Nonsense\r\n" + length) + raw, {}),
            ("NUL in a header value", ANY, lambda: head(post, "X-A: a\x00b\r\n" + length) + raw, {}),
            ("Content-Length: abc", RC, lambda: head(post, "Content-Length: abc\r\n") + raw, close),
            ("Content-Length: -1", RC, lambda: head(post, "Content-Length: -1\r\n") + raw, close),
            ("two different Content-Length headers", ANY,
             lambda: head(post, length + "Content-Length: 3\r\n") + raw, close),
            ("Content-Length shorter than the body", ANY,
             lambda: head(post, "Content-Length: 10\r\n") + raw, {}),
            ("Content-Length longer than the body, then the sender stops", RC,
             lambda: head(post, f"Content-Length: {len(raw) + 100}\r\n") + raw, close),
            ("chunked with a bad chunk size", RC,
             lambda: head(post, "Transfer-Encoding: chunked\r\n") + b"zz\r\n" + raw + b"\r\n0\r\n\r\n",
             close),
            ("chunked without the last chunk, then the sender stops", RC,
             lambda: head(post, "Transfer-Encoding: chunked\r\n") + f"{len(raw):x}\r\n".encode() + raw
             + b"\r\n",
             close),
            ("chunked and Content-Length both", ANY,
             lambda: head(post, "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n") + chunked(raw), close),
            (f"request line of {NETTY_MAX_INITIAL_LINE} bytes", ANY,
             lambda: self.request(raw, path=f"{t.path}?q={'a' * line_pad}"), good),
            (f"request line of {NETTY_MAX_INITIAL_LINE + 1} bytes", RC,
             lambda: self.request(raw, path=f"{t.path}?q={'a' * (line_pad + 1)}"), {}),
            ("header block just under 8 KiB", ANY,
             lambda: self.request(raw, headers=[("X-Pad", "a" * (NETTY_MAX_HEADER_SIZE - 300))]), good),
            ("header block over 8 KiB", RC,
             lambda: self.request(raw, headers=[("X-Pad", "a" * (NETTY_MAX_HEADER_SIZE + 1))]), {}),
            ("1,000 small headers", ANY,
             lambda: self.request(raw, headers=[(f"X-{i}", "1") for i in range(1000)]),
             {}),
            ("absolute-form URI", ANY, lambda: self.request(raw, path=f"http://{t.host}{t.path}"), good),
            ("NUL in the path", RC, lambda: self.request(raw, path=t.path + "\x00x"), {}),
            ("non-ASCII bytes in the path", RC, lambda: self.request(raw, path=t.path + "\xe9\xff"), {}),
            ("bad percent-encoding in the path", RC, lambda: self.request(raw, path=t.path + "%zz"), {}),
            ("only CRLF, then the sender stops", RC, lambda: b"\r\n\r\n", close),
            ("connect and send nothing", RC, lambda: b"", close),
            ("pipelined: a good request, then garbage (the first answer is the good one's)", AN,
             lambda: self.request(raw, close=False) + b"GARBAGE\r\n\r\n",
             {"responses": 2, "half_close": True, "actions": a}),
            ("HTTP/1.0 without Host", ANY,
             lambda: http_bytes("POST", t.path, raw, host=None, token=t.token, version="HTTP/1.0"), good),
            ("HTTP/1.1 without Host", ANY,
             lambda: http_bytes("POST", t.path, raw, host=None, token=t.token), good),
            ("Expect: 100-continue", ANY,
             lambda: self.request(raw, headers=[("Expect", "100-continue")]), good),
            ("folded header line", ANY, lambda: head(post, "X-A: a\r\n  continued\r\n" + length) + raw, {}),
            ("space before a header colon", ANY,
             lambda: self.request(raw, content_type=None, headers=[("Content-Type ", "application/json")]),
             {}),
        ]  # fmt: skip
        name, expect, build, extra = self.rng.choice(variants)
        return Case("malformed_http", name, expect, build, **extra)

    def auth(self) -> Case:
        t = self.t
        raw, a = self.valid()
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
        wrong = "".join(self.rng.choice(letters) for _ in range(len(t.token)))

        def auth(*values: str, path: str | None = None) -> Callable[[], bytes]:
            return self.post(raw, token=None, path=path, headers=[("Authorization", v) for v in values])

        variants: list[tuple[str, str, Callable[[], bytes]]] = [
            ("no token", RF, auth()), ("wrong token", RF, auth(f"Bearer {wrong}")),
            ("empty bearer token", RF, auth("Bearer ")), ("'Bearer' alone", RF, auth("Bearer")),
            ("token with a suffix", RF, auth(f"Bearer {t.token}x")),
            ("token cut short", RF, auth(f"Bearer {t.token[:-1]}")),
            ("a 10 KB token", RC, auth("Bearer " + "a" * 10_000)),
            ("token in the query string only", RF, auth(path=f"{t.path}?token={t.token}")),
            ("Basic scheme with the token", ANY, auth(f"Basic {t.token}")),
            ("lower-case 'bearer'", ANY, auth(f"bearer {t.token}")),
            ("token without a scheme", ANY, auth(t.token)),
            ("token with trailing spaces", ANY, auth(f"Bearer {t.token}  ")),
            ("two headers: wrong, then right", ANY, auth(f"Bearer {wrong}", f"Bearer {t.token}")),
            ("two headers: right, then wrong", ANY, auth(f"Bearer {t.token}", f"Bearer {wrong}")),
        ]  # fmt: skip
        for kind, key in sorted(t.other_tokens.items()):
            variants.append((f"the {kind} key instead of the inference key", RF, auth(f"Bearer {key}")))
        name, expect, build = self.rng.choice(variants)
        return Case("auth", name, expect, build, actions=a)

    def unknown_model(self) -> Case:
        raw, a = self.valid()
        n = self.s.name
        paths: list[tuple[str, str]] = [
            ("/predictions/nosuchmodel", RF), (f"/predictions/{n.upper()}", RF), (f"/predictions/{n}x", RF),
            ("/predictions/", RF), ("/predictions", RF), ("/predictions//", RF), (f"/predictions/{n}/", ANY),
            (f"/predictions/%{ord(n[0]):02X}{n[1:]}", ANY), (f"/predictions/{n}?x=1", ANY),
            (f"/predictions/../predictions/{n}", ANY), (f"/v1/models/{n}:predict", ANY),
            (f"/v2/models/{n}/infer", ANY), (f"/explanations/{n}", ANY), ("/models", RF), ("/metrics", RF),
            ("/", ANY), ("/" + "a" * 2000, RF), ("/predictions/" + "n" * 1000, RF),
        ]  # fmt: skip
        path, expect = self.rng.choice(paths)
        return Case("unknown_model", path[:80], expect, self.post(raw, path=path), actions=a)

    def unknown_version(self) -> Case:
        raw, a = self.valid()
        v = self.s.version
        versions: list[tuple[str, str]] = [
            (str(v + 1), RF), ("0", RF), ("-1", RF), ("9" * 30, RF), ("abc", RF), (f"{v}.0", ANY),
            (f"0{v}", ANY), ("champion", RF), ("candidate", RF), ("%00", RF), ("%20", RF), ("1" * 2000, RF),
            (f"{v}/extra", RF), (f"{v}%2F..", RF),
        ]  # fmt: skip
        version, expect = self.rng.choice(versions)
        return Case("unknown_version", f"{self.t.path}/{version[:40]}", expect,
                    self.post(raw, path=f"{self.t.path}/{version}"), actions=a)  # fmt: skip


class RewardFuzzer(Fuzzer):
    """Seeded requests to the reward service's ``POST /rewards``: every 10th good, the rest malformed."""

    CATEGORIES = (
        "garbage_bytes", "bad_json", "wrong_types", "missing_fields", "non_finite", "deep_nesting", "auth",
        "http_method", "content_type", "malformed_http", "unknown_path",
    )  # fmt: skip

    def reward(self) -> dict[str, Any]:
        r: dict[str, Any] = {"decision_id": f"rw-{uuid.UUID(int=self.rng.getrandbits(128)).hex}",
                             "reward": round(self.rng.uniform(-1, 1), 4)}  # fmt: skip
        if self.rng.random() < 0.3:
            r |= {
                "terminated": True,
                "next_observation": [round(self.rng.uniform(-1, 1), 4) for _ in range(4)],
            }
        if self.rng.random() < 0.3:
            r |= {"policy": "cartpole", "version": 1}
        return r

    def good(self) -> Case:
        rs = [self.reward() for _ in range(1 if self.rng.random() < 0.5 else self.rng.randint(2, 50))]
        body = rs[0] if len(rs) == 1 else {"rewards": rs}
        return Case("good", f"{len(rs)} reward(s)", AN, self.post(_json(body)),
                    ids=[r["decision_id"] for r in rs], good=True)  # fmt: skip

    def garbage_bytes(self) -> Case:
        n = self.rng.choice((1, 16, 1000, 4000))
        return Case("garbage_bytes", f"{n} random bytes", RF, self.post(self.rng.randbytes(n)))

    def bad_json(self) -> Case:
        text = json.dumps(self.reward())
        variants = [
            ("truncated", text[: self.rng.randrange(1, len(text))]),
            ("single quotes", text.replace('"', "'")),
            ("trailing comma", text[:-1] + ",}"), ("two objects", text + text), ("empty body", ""),
        ]  # fmt: skip
        if self.rng.random() < 0.1:
            # Valid JSON (a lone surrogate escape) that no UTF-8 file can hold.
            return Case("bad_json", "lone surrogate in decision_id", ANY,
                        self.post(b'{"decision_id":"\\ud800x","reward":1}'), ids=["\ud800x"])  # fmt: skip
        name, raw = self.rng.choice(variants)
        return Case("bad_json", name, RF, self.post(raw.encode()))

    def wrong_types(self) -> Case:
        r = self.reward()
        variants: list[tuple[str, Any]] = [
            ("reward as a string", r | {"reward": "1"}), ("reward true", r | {"reward": True}),
            ("reward null", r | {"reward": None}), ("reward a list", r | {"reward": [1]}),
            ("decision_id a number", r | {"decision_id": 5}), ("decision_id empty", r | {"decision_id": ""}),
            ("decision_id of 201 characters", r | {"decision_id": "x" * 201}),
            ("decision_id null", r | {"decision_id": None}),
            ("terminated as a string", r | {"terminated": "yes"}),
            ("truncated 1", r | {"truncated": 1}),
            ("terminated and truncated", r | {"terminated": True, "truncated": True}),
            ("next_observation a string", r | {"next_observation": "x"}),
            ("next_observation empty", r | {"next_observation": []}),
            ("next_observation with a string", r | {"next_observation": [1, "a"]}),
            ("next_observation an object", r | {"next_observation": {}}),
            ("policy with a space", r | {"policy": "bad name"}), ("policy a number", r | {"policy": 5}),
            ("version 0", r | {"version": 0}), ("version true", r | {"version": True}),
            ("version 1.5", r | {"version": 1.5}), ("a reward is a list", {"rewards": [[1, 2]]}),
            ("version of 30 digits (accepted or refused)", r | {"version": 10**30}),
            ("reward a 400-digit integer", r | {"reward": 10**400}),
            ("next_observation with a 400-digit integer", r | {"next_observation": [0.5, -(10**400)]}),
            ("rewards a string", {"rewards": "x"}),
            ("one bad reward of ten", {"rewards": [self.reward() for _ in range(9)] + [r | {"reward": "x"}]}),
        ]  # fmt: skip
        name, body = self.rng.choice(variants)
        if "accepted or refused" in name:
            return Case("wrong_types", name, ANY, self.post(_json(body)), ids=[body["decision_id"]])
        return Case("wrong_types", name, RF, self.post(_json(body)))

    def missing_fields(self) -> Case:
        r = self.reward()
        variants: list[tuple[str, Any]] = [
            ("empty object", {}), ("no decision_id", {"reward": 1}), ("no reward", {"decision_id": "d"}),
            ("empty rewards list", {"rewards": []}), ("rewards: [{}]", {"rewards": [{}]}),
            ("rewards an object", {"rewards": {}}), ("rewards null", {"rewards": None}),
            ("unknown top-level key beside rewards", {"rewards": [r], "x": 1}),
            ("unknown field in a reward", r | {"extra": 1}), ("a JSON array", [r]),
            ("a JSON string", "reward"),
            ("null", None),
        ]  # fmt: skip
        name, body = self.rng.choice(variants)
        return Case("missing_fields", name, RF, self.post(_json(body)))

    def non_finite(self) -> Case:
        rid = self.reward()["decision_id"]
        lit = self.rng.choice(("NaN", "Infinity", "-Infinity", "1e400", "-1e400"))
        head = f'{{"decision_id":"{rid}","reward":'
        variants: list[tuple[str, str, str, list[str] | None]] = [
            (f"reward {lit}", head + lit + "}", RF, None),
            (f"{lit} in next_observation", head + '1,"next_observation":[0,' + lit + "]}", RF, None),
            ("reward 1e308 (finite)", head + "1e308}", AN, [rid]),
            ("reward 5e-324 (finite)", head + "5e-324}", AN, [rid]),
            ("reward 1e-400 (rounds to 0)", head + "1e-400}", AN, [rid]),
        ]
        name, raw, expect, ids = self.rng.choice(variants)
        return Case("non_finite", name, expect, self.post(raw.encode()), ids=ids)

    def deep_nesting(self) -> Case:
        d = self.rng.choice((50, 500, 1000, 5000, 100_000))
        rid = self.reward()["decision_id"].encode()
        variants: list[tuple[str, bytes]] = [
            (f"array nested {d} deep", b"[" * d + b"]" * d),
            (
                f"reward nested {d} deep",
                b'{"decision_id":"' + rid + b'","reward":' + b"[" * d + b"]" * d + b"}",
            ),
            (f"rewards nested {d} deep", b'{"rewards":' + b"[" * d + b"]" * d + b"}"),
            (f"object nested {d} deep", b'{"a":' * d + b"1" + b"}" * d),
        ]
        name, raw = self.rng.choice(variants)
        return Case("deep_nesting", name, RF, self.post(raw))

    def huge_bodies(self, repeats: int) -> list[Case]:
        limit, most, longest = self.t.max_request_size, fb.MAX_REWARDS_PER_REQUEST, fb.MAX_OBSERVATION_LENGTH
        one = self.reward()
        valid = _json(one)
        many = [self.reward() for _ in range(most + 1)]

        def padded(n: int, chunks: bool = False) -> bytes:
            payload = valid + b" " * (n - len(valid))
            if chunks:
                return self.head([("Transfer-Encoding", "chunked")]) + chunked(payload)
            return self.head([("Content-Length", str(n))]) + payload

        def long_obs(n: int) -> bytes:
            return self.sized(
                _json({"decision_id": one["decision_id"], "reward": 1, "next_observation": [0.5] * n})
            )

        def echoed() -> bytes:
            ids = ",".join(["0"] * ((limit - 2000) // 40))
            return self.sized(
                ('{"rewards":[' + ",".join(['{"decision_id":[' + ids + '],"reward":1}'] * 20) + "]}").encode()
            )

        variants: list[tuple[str, str, Callable[[], bytes], dict[str, Any]]] = [
            (f"valid, padded to the body limit ({limit:,} bytes)", AN, lambda: padded(limit),
             {"ids": [one["decision_id"]]}),
            (f"valid, padded to the body limit + 1 ({limit + 1:,} bytes)", RC, lambda: padded(limit + 1), {}),
            ("valid, padded to the body limit + 1, chunked", RC, lambda: padded(limit + 1, chunks=True), {}),
            ("Content-Length 10^12, then the sender stops", RC,
             lambda: self.head([("Content-Length", str(10**12))]) + valid, {"half_close": True}),
            (f"{most:,} rewards (the limit)", AN, lambda: self.sized(_json({"rewards": many[:most]})),
             {"ids": [r["decision_id"] for r in many[:most]]}),
            (f"{most + 1:,} rewards", RF, lambda: self.sized(_json({"rewards": many})), {}),
            (f"next_observation of {longest:,} numbers (the limit)", AN, lambda: long_obs(longest),
             {"ids": [one["decision_id"]]}),
            (f"next_observation of {longest + 1:,} numbers", RF, lambda: long_obs(longest + 1), {}),
            ("20 rewards whose decision_id is a long list (the errors show them)", RF, echoed, {}),
        ]  # fmt: skip
        return [Case("huge_body", name, expect, build, **extra)
                for _ in range(repeats) for name, expect, build, extra in variants]  # fmt: skip

    def auth(self) -> Case:
        t = self.t
        raw = _json(self.reward())

        def auth(*values: str) -> Callable[[], bytes]:
            return self.post(raw, token=None, headers=[("Authorization", v) for v in values])

        variants: list[tuple[str, str, Callable[[], bytes]]] = [
            ("no token", RF, auth()), ("wrong token", RF, auth("Bearer wrong")),
            ("empty bearer token", RF, auth("Bearer ")),
            ("token with a suffix", RF, auth(f"Bearer {t.token}x")),
            ("token cut short", RF, auth(f"Bearer {t.token[:-1]}")),
            ("Basic scheme with the token", RF, auth(f"Basic {t.token}")),
            ("token without a scheme", RF, auth(t.token)),
            ("lower-case 'bearer'", ANY, auth(f"bearer {t.token}")),
            ("two headers: wrong, then right", ANY, auth("Bearer wrong", f"Bearer {t.token}")),
            ("a 100 KB token", RC, auth("Bearer " + "a" * 100_000)),
        ]  # fmt: skip
        name, expect, build = self.rng.choice(variants)
        return Case("auth", name, expect, build)

    def http_method(self) -> Case:
        method = self.rng.choice(("GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"))
        body = _json(self.reward()) if method in ("PUT", "PATCH", "DELETE", "FOO") else None
        return Case(
            "http_method", method, RF, _const(self.request(body, method=method)), head=method == "HEAD"
        )

    def content_type(self) -> Case:
        r = self.reward()
        ct = self.rng.choice(("text/plain", None, "application/x-www-form-urlencoded", "multipart/form-data"))
        name = f"Content-Type {ct!r}" if ct else "no Content-Type"
        return Case("content_type", name, ANY, self.post(_json(r), content_type=ct), ids=[r["decision_id"]])

    def malformed_http(self) -> Case:
        t = self.t
        raw = _json(self.reward())
        std = (f"POST {t.path} HTTP/1.1\r\nHost: {t.host}\r\nAuthorization: Bearer {t.token}\r\n"
               "Content-Type: application/json\r\nConnection: close\r\n")  # fmt: skip
        close = {"half_close": True}
        variants: list[tuple[str, str, Callable[[], bytes], dict[str, Any]]] = [
            ("garbage request line", RC, lambda: b"GARBAGE\r\n\r\n", close),
            ("Content-Length: abc", RC, lambda: (std + "Content-Length: abc\r\n\r\n").encode() + raw, close),
            ("Content-Length longer than the body, then the sender stops", RC,
             lambda: (std + f"Content-Length: {len(raw) + 50}\r\n\r\n").encode() + raw, close),
            ("chunked with a bad chunk size", RC,
             lambda: (std + "Transfer-Encoding: chunked\r\n\r\nzz\r\n").encode() + raw, close),
            ("header block of 100 KB", RC, lambda: self.request(raw, headers=[("X-Pad", "a" * 100_000)]), {}),
            ("NUL in the path", RC, lambda: self.request(raw, path=t.path + "\x00"), {}),
            ("connect and send nothing", RC, lambda: b"", close),
            ("HTTP/1.0 without Host", ANY,
             lambda: http_bytes("POST", t.path, raw, host=None, token=t.token, version="HTTP/1.0"), {}),
        ]  # fmt: skip
        name, expect, build, extra = self.rng.choice(variants)
        return Case("malformed_http", name, expect, build, **extra)

    def unknown_path(self) -> Case:
        r = self.reward()
        paths = (("/reward", RF), ("/rewards/", ANY), ("/REWARDS", RF), ("/rewards?x=1", ANY),
                 ("/healthz", RF), ("/metrics", RF), ("/", RF), ("/" + "a" * 5000, RC))  # fmt: skip
        path, expect = self.rng.choice(paths)
        ids = [r["decision_id"]] if expect == ANY else None
        return Case("unknown_path", path[:60], expect, self.post(_json(r), path=path), ids=ids)


# --- judging and counting -------------------------------------------------------------------------------


def _meets(expect: str, reply: Reply) -> bool:
    s = reply.status
    if expect == ANSWERED:
        return s is not None and 200 <= s < 300
    if expect == REFUSED:
        return s is not None and 400 <= s < 500
    if expect == REFUSED_OR_CLOSED:
        return (s is not None and 400 <= s < 500) or reply.outcome in ("closed", "reset")
    return reply.outcome in ("answered", "closed", "reset") and not any(x >= 500 for x in reply.statuses)


def check_decisions(case: Case, reply: Reply, served: Served) -> tuple[str | None, list[str]]:
    """(what is wrong with a 2xx decision answer or None, the decision ids it carries)."""
    if reply.status is None or not 200 <= reply.status < 300:
        return None, []
    try:
        answer = json.loads(reply.body)
    except ValueError:
        return ("not JSON" if case.good else None), []
    if isinstance(answer, dict) and "decisions" in answer:
        items = answer["decisions"]
    elif isinstance(answer, dict) and "action" in answer:
        items = [answer]
    else:
        return ("not a decision" if case.good else None), []
    ids = (
        [str(it.get("decision_id")) for it in items if isinstance(it, dict)]
        if isinstance(items, list)
        else []
    )
    if case.actions is None:
        return None, ids  # nothing to check the answer against
    if not isinstance(items, list) or len(items) != len(case.actions):
        return f"{len(items) if isinstance(items, list) else '?'} decisions for {len(case.actions)}", ids
    for i, (item, want) in enumerate(zip(items, case.actions, strict=True)):
        if not isinstance(item, dict):
            return f"decision {i} is not an object", ids
        problems = []
        if item.get("action") != want:
            problems.append(f"action {item.get('action')!r}, the policy gives {want}")
        if item.get("version") != served.version or item.get("policy") != served.name:
            problems.append(f"policy {item.get('policy')!r} version {item.get('version')!r}")
        if item.get("fallback") is not False or item.get("propensity") != 1.0:
            problems.append(f"fallback {item.get('fallback')!r}, propensity {item.get('propensity')!r}")
        if case.ids is not None and item.get("decision_id") != case.ids[i]:
            problems.append(f"decision_id {item.get('decision_id')!r}, sent {case.ids[i]!r}")
        if problems:
            return f"decision {i}: " + "; ".join(problems), ids
    return None, ids


def check_rewards(case: Case, reply: Reply) -> tuple[str | None, int]:
    """(what is wrong with a 2xx reward answer or None, the number of rewards it says it accepted)."""
    if reply.status is None or not 200 <= reply.status < 300:
        return None, 0
    try:
        answer = json.loads(reply.body)
    except ValueError:
        return "not JSON", 0
    accepted = answer.get("accepted") if isinstance(answer, dict) else None
    if not isinstance(accepted, int):
        return f"answer {reply.body[:100]!r}", 0
    if case.ids is not None and accepted != len(case.ids):
        return f"accepted {accepted} of {len(case.ids)}", accepted
    return None, accepted


@dataclass
class Tally:
    """Counts of one fuzz run, per category."""

    statuses: dict[str, Counter[str]] = field(default_factory=dict)
    unexpected: Counter[str] = field(default_factory=Counter)
    server_errors: Counter[str] = field(default_factory=Counter)
    hangs: Counter[str] = field(default_factory=Counter)
    slowest: dict[str, float] = field(default_factory=dict)
    largest: dict[str, int] = field(default_factory=dict)
    largest_variant: dict[str, str] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    good: Counter[str] = field(default_factory=Counter)
    wrong_examples: list[dict[str, Any]] = field(default_factory=list)
    variants: dict[str, dict[str, Counter[str]]] = field(default_factory=dict)

    def add(self, case: Case, reply: Reply, wrong: str | None) -> None:
        cat = case.category
        self.statuses.setdefault(cat, Counter())[reply.key] += 1
        self.variants.setdefault(cat, {}).setdefault(case.variant, Counter())[reply.key] += 1
        self.slowest[cat] = max(self.slowest.get(cat, 0.0), reply.seconds)
        if len(reply.body) >= self.largest.get(cat, 0):
            self.largest[cat], self.largest_variant[cat] = len(reply.body), case.variant
        met = _meets(case.expect, reply)
        fivexx = any(s >= 500 for s in reply.statuses)
        hang = reply.outcome == "hang"
        if not met:
            self.unexpected[cat] += 1
        if fivexx:
            self.server_errors[cat] += 1
        if hang:
            self.hangs[cat] += 1
        if case.good:
            self.good["sent"] += 1
            if not met:
                self.good["not answered 2xx"] += 1
            elif wrong:
                self.good["wrong"] += 1
            else:
                self.good["correct"] += 1
        elif wrong:
            self.good["wrong answers to other requests"] += 1
        if wrong and len(self.wrong_examples) < 10:
            self.wrong_examples.append({"category": cat, "variant": case.variant, "problem": wrong})
        if (not met or fivexx or hang or wrong) and len(self.examples.setdefault(cat, [])) < 6:
            self.examples[cat].append(
                {
                    "variant": case.variant,
                    "expected": case.expect,
                    "got": reply.key,
                    "seconds": round(reply.seconds, 3),
                    "body": reply.body[:240].decode("utf-8", errors="replace"),
                    **({"wrong": wrong} if wrong else {}),
                }
            )

    def to_json(self) -> dict[str, Any]:
        cats = sorted(self.statuses)
        return {
            "categories": {
                c: {
                    "requests": sum(self.statuses[c].values()),
                    "statuses": dict(sorted(self.statuses[c].items())),
                    "unexpected": self.unexpected[c],
                    "server_errors": self.server_errors[c],
                    "hangs": self.hangs[c],
                    "slowest_s": round(self.slowest[c], 3),
                    "largest_answer_bytes": self.largest[c],
                    "largest_answer_to": self.largest_variant[c],
                    "examples": self.examples.get(c, []),
                    "variants": {v: dict(n) for v, n in sorted(self.variants[c].items())},
                }
                for c in cats
            },
            "requests": sum(sum(v.values()) for v in self.statuses.values()),
            "server_errors": sum(self.server_errors.values()),
            "hangs": sum(self.hangs.values()),
            "unexpected": sum(self.unexpected.values()),
            "good": dict(self.good),
            "wrong_examples": self.wrong_examples,
        }


def run_cases(
    cases: list[Case],
    port: int,
    settings: Settings,
    judge: Callable[[Case, Reply], str | None],
    progress: Progress,
    label: str,
) -> Tally:
    tally = Tally()
    task = progress.add_task(label, total=len(cases))

    def one(case: Case) -> tuple[Case, Reply]:
        data = case.build()
        return case, exchange(
            port,
            data,
            settings.hang_timeout_s,
            half_close=case.half_close,
            responses=case.responses,
            head=case.head,
        )

    with ThreadPoolExecutor(max_workers=settings.fuzz_threads) as pool:
        for case, reply in pool.map(one, cases):
            tally.add(case, reply, judge(case, reply))
            progress.advance(task)
    return tally


# --- the server: processes and logs ---------------------------------------------------------------------


def worker_pids(frontend_pid: int) -> list[int]:
    return sorted(p.pid for p in S._tree(frontend_pid) if S._is_worker(p))


class WorkerWatch:
    """Samples the worker pids of a TorchServe every 0.2 s: every worker seen, and which are gone."""

    def __init__(self, frontend_pid: int) -> None:
        self.frontend_pid = frontend_pid
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in worker_pids(self.frontend_pid):
                self.seen.setdefault(pid, time.monotonic())
            self._stop.wait(0.2)

    def __enter__(self) -> WorkerWatch:
        for pid in worker_pids(self.frontend_pid):
            self.seen.setdefault(pid, time.monotonic())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def report(self, before: list[int]) -> dict[str, Any]:
        after = worker_pids(self.frontend_pid)
        gone = sorted(p for p in self.seen if p not in after)
        return {
            "pids_before": before,
            "pids_after": after,
            "pids_seen": sorted(self.seen),
            "deaths": len(gone),
            "frontend_alive": psutil.pid_exists(self.frontend_pid),
        }


LOG_PATTERNS = {
    "ts_log.log": {
        "errors": re.compile(r"\[ERROR\]"),
        "worker_exits": re.compile(r"Stopped Scanner - W-\S+-stdout"),
        "response_too_large": re.compile(r"Message size exceed limit"),
    },
    "model_log.log": {
        "tracebacks": re.compile(r"Traceback \(most recent call last\)"),
        "unexpected_failures": re.compile(r"failed unexpectedly|handling a batch of \d+ requests failed"),
        "records_not_written": re.compile(r"record not written"),
    },
}


def log_offsets(run_dir: Path) -> dict[str, int]:
    out = {}
    for name in LOG_PATTERNS:
        path = run_dir / "logs" / name
        out[name] = path.stat().st_size if path.is_file() else 0
    return out


def log_findings(run_dir: Path, offsets: dict[str, int]) -> dict[str, Any]:
    """Counts of the patterns above in what the server logged since ``offsets``, with first examples."""
    out: dict[str, Any] = {}
    for name, patterns in LOG_PATTERNS.items():
        path = run_dir / "logs" / name
        text = ""
        if path.is_file():
            with open(path, "rb") as f:
                f.seek(offsets.get(name, 0))
                text = f.read().decode("utf-8", errors="replace")
        lines = text.splitlines()
        for key, pattern in patterns.items():
            hits = [line for line in lines if pattern.search(line)]
            out[key] = {"count": len(hits), "examples": [h[:300] for h in hits[:3]]}
    return out


def describe_ready(server: S.Running) -> tuple[int, int]:
    """(workers, READY workers) of the served model, as TorchServe's management API says; (-1, -1) if
    it does not answer."""
    try:
        key = read_keys(server.run_dir).get("management")
        status, described = S._http(f"{server.management_url}/models/{server.model}", key=key, timeout=2)
    except (OSError, S.ServeError):
        return -1, -1
    if status != 200 or not isinstance(described, list) or not described:
        return -1, -1
    workers = described[0].get("workers", [])
    return len(workers), sum(1 for w in workers if w.get("status") == "READY")


def read_log_records(directory: Path, fields: Sequence[str], check: Callable[[Any], Any]) -> dict[str, Any]:
    """Every line of the JSON-lines files under ``directory``: ids, corrupt lines, unfinished files."""
    ids: Counter[str] = Counter()
    unfinished_ids: set[str] = set()
    corrupt: list[str] = []
    lines = files = unfinished = 0
    wanted = set(fields)
    paths = sorted(p for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else []
    for path in paths:
        complete = path.name.endswith(SUFFIX) and not path.name.startswith(".")
        if not complete and not path.name.endswith(TMP_SUFFIX):
            continue
        files += 1
        unfinished += int(not complete)
        data = path.read_bytes()
        for n, raw in enumerate(data.split(b"\n"), start=1):
            if not raw:
                continue
            lines += 1
            try:
                record = json.loads(raw)
            except ValueError as e:
                corrupt.append(f"{path.name}:{n}: not JSON ({e}): {raw[:80]!r}")
                continue
            if not isinstance(record, dict) or set(record) != wanted:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                corrupt.append(f"{path.name}:{n}: fields {keys}")
                continue
            problem = check(record)
            if isinstance(problem, str):
                corrupt.append(f"{path.name}:{n}: {problem}")
                continue
            if complete:
                ids[record["decision_id"]] += 1
            else:
                unfinished_ids.add(record["decision_id"])
    return {
        "ids": ids,
        "unfinished_ids": unfinished_ids,
        "lines": lines,
        "files": files,
        "unfinished_files": unfinished,
        "corrupt": len(corrupt),
        "corrupt_examples": corrupt[:5],
        "duplicates": sum(1 for c in ids.values() if c > 1),
    }


def server_spec(workers: int) -> S.ServerSpec:
    """``rlops serve start`` as shipped (adaptive batches of 16, decision log on), with ``workers``."""
    return dataclasses.replace(next(s for s in S.SERVERS if s.key == "rlops"), workers=workers)


@contextlib.contextmanager
def rlops_serving(served: Served, key: str, workers: int) -> Iterator[S.Running]:
    """A fresh server of :func:`server_spec` in its own run directory, on free ports; stopped at the end."""
    spec = server_spec(workers)
    run_dir, logs = served.work / key, served.work / f"{key}-logs"
    try:
        yield S.start_rlops(served.work, served.registry, served.name, spec, run_dir, logs, S._free_ports())
    finally:
        S.stop_rlops(served.work, run_dir)


def max_request_size(run_dir: Path) -> int:
    props = read_properties(run_dir / PROPERTIES_FILE)
    value = props.get("max_request_size")
    return int(value) if value and value.isdigit() else TS_DEFAULT_MAX_REQUEST_SIZE


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


# --- paced load through PolicyClient --------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    t0: float
    t1: float
    ok: bool
    """Answered by the policy: neither the client's fallback nor the server's."""
    reason: str | None
    decision_id: str
    wrong: bool
    """Answered, but not the greedy action the policy gives."""


class PacedLoad:
    """``clients`` threads, each a PolicyClient (deterministic requests) at ``rate`` requests per second.

    The clients read the inference key from ``run_dir`` afresh when TorchServe refuses theirs, so they
    keep working across a restart on the same ports.
    """

    def __init__(
        self, served: Served, server: S.Running, clients: int, rate: float, timeout_s: float
    ) -> None:
        self.served, self.rate = served, rate
        self.url, self.run_dir, self.timeout_s = server.inference_url, server.run_dir, timeout_s
        self.samples: list[Sample] = []
        self.stats: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i, clients), daemon=True) for i in range(clients)
        ]

    def _client(self) -> PolicyClient:
        return PolicyClient(
            self.url, self.served.name, timeout=self.timeout_s, token=inference_token(self.run_dir)
        )

    def _run(self, offset: int, clients: int) -> None:
        pool, actions = self.served.pool, self.served.actions
        period = 1.0 / self.rate
        next_t = time.monotonic() + period * offset / clients
        i = offset
        with self._client() as client:
            while not self._stop.is_set():
                wait = next_t - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    break
                idx = i % len(pool)
                t0 = time.monotonic()
                d = client.act(pool[idx], deterministic=True)
                t1 = time.monotonic()
                ok = not d.fallback
                self.samples.append(
                    Sample(t0, t1, ok, d.reason, d.decision_id, ok and d.action != actions[idx])
                )
                next_t = max(next_t + period, t1 - period)  # a late request delays the schedule, no burst
                i += clients
            self.stats.append(client.stats())

    def start(self) -> PacedLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        return sorted(self.samples, key=lambda s: s.t0)


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if len(values) else None


def _reasons(samples: Sequence[Sample]) -> dict[str, int]:
    return dict(Counter(s.reason or "?" for s in samples if not s.ok).most_common())


# --- part 1: fuzzing ------------------------------------------------------------------------------------


def part_fuzz(served: Served, settings: Settings, progress: Progress) -> dict[str, Any]:
    rng = random.Random(settings.seed)
    out: dict[str, Any] = {}
    with rlops_serving(served, "fuzz", settings.workers) as server:
        keys = read_keys(server.run_dir)
        target = Target(
            port=_port(server.inference_url),
            path=server.predict_path,
            token=server.key,
            other_tokens={k: v for k, v in keys.items() if k != "inference"},
            max_request_size=max_request_size(server.run_dir),
        )
        max_batch = ServingSettings().max_batch_observations
        cases = InferenceFuzzer(served, target, rng, max_batch).cases(
            settings.fuzz_requests, settings.huge_repeats
        )
        console.print(
            f"part 1: {len(cases):,} requests to {server.inference_url}{server.predict_path} "
            f"(max_request_size {target.max_request_size:,} bytes, max_batch_observations {max_batch})"
        )
        answered_ids: set[str] = set()

        def judge(case: Case, reply: Reply) -> str | None:
            wrong, ids = check_decisions(case, reply, served)
            answered_ids.update(ids)
            return wrong

        offsets = log_offsets(server.run_dir)
        before = worker_pids(server.frontend_pid)
        started = time.monotonic()
        with WorkerWatch(server.frontend_pid) as watch:
            tally = run_cases(cases, target.port, settings, judge, progress, "fuzz: inference")
            time.sleep(1.0)
        workers = watch.report(before)
        out["inference"] = {
            **tally.to_json(),
            "seconds": round(time.monotonic() - started, 1),
            "max_request_size": target.max_request_size,
            "max_batch_observations": max_batch,
            "workers": workers,
            "logs": log_findings(server.run_dir, offsets),
        }
        decision_dir = server.decision_dir
    # After the clean stop every answered decision must be in the log.
    if decision_dir is None:
        raise BenchError("the server was started without a decision log")
    log = read_log_records(decision_dir, DECISION_FIELDS, check_decision)
    missing = sorted(answered_ids - set(log["ids"]))
    out["inference"]["decision_log"] = {
        "answered": len(answered_ids),
        "missing": len(missing),
        "missing_examples": missing[:5],
        **{k: v for k, v in log.items() if k not in ("ids", "unfinished_ids")},
    }
    out["rewards"] = fuzz_rewards(served, settings, rng, progress)
    return out


def fuzz_rewards(
    served: Served, settings: Settings, rng: random.Random, progress: Progress
) -> dict[str, Any]:
    work = served.work / "feedback"
    work.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    token_file = work / "token"
    token_file.write_text(token + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    port = S._free_ports().inference
    logs = work / "logs"
    console_out = open(work / "feedback.out", "wb")  # noqa: SIM115 - closed below
    cmd = [
        str(RLOPS),
        "feedback",
        "serve",
        "--dir",
        str(logs),
        "--port",
        str(port),
        "--token-file",
        str(token_file),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=work,
        stdout=console_out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        target = Target(
            port=port, path="/rewards", token=token, other_tokens={}, max_request_size=fb.MAX_BODY_BYTES
        )
        cases = RewardFuzzer(target, rng).cases(settings.reward_requests, settings.huge_repeats)
        console.print(
            f"part 1: {len(cases):,} requests to http://127.0.0.1:{port}/rewards (body limit "
            f"{fb.MAX_BODY_BYTES:,} bytes, {fb.MAX_REWARDS_PER_REQUEST:,} rewards)"
        )
        accepted_ids: set[str] = set()
        accepted_total = 0

        def judge(case: Case, reply: Reply) -> str | None:
            nonlocal accepted_total
            wrong, n = check_rewards(case, reply)
            accepted_total += n
            if n and case.ids:
                accepted_ids.update(case.ids)
            return wrong

        started = time.monotonic()
        tally = run_cases(cases, port, settings, judge, progress, "fuzz: rewards")
        alive = proc.poll() is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(10)
        console_out.close()
    text = (work / "feedback.out").read_text(encoding="utf-8", errors="replace")
    log = read_log_records(logs / fb.REWARDS_STREAM, REWARD_FIELDS, check_reward)
    missing = sorted(accepted_ids - set(log["ids"]))
    return {
        **tally.to_json(),
        "seconds": round(time.monotonic() - started, 1),
        "body_limit": fb.MAX_BODY_BYTES,
        "process_alive_at_end": alive,
        "exit_code": rc,
        "tracebacks": text.count("Traceback (most recent call last)"),
        "traceback_kinds": dict(Counter(_exception_lines(text)).most_common()),
        "reward_log": {
            "accepted_by_answers": accepted_total,
            "accepted_ids": len(accepted_ids),
            "missing": len(missing),
            "missing_examples": [repr(m) for m in missing[:5]],
            **{k: v for k, v in log.items() if k not in ("ids", "unfinished_ids")},
        },
    }


def _exception_lines(text: str) -> list[str]:
    """The exception that ends each traceback in a process's output."""
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("Traceback (most recent call last)"):
            inside = True
        elif inside and line and not line.startswith((" ", "\t")):
            out.append(line.split(":", 1)[0])
            inside = False
    return out


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the process serving {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise BenchError(f"{url} did not answer within {timeout:.0f} s")


# --- part 2: one worker SIGKILLed under load ------------------------------------------------------------


def part_worker_kill(served: Served, settings: Settings, progress: Progress) -> dict[str, Any]:
    with rlops_serving(served, "worker-kill", settings.workers) as server:
        workers_before = worker_pids(server.frontend_pid)
        if not workers_before:
            raise BenchError("TorchServe has no worker process to kill")
        expected_workers = len(workers_before)
        console.print(
            f"part 2: {KILL_CLIENTS} clients × {settings.kill_rate:g} requests/s for "
            f"{settings.kill_seconds:g} s; SIGKILL of worker {workers_before[0]} halfway"
        )
        load = PacedLoad(served, server, KILL_CLIENTS, settings.kill_rate, settings.client_timeout_s).start()
        task = progress.add_task("worker kill", total=settings.kill_seconds)
        started = time.monotonic()
        _tick(progress, task, started, settings.kill_seconds / 2)
        victim = workers_before[0]
        kill_t = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        new_worker_t = ready_t = None
        while time.monotonic() - started < settings.kill_seconds:
            now = time.monotonic()
            if new_worker_t is None:
                pids = worker_pids(server.frontend_pid)
                if any(p not in workers_before for p in pids):
                    new_worker_t = now
            if new_worker_t is not None and ready_t is None:
                total, ready = describe_ready(server)
                if ready == expected_workers and total == expected_workers:
                    ready_t = time.monotonic()
            progress.update(task, completed=min(now - started, settings.kill_seconds))
            time.sleep(0.02 if ready_t is None else 0.25)
        samples = load.stop()
        progress.update(task, completed=settings.kill_seconds)
        workers_after = worker_pids(server.frontend_pid)
        decision_dir = server.decision_dir
    failed = [s for s in samples if not s.ok]
    first_ok = min((s.t1 for s in samples if s.ok and s.t0 > kill_t), default=None)
    # The burst of failures the kill caused: from a deadline before it until failures stop for a second
    # after the first answer from the fresh worker (the requests queued meanwhile are answered late).
    burst_end = first_ok if first_ok is not None else float("inf")
    for t in sorted(s.t0 for s in failed if s.t0 >= kill_t):
        if t > burst_end + 1.0:
            break
        burst_end = max(burst_end, t)
    in_window = [s for s in failed if kill_t - settings.client_timeout_s <= s.t0 <= burst_end]
    per_second = Counter(int(np.floor(s.t0 - kill_t)) for s in failed)
    n = len(samples)
    # Not a target of this part: what the killed worker had answered but not yet written.
    answered = {s.decision_id for s in samples if s.ok}
    log = read_log_records(decision_dir, DECISION_FIELDS, check_decision) if decision_dir else None
    lost = len(answered - set(log["ids"])) if log else None
    return {
        "clients": KILL_CLIENTS,
        "rate_per_client": settings.kill_rate,
        "seconds": settings.kill_seconds,
        "client_timeout_ms": settings.client_timeout_s * 1e3,
        "requests": n,
        "failed": len(failed),
        "failure_rate": len(failed) / n if n else None,
        "failed_around_kill": len(in_window),
        "failed_elsewhere": len(failed) - len(in_window),
        "failure_reasons": _reasons(samples),
        "wrong_answers": sum(s.wrong for s in samples),
        "killed_pid": victim,
        "workers_before": workers_before,
        "workers_after": workers_after,
        "first_answer_after_kill_s": None if first_ok is None else first_ok - kill_t,
        "new_worker_process_s": None if new_worker_t is None else new_worker_t - kill_t,
        "workers_ready_s": None if ready_t is None else ready_t - kill_t,
        "burst_end_s": None if burst_end == float("inf") else burst_end - kill_t,
        "failures_per_second_from_kill": {str(k): v for k, v in sorted(per_second.items())},
        "answered_decisions": len(answered),
        "answered_decisions_missing_from_log": lost,
        "latency_ms": {
            "p50": _ms(_pct([s.t1 - s.t0 for s in samples if s.ok], 50)),
            "p99": _ms(_pct([s.t1 - s.t0 for s in samples if s.ok], 99)),
        },
        "client_stats": _merge_stats(load.stats),
    }


def _tick(progress: Progress, task: Any, started: float, until: float) -> None:
    while (elapsed := time.monotonic() - started) < until:
        progress.update(task, completed=elapsed)
        time.sleep(min(0.5, until - elapsed))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 2)


def _merge_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    fallbacks: Counter[str] = Counter()
    for s in stats:
        fallbacks.update(s["fallbacks"])
    return {
        "requests_sent": sum(s["requests"] for s in stats),
        "retries": sum(s["retries"] for s in stats),
        "fallbacks": dict(fallbacks),
    }


# --- part 3: the whole server killed and started again --------------------------------------------------


def _server_procs(frontend_pid: int) -> list[psutil.Process]:
    return S._tree(frontend_pid)


def part_restart(served: Served, settings: Settings, progress: Progress) -> dict[str, Any]:
    spec = server_spec(settings.workers)
    modes: dict[str, Any] = {}
    for mode in RESTART_MODES:
        run_dir, logs = served.work / f"restart-{mode}", served.work / f"restart-{mode}-logs"
        ports = S._free_ports()
        current = S.start_rlops(served.work, served.registry, served.name, spec, run_dir, logs, ports)
        console.print(
            f"part 3 ({mode}): {KILL_CLIENTS} clients × {settings.kill_rate:g} requests/s; "
            f"kill after {settings.restart_before_s:g} s, then rlops serve start on the same ports"
        )
        task = progress.add_task(f"restart: {mode}", total=4)
        result: dict[str, Any] = {}
        try:
            load = PacedLoad(
                served, current, KILL_CLIENTS, settings.kill_rate, settings.client_timeout_s
            ).start()
            time.sleep(settings.restart_before_s)
            progress.advance(task)
            procs = _server_procs(current.frontend_pid)
            kill_t = time.monotonic()
            if mode == "serve-stop":
                S._run(
                    [str(RLOPS), "serve", "stop", "--run-dir", str(run_dir)],
                    "rlops serve stop",
                    timeout=120,
                    cwd=served.work,
                )
            else:
                pgid = os.getpgid(current.frontend_pid)
                os.killpg(pgid, signal.SIGTERM if mode == "sigterm" else signal.SIGKILL)
            _, alive = psutil.wait_procs(procs, timeout=60)
            down_t = time.monotonic()
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            progress.advance(task)
            restarted, attempts, problem = None, 0, ""
            while restarted is None and attempts < 5:
                attempts += 1
                try:
                    restarted = S.start_rlops(
                        served.work, served.registry, served.name, spec, run_dir, logs, ports
                    )
                except S.BenchError as e:
                    problem = str(e)[-500:]
                    time.sleep(3)
            if restarted is None:
                raise BenchError(f"rlops serve start after {mode} failed {attempts} times: {problem}")
            ready_t = time.monotonic()
            progress.advance(task)
            time.sleep(settings.restart_after_s)
            samples = load.stop()
            result |= {
                "kill_to_processes_gone_s": down_t - kill_t,
                "processes_left_after_60_s": len(alive),
                "restart_attempts": attempts,
                "kill_to_ready_s": ready_t - kill_t,
            }
        finally:
            S.stop_rlops(served.work, run_dir)
        progress.advance(task)
        answered = {s.decision_id: s for s in samples if s.ok}
        first_ok = min((s.t1 for s in samples if s.ok and s.t0 > down_t), default=None)
        log = read_log_records(logs / "decisions", DECISION_FIELDS, check_decision)
        found = set(log["ids"])
        before = {i for i, s in answered.items() if s.t1 < kill_t}
        after = {i for i, s in answered.items() if s.t0 > kill_t}
        during = set(answered) - before - after
        fell_back = {s.decision_id for s in samples if not s.ok}
        missing = set(answered) - found
        result |= {
            "requests": len(samples),
            "answered": len(answered),
            "answered_before_kill": len(before),
            "answered_during_kill": len(during),
            "answered_after_restart": len(after),
            "found_in_log": len(set(answered) & found),
            "missing": len(missing),
            "missing_before_kill": len(missing & before),
            "missing_during_kill": len(missing & during),
            "missing_after_restart": len(missing & after),
            "missing_examples": sorted(missing)[:5],
            "in_unfinished_files": len(missing & log["unfinished_ids"]),
            "logged_but_client_fell_back": len(fell_back & found),
            "failed_requests": len(samples) - len(answered),
            "failure_reasons": _reasons(samples),
            "wrong_answers": sum(s.wrong for s in samples),
            "first_answer_after_restart_s": None if first_ok is None else first_ok - kill_t,
            **{k: v for k, v in log.items() if k not in ("ids", "unfinished_ids")},
        }
        modes[mode] = result
    return {
        "clients": KILL_CLIENTS,
        "rate_per_client": settings.kill_rate,
        "modes": modes,
        "client_timeout_ms": settings.client_timeout_s * 1e3,
    }


# --- part 4: registry writers killed --------------------------------------------------------------------

VERSION_RE = re.compile(r"^[1-9][0-9]*$")


@dataclass
class RegistrySnapshot:
    versions: list[int]
    aliases_raw: bytes | None
    history_raw: bytes

    @classmethod
    def take(cls, policy_dir: Path) -> RegistrySnapshot:
        versions = (
            sorted(int(p.name) for p in policy_dir.iterdir() if VERSION_RE.match(p.name) and p.is_dir())
            if policy_dir.is_dir()
            else []
        )
        aliases = policy_dir / "aliases.json"
        history = policy_dir / "history.jsonl"
        return cls(
            versions,
            aliases.read_bytes() if aliases.is_file() else None,
            history.read_bytes() if history.is_file() else b"",
        )


def kill_evidence(policy_dir: Path, before: RegistrySnapshot, after: RegistrySnapshot, op: str) -> list[str]:
    """What the state of the registry right after a kill says about where the writer was."""
    found = []
    names = [p.name for p in policy_dir.iterdir()] if policy_dir.is_dir() else []
    if any(n.startswith(".tmp-") for n in names):
        found.append("temporary version directory left (killed while copying a version)")
    if any(n.startswith(".aliases.json.tmp-") for n in names):
        found.append("temporary aliases file left (killed while replacing aliases.json)")
    if after.history_raw and not after.history_raw.endswith(b"\n"):
        found.append("history.jsonl ends in a partial line (killed while appending)")
    new = set(after.versions) - set(before.versions)
    try:
        aliases = json.loads(after.aliases_raw) if after.aliases_raw else {}
    except ValueError:
        aliases = {}
    if op == "publish" and new and aliases.get("candidate") not in new:
        found.append(
            "new version in place, candidate not moved to it (killed between the rename and the alias)"
        )
    if after.aliases_raw != before.aliases_raw and after.history_raw.count(b"\n") == before.history_raw.count(
        b"\n"
    ):
        found.append("aliases.json changed, no history line yet (killed between the two)")
    return found


def _cli_all(commands: dict[str, list[str]], work: Path) -> dict[str, tuple[int, str]]:
    """Run the commands side by side; (exit code, the end of their output) by name."""
    procs = {
        key: subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
        for key, cmd in commands.items()
    }  # fmt: skip
    out = {}
    for key, proc in procs.items():
        try:
            text, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
        out[key] = (proc.returncode, text.decode(errors="replace")[-300:])
    return out


def check_registry(root: Path, name: str, archived: set[int], store: Path, work: Path) -> dict[str, Any]:
    """Every check of part 4 on the registry as it is now: ``rlops registry list``, aliases.json and the
    history, ``PolicyRuntime.load`` of every version, ``rlops serve archive`` of every version not archived
    before (the CLI commands side by side)."""
    policy_dir = root / name
    problems: list[str] = []
    bad_versions: list[int] = []
    versions = RegistrySnapshot.take(policy_dir).versions
    alias_problem = None
    try:
        aliases = json.loads((policy_dir / "aliases.json").read_text(encoding="utf-8"))
        if not isinstance(aliases, dict):
            alias_problem = f"aliases.json is a {type(aliases).__name__}"
        else:
            for alias, v in aliases.items():
                if type(v) is not int or v not in versions:
                    alias_problem = f"aliases.json: {alias} → {v!r}, versions {versions[-5:]}"
    except (OSError, ValueError) as e:
        alias_problem = f"aliases.json: {e}"
    if alias_problem:
        problems.append(alias_problem)
    try:
        Registry(root).history(name)
    except RegistryError as e:
        problems.append(f"history: {e}")
    for v in versions:
        try:
            rt = PolicyRuntime.load(policy_dir / str(v))
            if rt.version != v or rt.name != name:
                raise PolicyLoadError(f"card says {rt.name} version {rt.version}")
        except PolicyLoadError as e:
            bad_versions.append(v)
            problems.append(f"version {v}: {e}"[:300])
    commands = {"list": [str(RLOPS), "registry", "list", "--registry", str(root)]}
    for v in versions:
        if v not in archived and v not in bad_versions:
            commands[str(v)] = [str(RLOPS), "serve", "archive", name, str(v), "--registry", str(root),
                                "--store", str(store)]  # fmt: skip
    archive_failures = 0
    for key, (rc, tail) in _cli_all(commands, work).items():
        if rc != 0:
            what = "rlops registry list" if key == "list" else f"rlops serve archive {name} {key}"
            problems.append(f"{what} exited {rc}: {tail}")
            archive_failures += key != "list"
        elif key != "list":
            archived.add(int(key))
    list_failed = any(p.startswith("rlops registry list") for p in problems)
    return {"versions": versions, "bad_versions": bad_versions, "alias_problem": alias_problem is not None,
            "list_failed": list_failed, "archive_failures": archive_failures,
            "problems": problems}  # fmt: skip


def _kill_one(
    cmd: list[str], policy_dir: Path, typical: float, rng: random.Random, work: Path
) -> tuple[str, bool, int, float, str]:
    """Start ``cmd`` and SIGKILL it: half the time after a random delay within its usual duration, half
    a random 0-20 ms after the first temporary file of a write appears in ``policy_dir`` (polled every
    millisecond). Returns (trigger, whether it was still running, exit code, seconds, stderr tail)."""
    trigger = rng.choice(("delay", "write"))
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)  # fmt: skip
    t0 = time.monotonic()
    if trigger == "delay":
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(typical * rng.uniform(0.3, 1.05))
    else:
        delay = rng.uniform(0.0, 0.02)
        while proc.poll() is None and time.monotonic() - t0 < 10 * typical:
            with contextlib.suppress(OSError):
                if any(n.startswith((".tmp-", ".aliases.json.tmp-")) for n in os.listdir(policy_dir)):
                    time.sleep(delay)
                    break
            time.sleep(0.001)
    running = proc.poll() is None
    if running:
        proc.kill()
    rc = proc.wait(30)
    err = proc.stderr.read().decode(errors="replace")[-300:] if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    return trigger, running, rc, time.monotonic() - t0, err


def part_registry(served: Served, settings: Settings, progress: Progress) -> dict[str, Any]:
    rng = random.Random(settings.seed + 4)
    root, store, name, src, work = (served.work / "crash-registry", served.work / "crash-store", "crash",
                                    served.version_dir, served.work)  # fmt: skip
    policy_dir = root / name

    def cli(*args: str) -> list[str]:
        return [str(RLOPS), "registry", *args, "--registry", str(root)]

    def command(op: str) -> list[str]:
        if op == "publish":
            return cli("publish", str(src), "--name", name)
        versions = RegistrySnapshot.take(policy_dir).versions
        champion = Registry(root).aliases(name).get("champion")
        target = versions[-1] if versions[-1] != champion else versions[0]
        return cli("promote", name, str(target), "--force", "--reason", "robustness benchmark")

    # Durations of unkilled runs, so that the random delays fall while the commands run.
    durations: dict[str, list[float]] = {"publish": [], "promote": []}
    for _ in range(2):
        for op in ("publish", "promote"):
            t0 = time.monotonic()
            S._run(command(op), f"rlops registry {op}", timeout=300, cwd=work)
            durations[op].append(time.monotonic() - t0)
    typical = {op: float(np.median(d)) for op, d in durations.items()}
    console.print(
        f"part 4: {settings.registry_kills} kills each of publish and promote while they run (unkilled: "
        f"publish {typical['publish']:.1f} s, promote {typical['promote']:.1f} s)"
    )
    archived: set[int] = set()
    first = check_registry(root, name, archived, store, work)
    if first["problems"]:
        raise BenchError(f"the registry is broken before any kill: {first['problems']}")
    kills: list[dict[str, Any]] = []
    checked_versions = 0
    bad: set[int] = set()
    landed = Counter[str]()
    task = progress.add_task("registry kills", total=2 * settings.registry_kills)
    attempts = 0
    # Alternate publish and promote until each was killed while running often enough (a run that ends
    # before its kill is counted, checked and repeated), at most three tries per kill.
    while (
        min(landed["publish"], landed["promote"]) < settings.registry_kills
        and attempts < 6 * settings.registry_kills
    ):
        op = "publish" if attempts % 2 == 0 else "promote"
        attempts += 1
        if landed[op] >= settings.registry_kills:
            continue
        before = RegistrySnapshot.take(policy_dir)
        trigger, running, rc, seconds, err = _kill_one(command(op), policy_dir, typical[op], rng, work)
        after = RegistrySnapshot.take(policy_dir)
        evidence = kill_evidence(policy_dir, before, after, op) if running else []
        landed[op] += running
        check = check_registry(root, name, archived, store, work)
        checked_versions += len(check["versions"])
        bad.update(check["bad_versions"])
        # A next publish must succeed (the same code as the CLI, in this process) and load.
        next_ok, next_problem = True, None
        try:
            v = Registry(root).publish(src, name)
            PolicyRuntime.load(policy_dir / str(v))
        except (RegistryError, PolicyLoadError, OSError) as e:
            next_ok, next_problem = False, str(e)[:300]
        kills.append({
            "op": op, "trigger": trigger, "killed_at_s": round(seconds, 3), "landed": running,
            "exit_code": rc, "stderr": err if rc not in (0, -signal.SIGKILL) else "", "evidence": evidence,
            "versions": len(check["versions"]), "problems": check["problems"],
            "alias_problem": check["alias_problem"],
            "list_failed": check["list_failed"], "archive_failures": check["archive_failures"],
            "next_publish_ok": next_ok, "next_publish_problem": next_problem,
        })  # fmt: skip
        progress.update(task, completed=landed["publish"] + landed["promote"])
    per_op: dict[str, Any] = {}
    for op in ("publish", "promote"):
        ks = [k for k in kills if k["op"] == op]
        hit = [k for k in ks if k["landed"]]
        per_op[op] = {
            "attempts": len(ks),
            "killed_while_running": len(hit),
            "finished_before_the_kill": len(ks) - len(hit),
            "failed_on_its_own": sum(1 for k in ks if not k["landed"] and k["exit_code"] != 0),
            "killed_mid_write": sum(1 for k in hit if k["evidence"]),
            "evidence": dict(Counter(e for k in hit for e in k["evidence"]).most_common()),
            "checks_with_problems": sum(1 for k in ks if k["problems"]),
            "alias_problems": sum(k["alias_problem"] for k in ks),
            "list_failures": sum(k["list_failed"] for k in ks),
            "archive_failures": sum(k["archive_failures"] for k in ks),
            "next_publish_failures": sum(not k["next_publish_ok"] for k in ks),
        }
    # The last next publish made a version no check has seen yet.
    last = check_registry(root, name, archived, store, work)
    checked_versions += len(last["versions"])
    bad.update(last["bad_versions"])
    final = last["versions"]
    return {
        "unkilled_seconds": {op: [round(x, 2) for x in d] for op, d in durations.items()},
        "operations": per_op,
        "versions_at_end": len(final),
        "versions_archived": len(archived),
        "version_loads": checked_versions,
        "bad_versions": sorted(bad),
        "problems": ([p for k in kills for p in k["problems"]] + last["problems"])[:10],
        "kills": kills,
    }


# --- part 5: soak ---------------------------------------------------------------------------------------


def _rss(frontend_pid: int) -> dict[str, Any]:
    out: dict[str, Any] = {"t": time.monotonic(), "frontend": None, "workers": {}}
    for p in S._tree(frontend_pid):
        try:
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        if p.pid == frontend_pid:
            out["frontend"] = rss
        elif S._is_worker(p):
            out["workers"][p.pid] = rss
    return out


def _worker_rss(pid: int) -> Callable[[dict[str, Any]], float | None]:
    return lambda sample: sample["workers"].get(pid)


def part_soak(served: Served, settings: Settings, progress: Progress) -> dict[str, Any]:
    duration = settings.soak_minutes * 60
    window = min(60.0, duration / 2)
    with rlops_serving(served, "soak", settings.workers) as server:
        at_start = _rss(server.frontend_pid)
        console.print(
            f"part 5: {SOAK_CLIENTS} clients × {settings.soak_rate:g} requests/s for "
            f"{settings.soak_minutes:g} min after {settings.soak_warmup_s:g} s of warm-up; RSS every "
            f"{settings.sample_seconds:g} s"
        )
        load = PacedLoad(served, server, SOAK_CLIENTS, settings.soak_rate, settings.client_timeout_s).start()
        warm = progress.add_task("soak: warm-up", total=settings.soak_warmup_s)
        _tick(progress, warm, time.monotonic(), settings.soak_warmup_s)
        progress.update(warm, completed=settings.soak_warmup_s)
        start = time.monotonic()
        samples_rss = []
        task = progress.add_task("soak", total=duration)
        while (elapsed := time.monotonic() - start) < duration:
            samples_rss.append(_rss(server.frontend_pid))
            progress.update(task, completed=elapsed)
            time.sleep(min(settings.sample_seconds, max(0.0, duration - elapsed)))
        samples_rss.append(_rss(server.frontend_pid))
        samples = load.stop()
        progress.update(task, completed=duration)
        logs = log_findings(server.run_dir, {})
    soaked = [s for s in samples if s.t0 >= start]
    first = [s for s in soaked if s.t0 < start + window]
    last = [s for s in soaked if s.t0 >= start + duration - window]

    def rss_window(pick: Callable[[dict[str, Any]], float | None], lo: float, hi: float) -> float | None:
        values = [v for s in samples_rss if lo <= s["t"] - start <= hi and (v := pick(s)) is not None]
        return float(np.mean(values)) if values else None

    processes: dict[str, Any] = {}
    pids = sorted({pid for s in samples_rss for pid in s["workers"]})
    series: list[tuple[str, Callable[[dict[str, Any]], float | None]]] = [
        ("frontend", lambda s: s["frontend"])
    ]
    series += [(f"worker {pid}", _worker_rss(pid)) for pid in pids]
    for label, pick in series:
        a = rss_window(pick, 0, window)
        b = rss_window(pick, duration - window, duration + settings.sample_seconds)
        processes[label] = {
            "rss_first_mib": None if a is None else a / 2**20,
            "rss_last_mib": None if b is None else b / 2**20,
            "growth": None if a is None or b is None else b / a - 1,
        }

    def lat(group: Sequence[Sample], q: float) -> float | None:
        return _ms(_pct([s.t1 - s.t0 for s in group if s.ok], q))

    return {
        "minutes": settings.soak_minutes,
        "clients": SOAK_CLIENTS,
        "rate_per_client": settings.soak_rate,
        "warmup_s": settings.soak_warmup_s,
        "window_s": window,
        "sample_seconds": settings.sample_seconds,
        "rss_at_start_mib": {
            "frontend": (at_start["frontend"] or 0) / 2**20,
            "workers": [v / 2**20 for v in at_start["workers"].values()],
        },
        "processes": processes,
        "worker_pids_seen": pids,
        "requests": len(soaked),
        "failed": sum(not s.ok for s in soaked),
        "failure_reasons": _reasons(soaked),
        "wrong_answers": sum(s.wrong for s in soaked),
        "latency_ms": {
            "first": {"p50": lat(first, 50), "p99": lat(first, 99), "requests": len(first)},
            "last": {"p50": lat(last, 50), "p99": lat(last, 99), "requests": len(last)},
        },
        "rss_series": [
            {
                "t": round(s["t"] - start, 1),
                "frontend_mib": round((s["frontend"] or 0) / 2**20, 2),
                "workers_mib": {str(k): round(v / 2**20, 2) for k, v in s["workers"].items()},
            }
            for s in samples_rss
        ],
        "logs": logs,
    }


# --- targets, findings, report --------------------------------------------------------------------------


def targets(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """Every figure with a target (or none: reported for reading), its value and whether it was met."""
    rows: list[dict[str, Any]] = []

    def add(part: str, what: str, value: Any, target: str = "", met: bool | None = None) -> None:
        rows.append({"part": part, "figure": what, "value": value, "target": target, "met": met})

    if (f := parts.get("fuzz")) is not None:
        for side, least in (("inference", 10_000), ("rewards", 1_000)):
            r, good = f[side], f[side]["good"]
            add("fuzz", f"{side}: requests", r["requests"], f"≥ {least:,}", r["requests"] >= least)
            add("fuzz", f"{side}: 5xx answers", r["server_errors"], "0", r["server_errors"] == 0)
            add("fuzz", f"{side}: hangs", r["hangs"], "0", r["hangs"] == 0)
            correct, sent = good.get("correct", 0), good.get("sent", 0)
            add(
                "fuzz",
                f"{side}: good requests answered correctly",
                f"{correct} of {sent}",
                "all",
                correct == sent,
            )
            add("fuzz", f"{side}: answers outside the expected statuses", r["unexpected"])
        inf, rw = f["inference"], f["rewards"]
        deaths, missing = inf["workers"]["deaths"], inf["decision_log"]["missing"]
        add("fuzz", "inference: worker deaths", deaths, "0", deaths == 0)
        add("fuzz", "inference: answered decisions missing from the decision log", missing, "0", missing == 0)
        rl = rw["reward_log"]
        lost = rl["accepted_by_answers"] - rl["lines"]
        add("fuzz", "rewards: rewards accepted (202) but not in the reward log", lost, "0", lost == 0)
        alive = rw["process_alive_at_end"]
        add("fuzz", "rewards: service still running at the end", alive, "yes", alive)
    if (k := parts.get("worker_kill")) is not None:
        rate = k["failure_rate"]
        add("worker_kill", "failed requests", f"{k['failed']} of {k['requests']}")
        add(
            "worker_kill",
            "failure rate",
            rate,
            "≤ 0.1 %",
            rate is not None and rate <= TARGET_KILL_FAILURE_RATE,
        )
        add("worker_kill", "wrong answers", k["wrong_answers"], "0", k["wrong_answers"] == 0)
        add("worker_kill", "kill → first answer from a fresh worker (s)", k["first_answer_after_kill_s"])
        add("worker_kill", "kill → every worker READY again (s)", k["workers_ready_s"])
        add(
            "worker_kill", "answered decisions missing from the log", k["answered_decisions_missing_from_log"]
        )
    if (r := parts.get("restart")) is not None:
        for mode, m in r["modes"].items():
            value = f"{m['missing']} of {m['answered']}"
            add("restart", f"{mode}: answered decisions missing from the log", value, "0", m["missing"] == 0)
            add("restart", f"{mode}: corrupt log lines", m["corrupt"], "0", m["corrupt"] == 0)
    if (g := parts.get("registry")) is not None:
        for op, o in g["operations"].items():
            killed = o["killed_while_running"]
            value = f"{killed} ({o['killed_mid_write']})"
            add("registry", f"{op}: kills while running (mid-write by evidence)", value, "≥ 50", killed >= 50)
            bad = o["checks_with_problems"]
            add("registry", f"{op}: checks after a kill that found a problem", bad, "0", bad == 0)
            failed = o["next_publish_failures"]
            add("registry", f"{op}: next publish failed", failed, "0", failed == 0)
        value = f"{len(g['bad_versions'])} ({g['version_loads']:,})"
        add("registry", "half-written versions (version loads in all)", value, "0", not g["bad_versions"])
    if (s := parts.get("soak")) is not None:
        for label, p in s["processes"].items():
            growth = p["growth"]
            ok = growth is not None and growth <= TARGET_RSS_GROWTH
            add("soak", f"{label}: RSS growth, first → last minute", growth, "≤ 10 %", ok)
        add("soak", "failed requests", f"{s['failed']} of {s['requests']}")
        add("soak", "wrong answers", s["wrong_answers"], "0", s["wrong_answers"] == 0)
    return rows


def findings(parts: dict[str, Any]) -> list[str]:
    """Every number that is a finding, in words, with the evidence the results hold."""
    out: list[str] = []
    if (f := parts.get("fuzz")) is not None:
        for side in ("inference", "rewards"):
            for cat, c in f[side]["categories"].items():
                if c["server_errors"] or c["hangs"]:
                    bad = {e["variant"] for e in c["examples"] if e["got"][0] == "5" or e["got"] == "hang"}
                    out.append(f"fuzz {side}/{cat}: {c['server_errors']} 5xx, {c['hangs']} hangs; e.g. "
                               + "; ".join(sorted(bad)[:4]))  # fmt: skip
                if c["largest_answer_bytes"] > 1 << 20:
                    out.append(f"fuzz {side}/{cat}: an answer of {c['largest_answer_bytes']:,} bytes to "
                               f"'{c['largest_answer_to']}'")  # fmt: skip
            wrong = f[side]["good"].get("wrong")
            if wrong:
                out.append(
                    f"fuzz {side}: {wrong} good request(s) answered wrongly: {f[side]['wrong_examples'][:2]}"
                )
        inf, rw = f["inference"], f["rewards"]
        w, logs = inf["workers"], inf["logs"]
        if w["deaths"]:
            out.append(f"fuzz inference: {w['deaths']} worker death(s) (pids seen {w['pids_seen']}); "
                       f"frontend log: {logs['response_too_large']['count']} 'Message size exceed limit', "
                       f"{logs['worker_exits']['count']} worker exits")  # fmt: skip
        if inf["decision_log"]["missing"]:
            out.append(f"fuzz inference: {inf['decision_log']['missing']} answered decision(s) not in the "
                       "decision log; handler log 'record not written': "
                       f"{logs['records_not_written']['count']}")  # fmt: skip
        if rw["reward_log"]["missing"]:
            out.append(f"fuzz rewards: {rw['reward_log']['missing']} accepted reward(s) not in the reward "
                       f"log (e.g. {rw['reward_log']['missing_examples'][:2]})")  # fmt: skip
    if (k := parts.get("worker_kill")) is not None and (k["failure_rate"] or 0) > TARGET_KILL_FAILURE_RATE:
        out.append(f"worker kill: {k['failed']} of {k['requests']} requests failed "
                   f"({_pct_str(k['failure_rate'], 3)}, {k['failed_around_kill']} around the kill), reasons "
                   f"{k['failure_reasons']}; first answer {_fmt(k['first_answer_after_kill_s'])} s after "
                   "the kill")  # fmt: skip
    if (r := parts.get("restart")) is not None:
        for mode, m in r["modes"].items():
            if m["missing"] or m["corrupt"]:
                out.append(f"restart {mode}: {m['missing']} answered decision(s) missing from the log "
                           f"({m['missing_before_kill']} answered before the kill, "
                           f"{m['missing_during_kill']} "
                           f"during, {m['missing_after_restart']} after the restart); {m['corrupt']} corrupt "
                           "line(s)")  # fmt: skip
    if (g := parts.get("registry")) is not None and (g["bad_versions"] or g["problems"]):
        out.append(f"registry: bad versions {g['bad_versions']}; problems: {g['problems'][:3]}")
    if (s := parts.get("soak")) is not None:
        for label, p in s["processes"].items():
            if p["growth"] is not None and p["growth"] > TARGET_RSS_GROWTH:
                out.append(f"soak: {label} RSS grew {_pct_str(p['growth'], 1)} ({p['rss_first_mib']:.1f} → "
                           f"{p['rss_last_mib']:.1f} MiB)")  # fmt: skip
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _pct_str(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f} %"


def _value(row: dict[str, Any]) -> str:
    v, what = row["value"], row["figure"]
    if isinstance(v, float) and ("rate" in what or "growth" in what):
        return _pct_str(v, 3 if "rate" in what else 1)
    return _fmt(v)


def escape_md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _run_line(run: dict[str, Any]) -> str:
    quick = ", quick" if run["quick"] else ""
    workers = run.get("workers", 1)
    return (f"{run['started_at']} – {run['ended_at']} ({run['wall_s'] / 60:.1f} min{quick}), commit "
            f"{run['commit']}, seed {run['seed']}, {workers} worker{'s' if workers > 1 else ''} per version: "
            f"`{run['command']}`")  # fmt: skip


def render_markdown(result: dict[str, Any]) -> str:
    m, parts = result["machine"], result["parts"]
    lines = [
        "# Robustness benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, load average "
        f"{m['load_average_at_start'][0]:.2f} at the start and {m['load_average_at_end'][0]:.2f} at the end "
        f"of the last run; TorchServe {m['versions'].get('torchserve', '?')}, torch "
        f"{m['versions'].get('torch', '?')}.",
        "",
        "## Targets",
        "",
        "| part | figure | value | target | met |",
        "|---|---|---:|---|---|",
    ]
    for row in result["targets"]:
        verdict = {True: "met", False: "**not met**", None: "–"}[row["met"]]
        lines.append(
            f"| {row['part']} | {row['figure']} | {_value(row)} | {row['target'] or '–'} | {verdict} |"
        )
    lines += ["", "## Findings", ""]
    lines += [f"- {escape_md(x)}" for x in result["findings"]] or ["- none"]
    for key in PARTS.values():
        if key in parts:
            lines += ["", f"## {TITLES[key]}", "", "Run " + _run_line(parts[key]["run"]), ""]
            try:
                lines += RENDER[key](parts[key])
            except KeyError as e:  # kept from a run of an older version of this benchmark
                lines.append(
                    f"(recorded by an older version of this benchmark, without {e}: run the part again)"
                )
    return "\n".join(lines) + "\n"


def _fuzz_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "| category | requests | answers | outside expected | 5xx | hangs | slowest s | largest answer "
        "bytes |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for cat, c in r["categories"].items():
        answers = ", ".join(f"{k} × {v:,}" for k, v in c["statuses"].items())
        lines.append(f"| {cat} | {c['requests']:,} | {answers} | {c['unexpected']} | {c['server_errors']} | "
                     f"{c['hangs']} | {c['slowest_s']:.2f} | {c['largest_answer_bytes']:,} |")  # fmt: skip
    lenient = [
        f"{cat} / {escape_md(v)} ({sum(n for k, n in counts.items() if k.startswith('2'))})"
        for cat, c in r["categories"].items()
        if cat != "good"
        for v, counts in c["variants"].items()
        if any(k.startswith("2") for k in counts)
    ]
    lines += [
        "",
        "Malformed or unusual requests that were answered 2xx, by variant (times): " + "; ".join(lenient),
    ]
    lines += ["", "Answers outside what a case expects, 5xx and hangs (the first three per category):", ""]
    for cat, c in r["categories"].items():
        for e in c["examples"][:3]:
            body = f": {escape_md(e['body'][:120])}" if e["body"] else ""
            wrong = f" — {escape_md(e['wrong'])}" if e.get("wrong") else ""
            lines.append(f"- {cat} / {escape_md(e['variant'])}: expected {e['expected']}, got {e['got']} "
                         f"({e['seconds']} s){body}{wrong}")  # fmt: skip
    return lines


def _render_fuzz(p: dict[str, Any]) -> list[str]:
    inf, rw = p["inference"], p["rewards"]
    w, dl, logs, g = inf["workers"], inf["decision_log"], inf["logs"], inf["good"]
    lines = [
        f"### Inference: {inf['requests']:,} requests in {inf['seconds']:.0f} s",
        "",
        f"Limits: TorchServe's max_request_size {inf['max_request_size']:,} bytes (config.properties, or "
        "TorchServe's default where it is not set), max_batch_observations "
        f"{inf['max_batch_observations']:,}, "
        f"Netty's request line {NETTY_MAX_INITIAL_LINE:,} and header block {NETTY_MAX_HEADER_SIZE:,} bytes. "
        "Expected: `4xx` refused with a status; `4xx/closed` that, or the connection closed; `2xx` answered; "
        "`any` anything but a 5xx or a hang.",
        "",
        *_fuzz_table(inf),
        "",
        f"Good requests: {g.get('correct', 0):,} of {g.get('sent', 0):,} answered 2xx with the greedy "
        f"action that policy.pt gives here and version {p['version']}; wrong {g.get('wrong', 0)}, not 2xx "
        f"{g.get('not answered 2xx', 0)}; wrong answers to other requests "
        f"{g.get('wrong answers to other requests', 0)}.",
        "",
        f"Workers: pids before {w['pids_before']}, after {w['pids_after']}, seen {w['pids_seen']}: "
        f"{w['deaths']} death(s). Frontend log: {logs['errors']['count']} ERROR lines, "
        f"{logs['response_too_large']['count']} "
        f"'Message size exceed limit', {logs['worker_exits']['count']} worker exits. Handler log: "
        f"{logs['tracebacks']['count']} tracebacks, {logs['unexpected_failures']['count']} unexpected "
        f"failures, {logs['records_not_written']['count']} decision records not written.",
        "",
        f"Decision log after a clean stop: {dl['answered']:,} decisions answered, {dl['missing']} of them "
        "missing; "
        f"{dl['lines']:,} lines in {dl['files']} files, {dl['corrupt']} corrupt, {dl['unfinished_files']} "
        "unfinished files.",
        "",
        f"### Rewards: {rw['requests']:,} requests in {rw['seconds']:.0f} s",
        "",
        f"Limits: body {rw['body_limit']:,} bytes, {fb.MAX_REWARDS_PER_REQUEST:,} rewards per request, "
        f"next_observation {fb.MAX_OBSERVATION_LENGTH:,} numbers.",
        "",
        *_fuzz_table(rw),
    ]
    g, rl = rw["good"], rw["reward_log"]
    lines += [
        "",
        f"Good requests: {g.get('correct', 0):,} of {g.get('sent', 0):,} answered 202 with every reward "
        f"accepted. Service running at the end: {_fmt(rw['process_alive_at_end'])} (exit code after SIGTERM "
        f"{rw['exit_code']}); tracebacks in its output: {rw['tracebacks']} {rw['traceback_kinds']}. Reward "
        "log after the stop: "
        f"{rl['accepted_by_answers']:,} rewards accepted by the answers, {rl['lines']:,} lines, "
        f"{rl['missing']} accepted ids missing, {rl['corrupt']} corrupt lines.",
    ]
    return lines


def _render_kill(k: dict[str, Any]) -> list[str]:
    lat = k["latency_ms"]
    return [
        f"{k['clients']} PolicyClient clients × {k['rate_per_client']:g} requests/s for {k['seconds']:g} s "
        f"(deadline {k['client_timeout_ms']:g} ms, retries as shipped); worker {k['killed_pid']} SIGKILLed "
        "halfway.",
        "",
        "| requests | failed | failure rate | in the burst around the kill | elsewhere | reasons | kill → "
        "new worker process | kill → first answer | kill → workers READY | p50 / p99 ms |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        f"| {k['requests']:,} | {k['failed']:,} | {_pct_str(k['failure_rate'], 3)} | "
        f"{k['failed_around_kill']:,} | {k['failed_elsewhere']:,} | {k['failure_reasons']} | "
        f"{_fmt(k['new_worker_process_s'])} s | "
        f"{_fmt(k['first_answer_after_kill_s'])} s | {_fmt(k['workers_ready_s'])} s | {_fmt(lat['p50'])} / "
        f"{_fmt(lat['p99'])} |",
        "",
        "Failures per second, counted from the kill (second 0 starts at the kill): "
        + ", ".join(f"{sec}: {n}" for sec, n in k["failures_per_second_from_kill"].items())
        + f". The burst around the kill ends {_fmt(k['burst_end_s'])} s after it (then failures stop for a "
        "second).",
        "",
        f"Workers before {k['workers_before']}, after {k['workers_after']}; wrong answers "
        f"{k['wrong_answers']}. Decisions answered {k['answered_decisions']:,}; of them not in the decision "
        "log after the clean stop (the killed worker still held them): "
        f"{_fmt(k['answered_decisions_missing_from_log'])}.",
    ]


def _render_restart(r: dict[str, Any]) -> list[str]:
    lines = [
        f"{r['clients']} clients × {r['rate_per_client']:g} requests/s (deadline {r['client_timeout_ms']:g} "
        "ms). "
        "The server is stopped or killed, started again with `rlops serve start` on the same ports, loaded "
        "again, stopped cleanly, and its decision log read.",
        "",
        "| mode | answered | found in log | missing (before / during / after) | corrupt lines | unfinished "
        "files "
        "| logged, client fell back | kill → processes gone | kill → ready again | kill → first answer after "
        "the restart |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, m in r["modes"].items():
        missing = f"{m['missing']:,} ({m['missing_before_kill']} / {m['missing_during_kill']} / " + (
            f"{m['missing_after_restart']})"
        )
        lines.append(f"| {mode} | {m['answered']:,} | {m['found_in_log']:,} | {missing} | {m['corrupt']} | "
                     f"{m['unfinished_files']} | {m['logged_but_client_fell_back']:,} | "
                     f"{_fmt(m['kill_to_processes_gone_s'])} s | {_fmt(m['kill_to_ready_s'])} s | "
                     f"{_fmt(m['first_answer_after_restart_s'])} s |")  # fmt: skip
    return lines


def _render_registry(g: dict[str, Any]) -> list[str]:
    lines = [
        f"Unkilled durations (s): {g['unkilled_seconds']}. Versions at the end {g['versions_at_end']}, "
        f"archived with `rlops serve archive` {g['versions_archived']}, `PolicyRuntime.load` calls "
        f"{g['version_loads']:,}, bad versions {g['bad_versions'] or 'none'}.",
        "",
        "| operation | runs | killed while running | finished first | killed mid-write (evidence) | checks "
        "with a problem | alias problems | list failures | archive failures | next publish failures |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for op, o in g["operations"].items():
        lines.append(f"| {op} | {o['attempts']} | {o['killed_while_running']} | "
                     f"{o['finished_before_the_kill']} | "
                     f"{o['killed_mid_write']} | {o['checks_with_problems']} | {o['alias_problems']} | "
                     f"{o['list_failures']} | {o['archive_failures']} | {o['next_publish_failures']} "
                     "|")  # fmt: skip
    lines += ["", "Where the kills landed, by what they left behind:", ""]
    lines += [
        f"- {op}: {what}: {n}" for op, o in g["operations"].items() for what, n in o["evidence"].items()
    ]
    if g["problems"]:
        lines += ["", "Problems found:", "", *[f"- {escape_md(x)}" for x in g["problems"]]]
    return lines


def _render_soak(s: dict[str, Any]) -> list[str]:
    start = s["rss_at_start_mib"]
    lines = [
        f"{s['clients']} clients × {s['rate_per_client']:g} requests/s for {s['minutes']:g} min after "
        f"{s['warmup_s']:g} s of warm-up; RSS sampled every {s['sample_seconds']:g} s; windows of "
        f"{s['window_s']:g} s. RSS right after the start: frontend {start['frontend']:.1f} MiB, workers "
        f"{', '.join(f'{v:.1f}' for v in start['workers'])} MiB.",
        "",
        "| process | RSS first minute MiB | RSS last minute MiB | growth | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for label, p in s["processes"].items():
        ok = p["growth"] is not None and p["growth"] <= TARGET_RSS_GROWTH
        lines.append(f"| {label} | {_fmt(p['rss_first_mib'], 1)} | {_fmt(p['rss_last_mib'], 1)} | "
                     f"{_pct_str(p['growth'], 1)} | ≤ 10 % | {'met' if ok else '**not met**'} |")  # fmt: skip
    lines += ["", "| window | requests | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    for label, w in (("first minute", s["latency_ms"]["first"]), ("last minute", s["latency_ms"]["last"])):
        lines.append(f"| {label} | {w['requests']:,} | {_fmt(w['p50'])} | {_fmt(w['p99'])} |")
    lines += ["", f"Requests {s['requests']:,}, failed {s['failed']:,} ({s['failure_reasons']}), wrong "
              f"answers {s['wrong_answers']}; worker pids {s['worker_pids_seen']}."]  # fmt: skip
    return lines


RENDER: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "fuzz": _render_fuzz,
    "worker_kill": _render_kill,
    "restart": _render_restart,
    "registry": _render_registry,
    "soak": _render_soak,
}


# --- the command ----------------------------------------------------------------------------------------


def _parts(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or any(v not in PARTS for v in values):
        raise typer.BadParameter(
            f"expected comma-separated part numbers of 1-5 such as 1,2,3,4; got {text!r}",
            param_hint="--parts",
        )
    return values


def _load_previous(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("parts", {}) if isinstance(data, dict) and data.get("schema") == RESULTS_SCHEMA else {}


def make_served(work: Path, registry: Path | None, name: str, steps: int, seed: int) -> Served:
    registry_dir, policy, version_dir = S.prepare_policy(work, registry, name, steps, S.ENV_ID)
    card = json.loads((version_dir / "model-card.json").read_text(encoding="utf-8"))
    oracle = Oracle(version_dir)
    pool = [
        [round(float(v), 6) for v in row]
        for row in S.sample_observations(card, 2048, np.random.default_rng(seed))
    ]
    return Served(
        work=work,
        registry=registry_dir,
        name=policy,
        version=int(card["version"]),
        version_dir=version_dir,
        card=card,
        oracle=oracle,
        pool=pool,
        actions=oracle.greedy(pool),
    )


@app.command()
def main(
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Plumbing check: 1,000 + 200 fuzz requests, short loads, 5 kills, 2 min soak."
        ),
    ] = False,
    parts: Annotated[
        str,
        typer.Option(
            "--parts",
            help="Which parts, e.g. 1,2,3,4 (1 fuzz, 2 worker kill, 3 restart, 4 registry, 5 soak).",
        ),
    ] = "1,2,3,4,5",
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the fuzzers, the kill delays and the observations.")
    ] = 0,
    out: Annotated[
        Path, typer.Option("--out", file_okay=False, help="Where results.json and results.md go.")
    ] = DEFAULT_OUT,
    fuzz_requests: Annotated[
        int | None, typer.Option("--fuzz-requests", min=10, help="Requests to TorchServe (default 10,000).")
    ] = None,
    reward_requests: Annotated[
        int | None,
        typer.Option("--reward-requests", min=10, help="Requests to the reward service (default 1,000)."),
    ] = None,
    hang_timeout: Annotated[
        float, typer.Option("--hang-timeout", min=1, help="Seconds without an answer that make a hang.")
    ] = 20.0,
    client_timeout_ms: Annotated[
        float, typer.Option("--client-timeout-ms", min=1, help="PolicyClient's deadline (100 ms as shipped).")
    ] = 100.0,
    kill_seconds: Annotated[
        float | None, typer.Option("--kill-seconds", min=4, help="Load duration of part 2 (default 60 s).")
    ] = None,
    registry_kills: Annotated[
        int | None, typer.Option("--registry-kills", min=1, help="Kills per registry operation (default 50).")
    ] = None,
    soak_minutes: Annotated[
        float | None, typer.Option("--soak-minutes", min=0.5, help="Soak duration (default 30).")
    ] = None,
    registry: Annotated[
        Path | None,
        typer.Option(
            "--registry", file_okay=False, help="Serve this registry's champion instead of training one."
        ),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Policy name.")] = "cartpole",
    train_steps: Annotated[
        int | None, typer.Option("--train-steps", min=1, help="BC steps of the served policy (default 100).")
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, max=8, help="TorchServe workers per version (1 as shipped).")
    ] = 1,
    keep_work: Annotated[
        bool, typer.Option("--keep-work", help="Keep the working directory (servers' logs, decisions).")
    ] = False,
) -> None:
    """Run the robustness benchmark (see the module docstring)."""
    wanted = _parts(parts)
    settings = Settings(
        quick=quick,
        seed=seed,
        fuzz_requests=fuzz_requests or (1_000 if quick else 10_000),
        reward_requests=reward_requests or (200 if quick else 1_000),
        huge_repeats=1 if quick else 2,
        fuzz_threads=4,
        hang_timeout_s=hang_timeout,
        client_timeout_s=client_timeout_ms / 1e3,
        kill_rate=50.0,
        kill_seconds=kill_seconds or (20.0 if quick else 60.0),
        restart_before_s=8.0 if quick else 20.0,
        restart_after_s=5.0 if quick else 15.0,
        registry_kills=registry_kills or (5 if quick else 50),
        soak_minutes=soak_minutes or (2.0 if quick else 30.0),
        soak_rate=25.0,
        soak_warmup_s=10.0 if quick else 60.0,
        sample_seconds=2.0 if quick else 5.0,
        workers=workers,
    )
    torch.set_num_threads(1)
    # Every fallback is counted; the client's warning per fallback would only bury the progress display.
    logging.getLogger("rlops_server.client").setLevel(logging.ERROR)
    # SIGTERM ends the run like Ctrl-C does, through the finally blocks that stop the servers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rlops-robustness-"))
    load_start = os.getloadavg()
    command = shlex.join([os.path.relpath(sys.executable, S.ROOT), *sys.argv])
    commit = S._commit()  # at the start: what runs is what was checked out then
    console.print(f"working directory {work}; parts {wanted}; load average {load_start[0]:.2f}")
    started_all = time.monotonic()
    try:
        served = make_served(
            work, registry.resolve() if registry else None, name, train_steps or (20 if quick else 100), seed
        )
        console.print(f"serving {served.name} version {served.version} ({served.version_dir})")
        results = _load_previous(out / "results.json")
        runners: dict[str, Callable[[Served, Settings, Progress], dict[str, Any]]] = {
            "fuzz": part_fuzz,
            "worker_kill": part_worker_kill,
            "restart": part_restart,
            "registry": part_registry,
            "soak": part_soak,
        }
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            for number in wanted:
                key = PARTS[number]
                t0, begun = time.monotonic(), dt.datetime.now(dt.UTC)
                part = runners[key](served, settings, progress)
                if key == "fuzz":
                    part["version"] = served.version
                part["run"] = {
                    "started_at": begun.isoformat(timespec="seconds"),
                    "ended_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "wall_s": time.monotonic() - t0,
                    "quick": quick,
                    "seed": seed,
                    "command": command,
                    "commit": commit,
                    "workers": workers,
                }
                results[key] = part
                console.print(f"part {number} ({key}) done in {time.monotonic() - t0:.0f} s")
                _write(out, results, load_start)
        result = _write(out, results, load_start)
        for row in result["targets"]:
            mark = {True: "[green]met[/green]", False: "[red]NOT MET[/red]", None: "  –"}[row["met"]]
            console.print(
                f"{mark}  {row['part']}: {escape(row['figure'])} = {escape(_value(row))} (target "
                f"{row['target'] or '–'})"
            )
        for line in result["findings"]:
            console.print(f"[yellow]finding:[/yellow] {escape(line)}")
        console.print(
            f"wrote {out / 'results.json'} and {out / 'results.md'} in {time.monotonic() - started_all:.0f} s"
        )
    except S.BenchError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from e
    finally:
        if keep_work:
            console.print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _write(out: Path, parts: dict[str, Any], load_start: tuple[float, float, float]) -> dict[str, Any]:
    machine = machine_info.machine() | {
        "load_average_at_start": [round(x, 2) for x in load_start],
        "versions": S._versions(),
    }
    result = {
        "schema": RESULTS_SCHEMA,
        "machine": machine,
        "parts": parts,
        "targets": targets(parts),
        "findings": findings(parts),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "results.md").write_text(render_markdown(result), encoding="utf-8")
    return result


if __name__ == "__main__":
    app()
