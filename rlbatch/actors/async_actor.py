"""AsyncVectorActor: one actor thread playing an EnvPool in its send/recv mode (the Sebulba loop).

The actor owns n environments (`envs_per_actor`), b of which (`async_batch_size`) come back per
recv. Each step: `recv` the b that finished first, send their b observations to the policy as
ONE request (rows in the order of the recv's env ids), `send` the b actions back to those ids. The
n columns advance at their own pace in a `ColumnStore` (rlbatch.actors.columns); every time b of
them hold T steps, a trajectory of width b goes to the pool's queue: obs [T+1, b, ...], every other
field [T, b, ...], so a learner's batch shape never changes.

A row whose episode ended with this recv (its observation is the episode's last) is still in the
request, so that every request has b rows and the policy service sees one shape (one compiled
bucket); its action and outputs are not recorded, and EnvPool ignores the action (it resets that
environment). The autoreset mapping is in rlbatch.actors.async_slot.

Recurrent policies: the state is kept per environment id, [n, ...]; the b rows of a recv are
gathered into the request and the new rows scattered back; a row goes back to the policy's
example_state when its episode ends (so its next episode starts from it), and every row when the
EnvPool is rebuilt.

Faults, as other vector environments: a raising recv or send, or a last observation of the wrong
shape, rebuilds the EnvPool; every column's unfinished segment is dropped and counted in
`dropped_on_error` (one per column that held a transition: a column is 1/b of a trajectory);
complete columns waiting for their group are kept. A refused observation rebuilds it too (its
environments were not sent actions), unless all of the refused rows are the first observations
of a newly built EnvPool: then the pool stops with a message. A policy error is retried with
back-off on the same request (the other environments stay in flight).

Stop: the loop checks the pool's stop event every step; recv never waits for long since every
environment is in flight whenever it is called (see async_slot), and a queue that is stopped
refuses the put that would block.
"""
from __future__ import annotations

import time

import gymnasium
import jax
import numpy as np

from rlbatch.actors.actor import Actor, ActorSetup, _Misconfigured
from rlbatch.actors.async_slot import AsyncVectorSlot
from rlbatch.actors.columns import ColumnStore
from rlbatch.actors.env_slot import EnvFault, StopRequested
from rlbatch.actors.policy_io import PolicyRequests
from rlbatch.actors.stats import ActorCounters
from rlbatch.errors import InvalidRequest, ServiceClosed

__all__ = ["AsyncVectorActor"]

_clock = time.perf_counter


def _take(tree, index):
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[index], tree)


