"""The main job's defaults per task family, so that `--env` alone picks settings that learn.

    family = presets.family_of("HalfCheetah-v5")          # "mujoco"
    args = presets.resolve(args)                          # every None field filled from the table

Families: "classic" (gymnasium's classic control and anything else with a flat observation),
"mujoco" (gymnasium's MuJoCo ids: Box actions, a Gaussian policy) and "atari" (ALE ids, played
through EnvPool vector environments, pixels through a CNN). A field the user set on the command
line is never None, so an explicit flag always wins over the table.

Sources of the numbers:
- classic: rl-baselines3-zoo's CartPole PPO (256 samples per update as one minibatch, 20 epochs,
  lr 1e-3, gamma 0.98, GAE lambda 0.8, no entropy bonus) on 4 actor threads x 8 environments, T=16,
  2 trajectories per update. Measured on the 2-core machine against 256 threads x 1 environment:
  a few threads whose requests are already batches of 8 step 8-9k env steps/s while the learner
  updates, and the zoo's small, many-epoch updates solve CartPole in about 60-90k env steps rather
  than 160k (seed 0 in 9.2-9.4 s of process time against 27-30 s; `python -m experiments.compare_peers`).
  One learner batch of trajectories may wait (`queue_batches=1`): the actors outrun this learner,
  and with four batches waiting the mean policy lag was 5.7-5.9 updates and seeds 0-2 took
  9.7-12.5 s, with one 2.9-3.0 updates and 7.6-9.2 s;
- mujoco, PPO: CleanRL's ppo_continuous_action (lr 3e-4 annealed, 2048 steps per update, 32
  minibatches, 10 epochs, clip 0.2, no entropy bonus, clipped value loss, observations normalised
  and rewards scaled, in the learner rather than by per-environment wrappers) with 4 actors x 4
  environments x T=128 instead of 1 environment x T=2048: the same 2048 samples per update and
  minibatches of 64, while 16 environments give the policy service batches to fill and a
  trajectory is ready 16 times sooner, so the learner waits less and samples are less stale;
- atari, PPO: CleanRL's ppo_atari_envpool (8 environments, T=128, lr 2.5e-4 annealed, 4 minibatches,
  4 epochs, clip 0.1, entropy 0.01) as 2 actor threads x 4 EnvPool environments, B=2 trajectories
  per update: one actor's batch is stepped while the other's is on the policy (Sebulba's layout);
- atari, IMPALA: Espeholt et al. (2018) / Cleanba's IMPALA: T=20, 32 environments (4 actors x 8),
  lr 6e-4 annealed, entropy 0.01, gradient norm clipped at 40;
- `--hyperparams zoo`: rl-baselines3-zoo's tuned PPO entry of the env (experiments.lib.zoo: HalfCheetah
  and Hopper: 256x256 ReLU MLPs, initial log-std -2, small learning rates, many epochs over 512
  samples per update, laid out as 2 actors x 4 environments), over the family's preset.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import gymnasium

from experiments.lib import zoo

__all__ = ["FAMILIES", "PRESETS", "family_of", "preset_for", "resolve"]

FAMILIES = ("classic", "mujoco", "atari")

# CleanRL's common PPO settings, which every family starts from.
_CLEANRL = dict(vf_coef=0.5, max_grad_norm=0.5, gamma=0.99, gae_lambda=0.95, clip_eps=0.2, hidden=(64, 64),
                network="mlp", normalize_obs=False, normalize_reward=False, queue_batches=4, unroll_update=False,
                activation="tanh", log_std_init=0.0)

_CLASSIC = dict(
    _CLEANRL, num_actors=4, envs_per_actor=8, unroll_length=16, batch_size=2, queue_batches=1, buckets=(8, 16, 32),
    learning_rate=1e-3, anneal_lr=False, num_epochs=20, num_minibatches=1, ent_coef=0.0, gamma=0.98,
    gae_lambda=0.8, clip_value_loss=False, total_steps=2_000_000, max_seconds=300.0)

_MUJOCO = dict(
    _CLEANRL, num_actors=4, envs_per_actor=4, unroll_length=128, batch_size=4, buckets=(4, 8, 16),
    learning_rate=3e-4, anneal_lr=True, num_epochs=10, num_minibatches=32, clip_eps=0.2, ent_coef=0.0,
    clip_value_loss=True, normalize_obs=True, normalize_reward=True, total_steps=1_000_000, max_seconds=3600.0)

_ATARI_PPO = dict(
    _CLEANRL, num_actors=2, envs_per_actor=4, unroll_length=128, batch_size=2, buckets=(4, 8),
    learning_rate=2.5e-4, anneal_lr=True, num_epochs=4, num_minibatches=4, clip_eps=0.1, ent_coef=0.01,
    clip_value_loss=True, hidden=(512,), network="cnn", total_steps=10_000_000, max_seconds=1800.0,
    unroll_update=True)  # 4 x 4 minibatch steps: XLA's CPU convolutions are far slower inside a loop

_ATARI_IMPALA = dict(
    _ATARI_PPO, num_actors=4, envs_per_actor=8, unroll_length=20, batch_size=4, buckets=(8, 16, 32),
    learning_rate=6e-4, max_grad_norm=40.0)

# (family, agent) -> the defaults of every preset field; an agent missing here uses the family's PPO row.
PRESETS: Mapping[tuple[str, str], Mapping[str, Any]] = {
    ("classic", "ppo"): _CLASSIC,
    ("mujoco", "ppo"): _MUJOCO,
    ("atari", "ppo"): _ATARI_PPO,
    ("atari", "impala"): _ATARI_IMPALA,
}


def family_of(env_id: str) -> str:
    """"atari" for ALE ids ("ALE/Pong-v5"), "mujoco" for gymnasium's MuJoCo ids, else "classic"."""
    if env_id.startswith("ALE/"):
        return "atari"
    try:
        entry_point = gymnasium.spec(env_id).entry_point
    except gymnasium.error.Error:
        return "classic"  # gymnasium.make reports the unknown id with its own message
    if isinstance(entry_point, str) and entry_point.startswith("gymnasium.envs.mujoco"):
        return "mujoco"
    return "classic"


def preset_for(family: str, agent: str) -> Mapping[str, Any]:
    """The defaults of (family, agent)."""
    if family not in FAMILIES:
        raise ValueError(f"presets: expected a family in {FAMILIES}, got {family!r}")
    return PRESETS.get((family, agent), PRESETS[(family, "ppo")])


def resolve(args):
    """`args` (a frozen dataclass) with each None field that the preset of its env and agent names
    replaced by the preset's value; fields set explicitly are kept. With `args.hyperparams == "zoo"`
    the zoo's tuned settings of the env override the family's preset (PPO only)."""
    preset = dict(preset_for(family_of(args.env), args.agent))
    if args.hyperparams == "zoo":
        if args.agent != "ppo":
            raise ValueError(f"--hyperparams zoo: the zoo's tuned settings are PPO's, got --agent {args.agent}")
        preset.update(zoo.ppo_preset(args.env))
    return dataclasses.replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})
