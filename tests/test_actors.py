"""ActorPool: trajectory contents against a scripted env, faults, back pressure, lifecycle."""
import itertools
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from tests import fakes
import rlbatch
from tests.conftest import wait_until

LENGTHS, TRUNCATE = (3, 5, 2), (False, True, False)


def identity_apply(params, obs, key):
    """Deterministic: action 0; extras identify the observation the action was chosen on."""
    n = obs.shape[0]
    return jnp.zeros(n, jnp.int32), {"tag": obs[:, 0] * 100 + obs[:, 1], "log_prob": jnp.zeros(n)}


def scripted_service(**kw):
    return rlbatch.PolicyService(identity_apply, {}, example_obs=np.zeros(2, np.float32), buckets=(4, 8, 16, 64),
                                 max_delay=0.001, **kw)


def scripted_steps(lengths=LENGTHS, truncate=TRUNCATE):
    """The scripted env's transitions, recomputed here from its documented formulas."""
    i = 0
    while True:
        L, trunc = lengths[i % len(lengths)], truncate[i % len(truncate)]
        for t in range(L):
            end = t + 1 == L
            yield dict(obs=[i, t], reward=10 * i + t + 1, terminated=end and not trunc, truncated=end and trunc,
                       final_obs=[i, t + 1] if end else [0, 0], next_obs=[i + 1, 0] if end else [i, t + 1],
                       episode=i)
        i += 1


def rotated(n):
    """The script of the n-th environment built by `rotated_scripts`: LENGTHS and TRUNCATE rotated by n."""
    n %= 3
    return LENGTHS[n:] + LENGTHS[:n], TRUNCATE[n:] + TRUNCATE[:n]


def assert_matches_scripts(trajs, k, T):
    """Column j of every trajectory holds the next T steps of the script of rotated(j), in order."""
    for j in range(k):
        steps = scripted_steps(*rotated(j))
        for traj in trajs:
            expected = [next(steps) for _ in range(T)]
            np.testing.assert_array_equal(traj.obs[:T, j], [e["obs"] for e in expected])
            np.testing.assert_array_equal(traj.obs[T, j], expected[-1]["next_obs"])
            np.testing.assert_array_equal(traj.reward[:, j], [e["reward"] for e in expected])
            np.testing.assert_array_equal(traj.terminated[:, j], [e["terminated"] for e in expected])
            np.testing.assert_array_equal(traj.truncated[:, j], [e["truncated"] for e in expected])
            np.testing.assert_array_equal(traj.final_obs[:, j], [e["final_obs"] for e in expected])
            np.testing.assert_array_equal(traj.extras["tag"][:, j], [e["obs"][0] * 100 + e["obs"][1] for e in expected])
            np.testing.assert_array_equal(traj.episode_id[:, j] & 0xFFFFFFFF, [e["episode"] for e in expected])
            assert (traj.episode_id[:, j] >> 32 == j).all()


def rotated_scripts(wrap=lambda env, n: env):
    """A factory whose n-th environment follows `rotated(n)`, so that the k environments of one
    actor end their episodes at different steps (n is the column for one actor's first build)."""
    count = itertools.count()

    def make():
        n = next(count)
        return wrap(fakes.ScriptedEnv(*rotated(n)), n)

    return make


def counter_apply(params, obs, state, key):
    """Recurrent: the state counts the steps since the row's episode started."""
    return state % 2, {"count": state}, state + 1


def counter_service():
    return rlbatch.PolicyService(counter_apply, {}, example_obs=np.zeros(2, np.float32), buckets=(4,),
                                 example_state=np.int32(0), max_delay=0.001)


