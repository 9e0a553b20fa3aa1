"""Checkpoints of a training run: everything to resume it exactly where it stopped.

A checkpoint (``<out>/checkpoints/step-<n>.pt``) holds the learner's and the optimiser's state, the
step, the metrics window and every random generator, so a resumed run ends with the same weights as an
uninterrupted one. It is written atomically (a crash never leaves half a checkpoint) and the latest
complete one is what ``--resume`` picks up.
"""

from __future__ import annotations

import random
import re
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rlops_contracts.durable import atomic_file

if TYPE_CHECKING:
    from rlops_trainer.training import Learner, MetricWindow, RunOptions

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = 1
_CHECKPOINT_RE = re.compile(r"^step-(\d{9})\.pt$")
_KEEP_CHECKPOINTS = 2


def checkpoint_dir(out_dir: Path) -> Path:
    return out_dir / CHECKPOINT_DIR


def latest_checkpoint(out_dir: Path) -> Path | None:
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.iterdir() if _CHECKPOINT_RE.match(p.name))
    return found[-1] if found else None


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, rename: a crash never leaves half a file."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    # Plain lists and tensors only, so that the file loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = typing.cast(tuple[Any, ...], np.random.get_state(legacy=True))
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "sampler": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    if generator is not None:
        generator.set_state(state["sampler"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: Path,
    *,
    algorithm: str,
    config: dict[str, Any],
    fingerprint: str,
    step: int,
    learner: Learner,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    window: MetricWindow,
) -> Path:
    path = checkpoint_dir(out_dir) / f"step-{step:09d}.pt"
    atomic_save(
        {
            "format": CHECKPOINT_FORMAT,
            "algorithm": algorithm,
            "config": config,
            "dataset_fingerprint": fingerprint,
            "step": step,
            "learner": learner.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": _rng_state(generator),
            "window": {"names": window.names, "total": window.total.cpu(), "count": window.count},
        },
        path,
    )
    for old in sorted(p for p in path.parent.iterdir() if _CHECKPOINT_RE.match(p.name))[:-_KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(
    path: Path, *, algorithm: str, config: dict[str, Any], fingerprint: str
) -> dict[str, Any]:
    """Read a checkpoint and check that it belongs to this run (same algorithm, data and config)."""
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} cannot be read: {exc}") from exc
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {path} has format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}"
        )
    if state["algorithm"] != algorithm:
        raise ValueError(f"checkpoint {path} was written by '{state['algorithm']}', not '{algorithm}'")
    if state["dataset_fingerprint"] != fingerprint:
        raise ValueError(
            f"checkpoint {path} was trained on dataset {state['dataset_fingerprint']}, "
            f"but this run's dataset is {fingerprint}"
        )
    # A longer run may continue a shorter one; every other hyperparameter must match.
    differ = sorted(k for k in config if k != "steps" and state["config"].get(k) != config[k])
    if differ:
        detail = ", ".join(f"{k}: {state['config'].get(k)!r} -> {config[k]!r}" for k in differ)
        raise ValueError(f"checkpoint {path} was trained with other hyperparameters ({detail})")
    return state


def restore(
    state: dict[str, Any],
    learner: Learner,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None,
    window: MetricWindow,
) -> int:
    """Load a checkpoint into the run's objects and return its step.

    ``generator=None`` leaves the minibatch stream alone (the Ray path re-seeds each worker's).
    """
    learner.load_state_dict(state["learner"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"], generator)
    if state["window"]["names"] == window.names:
        window.total.copy_(state["window"]["total"])
        window.count = int(state["window"]["count"])
    return int(state["step"])


def resume_checkpoint(run: RunOptions) -> Path | None:
    """The checkpoint this run continues from, if any; creates ``run.out_dir``.

    Refuses to start afresh over an earlier run's checkpoints: a later resume would mix the two.
    """
    if run.out_dir is None:
        return None
    run.out_dir.mkdir(parents=True, exist_ok=True)
    latest = latest_checkpoint(run.out_dir)
    if latest is not None and not run.resume:
        raise ValueError(
            f"{run.out_dir} already holds checkpoints of an earlier run (latest {latest.name}); "
            "resume it (--resume) or choose another output directory"
        )
    return latest
