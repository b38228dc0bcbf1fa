"""Tests for the envs package: registration, Catch dynamics, latency, fault injection, ScriptedEnv."""
from __future__ import annotations

import importlib
import math
import threading
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
import envs.latency
from envs import CatchEnv, LatencyWrapper
from tests import fakes
from tests.fakes import FaultInjection, InjectedFault, ScriptedEnv

# CartPole's own observation space is unbounded and it renders with pygame (not a dependency); those
# are CartPole's business, not the wrappers'.
_CARTPOLE_IDS = {"rlbatch/Latency-v0", "fakes/Faulty-v0"}
_OVERRIDES = {"fakes/Faulty-v0": {"p_step": 0.0}}  # check_env must not hit a random fault
_OBS_DTYPES = {"rlbatch/Atari-v0": np.uint8}  # frames stay uint8 (scaled in the policy); the rest float32


# ---------------------------------------------------------------- registration and the API checker


_ALL_IDS = envs.ENV_IDS + fakes.FAKE_ENV_IDS


def test_importing_registers_every_id():
    assert set(envs.ENV_IDS) == {"rlbatch/Catch-v0", "rlbatch/Latency-v0", "rlbatch/Atari-v0"}
    assert set(fakes.FAKE_ENV_IDS) == {"fakes/Faulty-v0", "fakes/Scripted-v0"}
    for env_id in _ALL_IDS:
        assert env_id in gymnasium.registry


def test_reimport_does_not_register_again():
    before = {env_id: gymnasium.registry[env_id] for env_id in envs.ENV_IDS}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gymnasium warns when an id is overridden
        importlib.reload(envs)
    for env_id in envs.ENV_IDS:
        assert gymnasium.registry[env_id] is before[env_id]


@pytest.mark.parametrize("env_id", ["rlbatch/Catch-v0", "fakes/Scripted-v0"])
def test_check_env_unwrapped_without_warnings(env_id):
    env = gymnasium.make(env_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)


@pytest.mark.parametrize("env_id", sorted(_CARTPOLE_IDS))
def test_check_env_unwrapped_cartpole_based(env_id):
    env = gymnasium.make(env_id, **_OVERRIDES.get(env_id, {}))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*infinity.*")
        check_env(env.unwrapped, skip_render_check=True)


@pytest.mark.parametrize("env_id", _ALL_IDS)
def test_check_env_made(env_id):
    env = gymnasium.make(env_id, **_OVERRIDES.get(env_id, {}))
    assert env.spec.id == env_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # check_env warns that a made env is wrapped
        check_env(env, skip_render_check=env_id in _CARTPOLE_IDS)
    assert env.observation_space.dtype == _OBS_DTYPES.get(env_id, np.float32)


def test_registered_defaults():
    catch = gymnasium.make("rlbatch/Catch-v0")
    assert catch.observation_space.shape == (50,)
    assert catch.spec.max_episode_steps is None
    latency = gymnasium.make("rlbatch/Latency-v0")
    assert isinstance(latency.env.env, LatencyWrapper)
    assert latency.env.env.step_latency == 0.001
    assert latency.unwrapped.__class__.__name__ == "CartPoleEnv"
    faulty = gymnasium.make("fakes/Faulty-v0", seed=3)
    assert isinstance(faulty.env.env, FaultInjection)
    assert (faulty.env.env.p_step, faulty.env.env.p_reset) == (0.01, 0.0)
    scripted = gymnasium.make("fakes/Scripted-v0")
    assert scripted.unwrapped.episode_lengths == (3, 5, 2)


# ---------------------------------------------------------------- Catch


def _ball_and_paddle(env: CatchEnv, obs: np.ndarray) -> tuple[tuple[int, int], int]:
    board = obs.reshape(env.rows, env.columns)
    paddle_columns = np.flatnonzero(board[-1])
    assert len(paddle_columns) == 1
    above = np.argwhere(board[:-1] == 1.0)
    if len(above) == 0:  # the ball is in the bottom row
        ball_columns = np.flatnonzero(board[-1])
        return (env.rows - 1, int(ball_columns[0])), int(paddle_columns[0])
    assert len(above) == 1
    return (int(above[0][0]), int(above[0][1])), int(paddle_columns[0])


