"""Deliberately bad candidates, for fire drills of the canary: does it catch what it should, and how fast?

Both are policy directories built from a real one (its model card, so its spaces and reference statistics
are kept), ready to publish:

- ``constant``: always the same action, whatever it sees (a collapsed policy), written here;
- ``slow``: the source's answers after ``seconds`` of computation per pass
  (:func:`rlops_stack.faults.write_slow_policy_dir`, the stack's fault for its latency alerts).
"""

import warnings
from pathlib import Path

import torch
from rlops_contracts.artifact import seal
from rlops_contracts.card import read_card
from rlops_stack.faults import write_slow_policy_dir

KINDS: tuple[str, ...] = ("constant", "slow")


class ConstantPolicy(torch.nn.Module):
    """Scores one action above the others for every observation."""

    # A real (not postponed) annotation: TorchScript reads it to type the buffer.
    scores: torch.Tensor

    def __init__(self, n_actions: int, action: int) -> None:
        super().__init__()
        scores = torch.zeros(n_actions)
        scores[action] = 1.0
        self.register_buffer("scores", scores)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.scores.unsqueeze(0).expand(obs.shape[0], -1).clone()

    @torch.jit.export
    def action_probs(self, obs: torch.Tensor, temperature: float, epsilon: float) -> torch.Tensor:
        scores = self.forward(obs)
        n = scores.shape[-1]
        probs = torch.nn.functional.one_hot(scores.argmax(dim=-1), n).to(scores.dtype)
        return (1.0 - epsilon) * probs + epsilon / n


def write_constant_policy_dir(source: Path, out: Path, action: int = 0) -> Path:
    """A policy directory at ``out`` that answers ``action`` to everything, with ``source``'s card."""
    source, out = Path(source), Path(out)
    card = read_card(source)
    n_actions = int(card["action_space"]["n"])
    if not 0 <= action < n_actions:
        raise ValueError(
            f"action {action} is not one of the policy's {n_actions} actions (0-{n_actions - 1})"
        )
    out.mkdir(parents=True, exist_ok=False)
    policy_file = out / card["policy"]["file"]
    # TorchScript is deprecated in favour of torch.export, but policy.pt is TorchScript by contract.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.save(torch.jit.script(ConstantPolicy(n_actions, action).eval()), str(policy_file))
    card.update(version=None, evaluation=None, gate=None)
    card["hyperparameters"] = {
        **card["hyperparameters"],
        "fault": {"kind": "constant_action", "action": action},
    }
    card["lineage"] = [e for e in card["lineage"] if e.get("event") == "trained"][:1]
    card["files"] = {card["policy"]["file"]: ""}
    seal(out, card)
    return out


def write_drill_policy_dir(
    source: Path, out: Path, kind: str, *, action: int = 0, seconds: float = 0.25
) -> Path:
    """A ``kind`` drill candidate (see the module docstring) built from the policy directory ``source``."""
    if kind == "constant":
        return write_constant_policy_dir(source, out, action)
    if kind == "slow":
        if not seconds > 0:
            raise ValueError(f"the delay must be positive seconds, got {seconds}")
        # The delay is calibrated in this process: with one thread, as a TorchServe worker runs it.
        # With more, on a busy machine, threads wait on each other and the calibration comes out 10x short.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return write_slow_policy_dir(source, out, seconds)
        finally:
            torch.set_num_threads(threads)
    raise ValueError(f"drill kind {kind!r}: choose from {', '.join(KINDS)}")