class AsyncVectorActor(Actor):
    """Actor `actor_id` of a pool: environments actor_id * n ... actor_id * n + n - 1, b per step.

    Actor's `run` (registering, the fault records, closing) and back-off are shared; the loop, the
    environment side and the trajectory store are this class's own.
    """

    def __init__(self, actor_id: int, setup: ActorSetup, counters: ActorCounters):
        self.actor_id = actor_id
        self._setup = setup
        self._counters = counters
        n, b = setup.envs_per_actor, setup.async_batch_size
        self._n, self._b = n, b
        self._slot = AsyncVectorSlot(setup.make_vector_env, actor_id * n, n, b, actor_id, seed=setup.seed,
                                     num_envs=setup.num_envs, max_backoff=setup.max_backoff, stop=setup.stop,
                                     counters=counters, faults=setup.faults, episodes=setup.episodes)
        self._store = ColumnStore(setup.unroll_length, n, b, actor_id, actor_id * n)
        self._requests = PolicyRequests(getattr(setup.policy, "example_obs", None), b)
        example_state = getattr(setup.policy, "example_state", None)
        self._state_row = None if example_state is None else jax.tree_util.tree_map(np.asarray, example_state)
        self._state = None  # [n, ...] per environment id, for a recurrent policy

    def _open_envs(self) -> None:
        self._slot.open()
        self._reset_state()

    def _close_envs(self) -> None:
        self._slot.close()

    def _play(self, caller) -> None:
        setup, counters, slot, store = self._setup, self._counters, self._slot, self._store
        stop, b = setup.stop, self._b
        to_env = None  # known from the first action the policy returns
        pending = None  # (ids, obs, ended) of a recv whose request the policy has not answered
        failures = 0  # policy errors in a row
        while not stop.is_set():
            if pending is None:
                t0 = _clock()
                try:
                    pending = slot.recv(store)
                except EnvFault as fault:
                    counters.env_time += _clock() - t0
                    self._recover(fault)
                    continue
                counters.env_time += _clock() - t0
                counters.steps += slot.transitions
            ids, obs, ended = pending
            t0 = _clock()
            try:
                request = self._requests.request(obs)  # plain arrays, as for every vector environment
                if self._state is None:
                    out = caller(request)
                else:
                    state = _take(self._state, ids)
                    out = caller(request, state if b > 1 else _take(state, 0))
            except InvalidRequest as refusal:
                counters.policy_wait_time += _clock() - t0
                self._recover_refused_rows(refusal, ids, obs)
                pending = None
                continue
            except ServiceClosed:
                raise
            except Exception as e:  # noqa: BLE001 - a policy fault: record, back off, retry
                counters.policy_wait_time += _clock() - t0
                failures += 1
                self._back_off(e, failures)
                continue
            t1 = _clock()
            counters.policy_wait_time += t1 - t0
            failures = 0
            pending = None
            action, extras = out[0], out[1]
            if b == 1:  # a request of one observation gets outputs without a row axis
                request, action, extras = _take(request, None), np.asarray(action)[None], _take(extras, None)
            if to_env is None:
                to_env = self._actions_fn()
            keep = ~ended
            if ended.any():
                store.record_policy(ids[keep], _take(request, keep), np.asarray(action)[keep], _take(extras, keep),
                                    out.version)
            else:
                store.record_policy(ids, request, action, extras, out.version)
            if self._state is not None:
                self._scatter_state(out[2], ids, keep)
            try:
                slot.send(to_env(action), ids)
            except EnvFault as fault:
                counters.env_time += _clock() - t1
                self._recover(fault)
                continue
            now = _clock()
            counters.env_time += now - t1
            counters.last_step = now
            for trajectory in store.pop_finished():
                q0 = _clock()
                if not setup.queue.put(trajectory, caller):
                    raise StopRequested
                counters.queue_wait_time += _clock() - q0
                counters.trajectories += 1

    def _actions_fn(self):
        space = self._slot.single_action_space
        if isinstance(space, gymnasium.spaces.Box):
            low, high = space.low, space.high
            # As env_actions_fn: the environment gets the clipped action, the trajectory the sample.
            return lambda x: np.clip(x, low, high)
        return np.asarray

    # ------------------------------------------------------------------ recurrent state

    def _reset_state(self) -> None:
        if self._state_row is not None:
            self._state = jax.tree_util.tree_map(lambda x: np.repeat(x[None], self._n, axis=0), self._state_row)

    def _scatter_state(self, new_state, ids: np.ndarray, keep: np.ndarray) -> None:
        """New rows back to their environment ids; the rows whose episode ended back to the start."""
        if self._b == 1:
            new_state = _take(new_state, None)

        def scatter(rows, new, initial):
            rows[ids[keep]] = np.asarray(new)[keep]
            rows[ids[~keep]] = initial

        jax.tree_util.tree_map(scatter, self._state, new_state, self._state_row)

    # ------------------------------------------------------------------ faults

    def _recover(self, fault: EnvFault) -> None:
        """Rebuilds the EnvPool after `fault`, dropping every unfinished column."""
        self._counters.dropped_on_error += self._store.drop_unfinished()
        self._slot.recover(fault)
        self._reset_state()

    def _recover_refused_rows(self, refusal: InvalidRequest, ids: np.ndarray, obs) -> None:
        """Blames the rows that do not fit and rebuilds the EnvPool; _Misconfigured if they are all
        first observations of a newly built one."""
        slot = self._slot
        blamed = self._requests.refused_columns(list(_take(obs, r) for r in range(len(ids))))
        blamed_ids = [int(ids[r]) for r, _ in blamed]
        reason = "; ".join(f"environment {slot.first_index + int(ids[r])}: {why if why is not None else refusal}"
                           for r, why in blamed)
        if slot.fresh(blamed_ids):
            message = (f"actor {self.actor_id}: the first observations of a newly built EnvPool do not fit the "
                       f"policy: {reason}")
            error = InvalidRequest(message)
            error.__cause__ = refusal
            raise _Misconfigured(message, slot.first_index + blamed_ids[0], error)
        error = InvalidRequest(f"actor {self.actor_id}: the policy refused observations of its EnvPool: {reason}")
        error.__cause__ = refusal
        self._counters.dropped_on_error += self._store.drop_unfinished()
        slot.refused(error, blamed_ids)
        self._reset_state()