def test_catch_reset_layout():
    env = CatchEnv()
    obs, info = env.reset(seed=0)
    assert obs.shape == (10, 5) and obs.dtype == np.float32
    assert info == {}
    assert obs.sum() == 2.0
    (ball_row, _), paddle = _ball_and_paddle(env, obs)
    assert ball_row == 0
    assert paddle == 5 // 2


@pytest.mark.parametrize("rows,columns", [(10, 5), (4, 3), (2, 1)])
def test_catch_ball_falls_one_row_per_step_and_following_policy_catches(rows, columns):
    env = CatchEnv(rows=rows, columns=columns)
    for seed in range(5):
        obs, _ = env.reset(seed=seed)
        (_, ball_column), _ = _ball_and_paddle(env, obs)
        for t in range(1, rows):
            (_, column), paddle = _ball_and_paddle(env, obs)
            action = 1 + int(np.sign(column - paddle))
            obs, reward, terminated, truncated, _ = env.step(action)
            (ball_row, now_column), _ = _ball_and_paddle(env, obs)
            assert (ball_row, now_column) == (t, ball_column)
            assert truncated is False
            assert terminated is (t == rows - 1)
            assert reward == (1.0 if terminated else 0.0)
        assert obs.sum() == 1.0  # caught: ball and paddle share a cell


def test_catch_paddle_moving_away_misses():
    env = CatchEnv()
    obs, _ = env.reset(seed=1)
    (_, ball_column), paddle = _ball_and_paddle(env, obs)
    # Move toward the wall farther from the ball; from the middle of a 5-wide board the paddle
    # ends at least 2 columns from it.
    away = 0 if ball_column >= paddle else 2
    rewards = []
    for _ in range(env.rows - 1):
        obs, reward, terminated, _, _ = env.step(away)
        rewards.append(reward)
    assert terminated
    assert rewards == [0.0] * (env.rows - 2) + [-1.0]


def test_catch_episode_length_is_rows_minus_one():
    env = gymnasium.make("rlbatch/Catch-v0")
    env.reset(seed=0)
    lengths = []
    for _ in range(3):
        steps, terminated = 0, False
        while not terminated:
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            assert truncated is False
            steps += 1
        lengths.append(steps)
        env.reset()
    assert lengths == [9, 9, 9]


def test_catch_paddle_stops_at_walls():
    env = CatchEnv(rows=10, columns=5)
    obs, _ = env.reset(seed=0)
    for _ in range(4):
        obs, *_ = env.step(0)
    assert _ball_and_paddle(env, obs)[1] == 0
    env.reset(seed=0)
    for _ in range(4):
        obs, *_ = env.step(2)
    assert _ball_and_paddle(env, obs)[1] == 4


def test_catch_flatten_is_row_major():
    board_env, flat_env = CatchEnv(flatten=False), CatchEnv(flatten=True)
    board, _ = board_env.reset(seed=7)
    flat, _ = flat_env.reset(seed=7)
    assert flat.shape == (50,)
    np.testing.assert_array_equal(flat, board.reshape(-1))
    for action in (0, 2, 1):
        board, *_ = board_env.step(action)
        flat, *_ = flat_env.step(action)
        np.testing.assert_array_equal(flat, board.reshape(-1))


def test_catch_seeding_reproduces_ball_columns():
    def columns(seed):
        env = CatchEnv()
        out = [_ball_and_paddle(env, env.reset(seed=seed)[0])[0][1]]
        out += [_ball_and_paddle(env, env.reset()[0])[0][1] for _ in range(29)]
        return out

    assert columns(3) == columns(3)
    assert columns(3) != columns(4)
    assert set(columns(3)) == set(range(5))  # 30 draws over 5 columns reach every one


def test_catch_errors():
    with pytest.raises(ValueError, match=r"CatchEnv: expected rows to be an int >= 2, got 1"):
        CatchEnv(rows=1)
    with pytest.raises(ValueError, match=r"CatchEnv: expected columns to be an int >= 1, got 0"):
        CatchEnv(columns=0)
    env = CatchEnv()
    with pytest.raises(RuntimeError, match=r"CatchEnv.step: .* call reset\(\) first"):
        env.step(1)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"CatchEnv.step: expected an integer action in \{0, 1, 2\}, got 3"):
        env.step(3)
    with pytest.raises(ValueError, match=r"got 1.0"):
        env.step(1.0)
    for _ in range(env.rows - 1):
        env.step(np.int64(1))
    with pytest.raises(RuntimeError, match=r"got a finished one; call reset\(\) first"):
        env.step(1)