def test_single_env_trajectories_match_the_script_exactly():
    T = 4
    with scripted_service() as svc:
        pool = rlbatch.ActorPool(lambda: fakes.ScriptedEnv(LENGTHS, TRUNCATE), svc, num_actors=1, unroll_length=T)
        with pool:
            trajs = [pool.get(timeout=30) for _ in range(6)]
        episodes = pool.episodes
    steps = scripted_steps()
    for traj in trajs:
        expected = [next(steps) for _ in range(T)]
        assert traj.obs.shape == (T + 1, 2) and traj.action.shape == (T,) and traj.final_obs.shape == (T, 2)
        np.testing.assert_array_equal(traj.obs[:T], [e["obs"] for e in expected])
        np.testing.assert_array_equal(traj.obs[T], expected[-1]["next_obs"])  # bootstrap observation
        np.testing.assert_array_equal(traj.reward, [e["reward"] for e in expected])
        np.testing.assert_array_equal(traj.terminated, [e["terminated"] for e in expected])
        np.testing.assert_array_equal(traj.truncated, [e["truncated"] for e in expected])
        np.testing.assert_array_equal(traj.final_obs, [e["final_obs"] for e in expected])
        np.testing.assert_array_equal(traj.extras["tag"], [e["obs"][0] * 100 + e["obs"][1] for e in expected])
        np.testing.assert_array_equal(traj.episode_id & 0xFFFFFFFF, [e["episode"] for e in expected])
        assert traj.actor_id == 0 and (traj.policy_version == 0).all()
        assert traj.reward.dtype == np.float32 and traj.terminated.dtype == np.bool_
    # returns of finished episodes, in order: 1+2+3, 11+..+15, 21+22, 31+32+33, ...
    assert [r for r, _ in episodes[:4]] == [6, 65, 43, 96]
    assert [n for _, n in episodes[:4]] == [3, 5, 2, 3]


def test_recent_return_is_the_mean_over_the_pools_window_of_episodes():
    with scripted_service() as svc:
        pool = rlbatch.ActorPool(lambda: fakes.ScriptedEnv(LENGTHS, TRUNCATE), svc, num_actors=1, unroll_length=4,
                                 recent_episodes=3)
        with pool:
            for _ in range(6):
                pool.get(timeout=30)
        stats, episodes = pool.stats, pool.episodes
    assert len(episodes) > 3
    assert stats.recent_return_mean == pytest.approx(np.mean([r for r, _ in episodes[-3:]]))
    with pytest.raises(ValueError, match="recent_episodes must be a positive int, got 0"):
        rlbatch.ActorPool("CartPole-v1", svc, num_actors=1, unroll_length=4, recent_episodes=0)


def test_several_envs_per_actor_put_the_env_axis_second_and_stack():
    T, k = 5, 3
    with scripted_service() as svc:
        with rlbatch.ActorPool(lambda: fakes.ScriptedEnv(LENGTHS, TRUNCATE), svc, num_actors=2, unroll_length=T,
                               envs_per_actor=k) as pool:
            trajs = [pool.get(timeout=30) for _ in range(4)]
    for traj in trajs:
        assert traj.obs.shape == (T + 1, k, 2) and traj.reward.shape == (T, k) and traj.action.shape == (T, k)
        assert traj.extras["tag"].shape == (T, k)
        for j in range(k):  # every column follows the script on its own
            np.testing.assert_array_equal(traj.reward[:, j], 10 * traj.obs[:T, j, 0] + traj.obs[:T, j, 1] + 1)
        env_index = traj.episode_id >> 32
        assert (env_index == traj.actor_id * k + np.arange(k)).all()
    batch = rlbatch.stack_trajectories(trajs)
    assert batch.obs.shape == (T + 1, 4 * k, 2) and batch.reward.shape == (T, 4 * k)
    assert batch.actor_id.shape == (4 * k,)


def test_three_envs_with_different_episode_lengths_match_their_scripts_exactly():
    T, k = 4, 3
    with scripted_service() as svc:
        pool = rlbatch.ActorPool(rotated_scripts(), svc, num_actors=1, unroll_length=T, envs_per_actor=k)
        with pool:
            trajs = [pool.get(timeout=30) for _ in range(6)]
    assert_matches_scripts(trajs, k, T)
    ends = np.concatenate([traj.terminated | traj.truncated for traj in trajs])
    # the columns end their episodes at different steps, so a mix-up between columns shows
    assert (ends[:, 0] != ends[:, 1]).any() and (ends[:, 1] != ends[:, 2]).any() and (ends[:, 0] != ends[:, 2]).any()


