"""Trainer: stopping, callbacks, checkpoints, policy lag and shutdown on every way out.

Most tests drive the loop with fakes and no threads: a scripted trajectory source, a policy
service that counts, a plain-numpy learner and a clock that only moves when a fake says so, so
every count and time in a report is known exactly. tests/test_trainer_with_actors.py runs the
real ActorPool and PolicyService (and PPO on Catch).
"""
import collections
import dataclasses

import numpy as np
import pytest

from tests.test_lag import trajectory
import rlbatch
from rlbatch.errors import PoolStopped
from rlbatch.training import PolicySink, StopReason, TrajectorySource

T = 4  # steps per scripted trajectory


# ----------------------------------------------------------------- fakes


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@dataclasses.dataclass(frozen=True)
class FakeStats:
    env_steps: int
    episodes: int
    recent_return_mean: float


class FakeSource:
    """A TrajectorySource without threads: hands out `trajectories` in order, then raises PoolStopped.

    Its stats count what was handed out: env_steps are the steps of those trajectories, episodes
    their number, and recent_return_mean the reward of the last one (the scripted trajectories'
    rewards all equal their index).
    """

    def __init__(self, trajectories, clock=None, seconds_per_get=0.0, stops_in_time=True):
        self._pending = collections.deque(trajectories)
        self._clock, self._seconds_per_get = clock, seconds_per_get
        self._stops_in_time = stops_in_time
        self.started = False
        self.start_calls = 0
        self.stop_calls = 0
        self.taken = []

    def start(self):
        self.start_calls += 1
        self.started = True
        return self

    def get(self, timeout=None):
        if not self.started:
            raise AssertionError("FakeSource.get: expected start() first")
        if self.stop_calls or not self._pending:
            raise PoolStopped("FakeSource: stopped and drained")
        if self._clock is not None:
            self._clock.advance(self._seconds_per_get)
        traj = self._pending.popleft()
        self.taken.append(traj)
        return traj

    def stop(self, timeout=10.0):
        self.stop_calls += 1
        return self._stops_in_time

    @property
    def stats(self):
        return FakeStats(env_steps=sum(t.reward.size for t in self.taken), episodes=len(self.taken),
                         recent_return_mean=float(self.taken[-1].reward.flat[0]) if self.taken else float("nan"))


class FakeService:
    """A PolicySink that keeps what it is given."""

    def __init__(self, params=None, clock=None, seconds_per_publish=0.0):
        self.version = 0
        self.params = params
        self.published = []  # (version, params)
        self.close_calls = 0
        self._clock, self._seconds_per_publish = clock, seconds_per_publish

    def update_params(self, params):
        if self._clock is not None:
            self._clock.advance(self._seconds_per_publish)
        self.version += 1
        self.params = params
        self.published.append((self.version, params))
        return self.version

    def close(self):
        self.close_calls += 1


class FakeLearner:
    """A plain-numpy learner. Its state after update n is {"w": [sum of rewards seen, n], "n": n};
    `batches` records, per update, the indices of the trajectories in the batch (their reward)."""

    def __init__(self, clock=None, seconds_per_update=0.0, fail_on=None, interrupt_on=None):
        self._clock, self._seconds_per_update = clock, seconds_per_update
        self._fail_on, self._interrupt_on = fail_on, interrupt_on
        self.batches = []
        self.states = []

    @staticmethod
    def init(key=None, example_obs=None, action_space=None):
        return {"w": np.zeros(2, np.float32), "n": np.int64(0)}

    def update(self, state, batch):
        n = int(state["n"]) + 1
        if self._clock is not None:
            self._clock.advance(self._seconds_per_update)
        if n == self._fail_on:
            raise ValueError(f"learner bug at update {n}")
        if n == self._interrupt_on:
            raise KeyboardInterrupt
        self.batches.append(batch.reward[0].astype(int).tolist())
        new = {"w": state["w"] + np.float32([batch.reward.sum(), 1]), "n": np.int64(n)}
        self.states.append(new)
        return new, {"loss": np.float32(1 / n), "batch": np.int32(batch.reward.shape[1])}

    def as_learner(self):
        def apply(params, obs, key):
            return np.zeros(len(obs), np.int32), {}

        return rlbatch.Learner(self.init, self.update, lambda s: s["w"], rlbatch.Policy(self.init, apply))


