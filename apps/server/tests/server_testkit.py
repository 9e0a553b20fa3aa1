"""Fixtures for the server tests: tiny TorchScript policies with valid model cards, in a registry layout.

The policies are built here, not by the trainer (the server never imports it): an ``nn.Module`` with the
same interface as the trainer's export, ``forward(obs) -> scores`` and an exported
``action_probs(obs, temperature, epsilon)``. Its scores are easy to predict: ``sign * obs[:, :3]``
(three actions), and NaN for every row whose last feature is >= 1000 (to exercise the fallback path).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any

# One torch thread per process: the CI box has two cores and parallel BLAS only contends.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from rlops_contracts.artifact import seal
from torch import nn

torch.set_num_threads(1)

OBS_DIM = 4
N_ACTIONS = 3
POISON = 1000.0
"""Rows whose last feature is at least this get NaN scores."""
EDGES = [-1.0, 0.0, 1.0]
"""Reference bin edges of every feature: bins (-inf,-1) [-1,0) [0,1) [1,inf)."""
ACTION_PROPORTIONS = [0.2, 0.5, 0.3]
"""Reference action proportions: the default fallback action is 1."""


class TinyPolicy(nn.Module):
    def __init__(self, sign: float) -> None:
        super().__init__()
        self.sign = sign
        self.poison = POISON

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        scores = self.sign * obs[:, :3]
        poisoned = obs[:, 3:4] >= self.poison
        return torch.where(poisoned, torch.full_like(scores, float("nan")), scores)

    @torch.jit.export
    def action_probs(self, obs: torch.Tensor, temperature: float, epsilon: float) -> torch.Tensor:
        scores = self.forward(obs)
        n = scores.shape[-1]
        if temperature > 0.0:
            probs = torch.softmax(scores / temperature, dim=-1)
        else:
            probs = torch.nn.functional.one_hot(scores.argmax(dim=-1), n).to(scores.dtype)
        return (1.0 - epsilon) * probs + epsilon / n


class OnePassTinyPolicy(TinyPolicy):
    """TinyPolicy that also exports ``scores_and_probs``, as policies exported by rlops do."""

    @torch.jit.export
    def scores_and_probs(
        self, obs: torch.Tensor, temperature: float, epsilon: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(obs), self.action_probs(obs, temperature, epsilon)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_card(
    name: str,
    version: int | None,
    policy_sha: str,
    score_kind: str = "q_values",
    temperature: float = 0.0,
    epsilon: float = 0.0,
) -> dict[str, Any]:
    now = "2025-01-01T00:00:00Z"
    fingerprint = "sha256:" + "0" * 64
    return {
        "schema_version": 1,
        "name": name,
        "version": version,
        "created_at": now,
        "algorithm": "test",
        "hyperparameters": {},
        "dataset": {
            "fingerprint": fingerprint,
            "env_id": "Toy-v0",
            "n_transitions": 100,
            "n_episodes": 4,
            "source": "test",
            "behavior_policy": "random",
        },
        "observation_space": {
            "type": "Box",
            "shape": [OBS_DIM],
            "dtype": "float32",
            "low": ["-inf"] * OBS_DIM,
            "high": ["inf"] * OBS_DIM,
        },
        "action_space": {"type": "Discrete", "n": N_ACTIONS},
        "policy": {
            "file": "policy.pt",
            "score_kind": score_kind,
            "input": {"dtype": "float32", "shape": [-1, OBS_DIM]},
            "selection": {"temperature": temperature, "epsilon": epsilon},
            "torch_version": torch.__version__,
        },
        "training": {"steps": 1, "wall_time_s": 0.1, "device": "cpu", "final_metrics": {}},
        "evaluation": None,
        "gate": None,
        "reference": {
            "observation": {
                "n": 100,
                "mean": [0.0] * OBS_DIM,
                "std": [1.0] * OBS_DIM,
                "min": [-2.0] * OBS_DIM,
                "max": [2.0] * OBS_DIM,
                "bins": [{"edges": EDGES, "proportions": [0.25] * 4} for _ in range(OBS_DIM)],
            },
            "actions": {"n": 100, "proportions": ACTION_PROPORTIONS},
        },
        "lineage": [
            {
                "event": "trained",
                "at": now,
                "algorithm": "test",
                "dataset_fingerprint": fingerprint,
                "steps": 1,
            }
        ],
        "files": {"policy.pt": policy_sha},
    }


def write_policy_dir(
    path: Path,
    name: str = "toy",
    version: int | None = 1,
    sign: float = 1.0,
    score_kind: str = "q_values",
    temperature: float = 0.0,
    epsilon: float = 0.0,
    one_pass: bool = False,
) -> Path:
    """A policy directory (policy.pt, model-card.json, SHA256SUMS) at ``path``; ``one_pass`` exports
    ``scores_and_probs`` too."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        module = OnePassTinyPolicy(sign) if one_pass else TinyPolicy(sign)
        scripted = torch.jit.script(module.eval())
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
    data = buf.getvalue()
    path.mkdir(parents=True, exist_ok=True)
    (path / "policy.pt").write_bytes(data)
    seal(path, make_card(name, version, sha256(data), score_kind, temperature, epsilon))
    return path


def write_registry(root: Path, name: str = "toy", candidate: bool = True) -> Path:
    """A registry with version 1 (champion, greedy on +obs) and version 2 (candidate, greedy on -obs)."""
    write_policy_dir(root / name / "1", name, 1, sign=1.0)
    aliases = {"champion": 1}
    if candidate:
        write_policy_dir(
            root / name / "2", name, 2, sign=-1.0, score_kind="logits", temperature=1.0, epsilon=0.1
        )
        aliases["candidate"] = 2
    (root / name / "aliases.json").write_text(json.dumps(aliases), encoding="utf-8")
    return root


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    return write_policy_dir(tmp_path / "policy")


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_registry(tmp_path_factory.mktemp("registry"))


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
