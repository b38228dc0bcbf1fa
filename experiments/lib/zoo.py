"""rl-baselines3-zoo's tuned PPO hyperparameters: what SBX runs (sbx_runner) and the main job's
`--hyperparams zoo` (presets), from one table.

    ZOO_PPO["HalfCheetah-v5"]["n_epochs"]                 # 20: the zoo's own keys and values
    ppo_preset("HalfCheetah-v5")                          # the same settings as experiments.train fields

Source: rl-baselines3-zoo hyperparams/ppo.yml: CartPole-v1 ("Tuned"), and the tuned MuJoCo v3
entries (HalfCheetah-v3, Hopper-v3) for the v5 tasks. "lin_x" is the zoo's linear schedule from x to 0
over n_timesteps. policy_kwargs' activation "relu" is flax's (SBX's networks are flax modules).
"""
from __future__ import annotations

from typing import Any

__all__ = ["ZOO_PPO", "ppo_preset"]

_MUJOCO_POLICY = {"log_std_init": -2, "ortho_init": False, "activation": "relu",
                  "net_arch": {"pi": [256, 256], "vf": [256, 256]}}
ZOO_PPO: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(normalize=False, n_envs=8, n_timesteps=100_000, n_steps=32, batch_size=256,
                        gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0, learning_rate="lin_0.001",
                        clip_range="lin_0.2"),
    "HalfCheetah-v5": dict(normalize=True, n_envs=1, n_timesteps=1_000_000, batch_size=64, n_steps=512,
                           gamma=0.98, learning_rate=2.0633e-05, ent_coef=0.000401762, clip_range=0.1,
                           n_epochs=20, gae_lambda=0.92, max_grad_norm=0.8, vf_coef=0.58096,
                           policy_kwargs=_MUJOCO_POLICY),
    "Hopper-v5": dict(normalize=True, n_envs=1, n_timesteps=1_000_000, batch_size=32, n_steps=512,
                      gamma=0.999, learning_rate=9.80828e-05, ent_coef=0.00229519, clip_range=0.2,
                      n_epochs=5, gae_lambda=0.99, max_grad_norm=0.7, vf_coef=0.835671,
                      policy_kwargs=_MUJOCO_POLICY),
}

# SB3's PPO defaults for the keys an entry may leave out.
_SB3_DEFAULTS = dict(ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, gamma=0.99, gae_lambda=0.95, clip_range=0.2,
                     n_epochs=10, policy_kwargs={})

# How the zoo's n_envs x n_steps samples per update are laid out on rlbatch's actors: 2 actor
# threads x 4 environments; an update takes 2 trajectory groups of 4 columns x T = samples / 8 steps.
# One batch may wait, and trajectories more than one update old are dropped: the zoo's PPO is
# on-policy, 20 epochs at a small learning rate make stale samples costly, and the actors outrun
# this learner, so fresh ones come soon. HalfCheetah-v5 seed 0 to a return of 1442.6 on the 2-core
# machine: 358 updates (mean policy lag 2.0) and 82-84 s with no limit, 233 updates and 55 s with
# trajectories of lag 2 dropped, 274 updates and 116 s with every stale one dropped.
_ACTORS, _ENVS_PER_ACTOR, _GROUPS = 2, 4, 2


def _constant(value, what: str, env_id: str) -> float:
    if isinstance(value, str):  # "lin_x": the main job's anneal_lr is the same linear schedule
        if not value.startswith("lin_"):
            raise ValueError(f"zoo: {env_id}'s {what} {value!r} is neither a number nor 'lin_x'")
        return float(value[len("lin_"):])
    return float(value)


def ppo_preset(env_id: str) -> dict[str, Any]:
    """The zoo's PPO settings of `env_id` as experiments.train fields (a subset: the rest come from
    the task family's preset). ValueError for an id without a zoo entry, or one whose clip range is
    scheduled (the main job anneals only the learning rate)."""
    if env_id not in ZOO_PPO:
        raise ValueError(f"--hyperparams zoo: expected an env with an rl-baselines3-zoo PPO entry "
                         f"({', '.join(sorted(ZOO_PPO))}), got {env_id!r}")
    zoo = dict(_SB3_DEFAULTS, **ZOO_PPO[env_id])
    if isinstance(zoo["clip_range"], str):
        raise ValueError(f"--hyperparams zoo: {env_id}'s clip range is a schedule ({zoo['clip_range']}); "
                         f"the main job keeps the clip range constant")
    samples = zoo["n_envs"] * zoo["n_steps"]
    per_update = _ENVS_PER_ACTOR * _GROUPS  # columns per update
    if samples % per_update or samples % zoo["batch_size"]:
        raise ValueError(f"zoo: {env_id}'s {samples} samples per update do not split into {per_update} "
                         f"columns and minibatches of {zoo['batch_size']}")
    policy = zoo["policy_kwargs"]
    arch = policy.get("net_arch", {"pi": [64, 64], "vf": [64, 64]})
    if arch["pi"] != arch["vf"]:
        raise ValueError(f"zoo: {env_id}'s actor and critic widths differ ({arch}); the MLP torso has one width")
    preset = dict(
        num_actors=_ACTORS, envs_per_actor=_ENVS_PER_ACTOR, batch_size=_GROUPS, unroll_length=samples // per_update,
        queue_batches=1, max_policy_lag=1, learning_rate=_constant(zoo["learning_rate"], "learning rate", env_id),
        anneal_lr=isinstance(zoo["learning_rate"], str), num_epochs=zoo["n_epochs"],
        num_minibatches=samples // zoo["batch_size"], clip_eps=float(zoo["clip_range"]),
        clip_value_loss=False, ent_coef=float(zoo["ent_coef"]), vf_coef=float(zoo["vf_coef"]),
        max_grad_norm=float(zoo["max_grad_norm"]), gamma=float(zoo["gamma"]), gae_lambda=float(zoo["gae_lambda"]),
        normalize_obs=bool(zoo["normalize"]), normalize_reward=bool(zoo["normalize"]), hidden=tuple(arch["pi"]),
        activation=policy.get("activation", "tanh"), log_std_init=float(policy.get("log_std_init", 0.0)))
    return preset
