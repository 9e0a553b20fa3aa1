"""Export a trained policy as a policy directory: ``policy.pt`` (TorchScript), ``model-card.json`` and
``SHA256SUMS`` (the artifact contract, :mod:`rlops_contracts.artifact`).

``policy.pt`` holds the observation preprocessing and the action-selection rule, so it loads and runs
with plain torch: ``m = torch.jit.load(path)``. A Discrete policy gives per-action scores from ``m(obs)``
and the action distribution from ``m.action_probs(obs, temperature, epsilon)``; a Box policy gives the
deterministic action from ``m(obs)``, an explored action and its log-density from ``m.act(obs, std)``
and the log-density of given actions from ``m.log_prob(obs, action, std)``. Before anything is written
in place, the reloaded file must agree with the eager model on a probe set (parity check). Directories
are written beside the target and renamed into place, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import copy
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rlops_contracts import MODEL_CARD_FILE, POLICY_FILE
from rlops_contracts.artifact import seal, verify_policy_dir
from rlops_contracts.card import NAME_RE, CardError
from rlops_contracts.durable import install_dir, write_new

from rlops_trainer.card import build_card
from rlops_trainer.datasets import Transitions
from rlops_trainer.policy import ContinuousPolicyModule, PolicyModule, Selection

if TYPE_CHECKING:
    from rlops_trainer.training import TrainResult

PARITY_TOL = 1e-5
"""Largest allowed difference between exported and eager outputs (scores relative to max(1, |score|))."""
PROBE_ROWS = 256
"""Rows per kind of probe input (dataset sample, perturbed, uniform, corners)."""
PROBE_STD = 0.3
"""Exploration noise (pre-squash units) at which a Box policy's ``act`` and ``log_prob`` are compared
besides the card's own ``std``: a card with ``std`` 0 would otherwise leave them untested."""


class ExportError(RuntimeError):
    """The policy could not be exported faithfully (parity failure, non-finite outputs, bad target)."""


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


def within_tolerance(deviations: dict[str, float], tol: float) -> dict[str, float]:
    """``deviations`` when the largest is within ``tol``; otherwise ExportError naming the output."""
    worst = max(deviations, key=lambda k: deviations[k])
    if deviations[worst] > tol:
        raise ExportError(
            f"exported policy differs from the eager one: max deviation {deviations[worst]:.3g} in {worst} "
            f"(tolerance {tol:g})"
        )
    return deviations


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
    return within_tolerance(deviations, tol)