def test_catch_ansi_render():
    env = CatchEnv(rows=3, columns=3, render_mode="ansi")
    env.reset(seed=0)
    frame = env.render()
    assert frame.count("o") == 1 and frame.count("=") == 1
    assert frame.splitlines()[-1] == ".=."


# ---------------------------------------------------------------- LatencyWrapper


@pytest.fixture
def sleeps(monkeypatch):
    calls = []
    monkeypatch.setattr(envs.latency.time, "sleep", calls.append)
    return calls


def test_latency_sleeps_then_delegates(sleeps):
    env = LatencyWrapper(ScriptedEnv(), step_latency=0.25, reset_latency=0.5)
    obs, _ = env.reset(seed=0)
    assert sleeps == [0.5]
    obs, reward, *_ = env.step(0)
    assert sleeps == [0.5, 0.25]
    np.testing.assert_array_equal(obs, [0.0, 1.0])
    assert reward == 1.0


def test_latency_zero_does_not_sleep(sleeps):
    env = LatencyWrapper(ScriptedEnv(), step_latency=0.0)
    env.reset(seed=0)
    env.step(0)
    assert sleeps == []


def test_latency_registered_env_uses_kwargs(sleeps):
    env = gymnasium.make("rlbatch/Latency-v0", step_latency=0.002, reset_latency=0.003)
    env.reset(seed=0)
    env.step(0)
    env.step(1)
    assert sleeps == [0.003, 0.002, 0.002]


@pytest.mark.parametrize("bad", [-0.001, math.nan, math.inf, "fast"])
def test_latency_validation(bad):
    message = r"LatencyWrapper: expected step_latency to be a finite number of seconds >= 0, got"
    with pytest.raises(ValueError, match=message):
        LatencyWrapper(ScriptedEnv(), step_latency=bad)
    with pytest.raises(ValueError, match=r"expected reset_latency"):
        LatencyWrapper(ScriptedEnv(), reset_latency=bad)


# ---------------------------------------------------------------- FaultInjection


def _fault_pattern(env: FaultInjection, calls: int) -> list[bool]:
    env.reset(seed=0)
    faults = []
    for _ in range(calls):
        try:
            _, _, terminated, truncated, _ = env.step(0)
        except InjectedFault:
            faults.append(True)
            continue
        faults.append(False)
        if terminated or truncated:
            env.reset()
    return faults


def test_faults_never_with_p_zero():
    env = FaultInjection(ScriptedEnv(), p_step=0.0, p_reset=0.0, seed=0)
    assert not any(_fault_pattern(env, 1000))
    for _ in range(100):
        env.reset()


def test_faults_always_with_p_one():
    env = FaultInjection(ScriptedEnv(), p_step=1.0, p_reset=0.0, seed=0)
    assert all(_fault_pattern(env, 100))
    env = FaultInjection(ScriptedEnv(), p_reset=1.0, seed=0)
    for call in range(1, 4):
        message = rf"FaultInjection.reset: injected fault on reset call {call} \(p_reset=1.0\)"
        with pytest.raises(InjectedFault, match=message):
            env.reset(seed=0)


def test_fault_message_and_type():
    env = FaultInjection(ScriptedEnv(), p_step=1.0, seed=0)
    env.reset(seed=0)
    with pytest.raises(InjectedFault, match=r"^FaultInjection.step: injected fault on step call 1 \(p_step=1.0\)$"):
        env.step(0)
    assert issubclass(InjectedFault, RuntimeError)


def test_faults_are_deterministic_for_a_seed_and_near_p():
    first = _fault_pattern(FaultInjection(ScriptedEnv(), p_step=0.3, seed=42), 2000)
    again = _fault_pattern(FaultInjection(ScriptedEnv(), p_step=0.3, seed=42), 2000)
    other = _fault_pattern(FaultInjection(ScriptedEnv(), p_step=0.3, seed=43), 2000)
    assert first == again
    assert first != other
    assert 0.25 < np.mean(first) < 0.35