def test_environment_i_is_seeded_seed_plus_i():
    seeds = []
    lock = threading.Lock()

    class Recording(fakes.ScriptedEnv):
        def reset(self, *, seed=None, options=None):
            if seed is not None:
                with lock:
                    seeds.append(seed)
            return super().reset(seed=seed, options=options)

    with scripted_service() as svc:
        with rlbatch.ActorPool(lambda: Recording(LENGTHS, TRUNCATE), svc, num_actors=3, unroll_length=2,
                               envs_per_actor=2, seed=100) as pool:
            pool.get(timeout=30)
    assert sorted(seeds) == [100, 101, 102, 103, 104, 105]


def test_env_faults_rebuild_env_and_drop_unfinished_trajectory_only():
    made = []
    lock = threading.Lock()

    def make():
        env = fakes.FaultInjection(fakes.ScriptedEnv(LENGTHS, TRUNCATE), p_step=0.05, p_reset=0.05,
                                   seed=int(np.random.default_rng().integers(1 << 30)))
        with lock:
            made.append(env)
        return env

    with scripted_service() as svc:
        with rlbatch.ActorPool(make, svc, num_actors=4, unroll_length=6) as pool:
            trajs = [pool.get(timeout=30) for _ in range(40)]
            wait_until(lambda: pool.stats.env_errors >= 3)
        stats = pool.stats
    faults = [fault for env in made for fault in env.faults]
    # The first reset of every environment is its build: a fault there leaves no trajectory to drop.
    build_faults = faults.count(("reset", 1))
    assert stats.env_errors == stats.env_rebuilds == len(faults) >= 3
    assert stats.dropped_on_error == len(faults) - build_faults
    assert stats.obs_refused == 0 and stats.policy_errors == 0
    assert all("InjectedFault" in e.traceback and e.where in ("env.step", "env.reset") for e in pool.errors)
    assert all(0 <= e.actor_id < 4 and e.env_index == e.actor_id for e in pool.errors)
    for traj in trajs:  # every emitted trajectory is whole and consistent with the script
        np.testing.assert_array_equal(traj.reward, 10 * traj.obs[:-1, 0] + traj.obs[:-1, 1] + 1)
        np.testing.assert_array_equal(traj.extras["tag"], traj.obs[:-1, 0] * 100 + traj.obs[:-1, 1])
    assert pool.envs_open == 0


def test_queue_full_blocks_actors_until_consumer_takes():
    with scripted_service() as svc:
        with rlbatch.ActorPool(lambda: fakes.ScriptedEnv(LENGTHS, TRUNCATE), svc, num_actors=3, unroll_length=2,
                               max_queue=2) as pool:
            wait_until(lambda: pool.stats.queue_depth == 2)
            assert pool.stats.trajectories == 2 and pool.stats.dropped_full == 0
            pool.get(timeout=5)
            wait_until(lambda: pool.stats.trajectories == 3)
            assert pool.stats.queue_depth == 2


def test_queue_full_drop_oldest_keeps_newest_and_counts():
    T = 2
    with scripted_service() as svc:
        with rlbatch.ActorPool(lambda: fakes.ScriptedEnv(LENGTHS, TRUNCATE), svc, num_actors=1, unroll_length=T,
                               max_queue=2, on_full="drop_oldest") as pool:
            wait_until(lambda: pool.stats.dropped_full >= 3)
            pool.stop()
            kept = [pool.get(timeout=5), pool.get(timeout=5)]
            with pytest.raises(rlbatch.PoolStopped):
                pool.get(timeout=5)
            stats = pool.stats
    assert stats.trajectories == stats.dropped_full + 2
    # the two kept are the last two emitted: trajectory n covers steps n T ... n T + T - 1 of the script
    steps = list(itertools.islice(scripted_steps(), stats.trajectories * T))
    for traj, n in zip(kept, (stats.trajectories - 2, stats.trajectories - 1)):
        np.testing.assert_array_equal(traj.obs[:T], [e["obs"] for e in steps[n * T:(n + 1) * T]])
        np.testing.assert_array_equal(traj.obs[T], steps[(n + 1) * T - 1]["next_obs"])


