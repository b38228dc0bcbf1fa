"""Flax (linen) modules for actor-critics: MLP, Nature CNN and IMPALA ResNet torsos, and the heads.

Every module takes a batch: `obs` [N, *obs_shape] with the batch axis first, and returns features
[N, F] (torsos) or `(out [N, A], value [N], log_std [A] | None)` (`ActorCriticModule`).

Images come as [N, H, W] (one channel), [N, H, W, C] (gymnasium's layout) or [N, C, H, W] (frames
first: EnvPool's and `envs.atari`'s [4, 84, 84]). `channels_first=None` infers the layout from one
observation's shape (`infer_channels_first`); pass True or False where the shape cannot tell. uint8
images stay uint8 until here (4x less to copy to the device than float32) and are scaled to [0, 1]
inside the network; float images are taken as they are.

Initialisation follows CleanRL: orthogonal with gain sqrt(2) in the torsos and zero biases, 0.01 on
the policy head (a near-uniform initial policy), 1.0 on the value head, a zero state-independent
log-std. The IMPALA ResNet's convolutions keep flax's default init, as CleanRL's IMPALA network does.

    module = NatureCNN()                                   # [N, 4, 84, 84] uint8 -> [N, 512]
    params = module.init(key, example_obs[None])           # flax wants the batch axis
    features = module.apply(params, obs)
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

__all__ = [
    "ACTIVATIONS",
    "NATURE_CNN_LAYERS",
    "ActorCriticModule",
    "ImpalaResNet",
    "MLP",
    "NatureCNN",
    "ResidualBlock",
    "infer_channels_first",
    "to_nhwc",
]

# (output channels, kernel size, stride) per conv layer, VALID padding: Mnih et al. (2015), as in
# CleanRL's ppo_atari. An 84x84 frame shrinks to 20x20, 9x9, 7x7; images under 36x36 do not fit.
NATURE_CNN_LAYERS = ((32, 8, 4), (64, 4, 2), (64, 3, 1))


def _orthogonal(scale: float):
    return nn.initializers.orthogonal(scale)


def _as_float(x):
    """uint8 -> float32 in [0, 1]; anything else -> float32 unchanged."""
    x = jnp.asarray(x)
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 255.0
    return x.astype(jnp.float32)


def infer_channels_first(obs_shape: Sequence[int]) -> bool:
    """Whether ONE image observation is [C, H, W]: 3-D with its first axis smaller than its last.

    [4, 84, 84] (stacked frames) -> True; [84, 84, 4], [64, 64, 3], [H, W] -> False. A square
    stack such as [3, 3, 3] reads as [H, W, C], gymnasium's layout; pass `channels_first` to override.
    """
    return len(obs_shape) == 3 and obs_shape[0] < obs_shape[-1]


def to_nhwc(obs, channels_first: Optional[bool] = None):
    """A batch of images [N, H, W], [N, H, W, C] or [N, C, H, W] -> float32 [N, H, W, C]."""
    x = _as_float(obs)
    if x.ndim == 3:
        return x[..., None]
    if x.ndim != 4:
        raise ValueError(
            f"expected a batch of images [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {x.shape}"
        )
    if channels_first is None:
        channels_first = infer_channels_first(x.shape[1:])
    return jnp.transpose(x, (0, 2, 3, 1)) if channels_first else x


def _dense_stack(x, hidden: Sequence[int], activation):
    for width in hidden:
        x = activation(nn.Dense(width, kernel_init=_orthogonal(math.sqrt(2)), bias_init=nn.initializers.zeros)(x))
    return x


ACTIVATIONS = {"tanh": jnp.tanh, "relu": nn.relu}


class MLP(nn.Module):
    """obs [N, ...] (flattened) -> dense layers -> [N, hidden[-1]]: tanh as CleanRL's classic control
    and MuJoCo PPO, or relu as rl-baselines3-zoo's tuned MuJoCo PPO (`activation`, a key of ACTIVATIONS)."""

    hidden: Sequence[int] = (64, 64)
    activation: str = "tanh"

    @nn.compact
    def __call__(self, obs):
        x = _as_float(obs)
        return _dense_stack(x.reshape(x.shape[0], -1), self.hidden, ACTIVATIONS[self.activation])