def probe_actions(low: np.ndarray, high: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    """Deterministic actions strictly inside the Box ``[low, high]``, one per probe row."""
    rng = np.random.default_rng(seed)
    # 0.999 of the width: log-densities blow up at the bounds, where nothing useful is compared.
    mid, half = (high + low) / 2.0, 0.999 * (high - low) / 2.0
    return (mid + half * rng.uniform(-1.0, 1.0, size=(rows, len(low)))).astype(np.float32)


def _deviation(exported: torch.Tensor, eager: torch.Tensor) -> float:
    return float(((exported - eager).abs() / eager.abs().clamp(min=1.0)).max())


def _require_finite(values: torch.Tensor, what: str, probe: np.ndarray) -> None:
    bad = ~torch.isfinite(values)
    if bad.any():
        rows = torch.nonzero(bad.reshape(len(values), -1).any(dim=-1)).flatten()[:5].tolist()
        raise ExportError(
            f"the policy gives non-finite {what} on probe inputs (rows {rows}, "
            f"e.g. {probe[rows[0]].tolist()})"
        )


def check_continuous_parity(
    eager: ContinuousPolicyModule,
    exported: torch.jit.ScriptModule,
    probe: np.ndarray,
    selection: Selection,
    tol: float = PARITY_TOL,
) -> dict[str, float]:
    """Compare a Box policy's exported and eager outputs on ``probe``: the deterministic action, the
    pre-squash mean, ``log_prob`` of actions inside the bounds and ``act`` under the same seed, at the
    card's ``std`` and at :data:`PROBE_STD`. Every action must lie inside the bounds. Returns the max
    deviations (relative to max(1, |value|)) or raises ExportError."""
    x = torch.as_tensor(probe, dtype=torch.float32)
    low = (eager.action_mid - eager.action_half).detach()
    high = (eager.action_mid + eager.action_half).detach()
    actions = torch.as_tensor(probe_actions(low.numpy(), high.numpy(), len(probe)))
    deviations: dict[str, float] = {}
    outside: dict[str, int] = {}

    def compare(key: str, a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        _require_finite(a, what, probe)
        deviations[key] = _deviation(b, a)

    def bounds(key: str, a: torch.Tensor) -> None:
        outside[key] = int(((a < low) | (a > high)).any(dim=-1).sum())

    with torch.no_grad():
        a_eager = eager(x)
        compare("forward", a_eager, exported(x), "actions")
        bounds("forward", a_eager)
        compare("pre_squash", eager.pre_squash(x), exported.pre_squash(x), "pre-squash means")
        for std in sorted({float(selection.std), PROBE_STD} - {0.0}):
            key = f"log_prob(std={std:g})"
            compare(key, eager.log_prob(x, actions, std), exported.log_prob(x, actions, std), "log-densities")
            # The same seed on both sides: the noise is drawn by torch.randn_like in each.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                act_eager, logp_eager = eager.act(x, std)
                torch.manual_seed(0)
                act_exp, logp_exp = exported.act(x, std)
            compare(f"act(std={std:g}).action", act_eager, act_exp, "explored actions")
            compare(f"act(std={std:g}).log_density", logp_eager, logp_exp, "explored log-densities")
            bounds(f"act(std={std:g})", act_exp)
    broken = {k: v for k, v in outside.items() if v}
    if broken:
        raise ExportError(
            "the exported policy gives actions outside the bounds "
            f"[{low.tolist()}, {high.tolist()}]: "
            + ", ".join(f"{v} of {len(x)} probes in {k}" for k, v in broken.items())
        )
    return within_tolerance(deviations, tol)


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


@contextmanager
def _torchscript() -> Iterator[None]:
    # TorchScript is deprecated upstream, but it is what TorchServe loads and what runs without
    # Python-side code; the choice is deliberate, so the per-call warning is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
        )
        yield


def script_policy(policy: PolicyModule | ContinuousPolicyModule) -> torch.jit.ScriptModule:
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


def _check_action_space(result: TrainResult, data: Transitions) -> None:
    """The policy acts in the dataset's action space: the card records the one, serving runs the other."""
    policy = result.policy
    continuous = isinstance(policy, ContinuousPolicyModule)
    if continuous != data.meta.is_continuous:
        raise ExportError(
            f"a {type(policy).__name__} cannot be exported for a dataset with a "
            f"{data.meta.action_space.get('type')} action space (Box needs a ContinuousPolicyModule, "
            "Discrete a PolicyModule)"
        )
    if isinstance(policy, ContinuousPolicyModule):
        low, high = data.meta.action_bounds()
        mid = policy.action_mid.detach().cpu().double().numpy()
        half = policy.action_half.detach().cpu().double().numpy()
        if mid.shape != low.shape or not np.allclose(
            np.stack([mid - half, mid + half]), np.stack([low, high]), rtol=1e-6, atol=1e-6
        ):
            raise ExportError(
                f"the policy squashes actions into [{(mid - half).tolist()}, {(mid + half).tolist()}], "
                f"but the dataset's action space is [{low.tolist()}, {high.tolist()}]"
            )


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
    _check_action_space(result, data)
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
        write_new(tmp / POLICY_FILE, buf.getvalue())
        reloaded = load_script(tmp / POLICY_FILE)
        probe = probe_observations(data)
        if isinstance(eager, ContinuousPolicyModule):
            check_continuous_parity(eager, reloaded, probe, result.selection)
        else:
            check_parity(eager, reloaded, probe, result.selection)
        seal(tmp, card)
        _prepare_target(out_dir)
        install_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_policy_dir(path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load a policy directory after checking its card and the sha256 of every file."""
    card = verify_policy_dir(path)
    return load_script(Path(path) / POLICY_FILE), card