def test_policy_error_is_recorded_and_retried_with_backoff():
    class Flaky:
        """A policy front that fails its first three calls."""

        def __init__(self, svc):
            self.svc, self.calls, self.lock = svc, 0, threading.Lock()

        def register(self):
            caller = self.svc.register()
            flaky = self

            class C:
                def __call__(self, obs):
                    with flaky.lock:
                        flaky.calls += 1
                        n = flaky.calls
                    if n <= 3:
                        raise RuntimeError(f"transient policy failure {n}")
                    return caller(obs)

                def close(self):
                    caller.close()

            return C()

    with scripted_service() as svc:
        with rlbatch.ActorPool(lambda: fakes.ScriptedEnv(LENGTHS, TRUNCATE), Flaky(svc), num_actors=1,
                               unroll_length=3, max_backoff=0.05) as pool:
            traj = pool.get(timeout=30)
            stats = pool.stats
    assert stats.policy_errors == 3
    assert [e.where for e in stats.recent_errors] == ["policy"] * 3
    np.testing.assert_array_equal(traj.obs[:3], [[0, 0], [0, 1], [0, 2]])  # no step lost or repeated


def test_stuck_env_shows_in_last_step_age():
    hung = []
    lock = threading.Lock()

    def make():  # called by every actor thread at once: exactly one environment hangs
        env = fakes.ScriptedEnv(LENGTHS, TRUNCATE)
        with lock:
            if not hung:
                env = fakes.FaultInjection(env, hang_after=3)
                hung.append(env)
        return env

    with scripted_service() as svc:
        pool = rlbatch.ActorPool(make, svc, num_actors=4, unroll_length=2, on_full="drop_oldest", max_queue=4)
        with pool:
            wait_until(lambda: pool.stats.env_steps > 100)
            wait_until(lambda: max(pool.stats.last_step_age) > 0.3)
            ages = pool.stats.last_step_age
            stuck = int(np.argmax(ages))
            assert sorted(ages)[-2] < ages[stuck]
            hung[0].release()
        assert pool.stop()
    assert pool.envs_open == 0


def test_recurrent_state_resets_at_episode_start():
    with counter_service() as svc:
        with rlbatch.ActorPool(lambda: fakes.ScriptedEnv(LENGTHS, TRUNCATE), svc, num_actors=1,
                               unroll_length=10) as pool:
            traj = pool.get(timeout=30)
    # the counter is the step index within the episode: it restarts at every episode start
    np.testing.assert_array_equal(traj.extras["count"], traj.obs[:-1, 1])
    np.testing.assert_array_equal(traj.action, traj.obs[:-1, 1] % 2)


def test_recurrent_state_resets_only_the_row_whose_episode_starts():
    T, k = 10, 3
    with counter_service() as svc:
        with rlbatch.ActorPool(rotated_scripts(), svc, num_actors=1, unroll_length=T, envs_per_actor=k) as pool:
            trajs = [pool.get(timeout=30) for _ in range(3)]
    for traj in trajs:
        assert traj.extras["count"].shape == (T, k)
        np.testing.assert_array_equal(traj.extras["count"], traj.obs[:-1, :, 1])
        np.testing.assert_array_equal(traj.action, traj.obs[:-1, :, 1] % 2)