def _reset_until_it_works(env: FaultInjection) -> None:
    while True:
        try:
            env.reset()
            return
        except InjectedFault:
            pass


def test_step_faults_do_not_depend_on_resets():
    script = dict(episode_lengths=(100,), truncate=(False,))
    quiet = FaultInjection(ScriptedEnv(**script), p_step=0.5, seed=5)
    busy = FaultInjection(ScriptedEnv(**script), p_step=0.5, p_reset=0.5, seed=5)
    _reset_until_it_works(quiet)
    patterns = {"quiet": [], "busy": []}
    for _ in range(50):
        _reset_until_it_works(busy)  # resets, some faulting, between every two steps
        for name, env in (("quiet", quiet), ("busy", busy)):
            try:
                env.step(0)
                patterns[name].append(False)
            except InjectedFault:
                patterns[name].append(True)
    # Step call n faults the same way in both, however many resets (and reset faults) came between.
    assert patterns["busy"] == patterns["quiet"]
    assert any(patterns["quiet"]) and not all(patterns["quiet"])
    assert busy.reset_calls > 50  # some resets did fault


def test_faulting_step_leaves_the_env_untouched():
    env = FaultInjection(ScriptedEnv(), p_step=0.5, seed=1)
    env.reset(seed=0)
    expected_step = 0
    for _ in range(20):
        try:
            obs, _, terminated, truncated, _ = env.step(1)
        except InjectedFault:
            continue
        expected_step += 1
        assert obs[1] == expected_step  # a faulted call did not advance the script
        if terminated or truncated:
            env.reset()
            expected_step = 0


def test_registered_faulty_env_faults():
    env = gymnasium.make("fakes/Faulty-v0", p_step=1.0, seed=0)
    env.reset(seed=0)
    with pytest.raises(InjectedFault, match=r"injected fault on step call 1"):
        env.step(0)


def test_hang_blocks_until_released():
    env = FaultInjection(ScriptedEnv(), hang_after=2)  # hang_seconds defaults to forever
    env.reset(seed=0)
    env.step(0)
    env.step(0)
    results = []
    stepper = threading.Thread(target=lambda: results.append(env.step(0)), daemon=True)
    stepper.start()
    stepper.join(timeout=0.05)
    assert stepper.is_alive() and results == []  # the third step is stuck
    env.release()
    stepper.join(timeout=5)
    assert not stepper.is_alive()
    assert results[0][2] is True  # the step then completed: episode 0 ends at step 3
    env.reset()
    env.step(0)  # released for good: no more hangs
    env.release()  # twice is fine


def test_close_releases_a_hang():
    env = FaultInjection(ScriptedEnv(), hang_after=0)
    env.reset(seed=0)
    stepper = threading.Thread(target=env.step, args=(0,), daemon=True)
    stepper.start()
    env.close()
    stepper.join(timeout=5)
    assert not stepper.is_alive()


def test_finite_hang_ends_on_its_own():
    env = FaultInjection(ScriptedEnv(), hang_after=0, hang_seconds=0.01)
    env.reset(seed=0)
    results = []
    stepper = threading.Thread(target=lambda: results.append(env.step(0)), daemon=True)
    stepper.start()
    stepper.join(timeout=5)
    assert not stepper.is_alive()
    assert results[0][1] == 1.0


def test_finite_hang_waits_hang_seconds(monkeypatch):
    waits = []
    env = FaultInjection(ScriptedEnv(), hang_after=1, hang_seconds=0.01)
    monkeypatch.setattr(env._released, "wait", waits.append)
    env.reset(seed=0)
    env.step(0)
    assert waits == []
    env.step(0)
    env.step(0)
    assert waits == [0.01, 0.01]


@pytest.mark.parametrize("name", ["p_step", "p_reset"])
@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, "often"])
def test_fault_probability_validation(name, bad):
    with pytest.raises(ValueError, match=rf"FaultInjection: expected {name} to be a probability in \[0, 1\], got"):
        FaultInjection(ScriptedEnv(), **{name: bad})


def test_hang_validation():
    with pytest.raises(ValueError, match=r"expected hang_after to be None or an int >= 0, got -1"):
        FaultInjection(ScriptedEnv(), hang_after=-1)
    with pytest.raises(ValueError, match=r"expected hang_seconds to be a number of seconds >= 0"):
        FaultInjection(ScriptedEnv(), hang_after=0, hang_seconds=-1.0)


