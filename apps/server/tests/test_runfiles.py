"""Console logs of the processes rlops starts: a fresh file each start, the earlier ones kept and bounded."""

from __future__ import annotations

import stat
from pathlib import Path

from rlops_server.runfiles import CONFIG_MODE, open_console_log


def test_each_start_keeps_the_previous_logs_up_to_keep(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "p.log"
    for start in range(1, 6):
        with open_console_log(log, keep=3) as out:
            out.write(f"start {start}\n".encode())
    assert log.read_text() == "start 5\n"
    kept = {p.name: p.read_text() for p in log.parent.glob("p.log.*")}
    assert kept == {"p.log.1": "start 4\n", "p.log.2": "start 3\n", "p.log.3": "start 2\n"}
    for path in (log, *log.parent.glob("p.log.*")):
        assert stat.S_IMODE(path.stat().st_mode) == CONFIG_MODE, path


def test_an_empty_log_is_not_kept_and_an_old_mode_is_corrected(tmp_path: Path) -> None:
    log = tmp_path / "p.log"
    log.touch(mode=0o666)
    log.chmod(0o666)
    with open_console_log(log) as out:
        out.write(b"now\n")
    assert not list(tmp_path.glob("p.log.*"))
    assert stat.S_IMODE(log.stat().st_mode) == CONFIG_MODE
