"""The records an ActorPool keeps: ActorFault, FaultLog, EpisodeLog, ActorStats.as_dict."""
import dataclasses
import math

import pytest

import rlbatch
from rlbatch.actors import ActorError, ActorFault
from rlbatch.actors.stats import ActorStats, EpisodeLog, FaultLog


def test_actor_fault_is_a_frozen_record_and_actor_error_names_it():
    assert ActorError is ActorFault and rlbatch.ActorError is ActorFault
    assert not issubclass(ActorFault, BaseException)
    fault = ActorFault(3, "env.step", "RuntimeError('x')", "traceback", 1.5, env_index=7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fault.where = "policy"
    assert ActorFault(3, "policy", "e", "tb", 1.5).env_index is None


def test_fault_log_records_the_exception_with_its_traceback_and_keeps_the_newest():
    log = FaultLog(maxlen=3)
    assert log.last is None and log.recent() == []
    for i in range(5):
        try:
            raise ValueError(f"fault {i}")
        except ValueError as e:
            fault = log.record(i, "env.step", e, env_index=10 + i)
    assert fault == log.last
    assert [f.actor_id for f in log.recent()] == [2, 3, 4]
    assert [f.actor_id for f in log.recent(2)] == [3, 4]
    assert fault.error == "ValueError('fault 4')" and fault.env_index == 14 and fault.where == "env.step"
    assert "raise ValueError(f\"fault {i}\")" in fault.traceback and "ValueError: fault 4" in fault.traceback


def test_episode_log_keeps_every_episode_and_a_recent_window():
    log = EpisodeLog(window=2)
    assert all(math.isnan(m) for m in log.recent_means())
    for ret, length in ((1.0, 10), (2.0, 20), (4.0, 40)):
        log.add(ret, length)
    assert log.all() == [(1.0, 10), (2.0, 20), (4.0, 40)]
    assert log.recent_means() == (3.0, 30.0)


def test_stats_as_dict_flattens_faults_and_step_ages():
    fault = ActorFault(0, "policy", "e", "tb", 2.0)
    fields = {f.name: 0 for f in dataclasses.fields(ActorStats)}
    fields.update(last_step_age=(0.5, 2.5), recent_errors=(fault,))
    d = ActorStats(**fields).as_dict()
    assert d["last_step_age"] == [0.5, 2.5] and d["last_step_age_max"] == 2.5
    assert d["recent_errors"] == [dict(actor_id=0, where="policy", error="e", traceback="tb", time=2.0, env_index=None)]
