"""The peers' virtual environments, shared by the benchmarks that run them.

Each peer lives in its own environment, built from its pinned requirements file and rebuilt when that file
changes (d3rlpy pins a gymnasium that cannot share an environment with Ray; SB3 stays out of the project's):

    .venv/bin/python benchmarks/peers.py d3rlpy   # benchmarks/.venv-d3rlpy (offline.py, continuous.py)
    .venv/bin/python benchmarks/peers.py sb3      # benchmarks/.venv-sb3 (online.py, mujoco_data.py)

The benchmarks build them on first use; this command is for running a peer's script by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import subprocess
import sys
from pathlib import Path

from rich.console import Console

BENCH = Path(__file__).resolve().parent
PEERS = {
    "d3rlpy": (BENCH / ".venv-d3rlpy", BENCH / "requirements-d3rlpy.txt"),
    "sb3": (BENCH / ".venv-sb3", BENCH / "requirements-sb3.txt"),
}

console = Console(stderr=True)


class BenchmarkError(RuntimeError):
    """A step of a benchmark failed; the message says which and where its log is."""


def _pip(python: Path, args: list[str], log: Path) -> None:
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise BenchmarkError(f"'{shlex.join(cmd)}' failed with exit code {done.returncode}; see {log}")


def torch_pin(requirements: Path) -> str:
    """The file's ``torch==X.Y.Z`` line."""
    for line in requirements.read_text().splitlines():
        if line.strip().lower().startswith("torch=="):
            return line.strip()
    raise BenchmarkError(f"{requirements} pins no torch version (a line 'torch==X.Y.Z' is expected)")


def ensure_venv(venv: Path, requirements: Path, log: Path) -> Path:
    """The interpreter of ``venv``, (re)created when ``requirements`` changed since it was built."""
    python = venv / "bin" / "python"
    stamp = venv / ".requirements.sha256"
    wanted = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return python
    pin = torch_pin(requirements)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    with console.status(f"creating {venv} from {requirements.name} (log: {log})"):
        # The base interpreter is this one (Python 3.11), which the peers' pins are made for.
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        # torch first, alone: it resolves to the machine's local CPU wheel, where a resolver pass over the
        # whole file could pick the multi-gigabyte CUDA build from the index.
        _pip(python, [pin], log)
        _pip(python, ["-r", str(requirements)], log)
    stamp.write_text(wanted + "\n")
    return python


def ensure_peer(name: str, log: Path) -> Path:
    """The interpreter of peer ``name``'s environment (see :data:`PEERS`)."""
    venv, requirements = PEERS[name]
    return ensure_venv(venv, requirements, log)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("peer", choices=sorted(PEERS), help="the environment to build")
    args = parser.parse_args()
    log = BENCH / "results" / f"{args.peer}-venv.log"
    try:
        python = ensure_peer(args.peer, log)
    except BenchmarkError as e:
        console.print(f"[red]{e}[/red]")
        raise SystemExit(1) from None
    print(python)


if __name__ == "__main__":
    main()
