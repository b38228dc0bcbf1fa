"""agents.networks, agents.ppo, agents.impala and agents.custom through the rlbatch interfaces."""
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.custom import make_linear_actor_critic, make_linear_impala
from agents.impala import ImpalaState, make_impala
from agents.networks import ActorCritic, make_actor_critic, make_policy
from agents.ppo import PPOState, make_ppo
from rlbatch import Learner, Policy, Trajectory, stack_trajectories

DISCRETE = gym.spaces.Discrete(3)
BOX = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
VECTOR_OBS = np.zeros((4,), np.float32)

# The Nature CNN needs 36x36 images: small ones take a smaller conv stack (strided first, as the
# Nature CNN's) or the IMPALA ResNet, whose SAME padding fits any size.
SMALL_CONV_LAYERS = ((16, 3, 2), (32, 3, 1))
NETWORKS = {
    "mlp-discrete": (DISCRETE, VECTOR_OBS, {"torso": "mlp"}),
    "mlp-continuous": (BOX, VECTOR_OBS, {"torso": "mlp"}),
    "cnn-hwc-uint8": (DISCRETE, np.zeros((12, 10, 3), np.uint8), {"torso": "cnn", "conv_layers": SMALL_CONV_LAYERS}),
    "impala-hw": (BOX, np.zeros((9, 9), np.float32), {"torso": "impala"}),
}


def _random_obs(example_obs, shape, seed=0):
    rng = np.random.default_rng(seed)
    if example_obs.dtype == np.uint8:
        return rng.integers(0, 256, (*shape, *example_obs.shape), dtype=np.uint8)
    return rng.normal(size=(*shape, *example_obs.shape)).astype(np.float32)


def _network(name):
    action_space, example_obs, kwargs = NETWORKS[name]
    network = make_actor_critic(action_space, example_obs, hidden=(32, 32), **kwargs)
    return network, network.policy.init(jax.random.key(0), example_obs), action_space, example_obs


@pytest.mark.parametrize("name", NETWORKS)
def test_apply_shapes(name):
    network, params, action_space, example_obs = _network(name)
    action, extras = jax.jit(network.policy.apply)(params, _random_obs(example_obs, (5,)), jax.random.key(1))
    assert extras["log_prob"].shape == (5,)
    assert extras["value"].shape == (5,)
    if isinstance(action_space, gym.spaces.Discrete):
        assert action.shape == (5,) and action.dtype == jnp.int32
        assert extras["logits"].shape == (5, action_space.n)
        assert np.all((0 <= action) & (action < action_space.n))
    else:
        assert action.shape == (5, 2) and action.dtype == jnp.float32
        assert extras["mean"].shape == (5, 2)


