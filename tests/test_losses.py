"""agents.losses against plain-NumPy references written as explicit per-episode sums, with and without jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents import losses

GAMMA = 0.9

JIT_OR_NOT = pytest.mark.parametrize("wrap", [lambda f: f, jax.jit], ids=["eager", "jit"])


def _episode_inputs(seed, T, B, terminated_at, truncated_at):
    """Random values/rewards and end flags given as lists of (t, b)."""
    rng = np.random.default_rng(seed)
    terminated = np.zeros((T, B), bool)
    truncated = np.zeros((T, B), bool)
    for t, b in terminated_at:
        terminated[t, b] = True
    for t, b in truncated_at:
        truncated[t, b] = True
    values = rng.normal(size=(T + 1, B)).astype(np.float32)  # V(obs[t])
    final_values = np.where(terminated | truncated, rng.normal(size=(T, B)), 0.0).astype(np.float32)
    rewards = rng.normal(size=(T, B)).astype(np.float32)
    return values, final_values, rewards, terminated, truncated


def _next_value(values, final_values, terminated, truncated, t, b):
    """The value of the state after step t: 0 at termination, V(final_obs) at truncation."""
    if terminated[t, b]:
        return 0.0
    if truncated[t, b]:
        return final_values[t, b]
    return values[t + 1, b]


def _episode_end(terminated, truncated, s, b):
    """Last step index of the episode containing step s (or T-1 if it runs past the unroll)."""
    T = terminated.shape[0]
    for t in range(s, T):
        if terminated[t, b] or truncated[t, b]:
            return t
    return T - 1


def _gae_reference(values, final_values, rewards, terminated, truncated, lambda_):
    T, B = rewards.shape
    advantages = np.zeros((T, B))
    for b in range(B):
        delta = [
            rewards[t, b] + GAMMA * _next_value(values, final_values, terminated, truncated, t, b) - values[t, b]
            for t in range(T)
        ]
        for s in range(T):
            end = _episode_end(terminated, truncated, s, b)
            advantages[s, b] = sum((GAMMA * lambda_) ** (t - s) * delta[t] for t in range(s, end + 1))
    return advantages


def _vtrace_reference(values, final_values, rewards, terminated, truncated, log_rhos, lambda_, clip_rho, clip_pg_rho):
    """Espeholt et al. (2018) eq. 1 as a sum, stopped at the episode end, plus rlax's lambda-mixed q."""
    T, B = rewards.shape
    rhos = np.exp(log_rhos)
    vs = np.zeros((T, B))
    pg_adv = np.zeros((T, B))
    for b in range(B):
        next_v = [_next_value(values, final_values, terminated, truncated, t, b) for t in range(T)]
        delta = [min(clip_rho, rhos[t, b]) * (rewards[t, b] + GAMMA * next_v[t] - values[t, b]) for t in range(T)]
        for s in range(T):
            end = _episode_end(terminated, truncated, s, b)
            total, weight = 0.0, 1.0
            for t in range(s, end + 1):
                total += weight * delta[t]
                weight *= GAMMA * lambda_ * min(1.0, rhos[t, b])
            vs[s, b] = values[s, b] + total
        for s in range(T):
            if terminated[s, b] or truncated[s, b] or s == T - 1:
                next_target = next_v[s]  # 0 after a termination, V(final_obs) after a truncation
            else:
                next_target = lambda_ * vs[s + 1, b] + (1 - lambda_) * values[s + 1, b]
            discount = 0.0 if terminated[s, b] else GAMMA
            q = rewards[s, b] + discount * next_target
            pg_adv[s, b] = min(clip_pg_rho, rhos[s, b]) * (q - values[s, b])
    return vs, pg_adv


def _estimator_args(values, final_values, terminated, truncated):
    cut_t = terminated | truncated
    v_tm1, v_t = losses.bootstrap_values(values, final_values, cut_t)
    discount_t = GAMMA * (1.0 - terminated.astype(np.float32))
    return v_tm1, v_t, discount_t, cut_t


CASES = {
    # T=6, B=3: a termination, truncations mid-unroll and at the last step, a column without ends.
    "mixed": (6, 3, [(2, 0), (1, 2)], [(1, 1), (5, 1), (3, 2)]),
    # T=7, B=2: back-to-back ends, and an end at step 0.
    "dense_ends": (7, 2, [(0, 0), (4, 1)], [(1, 0), (2, 0), (5, 1)]),
    "no_ends": (5, 2, [], []),
}


