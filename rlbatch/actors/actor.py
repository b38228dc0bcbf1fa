"""Actor: the loop of one actor thread, playing its k environments with the shared policy.

Every step the actor sends its k current observations to the policy as one request, gives each
environment slot its action and records the step in a `TrajectoryBuilder`. After T steps, the next
request, once the policy accepts it, is the trajectory's bootstrap observation obs[T]; then the
trajectory goes into the pool's queue and the request starts the next one.

Episodes end inside a step: the slot resets its environment at once, so `obs[t+1]` is the new
episode's first observation and `final_obs[t]` the old one's last, and the recurrent state of that
row (and only that row) starts over.

A `VectorActor` plays one vector environment of k sub-environments (a `VectorSlot`) in place of k
slots, with the same loop and the same trajectories; its faults rebuild the whole vector environment.

Faults, and what each costs (each is recorded as an ActorFault with the actor id):
- an environment raises in step or reset: the other environments finish the step, that one is
  rebuilt, the unfinished trajectory dropped and counted, the actor plays on;
- the policy refuses an observation (InvalidRequest): the observations that do not fit the policy's
  example are blamed (all k if none can be), their environments reset or rebuilt (see
  `EnvSlot.refused`), the unfinished trajectory dropped and counted, the actor plays on. Only a
  refused *first* observation of a newly built environment is a configuration error: the actor stops
  the whole pool at once, with a message naming what the policy expected and what came;
- the policy service raises anything else: retried after a bounded exponential back-off;
- the policy service is closed: the actor exits.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable

import gymnasium
import numpy as np

from rlbatch.actors.env_slot import EnvFault, EnvSlot, StopRequested
from rlbatch.actors.policy_io import PolicyRequests, RecurrentRows, env_actions_fn
from rlbatch.actors.queue import TrajectoryQueue
from rlbatch.actors.stats import ActorCounters, EpisodeLog, FaultLog
from rlbatch.actors.trajectory import TrajectoryBuilder
from rlbatch.actors.vector_slot import VectorSlot
from rlbatch.errors import InvalidRequest, ServiceClosed

__all__ = ["Actor", "ActorSetup", "VectorActor"]

_clock = time.perf_counter
_FIRST_BACKOFF = 0.01  # seconds before the first retry after a policy error


@dataclasses.dataclass(frozen=True)
class ActorSetup:
    """What every actor of one pool shares: its settings and the pool's records."""

    make_env: Callable[[], Any]
    policy: Any  # register() -> a caller; example_obs and example_state when it is a PolicyService
    unroll_length: int
    envs_per_actor: int
    seed: int
    num_envs: int
    max_backoff: float
    queue: TrajectoryQueue
    episodes: EpisodeLog
    faults: FaultLog
    stop: threading.Event
    halt: Callable[[str], None]  # stops the whole pool at once, with this reason for its consumer
    exited: Callable[[str], None]  # each actor calls it once as it exits, with why
    make_vector_env: Callable[[int, int], Any] | None = None  # (k, seed) -> a vector environment (VectorActor)
    async_batch_size: int | None = None  # b: environments per recv of an EnvPool in send/recv mode (AsyncVectorActor)
    inline_policy: bool = False  # each actor runs its requests in its own thread (policy.register(inline=True))


class _Misconfigured(Exception):
    """An environment's first observation does not fit the policy: no actor can play it."""

    def __init__(self, message: str, env_index: int, refusal: InvalidRequest):
        super().__init__(message)
        self.env_index, self.refusal = env_index, refusal