def test_recurrent_state_of_a_rebuilt_environment_starts_over():
    T, k = 6, 3
    with counter_service() as svc:
        make = rotated_scripts(lambda env, n: fakes.FaultInjection(env, p_step=0.04, seed=n))
        with rlbatch.ActorPool(make, svc, num_actors=1, unroll_length=T, envs_per_actor=k) as pool:
            trajs = [pool.get(timeout=30) for _ in range(12)]
            stats = pool.stats
    assert stats.env_rebuilds >= 1
    # A rebuilt environment restarts its script at episode 0 while its slot counts on: the columns
    # where the two differ were played after a rebuild.
    after_rebuild = [(traj, j) for traj in trajs for j in range(k)
                     if ((traj.episode_id[:, j] & 0xFFFFFFFF) != traj.obs[:-1, j, 0]).any()]
    assert after_rebuild
    for traj in trajs:
        np.testing.assert_array_equal(traj.extras["count"], traj.obs[:-1, :, 1])


def test_consumer_is_not_left_waiting_when_every_actor_has_exited():
    with scripted_service() as svc:
        pool = rlbatch.ActorPool(lambda: fakes.ScriptedEnv(LENGTHS, TRUNCATE), svc, num_actors=2, unroll_length=4)
        pool.start()
        svc.close()  # the policy goes away: the actors exit
        with pytest.raises(rlbatch.PoolStopped, match="every actor has exited"):
            for _ in range(1000):
                pool.get(timeout=30)
        assert pool.stop()


def test_stop_under_load_joins_everything_and_leaves_no_thread(no_thread_leak):
    svc = rlbatch.PolicyService(identity_apply, {}, example_obs=np.zeros(4, np.float32), buckets=(64, 256, 512),
                                max_delay=0.002)
    pool = rlbatch.ActorPool("CartPole-v1", svc, num_actors=512, unroll_length=8, max_queue=16)
    pool.start()
    wait_until(lambda: pool.stats.env_steps > 2000, timeout=60)
    assert pool.stop(timeout=30)  # True only once every actor thread has ended
    assert pool.envs_open == 0 and pool.stats.actors_running == 0
    assert svc.stats.pending == 0
    svc.close()


def test_box_actions_are_clipped_for_the_env_but_recorded_as_sampled():
    import gymnasium

    def wide_apply(params, obs, key):  # samples far outside Pendulum's [-2, 2]
        n = obs.shape[0]
        return 5.0 * jax.random.normal(key, (n, 1)), {"log_prob": jnp.zeros(n)}

    seen = []

    class Spy(gymnasium.Wrapper):
        def step(self, action):
            seen.append(np.asarray(action).copy())
            return self.env.step(action)

    with rlbatch.PolicyService(wide_apply, {}, example_obs=np.zeros(3, np.float32), buckets=(4,),
                               max_delay=0.001) as svc:
        with rlbatch.ActorPool(lambda: Spy(gymnasium.make("Pendulum-v1")), svc, num_actors=1,
                               unroll_length=20) as pool:
            traj = pool.get(timeout=30)
    assert np.abs(traj.action).max() > 2.0  # the policy's own samples, for their log-probs
    assert np.abs(np.stack(seen)).max() <= 2.0  # what the environment got
    assert not pool.errors


REFUSED = (r"expected finite values, got NaN or inf in float32\[2\]"
           r"|expected an observation float32\[2\], got float32\[3\]")