@JIT_OR_NOT
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("lambda_", [1.0, 0.8])
def test_gae_matches_reference(wrap, case, lambda_):
    values, final_values, rewards, terminated, truncated = _episode_inputs(0, *CASES[case])
    v_tm1, v_t, discount_t, cut_t = _estimator_args(values, final_values, terminated, truncated)
    got = wrap(losses.gae)(v_tm1, v_t, rewards, discount_t, lambda_, cut_t)
    expected = _gae_reference(values, final_values, rewards, terminated, truncated, lambda_)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@JIT_OR_NOT
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("lambda_,clip_rho,clip_pg_rho", [(1.0, 1.0, 1.0), (0.9, 2.0, 1.5)])
def test_vtrace_matches_reference(wrap, case, lambda_, clip_rho, clip_pg_rho):
    values, final_values, rewards, terminated, truncated = _episode_inputs(1, *CASES[case])
    T, B = rewards.shape
    log_rhos = np.random.default_rng(2).normal(scale=0.7, size=(T, B)).astype(np.float32)
    v_tm1, v_t, discount_t, cut_t = _estimator_args(values, final_values, terminated, truncated)
    got = wrap(losses.vtrace)(v_tm1, v_t, rewards, discount_t, log_rhos, lambda_, clip_rho, clip_pg_rho, cut_t)
    vs, pg_adv = _vtrace_reference(
        values, final_values, rewards, terminated, truncated, log_rhos, lambda_, clip_rho, clip_pg_rho
    )
    np.testing.assert_allclose(got.vs, vs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.pg_advantage, pg_adv, rtol=1e-5, atol=1e-5)


def test_truncation_cuts_the_trace_but_bootstraps():
    """A huge reward in the next episode must not reach the truncated one; V(final_obs) must."""
    values = np.zeros((4, 1), np.float32)
    final_values = np.array([[0.0], [5.0], [0.0]], np.float32)
    rewards = np.array([[0.0], [0.0], [1000.0]], np.float32)
    terminated = np.zeros((3, 1), bool)
    truncated = np.array([[False], [True], [False]])
    v_tm1, v_t, discount_t, cut_t = _estimator_args(values, final_values, terminated, truncated)
    advantages = losses.gae(v_tm1, v_t, rewards, discount_t, 1.0, cut_t)
    np.testing.assert_allclose(advantages[:2, 0], [GAMMA * GAMMA * 5.0, GAMMA * 5.0], rtol=1e-6)
    targets = losses.vtrace(v_tm1, v_t, rewards, discount_t, np.zeros((3, 1), np.float32), cut_t=cut_t)
    np.testing.assert_allclose(targets.vs[:2, 0], [GAMMA * GAMMA * 5.0, GAMMA * 5.0], rtol=1e-6)


@JIT_OR_NOT
def test_on_policy_vtrace_equals_gae_returns(wrap):
    """With rho = 1 and lambda = 1, V-trace targets are the lambda-returns GAE gives."""
    values, final_values, rewards, terminated, truncated = _episode_inputs(3, *CASES["mixed"])
    v_tm1, v_t, discount_t, cut_t = _estimator_args(values, final_values, terminated, truncated)
    targets = wrap(losses.vtrace)(v_tm1, v_t, rewards, discount_t, jnp.zeros_like(v_tm1), cut_t=cut_t)
    advantages = wrap(losses.gae)(v_tm1, v_t, rewards, discount_t, 1.0, cut_t)
    np.testing.assert_allclose(targets.vs, advantages + v_tm1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets.pg_advantage, advantages, rtol=1e-5, atol=1e-5)


def test_vtrace_stops_target_gradients():
    values, final_values, rewards, terminated, truncated = _episode_inputs(4, *CASES["mixed"])
    _, v_t, discount_t, cut_t = _estimator_args(values, final_values, terminated, truncated)

    def loss(v_tm1):
        targets = losses.vtrace(v_tm1, v_t, rewards, discount_t, jnp.zeros_like(v_tm1), cut_t=cut_t)
        return jnp.sum(targets.vs + targets.pg_advantage)

    np.testing.assert_array_equal(jax.grad(loss)(jnp.asarray(values[:-1])), 0.0)