class Actor:
    """Actor `actor_id` of a pool: environments actor_id * k ... actor_id * k + k - 1."""

    def __init__(self, actor_id: int, setup: ActorSetup, counters: ActorCounters):
        k = setup.envs_per_actor
        self.actor_id = actor_id
        self._setup = setup
        self._counters = counters
        self._first_env_index = actor_id * k
        self._slots = [EnvSlot(setup.make_env, actor_id * k + j, j, actor_id, seed=setup.seed,
                               num_envs=setup.num_envs, max_backoff=setup.max_backoff, stop=setup.stop,
                               counters=counters, faults=setup.faults, episodes=setup.episodes)
                       for j in range(k)]
        self._requests = PolicyRequests(getattr(setup.policy, "example_obs", None), k)
        self._state_rows = RecurrentRows(getattr(setup.policy, "example_state", None), k)
        # Item j is column j. Allocated once and overwritten every step: nothing per step to allocate.
        self._obs = [None] * k  # the current observations, sent with the next request
        self._reward = [0.0] * k
        self._terminated = [False] * k
        self._truncated = [False] * k
        self._episode = [0] * k  # the episode each step belongs to, read before any reset
        self._faulted: list[EnvFault] = []  # the faults of the step in progress, recovered after it

    def run(self) -> None:
        """The thread's body: plays until the pool stops, then closes everything it opened."""
        setup = self._setup
        caller = None
        why = "the pool was stopped"
        try:
            caller = setup.policy.register(inline=True) if setup.inline_policy else setup.policy.register()
            self._open_envs()
            self._play(caller)
        except StopRequested:
            pass
        except ServiceClosed:
            why = "the policy service was closed"
        except _Misconfigured as e:
            why = str(e)
            setup.faults.record(self.actor_id, "env.observation", e.refusal, e.env_index)
            setup.halt(why)
        except BaseException as e:  # noqa: BLE001 - an actor never dies silently
            why = f"actor {self.actor_id} failed: {e!r}"
            setup.faults.record(self.actor_id, "actor", e)
        finally:
            self._counters.running = False
            if caller is not None:
                caller.close()
            self._close_envs()
            setup.exited(why)

    def _play(self, caller) -> None:
        setup, counters = self._setup, self._counters
        stop, T, k = setup.stop, setup.unroll_length, setup.envs_per_actor
        requests = self._requests
        recurrent = self._state_rows.recurrent
        state = self._state_rows.initial
        to_env = None  # known from the first action the policy returns
        builder, t = None, 0
        failures = 0  # policy errors in a row
        while not stop.is_set():
            t0 = _clock()
            try:
                request = requests.request(self._obs)
                out = caller(request) if state is None else caller(request, state)
            except InvalidRequest as refusal:
                state = self._recover_refused(refusal, state, dropping=builder is not None)
                builder = None
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
            action = out[0]
            if to_env is None:
                to_env = self._actions_fn(action)
            if builder is None or t == T:
                builder, t = self._start_trajectory(builder, request, caller), 0
            builder.record_policy(t, request, action, out[1], out.version)
            if recurrent:
                state = out[2]
            state = self._step_envs(t, to_env(action), builder, state)
            now = _clock()
            counters.env_time += now - t1
            if self._faulted:
                state = self._recover_envs(state)
                builder = None  # never emitted half-filled
                continue
            counters.steps += k
            counters.last_step = now
            t += 1

    # The hooks a VectorActor overrides: how the k columns are opened, stepped, recovered and closed.

    def _open_envs(self) -> None:
        for slot in self._slots:
            self._obs[slot.column] = slot.open()

    def _close_envs(self) -> None:
        for slot in self._slots:
            slot.close()

    def _actions_fn(self, action):
        return env_actions_fn(self._slots[0].env.action_space, action, self._setup.envs_per_actor)

    def _step_envs(self, t: int, actions, builder: TrajectoryBuilder, state):
        """Steps every slot with its action and records the step; the recurrent state, with the
        rows of episodes that ended reset. The faults of slots that failed go to `_faulted`."""
        slots, obs, faulted = self._slots, self._obs, self._faulted
        reward, terminated, truncated, episode = self._reward, self._terminated, self._truncated, self._episode
        for j in range(len(slots)):
            slot = slots[j]
            episode[j] = slot.episode
            try:
                next_obs, r, term, trunc, _ = slot.step(actions[j])
                reward[j], terminated[j], truncated[j] = r, term, trunc
                if term or trunc:
                    try:
                        builder.record_final_obs(t, j, next_obs)
                    except ValueError as e:  # a last observation of another shape than the others
                        raise EnvFault(j, "env.observation", e) from e
                    next_obs = slot.next_episode()
                    state = self._state_rows.reset(state, j)
            except EnvFault as fault:
                # The other slots still step: the policy's new state already counts this step for
                # every row, so a slot left behind would get a state one step ahead of it.
                faulted.append(fault)
                continue
            obs[j] = next_obs
        builder.record_step(t, reward, terminated, truncated, episode)
        return state

    def _recover_envs(self, state):
        """Rebuilds the environments that failed in the last step and drops the trajectory; the
        recurrent state with their rows reset."""
        faulted = self._faulted
        self._counters.steps += len(self._slots) - len(faulted)
        self._counters.dropped_on_error += 1
        for fault in faulted:
            slot = self._slots[fault.column]
            self._obs[slot.column] = slot.recover(fault)
            state = self._state_rows.reset(state, slot.column)
        faulted.clear()
        return state

    def _recover_refused(self, refusal: InvalidRequest, state, dropping: bool):
        """Blames the observations that do not fit and moves their environments on; the recurrent
        state with their rows reset. _Misconfigured if one is a new environment's first."""
        if dropping:
            self._counters.dropped_on_error += 1
        for column, why in self._requests.refused_columns(self._obs):
            slot = self._slots[column]
            reason = why if why is not None else str(refusal)
            if slot.fresh:
                message = (f"actor {self.actor_id}: the first observation of environment {slot.index} (after it "
                           f"was built) does not fit the policy: {reason}")
                error = InvalidRequest(message)
                error.__cause__ = refusal
                raise _Misconfigured(message, slot.index, error)
            error = InvalidRequest(f"actor {self.actor_id}: the policy refused the observation of environment "
                                   f"{slot.index}: {reason}")
            error.__cause__ = refusal
            self._obs[column] = slot.refused(error)
            state = self._state_rows.reset(state, column)
        return state

    def _back_off(self, error: Exception, failures: int) -> None:
        """Records a policy error and waits before the retry; StopRequested if the pool stops first."""
        self._counters.policy_errors += 1
        self._setup.faults.record(self.actor_id, "policy", error)
        delay = min(_FIRST_BACKOFF * 2.0 ** min(failures - 1, 32), self._setup.max_backoff)
        if self._setup.stop.wait(delay):
            raise StopRequested

    def _start_trajectory(self, finished: TrajectoryBuilder | None, request, caller) -> TrajectoryBuilder:
        """A new builder. `finished`, if any, holds T steps: it goes into the queue first, with the
        request the policy has just accepted as its bootstrap observation, so that no trajectory
        ends on an observation the policy would refuse. StopRequested if the pool stops first."""
        if finished is not None:
            q0 = _clock()
            if not self._setup.queue.put(finished.finish(request), caller):
                raise StopRequested
            self._counters.queue_wait_time += _clock() - q0
            self._counters.trajectories += 1
        return TrajectoryBuilder(self._setup.unroll_length, self._setup.envs_per_actor, self._obs[0], self.actor_id,
                                 self._first_env_index)


