"""Tests for envs/atari.py (the ALE and EnvPool paths) and the environment extras; uint8 frames into rlbatch.

CI installs the `atari`, `mujoco` and `envpool` extras, so nothing here is skipped.
"""
from __future__ import annotations

import sys

import gymnasium
import jax.numpy as jnp
import numpy as np
import pytest

import envs
import rlbatch
from envs.atari import EpisodicLifeWrapper, make_atari_env, make_envpool_atari

OBS_SHAPE = (4, 84, 84)


def play_until_terminated(env, rng, max_steps=2000):
    """Random actions until the episode ends: (steps, rewards, last info)."""
    rewards = []
    for step in range(1, max_steps + 1):
        obs, reward, terminated, truncated, info = env.step(int(rng.integers(env.action_space.n)))
        rewards.append(reward)
        if terminated or truncated:
            return step, rewards, info
    raise AssertionError(f"no episode end within {max_steps} steps")


def envpool_until_terminated(env, rng, max_steps=2000):
    """Random actions for a one-env pool until its episode ends: (rewards, info at the end)."""
    rewards = []
    for _ in range(max_steps):
        obs, reward, terminated, truncated, info = env.step(rng.integers(env.action_space.n, size=1))
        rewards.append(float(reward[0]))
        if terminated[0] or truncated[0]:
            return rewards, info
    raise AssertionError(f"no episode end within {max_steps} steps")


# ---------------------------------------------------------------- the two paths agree


def test_ale_and_envpool_give_the_same_layout_dtype_and_actions():
    ale = make_atari_env("ALE/Breakout-v5", seed=0)
    pool = make_envpool_atari("Breakout-v5", num_envs=2, seed=0)
    obs, _ = ale.reset(seed=0)
    batch, _ = pool.reset()
    assert obs.shape == OBS_SHAPE and obs.dtype == np.uint8
    assert batch.shape == (2,) + OBS_SHAPE and batch.dtype == np.uint8
    assert ale.observation_space == pool.observation_space == gymnasium.spaces.Box(0, 255, OBS_SHAPE, np.uint8)
    assert ale.action_space.n == pool.action_space.n == 4
    rng = np.random.default_rng(0)
    for _ in range(5):
        obs, reward, terminated, truncated, _ = ale.step(int(rng.integers(4)))
        batch, rewards, _, _, _ = pool.step(rng.integers(4, size=2))
        assert obs.shape == OBS_SHAPE and obs.dtype == np.uint8
        assert batch.shape == (2,) + OBS_SHAPE and batch.dtype == np.uint8
    # Both are frames of the same game: the same pixel range, the stack's newest frame last.
    assert obs[-1].max() > 0 and batch[:, -1].max() > 0


def test_envpool_settings_are_the_standard_ones():
    config = make_envpool_atari("Breakout-v5", num_envs=1, seed=0).spec.config
    assert (config.noop_max, config.frame_skip, config.stack_num, config.img_height, config.img_width) == (30, 4, 4, 84, 84)
    assert config.gray_scale and config.repeat_action_probability == 0.25
    assert config.max_episode_steps == 27000
    assert not config.episodic_life and not config.reward_clip


def test_ale_base_game_has_sticky_actions_and_no_frame_skip_of_its_own():
    env = make_atari_env()
    preprocessing = env.env  # FrameStackObservation(AtariPreprocessing(...))
    assert isinstance(preprocessing, gymnasium.wrappers.AtariPreprocessing)
    assert (preprocessing.noop_max, preprocessing.frame_skip) == (30, 4)
    assert preprocessing.env.spec.kwargs["frameskip"] == 1
    assert preprocessing.env.spec.kwargs["repeat_action_probability"] == 0.25


def test_registered_id_makes_the_ale_path():
    env = gymnasium.make("rlbatch/Atari-v0")
    obs, _ = env.reset(seed=1)
    assert obs.shape == OBS_SHAPE and obs.dtype == np.uint8
    assert env.spec.id == "rlbatch/Atari-v0"


# ---------------------------------------------------------------- episodes and options


def test_ale_reset_after_the_game_ends_starts_a_new_game():
    env = make_atari_env(seed=0)
    env.reset(seed=0)
    _, _, info = play_until_terminated(env, np.random.default_rng(0))
    assert info["lives"] == 0  # without episodic life only the game's end ends an episode
    obs, info = env.reset()
    assert info["lives"] == 5 and obs.shape == OBS_SHAPE
    obs, *_ = env.step(1)
    assert obs.dtype == np.uint8


def test_ale_episodic_life_ends_episodes_at_a_lost_life_and_continues_the_game():
    env = make_atari_env(seed=0, episodic_life=True)
    assert any(isinstance(w, EpisodicLifeWrapper) for w in _wrappers(env))
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    _, _, info = play_until_terminated(env, rng)
    assert info["lives"] == 4
    _, info = env.reset()  # the game continues with the lives left, not a new game
    assert env.unwrapped.ale.lives() == 4
    for lives_left in (3, 2, 1, 0):
        play_until_terminated(env, rng)
        assert env.unwrapped.ale.lives() == lives_left
        env.reset()
    assert env.unwrapped.ale.lives() == 5  # the game was over: the reset started a new one


