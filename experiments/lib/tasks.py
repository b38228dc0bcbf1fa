"""The environments of the main job per task family: what the learner is built for, what the actors
play, what an evaluation plays.

    task = tasks.probe("ALE/Pong-v5")            # Task(family, example_obs, action_space, threshold)
    pool = rlbatch.ActorPool(**tasks.pool_envs(task, "ALE/Pong-v5"), policy_service=..., ...)
    env = tasks.make_eval_env("ALE/Pong-v5", render_mode="rgb_array")

Observations: `example_obs` is ONE observation (no batch axis) in the dtype the policy gets:
float64 spaces (MuJoCo) become float32, as the actor pool converts them; Atari frames stay uint8
[4, 84, 84]. Atari actors own EnvPool vector environments with episodic life and sign-clipped
rewards for training (CleanRL's ppo_atari_envpool); an evaluation plays whole games, unclipped,
through ale-py with the same preprocessing (envs.atari.make_atari_env).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import gymnasium
import numpy as np

import envs  # noqa: F401 - registers the rlbatch/ environments (rlbatch/Catch-v0, ...)
from envs import atari
from experiments.lib import runtime
from experiments.lib.presets import family_of

__all__ = ["Task", "envpool_task_id", "make_eval_env", "pool_envs", "probe"]


class Task(NamedTuple):
    family: str  # "classic", "mujoco" or "atari" (experiments.lib.presets)
    example_obs: np.ndarray  # one observation, in the dtype the policy is compiled for
    action_space: gymnasium.Space
    reward_threshold: Optional[float]  # the env spec's, None where it has none


def envpool_task_id(env_id: str) -> str:
    """"ALE/Pong-v5" -> EnvPool's "Pong-v5"."""
    return env_id.split("/", 1)[-1]


def _example(space: gymnasium.Space) -> np.ndarray:
    example = np.asarray(space.sample())
    return example.astype(np.float32) if example.dtype == np.float64 else example


def probe(env_id: str) -> Task:
    """The spaces of `env_id`'s family (one environment built and closed)."""
    family = family_of(env_id)
    if family == "atari":
        env = atari.make_envpool_atari(envpool_task_id(env_id), 1)
        threshold = None  # EnvPool's specs carry none; a run stops on its budget unless given one
    else:
        env = gymnasium.make(env_id)
        threshold = env.spec.reward_threshold if env.spec is not None else None
    try:
        return Task(family, _example(env.observation_space), env.action_space, threshold)
    finally:
        env.close()


def pool_envs(task: Task, env_id: str, actors_per_machine: int = 1) -> dict[str, Any]:
    """The ActorPool keyword arguments that give its actors `env_id`'s environments. Atari: each
    actor steps an EnvPool of its k environments, whose worker threads share the cores of the
    machine it runs on with the other `actors_per_machine` actors' (runtime.env_threads_per_actor)."""
    if task.family != "atari":
        return {"env_fn": env_id}
    task_id = envpool_task_id(env_id)

    def vector_env_fn(k: int, seed: int):
        return atari.make_envpool_atari(task_id, k, seed=seed, episodic_life=True, reward_clip=True,
                                        num_threads=runtime.env_threads_per_actor(actors_per_machine))

    return {"env_fn": None, "vector_env_fn": vector_env_fn}


def make_eval_env(env_id: str, render_mode: Optional[str] = None) -> gymnasium.Env:
    """One environment for evaluation: whole episodes and the environment's own rewards."""
    if family_of(env_id) == "atari":
        return atari.make_atari_env(env_id, render_mode=render_mode)
    return gymnasium.make(env_id, render_mode=render_mode)
