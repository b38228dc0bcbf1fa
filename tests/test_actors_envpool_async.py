"""ActorPool with EnvPool in its asynchronous send/recv mode (rlbatch/actors/async_actor.py,
async_slot.py, columns.py): a scripted async pool's trajectories checked field by field against
each environment's script; recurrent rows per environment id; faults; real EnvPool CartPole and
Pong episodes through the pool."""
import collections
import re

import jax
import numpy as np
import pytest

import rlbatch
from rlbatch.actors.columns import ColumnStore
from tests.fakes.async_vector import ScriptedAsyncPool
from tests.test_actors import counter_service, rotated, scripted_service, scripted_steps
from tests.test_actors_vector import cartpole_service, cartpole_step

T, N, B = 4, 5, 2
SCRIPTS = [rotated(j) for j in range(3)]  # environment id j follows SCRIPTS[j % 3]


def scripted_async(b=B, made=None, **kw):
    """vector_env_fn: a ScriptedAsyncPool of n environments, b per recv; each one built is appended
    to `made`."""

    def make(n, seed):
        env = ScriptedAsyncPool(n, b, seed, SCRIPTS, **kw)
        if made is not None:
            made.append(env)
        return env

    return make


def run_pool(count, n=N, b=B, service=scripted_service, num_actors=1, **pool_kw):
    with service() as svc:
        pool = rlbatch.ActorPool(None, svc, num_actors=num_actors, unroll_length=pool_kw.pop("T", T),
                                 envs_per_actor=n, async_batch_size=b, **pool_kw)
        with pool:
            trajs = [pool.get(timeout=30) for _ in range(count)]
    return trajs, pool


def segments_by_env(trajs):
    """{env index: [(trajectory, column), ...]} in the order the trajectories were emitted."""
    out = collections.defaultdict(list)
    for traj in trajs:
        for c, env_index in enumerate(traj.episode_id[0] >> 32):
            out[int(env_index)].append((traj, c))
    return out


@pytest.mark.parametrize("inline", [False, True], ids=["queued", "inline policy"])
def test_every_column_follows_its_environments_script_field_by_field(inline):
    made = []
    trajs, pool = run_pool(12, vector_env_fn=scripted_async(made=made), inline_policy=inline)
    for traj in trajs:  # fixed width b, T steps
        assert traj.obs.shape == (T + 1, B, 2) and traj.final_obs.shape == (T, B, 2) and traj.actor_id == 0
        for name in ("action", "reward", "terminated", "truncated", "policy_version", "episode_id"):
            assert getattr(traj, name).shape == (T, B), name
        assert traj.extras["tag"].shape == (T, B)
    segments = segments_by_env(trajs)
    assert sorted(segments) == list(range(N))  # every environment's columns come out
    # The uneven recv order puts one environment twice into some trajectory: kept apart by episode_id.
    assert any(len(set(traj.episode_id[0] >> 32)) < B for traj in trajs)
    for j, cols in segments.items():
        steps = scripted_steps(*SCRIPTS[j % 3])
        for traj, c in cols:
            expected = [next(steps) for _ in range(T)]
            np.testing.assert_array_equal(traj.obs[:T, c], [e["obs"] for e in expected])
            np.testing.assert_array_equal(traj.obs[T, c], expected[-1]["next_obs"])
            np.testing.assert_array_equal(traj.reward[:, c], [e["reward"] for e in expected])
            np.testing.assert_array_equal(traj.terminated[:, c], [e["terminated"] for e in expected])
            np.testing.assert_array_equal(traj.truncated[:, c], [e["truncated"] for e in expected])
            np.testing.assert_array_equal(traj.final_obs[:, c], [e["final_obs"] for e in expected])
            np.testing.assert_array_equal(traj.extras["tag"][:, c], [e["obs"][0] * 100 + e["obs"][1] for e in expected])
            np.testing.assert_array_equal(traj.episode_id[:, c] & 0xFFFFFFFF, [e["episode"] for e in expected])
    # Episode returns are the environment's own: exactly the episodes its recvs ended.
    assert sorted(pool.episodes) == sorted(made[0].episodes) and len(made[0].episodes) >= N
    stats = pool.stats
    assert stats.num_envs == N and stats.trajectories >= 12 and stats.episodes == len(made[0].episodes)
    assert stats.env_steps >= 12 * T * B and stats.env_time > 0 and stats.policy_wait_time > 0
    assert stats.dropped_on_error == stats.env_errors == 0 and pool.envs_open == 0 and made[0].closed


