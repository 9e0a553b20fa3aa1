"""Off-policy estimators against values computed exactly: by hand on two episodes, and by dynamic
programming on a small stochastic chain MDP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from rlops_trainer.datasets import DatasetMeta, Transitions
from rlops_trainer.export import script_policy
from rlops_trainer.ope import (
    ESTIMATORS,
    Estimate,
    FQEConfig,
    OPEError,
    behavior_value,
    estimate_fqe,
    estimate_is,
    evaluate,
    fqe_budget_warnings,
    kish_ess,
    policy_probs_fn,
    spread_warnings,
)
from rlops_trainer.policy import PolicyModule, Selection, mlp
from scipy.stats import spearmanr

ChainResults = tuple[dict[str, float], dict[str, dict[str, Estimate]]]

# ----------------------------------------------------------------------------------------------------
# A chain MDP: positions 0..4, start uniformly in 1..3. "right" moves +1 with probability 0.7, stays
# with 0.1 and moves -1 with 0.2 ("left" mirrors it). Stepping past 4 ends the episode with +1, past 0
# with -0.5; every other step costs 0.05. Episodes are truncated after 50 steps.

S, A, H = 5, 2, 50
P_INTENDED, P_STAY = 0.7, 0.1
R_GOAL, R_FALL, R_STEP = 1.0, -0.5, -0.05
D0 = np.array([0.0, 1 / 3, 1 / 3, 1 / 3, 0.0])
GAMMA = 0.9
BEHAVIOR = np.array([0.4, 0.45, 0.5, 0.55, 0.6])  # P(right | position)
TARGETS = {
    "left": np.full(S, 0.2),
    "uniform": np.full(S, 0.5),
    "zigzag": np.array([0.3, 0.8, 0.5, 0.9, 0.6]),
    "right": np.full(S, 0.9),
}


def _meta(obs_dim: int, n_actions: int = A) -> DatasetMeta:
    return DatasetMeta(
        env_id="Chain-v0",
        observation_space={
            "type": "Box",
            "shape": [obs_dim],
            "low": [0.0] * obs_dim,
            "high": [1.0] * obs_dim,
        },
        action_space={"type": "Discrete", "n": n_actions},
        behavior_policy="test",
        source="test",
    )


def true_value(p_right: np.ndarray, gamma: float = GAMMA) -> float:
    """Exact value by backward induction over the 50-step horizon."""
    v = np.zeros(S + 2)  # index 0 and S+1: the absorbing ends, value 0
    for _ in range(H):
        new = np.zeros(S + 2)
        for s in range(S):
            for a, pa in ((0, 1.0 - p_right[s]), (1, p_right[s])):
                step = 1 if a == 1 else -1
                for move, pm in ((step, P_INTENDED), (0, P_STAY), (-step, 1.0 - P_INTENDED - P_STAY)):
                    s2 = s + move
                    r = R_GOAL if s2 >= S else R_FALL if s2 < 0 else R_STEP
                    cont = v[s2 + 1] if 0 <= s2 < S else 0.0
                    new[s + 1] += pa * pm * (r + gamma * cont)
        v = new
    return float(D0 @ v[1 : S + 1])


def chain_data(p_right: np.ndarray, episodes: int, seed: int) -> Transitions:
    """Episodes of the chain under the behaviour ``p_right``, simulated side by side."""
    rng = np.random.default_rng(seed)
    pos = rng.choice(S, size=episodes, p=D0)
    alive = np.ones(episodes, dtype=bool)
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("ep", "t", "s", "a", "r", "s2", "term", "trunc", "lp")
    }
    for t in range(H):
        idx = np.flatnonzero(alive)
        if idx.size == 0:
            break
        s = pos[idx]
        a = (rng.random(idx.size) < p_right[s]).astype(np.int64)
        pa = np.where(a == 1, p_right[s], 1.0 - p_right[s])
        u = rng.random(idx.size)
        step = np.where(a == 1, 1, -1)
        s2 = s + np.where(u < P_INTENDED, step, np.where(u < P_INTENDED + P_STAY, 0, -step))
        term = (s2 < 0) | (s2 >= S)
        r = np.where(s2 >= S, R_GOAL, np.where(s2 < 0, R_FALL, R_STEP))
        for k, v in zip(
            cols,
            (idx, np.full(idx.size, t), s, a, r, s2, term, ~term & (t == H - 1), np.log(pa)),
            strict=True,
        ):
            cols[k].append(np.asarray(v))
        pos[idx] = np.clip(s2, 0, S - 1)
        alive[idx[term]] = False
    c = {k: np.concatenate(v) for k, v in cols.items()}
    order = np.lexsort((c["t"], c["ep"]))
    c = {k: v[order] for k, v in c.items()}
    eye = np.eye(S, dtype=np.float32)
    next_obs = np.where(c["term"][:, None], 0.0, eye[np.clip(c["s2"], 0, S - 1)]).astype(np.float32)
    return Transitions(
        episode_id=c["ep"].astype(np.int64),
        step=c["t"].astype(np.int64),
        observation=eye[c["s"]],
        action=c["a"],
        reward=c["r"].astype(np.float32),
        next_observation=next_obs,
        terminated=c["term"],
        truncated=c["trunc"],
        behavior_logp=c["lp"].astype(np.float32),
        meta=_meta(S),
    )


def chain_policy(p_right: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    def probs_fn(obs: np.ndarray) -> np.ndarray:
        p = p_right[np.asarray(obs).argmax(axis=1)]
        return np.stack([1.0 - p, p], axis=1)

    return probs_fn


FAST_FQE = FQEConfig(hidden=(32,), steps=1500, target_update=10, batch_size=256, seed=0)


# ----------------------------------------------------------------------------------------------------
# By hand: two episodes, gamma 0.5.
#   episode A: a=0 (mu 0.5, pi 0.8, r 1), then a=1 (mu 0.5, pi 0.4, r 2)   ratios 1.6, 0.8
#   episode B: a=1 (mu 0.25, pi 0.5, r 4)                                   ratio 2


def _two_episodes() -> tuple[Transitions, np.ndarray, np.ndarray]:
    obs = np.array([[0.0], [1.0], [2.0]], dtype=np.float32)
    data = Transitions(
        episode_id=np.array([0, 0, 1]),
        step=np.array([0, 1, 0]),
        observation=obs,
        action=np.array([0, 1, 1]),
        reward=np.array([1.0, 2.0, 4.0], dtype=np.float32),
        next_observation=obs + 1,
        terminated=np.array([False, True, True]),
        truncated=np.zeros(3, dtype=bool),
        behavior_logp=np.log(np.array([0.5, 0.5, 0.25], dtype=np.float32)),
        meta=_meta(1),
    )
    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.5, 0.5]])
    q = np.array([[1.0, 3.0], [2.0, 0.0], [0.0, 5.0]])
    return data, probs, q


def test_estimators_match_hand_computed_values() -> None:
    data, probs, q = _two_episodes()
    kw: dict[str, Any] = {"gamma": 0.5, "n_bootstrap": 50}
    # PDIS: A = 1.6*1 + 0.5*1.28*2 = 2.88, B = 2*4 = 8.
    assert estimate_is("pdis", data, probs, **kw).value == pytest.approx((2.88 + 8.0) / 2)
    # WPDIS: step 0 (1.6*1 + 2*4) / 3.6; step 1 (1.28*2 + 2*0) / 3.28 (B's weight frozen at 2).
    assert estimate_is("wpdis", data, probs, **kw).value == pytest.approx(9.6 / 3.6 + 0.5 * 2.56 / 3.28)
    # DR with V = (1.4, 1.2, 2.5) and Q(s, a) = (1, 0, 5):
    #   A: 1.6*(1-1) + 1.4 + 0.5*(1.28*(2-0) + 1.6*1.2) = 3.64;  B: 2*(4-5) + 2.5 = 0.5.
    assert estimate_is("dr", data, probs, q_values=q, **kw).value == pytest.approx((3.64 + 0.5) / 2)
    # WDR: step 0 (-2/3.6 + 3.9/2); step 1 (2.56/3.28 + 1.92/3.6).
    wdr = (-2 / 3.6 + 3.9 / 2) + 0.5 * (2.56 / 3.28 + 1.92 / 3.6)
    assert estimate_is("wdr", data, probs, q_values=q, **kw).value == pytest.approx(wdr)
    assert estimate_fqe(data, probs, q, **kw).value == pytest.approx((1.4 + 2.5) / 2)
    assert behavior_value(data, **kw).value == pytest.approx((1 + 0.5 * 2 + 4) / 2)
    # ESS of the trajectory weights (1.28, 2).
    assert estimate_is("pdis", data, probs, **kw).ess == pytest.approx(3.28**2 / (1.28**2 + 4))


def test_an_ensemble_averages_its_models_and_its_interval_covers_their_disagreement() -> None:
    data, probs, q = _two_episodes()
    kw: dict[str, Any] = {"gamma": 0.5, "n_bootstrap": 400}
    low, high = q - 1.0, q + 1.0  # V(s) is 1 lower (higher) everywhere: FQE 0.95 and 2.95
    ensemble = np.stack([low, high])
    fqe = estimate_fqe(data, probs, ensemble, **kw)
    assert fqe.value == pytest.approx((1.4 + 2.5) / 2)
    assert fqe.members == pytest.approx([0.95, 2.95])
    assert fqe.interval == "initial states and 2 Q models"
    # Resamples alternate between the models, so the interval spans both of them, unlike either
    # model's own interval.
    alone = estimate_fqe(data, probs, low, **kw)
    assert alone.interval == "initial states (Q fixed)"
    assert alone.members == pytest.approx([0.95])
    assert fqe.lower <= alone.lower
    assert alone.upper < 2.95 <= fqe.upper
    # DR and WDR are linear in Q: the ensemble's estimate is the mean of its members' estimates.
    for name in ("dr", "wdr"):
        both = estimate_is(name, data, probs, q_values=ensemble, **kw)
        each = [estimate_is(name, data, probs, q_values=m, **kw).value for m in (low, high)]
        assert both.value == pytest.approx(np.mean(each))
        assert both.members == pytest.approx(each)
    with pytest.raises(OPEError, match=r"dr needs q_values of shape \(3, 2\) or \(models, \*\(3, 2\)\)"):
        estimate_is("dr", data, probs, q_values=np.zeros((2, 3, 3)), **kw)


def test_disagreeing_models_warn() -> None:
    spread = Estimate("fqe", 10.0, 8.0, 12.0, 0.95, 100, members=[9.0, 10.0, 11.5])
    (warning,) = spread_warnings(spread, max_spread=0.1)
    assert "the 3 FQE models disagree: fqe ranges over [9, 11.5] (25 % of the value, above 10 %)" in warning
    assert spread_warnings(spread, max_spread=0.3) == []
    assert spread_warnings(Estimate("fqe", 10.0, 8.0, 12.0, 0.95, 100, members=[9.0]), 0.01) == []
    with pytest.raises(ValueError, match=r"FQEConfig\.ensemble must be >= 1"):
        FQEConfig(ensemble=0)


def test_kish_ess() -> None:
    assert kish_ess(np.full(7, 0.3)) == pytest.approx(7.0)
    assert kish_ess(np.array([0.0, 5.0, 0.0])) == pytest.approx(1.0)
    assert kish_ess(np.zeros(4)) == 0.0
    assert kish_ess(np.array([[1.0, 1.0], [1.0, 0.0]]), axis=0) == pytest.approx([2.0, 1.0])


def test_pdis_equals_on_policy_mean_when_target_is_behavior() -> None:
    data = chain_data(BEHAVIOR, 300, seed=1)
    probs = chain_policy(BEHAVIOR)(data.observation)
    on_policy = behavior_value(data, gamma=GAMMA, seed=3)
    for name in ("pdis", "wpdis"):
        est = estimate_is(name, data, probs, gamma=GAMMA, seed=3)
        assert est.value == pytest.approx(on_policy.value, abs=1e-5)
        assert (est.lower, est.upper) == pytest.approx((on_policy.lower, on_policy.upper), abs=1e-5)
        assert est.ess == pytest.approx(300.0, rel=1e-4)
        assert not est.ess_collapsed
        assert est.warnings == []


def _long_random_episodes(
    episodes: int = 60, length: int = 80, seed: int = 0, reward_low: float = 0.0
) -> Transitions:
    """Fixed-length episodes of uniformly random actions, rewards uniform in [reward_low, 1]."""
    rng = np.random.default_rng(seed)
    n = episodes * length
    obs = rng.normal(size=(n, 3)).astype(np.float32)
    return Transitions(
        episode_id=np.repeat(np.arange(episodes), length),
        step=np.tile(np.arange(length), episodes),
        observation=obs,
        action=rng.integers(0, 2, n),
        reward=(reward_low + (1.0 - reward_low) * rng.random(n)).astype(np.float32),
        next_observation=np.roll(obs, -1, axis=0),
        terminated=np.zeros(n, dtype=bool),
        truncated=np.tile(np.arange(length) == length - 1, episodes),
        behavior_logp=np.full(n, np.log(0.5), dtype=np.float32),
        meta=_meta(3),
    )


def test_wpdis_stays_in_the_reward_range_where_pdis_does_not() -> None:
    # Equal-length episodes, every reward in [0.8, 1]: each step of WPDIS is a weighted average of
    # rewards, so its value lies in [0.8, 1] * sum_t gamma^t; PDIS's weights need not average to 1.
    data = _long_random_episodes(episodes=40, length=20, seed=5, reward_low=0.8)
    probs = np.tile([0.2, 0.8], (len(data), 1))
    horizon = float((0.9 ** np.arange(20)).sum())
    lo, hi = float(data.reward.min()) * horizon, float(data.reward.max()) * horizon
    pdis = estimate_is("pdis", data, probs, gamma=0.9, n_bootstrap=200)
    wpdis = estimate_is("wpdis", data, probs, gamma=0.9, n_bootstrap=200)
    assert not lo <= pdis.value <= hi
    assert lo <= wpdis.lower <= wpdis.value <= wpdis.upper <= hi
    # With a constant reward every step's weighted average is that reward, whatever the weights.
    data.reward[:] = 1.0
    assert estimate_is("wpdis", data, probs, gamma=0.9, n_bootstrap=10).value == pytest.approx(horizon)
    assert estimate_is("pdis", data, probs, gamma=0.9, n_bootstrap=10).value != pytest.approx(horizon)


def test_ess_collapses_for_a_deterministic_mismatched_target() -> None:
    data = _long_random_episodes()
    always_right = np.tile([0.0, 1.0], (len(data), 1))
    q = np.zeros_like(always_right)
    pdis = estimate_is("pdis", data, always_right, gamma=0.99, n_bootstrap=100)
    assert pdis.ess is not None
    assert pdis.ess < 1.0
    assert pdis.ess_collapsed
    assert pdis.collapse_step is not None
    assert pdis.collapse_step < 10
    assert any("collapsed" in w for w in pdis.warnings)
    dr = estimate_is("dr", data, always_right, q_values=q, gamma=0.99, n_bootstrap=100)
    assert dr.ess_collapsed
    assert any("FQE model" in w for w in dr.warnings)
    # The same data under the behaviour policy keeps every episode.
    uniform = estimate_is("pdis", data, np.full((len(data), 2), 0.5), gamma=0.99, n_bootstrap=100)
    assert uniform.ess == pytest.approx(60.0)
    assert not uniform.ess_collapsed
    assert uniform.collapse_step is None
    # The threshold is configurable: demanding more than every episode flags collapse even then.
    strict = estimate_is("pdis", data, np.full((len(data), 2), 0.5), gamma=0.99, n_bootstrap=10, min_ess=61)
    assert strict.ess_collapsed


def test_missing_propensities_fail_clearly_but_fqe_runs() -> None:
    data = chain_data(BEHAVIOR, 200, seed=2)
    data.behavior_logp[[5, 9]] = np.nan
    for name in ("pdis", "wpdis", "dr", "wdr"):
        with pytest.raises(OPEError, match=r"'behavior_logp'.*2 of .* rows \(first at row 5\).*use fqe"):
            evaluate(data, chain_policy(TARGETS["right"]), gamma=GAMMA, estimators=(name,))
    cfg = FQEConfig(hidden=(16,), steps=200)
    est = evaluate(data, chain_policy(TARGETS["right"]), gamma=GAMMA, estimators=("fqe",), fqe_config=cfg)[
        "fqe"
    ]
    assert np.isfinite(est.value)
    assert est.interval.startswith("initial states")
    # 200 steps are far too few to propagate values over the horizon, and the estimate says so.
    assert any("Bellman backups" in w for w in est.warnings)


def test_fqe_budget_warning_tracks_the_effective_horizon() -> None:
    assert fqe_budget_warnings(FQEConfig(), gamma=0.99, horizon=500) == []
    (warning,) = fqe_budget_warnings(FQEConfig(steps=8000), gamma=0.99, horizon=500)
    assert "about 400 Bellman backups" in warning
    assert "effective horizon of 100 steps" in warning
    # Short episodes bound the horizon whatever the discount.
    assert fqe_budget_warnings(FQEConfig(steps=1000), gamma=1.0, horizon=10) == []


def test_zero_target_probabilities_give_zero_weights_not_nan() -> None:
    data = chain_data(BEHAVIOR, 300, seed=4)
    always_left = chain_policy(np.zeros(S))(data.observation)
    for name in ("pdis", "wpdis"):
        est = estimate_is(name, data, always_left, gamma=GAMMA, n_bootstrap=200)
        assert np.isfinite([est.value, est.lower, est.upper]).all()
    # Only episodes that never went right keep weight; they all start left of the goal and fall off.
    pdis = estimate_is("pdis", data, always_left, gamma=GAMMA, n_bootstrap=200)
    assert pdis.value < 0
    assert pdis.ess is not None
    assert 0 < pdis.ess < 300


def test_weight_clipping_caps_weights_and_is_off_by_default() -> None:
    data = chain_data(BEHAVIOR, 300, seed=6)
    probs = chain_policy(TARGETS["right"])(data.observation)
    plain = estimate_is("pdis", data, probs, gamma=GAMMA, n_bootstrap=100)
    loose = estimate_is("pdis", data, probs, gamma=GAMMA, n_bootstrap=100, clip_weights=1e12)
    clipped = estimate_is("pdis", data, probs, gamma=GAMMA, n_bootstrap=100, clip_weights=2.0)
    assert loose.value == plain.value
    assert clipped.value != plain.value
    assert clipped.ess is not None
    assert plain.ess is not None
    assert clipped.ess > plain.ess
    with pytest.raises(OPEError, match="clip_weights must be > 0"):
        estimate_is("pdis", data, probs, gamma=GAMMA, clip_weights=0.0)


def test_bad_target_policies_and_arguments_are_rejected() -> None:
    data = chain_data(BEHAVIOR, 50, seed=7)
    with pytest.raises(OPEError, match=r"shape \(.*, 3\) for observation; expected"):
        evaluate(data, lambda o: np.full((len(o), 3), 1 / 3), estimators=("pdis",))
    with pytest.raises(OPEError, match="invalid distribution for observation row 0"):
        evaluate(data, lambda o: np.full((len(o), 2), 0.7), estimators=("pdis",))
    with pytest.raises(OPEError, match="unknown estimator"):
        evaluate(data, chain_policy(BEHAVIOR), estimators=("magic",))
    with pytest.raises(OPEError, match="gamma must be in"):
        evaluate(data, chain_policy(BEHAVIOR), gamma=1.5, estimators=("pdis",))
    with pytest.raises(OPEError, match="confidence must be in"):
        evaluate(data, chain_policy(BEHAVIOR), confidence=1.0, estimators=("pdis",))
    with pytest.raises(OPEError, match="dr needs q_values"):
        estimate_is("dr", data, chain_policy(BEHAVIOR)(data.observation))
    with pytest.raises(ValueError, match=r"FQEConfig\.steps must be >= 1"):
        FQEConfig(steps=0)


def test_bootstrap_is_reproducible_and_seeded() -> None:
    data = chain_data(BEHAVIOR, 300, seed=8)
    probs = chain_policy(TARGETS["zigzag"])(data.observation)
    a = estimate_is("wpdis", data, probs, gamma=GAMMA, seed=11)
    b = estimate_is("wpdis", data, probs, gamma=GAMMA, seed=11)
    c = estimate_is("wpdis", data, probs, gamma=GAMMA, seed=12)
    assert a == b
    assert (a.lower, a.upper) != (c.lower, c.upper)
    assert a.value == c.value
    assert a.lower < a.value < a.upper
    assert Estimate.from_dict(a.to_dict()) == a


def test_fqe_bootstraps_through_truncation_but_is_does_not() -> None:
    # One-step episodes cut by a time limit in a single-state, single-action world with reward 1:
    # IS sees the logged step only (1); FQE treats the cut as a time limit and values the state
    # at 1 / (1 - gamma) = 2.
    n = 64
    obs = np.zeros((n, 1), dtype=np.float32)
    data = Transitions(
        episode_id=np.arange(n),
        step=np.zeros(n, dtype=np.int64),
        observation=obs,
        action=np.zeros(n, dtype=np.int64),
        reward=np.ones(n, dtype=np.float32),
        next_observation=obs,
        terminated=np.zeros(n, dtype=bool),
        truncated=np.ones(n, dtype=bool),
        behavior_logp=np.zeros(n, dtype=np.float32),
        meta=_meta(1, n_actions=1),
    )
    cfg = FQEConfig(hidden=(8,), steps=1500, target_update=5, lr=3e-3, seed=0)
    res = evaluate(data, lambda o: np.ones((len(o), 1)), gamma=0.5, fqe_config=cfg, n_bootstrap=50)
    assert res["pdis"].value == pytest.approx(1.0)
    assert res["fqe"].value == pytest.approx(2.0, rel=0.03)
    # DR subtracts the model's tail beyond the logged horizon: back to the logged return.
    assert res["dr"].value == pytest.approx(1.0, abs=1e-6)


def test_policy_probs_fn_serves_eager_and_scripted_policies_alike() -> None:
    torch.manual_seed(0)
    policy = PolicyModule(mlp(3, 2, (8,)), np.zeros(3), np.ones(3), "logits").eval()
    scripted = script_policy(policy)
    obs = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    sel = Selection(temperature=0.7, epsilon=0.1)
    eager = policy_probs_fn(policy, sel, batch_size=3)(obs)
    np.testing.assert_allclose(eager, policy.probs_numpy(obs, sel), atol=1e-7)
    np.testing.assert_allclose(policy_probs_fn(scripted, sel)(obs), eager, atol=1e-6)
    with pytest.raises(TypeError, match="no action_probs"):
        policy_probs_fn(torch.nn.Linear(3, 2), sel)


# ----------------------------------------------------------------------------------------------------
# The chain against its exact values.


@pytest.fixture(scope="module")
def chain_results() -> ChainResults:
    data = chain_data(BEHAVIOR, 2000, seed=0)
    truth = {k: true_value(p) for k, p in TARGETS.items()}
    results = {
        k: evaluate(data, chain_policy(p), gamma=GAMMA, fqe_config=FAST_FQE, seed=0)
        for k, p in TARGETS.items()
    }
    return truth, results


@pytest.mark.slow
def test_chain_intervals_cover_the_exact_values(chain_results: ChainResults) -> None:
    truth, results = chain_results
    for policy, estimates in results.items():
        for name in ("pdis", "wpdis", "dr", "wdr"):
            est = estimates[name]
            assert est.lower <= truth[policy] <= est.upper, (policy, name, truth[policy], est)
            assert not est.ess_collapsed
            assert est.warnings == []


@pytest.mark.slow
def test_chain_model_based_estimates_are_close(chain_results: ChainResults) -> None:
    truth, results = chain_results
    spread = max(truth.values()) - min(truth.values())
    for policy, estimates in results.items():
        for name in ("fqe", "dr", "wdr"):
            assert abs(estimates[name].value - truth[policy]) < 0.05 * spread, (policy, name)


@pytest.mark.slow
def test_chain_estimators_rank_policies_like_the_truth(chain_results: ChainResults) -> None:
    truth, results = chain_results
    order = sorted(truth)
    values = sorted(truth.values())
    assert min(np.diff(values)) > 0.1  # well separated, so the ranking is a fair test
    for name in ESTIMATORS:
        rho = spearmanr([truth[k] for k in order], [results[k][name].value for k in order]).statistic
        assert rho == pytest.approx(1.0), name


def test_pdis_interval_is_calibrated_and_unbiased() -> None:
    # 60 independent datasets: a 90 % interval should cover the truth about 90 % of the time, and the
    # estimates should average to the truth (PDIS is unbiased).
    truth = true_value(TARGETS["zigzag"])
    covered, values = 0, []
    for rep in range(60):
        data = chain_data(BEHAVIOR, 300, seed=100 + rep)
        probs = chain_policy(TARGETS["zigzag"])(data.observation)
        est = estimate_is("pdis", data, probs, gamma=GAMMA, confidence=0.9, n_bootstrap=400, seed=rep)
        covered += est.lower <= truth <= est.upper
        values.append(est.value)
    assert 0.8 <= covered / 60 <= 0.98
    assert abs(np.mean(values) - truth) < 3 * np.std(values) / np.sqrt(60)
