"""ActorPool with vector environments (rlbatch/actors/vector_slot.py): gymnasium's SyncVectorEnv in
its NEXT_STEP and SAME_STEP autoreset modes and AsyncVectorEnv give exactly the trajectories k single
environments give; seeding; faults; vector environments the actor cannot play."""
import functools
import itertools
import re
import threading

import gymnasium
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import rlbatch
from tests import fakes
from tests import test_actors
from tests.test_actors import counter_service, rotated, rotated_scripts, scripted_service, scripted_steps

T, K = 4, 3


def scripted_vector(kind="sync", mode=AutoresetMode.NEXT_STEP, wrap=lambda env, j: env):
    """vector_env_fn: k ScriptedEnvs, sub-environment j following `rotated(j)`, so the columns end
    their episodes at different steps."""

    def make_sub(j):
        return wrap(fakes.ScriptedEnv(*rotated(j)), j)

    def make(k, seed):
        fns = [functools.partial(make_sub, j) for j in range(k)]
        if kind == "sync":
            return gymnasium.vector.SyncVectorEnv(fns, autoreset_mode=mode)
        return gymnasium.vector.AsyncVectorEnv(fns, autoreset_mode=mode, context="fork")

    return make


def run_pool(n, T=T, k=K, service=scripted_service, **pool_kw):
    pool_kw.setdefault("env_fn", None)
    with service() as svc:
        pool = rlbatch.ActorPool(policy_service=svc, num_actors=1, unroll_length=T, envs_per_actor=k, **pool_kw)
        with pool:
            trajs = [pool.get(timeout=30) for _ in range(n)]
    return trajs, pool


def expected_episodes(k, steps):
    """(return, length) of the episodes the k rotated scripts finish in `steps` steps, in the order
    an actor logs them: step by step, column by column."""
    scripts = [scripted_steps(*rotated(j)) for j in range(k)]
    returns, lengths, out = [0.0] * k, [0] * k, []
    for _ in range(steps):
        for j in range(k):
            e = next(scripts[j])
            returns[j] += e["reward"]
            lengths[j] += 1
            if e["terminated"] or e["truncated"]:
                out.append((returns[j], lengths[j]))
                returns[j], lengths[j] = 0.0, 0
    return out


def assert_matches_scripts(trajs, k=K):
    test_actors.assert_matches_scripts(trajs, k, T)


@pytest.mark.parametrize("kind, mode", [("sync", AutoresetMode.NEXT_STEP), ("sync", AutoresetMode.SAME_STEP),
                                        ("async", AutoresetMode.NEXT_STEP), ("async", AutoresetMode.SAME_STEP)])
def test_vector_env_trajectories_match_the_scripts_and_k_single_envs_exactly(kind, mode):
    n = 6
    trajs, pool = run_pool(n, vector_env_fn=scripted_vector(kind, mode))
    assert_matches_scripts(trajs)
    ends = np.concatenate([traj.terminated | traj.truncated for traj in trajs])
    assert (ends[:, 0] != ends[:, 1]).any() and (ends[:, 1] != ends[:, 2]).any()  # a column mix-up shows
    assert ends.sum() >= 8 and np.concatenate([traj.truncated for traj in trajs]).any()
    # Episode returns are the environment's own, logged in the order k single slots log them.
    episodes = pool.episodes
    assert len(episodes) >= ends.sum()
    assert episodes == expected_episodes(K, 2000)[:len(episodes)]
    assert pool.stats.episodes == len(episodes) and pool.stats.env_errors == 0
    assert pool.envs_open == 0
    singles, _ = run_pool(n, env_fn=rotated_scripts())
    for vector_traj, single_traj in zip(trajs, singles):
        for name in rlbatch.Trajectory._fields:
            a, b = getattr(vector_traj, name), getattr(single_traj, name)
            if name == "extras":
                assert a.keys() == b.keys()
                a, b = list(a.values()), list(b.values())
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_recurrent_rows_reset_with_their_columns_episodes():
    trajs, _ = run_pool(3, T=T, service=counter_service, vector_env_fn=scripted_vector())
    for traj in trajs:  # the counter is the step index within each column's episode
        np.testing.assert_array_equal(traj.extras["count"], traj.obs[:-1, :, 1])