def test_environment_ids_of_several_actors_are_seeded_and_indexed_apart():
    made = []
    trajs, pool = run_pool(6, num_actors=2, seed=100, vector_env_fn=scripted_async(made=made))
    assert sorted(env.seed for env in made) == [100, 100 + N]  # actor a: seed + a * n, id j: + j
    assert pool.num_envs == 2 * N
    for traj in trajs:
        env_index = traj.episode_id[0] >> 32
        assert ((env_index >= traj.actor_id * N) & (env_index < (traj.actor_id + 1) * N)).all()


def test_recurrent_rows_follow_their_environment_id_and_reset_at_episode_start():
    trajs, _ = run_pool(10, vector_env_fn=scripted_async(), service=counter_service)
    for traj in trajs:
        # The state counts the steps since the row's episode started, as the observation does.
        np.testing.assert_array_equal(traj.extras["count"], traj.obs[:T, :, 1])


def test_a_batch_of_one_environment_per_recv():
    trajs, _ = run_pool(6, b=1, vector_env_fn=scripted_async(b=1), service=counter_service)
    for traj in trajs:
        assert traj.obs.shape == (T + 1, 1, 2) and traj.action.shape == (T, 1)
        np.testing.assert_array_equal(traj.extras["count"], traj.obs[:T, :, 1])


def assert_locally_consistent(traj):
    """What any ScriptedEnv column must show, whichever pool built it: each step advances the
    observation by one, or ends the episode with final_obs one further and a first observation next."""
    ended = traj.terminated | traj.truncated
    advanced = traj.obs[:T] + [0, 1]
    np.testing.assert_array_equal(np.where(ended[..., None], traj.final_obs, traj.obs[1:]), advanced)
    assert (traj.obs[1:][ended][:, 1] == 0).all() and (traj.final_obs[~ended] == 0).all()
    np.testing.assert_array_equal(traj.reward, 10 * traj.obs[:T, :, 0] + traj.obs[:T, :, 1] + 1)


def assert_episode_ids_name_one_run_each(trajs):
    """The steps that share an episode_id are one episode's, in order: step in episode 0, 1, 2, ...
    from where they start (a rebuilt environment's episodes never continue an abandoned one's id)."""
    steps = collections.defaultdict(list)
    for traj in trajs:
        for c in range(B):  # an environment's earlier segment is in an earlier column
            for t in range(T):
                steps[int(traj.episode_id[t, c])].append(int(traj.obs[t, c, 1]))
    for episode_id, seen in steps.items():
        assert seen == list(range(seen[0], seen[0] + len(seen))), (hex(episode_id), seen)


@pytest.mark.parametrize("where", ["recv", "send"])
def test_a_raising_recv_or_send_rebuilds_the_envpool_and_drops_unfinished_columns(where):
    made, calls = [], collections.Counter()
    trajs, pool = run_pool(10, seed=3, vector_env_fn=scripted_async(made=made, calls=calls, fail_at={where: 9}))
    stats = pool.stats
    assert stats.env_errors == stats.env_rebuilds == 1 and len(made) == 2 and made[0].closed
    assert [env.seed for env in made] == [3, 3 + N]  # the rebuilt one: seed + num_envs * rebuilds
    assert 1 <= stats.dropped_on_error <= N  # unfinished columns, counted one each
    (fault,) = pool.errors
    assert fault.where == f"env.{where}" and fault.env_index == 0 and f"{where} #9" in fault.error
    for traj in trajs:  # nothing emitted spans the rebuild
        assert_locally_consistent(traj)
    assert_episode_ids_name_one_run_each(trajs)
    assert sorted(pool.episodes) == sorted(made[0].episodes + made[1].episodes)
    assert pool.envs_open == 0