def fresh_trajectories(n):
    """n trajectories of T steps, trajectory i with reward i, all played with the first parameters."""
    return [trajectory(i, [0] * T) for i in range(n)]


def fake_loop(trajectories=None, *, clock=None, seconds_per_get=0.0, seconds_per_update=0.0,
              seconds_per_publish=0.0, learner_kw=None, stops_in_time=True, **trainer_kw):
    clock = clock or FakeClock()
    source = FakeSource(fresh_trajectories(200) if trajectories is None else trajectories, clock, seconds_per_get,
                        stops_in_time)
    service = FakeService(np.zeros(2, np.float32), clock, seconds_per_publish)
    fake = FakeLearner(clock, seconds_per_update, **(learner_kw or {}))
    trainer_kw.setdefault("batch_size", 2)
    trainer = rlbatch.Trainer(fake.as_learner(), source, service, state=fake.init(), clock=clock, **trainer_kw)
    return trainer, source, service, fake


def assert_shut_down_once(source, service):
    assert (source.stop_calls, service.close_calls) == (1, 1)


# ----------------------------------------------------------------- the interfaces


def test_the_fakes_satisfy_the_trainer_protocols():
    assert isinstance(FakeSource([]), TrajectorySource) and isinstance(FakeService(), PolicySink)
    assert not isinstance(object(), TrajectorySource) and not isinstance(object(), PolicySink)


def test_run_starts_an_unstarted_source_and_not_a_started_one():
    trainer, source, service, _ = fake_loop(fresh_trajectories(2))
    trainer.run(progress=False)
    assert source.start_calls == 1
    trainer, source, service, _ = fake_loop(fresh_trajectories(2))
    source.start()
    trainer.run(progress=False)
    assert source.start_calls == 1


# ----------------------------------------------------------------- stopping


def test_run_stops_when_until_first_holds():
    trainer, source, service, fake = fake_loop(seconds_per_update=1.0)
    seen = []

    def until(p):  # recent_return_mean is the index of the last trajectory taken: 1, 3, 5, ...
        seen.append(p.updates)
        return p.recent_return_mean >= 5

    report = trainer.run(until=until, progress=False)
    assert report.stop_reason == StopReason.CONDITION == "condition"
    assert seen == [1, 2, 3]
    assert (report.updates, report.env_steps, report.episodes) == (3, 3 * 2 * T, 6)
    assert report.solved_at_steps == 3 * 2 * T and report.solved_at_seconds == 3.0
    assert fake.batches == [[0, 1], [2, 3], [4, 5]]
    assert_shut_down_once(source, service)


def test_until_is_checked_before_the_budget():
    trainer, *_ = fake_loop()
    report = trainer.run(total_steps=2 * T, until=lambda p: True, progress=False)
    assert (report.stop_reason, report.updates, report.solved_at_steps) == ("condition", 1, 2 * T)


@pytest.mark.parametrize("total_steps, updates", [(1, 1), (2 * T, 1), (2 * T + 1, 2), (20, 3), (24, 3)])
def test_run_stops_once_total_steps_are_reached(total_steps, updates):
    trainer, source, service, _ = fake_loop()
    report = trainer.run(total_steps=total_steps, until=lambda p: p.recent_return_mean >= 1000, progress=False)
    assert report.stop_reason == StopReason.BUDGET == "budget"
    assert (report.updates, report.env_steps) == (updates, updates * 2 * T)
    assert report.solved_at_steps is None and report.solved_at_seconds is None
    assert_shut_down_once(source, service)