class NatureCNN(nn.Module):
    """Mnih et al. (2015): ReLU convs (VALID) then ReLU dense layers -> [N, hidden[-1]].

    `conv_layers` replaces the three Nature layers for small images, e.g. ((16, 3, 1), (32, 3, 1))
    on a 5x5 grid.
    """

    conv_layers: Sequence[tuple[int, int, int]] = NATURE_CNN_LAYERS
    hidden: Sequence[int] = (512,)
    channels_first: Optional[bool] = None

    @nn.compact
    def __call__(self, obs):
        x = image = to_nhwc(obs, self.channels_first)
        for i, (features, kernel, stride) in enumerate(self.conv_layers):
            if min(x.shape[1], x.shape[2]) < kernel:
                raise ValueError(
                    f"NatureCNN: conv layer {i} {(features, kernel, stride)} expected an input of at least "
                    f"{kernel}x{kernel}, got {x.shape[1]}x{x.shape[2]} (from an image [H, W, C] = {list(image.shape[1:])}); "
                    f"pass smaller conv_layers, e.g. ((16, 3, 1), (32, 3, 1)), or use the IMPALA ResNet"
                )
            conv = nn.Conv(
                features,
                (kernel, kernel),
                (stride, stride),
                padding="VALID",
                kernel_init=_orthogonal(math.sqrt(2)),
                bias_init=nn.initializers.zeros,
            )
            x = nn.relu(conv(x))
        return _dense_stack(x.reshape(x.shape[0], -1), self.hidden, nn.relu)


class ResidualBlock(nn.Module):
    """x + conv(relu(conv(relu(x)))), 3x3 SAME convs with `x`'s channel count."""

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        y = nn.Conv(channels, (3, 3))(nn.relu(x))
        y = nn.Conv(channels, (3, 3))(nn.relu(y))
        return x + y


class ImpalaResNet(nn.Module):
    """Espeholt et al. (2018), as CleanRL's IMPALA network: per stack a 3x3 conv, a 3x3/2 max-pool
    and `num_blocks` residual blocks; then ReLU and ReLU dense layers -> [N, hidden[-1]].

    SAME padding throughout, so any image size fits (84 -> 42 -> 21 -> 11; 5 -> 3 -> 2 -> 1).
    """

    channels: Sequence[int] = (16, 32, 32)
    num_blocks: int = 2
    hidden: Sequence[int] = (256,)
    channels_first: Optional[bool] = None

    @nn.compact
    def __call__(self, obs):
        x = to_nhwc(obs, self.channels_first)
        for channels in self.channels:
            x = nn.Conv(channels, (3, 3))(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            for _ in range(self.num_blocks):
                x = ResidualBlock()(x)
        x = nn.relu(x)
        return _dense_stack(x.reshape(x.shape[0], -1), self.hidden, nn.relu)


class ActorCriticModule(nn.Module):
    """A torso (or one per head) plus the policy and value heads.

    obs [N, ...] -> (out [N, num_outputs], value [N], log_std [num_outputs] or None): `out` is the
    Categorical logits, or the Gaussian mean when `continuous` (then `log_std` is a parameter that
    does not depend on the observation, initialised to `log_std_init`).
    """

    torso: nn.Module
    critic_torso: Optional[nn.Module]  # None: the value head shares `torso`
    num_outputs: int
    continuous: bool = False
    log_std_init: float = 0.0

    @nn.compact
    def __call__(self, obs):
        hidden = self.torso(obs)
        critic_hidden = hidden if self.critic_torso is None else self.critic_torso(obs)
        out = nn.Dense(self.num_outputs, kernel_init=_orthogonal(0.01), name="policy_head")(hidden)
        value = nn.Dense(1, kernel_init=_orthogonal(1.0), name="value_head")(critic_hidden)[:, 0]
        log_std = self.param("log_std", nn.initializers.constant(self.log_std_init), (self.num_outputs,)) if self.continuous else None
        return out, value, log_std