def test_a_refused_observation_in_play_rebuilds_the_envpool_and_the_actor_plays_on():
    made, calls = [], collections.Counter()
    with scripted_service(check_finite=True) as svc:
        with rlbatch.ActorPool(None, svc, 1, T, envs_per_actor=N, async_batch_size=B,
                               vector_env_fn=scripted_async(made=made, calls=calls, nan_at_recv=12)) as pool:
            trajs = [pool.get(timeout=30) for _ in range(8)]
        stats = pool.stats
    assert stats.obs_refused == B and stats.env_errors == stats.env_rebuilds == 1 and len(made) == 2
    (fault,) = pool.errors
    assert fault.where == "env.observation"
    assert re.search(r"actor 0: the policy refused observations of its EnvPool: environment \d: expected finite",
                     fault.error)
    for traj in trajs:
        assert np.isfinite(traj.obs).all()
        assert_locally_consistent(traj)


def test_an_envpool_whose_first_observations_never_fit_stops_the_pool_at_once():
    with scripted_service(check_finite=True) as svc:
        with rlbatch.ActorPool(None, svc, 1, T, envs_per_actor=N, async_batch_size=B,
                               vector_env_fn=scripted_async(nan_at_recv=1)) as pool:
            with pytest.raises(rlbatch.PoolStopped, match=r"^actor 0: the first observations of a newly built EnvPool "
                                                          r"do not fit the policy: environment \d: expected finite"):
                pool.get(timeout=30)
        stats = pool.stats
    assert stats.trajectories == 0 and stats.env_rebuilds == 0 and pool.envs_open == 0


def test_an_envpool_of_another_size_stops_the_pool_with_what_was_expected():
    with scripted_service() as svc:
        with rlbatch.ActorPool(None, svc, 1, T, envs_per_actor=N, async_batch_size=B,
                               vector_env_fn=scripted_async(b=B + 1)) as pool:
            with pytest.raises(rlbatch.PoolStopped, match=r"vector_env_fn\(5, seed\): expected an EnvPool with "
                                                          r"num_envs=5, batch_size=2 .*got num_envs=5, batch_size=3"):
                pool.get(timeout=30)
        assert pool.envs_open == 0


@pytest.mark.parametrize("kw, match", [
    (dict(env_fn="CartPole-v1", async_batch_size=2), "async_batch_size needs vector_env_fn"),
    (dict(env_fn=None, vector_env_fn=scripted_async(), async_batch_size=N + 1), r"in \[1, envs_per_actor=5\], got 6"),
    (dict(env_fn=None, vector_env_fn=scripted_async(), async_batch_size=0), r"got 0"),
])
def test_async_batch_size_is_checked_when_the_pool_is_made(kw, match):
    with pytest.raises(ValueError, match=match):
        rlbatch.ActorPool(policy_service=object(), num_actors=1, unroll_length=T, envs_per_actor=N, **kw)


