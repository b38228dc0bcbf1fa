"""make_ppo and make_impala against plain-NumPy references of their targets and losses.

The batch has gamma > 0, terminations and truncations inside the unroll (each truncation with its
own final_obs), and behaviour log-probs that differ from the current policy's, so every discount,
bootstrap, trace-cut and importance-ratio line of the learners changes a number checked here.
The references loop over t backwards, one column at a time, and use the network only for V and
log pi; everything the learner computes from them is recomputed here.
"""
import gymnasium as gym
import jax
import numpy as np
import optax
import pytest

from agents.impala import make_impala
from agents.networks import make_actor_critic
from agents.ppo import make_ppo
from rlbatch import Trajectory

T, B = 8, 4
GAMMA = 0.9
DISCRETE = gym.spaces.Discrete(3)
BOX = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
EXAMPLE_OBS = np.zeros((4,), np.float32)
TERMINATED_AT = [(2, 0), (6, 3)]
TRUNCATED_AT = [(4, 0), (3, 1), (5, 2), (1, 3)]


def _network(action_space):
    network = make_actor_critic(action_space, EXAMPLE_OBS, hidden=(16, 16))
    return network, network.policy.init(jax.random.key(0), EXAMPLE_OBS)


def make_batch(network, params, seed=0, log_prob_noise=0.5):
    """A [T, B] batch with terminations and truncations, off-policy by `log_prob_noise` (std)."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(T + 1, B, 4)).astype(np.float32)
    action, extras = network.policy.apply(params, obs[:-1].reshape(T * B, 4), jax.random.key(seed))
    action = np.asarray(action).reshape(T, B, *np.shape(action)[1:])
    terminated = np.zeros((T, B), bool)
    truncated = np.zeros((T, B), bool)
    for t, b in TERMINATED_AT:
        terminated[t, b] = True
    for t, b in TRUNCATED_AT:
        truncated[t, b] = True
    # Each ended step has its own last observation, unlike any obs[t + 1] (the next episode's first).
    final_obs = np.where((terminated | truncated)[..., None], 3.0 * rng.normal(size=(T, B, 4)), 0.0).astype(np.float32)
    log_prob = np.asarray(extras["log_prob"]).reshape(T, B)
    behaviour_log_prob = (log_prob + log_prob_noise * rng.normal(size=(T, B))).astype(np.float32)
    episode = np.cumsum(np.concatenate([np.zeros((1, B), bool), (terminated | truncated)[:-1]]), axis=0)
    return Trajectory(
        obs=obs,
        action=action,
        reward=rng.normal(size=(T, B)).astype(np.float32),
        terminated=terminated,
        truncated=truncated,
        final_obs=final_obs,
        extras={"log_prob": behaviour_log_prob},
        policy_version=np.zeros((T, B), np.int64),
        episode_id=(np.arange(B, dtype=np.int64)[None, :] << 32) | episode,
        actor_id=np.arange(B, dtype=np.int64),
    )


def _network_outputs(network, params, batch):
    """(log pi(a|obs[t]) [T, B], entropy [T, B], V(obs) [T+1, B], V(final_obs) [T, B]) in float64."""
    log_prob, entropy, _ = network.evaluate(params, batch.obs[:-1], batch.action)
    values = network.value(params, batch.obs)
    final_values = network.value(params, batch.final_obs)
    return tuple(np.asarray(x, np.float64) for x in (log_prob, entropy, values, final_values))


def _next_value(values, final_values, batch, t, b):
    if batch.terminated[t, b]:
        return 0.0
    if batch.truncated[t, b]:
        return final_values[t, b]
    return values[t + 1, b]


def gae_reference(values, final_values, batch, gamma, lambda_):
    """A[t] = delta[t] + gamma * lambda * A[t+1] inside an episode; the trace stops at any episode end."""
    advantages = np.zeros((T, B))
    for b in range(B):
        next_advantage = 0.0
        for t in reversed(range(T)):
            if batch.terminated[t, b] or batch.truncated[t, b]:
                next_advantage = 0.0
            delta = batch.reward[t, b] + gamma * _next_value(values, final_values, batch, t, b) - values[t, b]
            advantages[t, b] = next_advantage = delta + gamma * lambda_ * next_advantage
    return advantages


def vtrace_reference(values, final_values, batch, log_rho, gamma, lambda_, clip_rho, clip_pg_rho):
    """Espeholt et al. (2018) eq. 1 backwards, and the lambda-mixed advantage rlax uses."""
    vs = np.zeros((T, B))
    pg_advantage = np.zeros((T, B))
    rho = np.exp(log_rho)
    for b in range(B):
        correction = 0.0  # vs[t+1] - V(obs[t+1]) within the episode, 0 past its end or the unroll's
        for t in reversed(range(T)):
            if batch.terminated[t, b] or batch.truncated[t, b]:
                correction = 0.0
            next_value = _next_value(values, final_values, batch, t, b)
            discount = 0.0 if batch.terminated[t, b] else gamma
            q = batch.reward[t, b] + discount * (next_value + lambda_ * correction)
            pg_advantage[t, b] = min(clip_pg_rho, rho[t, b]) * (q - values[t, b])
            delta = min(clip_rho, rho[t, b]) * (batch.reward[t, b] + discount * next_value - values[t, b])
            correction = delta + discount * lambda_ * min(1.0, rho[t, b]) * correction
            vs[t, b] = values[t, b] + correction
    return vs, pg_advantage


def _assert_metrics(metrics, expected):
    for name, value in expected.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=2e-4, atol=1e-5, err_msg=name)


def ppo_expected_metrics(network, params, batch, gae_lambda, normalize_advantages, clip_eps=0.2):
    log_prob, entropy, values, final_values = _network_outputs(network, params, batch)
    advantages = gae_reference(values, final_values, batch, GAMMA, gae_lambda)
    returns = advantages + values[:-1]
    if normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    log_ratio = log_prob - batch.extras["log_prob"]
    ratio = np.exp(log_ratio)
    assert np.abs(log_ratio).max() > 0.3  # off-policy: the clip and the ratio both matter
    clipped = np.clip(ratio, 1 - clip_eps, 1 + clip_eps)
    policy_loss = -np.mean(np.minimum(ratio * advantages, clipped * advantages))
    value_loss = 0.5 * np.mean((values[:-1] - returns) ** 2)
    return {
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "entropy": entropy.mean(),
        "loss": policy_loss + 0.5 * value_loss - 0.01 * entropy.mean(),
        "approx_kl": np.mean(ratio - 1 - log_ratio),
        "clip_fraction": np.mean(np.abs(ratio - 1) > clip_eps),
    }


def impala_expected_metrics(network, params, batch, lambda_, clip_rho, clip_pg_rho):
    log_prob, entropy, values, final_values = _network_outputs(network, params, batch)
    log_rho = log_prob - batch.extras["log_prob"]  # target minus behaviour
    vs, pg_advantage = vtrace_reference(values, final_values, batch, log_rho, GAMMA, lambda_, clip_rho, clip_pg_rho)
    policy_loss = -np.mean(pg_advantage * log_prob)
    value_loss = 0.5 * np.mean((vs - values[:-1]) ** 2)
    return {
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "entropy": entropy.mean(),
        "loss": policy_loss + 0.5 * value_loss - 0.01 * entropy.mean(),
        "rho_mean": np.exp(log_rho).mean(),
        "rho_clip_fraction": np.mean(np.exp(log_rho) > clip_rho),
    }


@pytest.mark.parametrize("action_space", [DISCRETE, BOX], ids=["discrete", "continuous"])
@pytest.mark.parametrize("normalize_advantages", [False, True])
def test_ppo_losses_match_the_numpy_reference(action_space, normalize_advantages):
    network, _ = _network(action_space)
    # One epoch of one minibatch: the metrics are the loss over the whole batch at the initial params.
    learner = make_ppo(network, num_epochs=1, num_minibatches=1, gamma=GAMMA, gae_lambda=0.8, clip_eps=0.2,
                       ent_coef=0.01, vf_coef=0.5, normalize_advantages=normalize_advantages)
    state = learner.init(jax.random.key(0), EXAMPLE_OBS, action_space)
    batch = make_batch(network, learner.params(state))
    expected = ppo_expected_metrics(network, learner.params(state), batch, 0.8, normalize_advantages)
    _, metrics = learner.update(state, batch)
    _assert_metrics(metrics, expected)


def test_ppo_unrolled_makes_the_same_update_as_its_scanned_loops():
    """unroll=True (epochs and minibatches as straight-line code) changes the program, not the update:
    the same parameters, optimizer state and per-step metrics after 3 epochs x 2 minibatches."""
    network, _ = _network(DISCRETE)
    results = []
    for unroll in (False, True):
        learner = make_ppo(network, num_epochs=3, num_minibatches=2, gamma=GAMMA, gae_lambda=0.8, unroll=unroll)
        state = learner.init(jax.random.key(0), EXAMPLE_OBS, DISCRETE)
        results.append(learner.update(state, make_batch(network, learner.params(state))))
    (scanned, scanned_metrics), (unrolled, unrolled_metrics) = results
    assert unrolled.step == scanned.step == 1
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                   unrolled.params, _network(DISCRETE)[1])
    assert max(jax.tree_util.tree_leaves(moved)) > 0  # the update did change the parameters
    for a, b in zip(jax.tree_util.tree_leaves((scanned.params, scanned.opt_state)),
                    jax.tree_util.tree_leaves((unrolled.params, unrolled.opt_state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert scanned_metrics.keys() == unrolled_metrics.keys()
    for key in scanned_metrics:
        np.testing.assert_allclose(scanned_metrics[key], unrolled_metrics[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("action_space", [DISCRETE, BOX], ids=["discrete", "continuous"])
@pytest.mark.parametrize("lambda_,clip_rho,clip_pg_rho", [(1.0, 1.0, 1.0), (0.9, 2.0, 1.5)])
def test_impala_losses_match_the_numpy_reference(action_space, lambda_, clip_rho, clip_pg_rho):
    network, _ = _network(action_space)
    learner = make_impala(network, gamma=GAMMA, lambda_=lambda_, clip_rho_threshold=clip_rho,
                          clip_pg_rho_threshold=clip_pg_rho, ent_coef=0.01, vf_coef=0.5)
    state = learner.init(jax.random.key(0), EXAMPLE_OBS, action_space)
    batch = make_batch(network, learner.params(state), seed=1)
    expected = impala_expected_metrics(network, learner.params(state), batch, lambda_, clip_rho, clip_pg_rho)
    _, metrics = learner.update(state, batch)
    _assert_metrics(metrics, expected)


def test_impala_gradient_moves_log_pi_along_the_vtrace_advantage():
    """One plain SGD step: the policy-loss gradient is -mean(pg_advantage * grad log pi), targets held fixed."""

    network, params = _network(DISCRETE)
    learning_rate = 1e-3
    learner = make_impala(network, gamma=GAMMA, ent_coef=0.0, vf_coef=0.0, optimizer=optax.sgd(learning_rate))
    state = learner.init(jax.random.key(0), EXAMPLE_OBS, DISCRETE)
    batch = make_batch(network, learner.params(state), seed=2)
    log_prob, _, values, final_values = _network_outputs(network, learner.params(state), batch)
    _, pg_advantage = vtrace_reference(values, final_values, batch, log_prob - batch.extras["log_prob"],
                                       GAMMA, 1.0, 1.0, 1.0)

    def surrogate(p):
        new_log_prob, _, _ = network.evaluate(p, batch.obs[:-1], batch.action)
        return -(pg_advantage * new_log_prob).mean()

    grads = jax.grad(surrogate)(learner.params(state))
    expected = jax.tree_util.tree_map(lambda p, g: p - learning_rate * g, learner.params(state), grads)
    new_state, _ = learner.update(state, batch)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                           learner.params(new_state), expected)


# ------------------------------------------------------------------- observation and reward scaling


def _normalised_by_numpy(batch):
    """The batch as the learner must see it: obs standardised by all obs[:-1] rows, clipped to 10;
    rewards divided by the std of each column's discounted return (CleanRL's, from 0 at step 0)."""
    rows = batch.obs[:-1].reshape(-1, 4).astype(np.float64)
    mean, var = rows.mean(0), rows.var(0)

    def standardise(x):
        return np.clip((x - mean) / np.sqrt(var + 1e-8), -10, 10).astype(np.float32)

    ended = batch.terminated | batch.truncated
    returns = np.zeros((T, B))
    for b in range(B):
        g = 0.0
        for t in range(T):
            g = g * GAMMA * (1.0 - (t > 0 and ended[t - 1, b])) + batch.reward[t, b]
            returns[t, b] = g
    reward = (batch.reward / np.sqrt(returns.var() + 1e-8)).astype(np.float32)
    return batch._replace(obs=standardise(batch.obs), final_obs=standardise(batch.final_obs), reward=reward), mean, var


@pytest.mark.parametrize("algo", ["ppo", "impala"])
def test_learners_normalise_observations_and_scale_rewards_in_their_state(algo):
    network, _ = _network(DISCRETE)
    settings = dict(gamma=GAMMA, ent_coef=0.01, vf_coef=0.5, normalize_obs=True, normalize_reward=True)
    if algo == "ppo":
        learner = make_ppo(network, num_epochs=1, num_minibatches=1, gae_lambda=0.8, normalize_advantages=False,
                           **settings)
    else:
        learner = make_impala(network, **settings)
    state = learner.init(jax.random.key(0), EXAMPLE_OBS, DISCRETE)
    published = learner.params(state)
    assert set(published) == {"params", "obs_norm"} and float(published["obs_norm"].count) == 0
    params = published["params"]
    batch = make_batch(network, params, seed=3)
    batch = batch._replace(obs=5.0 + 3.0 * batch.obs)  # far from standard: normalising changes the values
    seen, mean, var = _normalised_by_numpy(batch)
    if algo == "ppo":
        expected = ppo_expected_metrics(network, params, seen, 0.8, normalize_advantages=False)
    else:
        expected = impala_expected_metrics(network, params, seen, 1.0, 1.0, 1.0)
    state, metrics = learner.update(state, batch)
    _assert_metrics(metrics, expected)

    # The published statistics are the batch's, and the served policy applies them.
    published = learner.params(state)
    np.testing.assert_allclose(published["obs_norm"].mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(published["obs_norm"].var, var, rtol=1e-4)
    assert float(published["obs_norm"].count) == T * B
    obs = 5.0 + 3.0 * np.random.default_rng(4).normal(size=(6, 4)).astype(np.float32)
    key = jax.random.key(5)
    _, served = jax.jit(learner.policy.apply)(published, obs, key)
    standardised = np.clip((obs - mean) / np.sqrt(var + 1e-8), -10, 10).astype(np.float32)
    _, direct = network.policy.apply(published["params"], standardised, key)
    _, raw = network.policy.apply(published["params"], obs, key)
    np.testing.assert_allclose(served["value"], direct["value"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(served["logits"], direct["logits"], rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(served["value"]) - np.asarray(raw["value"])).max() > 1e-2


def test_without_normalisation_the_network_policy_and_params_are_published_as_they_are():
    network, _ = _network(DISCRETE)
    learner = make_ppo(network)
    state = learner.init(jax.random.key(0), EXAMPLE_OBS, DISCRETE)
    assert learner.policy is network.policy and learner.params(state) is state.params


def test_reward_scaling_rejects_an_environment_beyond_its_table():
    network, params = _network(DISCRETE)
    learner = make_impala(network, normalize_reward=True, max_envs=2)
    state = learner.init(jax.random.key(0), EXAMPLE_OBS, DISCRETE)
    with pytest.raises(ValueError, match="keeps returns for max_envs=2 environments, got a trajectory of environment 3"):
        learner.update(state, make_batch(network, params))
