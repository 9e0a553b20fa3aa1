"""Files of the processes rlops runs on one machine: who may read them, and their console logs.

Configs, state files and logs are :data:`CONFIG_MODE` (the owner writes, the group reads, others
nothing), folders of them :data:`DIR_MODE`, folders that hold secrets :data:`PRIVATE_DIR_MODE`. Every
process rlops starts runs with :data:`RUN_UMASK`, so nothing it writes is readable by others either.
Used by the local server (:mod:`rlops_server.torchserve.process`) and the local monitoring stack.
"""

from __future__ import annotations

import logging.handlers
import os
from pathlib import Path
from typing import BinaryIO

CONFIG_MODE = 0o640
"""Configs, state files and logs: the owner writes, the group reads, others nothing."""
DIR_MODE = 0o750
"""Folders of configs and logs: the group may read them, others nothing."""
PRIVATE_DIR_MODE = 0o700
"""A folder that holds secrets (a server's run directory holds its keys)."""
SECRET_MODE = 0o600
"""A file that holds a secret."""
RUN_UMASK = 0o027
"""The umask of every process rlops starts: nothing it creates is readable by others."""
CONSOLE_BACKUPS = 5
"""Console logs of earlier starts kept beside the current one (``<log>.1`` is the newest)."""


def open_console_log(path: Path, keep: int = CONSOLE_BACKUPS) -> BinaryIO:
    """A fresh console log for a process about to start, mode :data:`CONFIG_MODE`, opened for appending.

    The previous start's log, if it holds anything, becomes ``<path>.1``, the one before it ``.2`` and so
    on up to ``.<keep>``; older ones are deleted. The same names as :mod:`logging.handlers`'
    ``RotatingFileHandler``, which does the renaming, so a process that also rotates its log by size
    continues the same series.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size > 0:
        rotator = logging.handlers.RotatingFileHandler(path, backupCount=keep, delay=True)
        rotator.doRollover()
        rotator.close()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, CONFIG_MODE)
    os.fchmod(fd, CONFIG_MODE)
    return os.fdopen(fd, "ab")