def test_ale_reward_clipping_gives_the_sign():
    clipped = make_atari_env(seed=0, clip_rewards=True)
    transform = next(w for w in _wrappers(clipped) if isinstance(w, gymnasium.wrappers.TransformReward))
    assert [transform.reward(r) for r in (7.0, 4.0, 1.0, 0.0, -3.0, 0.5)] == [1.0, 1.0, 1.0, 0.0, -1.0, 1.0]
    assert not any(isinstance(w, gymnasium.wrappers.TransformReward) for w in _wrappers(make_atari_env()))
    clipped.reset(seed=0)
    _, rewards, _ = play_until_terminated(clipped, np.random.default_rng(0))
    assert set(rewards) <= {-1.0, 0.0, 1.0}


def test_envpool_episodic_life_and_reward_clip():
    rng = np.random.default_rng(0)
    plain = make_envpool_atari("Breakout-v5", num_envs=1, seed=0)
    plain.reset()
    _, info = envpool_until_terminated(plain, rng)
    assert info["lives"][0] == 0
    plain.step(np.zeros(1, np.int64))  # EnvPool resets a finished env on its next step
    _, _, _, _, info = plain.step(np.zeros(1, np.int64))
    assert info["lives"][0] == 5

    episodic = make_envpool_atari("Breakout-v5", num_envs=1, seed=0, episodic_life=True, reward_clip=True)
    episodic.reset()
    rewards, info = envpool_until_terminated(episodic, rng)
    assert info["lives"][0] == 4
    assert set(rewards) <= {-1.0, 0.0, 1.0}
    assert episodic.spec.config.reward_clip


def _wrappers(env):
    while isinstance(env, gymnasium.Wrapper):
        yield env
        env = env.env


# ---------------------------------------------------------------- uint8 frames into rlbatch


def make_uint8_service(traced_dtypes):
    """A tiny policy that scales uint8 frames on the device; records the obs dtype it is compiled for."""

    def apply(params, obs, key):
        traced_dtypes.append(obs.dtype)
        x = obs.astype(jnp.float32) / 255.0
        logits = x.reshape(x.shape[0], -1) @ params["w"]
        return jnp.argmax(logits, axis=-1), {"mean_pixel": x.mean(axis=(1, 2, 3))}

    params = {"w": np.zeros((int(np.prod(OBS_SHAPE)), 4), np.float32)}
    return rlbatch.PolicyService(apply, params, example_obs=np.zeros(OBS_SHAPE, np.uint8), buckets=(2, 4),
                                 max_delay=0.001)


def test_policy_service_takes_ale_frames_as_uint8():
    traced = []
    env = make_atari_env(seed=0)
    obs, _ = env.reset(seed=0)
    with make_uint8_service(traced) as svc:
        assert traced == [np.uint8, np.uint8]  # one compile per bucket, each for uint8 input
        action, extras = svc(obs)
        assert action == 0
        np.testing.assert_allclose(extras["mean_pixel"], obs.mean() / 255.0, rtol=1e-5)
        # A float frame is refused, not converted: the policy's input is uint8 end to end.
        with pytest.raises(rlbatch.InvalidRequest, match=r"uint8\[4, 84, 84\]"):
            svc(obs.astype(np.float32))
    assert len(traced) == 2  # nothing was recompiled for another dtype


def test_actor_pool_on_ale_keeps_uint8_trajectories():
    T = 6
    with make_uint8_service([]) as svc:
        with rlbatch.ActorPool(make_atari_env, svc, num_actors=2, unroll_length=T) as pool:
            trajs = [pool.get(timeout=60) for _ in range(2)]
    for traj in trajs:
        assert traj.obs.dtype == np.uint8 and traj.obs.shape == (T + 1,) + OBS_SHAPE
        assert traj.final_obs.dtype == np.uint8
        assert traj.action.shape == (T,)
        assert traj.obs[-1, -1].max() > 0  # real frames, not the zeros the buffer starts with


# ---------------------------------------------------------------- mujoco extra


def test_mujoco_half_cheetah_resets_and_steps(monkeypatch, tmp_path):
    # MuJoCo writes its model warnings (a deprecated attribute of HalfCheetah's XML) to
    # MUJOCO_LOG.TXT in the working directory: keep that out of the checkout.
    monkeypatch.chdir(tmp_path)
    env = gymnasium.make("HalfCheetah-v5")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (17,)
    env.action_space.seed(0)
    obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
    assert obs.shape == (17,) and np.isfinite(reward) and not terminated
    env.close()


@pytest.mark.parametrize("module, extra, factory", [("ale_py", "atari", make_atari_env),
                                                    ("envpool", "envpool", make_envpool_atari)])
def test_a_missing_extra_is_named_when_a_factory_is_called(monkeypatch, module, extra, factory):
    monkeypatch.setitem(sys.modules, module, None)  # as if the extra were not installed
    with pytest.raises(gymnasium.error.DependencyNotInstalled, match=rf'pip install -e "\.\[{extra}\]"'):
        factory()


def test_envs_package_exports_the_atari_factories():
    assert envs.make_atari_env is make_atari_env and envs.make_envpool_atari is make_envpool_atari