def test_one_sub_environment_per_actor_drops_the_column_axis():
    trajs, _ = run_pool(3, k=1, vector_env_fn=scripted_vector())
    steps = scripted_steps(*rotated(0))
    for traj in trajs:
        expected = [next(steps) for _ in range(T)]
        assert traj.obs.shape == (T + 1, 2) and traj.reward.shape == (T,)
        np.testing.assert_array_equal(traj.obs[:T], [e["obs"] for e in expected])
        np.testing.assert_array_equal(traj.final_obs, [e["final_obs"] for e in expected])


def test_sub_environment_i_is_seeded_seed_plus_i():
    seeds, lock = [], threading.Lock()

    class Recording(fakes.ScriptedEnv):
        def reset(self, *, seed=None, options=None):
            if seed is not None:
                with lock:
                    seeds.append(seed)
            return super().reset(seed=seed, options=options)

    made_with = []

    def vector_env_fn(k, seed):
        with lock:
            made_with.append((k, seed))
        return gymnasium.vector.SyncVectorEnv([Recording] * k)

    with scripted_service() as svc:
        with rlbatch.ActorPool(None, svc, num_actors=3, unroll_length=2, envs_per_actor=2, seed=100,
                               vector_env_fn=vector_env_fn) as pool:
            pool.get(timeout=30)
    assert sorted(seeds) == [100, 101, 102, 103, 104, 105]
    assert sorted(made_with) == [(2, 100), (2, 102), (2, 104)]  # each actor's sub-environment 0


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_failing_vector_env_is_rebuilt_and_its_unfinished_trajectory_dropped(kind):
    made, builds = [], itertools.count()

    def wrap(env, j):  # one actor builds them in turn: the faults are the same in every run
        env = fakes.FaultInjection(env, p_step=0.03, p_reset=0.03, seed=next(builds))
        made.append(env)
        return env

    def wrap_in_subprocess(env, j):
        # Each subprocess gets a copy of the parent's state: a counter would not count, and the same
        # faults in every build could stop any trajectory from finishing. ~9 faults expected here.
        return fakes.FaultInjection(env, p_step=0.05, seed=int(np.random.default_rng().integers(1 << 30)))

    if kind == "async":  # the sub-environments live in subprocesses: count the faults there by their errors
        trajs, pool = run_pool(15, vector_env_fn=scripted_vector("async", wrap=wrap_in_subprocess))
        stats = pool.stats
        assert stats.env_errors == stats.env_rebuilds == stats.dropped_on_error >= 1
        assert all("InjectedFault" in e.error and e.where == "env.step" for e in pool.errors)
    else:
        trajs, pool = run_pool(30, vector_env_fn=scripted_vector("sync", wrap=wrap))
        stats = pool.stats
        faults = [fault for env in made for fault in env.faults]
        # One fault stops the whole vector step or reset: each fault is one rebuild. A fault in the
        # first (seeded) reset is a failed build: no trajectory to drop.
        build_faults = faults.count(("reset", 1))
        assert stats.env_errors == stats.env_rebuilds == len(faults) >= 2
        assert stats.dropped_on_error == len(faults) - build_faults >= 1
        assert all("InjectedFault" in e.traceback and e.where in ("env.step", "env.reset") for e in pool.errors)
    assert all(e.actor_id == 0 and e.env_index == 0 for e in pool.errors)
    assert stats.obs_refused == 0 and stats.policy_errors == 0
    for traj in trajs:  # every emitted trajectory is whole and consistent with the scripts
        np.testing.assert_array_equal(traj.reward, 10 * traj.obs[:-1, :, 0] + traj.obs[:-1, :, 1] + 1)
        ended = traj.terminated | traj.truncated
        np.testing.assert_array_equal(traj.final_obs[..., 0], np.where(ended, traj.obs[:-1, :, 0], 0))
        np.testing.assert_array_equal(traj.obs[1:, :, 1], np.where(ended, 0, traj.obs[:-1, :, 1] + 1))
    assert pool.envs_open == 0


