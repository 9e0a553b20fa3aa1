"""Run a rendered container command on this machine: the same command line, with only its addresses and
paths moved here, so a test shows the flags as rendered are ones the command takes and acts on."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RLOPS = Path(sys.executable).with_name("rlops")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def split(command: list[str]) -> tuple[list[str], dict[str, str | None]]:
    """(the words before the first flag, the flags with their values; None for a flag without one)."""
    first = next(i for i, word in enumerate(command) if word.startswith("--"))
    flags: dict[str, str | None] = {}
    rest = command[first:]
    i = 0
    while i < len(rest):
        has_value = i + 1 < len(rest) and not rest[i + 1].startswith("--")
        flags[rest[i]] = rest[i + 1] if has_value else None
        i += 2 if has_value else 1
    return command[:first], flags


def here(command: list[str], moved: dict[str, str]) -> list[str]:
    """``command`` with the values of the ``moved`` flags replaced, run by this environment's ``rlops``."""
    words, flags = split(command)
    unknown = set(moved) - set(flags)
    if unknown:
        raise AssertionError(f"{sorted(unknown)} are not flags of the rendered command {command}")
    if words[0] != "rlops":
        raise AssertionError(f"the rendered command runs {words[0]!r}, not rlops")
    out = [str(RLOPS), *words[1:]]
    for flag, value in flags.items():
        out.append(flag)
        if value is not None:
            out.append(moved.get(flag, value))
    return out


def local_path(root: Path, path: str) -> str:
    """Where a path of the container's file system lies under ``root`` here."""
    return str(root / path.lstrip("/"))


def post_json(url: str, body: object, token: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return str(answer.read().decode())


@contextmanager
def serving(argv: list[str], health_url: str, timeout_s: float = 120) -> Iterator[subprocess.Popen[str]]:
    """Run ``argv`` until the block ends; yields once ``health_url`` answers 200."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{argv[1:3]} exited with {proc.returncode}:\n{proc.communicate()[0]}")
            try:
                with urllib.request.urlopen(health_url, timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{health_url} did not answer within {timeout_s} s")
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
