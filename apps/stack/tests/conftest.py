"""Fixtures of the stack tests: free ports, a small logged CartPole dataset and real trained policies."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

# One torch thread per process: the CI box has two cores and parallel BLAS only contends.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

POLICY = "cartpole"


@pytest.fixture
def free_ports() -> Callable[[int], list[int]]:
    def pick(n: int) -> list[int]:
        socks = []
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        ports = [s.getsockname()[1] for s in socks]
        for s in socks:
            s.close()
        return ports

    return pick


@pytest.fixture(scope="session")
def cartpole_data() -> Any:
    """A small logged CartPole dataset (random behaviour, exact propensities)."""
    from rlops_trainer.collect import collect

    return collect("CartPole-v1", "random", 30, seed=0, progress=False)


@pytest.fixture(scope="session")
def trained_policy(tmp_path_factory: pytest.TempPathFactory, cartpole_data: Any) -> Callable[[int], Path]:
    """``trained_policy(seed)``: a real, briefly trained BC policy directory for ``cartpole_data``."""
    from rlops_trainer.algos.bc import BCConfig, train
    from rlops_trainer.export import write_policy_dir
    from rlops_trainer.training import RunOptions

    root = tmp_path_factory.mktemp("policies")
    made: dict[int, Path] = {}

    def make(seed: int) -> Path:
        if seed not in made:
            result = train(
                BCConfig(steps=30, seed=seed, batch_size=64), cartpole_data, RunOptions(progress=False)
            )
            made[seed] = write_policy_dir(result, cartpole_data, root / f"seed-{seed}", POLICY)
        return made[seed]

    return make


@pytest.fixture
def publish() -> Callable[..., int]:
    """``publish(registry, policy_dir, promote=...)``: the next version; with ``promote`` the champion."""
    from rlops_trainer.registry import Registry

    def run(registry: Path, policy_dir: Path, *, promote: bool) -> int:
        reg = Registry(registry)
        version = reg.publish(policy_dir, POLICY)
        if promote:
            reg.promote(POLICY, version, require_gate=False, force_reason="test champion")
        return version

    return run