def test_column_store_groups_complete_columns_and_clears_their_final_observations():
    store = ColumnStore(2, 3, 2, actor_id=7, first_env_index=30)
    ids = np.array([2, 0])

    def policy(ids, t):
        obs = np.stack([[i, t] for i in ids]).astype(np.float32)
        store.record_policy(ids, obs, np.asarray(ids), {"v": obs[:, 1]}, version=t)

    policy(ids, 0)
    store.record_steps(ids, [1.0, 2.0], [False, True], [False, False], [0, 0])
    store.record_final_obs(0, np.array([9, 9], np.float32))
    policy(np.array([2]), 1)  # column 0 waits for its reset
    store.record_steps(np.array([2]), [3.0], [False], [True], [0])
    store.record_final_obs(2, np.array([8, 8], np.float32))
    policy(np.array([0, 1]), 2)  # column 0: the new episode's first observation
    store.record_steps(np.array([0]), [4.0], [False], [False], [1])
    assert store.pop_finished() == []
    policy(np.array([0, 2]), 3)  # both hold T = 2 transitions: complete, bootstrapped with this request
    (traj,) = store.pop_finished()
    assert traj.actor_id == 7
    np.testing.assert_array_equal(traj.episode_id >> 32, [[30, 32], [30, 32]])
    np.testing.assert_array_equal(traj.episode_id & 0xFFFFFFFF, [[0, 0], [1, 0]])
    np.testing.assert_array_equal(traj.obs[:, :, 1], [[0, 0], [2, 1], [3, 3]])
    np.testing.assert_array_equal(traj.reward, [[2, 1], [4, 3]])
    np.testing.assert_array_equal(traj.terminated, [[True, False], [False, False]])
    np.testing.assert_array_equal(traj.truncated, [[False, False], [False, True]])
    np.testing.assert_array_equal(traj.final_obs, [[[9, 9], [0, 0]], [[0, 0], [8, 8]]])
    np.testing.assert_array_equal(traj.policy_version, [[0, 0], [2, 1]])
    # Their next segments start with no final observation left over, at step 0.
    np.testing.assert_array_equal(store.step, [0, 0, 0])
    assert not store.final_obs.any()
    store.record_steps(np.array([0, 2]), [5.0, 6.0], [False, False], [False, False], [1, 1])
    assert store.drop_unfinished() == 2 and not store.final_obs.any()


# ---------------------------------------------------------------------- real EnvPool

envpool = pytest.importorskip("envpool")


def test_envpool_cartpole_async_episodes_through_the_pool():
    n, b, T_ = 6, 3, 16

    def vector_env_fn(n, seed):
        return envpool.make("CartPole-v1", env_type="gymnasium", num_envs=n, batch_size=b, seed=seed,
                            max_episode_steps=40)

    trajs, pool = run_pool(12, n=n, b=b, T=T_, num_actors=2, seed=11, service=cartpole_service,
                           vector_env_fn=vector_env_fn)
    assert all(traj.obs.shape == (T_ + 1, b, 4) and traj.reward.shape == (T_, b) for traj in trajs)
    cat = lambda f: np.concatenate([f(traj) for traj in trajs], axis=1)
    terminated, truncated = cat(lambda t: t.terminated), cat(lambda t: t.truncated)
    ended = terminated | truncated
    obs, next_obs, final_obs = cat(lambda t: t.obs[:-1]), cat(lambda t: t.obs[1:]), cat(lambda t: t.final_obs)
    assert terminated.any() and truncated.any() and not (terminated & truncated).any()
    # Every recorded step is one CartPole step of its own environment: no reset step, no mix-up.
    stepped = cartpole_step(obs, cat(lambda t: t.action))
    np.testing.assert_allclose(np.where(ended[..., None], final_obs, next_obs), stepped, atol=1e-4)
    assert (np.abs(next_obs[ended]) <= 0.05).all() and (final_obs[~ended] == 0).all()
    assert (cat(lambda t: t.reward) == 1).all()
    # Episode returns are the environment's own: +1 a step, so each return is its length.
    assert pool.episodes and all(r == length > 0 for r, length in pool.episodes)
    assert_episodes_logged(trajs, pool)
    assert all(length == 40 for r, length in pool.episodes if length >= 40)
    # Seeds: environment i's first observation is a synchronous EnvPool's with seed 11 + i.
    first = envpool.make("CartPole-v1", env_type="gymnasium", num_envs=2 * n, seed=11).reset()[0]
    segments = segments_by_env(trajs)  # each environment's segments in the order it played them
    assert len(segments) >= b
    for env_index, [(traj, c), *_] in segments.items():
        assert traj.episode_id[0, c] & 0xFFFFFFFF == 0
        np.testing.assert_array_equal(traj.obs[0, c], first[env_index])


def episodes_in(trajs):
    """(return, length) of every episode that ended in `trajs`, summed from their own rewards. Each
    environment's segments come out in the order it played them from its first step, so every
    episode that ended there is whole."""
    returns, lengths = collections.Counter(), collections.Counter()
    ended = []
    for traj in trajs:
        for t in range(traj.reward.shape[0]):
            for c, episode_id in enumerate(traj.episode_id[t].tolist()):
                returns[episode_id] += float(traj.reward[t, c])
                lengths[episode_id] += 1
                if traj.terminated[t, c] or traj.truncated[t, c]:
                    ended.append(episode_id)
    return sorted((returns[e], lengths[e]) for e in ended)