@pytest.mark.parametrize("name", NETWORKS)
def test_log_prob_from_apply_equals_evaluate(name):
    network, params, _, example_obs = _network(name)
    obs = _random_obs(example_obs, (6,))
    action, extras = network.policy.apply(params, obs, jax.random.key(2))
    # [T=2, B=3] leading dims: evaluate flattens and restores them.
    log_prob, entropy, value = network.evaluate(
        params, obs.reshape(2, 3, *obs.shape[1:]), np.asarray(action).reshape(2, 3, *action.shape[1:])
    )
    assert log_prob.shape == entropy.shape == value.shape == (2, 3)
    np.testing.assert_allclose(log_prob.reshape(6), extras["log_prob"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value.reshape(6), extras["value"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(network.value(params, obs), extras["value"], rtol=1e-5, atol=1e-5)


def test_initial_policy_is_near_uniform_and_greedy_is_deterministic():
    network, params, _, example_obs = _network("mlp-discrete")
    obs = _random_obs(example_obs, (8,))
    _, entropy, _ = network.evaluate(params, obs, np.zeros(8, np.int32))
    np.testing.assert_allclose(entropy, np.log(3), rtol=1e-3)  # 0.01-scaled policy head
    a1, extras = network.greedy_policy.apply(params, obs, jax.random.key(0))
    a2, _ = network.greedy_policy.apply(params, obs, jax.random.key(1))
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(a1, np.argmax(extras["logits"], -1))


def test_continuous_actions_are_unclipped_samples():
    network, params, _, example_obs = _network("mlp-continuous")
    params = {"params": {**params["params"], "log_std": jnp.full((2,), 1.5)}}  # std 4.5: samples often leave [-1, 1]
    action, extras = network.policy.apply(params, _random_obs(example_obs, (64,)), jax.random.key(3))
    assert np.abs(np.asarray(action)).max() > 1.0
    greedy, greedy_extras = network.greedy_policy.apply(params, _random_obs(example_obs, (64,)), None)
    np.testing.assert_array_equal(greedy, greedy_extras["mean"])


def test_make_policy_returns_the_sampling_policy_and_rejects_unknown_spaces():
    policy = make_policy(DISCRETE, VECTOR_OBS)
    assert isinstance(policy, Policy) and not isinstance(policy, ActorCritic)
    assert isinstance(make_actor_critic(DISCRETE, VECTOR_OBS), ActorCritic)
    with pytest.raises(ValueError, match="expected a Discrete or 1-D Box action space"):
        make_policy(gym.spaces.MultiDiscrete([2, 2]), VECTOR_OBS)
    with pytest.raises(ValueError, match="expected torso 'mlp', 'cnn' or 'impala', got 'rnn'"):
        make_policy(DISCRETE, VECTOR_OBS, torso="rnn")
    with pytest.raises(ValueError, match=r"expected ONE observation of shape \(4,\) \(no batch axis\), got shape \(2, 4\)"):
        make_policy(DISCRETE, VECTOR_OBS).init(jax.random.key(0), np.zeros((2, 4), np.float32))


# ------------------------------------------------------------------------------------- learners

T, B = 8, 4


def _synthetic_batch(network, params, action_space, example_obs, seed=0):
    """A time-major [T, B] batch with a termination and a truncation, from 2 actors x 2 envs."""
    rng = np.random.default_rng(seed)
    obs = _random_obs(example_obs, (T + 1, B), seed)
    action, extras = network.policy.apply(params, obs[:-1].reshape(T * B, *example_obs.shape), jax.random.key(seed))
    action = np.asarray(action).reshape(T, B, *action.shape[1:])
    terminated = np.zeros((T, B), bool)
    truncated = np.zeros((T, B), bool)
    terminated[3, 0] = truncated[5, 2] = True
    final_obs = np.zeros((T, B, *example_obs.shape), example_obs.dtype)
    final_obs[3, 0], final_obs[5, 2] = _random_obs(example_obs, (2,), seed + 1)
    # The reward favours action 0 (or a positive first action dimension): something to learn.
    good = (action == 0) if isinstance(action_space, gym.spaces.Discrete) else (action[..., 0] > 0)
    reward = good.astype(np.float32) + 0.1 * rng.normal(size=(T, B)).astype(np.float32)
    log_prob = np.asarray(extras["log_prob"]).reshape(T, B)

    def actor(cols, actor_id):
        return Trajectory(
            obs=obs[:, cols],
            action=action[:, cols],
            reward=reward[:, cols],
            terminated=terminated[:, cols],
            truncated=truncated[:, cols],
            final_obs=final_obs[:, cols],
            extras={"log_prob": log_prob[:, cols]},
            policy_version=np.zeros((T, 2), np.int64),
            episode_id=np.zeros((T, 2), np.int64),
            actor_id=actor_id,
        )

    return stack_trajectories([actor(slice(0, 2), 0), actor(slice(2, 4), 1)])


def _make_learner(algo, network, on_trace, gamma=0.99):
    if algo == "ppo":
        return make_ppo(network, learning_rate=3e-3, num_minibatches=2, gamma=gamma, on_trace=on_trace)
    return make_impala(network, learning_rate=3e-3, gamma=gamma, on_trace=on_trace)


def _shapes(tree):
    return jax.tree_util.tree_structure(tree), [x.shape for x in jax.tree_util.tree_leaves(tree)]


def _rewarded_action_score(network, params, action_space, batch):
    """Mean probability of action 0 (discrete) or mean of the first action dimension (continuous)."""
    obs = batch.obs[:-1]
    if isinstance(action_space, gym.spaces.Discrete):
        log_prob, _, _ = network.evaluate(params, obs, np.zeros(obs.shape[:2], np.int32))
        return float(jnp.exp(log_prob).mean())
    _, extras = network.greedy_policy.apply(params, obs.reshape(-1, *obs.shape[2:]), None)
    return float(extras["mean"][:, 0].mean())


def _with_other_dtypes(batch):
    """The same batch as the trainer might send it later: int flags, float64 rewards, more extras."""
    return batch._replace(
        terminated=batch.terminated.astype(np.int64),
        reward=batch.reward.astype(np.float64),
        extras={**batch.extras, "value": np.zeros((T, B), np.float32)},
    )


@pytest.mark.parametrize(
    "algo,name",
    [
        # Each algorithm with each head and each torso, in four compilations.
        ("ppo", "mlp-discrete"),
        ("ppo", "impala-hw"),  # continuous
        ("impala", "mlp-continuous"),
        ("impala", "cnn-hwc-uint8"),  # discrete
    ],
)
def test_update_lowers_loss_keeps_params_and_traces_once(algo, name):
    network, params, action_space, example_obs = _network(name)
    traces = []
    # gamma=0 makes the value targets the fixed rewards, so the losses on a fixed batch are a fixed
    # objective (with bootstrapping they chase the value net's own predictions).
    learner = _make_learner(algo, network, on_trace=lambda: traces.append(1), gamma=0.0)
    assert isinstance(learner, Learner) and learner.policy is network.policy
    state = learner.init(jax.random.key(0), example_obs, action_space)
    assert isinstance(state, PPOState if algo == "ppo" else ImpalaState)
    batch = _synthetic_batch(network, learner.params(state), action_space, example_obs)
    before = _shapes(learner.params(state))
    score_before = _rewarded_action_score(network, learner.params(state), action_space, batch)

    # Deterministic given the state (PPO's shuffling key lives in it).
    again, _ = learner.update(state, batch)
    history = []
    for i in range(15):
        state, metrics = learner.update(state, batch if i % 2 else _with_other_dtypes(batch))
        history.append(metrics)
        if i == 0:
            jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, again.params)
    assert float(history[-1]["loss"]) < float(history[0]["loss"])
    assert float(history[-1]["value_loss"]) < float(history[0]["value_loss"])
    assert _rewarded_action_score(network, learner.params(state), action_space, batch) > score_before + 0.05
    assert _shapes(learner.params(state)) == before
    assert int(state.step) == 15
    assert len(traces) == 1  # 16 calls, two dtype variants of the batch
    for key in ("loss", "policy_loss", "value_loss", "entropy", "approx_kl", "grad_norm"):
        assert np.shape(metrics[key]) == () and np.isfinite(metrics[key]), key


def test_learner_errors_name_the_problem():
    network, params, action_space, example_obs = _network("mlp-discrete")
    with pytest.raises(ValueError, match="the network was built for action space Discrete\\(3\\), got Discrete\\(5\\)"):
        make_ppo(network).init(jax.random.key(0), example_obs, gym.spaces.Discrete(5))
    learner = make_impala(network)
    state = learner.init(jax.random.key(0), example_obs, action_space)
    batch = _synthetic_batch(network, params, action_space, example_obs)
    with pytest.raises(ValueError, match=r"expected batch.extras\['log_prob'\]"):
        learner.update(state, batch._replace(extras={}))
    with pytest.raises(ValueError, match="expected T \\* B divisible by num_minibatches=3, got T=8, B=4"):
        ppo = make_ppo(network, num_minibatches=3)
        ppo.update(ppo.init(jax.random.key(0), example_obs, action_space), batch)


def test_custom_linear_policy_trains_through_the_same_interface():
    network = make_linear_actor_critic(3)
    assert isinstance(network, ActorCritic)
    learner = make_linear_impala(3, learning_rate=1e-2)
    state = learner.init(jax.random.key(0), VECTOR_OBS, DISCRETE)
    batch = _synthetic_batch(network, learner.params(state), DISCRETE, VECTOR_OBS)
    losses = []
    for _ in range(10):
        state, metrics = learner.update(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    action, extras = learner.policy.apply(learner.params(state), np.ones((2, 4), np.float32), jax.random.key(0))
    assert action.shape == (2,) and extras["log_prob"].shape == (2,)


# ------------------------------------------------------------------------------------ CartPole


def _cartpole_returns(learner, state, num_envs, unroll_length, num_updates, seed):
    """A synchronous actor loop; returns (episode returns in order, final state)."""
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make("CartPole-v1") for _ in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    obs, _ = envs.reset(seed=seed)
    act = jax.jit(learner.policy.apply)
    key = jax.random.key(seed)
    returns, running = [], np.zeros(num_envs)
    for _ in range(num_updates):
        fields = {name: [] for name in ("obs", "action", "reward", "terminated", "truncated", "final_obs", "log_prob")}
        params = learner.params(state)
        for _ in range(unroll_length):
            key, step_key = jax.random.split(key)
            action, extras = act(params, obs, step_key)
            action = np.asarray(action)
            next_obs, reward, terminated, truncated, info = envs.step(action)
            final_obs = np.zeros_like(obs)
            for i in np.flatnonzero(terminated | truncated):
                final_obs[i] = info["final_obs"][i]
            running += reward
            returns.extend(running[terminated | truncated])
            running[terminated | truncated] = 0.0
            for name, value in zip(fields, (obs, action, reward, terminated, truncated, final_obs, extras["log_prob"])):
                fields[name].append(np.asarray(value))
            obs = next_obs
        fields["obs"].append(obs)
        stacked = {name: np.stack(values) for name, values in fields.items()}
        batch = Trajectory(
            obs=stacked["obs"],
            action=stacked["action"],
            reward=stacked["reward"].astype(np.float32),
            terminated=stacked["terminated"],
            truncated=stacked["truncated"],
            final_obs=stacked["final_obs"],
            extras={"log_prob": stacked["log_prob"]},
            policy_version=np.zeros((unroll_length, num_envs), np.int64),
            episode_id=np.zeros((unroll_length, num_envs), np.int64),
            actor_id=0,
        )
        state, _ = learner.update(state, stack_trajectories([batch]))
    envs.close()
    return returns, state


def test_ppo_learns_cartpole():
    env = gym.make("CartPole-v1")
    example_obs, _ = env.reset(seed=0)
    network = make_actor_critic(env.action_space, example_obs)
    learner = make_ppo(network, learning_rate=2e-3)
    state = learner.init(jax.random.key(0), example_obs, env.action_space)
    returns, _ = _cartpole_returns(learner, state, num_envs=16, unroll_length=32, num_updates=25, seed=0)
    random_mean = np.mean(returns[:20])  # the initial policy is near uniform: ~22 per episode
    assert random_mean < 40
    assert np.mean(returns[-20:]) > 3 * random_mean, (random_mean, np.mean(returns[-20:]))
