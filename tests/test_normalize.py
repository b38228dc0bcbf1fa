"""agents.normalize against NumPy on known data, with and without jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents import normalize
from rlbatch import Policy

JIT_OR_NOT = pytest.mark.parametrize("wrap", [lambda f: f, jax.jit], ids=["eager", "jit"])


def _uneven_batches(seed=0):
    """Batches [T, B, 3] of different sizes and scales, with masks; padded rows hold huge values."""
    rng = np.random.default_rng(seed)
    batches = []
    for T, B, scale, shift in [(5, 2, 1.0, 3.0), (1, 7, 10.0, -4.0), (9, 3, 0.1, 100.0), (2, 2, 5.0, 0.0)]:
        x = (shift + scale * rng.normal(size=(T, B, 3))).astype(np.float32)
        mask = rng.random((T, B)) < 0.7
        mask[0, 0] = True
        x[~mask] = 1e6  # counted by mistake, these would dominate the mean and the variance
        batches.append((x, mask))
    return batches


@JIT_OR_NOT
def test_stats_after_uneven_batches_equal_numpy_over_the_unpadded_rows(wrap):
    update = wrap(normalize.update_stats)
    stats = normalize.init_stats(np.zeros(3, np.float32))
    rows = []
    for x, mask in _uneven_batches():
        stats = update(stats, x, mask)
        rows.append(x[mask])
        seen = np.concatenate(rows).astype(np.float64)
        assert float(stats.count) == len(seen)
        np.testing.assert_allclose(stats.mean, seen.mean(axis=0), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(stats.var, seen.var(axis=0), rtol=1e-4, atol=1e-4)
    assert stats.mean.dtype == stats.var.dtype == stats.count.dtype == jnp.float32


def test_unmasked_update_counts_every_row_and_padding_only_changes_nothing():
    x = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    stats = normalize.update_stats(normalize.init_stats(np.zeros(3)), x)
    np.testing.assert_allclose(stats.mean, x.reshape(-1, 3).mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.var, x.reshape(-1, 3).var(0), rtol=1e-6)
    same = normalize.update_stats(stats, np.full((4, 2, 3), 1e6, np.float32), np.zeros((4, 2), bool))
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, stats)


def test_normalize_standardises_and_clips_to_ten():
    stats = normalize.RunningMeanStd(jnp.array([1.0, -2.0]), jnp.array([4.0, 0.01]), jnp.float32(10))
    x = np.array([[3.0, -2.0], [1.0, 5.0], [-100.0, -2.05]], np.float32)
    expected = np.clip((x - [1.0, -2.0]) / np.sqrt(np.array([4.0, 0.01]) + 1e-8), -10, 10)
    np.testing.assert_allclose(normalize.normalize(stats, x), expected, rtol=1e-6)
    assert float(normalize.normalize(stats, x)[1, 1]) == 10.0 and float(normalize.normalize(stats, x)[2, 0]) == -10.0


def test_normalized_policy_feeds_the_network_normalised_observations():
    inner = Policy(init=lambda key, obs: {"w": jnp.ones(())}, apply=lambda p, obs, key: (obs * p["w"], {}))
    policy = normalize.normalized_policy(inner)
    params = policy.init(jax.random.key(0), np.zeros(2, np.float32))
    assert float(params["obs_norm"].count) == 0
    params["obs_norm"] = normalize.RunningMeanStd(jnp.array([1.0, 2.0]), jnp.array([4.0, 9.0]), jnp.float32(3))
    out, _ = jax.jit(policy.apply)(params, np.array([[3.0, 8.0]], np.float32), None)
    np.testing.assert_allclose(out, [[1.0, 2.0]], rtol=1e-6)


# ------------------------------------------------------------------------------- reward scaling

GAMMA = 0.9


def _env_streams(seed, num_envs, steps):
    rng = np.random.default_rng(seed)
    reward = rng.normal(size=(num_envs, steps)).astype(np.float32)
    ended = rng.random((num_envs, steps)) < 0.15
    ended[0, 8:12] = [False, True, False, False]  # env 0: an episode starts inside steps 8..11
    episode = np.cumsum(np.concatenate([np.zeros((num_envs, 1), bool), ended[:, :-1]], axis=1), axis=1)
    return reward, ended, episode


def _cleanrl_returns(reward, ended):
    """Per environment, step by step: G = G * gamma * (1 - ended at the previous step) + r."""
    returns = np.zeros(reward.shape)
    for env in range(reward.shape[0]):
        g, previous_ended = 0.0, False
        for t in range(reward.shape[1]):
            g = g * GAMMA * (1.0 - previous_ended) + reward[env, t]
            returns[env, t], previous_ended = g, ended[env, t]
    return returns


@JIT_OR_NOT
def test_reward_scaling_follows_each_environment_across_batches(wrap):
    T, num_envs = 4, 3
    reward, ended, episode = _env_streams(0, num_envs, 4 * T)
    expected_returns = _cleanrl_returns(reward, ended)
    # Segments (env, k): steps k*T .. k*T+T-1. Batch columns in arrival order; env 1 twice in batch 1.
    # Env 0's segment 2 (steps 8..11) never arrives, like a dropped trajectory: segment 3 starts an
    # episode the table has not seen begin, so its return restarts at 0 rather than continuing.
    batches = [[(0, 0), (1, 0), (2, 0)], [(1, 1), (2, 1), (1, 2), (0, 1)], [(2, 2), (0, 3), (1, 3), (2, 3)]]
    scale = wrap(lambda state, *args: normalize.scale_rewards(state, *args, gamma=GAMMA))
    state = normalize.init_return_scale(max_envs=8)
    returns_seen = []
    for columns in batches:
        cols = [(env, slice(k * T, k * T + T)) for env, k in columns]
        r = np.stack([reward[env, s] for env, s in cols], axis=1)
        e = np.stack([ended[env, s] for env, s in cols], axis=1)
        state, scaled = scale(
            state, r, e, np.array([env for env, _ in cols]), np.array([episode[env, s][0] for env, s in cols]),
            np.array([episode[env, s][-1] for env, s in cols]),
        )
        for env, s in cols:
            dropped_before = env == 0 and s.start == 3 * T
            returns_seen.append(_cleanrl_returns(reward[:1, s], ended[:1, s])[0] if dropped_before
                                else expected_returns[env, s])
        var = np.concatenate(returns_seen).var()
        np.testing.assert_allclose(state.stats.var, var, rtol=1e-4)
        np.testing.assert_allclose(scaled, r / np.sqrt(var + 1e-8), rtol=1e-4, atol=1e-6)
