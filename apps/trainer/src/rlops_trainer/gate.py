"""The promotion gate: a candidate replaces the baseline only when it is better beyond doubt.

Rule: promote when ``candidate.lower > baseline + margin`` (strictly), where ``candidate.lower`` is the
lower end of the candidate's bootstrap interval and ``baseline`` the baseline's point estimate with
the same estimator. The baseline is the incumbent (the registry's champion) when there is one, else the
behaviour policy (the on-policy value of the logged data). ``margin`` is absolute, or with
``relative=True`` a fraction of ``|baseline|``.

Why the candidate's lower bound against the baseline's point estimate: the candidate is the unknown
(a new policy valued off-policy, with the widest interval), and its lower bound of a two-sided interval
at confidence ``c`` is a one-sided bound at ``(1 + c) / 2``, so a promotion means "better than the
baseline with that confidence, up to the baseline's own error". The baseline is either measured
on-policy from the logged returns (tight) or, as the incumbent, was promoted through this same gate. Asking
the lower bound to clear the baseline's upper bound instead (``against="upper"``) demands
non-overlapping intervals, a far stricter test than the stated confidence; it is available for
deployments that want it, and the margin is the other knob for caution.

The gate refuses to decide (``promote=False``, ``refused=True``) when the estimate is not a number or when
a pure importance-sampling estimate (``pdis``, ``wpdis``) rests on collapsed weights: those estimates
are then an average over a handful of episodes and their intervals are not trustworthy. Doubly robust
estimates fall back on their model where weights vanish, so collapse alone does not stop them; their
warning still travels in the estimate.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any, Literal

from rlops_trainer.ope import Estimate

REFUSE_ON_COLLAPSE: tuple[str, ...] = ("pdis", "wpdis")

_NAMES = {"pdis": "PDIS", "wpdis": "WPDIS", "fqe": "FQE", "dr": "DR", "wdr": "WDR", "behavior": "behaviour"}


class GateError(ValueError):
    """The gate was asked to compare estimates that cannot be compared."""


@dataclass
class GateDecision:
    """The gate's verdict on one candidate, with the numbers behind it (copied into the model card)."""

    promote: bool
    refused: bool
    """True when no comparison was made because the candidate's estimate is unreliable."""
    baseline: str
    """``incumbent`` or ``behavior``."""
    baseline_label: str
    incumbent_version: int | None
    """Registry version of the incumbent compared with (None: the behaviour policy, or unversioned)."""
    estimator: str
    candidate_value: float
    candidate_lower: float
    candidate_upper: float
    confidence: float
    baseline_value: float
    against: str
    """Which number of the baseline was compared: ``value`` (point estimate) or ``upper`` (bound)."""
    margin: float
    relative: bool
    required: float
    """What the candidate's lower bound had to exceed: the baseline number plus the margin."""
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()
        }


def default_estimator(has_propensities: bool) -> str:
    """Doubly robust where behaviour propensities exist, fitted Q evaluation where they do not."""
    return "dr" if has_propensities else "fqe"


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def decide(
    candidate: Estimate,
    incumbent: Estimate | None,
    behavior: Estimate,
    margin: float = 0.0,
    relative: bool = False,
    *,
    against: Literal["value", "upper"] = "value",
    incumbent_label: str = "champion",
    incumbent_version: int | None = None,
    refuse_on_collapse: Collection[str] = REFUSE_ON_COLLAPSE,
) -> GateDecision:
    """Decide whether ``candidate`` replaces ``incumbent`` (or, without one, the behaviour policy)."""
    if not margin >= 0:
        raise GateError(f"margin must be >= 0, got {margin}")
    if against not in ("value", "upper"):
        raise GateError(f"against must be 'value' or 'upper', got {against!r}")
    if incumbent is not None and incumbent.estimator != candidate.estimator:
        raise GateError(
            f"candidate estimated with {candidate.estimator} but incumbent with {incumbent.estimator}; "
            "the gate compares like with like"
        )
    base = incumbent if incumbent is not None else behavior
    baseline = "incumbent" if incumbent is not None else "behavior"
    label = incumbent_label if incumbent is not None else "behaviour policy"
    base_number = base.value if against == "value" else base.upper
    extra = margin * abs(base_number) if relative else margin
    required = base_number + extra
    name = _NAMES.get(candidate.estimator, candidate.estimator)

    refusal = None
    if not (math.isfinite(candidate.lower) and math.isfinite(candidate.value)):
        refusal = (
            f"the {name} estimate is not a number "
            f"(value {_fmt(candidate.value)}, lower {_fmt(candidate.lower)})"
        )
    elif not math.isfinite(required):
        refusal = f"the {label}'s {name} estimate is not a number ({_fmt(base_number)})"
    elif candidate.ess_collapsed and candidate.estimator in refuse_on_collapse:
        ess = candidate.ess if candidate.ess is not None else float("nan")
        refusal = (
            f"the {name} estimate rests on collapsed importance weights (ESS {ess:.1f} of "
            f"{candidate.n_episodes} episodes); gate on dr or fqe instead"
        )

    what = f"{label} {'upper bound ' if against == 'upper' else ''}{_fmt(base_number)}"
    margin_text = f"margin {_fmt(100 * margin)} % ({_fmt(extra)})" if relative else f"margin {_fmt(margin)}"
    if refusal is not None:
        promote, reason = False, f"not promoted: no decision, {refusal}"
    else:
        promote = candidate.lower > required
        verb = ">" if promote else "<="
        reason = (
            f"{'promoted' if promote else 'not promoted'}: {name} lower bound {_fmt(candidate.lower)} "
            f"({100 * candidate.confidence:.0f} % interval) {verb} {what} + {margin_text} = {_fmt(required)}"
        )
    return GateDecision(
        promote=promote,
        refused=refusal is not None,
        baseline=baseline,
        baseline_label=label,
        incumbent_version=incumbent_version if incumbent is not None else None,
        estimator=candidate.estimator,
        candidate_value=candidate.value,
        candidate_lower=candidate.lower,
        candidate_upper=candidate.upper,
        confidence=candidate.confidence,
        baseline_value=base.value,
        against=against,
        margin=margin,
        relative=relative,
        required=required,
        reason=reason,
    )