class VectorActor(Actor):
    """An actor whose k columns are the k sub-environments of one vector environment (a VectorSlot,
    see rlbatch.actors.vector_slot), built by `setup.make_vector_env(k, seed)`, instead of k EnvSlots.

    The loop is Actor's; only the environment side differs. The current observations are the vector
    environment's batched [k, ...] array. A fault in the vector environment (or a refused
    observation) rebuilds it whole: every column starts a new episode and every recurrent row over.
    """

    def __init__(self, actor_id: int, setup: ActorSetup, counters: ActorCounters):
        super().__init__(actor_id, setup, counters)
        k = setup.envs_per_actor
        self._slots = []
        self._vector = VectorSlot(setup.make_vector_env, actor_id * k, k, actor_id, seed=setup.seed,
                                  num_envs=setup.num_envs, max_backoff=setup.max_backoff, stop=setup.stop,
                                  counters=counters, faults=setup.faults, episodes=setup.episodes)

    def _open_envs(self) -> None:
        self._obs = self._vector.open()

    def _close_envs(self) -> None:
        self._vector.close()

    def _actions_fn(self, action):
        space, one = self._vector.single_action_space, self._setup.envs_per_actor == 1
        if isinstance(space, gymnasium.spaces.Box):
            low, high = space.low, space.high
            # As env_actions_fn: the environment gets the clipped action, the trajectory the sample.
            return (lambda x: np.clip(x, low, high)[None]) if one else (lambda x: np.clip(x, low, high))
        # A request of one observation gets one action; the vector environment wants a batch of one.
        return (lambda x: np.asarray(x)[None]) if one else (lambda x: x)

    def _step_envs(self, t: int, actions, builder: TrajectoryBuilder, state):
        vector = self._vector
        try:
            self._obs = vector.step(t, actions, builder)
        except EnvFault as fault:
            self._faulted.append(fault)
            return state
        for j in vector.ended:
            state = self._state_rows.reset(state, int(j))
        return state

    def _recover_envs(self, state):
        fault = self._faulted.pop()
        self._faulted.clear()
        self._counters.dropped_on_error += 1
        self._obs = self._vector.recover(fault)
        return self._state_rows.initial

    def _recover_refused(self, refusal: InvalidRequest, state, dropping: bool):
        if dropping:
            self._counters.dropped_on_error += 1
        vector = self._vector
        blamed = self._requests.refused_columns(self._obs)
        reason = "; ".join(f"environment {vector.first_index + j}: {why if why is not None else refusal}"
                           for j, why in blamed)
        if vector.fresh:
            message = (f"actor {self.actor_id}: the first observations of a newly built vector environment do not "
                       f"fit the policy: {reason}")
            error = InvalidRequest(message)
            error.__cause__ = refusal
            raise _Misconfigured(message, vector.first_index + blamed[0][0], error)
        error = InvalidRequest(f"actor {self.actor_id}: the policy refused observations of its vector "
                               f"environment: {reason}")
        error.__cause__ = refusal
        self._obs = vector.refused(error, [j for j, _ in blamed])
        return self._state_rows.initial