def test_run_stops_after_max_seconds_and_accounts_each_stage():
    # Per update: two gets of 0.25 s, an update of 1 s, a publish of 0.125 s: 1.625 s.
    trainer, source, service, _ = fake_loop(seconds_per_get=0.25, seconds_per_update=1.0, seconds_per_publish=0.125)
    report = trainer.run(max_seconds=4.0, progress=False)
    assert report.stop_reason == StopReason.TIME == "time"
    assert report.updates == 3 and report.elapsed == 3 * 1.625
    assert report.time_waiting_for_trajectories == 1.5
    assert report.time_learner_update == 3.0
    assert report.time_publish == 3 * 0.125
    assert report.steps_per_sec == 3 * 2 * T / (3 * 1.625)
    assert_shut_down_once(source, service)


def test_run_ends_when_the_source_stops():
    trainer, source, service, _ = fake_loop(fresh_trajectories(5))
    report = trainer.run(progress=False)
    assert report.stop_reason == StopReason.SOURCE_STOPPED == "pool stopped"
    assert report.updates == 2 and report.samples_trained == 4 * T  # the fifth trajectory made no batch
    assert_shut_down_once(source, service)


# ----------------------------------------------------------------- what each update reports


def test_on_update_sees_each_update_once_with_its_progress():
    trainer, source, service, _ = fake_loop(seconds_per_get=0.25, seconds_per_update=1.0, seconds_per_publish=0.125)
    seen = []
    report = trainer.run(total_steps=5 * 2 * T, on_update=seen.append, progress=False)
    expected = [rlbatch.Progress(env_steps=u * 2 * T, episodes=2 * u, recent_return_mean=float(2 * u - 1), updates=u,
                                 elapsed=u * 1.625, metrics={"loss": float(np.float32(1 / u)), "batch": 2.0})
                for u in range(1, 6)]
    assert seen == expected
    assert trainer.history == expected
    assert report.last_metrics == expected[-1].metrics
    assert (report.samples_trained, report.updates, report.recent_return_mean) == (5 * 2 * T, 5, 9.0)


def test_parameters_are_published_every_publish_every_updates():
    trainer, source, service, fake = fake_loop(publish_every=3)
    report = trainer.run(total_steps=7 * 2 * T, progress=False)
    assert report.updates == 7
    assert [v for v, _ in service.published] == [1, 2]
    np.testing.assert_array_equal(service.published[0][1], fake.states[2]["w"])  # after update 3
    np.testing.assert_array_equal(service.published[1][1], fake.states[5]["w"])  # after update 6


# ----------------------------------------------------------------- checkpoints


def test_checkpoint_every_n_updates_loads_back_exactly(tmp_path):
    path = str(tmp_path / "ckpt.npz")
    trainer, source, service, fake = fake_loop(checkpoint_path=path, checkpoint_every=2)
    on_disk = []  # what the checkpoint file holds when on_update is called

    def on_update(p):
        try:
            on_disk.append(rlbatch.load_checkpoint(path, FakeLearner.init()))
        except FileNotFoundError:
            on_disk.append(None)

    trainer.run(total_steps=5 * 2 * T, on_update=on_update, progress=False)
    assert on_disk[0] is None
    for update, (state, meta) in [(2, on_disk[1]), (2, on_disk[2]), (4, on_disk[3]), (4, on_disk[4])]:
        assert meta == {"updates": update, "env_steps": update * 2 * T}
        for key in ("w", "n"):
            np.testing.assert_array_equal(state[key], fake.states[update - 1][key], strict=True)
    state, meta = rlbatch.load_checkpoint(path, FakeLearner.init())  # the last one, written at the end
    assert meta == {"updates": 5, "env_steps": 5 * 2 * T}
    np.testing.assert_array_equal(state["w"], fake.states[4]["w"], strict=True)


