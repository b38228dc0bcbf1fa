"""agents.modules and agents.networks: the flax torsos and heads behind make_actor_critic."""
import re
from pathlib import Path

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents.modules import ImpalaResNet, NatureCNN, infer_channels_first
from agents.networks import make_actor_critic

ATARI_OBS = np.zeros((4, 84, 84), np.uint8)  # envs.atari's layout: 4 stacked frames first
VECTOR_OBS = np.zeros((4,), np.float32)
SIX_ACTIONS = gym.spaces.Discrete(6)
BOX = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

CASES = {
    "mlp-vector-discrete": (SIX_ACTIONS, VECTOR_OBS, "mlp"),
    "mlp-vector-continuous": (BOX, VECTOR_OBS, "mlp"),
    "cnn-atari": (SIX_ACTIONS, ATARI_OBS, "cnn"),
    "impala-atari": (SIX_ACTIONS, ATARI_OBS, "impala"),
}


def _random_obs(example_obs, lead, seed=0):
    rng = np.random.default_rng(seed)
    if example_obs.dtype == np.uint8:
        return rng.integers(0, 256, (*lead, *example_obs.shape), dtype=np.uint8)
    return rng.normal(size=(*lead, *example_obs.shape)).astype(np.float32)


def _num_params(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    space, example_obs, torso = CASES[request.param]
    network = make_actor_critic(space, example_obs, torso=torso)
    return network, network.policy.init(jax.random.key(0), example_obs), space, example_obs


def test_apply_gives_documented_shapes_and_dtypes(case):
    network, params, space, example_obs = case
    action, extras = jax.jit(network.policy.apply)(params, _random_obs(example_obs, (3,)), jax.random.key(1))
    assert extras["log_prob"].shape == extras["value"].shape == (3,)
    assert extras["log_prob"].dtype == extras["value"].dtype == jnp.float32
    if isinstance(space, gym.spaces.Discrete):
        assert action.shape == (3,) and action.dtype == jnp.int32
        assert extras["logits"].shape == (3, 6) and extras["logits"].dtype == jnp.float32
    else:
        assert action.shape == (3, 2) and action.dtype == jnp.float32
        assert extras["mean"].shape == (3, 2) and extras["mean"].dtype == jnp.float32


def test_log_prob_from_apply_equals_evaluate_over_time_and_batch(case):
    network, params, _, example_obs = case
    obs = _random_obs(example_obs, (6,), seed=1)
    action, extras = network.policy.apply(params, obs, jax.random.key(2))
    action = np.asarray(action)
    log_prob, entropy, value = network.evaluate(
        params, obs.reshape(2, 3, *obs.shape[1:]), action.reshape(2, 3, *action.shape[1:])
    )
    assert log_prob.shape == entropy.shape == value.shape == (2, 3)
    np.testing.assert_allclose(log_prob.reshape(6), extras["log_prob"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value.reshape(6), extras["value"], rtol=1e-5, atol=1e-5)


def test_initial_policy_is_near_uniform(case):
    network, params, space, example_obs = case
    obs = _random_obs(example_obs, (8,), seed=3)
    _, extras = network.policy.apply(params, obs, jax.random.key(0))
    if isinstance(space, gym.spaces.Discrete):
        # The policy head's 0.01 gain keeps every action's probability within 0.01 of 1/6 (a gain
        # of 1.0 moves them by about 0.1 on these inputs).
        assert np.abs(jax.nn.softmax(extras["logits"]) - 1 / 6).max() < 0.01
    else:
        assert np.abs(np.asarray(extras["mean"])).max() < 0.05
        np.testing.assert_array_equal(params["params"]["log_std"], 0.0)


@pytest.mark.parametrize("torso", ["cnn", "impala"])
def test_uint8_images_are_scaled_inside_the_network(torso):
    network = make_actor_critic(SIX_ACTIONS, ATARI_OBS, torso=torso)
    params = network.policy.init(jax.random.key(0), ATARI_OBS)
    images = _random_obs(ATARI_OBS, (2,), seed=4)
    _, from_uint8 = network.policy.apply(params, images, jax.random.key(0))
    _, from_float = network.policy.apply(params, images.astype(np.float32) / 255.0, jax.random.key(0))
    _, from_unscaled = network.policy.apply(params, images.astype(np.float32), jax.random.key(0))
    for name in ("logits", "value"):
        np.testing.assert_allclose(from_uint8[name], from_float[name], rtol=1e-5, atol=1e-6)
    assert not np.allclose(from_uint8["value"], from_unscaled["value"], rtol=1e-3)


def test_channel_layout_is_inferred_from_the_shape():
    assert infer_channels_first((4, 84, 84))
    assert infer_channels_first((3, 64, 64))
    assert not infer_channels_first((84, 84, 4))
    assert not infer_channels_first((12, 10, 3))
    assert not infer_channels_first((84, 84))
    assert not infer_channels_first((3, 3, 3))  # a tie reads as gymnasium's [H, W, C]


@pytest.mark.parametrize("module_cls", [NatureCNN, ImpalaResNet])
def test_frames_first_and_channels_last_give_the_same_features(module_cls):
    # Non-square frames: a transpose that swapped H and W would fail here.
    frames_first = _random_obs(np.zeros((4, 40, 44), np.uint8), (2,), seed=5)
    channels_last = frames_first.transpose(0, 2, 3, 1)
    inferred = module_cls()
    params = inferred.init(jax.random.key(0), frames_first)
    explicit = module_cls(channels_first=False)
    assert jax.tree_util.tree_map(np.shape, explicit.init(jax.random.key(0), channels_last)) == jax.tree_util.tree_map(
        np.shape, params
    )
    np.testing.assert_allclose(
        inferred.apply(params, frames_first), explicit.apply(params, channels_last), rtol=1e-5, atol=1e-6
    )
    forced = module_cls(channels_first=True).apply(params, frames_first)
    np.testing.assert_allclose(forced, inferred.apply(params, frames_first), rtol=1e-5, atol=1e-6)


def test_mlp_actor_and_critic_have_separate_torsos_as_in_cleanrl():
    # CleanRL's classic-control Agent on CartPole (4 inputs, 2 actions): two 64x64 tanh MLPs.
    torso = (4 * 64 + 64) + (64 * 64 + 64)
    expected = (torso + 64 * 2 + 2) + (torso + 64 * 1 + 1)
    assert expected == 9_155
    network = make_actor_critic(gym.spaces.Discrete(2), VECTOR_OBS)
    assert _num_params(network.policy.init(jax.random.key(0), VECTOR_OBS)) == expected


def test_relu_mlp_and_initial_log_std_as_the_zoos_mujoco_policy():
    # rl-baselines3-zoo's tuned MuJoCo PPO: 256x256 ReLU torsos and a Gaussian starting at log-std -2.
    obs = np.linspace(-2.0, 2.0, 17).astype(np.float32)
    network = make_actor_critic(gym.spaces.Box(-1.0, 1.0, (6,)), obs, hidden=(256, 256), activation="relu",
                                log_std_init=-2.0)
    params = network.policy.init(jax.random.key(0), obs)
    net = params["params"]
    np.testing.assert_array_equal(net["log_std"], np.full(6, -2.0, np.float32))
    # The mean by hand with ReLU, from the same parameters: a tanh torso would give another one.
    h = obs[None]
    for layer in ("Dense_0", "Dense_1"):
        h = np.maximum(h @ np.asarray(net["torso"][layer]["kernel"]) + np.asarray(net["torso"][layer]["bias"]), 0.0)
    mean = h @ np.asarray(net["policy_head"]["kernel"]) + np.asarray(net["policy_head"]["bias"])
    _, extras = network.greedy_policy.apply(params, obs[None], jax.random.key(1))
    np.testing.assert_allclose(extras["mean"], mean, rtol=1e-4, atol=1e-6)
    log_prob, entropy, _ = network.evaluate(params, obs[None], extras["mean"])
    np.testing.assert_allclose(entropy, [6 * (-2.0 + 0.5 * np.log(2 * np.pi * np.e))], rtol=1e-5)
    np.testing.assert_allclose(log_prob, [6 * (2.0 - 0.5 * np.log(2 * np.pi))], rtol=1e-5)  # at the mean


def test_nature_cnn_parameter_count_matches_cleanrl():
    # CleanRL's ppo_atari Agent for 4x84x84 frames and 6 actions, layer by layer (VALID padding:
    # 84 -> (84 - 8) // 4 + 1 = 20 -> (20 - 4) // 2 + 1 = 9 -> 9 - 3 + 1 = 7).
    conv1 = 8 * 8 * 4 * 32 + 32
    conv2 = 4 * 4 * 32 * 64 + 64
    conv3 = 3 * 3 * 64 * 64 + 64
    dense = 7 * 7 * 64 * 512 + 512
    actor, critic = 512 * 6 + 6, 512 * 1 + 1
    expected = conv1 + conv2 + conv3 + dense + actor + critic
    assert expected == 1_687_719
    network = make_actor_critic(SIX_ACTIONS, ATARI_OBS, torso="cnn")
    assert _num_params(network.policy.init(jax.random.key(0), ATARI_OBS)) == expected


def test_impala_resnet_parameter_count_matches_the_architecture():
    def conv3x3(c_in, c_out):
        return 3 * 3 * c_in * c_out + c_out

    expected, c_in = 0, 4
    for c in (16, 32, 32):  # each stack: a conv, then 2 residual blocks of 2 convs each
        expected += conv3x3(c_in, c) + 4 * conv3x3(c, c)
        c_in = c
    # SAME max-pools of stride 2: 84 -> 42 -> 21 -> 11.
    expected += 11 * 11 * 32 * 256 + 256  # dense
    expected += 256 * 6 + 6 + 256 * 1 + 1  # actor and critic heads
    assert expected == 1_091_031
    network = make_actor_critic(SIX_ACTIONS, ATARI_OBS, torso="impala")
    assert _num_params(network.policy.init(jax.random.key(0), ATARI_OBS)) == expected


def test_log_probs_match_the_distributions_by_hand():
    obs = _random_obs(VECTOR_OBS, (5,), seed=6)
    discrete = make_actor_critic(SIX_ACTIONS, VECTOR_OBS)
    params = discrete.policy.init(jax.random.key(0), VECTOR_OBS)
    action, extras = discrete.policy.apply(params, obs, jax.random.key(1))
    logits = np.asarray(extras["logits"], np.float64)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(extras["log_prob"], log_softmax[np.arange(5), np.asarray(action)], rtol=1e-5)

    gaussian = make_actor_critic(BOX, VECTOR_OBS)
    params = gaussian.policy.init(jax.random.key(0), VECTOR_OBS)
    log_std = np.array([0.3, -0.7], np.float32)
    params = {"params": {**params["params"], "log_std": jnp.asarray(log_std)}}
    action, extras = gaussian.policy.apply(params, obs, jax.random.key(1))
    z = (np.asarray(action) - np.asarray(extras["mean"])) / np.exp(log_std)
    by_hand = np.sum(-0.5 * z**2 - log_std - 0.5 * np.log(2 * np.pi), axis=-1)
    np.testing.assert_allclose(extras["log_prob"], by_hand, rtol=1e-5, atol=1e-5)
    _, entropy, _ = gaussian.evaluate(params, obs, np.asarray(action))
    np.testing.assert_allclose(entropy, np.sum(log_std + 0.5 * np.log(2 * np.pi * np.e)), rtol=1e-5)


def test_small_images_take_the_small_conv_stack_or_the_impala_resnet():
    grid = np.zeros((5, 5), np.float32)
    with pytest.raises(ValueError, match=r"conv layer 0 \(32, 8, 4\) expected an input of at least 8x8, got 5x5"):
        make_actor_critic(SIX_ACTIONS, grid, torso="cnn").policy.init(jax.random.key(0), grid)
    for kwargs in ({"torso": "cnn", "conv_layers": ((16, 3, 1), (32, 3, 1))}, {"torso": "impala"}):
        network = make_actor_critic(SIX_ACTIONS, grid, **kwargs)
        params = network.policy.init(jax.random.key(0), grid)
        action, _ = network.policy.apply(params, _random_obs(grid, (2,)), jax.random.key(0))
        assert action.shape == (2,)


def test_make_actor_critic_names_a_wrong_activation():
    with pytest.raises(ValueError, match=re.escape("expected activation in ['relu', 'tanh'], got 'gelu'")):
        make_actor_critic(gym.spaces.Discrete(2), VECTOR_OBS, activation="gelu")
    with pytest.raises(ValueError, match="activation applies to torso='mlp'"):
        make_actor_critic(gym.spaces.Discrete(2), np.zeros((4, 84, 84), np.uint8), torso="cnn", activation="relu")


def test_make_actor_critic_names_wrong_arguments():
    with pytest.raises(ValueError, match=r"torso='impala' expects \[H, W\], \[H, W, C\] or \[C, H, W\] observations, got shape \(4,\)"):
        make_actor_critic(SIX_ACTIONS, VECTOR_OBS, torso="impala")
    with pytest.raises(ValueError, match="conv_layers applies to torso='cnn', got torso='impala'"):
        make_actor_critic(SIX_ACTIONS, ATARI_OBS, torso="impala", conv_layers=((16, 3, 1),))


def _readme_flax_example() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("#### Networks in flax", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_flax_module_runs_through_a_policy_service():
    namespace: dict = {}
    exec(compile(_readme_flax_example(), "README.md#networks-in-flax", "exec"), namespace)
    service, module, params = namespace["service"], namespace["module"], namespace["params"]
    assert service.compile_count == 2 and service.closed
    assert namespace["action"].shape == () and 0 <= namespace["action"] < 6
    assert namespace["actions"].shape == (12,)
    # The service hands the module its params and the uint8 frames unchanged.
    expected = module.apply(params, namespace["example_obs"][None])[0]
    np.testing.assert_allclose(namespace["extras"]["logits"], expected, rtol=1e-5, atol=1e-6)
