"""Atari with the standard preprocessing of Machado et al. (2018), as CleanRL's ppo_atari_envpool uses it.

Two paths to the same observations: `make_atari_env` builds one gymnasium environment on the ALE
(ale-py, the `atari` extra) from gymnasium's own wrappers; `make_envpool_atari` builds EnvPool's
batched C++ Atari (the `envpool` extra) with the settings that match. Both give:

- observations uint8 [4, 84, 84]: 4 stacked frames, channel-first (EnvPool's layout), 84x84
  grayscale; EnvPool adds its batch axis first, [num_envs, 4, 84, 84];
- up to 30 no-op actions at reset, frame skip 4 with the max of the last two frames;
- sticky actions with probability 0.25 (the ALE's own repeat_action_probability);
- episodes of at most 108,000 frames (27,000 agent steps);
- for training, as options: episodic life (a lost life ends the episode for the learner; the game
  itself is reset only when it is over) and reward clipping to the reward's sign {-1, 0, 1}.

Observations stay uint8: scale them inside the policy (obs / 255), on the device.

A third, `make_ale_vector_env`, builds ale-py's own batched AtariVectorEnv (the `atari` extra) with
the same settings, for ActorPool's `vector_env_fn`: uint8 [num_envs, 4, 84, 84], FIRE at reset as
EnvPool.

Known differences between the paths: EnvPool presses FIRE at reset in games that need it
(`use_fire_reset`, its default, as CleanRL runs it); the ALE path does not. Neither path imports
its package until it is called, so `import envs` works on a core install without the extras.
"""
from __future__ import annotations

import importlib
from typing import Any

import gymnasium
import numpy as np

__all__ = ["make_atari_env", "make_envpool_atari", "make_ale_vector_env", "EpisodicLifeWrapper", "NOOP_MAX",
           "FRAME_SKIP", "SCREEN_SIZE", "STACK_SIZE", "STICKY_ACTION_PROB"]

NOOP_MAX = 30
FRAME_SKIP = 4
SCREEN_SIZE = 84
STACK_SIZE = 4
STICKY_ACTION_PROB = 0.25