def test_restore_loads_the_state_and_publishes_its_parameters(tmp_path):
    path = str(tmp_path / "c.npz")
    trainer, *_ = fake_loop(checkpoint_path=path)
    trainer.run(total_steps=3 * 2 * T, progress=False)
    fresh, source, service, fake = fake_loop([trajectory(0, [1] * T), trajectory(1, [1] * T)])
    meta = fresh.restore(path)
    assert meta["updates"] == trainer.updates == fresh.updates == 3
    assert service.version == 1
    np.testing.assert_array_equal(service.params, trainer.state["w"], strict=True)
    report = fresh.run(progress=False)  # version 1 holds 3 updates: no lag for what it played
    assert (report.updates, report.policy_lag_max, int(fresh.state["n"])) == (4, 0.0, 4)


# ----------------------------------------------------------------- policy lag


def test_max_policy_lag_drops_exactly_the_stale_trajectories():
    # batch_size 1, a publish per update: version v holds v updates. The lag of each step is the
    # number of updates done when its trajectory is taken minus its version.
    script = [
        [0, 0, 0, 0],  # taken after 0 updates: lags 0 0 0 0
        [0, 0, 1, 1],  # after 1: 1 1 0 0
        [0, 1, 1, 2],  # after 2: 2 1 1 0, stale
        [1, 1, 2, 2],  # after 2: 1 1 0 0
        [1, 2, 2, 3],  # after 3: 2 1 1 0, stale
        [0, 0, 0, 0],  # after 3: 3 3 3 3, stale
        [2, 3, 3, 3],  # after 3: 1 0 0 0
    ]
    trainer, source, service, fake = fake_loop([trajectory(i, v) for i, v in enumerate(script)], batch_size=1,
                                               max_policy_lag=1)
    report = trainer.run(progress=False)
    assert fake.batches == [[0], [1], [3], [6]]
    assert (report.stale_steps_dropped, trainer.lag.stats.stale_trajectories_dropped) == (3 * T, 3)
    assert (report.policy_lag_min, report.policy_lag_mean, report.policy_lag_max) == (0.0, 5 / 16, 1.0)
    assert report.samples_trained == trainer.lag.stats.samples == 16
    assert service.version == report.updates == 4


def test_policy_lag_counts_updates_not_versions():
    # A publish every second update: version 1 holds 2 updates, version 2 holds 4.
    script = [
        [0, 0, 0, 0],  # after 0 updates: 0 0 0 0
        [0, 0, 0, 0],  # after 1: 1 1 1 1
        [0, 0, 1, 1],  # after 2: 2 2 0 0
        [1, 1, 1, 1],  # after 3: 1 1 1 1
        [0, 1, 2, 2],  # after 4: 4 2 0 0
    ]
    trainer, source, service, fake = fake_loop([trajectory(i, v) for i, v in enumerate(script)], batch_size=1,
                                               publish_every=2)
    report = trainer.run(progress=False)
    assert report.updates == 5 and report.stale_steps_dropped == 0
    assert (report.policy_lag_min, report.policy_lag_mean, report.policy_lag_max) == (0.0, 18 / 20, 4.0)


def test_lag_statistics_are_nan_when_nothing_was_trained():
    trainer, source, service, fake = fake_loop([trajectory(0, [0] * T)])
    report = trainer.run(progress=False)
    assert report.updates == 0 and report.stop_reason == "pool stopped" and report.last_metrics == {}
    assert all(np.isnan([report.policy_lag_min, report.policy_lag_mean, report.policy_lag_max]))


# ----------------------------------------------------------------- every way out


def interrupt_on_update(n):
    def on_update(p):
        if p.updates == n:
            raise KeyboardInterrupt

    return on_update


