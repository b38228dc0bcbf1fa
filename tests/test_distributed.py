"""rlbatch.distributed: a fleet of actor processes on Ray feeding the Trainer.

The pure parts (ProcessRecord, ParamLink, GroupSpec, split_group) are tested without Ray; the rest
runs on one Ray instance per module: a simulated two-node cluster (ray.cluster_utils.Cluster) on
this machine, so that the last test can remove a node.
"""
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import jax.numpy as jnp
import numpy as np
import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

import rlbatch
from rlbatch.distributed import ActorFleet, ActorProcess, TrajectoryRefused
from rlbatch.distributed.cluster import local_only
from rlbatch.distributed.records import ParamLink, ProcessRecord, ProcessReport, recent_means
from rlbatch.distributed.spec import GroupSpec, split_group
from tests.conftest import wait_until

OBS = np.zeros(4, np.float32)  # CartPole-v1
T = 8


def apply(params, obs, key):
    """Always pushes left; its extras carry the parameter w, so a trajectory shows which
    parameters chose each step."""
    return jnp.zeros(obs.shape[0], jnp.int32), {"w": jnp.broadcast_to(params["w"], obs.shape[:1])}


def params_of(version):
    return {"w": jnp.float32(version)}


def make_fleet(**kw):
    options = dict(num_processes=2, num_actors=4, unroll_length=T, group_size=2, buckets=(4, 8),
                   max_delay=0.001, pool_options={"max_queue": 16}, process_cpus=1)
    options.update(kw)
    return ActorFleet("CartPole-v1", apply, params_of(0), example_obs=OBS, **options)


