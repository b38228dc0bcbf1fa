"""EnvSlot without threads: seeding, episode bookkeeping, and how it recovers from each fault."""
import threading

import numpy as np
import pytest

from rlbatch.actors.env_slot import EnvFault, EnvSlot, StopRequested, env_factory
from rlbatch.actors.stats import ActorCounters, EpisodeLog, FaultLog
from tests import fakes


class Recorder(fakes.ScriptedEnv):
    """A ScriptedEnv (lengths 2, 3) that keeps every reset seed and whether it was closed."""

    def __init__(self, built):
        super().__init__((2, 3), (False, True))
        self.seeds, self.closed = [], False
        built.append(self)

    def reset(self, *, seed=None, options=None):
        self.seeds.append(seed)
        return super().reset(seed=seed, options=options)

    def close(self):
        self.closed = True


def make_slot(make_env, stop=None, index=5):
    counters, faults, episodes = ActorCounters(), FaultLog(), EpisodeLog()
    slot = EnvSlot(make_env, index, 2, 1, seed=100, num_envs=8, max_backoff=0.001, stop=stop or threading.Event(),
                   counters=counters, faults=faults, episodes=episodes)
    return slot, counters, faults, episodes


def test_open_resets_with_seed_plus_index_and_rebuilds_add_num_envs_each():
    built = []
    slot, counters, faults, _ = make_slot(lambda: Recorder(built))
    np.testing.assert_array_equal(slot.open(), [0, 0])
    assert slot.fresh and counters.envs_open == 1
    slot.rebuild()
    slot.rebuild()
    assert [env.seeds for env in built] == [[105], [113], [121]]
    assert [env.closed for env in built] == [True, True, False]
    assert counters.envs_open == 1 and counters.env_rebuilds == 2 and slot.rebuilds == 2
    assert slot.episode == 2 and slot.fresh
    slot.close()
    assert built[-1].closed and counters.envs_open == 0 and faults.recent() == []


def test_steps_keep_return_and_length_and_next_episode_logs_them():
    built = []
    slot, counters, _, episodes = make_slot(lambda: Recorder(built))
    slot.open()
    obs, reward, terminated, truncated, _ = slot.step(0)
    assert not slot.fresh and (slot.episode_return, slot.episode_length) == (1.0, 1)
    obs, reward, terminated, truncated, _ = slot.step(1)
    assert terminated and (slot.episode_return, slot.episode_length) == (3.0, 2)
    np.testing.assert_array_equal(slot.next_episode(), [1, 0])  # episode 1 of the script
    assert episodes.all() == [(3.0, 2)] and counters.episodes == 1
    assert slot.episode == 1 and (slot.episode_return, slot.episode_length) == (0.0, 0)
    assert not slot.fresh  # a new episode, not a new environment
    assert built[0].seeds == [105, None]  # episodes after the first are not reseeded


def test_a_failing_step_is_an_env_fault_of_the_slots_column_and_recover_rebuilds():
    built = []

    def make():
        env = Recorder(built)
        return fakes.FaultInjection(env, p_step=1.0) if len(built) == 1 else env

    slot, counters, faults, episodes = make_slot(make)
    slot.open()
    with pytest.raises(EnvFault) as caught:
        slot.step(0)
    assert caught.value.column == 2 and caught.value.where == "env.step"
    np.testing.assert_array_equal(slot.recover(caught.value), [0, 0])
    assert counters.env_errors == 1 and counters.env_rebuilds == 1 and episodes.all() == []
    (fault,) = faults.recent()
    assert (fault.actor_id, fault.where, fault.env_index) == (1, "env.step", 5) and "InjectedFault" in fault.error
    assert built[0].closed and built[1].seeds == [113] and slot.episode == 1


def test_failed_builds_are_recorded_and_retried_until_one_works():
    built, calls = [], []

    def make():
        calls.append(None)
        if len(calls) == 1:
            raise OSError("no simulator licence")
        env = Recorder(built)
        return fakes.FaultInjection(env, p_reset=1.0) if len(calls) == 2 else env

    slot, counters, faults, _ = make_slot(make)
    slot.open()
    assert [f.where for f in faults.recent()] == ["env_fn", "env.reset"]
    assert all(f.env_index == 5 for f in faults.recent())
    assert counters.env_errors == 2 and counters.env_rebuilds == 2 and counters.envs_open == 1
    assert built[0].closed and built[1].seeds == [121]  # seed + index + num_envs * 2 failed builds


def test_open_gives_up_with_stop_requested_once_the_pool_stops():
    stop = threading.Event()
    stop.set()
    slot, counters, _, _ = make_slot(lambda: Recorder([]), stop=stop)
    with pytest.raises(StopRequested):
        slot.open()
    assert counters.envs_open == 0


def test_a_refused_observation_in_mid_episode_starts_a_new_episode():
    built = []
    slot, counters, faults, episodes = make_slot(lambda: Recorder(built))
    slot.open()
    slot.step(0)
    np.testing.assert_array_equal(slot.refused(ValueError("NaN")), [1, 0])  # the script's next episode
    assert len(built) == 1 and built[0].seeds == [105, None]
    assert counters.obs_refused == 1 and counters.env_errors == 1 and counters.env_rebuilds == 0
    assert episodes.all() == []  # the abandoned episode is not a finished one
    (fault,) = faults.recent()
    assert (fault.where, fault.env_index, fault.error) == ("env.observation", 5, "ValueError('NaN')")


def test_a_refused_first_observation_of_an_episode_rebuilds_the_environment():
    built = []
    slot, counters, _, _ = make_slot(lambda: Recorder(built))
    slot.open()
    slot.step(0)
    slot.refused(ValueError("NaN"))  # mid-episode: reset
    slot.refused(ValueError("NaN"))  # the reset's observation: rebuild
    assert len(built) == 2 and built[0].closed and built[1].seeds == [113]
    assert counters.obs_refused == 2 and counters.env_rebuilds == 1 and slot.fresh


def test_env_factory_takes_ids_specs_and_callables_only():
    assert env_factory("CartPole-v1")().spec.id == "CartPole-v1"
    with pytest.raises(TypeError, match="env_fn: expected a gymnasium id, an EnvSpec or a factory callable, got int"):
        env_factory(3)