def test_refused_observations_are_env_faults_and_every_actor_plays_on():
    num_actors = 16
    made = []
    lock = threading.Lock()

    def make():
        with lock:
            env = fakes.CorruptObservations(fakes.ScriptedEnv(LENGTHS, TRUNCATE), p_nan=0.02, p_wrong_shape=0.02,
                                            seed=len(made))
            made.append(env)
        return env

    with scripted_service(check_finite=True) as svc:
        with rlbatch.ActorPool(make, svc, num_actors=num_actors, unroll_length=4, max_queue=4) as pool:
            trajs = []
            while pool.stats.obs_refused < 3 * num_actors:
                trajs.append(pool.get(timeout=30))
            # every actor still plays: each one emits trajectories after the faults
            after = set()
            for _ in range(100 * num_actors):
                after.add(pool.get(timeout=30).actor_id)
                if len(after) == num_actors:
                    break
            assert after == set(range(num_actors))
            assert pool.stats.actors_running == num_actors
        stats = pool.stats
    corrupted = sum(len(env.corrupted) for env in made)
    # each actor may have stopped with one corrupted observation not yet sent
    assert corrupted - num_actors <= stats.obs_refused <= corrupted
    assert stats.env_errors == stats.obs_refused and stats.env_rebuilds == 0 and stats.policy_errors == 0
    assert 0 < stats.dropped_on_error <= stats.obs_refused
    assert pool.errors
    for fault in pool.errors:
        assert fault.where == "env.observation" and 0 <= fault.actor_id < num_actors
        assert fault.env_index == fault.actor_id  # one environment per actor
        assert re.search(rf"actor {fault.actor_id}: the policy refused the observation of environment "
                         rf"{fault.env_index}: ({REFUSED})", fault.error)
    for traj in trajs:  # what was emitted is whole, sound and follows the script
        assert np.isfinite(traj.obs).all()
        np.testing.assert_array_equal(traj.reward, 10 * traj.obs[:-1, 0] + traj.obs[:-1, 1] + 1)


def test_a_refused_observation_is_blamed_on_the_environment_that_produced_it():
    T, k = 4, 3

    def corrupt_column_1(env, n):
        return fakes.CorruptObservations(env, p_nan=0.06, p_wrong_shape=0.06, seed=n) if n == 1 else env

    with scripted_service(check_finite=True) as svc:
        with rlbatch.ActorPool(rotated_scripts(corrupt_column_1), svc, num_actors=1, unroll_length=T,
                               envs_per_actor=k) as pool:
            trajs = []
            while pool.stats.obs_refused < 12:
                trajs.append(pool.get(timeout=30))
            trajs += [pool.get(timeout=30) for _ in range(3)]  # and it plays on
        stats = pool.stats
    kinds = {re.search(REFUSED, fault.error).group(0) for fault in pool.errors}
    assert len(kinds) == 2  # both NaN (refused by the policy) and wrong shapes (that do not stack)
    assert all(fault.where == "env.observation" and fault.env_index == 1 for fault in pool.errors)
    assert stats.env_errors == stats.obs_refused and stats.env_rebuilds == 0
    # Columns 0 and 2 never lost an episode: their episode counters still match their scripts', and
    # each of their trajectories follows the script from where it starts.
    for traj in trajs:
        for j in (0, 2):
            np.testing.assert_array_equal(traj.episode_id[:, j] & 0xFFFFFFFF, traj.obs[:-1, j, 0])
            np.testing.assert_array_equal(traj.reward[:, j], 10 * traj.obs[:-1, j, 0] + traj.obs[:-1, j, 1] + 1)


class NaNAtStart(fakes.ScriptedEnv):
    """Every episode starts with an observation of NaNs."""

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed, options=options)
        return np.full_like(obs, np.nan), info


@pytest.mark.parametrize("k, make, got", [
    (1, lambda: fakes.ScriptedEnv(obs_dim=3), r"expected an observation float32\[2\], got float32\[3\]"),
    (3, lambda: fakes.ScriptedEnv(obs_dim=3), r"expected an observation float32\[2\], got float32\[3\]"),
    (1, lambda: NaNAtStart(), r"expected finite values, got NaN or inf in float32\[2\]"),
])
def test_an_environment_whose_first_observation_never_fits_stops_the_pool_at_once(k, make, got):
    with scripted_service(check_finite=True) as svc:
        with rlbatch.ActorPool(make, svc, num_actors=2, unroll_length=4, envs_per_actor=k) as pool:
            with pytest.raises(rlbatch.PoolStopped, match=r"^actor \d: the first observation of environment \d+ "
                                                          r"\(after it was built\) does not fit the policy: " + got):
                pool.get(timeout=30)
            assert not pool.running
        stats = pool.stats
    assert stats.trajectories == 0 and stats.env_rebuilds == 0 and stats.actors_running == 0
    assert pool.errors and all(fault.where == "env.observation" for fault in pool.errors)
    assert pool.envs_open == 0
