"""Actor-critics from the flax modules in `agents.modules`: a torso, then a Categorical or Gaussian head.

Shapes: `policy.apply` takes a batch `obs` [B, *obs_shape]; `evaluate` and `value` take any leading
dims, e.g. a time-major learner batch [T, B, *obs_shape], and return arrays of those leading dims.

Torsos: "mlp" (separate tanh MLPs for actor and critic, CleanRL's classic control), "cnn" (the
Nature CNN, shared by both heads) and "impala" (the IMPALA ResNet, shared). Image observations are
[H, W], [H, W, C] or [C, H, W] (Atari's stacked frames [4, 84, 84]); `channels_first=None` infers
the layout (`agents.modules.infer_channels_first`: [C, H, W] when the first axis is smaller than
the last). uint8 images are scaled to [0, 1] inside the network. The Nature CNN needs images of at
least 36x36; for small grids pass `conv_layers=((16, 3, 1), (32, 3, 1))` or use torso="impala".

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

from agents.modules import ACTIVATIONS, MLP, NATURE_CNN_LAYERS, ActorCriticModule, ImpalaResNet, NatureCNN
from rlbatch import Policy

__all__ = ["ActorCritic", "DEFAULT_HIDDEN", "clip_action", "make_actor_critic", "make_policy"]

# The dense widths after each torso when `hidden` is not given: CleanRL's 64x64 MLP, the Nature
# CNN's 512 and the IMPALA ResNet's 256.
DEFAULT_HIDDEN = {"mlp": (64, 64), "cnn": (512,), "impala": (256,)}


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


def _torso_modules(torso, obs_shape, hidden, conv_layers, channels_first, activation) -> tuple:
    """(actor torso, critic torso or None when the heads share it) for `torso`."""
    if torso == "mlp":
        return MLP(hidden, activation), MLP(hidden, activation)
    if len(obs_shape) not in (2, 3):
        raise ValueError(
            f"make_actor_critic: torso={torso!r} expects [H, W], [H, W, C] or [C, H, W] observations, "
            f"got shape {obs_shape}"
        )
    if torso == "cnn":
        return NatureCNN(conv_layers, hidden, channels_first), None
    return ImpalaResNet(hidden=hidden, channels_first=channels_first), None


def make_actor_critic(
    action_space: gym.Space,
    example_obs: Any,
    hidden: Optional[Sequence[int]] = None,
    torso: str = "mlp",
    conv_layers: Optional[Sequence[tuple[int, int, int]]] = None,
    channels_first: Optional[bool] = None,
    activation: str = "tanh",
    log_std_init: float = 0.0,
) -> ActorCritic:
    """Builds an actor-critic for `action_space` and observations shaped like `example_obs`.

    torso="mlp": separate MLPs for actor and critic, of `activation` "tanh" (CleanRL's PPO) or "relu"
      (rl-baselines3-zoo's tuned MuJoCo PPO).
    torso="cnn": the Nature CNN (`conv_layers`, default `NATURE_CNN_LAYERS`), shared by both heads.
    torso="impala": the IMPALA ResNet, shared by both heads.
    hidden: the dense widths after the torso; default `DEFAULT_HIDDEN[torso]`.
    channels_first: image layout; None infers it from `example_obs`'s shape.
    log_std_init: the Gaussian's initial log-std (Box actions; the zoo's MuJoCo PPO starts at -2).
    """
    example_obs = np.asarray(example_obs)
    obs_shape = example_obs.shape
    if torso not in DEFAULT_HIDDEN:
        raise ValueError(f"make_actor_critic: expected torso 'mlp', 'cnn' or 'impala', got {torso!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"make_actor_critic: expected activation in {sorted(ACTIVATIONS)}, got {activation!r}")
    if activation != "tanh" and torso != "mlp":
        raise ValueError(f"make_actor_critic: activation applies to torso='mlp' (the pixel torsos use relu), "
                         f"got torso={torso!r} with activation={activation!r}")
    if conv_layers is not None and torso != "cnn":
        raise ValueError(f"make_actor_critic: conv_layers applies to torso='cnn', got torso={torso!r}")
    if isinstance(action_space, gym.spaces.Discrete):
        discrete, num_outputs = True, int(action_space.n)
    elif isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        discrete, num_outputs = False, int(action_space.shape[0])
    else:
        raise ValueError(
            f"make_actor_critic: expected a Discrete or 1-D Box action space, got {action_space!r}"
        )
    actor_torso, critic_torso = _torso_modules(
        torso,
        obs_shape,
        tuple(DEFAULT_HIDDEN[torso] if hidden is None else hidden),
        tuple(NATURE_CNN_LAYERS if conv_layers is None else conv_layers),
        channels_first,
        activation,
    )
    module = ActorCriticModule(actor_torso, critic_torso, num_outputs, continuous=not discrete,
                               log_std_init=float(log_std_init))

    def init(key, example_obs):
        if np.shape(example_obs) != obs_shape:
            raise ValueError(
                f"policy.init: expected ONE observation of shape {obs_shape} (no batch axis), "
                f"got shape {np.shape(example_obs)}"
            )
        return module.init(key, jnp.asarray(example_obs)[None])

    def flat_forward(params, obs):
        """Any leading dims: obs [*lead, *obs_shape] -> (out [*lead, A], value [*lead], log_std)."""
        lead = obs.shape[: obs.ndim - len(obs_shape)]
        out, value, log_std = module.apply(params, obs.reshape((-1, *obs_shape)))
        return out.reshape((*lead, num_outputs)), value.reshape(lead), log_std

    def log_prob_and_entropy(out, log_std, action):
        if discrete:
            log_probs = jax.nn.log_softmax(out)
            log_prob = jnp.take_along_axis(log_probs, action[..., None].astype(jnp.int32), axis=-1)[..., 0]
            entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
            return log_prob, entropy
        log_prob = jnp.sum(jax.scipy.stats.norm.logpdf(action, out, jnp.exp(log_std)), axis=-1)
        entropy = jnp.sum(log_std + 0.5 * math.log(2 * math.pi * math.e)) * jnp.ones(out.shape[:-1])
        return log_prob, entropy

    def make_apply(greedy: bool):
        def apply(params, obs, key):
            out, value, log_std = module.apply(params, obs)
            if discrete:
                action = jnp.argmax(out, -1) if greedy else jax.random.categorical(key, out)
                action = action.astype(jnp.int32)
            else:
                noise = 0.0 if greedy else jax.random.normal(key, out.shape) * jnp.exp(log_std)
                action = out + noise
            log_prob, _ = log_prob_and_entropy(out, log_std, action)
            extras = {"log_prob": log_prob, "value": value, ("logits" if discrete else "mean"): out}
            return action, extras

        return apply

    def evaluate(params, obs, action):
        out, value, log_std = flat_forward(params, obs)
        log_prob, entropy = log_prob_and_entropy(out, log_std, action)
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
    hidden: Optional[Sequence[int]] = None,
    torso: str = "mlp",
    conv_layers: Optional[Sequence[tuple[int, int, int]]] = None,
    channels_first: Optional[bool] = None,
    activation: str = "tanh",
    log_std_init: float = 0.0,
) -> Policy:
    """The sampling `rlbatch.Policy` of `make_actor_critic` (same arguments), for serving without a learner."""
    return make_actor_critic(action_space, example_obs, hidden, torso, conv_layers, channels_first, activation,
                             log_std_init).policy