def assert_episodes_logged(trajs, pool):
    """Every episode the trajectories hold whole is one the pool logged, with the same return."""
    logged = collections.Counter(pool.episodes)
    held = collections.Counter(episodes_in(trajs))
    assert held and not held - logged, (held, logged)


def test_envpool_pong_async_trajectories_are_uint8_width_b_and_returns_the_envs_own():
    def apply(params, obs, key):  # random play: Pong's opponent scores within 100 steps
        return jax.random.randint(key, (obs.shape[0],), 0, 6), {}

    def vector_env_fn(n, seed):
        return envpool.make("Pong-v5", env_type="gymnasium", num_envs=n, batch_size=2, seed=seed,
                            max_episode_steps=100)

    service = lambda: rlbatch.PolicyService(apply, {}, example_obs=np.zeros((4, 84, 84), np.uint8), buckets=(2,),
                                            max_delay=0.001)
    with service() as svc:
        with rlbatch.ActorPool(None, svc, 1, 20, envs_per_actor=4, async_batch_size=2,
                               vector_env_fn=vector_env_fn) as pool:
            trajs = []
            while pool.stats.episodes < 4:
                trajs.append(pool.get(timeout=60))
    for traj in trajs:
        assert traj.obs.shape == (21, 2, 4, 84, 84) and traj.obs.dtype == np.uint8 and traj.reward.shape == (20, 2)
    truncated = np.concatenate([traj.truncated for traj in trajs], axis=1)
    assert truncated.any()  # at 100 steps
    assert any(r < 0 for r, _ in episodes_in(trajs))  # the opponent scored: returns are not all zero
    assert_episodes_logged(trajs, pool)
    assert all(length == 100 for _, length in pool.episodes)


def test_stop_returns_promptly_with_every_envpool_closed(no_thread_leak):
    def vector_env_fn(n, seed):
        return envpool.make("CartPole-v1", env_type="gymnasium", num_envs=n, batch_size=2, seed=seed)

    with cartpole_service() as svc:
        pool = rlbatch.ActorPool(None, svc, 3, 8, envs_per_actor=4, async_batch_size=2, vector_env_fn=vector_env_fn,
                                 max_queue=1).start()
        pool.get(timeout=30)  # the actors are playing, and blocked on the full queue
        assert pool.stop(timeout=10)
    assert pool.envs_open == 0 and pool.stats.actors_running == 0


class FailingRecv:
    """An EnvPool whose `fail_at`-th recv raises."""

    def __init__(self, env, fail_at: int):
        self.env, self.fail_at, self.recvs = env, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.env, name)

    def recv(self):
        self.recvs += 1
        if self.recvs == self.fail_at:
            raise RuntimeError(f"injected: recv #{self.recvs}")
        return self.env.recv()


def test_a_raising_envpool_recv_rebuilds_it_and_the_actor_plays_on():
    made = []

    def vector_env_fn(n, seed):
        made.append(seed)
        env = envpool.make("CartPole-v1", env_type="gymnasium", num_envs=n, batch_size=2, seed=seed)
        return FailingRecv(env, fail_at=30 if len(made) == 1 else 0)

    trajs, pool = run_pool(8, n=4, b=2, T=8, seed=5, service=cartpole_service, vector_env_fn=vector_env_fn)
    stats = pool.stats
    assert made == [5, 9] and stats.env_errors == stats.env_rebuilds == 1 and stats.dropped_on_error >= 1
    assert pool.errors[0].where == "env.recv" and "injected: recv #30" in pool.errors[0].error
    for traj in trajs:  # every recorded step is one CartPole step of its own environment
        ended = traj.terminated | traj.truncated
        np.testing.assert_allclose(np.where(ended[..., None], traj.final_obs, traj.obs[1:]),
                                   cartpole_step(traj.obs[:-1], traj.action), atol=1e-4)