@pytest.mark.parametrize("make, match", [
    (lambda k, seed: gymnasium.vector.SyncVectorEnv([fakes.ScriptedEnv] * (k + 1)),
     r"vector_env_fn\(3, seed\): expected a vector environment of 3"),
    (lambda k, seed: gymnasium.vector.SyncVectorEnv([fakes.ScriptedEnv] * k, autoreset_mode=AutoresetMode.DISABLED),
     "autoreset mode NEXT_STEP or SAME_STEP"),
    (lambda k, seed: gymnasium.vector.AsyncVectorEnv([fakes.ScriptedEnv] * k, shared_memory=False, context="fork"),
     "shared_memory=True"),
])
def test_a_vector_env_the_actor_cannot_play_stops_the_pool(make, match):
    with scripted_service() as svc:
        with rlbatch.ActorPool(None, svc, num_actors=1, unroll_length=T, envs_per_actor=K,
                               vector_env_fn=make) as pool:
            with pytest.raises(rlbatch.PoolStopped, match=match):
                pool.get(timeout=30)
        assert pool.envs_open == 0


def test_env_fn_and_vector_env_fn_are_exclusive():
    with pytest.raises(ValueError, match="exactly one of env_fn and vector_env_fn, got both"):
        rlbatch.ActorPool("CartPole-v1", object(), 1, 4, vector_env_fn=scripted_vector())
    with pytest.raises(ValueError, match="got neither"):
        rlbatch.ActorPool(None, object(), 1, 4)


def cartpole_step(obs, action):
    """CartPole-v1's dynamics (gymnasium's, Euler integration), to check recorded transitions."""
    x, x_dot, theta, theta_dot = (obs[..., i].astype(np.float64) for i in range(4))
    force = np.where(action == 1, 10.0, -10.0)
    cos, sin = np.cos(theta), np.sin(theta)
    temp = (force + 0.05 * theta_dot ** 2 * sin) / 1.1
    theta_acc = (9.8 * sin - cos * temp) / (0.5 * (4.0 / 3.0 - 0.1 * cos ** 2 / 1.1))
    x_acc = temp - 0.05 * theta_acc * cos / 1.1
    return np.stack([x + 0.02 * x_dot, x_dot + 0.02 * x_acc, theta + 0.02 * theta_dot, theta_dot + 0.02 * theta_acc],
                    axis=-1)


def cartpole_service():
    def apply(params, obs, key):  # deterministic: push towards the pole's lean, off by one so episodes end
        return (obs[:, 2] > 0.05).astype(np.int32), {}

    return rlbatch.PolicyService(apply, {}, example_obs=np.zeros(4, np.float32), buckets=(4, 8), max_delay=0.001)


def test_envpool_cartpole_episodes_through_the_pool():
    envpool = pytest.importorskip("envpool")
    n, k, T = 12, 4, 16

    def vector_env_fn(k, seed):
        return envpool.make("CartPole-v1", env_type="gymnasium", num_envs=k, seed=seed)

    trajs, pool = run_pool(n, T=T, k=k, service=cartpole_service, vector_env_fn=vector_env_fn)
    ended = np.concatenate([traj.terminated | traj.truncated for traj in trajs])
    obs = np.concatenate([traj.obs[:-1] for traj in trajs])
    next_obs = np.concatenate([traj.obs[1:] for traj in trajs])
    final_obs = np.concatenate([traj.final_obs for traj in trajs])
    action = np.concatenate([traj.action for traj in trajs])
    assert ended.sum() >= 2 * k and ended.any(axis=0).all()
    assert not np.concatenate([traj.truncated for traj in trajs]).any()  # no episode reaches 500 steps
    # Every recorded step is one CartPole step of its own column: no reset step, no column mix-up.
    stepped = cartpole_step(obs, action)
    np.testing.assert_allclose(np.where(ended[..., None], final_obs, next_obs), stepped, atol=1e-4)
    # An episode ends where CartPole terminates; the next observation is a new episode's first.
    last = final_obs[ended]
    assert ((np.abs(last[:, 2]) > 0.2094) | (np.abs(last[:, 0]) > 2.4)).all()
    assert (np.abs(next_obs[ended]) <= 0.05).all() and (final_obs[~ended] == 0).all()
    # Episode returns are the environment's own: +1 a step, so each return is its length.
    episodes = pool.episodes
    assert len(episodes) >= ended.sum() and all(r == n_steps > 0 for r, n_steps in episodes)
    assert (np.concatenate([traj.reward for traj in trajs]) == 1).all()
    # Columns are seeded apart: their first observations differ.
    assert len({tuple(row) for row in trajs[0].obs[0]}) == k