def report(token=("n", 1), steps=0, trajectories=0):
    return ProcessReport(token=token, env_steps=steps, elapsed=1.0, trajectories=trajectories,
                         episodes=steps // 10, recent_return_mean=10.0, recent_length_mean=10.0,
                         recent_count=min(steps // 10, 100), env_errors=0,
                         policy_errors=0, dropped_on_error=0, actors_running=1, recent_errors=())


# ---------------------------------------------------------------------- without Ray


def test_import_rlbatch_does_not_import_ray():
    out = subprocess.run([sys.executable, "-c", "import sys, rlbatch; print('ray' in sys.modules)"],
                         capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "False"


def test_without_ray_the_package_says_which_extra_to_install():
    code = ("import sys; sys.modules['ray'] = None  # as if Ray were not installed\n"
            "try:\n    import rlbatch.distributed\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "pip install 'rlbatch[ray]'" in out.stdout


def test_process_record_counts_a_restart_by_its_new_incarnation_and_what_the_old_one_lost():
    record = ProcessRecord(0)
    assert not record.report(report(("n", 1), steps=100, trajectories=10), received=4)
    assert not record.report(report(("n", 1), steps=120, trajectories=12), received=2)
    assert record.restarts == 0 and record.lost == 0
    assert record.report(report(("n", 2), steps=30, trajectories=2), received=2)  # the new incarnation
    assert record.restarts == 1 and record.lost == 6  # finished 12, received 6
    assert not record.report(report(("n", 1), steps=100, trajectories=10), received=2)  # a late group
    assert record.restarts == 1 and record.lost == 4 and record.received == 10
    stats = record.stats(alive=True)
    assert stats.env_steps == 150 and stats.pid == 2 and stats.restarts == 1 and stats.trajectories_lost == 4
    assert stats.trajectories_finished == 14 and stats.alive


def test_process_record_counts_the_restart_of_an_incarnation_that_never_answered():
    record = ProcessRecord(0)
    record.interrupted()  # calls failed: the first incarnation died before it answered
    assert record.seen(("n", 2)) and record.restarts == 1
    record.interrupted()  # a late failure of the same death, after the new one answered
    assert not record.seen(("n", 2)) and record.restarts == 1
    assert record.seen(("n", 3)) and record.restarts == 2


def test_process_record_dead_for_good_counts_what_it_lost_once():
    record = ProcessRecord(0)
    record.report(report(("n", 1), trajectories=5), received=2)
    assert record.died_for_good() and not record.died_for_good()
    assert record.lost == 3 and record.restarts == 0
    assert not record.stats(alive=True).alive


def test_the_fleet_recent_return_weights_each_process_window_by_its_episodes():
    a = report(("n", 1), steps=1000)._replace(recent_return_mean=10.0, recent_length_mean=10.0, recent_count=100)
    b = report(("n", 2), steps=1000)._replace(recent_return_mean=40.0, recent_length_mean=40.0, recent_count=50)
    assert recent_means([a, b, None]) == (20.0, 20.0)
    assert all(np.isnan(recent_means([None, b._replace(recent_count=0)])))


def test_param_link_sends_one_update_at_a_time_and_never_an_older_version():
    link = ParamLink(has=0)
    assert link.wants(1)
    link.sent(1)
    assert not link.wants(3)  # one in flight: the newest goes when it is confirmed
    link.confirmed(1)
    assert link.wants(3) and not link.wants(1)
    link.sent(3)
    link.confirmed(3)
    assert not link.wants(2) and not link.wants(3)
    link.reset(0)  # a restarted process has its constructor's parameters
    assert link.wants(3)


def test_group_spec_refuses_a_wrong_dtype_naming_the_process_and_split_gives_the_trajectories_back():
    spec = GroupSpec(apply, params_of(0), OBS, unroll_length=T, width=1, group_size=2)
    rng = np.random.default_rng(0)
    trajectories = [rlbatch.Trajectory(
        obs=rng.normal(size=(T + 1, 4)).astype(np.float32), action=np.zeros(T, np.int32),
        reward=np.ones(T, np.float32), terminated=np.zeros(T, bool), truncated=np.zeros(T, bool),
        final_obs=np.zeros((T, 4), np.float32), extras={"w": np.zeros(T, np.float32)},
        policy_version=np.full(T, 1, np.int64), episode_id=np.arange(T, dtype=np.int64), actor_id=a)
        for a in (3, 4)]
    group = rlbatch.stack_trajectories(trajectories)
    spec.check(group, "process 1", (0, 1))
    back = split_group(group, 2, 1)
    for got, want in zip(back, trajectories):
        assert got.actor_id == want.actor_id
        np.testing.assert_array_equal(got.obs, want.obs)
        np.testing.assert_array_equal(got.policy_version, want.policy_version)
    with pytest.raises(TrajectoryRefused, match=r"process 1 sent a trajectory whose reward is float64\[8, 2\], "
                                                r"expected float32\[8, 2\]"):
        spec.check(group._replace(reward=group.reward.astype(np.float64)), "process 1", (0, 1))
    with pytest.raises(TrajectoryRefused, match=r"obs is float32\[9, 2, 3\], expected float32\[9, 2, 4\]"):
        spec.check(group._replace(obs=group.obs[..., :3]), "process 1", (0, 1))
    with pytest.raises(TrajectoryRefused, match=r"policy versions 1..1, expected versions in 0..0"):
        spec.check(group, "process 1", (0, 0))


# ---------------------------------------------------------------------- on Ray

_SELF_STARTED = """
import json, psutil, ray
from tests.test_distributed import make_fleet
with make_fleet(num_processes=1) as fleet:
    fleet.get(timeout=60)
    started = ray.is_initialized()
    procs = psutil.Process().children(recursive=True)
    listening = {c.laddr.ip for p in procs + [psutil.Process()] for c in p.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}
gone, alive = psutil.wait_procs(procs, timeout=20)
print(json.dumps([started, ray.is_initialized(), sorted(listening), [p.name() for p in alive]]))
"""


_CTRL_C = """
import os, signal, threading
from tests.test_distributed import make_fleet
fleet = make_fleet(num_processes=1, unroll_length=10**6).start()  # no trajectory for a long while
threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    fleet.get()
except KeyboardInterrupt:
    print("interrupted", fleet.stop())
"""


def test_ctrl_c_reaches_a_get_waiting_inside_ray_and_the_fleet_then_stops():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _CTRL_C], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.stdout.strip().splitlines()[-1:] == ["interrupted True"], out.stderr[-3000:]


def test_a_fleet_that_starts_ray_listens_on_loopback_only_and_leaves_no_process():
    """In a fresh interpreter (the module's cluster runs here): the fleet starts Ray itself."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _SELF_STARTED], capture_output=True, text=True, cwd=root,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    started, initialized, listening, alive = json.loads(out.stdout.strip().splitlines()[-1])
    assert started and not initialized
    assert listening and set(listening) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening
    assert alive == []



@pytest.fixture(scope="module")
def cluster():
    with local_only():
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
        c.add_node(num_cpus=2)
        ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


def _gone(pids) -> bool:
    def dead(pid):
        try:
            # Exited: a zombie, or dead ("X": being reaped by its parent, the raylet, right now).
            return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
        except psutil.NoSuchProcess:
            return True
    return all(dead(p) for p in pids)


def _trajectories(fleet, seconds):
    """The fleet's trajectories for up to `seconds` (a bound on a wait, not a timing assertion)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        yield fleet.get(timeout=max(0.1, end - time.monotonic()))


class RecordingLearner:
    """A learner whose update counts and records what it was given."""

    def __init__(self, fail_on=None, interrupt_on=None):
        self.fail_on, self.interrupt_on = fail_on, interrupt_on
        self.batches = []

    def learner(self):
        def init(key, example_obs, action_space):
            return params_of(0)

        def update(state, batch):
            n = int(state["w"]) + 1
            if n == self.fail_on:
                raise ValueError("learner bug")
            if n == self.interrupt_on:
                raise KeyboardInterrupt
            self.batches.append(batch)
            return params_of(n), {"loss": jnp.float32(0)}

        return rlbatch.Learner(init, update, lambda s: s, rlbatch.Policy(init, apply))


def test_a_fleet_of_two_processes_feeds_the_trainer_and_parameters_reach_both(cluster):
    recorder = RecordingLearner()
    fleet = make_fleet()
    assert isinstance(fleet, rlbatch.TrajectorySource) and isinstance(fleet, rlbatch.PolicySink)
    trainer = rlbatch.Trainer(recorder.learner(), fleet, fleet, state=params_of(0), batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Until both processes delivered and played with new parameters (capped: never forever).
        both = lambda p: p.updates >= 10 and min(q.params_version for q in fleet.stats.processes) >= 2  # noqa: E731
        result = trainer.run(until=both, max_seconds=90, progress=False)
    # The Trainer warns if the fleet did not stop in time; the fleet says why in its errors.
    assert not [w for w in caught if "did not stop" in str(w.message)], fleet.errors
    assert result.stop_reason == "condition" and fleet.version == result.updates
    for batch in recorder.batches:
        # The parameters behind every step are the version the step is labelled with.
        np.testing.assert_array_equal(batch.extras["w"], batch.policy_version)
    seen = np.concatenate([b.policy_version.ravel() for b in recorder.batches])
    actors = np.concatenate([b.actor_id for b in recorder.batches])
    assert seen.max() >= 2 and set(actors // 4) <= {0, 1}
    stats = fleet.stats
    assert [p.trajectories > 0 and p.params_version >= 1 for p in stats.processes] == [True, True]
    assert stats.env_steps >= result.samples_trained and stats.trajectory_bytes > 0 and stats.param_bytes > 0
    assert stats.restarts == 0 and stats.trajectories_refused == 0
    assert stats.episodes == sum(p.episodes for p in stats.processes) > 0 and 8 <= stats.recent_length_mean <= 100


@pytest.mark.parametrize("placement", ["local", "server"])
def test_both_placements_give_trajectories_of_the_pool_shapes_with_fleet_versions(cluster, placement):
    with make_fleet(envs_per_actor=2, placement=placement) as fleet:
        first = fleet.get(timeout=60)
        assert first.obs.shape == (T + 1, 2, 4) and first.obs.dtype == np.float32
        assert first.action.shape == (T, 2) and first.reward.shape == (T, 2)
        assert first.extras["w"].shape == (T, 2) and first.policy_version.shape == (T, 2)
        assert 0 <= first.actor_id < 8
        version = fleet.update_params(params_of(7))
        for _ in range(400):
            traj = fleet.get(timeout=60)
            if traj.policy_version.min() == version:
                break
        np.testing.assert_array_equal(traj.extras["w"], np.full((T, 2), 7.0, np.float32))
        ids = {int(t.episode_id[0, 0]) >> 32 for t in [fleet.get(timeout=60) for _ in range(16)]}
        assert ids <= set(range(16))  # environment indices unique across the fleet
    assert fleet.stop()


def test_pinned_processes_keep_their_threads_on_a_cpu_each_apply_jax_options_and_still_play(cluster, tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    cache = tmp_path / "jax-cache"
    options = {"jax_compilation_cache_dir": str(cache), "jax_persistent_cache_min_compile_time_secs": 0.0,
               "jax_persistent_cache_min_entry_size_bytes": 0}
    with make_fleet(pin_python=True, sync_cpu_dispatch=True, jax_options=options) as fleet:
        info = sorted(fleet.process_info(), key=lambda i: i["index"])
        assert [i["python_cpus"] for i in info] == [[cpus[i % len(cpus)]] for i in range(2)]
        # Each process set JAX's CPU runtime up before its JAX started (it would say if too late).
        assert all(i["cpu_runtime"] == "JAX CPU runtime: synchronous dispatch, one thread per computation"
                   for i in info), info
        traj = fleet.get(timeout=60)
        assert traj.action.shape == (T,) and np.isfinite(traj.reward).all()
    assert cache.is_dir() and any(cache.iterdir())  # the processes' compiled buckets, cached there


class WrongDtypeProcess(ActorProcess):
    """Process 1 sends rewards as float64: bad data the fleet must refuse."""

    def next_group(self):
        group, rep = super().next_group()
        if self.index == 1:
            group = group._replace(reward=group.reward.astype(np.float64))
        return group, rep


def test_bad_trajectories_are_refused_naming_their_process_and_never_handed_out(cluster):
    with make_fleet(process_class=WrongDtypeProcess) as fleet:
        got = []
        for traj in _trajectories(fleet, seconds=60):
            got.append(traj)
            if fleet.stats.processes[1].trajectories_refused >= 2:
                break
        assert all(t.actor_id < 4 and t.reward.dtype == np.float32 for t in got)  # process 0's only
        assert fleet.stats.processes[1].trajectories_refused >= 2 and fleet.stats.processes[1].trajectories == 0
        refusals = [f for f in fleet.errors if f.where == "trajectory"]
        assert refusals and all(f.process == 1 for f in refusals)
        assert refusals[0].error.startswith("process 1 (pid ") and "reward is float64[8, 2]" in refusals[0].error


def test_a_killed_process_is_restarted_gets_the_newest_parameters_and_its_losses_are_counted(cluster):
    with make_fleet(fetches_per_process=1) as fleet:
        fleet.get(timeout=60)
        version = fleet.update_params(params_of(5))
        info = fleet.process_info()
        old = info[0]["pid"]
        assert all(i["python_cpus"] == sorted(os.sched_getaffinity(0)) for i in info)  # not pinned by default
        assert all(i["cpu_runtime"] is None for i in info)  # nor JAX's CPU runtime touched

        def backlog():
            fleet.refresh_stats()
            p = fleet.stats.processes[0]
            return p.trajectories_finished - p.trajectories >= 6
        wait_until(backlog, timeout=30)
        os.kill(old, signal.SIGKILL)
        fresh = None
        for traj in _trajectories(fleet, seconds=60):
            p = fleet.stats.processes[0]
            if p.restarts == 1 and p.pid != old and traj.actor_id < 4 and traj.policy_version.min() == version:
                fresh = traj
                break
        assert fresh is not None, f"no trajectory of the restarted process 0 with version {version}: {fleet.stats}"
        np.testing.assert_array_equal(fresh.extras["w"], np.full(T, 5.0, np.float32))
        stats = fleet.stats
        assert stats.processes[0].trajectories_lost >= 6 - 2  # at most a group in flight arrived late
        assert stats.processes[1].restarts == 0 and stats.restarts == 1
        assert any(f.where == "process" and f.process == 0 for f in fleet.errors)
    assert _gone([old])


@pytest.mark.parametrize("how", ["fails", "is interrupted"])
def test_a_trainer_that_fails_or_is_interrupted_stops_the_fleet_and_leaves_no_process(cluster, how):
    learner = RecordingLearner(**({"fail_on": 3} if how == "fails" else {"interrupt_on": 3})).learner()
    fleet = make_fleet()
    trainer = rlbatch.Trainer(learner, fleet, fleet, state=params_of(0), batch_size=2)
    fleet.start()
    pids = [p["pid"] for p in fleet.process_info()]
    if how == "fails":
        with pytest.raises(ValueError, match="learner bug"):
            trainer.run(total_steps=10**9, progress=False)
    else:
        assert trainer.run(total_steps=10**9, progress=False).stop_reason == "interrupted"
    assert not fleet.running and _gone(pids)
    with pytest.raises(rlbatch.PoolStopped, match="the fleet was stopped"):
        for _ in range(100):  # the trajectories received before the stop come first
            fleet.get(timeout=1)
    assert fleet.stop()  # a second stop is harmless


def test_a_lost_node_restarts_its_processes_on_the_other_and_the_run_goes_on(cluster):
    head = ray.get_runtime_context().get_node_id()
    with make_fleet() as fleet:
        fleet.get(timeout=60)
        info = fleet.process_info()
        moved = [p["index"] for p in info if p["node_id"] != head]
        assert moved, f"expected a process on the second node, got {info}"
        cluster.remove_node(cluster.list_all_nodes()[1])
        for traj in _trajectories(fleet, seconds=60):
            procs = fleet.stats.processes
            if all(procs[i].restarts >= 1 and procs[i].node_id == head for i in moved) and traj.actor_id // 4 in moved:
                break
        assert all(fleet.stats.processes[i].node_id == head for i in moved)
    assert fleet.stop()
