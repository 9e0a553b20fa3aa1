"""Append-only JSON-lines logs written off the request path: the decision log (and the reward log).

:meth:`DecisionLog.write` puts the record on a bounded in-memory queue and returns: no serialisation,
no I/O and no waiting on the caller's thread; :meth:`DecisionLog.encode_and_write` serialises on the
caller's thread first (see there why the TorchServe handler prefers it). When the queue is full the
record is dropped and counted, because a slow disk must never slow down or stall inference. A background
thread serialises what is still a record as a JSON line and appends the lines to files laid out as
partitions::

    <directory>/<stream>/date=YYYY-MM-DD/<prefix><host>-<pid>-<start>-<seq>.jsonl

A file being written is named ``….jsonl.tmp``; it is fsynced and renamed to ``….jsonl`` when it is
complete: when it reaches ``rotate_bytes``, is ``rotate_seconds`` old, the UTC date changes, or the log
is closed. Readers take ``*.jsonl`` only, so they never see a half-written file as complete. The date
partition is the UTC date on which the file was opened. A ``.tmp`` left behind by a process of this
host that died is sealed (cut back to its last complete line) by the next log opened on that stream.

:meth:`DecisionLog.close` stops accepting records, writes every record still queued and seals the file;
it runs at interpreter exit too (atexit), and a second call does nothing.

``write_through=True`` (what serving uses) hands the lines to the operating system before
:meth:`DecisionLog.encode_and_write` returns, in one unbuffered ``write`` per call on the caller's thread:
a process killed right after it answered (SIGKILL, an out-of-memory kill) loses no decision it answered,
since the kernel holds the bytes; only a crash of the machine itself can (files are fsynced when sealed).
It costs the request path one system call per server batch. Rotation and sealing stay on the writer
thread, which shares one lock with the callers for the open file.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import datetime as dt
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from rlops_contracts import DECISION_FIELDS  # noqa: F401  (re-exported)
from rlops_contracts.durable import fsync_path

log = logging.getLogger(__name__)


DECISIONS_STREAM = "decisions"
SUFFIX = ".jsonl"
TMP_SUFFIX = ".jsonl.tmp"

_BATCH = 2048
"""Records serialised per write() call to the file: large enough to amortise the syscall."""

# Open .tmp files of every log in this process: recovery must not seal a file that a live log writes.
_ACTIVE: set[Path] = set()
_ACTIVE_LOCK = threading.Lock()


def _default(value: Any) -> Any:
    # numpy scalars and arrays (from the handler) serialise as their plain Python values.
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


_ORJSON_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY


def _encode(record: dict[str, Any]) -> bytes:
    # orjson: serialisation is most of the writer thread's time, which shares the worker's core.
    # It would write NaN/inf as null, so they are refused here: a log must say what was decided.
    line = orjson.dumps(record, default=_default, option=_ORJSON_OPTIONS)
    # Every None at the top level (an absent episode id or mask) is one null; only when there are more
    # nulls than that can one be a NaN, and only then is the record walked (in Python, so rarely).
    nulls = line.count(b"null")
    if nulls and nulls > list(record.values()).count(None) and _has_nonfinite(record):
        raise ValueError("record holds NaN or infinity, which JSON cannot represent")
    return line


def _has_nonfinite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_nonfinite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_nonfinite(v) for v in value)
    tolist = getattr(value, "tolist", None)
    return callable(tolist) and _has_nonfinite(tolist())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def complete_files(root: Path) -> list[Path]:
    """Every complete ``*.jsonl`` file under ``root`` (any depth), in path order; ``.tmp`` files skipped."""
    return sorted(p for p in root.rglob("*" + SUFFIX) if p.is_file() and not p.name.startswith("."))


class DecisionLog:
    """A bounded, non-blocking, rotating JSON-lines log (see the module docstring).

    ``stream`` names the sub-directory (``decisions`` for the decision log, ``rewards`` for the feedback
    service) and ``file_prefix`` starts every file name.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        max_queue: int = 10000,
        rotate_bytes: int = 64 << 20,
        rotate_seconds: float = 300.0,
        flush_seconds: float = 1.0,
        stream: str = DECISIONS_STREAM,
        file_prefix: str = "",
        write_through: bool = False,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if rotate_bytes < 1:
            raise ValueError(f"rotate_bytes must be at least 1, got {rotate_bytes}")
        if not rotate_seconds > 0 or not flush_seconds > 0:
            raise ValueError(
                f"rotate_seconds and flush_seconds must be positive, got {rotate_seconds} and {flush_seconds}"
            )
        if not stream or "/" in stream or stream.startswith("."):
            raise ValueError(f"stream must be a plain directory name, got {stream!r}")
        self.root = Path(directory) / stream
        self.max_queue = max_queue
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.flush_seconds = flush_seconds
        self.write_through = write_through
        self._prefix = f"{file_prefix}{socket.gethostname().replace('/', '_')}-{os.getpid()}-"
        self._start = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        self._seq = 0

        self._queue: collections.deque[dict[str, Any] | bytes] = collections.deque()
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
        """Held by whoever touches the open file: the writer thread, or a caller in write-through mode."""
        self._closed = False
        self._dropped = 0
        self._written = 0
        self._failed = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None

        # The writer thread's file; only the writer (and close(), after joining it) touches these.
        self._file: BinaryIO | None = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._file_bytes = 0
        self._file_opened = 0.0
        self._file_date = ""
        self._last_flush = 0.0
        self.sealed: list[Path] = []
        """Complete files written by this log, oldest first."""

        self.root.mkdir(parents=True, exist_ok=True)
        self.recovered = self._recover_orphans()
        self._thread = threading.Thread(target=self._run, name=f"rlops-log-{stream}", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # --- the request path ---------------------------------------------------------------------------

    def write(self, record: dict[str, Any]) -> bool:
        """Queue ``record`` for writing; ``False`` (and one more :attr:`dropped`) when full or closed.

        The record is serialised later on the writer thread: do not mutate it after handing it over.
        In write-through mode it is written now (:meth:`encode_and_write`).
        """
        if self.write_through:
            return self.encode_and_write([record]) == 1
        with self._lock:
            if self._closed or len(self._queue) >= self.max_queue:
                self._dropped += 1
                return False
            self._queue.append(record)
        return True

    def encode_and_write(self, records: Iterable[dict[str, Any]]) -> int:
        """Serialise ``records`` on the caller's thread, then queue them as :meth:`write` does; returns how
        many were queued (the others are counted as :attr:`failed` or :attr:`dropped`).

        For a request thread that shares its process with the writer: serialising costs it a few
        microseconds a record, and in exchange the writer thread only does I/O, which releases the
        interpreter lock. A writer that serialises holds the lock for as long as it takes, and the
        request thread, which lets go of the lock in every forward pass, then waits up to the
        interpreter's switch interval (5 ms) to get it back; the queued records also keep the garbage
        collector busy. Measured in-process, 256-observation requests: p99 30 ms with :meth:`write`,
        about 10 ms this way (``benchmarks/serving.py``, docs/benchmarks.md).
        """
        lines: list[bytes] = []
        for record in records:
            try:
                lines.append(_encode(record))
            except (TypeError, ValueError) as e:
                with self._lock:
                    self._count_failed(e)
        if self.write_through:
            with self._io_lock:
                if self._closed:
                    with self._lock:
                        self._dropped += len(lines)
                    return 0
                failed = self._failed
                self._write_batch(list(lines))
                return len(lines) - (self._failed - failed)
        with self._lock:
            room = 0 if self._closed else max(self.max_queue - len(self._queue), 0)
            accepted = lines[:room]
            self._dropped += len(lines) - len(accepted)
            self._queue.extend(accepted)
        return len(accepted)

    def _count_failed(self, error: Exception) -> None:
        self._failed += 1
        if self._failed <= 10 or self._failed % 10000 == 0:
            log.error("%s: record not written (%s); %d failed so far", self.root, error, self._failed)

    @property
    def dropped(self) -> int:
        """Records refused because the queue was full or the log closed."""
        return self._dropped

    @property
    def written(self) -> int:
        """Records written to a file (sealed or still open)."""
        return self._written

    @property
    def failed(self) -> int:
        """Records that could not be written: not serialisable as JSON, or an I/O error."""
        return self._failed

    @property
    def pending(self) -> int:
        """Records queued and not yet written."""
        return len(self._queue)

    @property
    def healthy(self) -> bool:
        """False once the writer thread died; records then only queue up and get dropped."""
        return self._error is None and (self._thread.is_alive() or self._done.is_set())

    # --- shutdown -------------------------------------------------------------------------------------

    def close(self, timeout: float | None = 30.0) -> bool:
        """Stop accepting records, write every queued one and seal the file. Idempotent.

        Returns ``True`` when nothing queued was left unwritten (within ``timeout`` seconds).
        """
        with self._io_lock, self._lock:
            already = self._closed
            self._closed = True
        if not already:
            with contextlib.suppress(Exception):
                atexit.unregister(self.close)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error(
                "%s: writer still busy after %.1f s; %d records not written yet",
                self.root,
                timeout or 0,
                self.pending,
            )
            return False
        if not self._done.is_set():
            # The writer died (the error was logged); whoever closes writes what is left.
            self._done.set()
            with self._io_lock:
                self._drain_all()
                self._seal()
        return not self._queue

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the writer thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        poll = min(0.05, self.flush_seconds)
        try:
            while True:
                stopping = self._stop.is_set()
                with self._io_lock:
                    wrote = self._drain_all()
                    self._maintain()
                if stopping:
                    break
                if not wrote:
                    self._wake.wait(poll)
                    self._wake.clear()
            with self._io_lock:
                self._seal()
            self._done.set()
        except BaseException as e:  # pragma: no cover - disk or interpreter failure
            self._error = e
            log.exception(
                "%s: the log writer stopped; records are queued and will be dropped when full", self.root
            )

    def _drain_all(self) -> bool:
        wrote = False
        while self._queue:
            batch: list[dict[str, Any] | bytes] = []
            with contextlib.suppress(IndexError):
                for _ in range(_BATCH):
                    batch.append(self._queue.popleft())
            if batch:
                self._write_batch(batch)
                wrote = True
        return wrote

    def _write_batch(self, batch: list[dict[str, Any] | bytes]) -> None:
        lines: list[bytes] = []
        for record in batch:
            if isinstance(record, bytes):  # serialised by encode_and_write
                lines.append(record)
                continue
            try:
                lines.append(_encode(record))
            except (TypeError, ValueError) as e:
                with self._lock:  # encode_and_write counts on other threads
                    self._count_failed(e)
        if self._file is not None and self._file_date != _today():
            self._seal()
        start = 0
        while start < len(lines):
            # Fill the open file up to rotate_bytes (crossing it by at most one line), then seal it.
            room = self.rotate_bytes - self._file_bytes
            end, size = start, 0
            while end < len(lines) and size < room:
                size += len(lines[end])
                end += 1
            try:
                f = self._file if self._file is not None else self._open()
                _write_all(f, b"".join(lines[start:end]))
            except OSError as e:
                lost = len(lines) - start
                with self._lock:
                    self._failed += lost
                log.error("%s: %d records lost to an I/O error: %s", self.root, lost, e)
                self._abandon()
                return
            self._written += end - start
            self._file_bytes += size
            if self._file_bytes >= self.rotate_bytes:
                self._seal()
            start = end

    def _maintain(self) -> None:
        if self._file is None:
            return
        now = time.monotonic()
        try:
            if now - self._file_opened >= self.rotate_seconds or self._file_date != _today():
                self._seal()
            elif now - self._last_flush >= self.flush_seconds:
                self._file.flush()
                self._last_flush = now
        except OSError as e:
            log.error("%s: flushing the open log file failed: %s", self.root, e)
            self._abandon()

    def _open(self) -> BinaryIO:
        day = _today()
        directory = self.root / f"date={day}"
        directory.mkdir(parents=True, exist_ok=True)
        while True:
            stem = f"{self._prefix}{self._start}-{self._seq:06d}"
            self._seq += 1
            tmp, final = directory / (stem + TMP_SUFFIX), directory / (stem + SUFFIX)
            if final.exists():
                continue
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            break
        # Write-through: no buffer of our own, every write() reaches the kernel at once.
        f = os.fdopen(fd, "wb", buffering=0 if self.write_through else 1 << 20)
        self._file = f
        self._tmp, self._final = tmp, final
        with _ACTIVE_LOCK:
            _ACTIVE.add(tmp)
        self._file_bytes = 0
        self._file_opened = self._last_flush = time.monotonic()
        self._file_date = day
        return f

    def _seal(self) -> None:
        """Make the open file complete: flush, fsync, rename ``.tmp`` → ``.jsonl``."""
        f, tmp, final = self._file, self._tmp, self._final
        if f is None or tmp is None or final is None:
            return
        self._file = self._tmp = self._final = None
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, final)
            fsync_path(final.parent)
            self.sealed.append(final)
        except OSError as e:
            log.error("%s: sealing %s failed: %s", self.root, tmp, e)
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(tmp)

    def _abandon(self) -> None:
        # After an I/O error the open file is in an unknown state: seal what is there, start a new one.
        with contextlib.suppress(OSError):
            self._seal()
        self._file = self._tmp = self._final = None

    # --- recovery -------------------------------------------------------------------------------------

    def _recover_orphans(self) -> list[Path]:
        """Seal ``.tmp`` files that a dead process of this host left behind; returns the sealed files."""
        host = self._prefix.rsplit("-", 2)[0]
        recovered = []
        for tmp in sorted(self.root.glob(f"date=*/*{TMP_SUFFIX}")):
            parts = tmp.name[: -len(TMP_SUFFIX)].rsplit("-", 3)
            if len(parts) != 4 or parts[0] != host or not parts[1].isdigit():
                continue
            pid = int(parts[1])
            with _ACTIVE_LOCK:
                active = tmp in _ACTIVE
            if active or (pid != os.getpid() and _pid_alive(pid)):
                continue
            final = tmp.with_name(tmp.name[: -len(TMP_SUFFIX)] + SUFFIX)
            try:
                data = tmp.read_bytes()
                keep = data[: data.rfind(b"\n") + 1]
                if not keep:
                    tmp.unlink()
                    continue
                if len(keep) != len(data):
                    with open(tmp, "r+b") as f:
                        f.truncate(len(keep))
                        os.fsync(f.fileno())
                os.replace(tmp, final)
            except OSError as e:
                log.warning("%s: could not recover %s: %s", self.root, tmp, e)
                continue
            log.warning(
                "%s: sealed %s left open by a process that is gone (%d bytes of a partial line dropped)",
                self.root,
                final.name,
                len(data) - len(keep),
            )
            recovered.append(final)
        return recovered


def _write_all(f: BinaryIO, data: bytes) -> None:
    # An unbuffered file may take part of the bytes in one call (a signal, a full pipe): write the rest.
    view = memoryview(data)
    while view:
        n = f.write(view)
        view = view[n if n is not None else len(view) :]


def _today() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