def test_envpool_seeds_follow_the_pool_seed():
    envpool = pytest.importorskip("envpool")

    def first_obs(seed):
        made = []

        def vector_env_fn(k, s):
            made.append(s)
            return envpool.make("CartPole-v1", env_type="gymnasium", num_envs=k, seed=s)

        trajs, _ = run_pool(1, T=2, k=2, service=cartpole_service, seed=seed, vector_env_fn=vector_env_fn)
        return made, trajs[0].obs[0]

    made, obs = first_obs(7)
    assert made == [7]
    again = first_obs(7)[1]
    np.testing.assert_array_equal(obs, again)
    assert not np.array_equal(obs, first_obs(8)[1])


def test_a_refused_observation_rebuilds_the_vector_env_and_the_actor_plays_on():
    builds = itertools.count()

    def corrupt_column_1(env, j):  # a new corruption seed per build, so that some builds emit trajectories
        return fakes.CorruptObservations(env, p_nan=0.05, seed=next(builds)) if j == 1 else env

    with scripted_service(check_finite=True) as svc:
        with rlbatch.ActorPool(None, svc, num_actors=1, unroll_length=T, envs_per_actor=K,
                               vector_env_fn=scripted_vector(wrap=corrupt_column_1)) as pool:
            trajs = []
            while pool.stats.obs_refused < 4:
                trajs.append(pool.get(timeout=30))
            trajs += [pool.get(timeout=30) for _ in range(3)]  # and it plays on
        stats = pool.stats
    assert stats.env_errors == stats.env_rebuilds == stats.obs_refused >= 4  # one column at a time
    assert 0 < stats.dropped_on_error <= stats.obs_refused and stats.policy_errors == 0
    for fault in pool.errors:
        assert fault.where == "env.observation" and fault.env_index == 1
        assert re.search(r"actor 0: the policy refused observations of its vector environment: environment 1: "
                         r"expected finite values", fault.error)
    for traj in trajs:  # what was emitted is whole, finite and follows the scripts
        assert np.isfinite(traj.obs).all()
        np.testing.assert_array_equal(traj.reward, 10 * traj.obs[:-1, :, 0] + traj.obs[:-1, :, 1] + 1)
    assert pool.envs_open == 0


def test_a_vector_env_whose_first_observations_never_fit_stops_the_pool_at_once():
    def make(k, seed):
        return gymnasium.vector.SyncVectorEnv([functools.partial(fakes.ScriptedEnv, obs_dim=3)] * k)

    with scripted_service(check_finite=True) as svc:
        with rlbatch.ActorPool(None, svc, num_actors=2, unroll_length=T, envs_per_actor=K, vector_env_fn=make) as pool:
            with pytest.raises(rlbatch.PoolStopped, match=r"^actor \d: the first observations of a newly built vector "
                                                          r"environment do not fit the policy: environment [03]: "
                                                          r"expected an observation float32\[2\], got float32\[3\]"):
                pool.get(timeout=30)
            assert not pool.running
        stats = pool.stats
    assert stats.trajectories == 0 and stats.env_rebuilds == 0 and stats.actors_running == 0
    assert pool.errors and all(fault.where == "env.observation" for fault in pool.errors)
    assert pool.envs_open == 0