@pytest.mark.parametrize("run_kw, learner_kw, reason, updates", [
    pytest.param(dict(total_steps=3 * 2 * T), {}, "budget", 3, id="budget"),
    pytest.param(dict(until=lambda p: p.updates == 2), {}, "condition", 2, id="until"),
    pytest.param(dict(max_seconds=2.0), {}, "time", 2, id="time"),
    pytest.param({}, {}, "pool stopped", 100, id="source stopped"),
    pytest.param(dict(on_update=interrupt_on_update(2)), {}, "interrupted", 2, id="Ctrl-C in on_update"),
    pytest.param({}, dict(interrupt_on=4), "interrupted", 3, id="Ctrl-C in the learner"),
])
def test_every_way_out_stops_the_source_closes_the_service_and_checkpoints(tmp_path, run_kw, learner_kw, reason,
                                                                           updates):
    path = str(tmp_path / "c.npz")
    trainer, source, service, fake = fake_loop(seconds_per_update=1.0, learner_kw=learner_kw, checkpoint_path=path)
    try:
        report = trainer.run(progress=False, **run_kw)
    except KeyboardInterrupt:  # escaping pytest would end the whole session instead of failing here
        pytest.fail("Trainer.run let KeyboardInterrupt out; expected a report with stop_reason 'interrupted'")
    assert (report.stop_reason, report.updates) == (reason, updates)
    assert_shut_down_once(source, service)
    assert rlbatch.load_checkpoint(path, FakeLearner.init())[1]["updates"] == updates


def test_an_exception_in_the_learner_is_raised_after_shutdown_and_a_last_checkpoint(tmp_path):
    path = str(tmp_path / "c.npz")
    trainer, source, service, fake = fake_loop(learner_kw=dict(fail_on=3), checkpoint_path=path)
    with pytest.raises(ValueError, match="learner bug at update 3"):
        trainer.run(total_steps=10**9, progress=False)
    assert trainer.updates == 2
    assert_shut_down_once(source, service)
    state, meta = rlbatch.load_checkpoint(path, FakeLearner.init())
    assert meta["updates"] == 2 and int(state["n"]) == 2


def test_an_exception_in_on_update_is_raised_after_shutdown():
    trainer, source, service, fake = fake_loop()

    def on_update(p):
        raise RuntimeError(f"callback failed at update {p.updates}")

    with pytest.raises(RuntimeError, match="callback failed at update 1"):
        trainer.run(on_update=on_update, progress=False)
    assert_shut_down_once(source, service)


def test_close_false_leaves_the_source_and_service_running():
    trainer, source, service, _ = fake_loop()
    trainer.run(total_steps=2 * T, close=False, progress=False)
    assert (source.stop_calls, service.close_calls) == (0, 0)


def test_a_source_that_does_not_stop_in_time_is_warned_about():
    trainer, source, service, _ = fake_loop(stops_in_time=False)
    with pytest.warns(RuntimeWarning, match="did not stop within its timeout"):
        trainer.run(total_steps=1, progress=False)
    assert service.close_calls == 1


# ----------------------------------------------------------------- arguments


@pytest.mark.parametrize("kw, message", [
    (dict(batch_size=0), "batch_size must be a positive int, got 0"),
    (dict(publish_every=1.0), "publish_every must be a positive int, got 1.0"),
    (dict(max_policy_lag=-1), "max_policy_lag must be an int >= 0 or None, got -1"),
    (dict(checkpoint_every=0, checkpoint_path="c.npz"), "checkpoint_every must be a positive int or None, got 0"),
    (dict(checkpoint_every=5), "checkpoint_every=5 needs a checkpoint_path, got None"),
])
def test_bad_arguments_are_refused_by_name(kw, message):
    with pytest.raises(ValueError, match=f"^Trainer: {message}$"):
        fake_loop(**kw)


def test_save_without_a_path_is_refused():
    trainer, *_ = fake_loop()
    with pytest.raises(ValueError, match="expected a path or a checkpoint_path, got neither"):
        trainer.save()