# ---------------------------------------------------------------- ScriptedEnv


def _expected_episode(i: int, lengths=(3, 5, 2), truncate=(False, True, False), obs_dim: int = 2):
    """The documented script for episode i: reset obs, then (obs, reward, terminated, truncated) per step."""
    length, cut = lengths[i % len(lengths)], truncate[i % len(truncate)]

    def obs(t):
        return np.array([i, t] + [0] * (obs_dim - 2), dtype=np.float32)

    steps = []
    for t in range(length):
        last = t + 1 == length
        steps.append((obs(t + 1), float(10 * i + t + 1), last and not cut, last and cut))
    return obs(0), steps


def test_scripted_produces_the_documented_sequence():
    env = ScriptedEnv()
    for i in range(7):  # more than two cycles of the script
        first_obs, expected = _expected_episode(i)
        obs, info = env.reset(seed=0) if i == 0 else env.reset()
        assert obs.dtype == np.float32
        np.testing.assert_array_equal(obs, first_obs)
        assert info == {"episode": i, "step": 0}
        for t, (want_obs, want_reward, want_terminated, want_truncated) in enumerate(expected):
            action = t % 2
            obs, reward, terminated, truncated, info = env.step(action)
            np.testing.assert_array_equal(obs, want_obs)
            assert reward == want_reward
            assert (terminated, truncated) == (want_terminated, want_truncated)
            assert info == {"episode": i, "step": t + 1, "action": action}


def test_scripted_hand_written_first_episodes():
    env = ScriptedEnv()
    env.reset()
    rollout = [env.step(0)[1:4] for _ in range(3)]
    assert rollout == [(1.0, False, False), (2.0, False, False), (3.0, True, False)]
    env.reset()
    rollout = [env.step(1)[1:4] for _ in range(5)]
    assert rollout == [
        (11.0, False, False),
        (12.0, False, False),
        (13.0, False, False),
        (14.0, False, False),
        (15.0, False, True),  # episode 1 is scripted to truncate
    ]


def test_scripted_obs_dim_pads_with_zeros():
    env = ScriptedEnv(episode_lengths=(2,), truncate=(True,), obs_dim=4)
    env.reset()
    env.step(0)
    env.step(0)
    obs, _ = env.reset()
    np.testing.assert_array_equal(obs, [1.0, 0.0, 0.0, 0.0])
    obs, reward, terminated, truncated, _ = env.step(1)
    np.testing.assert_array_equal(obs, [1.0, 1.0, 0.0, 0.0])
    assert (reward, terminated, truncated) == (11.0, False, False)
    assert env.observation_space.shape == (4,)


def test_scripted_seeded_reset_restarts_the_script():
    env = ScriptedEnv()
    env.reset(seed=1)
    env.reset()
    obs, info = env.reset()
    assert info["episode"] == 2
    obs, info = env.reset(seed=2)
    assert info["episode"] == 0 and obs[0] == 0.0
    obs, info = env.reset()
    assert info["episode"] == 1


def test_scripted_errors():
    env = ScriptedEnv()
    with pytest.raises(RuntimeError, match=r"ScriptedEnv.step: .* call reset\(\) first"):
        env.step(0)
    env.reset()
    with pytest.raises(ValueError, match=r"ScriptedEnv.step: expected an integer action in \{0, 1\}, got 2"):
        env.step(2)
    for _ in range(3):
        env.step(0)
    with pytest.raises(RuntimeError, match=r"call reset\(\) first"):
        env.step(0)
    with pytest.raises(ValueError, match=r"ScriptedEnv: expected at least one episode length, got none"):
        ScriptedEnv(episode_lengths=(), truncate=())
    with pytest.raises(ValueError, match=r"ScriptedEnv: expected episode lengths to be ints >= 1, got \(3, 0\)"):
        ScriptedEnv(episode_lengths=(3, 0), truncate=(False, False))
    with pytest.raises(ValueError, match=r"ScriptedEnv: expected one truncate flag per episode length \(3\), got 2"):
        ScriptedEnv(truncate=(False, True))
    with pytest.raises(ValueError, match=r"ScriptedEnv: expected obs_dim to be an int >= 2, got 1"):
        ScriptedEnv(obs_dim=1)
