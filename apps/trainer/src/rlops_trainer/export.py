"""Export a trained policy as a policy directory: ``policy.pt`` (TorchScript) and ``model-card.json``.

``policy.pt`` holds the observation preprocessing and the action-selection rule, so it loads and runs
with plain torch: ``m = torch.jit.load(path)``, ``m(obs)`` gives per-action scores and
``m.action_probs(obs, temperature, epsilon)`` the action distribution. Before anything is written in
place, the reloaded file must agree with the eager model on a probe set (parity check). Directories
are written beside the target and renamed into place, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rlops_contracts import MODEL_CARD_FILE, POLICY_FILE

from rlops_trainer.card import NAME_RE, CardError, build_card, sha256_file, validate_card
from rlops_trainer.datasets import Transitions
from rlops_trainer.policy import PolicyModule, Selection

if TYPE_CHECKING:
    from rlops_trainer.training import TrainResult

PARITY_TOL = 1e-5
"""Largest allowed difference between exported and eager outputs (scores relative to max(1, |score|))."""
PROBE_ROWS = 256
"""Rows per kind of probe input (dataset sample, perturbed, uniform, corners)."""


class ExportError(RuntimeError):
    """The policy could not be exported faithfully (parity failure, non-finite outputs, bad target)."""


class PolicyDirError(ValueError):
    """A policy directory that cannot be trusted: missing files, a bad card, or a sha256 mismatch."""


# --- durable file operations (also used by the registry) -------------------------------------------


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (a rename is durable only once its dir is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and fsync it."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_file_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        write_file_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def card_bytes(card: dict[str, Any]) -> bytes:
    """The card as strict JSON text (no NaN or Infinity, which other JSON parsers reject)."""
    return (json.dumps(card, indent=2, allow_nan=False) + "\n").encode()


# --- parity ----------------------------------------------------------------------------------------


def probe_observations(data: Transitions, seed: int = 0, rows: int = PROBE_ROWS) -> np.ndarray:
    """Deterministic probe inputs: dataset rows, perturbed rows, and extremes inside the space.

    Extremes stay within the observation space but at most a few data ranges beyond the data: the
    bounds of some spaces are ±inf or ±3.4e38, where any network overflows and nothing is compared.
    """
    rng = np.random.default_rng(seed)
    obs = np.asarray(data.observation, dtype=np.float64).reshape(len(data), -1)
    sample = obs[rng.choice(len(obs), size=min(len(obs), rows), replace=False)]
    dmin, dmax = obs.min(axis=0), obs.max(axis=0)
    span = dmax - dmin + 1.0
    space = data.meta.observation_space
    low = np.broadcast_to(np.asarray(space.get("low", -np.inf), dtype=np.float64), dmin.shape)
    high = np.broadcast_to(np.asarray(space.get("high", np.inf), dtype=np.float64), dmin.shape)
    lo, hi = np.maximum(low, dmin - 3 * span), np.minimum(high, dmax + 3 * span)
    std = obs.std(axis=0)
    perturbed = np.clip(sample + rng.normal(size=sample.shape) * np.where(std > 0, std, 1.0), lo, hi)
    uniform = rng.uniform(lo, hi, size=(rows, len(lo)))
    corners = np.where(rng.random((rows, len(lo))) < 0.5, lo, hi)
    edges = np.stack([lo, hi, np.clip(np.zeros_like(lo), lo, hi)])
    return np.concatenate([sample, perturbed, uniform, corners, edges]).astype(np.float32)


def check_parity(
    eager: PolicyModule,
    exported: torch.jit.ScriptModule,
    probe: np.ndarray,
    selection: Selection,
    tol: float = PARITY_TOL,
) -> dict[str, float]:
    """Compare exported and eager outputs on ``probe``; returns the max deviations or raises ExportError."""
    x = torch.as_tensor(probe, dtype=torch.float32)
    deviations: dict[str, float] = {}
    with torch.no_grad():
        s_eager, s_exp = eager(x), exported(x)
        if not torch.isfinite(s_eager).all():
            rows = torch.nonzero(~torch.isfinite(s_eager).all(dim=-1)).flatten()[:5].tolist()
            raise ExportError(
                f"the policy gives non-finite scores on probe inputs (rows {rows}, "
                f"e.g. {probe[rows[0]].tolist()})"
            )
        deviations["scores"] = float(((s_exp - s_eager).abs() / s_eager.abs().clamp(min=1.0)).max())
        mismatched = int((s_exp.argmax(dim=-1) != s_eager.argmax(dim=-1)).sum())
        settings = {(selection.temperature, selection.epsilon), (0.0, 0.0), (1.0, 0.1)}
        for temperature, epsilon in sorted(settings):
            p_eager = eager.action_probs(x, temperature, epsilon)
            p_exp = exported.action_probs(x, temperature, epsilon)
            key = f"action_probs(temperature={temperature:g}, epsilon={epsilon:g})"
            deviations[key] = float((p_exp - p_eager).abs().max())
            both_scores, both_probs = exported.scores_and_probs(x, temperature, epsilon)
            key = f"scores_and_probs(temperature={temperature:g}, epsilon={epsilon:g})"
            deviations[key] = max(
                float((both_scores - s_exp).abs().max()), float((both_probs - p_exp).abs().max())
            )
    if mismatched:
        raise ExportError(
            f"exported and eager policies choose different actions on {mismatched} of {len(x)} probes"
        )
    worst = max(deviations, key=lambda k: deviations[k])
    if deviations[worst] > tol:
        raise ExportError(
            f"exported policy differs from the eager one: max deviation {deviations[worst]:.3g} in {worst} "
            f"(tolerance {tol:g})"
        )
    return deviations


# --- policy directories ----------------------------------------------------------------------------


def _prepare_target(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a directory; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MODEL_CARD_FILE).is_file():
        # Replacing is only safe for a previous export; anything else may be someone's data.
        raise ExportError(
            f"{out_dir}: exists and is not a policy directory (no {MODEL_CARD_FILE}); choose an empty "
            "or new output path"
        )


def _install_dir(tmp: Path, target: Path) -> None:
    """Move a fully written and synced ``tmp`` directory to ``target``, replacing a previous one."""
    fsync_path(tmp)
    old: Path | None = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old)


@contextmanager
def _torchscript() -> Iterator[None]:
    # TorchScript is deprecated upstream, but it is what TorchServe loads and what runs without
    # Python-side code; the choice is deliberate, so the per-call warning is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
        )
        yield


def script_policy(policy: PolicyModule) -> torch.jit.ScriptModule:
    """A TorchScript copy of ``policy`` on CPU in eval mode (``policy`` itself is left untouched)."""
    eager = copy.deepcopy(policy).cpu().eval()
    try:
        with _torchscript():
            return torch.jit.script(eager)
    except (RuntimeError, ValueError) as e:
        raise ExportError(f"the policy cannot be compiled with TorchScript: {e}") from e


def load_script(path: Path) -> torch.jit.ScriptModule:
    """Load a TorchScript file on CPU in eval mode."""
    with _torchscript():
        module = torch.jit.load(str(path), map_location="cpu")
    module.eval()
    return module


def write_policy_dir(result: TrainResult, data: Transitions, out_dir: Path, name: str) -> Path:
    """Script, parity-check and write ``result.policy`` with its model card to ``out_dir``.

    An existing policy directory at ``out_dir`` is replaced as a whole; returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    if not NAME_RE.match(name):
        raise ExportError(
            f"invalid policy name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    if result.dataset_fingerprint != data.fingerprint():
        raise ExportError(
            f"the dataset given for the model card ({data.fingerprint()}) is not the one the policy was "
            f"trained on ({result.dataset_fingerprint})"
        )
    _prepare_target(out_dir)
    try:
        card = build_card(result, data, name)
    except CardError as e:
        raise ExportError(f"cannot build the model card: {e}") from e
    eager = copy.deepcopy(result.policy).cpu().eval()
    scripted = script_policy(eager)
    buf = io.BytesIO()
    with _torchscript():
        torch.jit.save(scripted, buf)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        write_file_synced(tmp / POLICY_FILE, buf.getvalue())
        reloaded = load_script(tmp / POLICY_FILE)
        check_parity(eager, reloaded, probe_observations(data), result.selection)
        card["files"] = {POLICY_FILE: sha256_file(tmp / POLICY_FILE)}
        validate_card(card, source=f"model card of {name}")
        write_file_synced(tmp / MODEL_CARD_FILE, card_bytes(card))
        _prepare_target(out_dir)
        _install_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def read_card(path: Path) -> dict[str, Any]:
    """The validated model card of the policy directory ``path``."""
    card_path = Path(path) / MODEL_CARD_FILE
    if not card_path.is_file():
        raise PolicyDirError(f"{path}: not a policy directory (no {MODEL_CARD_FILE})")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise PolicyDirError(f"{card_path}: not valid JSON: {e}") from e
    try:
        return validate_card(card, source=str(card_path))
    except CardError as e:
        raise PolicyDirError(str(e)) from e


def verify_files(path: Path, card: dict[str, Any]) -> None:
    """Check every file listed in the card against its sha256; raises PolicyDirError naming the file."""
    for fname, digest in card["files"].items():
        file = Path(path) / fname
        if not file.is_file():
            raise PolicyDirError(f"{path}: {fname} is listed in {MODEL_CARD_FILE} but missing")
        actual = sha256_file(file)
        if actual != digest:
            raise PolicyDirError(
                f"{path}: {fname} does not match its sha256 in {MODEL_CARD_FILE} (card {digest[:19]}…, "
                f"file {actual[:19]}…): it was modified or only partly written"
            )


def load_policy_dir(path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load a policy directory after checking its card and the sha256 of every listed file."""
    path = Path(path)
    if not path.is_dir():
        raise PolicyDirError(f"{path}: no such policy directory")
    card = read_card(path)
    verify_files(path, card)
    return load_script(path / POLICY_FILE), card