def _import_extra(module: str, extra: str):
    """Imports an extra's package when a factory is called, so that `import envs` does not need it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise gymnasium.error.DependencyNotInstalled(
            f"{module} is not installed: install the {extra!r} extra (pip install -e \".[{extra}]\")") from e


class EpisodicLifeWrapper(gymnasium.Wrapper):
    """Reports `terminated` when a life is lost, and resets the game only when it is really over.

    gymnasium's `AtariPreprocessing(terminal_on_life_loss=True)` resets the whole game after every
    lost life, so an agent would only ever play its first life; this wrapper (the semantics of
    CleanRL's EpisodicLifeEnv and of EnvPool's `episodic_life`) continues the game instead: a
    `reset` after a lost life takes one no-op step and returns its observation.
    """

    def __init__(self, env: gymnasium.Env):
        super().__init__(env)
        self.lives = 0
        self.game_over = True

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over = terminated or truncated
        lives = self.env.unwrapped.ale.lives()
        if 0 < lives < self.lives:
            terminated = True
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if self.game_over or seed is not None:
            obs, info = self.env.reset(seed=seed, options=options)
        else:
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:  # the no-op ended the game: start a new one
                obs, info = self.env.reset(options=options)
        self.game_over = False
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info


def make_atari_env(env_id: str = "ALE/Breakout-v5", *, seed: int | None = None, episodic_life: bool = False,
                   clip_rewards: bool = False, **make_kwargs: Any) -> gymnasium.Env:
    """One ALE game with the standard preprocessing: uint8 observations [4, 84, 84].

    The base game is made with frameskip=1 (AtariPreprocessing skips frames and max-pools the last
    two) and sticky actions 0.25. `seed` seeds the first reset's no-ops and the ALE (and is
    otherwise left to the caller's `reset(seed=...)`, which ActorPool passes). `make_kwargs` (e.g.
    `full_action_space`) go to `gymnasium.make`. Entry point of `rlbatch/Atari-v0`.
    """
    ale_py = _import_extra("ale_py", "atari")
    gymnasium.register_envs(ale_py)
    make_kwargs = {"repeat_action_probability": STICKY_ACTION_PROB, **make_kwargs, "frameskip": 1}
    env = gymnasium.make(env_id, **make_kwargs)
    env = gymnasium.wrappers.AtariPreprocessing(env, noop_max=NOOP_MAX, frame_skip=FRAME_SKIP,
                                                screen_size=SCREEN_SIZE, grayscale_obs=True, scale_obs=False)
    if episodic_life:
        env = EpisodicLifeWrapper(env)
    if clip_rewards:
        # The sign, as CleanRL's ClipRewardEnv and EnvPool's reward_clip (ClipReward(-1, 1) would
        # keep fractions); the reward space becomes [-1, 1].
        env = gymnasium.wrappers.TransformReward(env, lambda r: float(np.sign(r)))
    env = gymnasium.wrappers.FrameStackObservation(env, STACK_SIZE)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def make_envpool_atari(task_id: str = "Breakout-v5", num_envs: int = 1, *, seed: int = 0, episodic_life: bool = False,
                       reward_clip: bool = False, env_type: str = "gymnasium", **envpool_kwargs: Any):
    """EnvPool's batched Atari with the same preprocessing: uint8 observations [num_envs, 4, 84, 84].

    EnvPool's Atari defaults already do 30 no-ops, frame skip 4 with max-pooling, 84x84 grayscale,
    4 stacked frames and 27,000 steps per episode; this sets sticky actions 0.25 and the training
    options. `envpool_kwargs` go to `envpool.make` (e.g. `batch_size`, `num_threads`).
    """
    envpool = _import_extra("envpool", "envpool")
    settings = dict(repeat_action_probability=STICKY_ACTION_PROB, noop_max=NOOP_MAX, frame_skip=FRAME_SKIP,
                    img_height=SCREEN_SIZE, img_width=SCREEN_SIZE, stack_num=STACK_SIZE, gray_scale=True)
    settings.update(envpool_kwargs)
    return envpool.make(task_id, env_type=env_type, num_envs=num_envs, seed=seed, episodic_life=episodic_life,
                        reward_clip=reward_clip, **settings)


def _ale_game(env_id: str) -> str:
    """"ALE/Breakout-v5", "Breakout" or "breakout" -> "breakout"; "MsPacman" -> "ms_pacman"."""
    name = env_id.split("/")[-1].split("-v")[0]
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))


def make_ale_vector_env(env_id: str = "ALE/Breakout-v5", num_envs: int = 1, seed: int | None = None, *,
                        episodic_life: bool = False, reward_clip: bool = False, **ale_kwargs: Any):
    """ale-py's AtariVectorEnv with the standard preprocessing: uint8 observations [num_envs, 4, 84, 84].

    For ActorPool: `vector_env_fn=lambda k, seed: make_ale_vector_env("ALE/Pong-v5", k, seed)` (the
    actor seeds it at its first reset; `seed` here is unused but keeps that signature). Synchronous
    (batch_size == num_envs), NEXT_STEP autoreset, game rewards unclipped unless `reward_clip`.
    `ale_kwargs` go to AtariVectorEnv (e.g. `max_num_frames_per_episode`, `num_threads`).
    """
    _import_extra("ale_py", "atari")
    from ale_py.vector_env import AtariVectorEnv

    settings = dict(repeat_action_probability=STICKY_ACTION_PROB, noop_max=NOOP_MAX, frameskip=FRAME_SKIP,
                    img_height=SCREEN_SIZE, img_width=SCREEN_SIZE, stack_num=STACK_SIZE, grayscale=True,
                    maxpool=True, max_num_frames_per_episode=108_000)
    settings.update(ale_kwargs)
    return AtariVectorEnv(_ale_game(env_id), num_envs, episodic_life=episodic_life, reward_clipping=reward_clip,
                          **settings)
