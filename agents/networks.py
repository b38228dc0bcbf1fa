"""Actor-critic networks in plain JAX (no flax): MLP or CNN torso, Categorical or Gaussian head.

Shapes: `policy.apply` takes a batch `obs` [B, *obs_shape]; `evaluate` and `value` take any leading
dims, e.g. a time-major learner batch [T, B, *obs_shape], and return arrays of those leading dims.
Image observations are [H, W, C] or [H, W] (a channel axis is added); uint8 images are scaled to
[0, 1].

Continuous actions (gymnasium `Box`) come from a diagonal Gaussian with a state-independent
log-std. `apply` returns the *unclipped* sample and its log-prob, as CleanRL does: clip only when
stepping the environment (`clip_action`, or gymnasium's `ClipAction` wrapper), so that the stored
action and `extras["log_prob"]` stay consistent with `evaluate`.

    network = make_actor_critic(env.action_space, example_obs)
    params = network.policy.init(key, example_obs)           # example_obs: ONE observation
    action, extras = network.policy.apply(params, obs, key)  # extras: log_prob, value, logits|mean
    log_prob, entropy, value = network.evaluate(params, obs_tb, action_tb)
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np

from rlbatch import Policy

__all__ = ["ActorCritic", "clip_action", "make_actor_critic", "make_policy"]

# (output channels, kernel size, stride) per conv layer: the first two layers of the Nature CNN.
# SAME padding keeps them valid for small images too (a 5x5 grid shrinks to 2x2, then 1x1).
DEFAULT_CONV_LAYERS = ((32, 8, 4), (64, 4, 2))


class ActorCritic(NamedTuple):
    """What a learner needs from a model: the sampling policy plus functions of given actions.

    evaluate(params, obs, action) -> (log_prob, entropy, value), each of obs's leading dims.
    value(params, obs) -> value, of obs's leading dims.
    greedy_policy: same params, argmax / mean actions (for evaluation runs); None if not offered.
    action_space: the space the model was built for; learners check it in `init`.
    """

    policy: Policy
    evaluate: Callable[[Any, Any, Any], tuple]
    value: Callable[[Any, Any], Any]
    greedy_policy: Optional[Policy] = None
    action_space: Any = None


def clip_action(action: np.ndarray, action_space: gym.spaces.Box) -> np.ndarray:
    """Clips a continuous action to the space bounds; call it when stepping the environment."""
    return np.clip(action, action_space.low, action_space.high)


# --------------------------------------------------------------------------------------- layers


def _dense_init(key, in_dim: int, out_dim: int, scale: float) -> dict:
    w = jax.nn.initializers.orthogonal(scale)(key, (in_dim, out_dim), jnp.float32)
    return {"w": w, "b": jnp.zeros((out_dim,), jnp.float32)}


def _dense(p: dict, x):
    return x @ p["w"] + p["b"]


def _conv_init(key, in_channels: int, out_channels: int, kernel: int, scale: float) -> dict:
    # Orthogonal over the flattened receptive field, like torch's orthogonal_ on a conv weight.
    w = jax.nn.initializers.orthogonal(scale)(key, (kernel * kernel * in_channels, out_channels), jnp.float32)
    return {"w": w.reshape(kernel, kernel, in_channels, out_channels), "b": jnp.zeros((out_channels,), jnp.float32)}


def _conv(p: dict, x, stride: int):
    y = jax.lax.conv_general_dilated(
        x, p["w"], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + p["b"]


def _mlp_init(key, in_dim: int, hidden: Sequence[int]) -> list:
    keys = jax.random.split(key, len(hidden))
    dims = (in_dim, *hidden)
    return [_dense_init(k, dims[i], dims[i + 1], math.sqrt(2)) for i, k in enumerate(keys)]


def _mlp(layers: list, x):
    for layer in layers:
        x = jnp.tanh(_dense(layer, x))
    return x


# ---------------------------------------------------------------------------------------- model


def make_actor_critic(
    action_space: gym.Space,
    example_obs: Any,
    hidden: Sequence[int] = (64, 64),
    torso: str = "mlp",
    conv_layers: Sequence[tuple[int, int, int]] = DEFAULT_CONV_LAYERS,
) -> ActorCritic:
    """Builds an actor-critic for `action_space` and observations shaped like `example_obs`.

    torso="mlp": separate tanh MLPs for actor and critic (CleanRL's classic-control PPO).
    torso="cnn": one shared ReLU conv stack + ReLU dense `hidden` layers, then both heads.
    Orthogonal init: sqrt(2) in the torso, 0.01 on the policy head, 1.0 on the value head.
    """
    example_obs = np.asarray(example_obs)
    obs_shape = example_obs.shape
    scale_obs = 1.0 / 255.0 if example_obs.dtype == np.uint8 else 1.0
    if torso not in ("mlp", "cnn"):
        raise ValueError(f"make_actor_critic: expected torso 'mlp' or 'cnn', got {torso!r}")
    if torso == "cnn" and len(obs_shape) not in (2, 3):
        raise ValueError(f"make_actor_critic: torso='cnn' expects [H, W] or [H, W, C] observations, got shape {obs_shape}")
    if isinstance(action_space, gym.spaces.Discrete):
        discrete, num_outputs = True, int(action_space.n)
    elif isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        discrete, num_outputs = False, int(action_space.shape[0])
    else:
        raise ValueError(
            f"make_actor_critic: expected a Discrete or 1-D Box action space, got {action_space!r}"
        )

    def preprocess(obs):
        x = jnp.asarray(obs, jnp.float32) * scale_obs
        return x[..., None] if torso == "cnn" and len(obs_shape) == 2 else x

    def init(key, example_obs):
        if np.shape(example_obs) != obs_shape:
            raise ValueError(
                f"policy.init: expected ONE observation of shape {obs_shape} (no batch axis), "
                f"got shape {np.shape(example_obs)}"
            )
        k_torso, k_critic, k_pi, k_v = jax.random.split(key, 4)
        x = preprocess(jnp.asarray(example_obs)[None])
        params = {}
        if torso == "mlp":
            in_dim = int(np.prod(obs_shape))
            params["actor_torso"] = _mlp_init(k_torso, in_dim, hidden)
            params["critic_torso"] = _mlp_init(k_critic, in_dim, hidden)
        else:
            conv_keys = jax.random.split(k_torso, len(conv_layers))
            convs, channels = [], x.shape[-1]
            for k, (out_channels, kernel, stride) in zip(conv_keys, conv_layers):
                convs.append(_conv_init(k, channels, out_channels, kernel, math.sqrt(2)))
                x = _conv(convs[-1], x, stride)
                channels = out_channels
            params["conv"] = convs
            params["dense"] = [
                _dense_init(k, d_in, d_out, math.sqrt(2))
                for k, d_in, d_out in zip(
                    jax.random.split(k_critic, len(hidden)), (int(np.prod(x.shape[1:])), *hidden), hidden
                )
            ]
        params["policy_head"] = _dense_init(k_pi, hidden[-1], num_outputs, 0.01)
        params["value_head"] = _dense_init(k_v, hidden[-1], 1, 1.0)
        if not discrete:
            params["log_std"] = jnp.zeros((num_outputs,), jnp.float32)
        return params

    def forward(params, obs):
        """obs [N, *obs_shape] -> (policy_out [N, A], value [N])."""
        x = preprocess(obs)
        if torso == "mlp":
            x = x.reshape(x.shape[0], -1)
            actor_h, critic_h = _mlp(params["actor_torso"], x), _mlp(params["critic_torso"], x)
        else:
            for layer, (_, _, stride) in zip(params["conv"], conv_layers):
                x = jax.nn.relu(_conv(layer, x, stride))
            x = x.reshape(x.shape[0], -1)
            for layer in params["dense"]:
                x = jax.nn.relu(_dense(layer, x))
            actor_h = critic_h = x
        return _dense(params["policy_head"], actor_h), _dense(params["value_head"], critic_h)[:, 0]

    def flat_forward(params, obs):
        """Any leading dims: obs [*lead, *obs_shape] -> (policy_out [*lead, A], value [*lead])."""
        lead = obs.shape[: obs.ndim - len(obs_shape)]
        out, value = forward(params, obs.reshape((-1, *obs_shape)))
        return out.reshape((*lead, num_outputs)), value.reshape(lead)

    def log_prob_and_entropy(params, out, action):
        if discrete:
            log_probs = jax.nn.log_softmax(out)
            log_prob = jnp.take_along_axis(log_probs, action[..., None].astype(jnp.int32), axis=-1)[..., 0]
            entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
            return log_prob, entropy
        log_std = params["log_std"]
        z = (action - out) / jnp.exp(log_std)
        log_prob = jnp.sum(-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi), axis=-1)
        entropy = jnp.sum(log_std + 0.5 * math.log(2 * math.pi * math.e)) * jnp.ones(out.shape[:-1])
        return log_prob, entropy

    def make_apply(greedy: bool):
        def apply(params, obs, key):
            out, value = forward(params, obs)
            if discrete:
                action = jnp.argmax(out, -1) if greedy else jax.random.categorical(key, out)
                action = action.astype(jnp.int32)
            else:
                noise = 0.0 if greedy else jax.random.normal(key, out.shape) * jnp.exp(params["log_std"])
                action = out + noise
            log_prob, _ = log_prob_and_entropy(params, out, action)
            extras = {"log_prob": log_prob, "value": value, ("logits" if discrete else "mean"): out}
            return action, extras

        return apply

    def evaluate(params, obs, action):
        out, value = flat_forward(params, obs)
        log_prob, entropy = log_prob_and_entropy(params, out, action)
        return log_prob, entropy, value

    def value(params, obs):
        return flat_forward(params, obs)[1]

    return ActorCritic(
        policy=Policy(init=init, apply=make_apply(greedy=False)),
        evaluate=evaluate,
        value=value,
        greedy_policy=Policy(init=init, apply=make_apply(greedy=True)),
        action_space=action_space,
    )


def make_policy(
    action_space: gym.Space,
    example_obs: Any,
    hidden: Sequence[int] = (64, 64),
    torso: str = "mlp",
    conv_layers: Sequence[tuple[int, int, int]] = DEFAULT_CONV_LAYERS,
) -> Policy:
    """The sampling `rlbatch.Policy` of `make_actor_critic` (same arguments), for serving without a learner."""
    return make_actor_critic(action_space, example_obs, hidden, torso, conv_layers).policy
