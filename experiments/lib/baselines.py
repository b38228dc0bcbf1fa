"""The comparison baselines that the benchmarks (experiments/bench_*.py, experiments/throughput.py)
measure rlbatch against, and the measurement loops they share.

Batching baselines:
- `SeedStyleBatcher`: the seed libraries' design, a queue.Queue of (item, Future), one worker that
  gathers up to `max_batch_size` items or what came within `max_delay` of the first, calls
  `batch_fn(items) -> results` (one result per item, in order) and sets one
  concurrent.futures.Future per item. `StackedPolicyBatch` is a `batch_fn` for a jitted policy:
  np.stack, optional padding to a fixed size, one call, one result per row.
- `run_clients`: N threads each calling a callable with one item in a loop, as actors do;
  items/s, p50/p99 latency and CPU seconds per 1000 items.

Environment-stepping baselines (N environments, the same jitted policy as the pool's service):
- `run_sync_vector`: gymnasium's SyncVectorEnv and ONE policy call per step on all [N, ...]
  observations, the ideal synchronous loop;
- `run_unbatched`: N threads, each stepping its own environment and calling the policy itself
  on a batch of one;
- `run_service_threads`: N threads, each stepping its own environment with a PolicyService's
  actions and nothing else (an ActorPool without trajectories);
- `run_thread_floor`: N threads, each stepping its own environment and waiting once per step until
  all N wait (no policy, no data): the floor of any design with one thread per environment;
- `measure_pool`: steps/s of a running ActorPool while the calling thread drains its
  trajectories, as a trainer would (`drain_until`), optionally sampling the pool for a time series.

A policy is passed to the environment baselines as `act_fn(obs, i) -> actions`: obs leaves have the
batch axis first ([B, ...]), actions come back as a numpy array [B, ...], and `i` counts the calls
(the batch index of PolicyService's key schedule). `policy_act_fn` builds one from the jitted
`step_fn(params, obs, key, i)` that `jit_policy_step` makes, the step PolicyService itself runs.

This module plugs into environments only through gymnasium's API: it imports no `envs` or `agents`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import queue
import threading
import time
from typing import Any, Callable, Sequence

import gymnasium
import jax
import numpy as np

from rlbatch.errors import PoolStopped
from rlbatch.batching.relay import relay_width

__all__ = [
    "ClientLoad",
    "SeedStyleBatcher",
    "StackedPolicyBatch",
    "StepRate",
    "drain_until",
    "grouping",
    "jit_policy_step",
    "measure_pool",
    "policy_act_fn",
    "run_client_floor",
    "run_clients",
    "run_service_threads",
    "run_sync_vector",
    "run_thread_floor",
    "run_unbatched",
]

_clock = time.perf_counter


# ---------------------------------------------------------------------- the policy, jitted


def jit_policy_step(apply_fn: Callable) -> Callable:
    """A fresh jax.jit of one policy step with PolicyService's key schedule (batch i: fold_in(key, i)).

    step(params, obs [B, ...], key, i) -> apply_fn(params, obs, fold_in(key, i)). Fresh on every
    call (a new function object), so its compilation cache starts empty.
    """

    def step(params, obs, key, i):
        return apply_fn(params, obs, jax.random.fold_in(key, i))

    return jax.jit(step)


def policy_act_fn(step_fn: Callable, params: Any, key) -> Callable:
    """`act_fn(obs, i) -> np.ndarray actions` for the environment baselines, from a jitted step."""

    def act(obs, i):
        return np.asarray(step_fn(params, obs, key, np.uint32(i))[0])

    return act


# ---------------------------------------------------------------------- the seed-style batcher


class SeedStyleBatcher:
    """The seed libraries' design, for comparison: queue.Queue + one worker + one Future per item.

    `batch_fn(items: list) -> results` gets up to `max_batch_size` items (the first, and what came
    within `max_delay` seconds of it) and returns one result per item, in order. An exception it
    raises (any BaseException) goes to every future of its batch; the worker goes on.
    """

    def __init__(self, batch_fn: Callable[[list], Sequence], max_batch_size: int, max_delay: float,
                 *, name: str = "seed-style"):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"SeedStyleBatcher: max_batch_size must be a positive int, got {max_batch_size!r}")
        if not max_delay >= 0:
            raise ValueError(f"SeedStyleBatcher: max_delay must be >= 0 seconds, got {max_delay!r}")
        self.batch_fn, self.max_batch_size, self.max_delay = batch_fn, max_batch_size, max_delay
        self.batches = self.items = 0
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, item) -> concurrent.futures.Future:
        f: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:  # no item can slip in behind the sentinel
            if self._closed:
                raise RuntimeError("SeedStyleBatcher.submit: the batcher was closed")
            self._queue.put((item, f))
        return f

    def __call__(self, item):
        return self.submit(item).result()

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def _gather(self):
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_delay
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # seen again once this batch is done: the worker exits then
                break
            batch.append(item)
        return batch

    def _work(self):
        while True:
            batch = self._gather()
            if batch is None:
                return
            try:
                results = self.batch_fn([x for x, _ in batch])
                self.batches += 1
                self.items += len(batch)
                for (_, f), y in zip(batch, results):
                    f.set_result(y)
            except BaseException as e:  # noqa: BLE001 - every waiting caller hears of it
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)

    def close(self) -> None:
        """Runs what was submitted, then stops the worker; safe to call twice."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StackedPolicyBatch:
    """A `batch_fn` for SeedStyleBatcher around a jitted policy step: one observation per item.

    np.stack's the observations ([n, ...]); with `pad_to`, pads every batch to `pad_to` rows by
    repeating the last one (a real row keeps the padding a valid input; zeros may not be one), so
    the step sees one shape; without, it sees the exact size, and every new size is a new
    compilation. Calls `step_fn(params, obs, key, i)` with i counting batches, copies the
    `(action, extras)` outputs to the host once, and returns `(action[j], {k: extras[k][j]})` per
    item. `batch_sizes` holds the sizes the step was called with.
    """

    def __init__(self, step_fn: Callable, params: Any, key, pad_to: int | None = None):
        self.step_fn, self.params, self.key, self.pad_to = step_fn, params, key, pad_to
        self.batch_sizes: set[int] = set()
        self._index = 0

    def __call__(self, observations: list) -> list:
        n = len(observations)
        obs = np.stack(observations)
        if self.pad_to is not None and n < self.pad_to:
            obs = np.concatenate([obs, np.repeat(obs[-1:], self.pad_to - n, axis=0)])
        self.batch_sizes.add(len(obs))
        action, extras = jax.device_get(self.step_fn(self.params, obs, self.key, np.uint32(self._index)))
        self._index += 1
        return [(action[j], {k: v[j] for k, v in extras.items()}) for j in range(n)]


# ---------------------------------------------------------------------- client load


@dataclasses.dataclass(frozen=True)
class ClientLoad:
    """What `run_clients` measured. Latencies are per call (submit to result), in milliseconds."""

    items: int
    elapsed_s: float
    items_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_s_per_1k: float  # process CPU seconds (all threads) per 1000 items


def run_clients(num_threads: int, make_call: Callable[[int], Callable], make_item: Callable[[int], Any],
                duration: float) -> ClientLoad:
    """`num_threads` threads, thread i calling `make_call(i)` with `make_item(i)` in a loop for `duration` s.

    Each thread waits for every result before its next call, as an actor does. A call with a
    `close` (a registered caller) is closed when its thread is done, so a service stops counting
    it for early flush: pass a bound method (`service.__call__`), not the service, for one object
    shared by every thread. The clock starts when every thread has its call and item ready.
    """
    if num_threads < 1:
        raise ValueError(f"run_clients: num_threads must be >= 1, got {num_threads!r}")
    barrier = threading.Barrier(num_threads + 1)
    latencies: list = [None] * num_threads
    failures: list = []
    stop_at = [0.0]

    def client(i):
        call = None
        try:
            call = make_call(i)
            item = make_item(i)
            barrier.wait()
            end = stop_at[0]
            lat = latencies[i] = []
            t = _clock()
            while t < end:
                call(item)
                t2 = _clock()
                lat.append(t2 - t)
                t = t2
        except threading.BrokenBarrierError:
            pass  # another client failed before the start: it is the one reported
        except BaseException as e:  # noqa: BLE001 - reported by the main thread, not lost
            failures.append(e)
            barrier.abort()
        finally:
            close = getattr(call, "close", None)
            if close is not None:
                close()

    threads = [threading.Thread(target=client, args=(i,), name=f"client-{i}") for i in range(num_threads)]
    for t in threads:
        t.start()
    stop_at[0] = _clock() + duration
    c0, t0 = time.process_time(), _clock()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    elapsed, cpu = _clock() - t0, time.process_time() - c0
    if failures:
        raise RuntimeError(f"run_clients: a client thread failed: {failures[0]!r}") from failures[0]
    lat = np.concatenate([np.asarray(x, np.float64) for x in latencies if x is not None] or [np.zeros(0)])
    if not lat.size:
        raise RuntimeError(f"run_clients: no call finished within {duration} s")
    return ClientLoad(items=int(lat.size), elapsed_s=elapsed, items_per_s=lat.size / elapsed,
                      p50_ms=1e3 * float(np.median(lat)), p99_ms=1e3 * float(np.quantile(lat, 0.99)),
                      cpu_s_per_1k=1e3 * cpu / lat.size)


class _GateCall:
    """A client's 'call' in `run_client_floor`: wait for the round, return the item unchanged."""

    def __init__(self, gate: "_RelayGate"):
        self._gate = gate

    def __call__(self, item):
        self._gate.wait()
        return item

    def close(self) -> None:
        self._gate.leave()


def run_client_floor(num_threads: int, duration: float) -> ClientLoad:
    """`run_clients` where each call only waits until all `num_threads` threads wait (`_RelayGate`).

    The ceiling of any batching service whose callers each block for their result, on the machine
    it runs on: one thread hand-off per item and one gate wake-up per round of all threads, no
    queue, no data, no batch function. A service pays at least this and then its own work.
    """
    gate = _RelayGate(num_threads)
    try:
        return run_clients(num_threads, lambda i: _GateCall(gate), lambda i: i, duration)
    finally:
        gate.close()


# ---------------------------------------------------------------------- stepping N environments


@dataclasses.dataclass(frozen=True)
class StepRate:
    """Environment steps per second of one way to step `num_actors * envs_per_actor` environments.

    `mean_batch` is the mean number of observations per policy call; `series` holds
    (seconds since start, env steps) samples where the measurement took them.
    """

    steps_per_s: float
    num_actors: int
    envs_per_actor: int
    mean_batch: float
    env_steps: int  # counted between the end of the warm-up and the end of the measurement
    elapsed_s: float
    series: tuple = ()


def grouping(num_envs: int, envs_per_actor: int | None = None) -> tuple[int, int]:
    """(actors, environments per actor) for num_envs environments.

    With `envs_per_actor`, groups of that many (fewer when num_envs is smaller, and the largest
    divisor of num_envs below it otherwise); without, about sqrt(num_envs) x sqrt(num_envs).
    """
    if envs_per_actor is not None:
        if envs_per_actor < 1:
            raise ValueError(f"grouping: envs_per_actor must be >= 1, got {envs_per_actor!r}")
        per = min(envs_per_actor, num_envs)
        while num_envs % per:
            per -= 1
        return num_envs // per, per
    actors = math.isqrt(num_envs)
    while num_envs % actors:
        actors -= 1
    return actors, num_envs // actors


def run_sync_vector(make_env: Callable[[], gymnasium.Env], act_fn: Callable, num_envs: int, *,
                    warmup: float, duration: float, seed: int = 0) -> StepRate:
    """The ideal synchronous loop: obs [N, ...] -> act_fn -> SyncVectorEnv.step, one call per step.

    Same-step autoreset, so every environment step is a real step. The [N, ...] shape is compiled
    before the clock starts.
    """
    vec = gymnasium.vector.SyncVectorEnv([make_env] * num_envs,
                                         autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP)
    try:
        obs, _ = vec.reset(seed=seed)
        act_fn(obs, 0)
        i, steps = 0, 0
        t_warm = _clock() + warmup
        t0 = s0 = None
        while True:
            now = _clock()
            if t0 is None and now >= t_warm:
                t0, s0 = now, steps
            elif t0 is not None and now >= t0 + duration:
                break
            obs, _, _, _, _ = vec.step(act_fn(obs, i))
            i += 1
            steps += num_envs
    finally:
        vec.close()
    return StepRate(steps_per_s=(steps - s0) / (now - t0), num_actors=1, envs_per_actor=num_envs,
                    mean_batch=float(num_envs), env_steps=steps - s0, elapsed_s=now - t0)


def run_unbatched(make_env: Callable[[], gymnasium.Env], act_fn: Callable, num_envs: int, *,
                  warmup: float, duration: float, seed: int = 0) -> StepRate:
    """N threads, each stepping its own environment and calling act_fn itself on a batch of one.

    Environment a is first reset with seed + a. The [1, ...] shape is compiled before the threads
    start; an exception in any thread is raised here.
    """
    probe = make_env()
    try:
        obs, _ = probe.reset(seed=seed)
        act_fn(_one(obs), 0)
    finally:
        probe.close()

    def choose(obs, i):
        action = act_fn(_one(obs), i)[0]
        # Plain Python ints for discrete actions, as ActorPool sends them.
        return action.item() if action.dtype.kind in "iu" else action

    rate = _run_env_threads("run_unbatched", make_env, num_envs, choose, warmup=warmup, duration=duration, seed=seed)
    return dataclasses.replace(rate, mean_batch=1.0)


class _RelayGate:
    """The least a batched service makes each of n threads do per step: wait until all n wait.

    A gate thread releases a full round as relays (each woken thread waking the next; as many
    chains as BatchedService would use for a batch of that size, unless `width` says), the way
    BatchedService wakes its blocking callers. No data moves and nothing is computed.
    """

    def __init__(self, n: int, width: int | None = None):
        self._n = n
        self._width = width
        self._cond = threading.Condition(threading.Lock())
        self._waiting: list = []
        self._closed = False
        self._thread = threading.Thread(target=self._release_rounds, name="relay-gate")
        self._thread.start()

    def wait(self) -> None:
        me = [threading.Lock(), None]
        me[0].acquire()
        with self._cond:
            if self._closed:
                return
            self._waiting.append(me)
            if len(self._waiting) >= self._n:
                self._cond.notify()
        me[0].acquire()
        if me[1] is not None:
            me[1][0].release()

    def leave(self) -> None:
        """A thread that will not wait again (it stopped or failed): rounds no longer need it."""
        with self._cond:
            self._n -= 1
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _release_rounds(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or (self._waiting and len(self._waiting) >= self._n))
                batch, self._waiting = self._waiting, []
                closed = self._closed
            width = relay_width(len(batch), self._width)
            for a, b in zip(batch, batch[width:]):
                a[1] = b
            for head in batch[:width]:
                head[0].release()
            if closed:
                return


def run_thread_floor(make_env: Callable[[], gymnasium.Env], num_envs: int, *,
                     warmup: float, duration: float, seed: int = 0) -> StepRate:
    """N threads stepping their environments, each waiting once per step until all N wait.

    The floor under any design with one thread per environment and a shared batched policy: the
    per-step thread hand-off (`_RelayGate`) without a policy, without data and without
    trajectories. Actions alternate 0, 1 (a Discrete(2) action space such as CartPole's).
    """
    gate = _RelayGate(num_envs)

    def choose(obs, i):
        gate.wait()
        return i & 1

    try:
        rate = _run_env_threads("run_thread_floor", make_env, num_envs, choose, warmup=warmup, duration=duration,
                                seed=seed, on_stop=gate.close, on_exit=gate.leave)
    finally:
        gate.close()
    return dataclasses.replace(rate, mean_batch=float(num_envs))


def run_service_threads(make_env: Callable[[], gymnasium.Env], policy_service, num_envs: int, *,
                        warmup: float, duration: float, seed: int = 0) -> StepRate:
    """N threads, each stepping its own environment with actions from `policy_service` (a
    PolicyService; each thread a registered caller), and nothing else: an ActorPool without its
    trajectories, episode statistics and fault handling, to show what those cost. `mean_batch`
    counts the service's batches over the whole run, warm-up included."""
    local = threading.local()

    def choose(obs, i):
        caller = getattr(local, "caller", None)
        if caller is None:
            caller = local.caller = policy_service.register()
        action = caller(obs)[0]
        return action.item() if action.dtype.kind in "iu" else action

    def leave():
        caller = getattr(local, "caller", None)
        if caller is not None:
            caller.close()

    b0 = policy_service.stats
    rate = _run_env_threads("run_service_threads", make_env, num_envs, choose, warmup=warmup, duration=duration,
                            seed=seed, on_exit=leave)
    return dataclasses.replace(rate, mean_batch=_mean_rows(b0, policy_service.stats))


def _run_env_threads(what, make_env, num_envs, choose, *, warmup, duration, seed, on_stop=None, on_exit=None):
    """N threads, thread a stepping its own environment (first reset with seed + a) with
    `choose(obs, i)`'s actions; steps/s over `duration` after `warmup`. `on_stop` runs once the
    threads are told to stop (to release a thread blocked in `choose`), `on_exit` in each thread
    as it ends. An exception in any thread is raised here."""
    counts = [0] * num_envs
    stop = threading.Event()
    ready = threading.Barrier(num_envs + 1)
    failures: list = []

    def actor(a):
        env = None
        try:
            env = make_env()
            obs, _ = env.reset(seed=seed + a)
            ready.wait()
            i = 0
            while not stop.is_set():
                obs, _, terminated, truncated, _ = env.step(choose(obs, i))
                if terminated or truncated:
                    obs, _ = env.reset()
                i += 1
                counts[a] = i
        except threading.BrokenBarrierError:
            pass  # another actor failed before the start: it is the one reported
        except BaseException as e:  # noqa: BLE001 - reported by the main thread, not lost
            failures.append(e)
            ready.abort()
        finally:
            if on_exit is not None:
                on_exit()
            if env is not None:
                env.close()

    threads = [threading.Thread(target=actor, args=(a,), name=f"{what}-{a}") for a in range(num_envs)]
    for t in threads:
        t.start()
    try:
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            pass
        else:
            stop.wait(warmup)
            s0, t0 = sum(counts), _clock()
            stop.wait(duration)
            s1, t1 = sum(counts), _clock()
    finally:
        stop.set()
        if on_stop is not None:
            on_stop()
        for t in threads:
            t.join()
    if failures:
        raise RuntimeError(f"{what} with {num_envs} envs: an actor thread failed: {failures[0]!r}") from failures[0]
    return StepRate(steps_per_s=(s1 - s0) / (t1 - t0), num_actors=num_envs, envs_per_actor=1, mean_batch=1.0,
                    env_steps=s1 - s0, elapsed_s=t1 - t0)


def _one(obs):
    """One observation as a batch of one (leaves [1, ...])."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[None], obs)


def drain_until(pool, end: float, sample: Callable[[], None] | None = None, every: float = 0.1) -> int:
    """Consumes the pool's trajectories until `end` (time.perf_counter seconds), as a trainer would.

    With `sample`, calls it about every `every` seconds (between trajectories: the wait for the
    next one never outlasts the next sample time). Returns the trajectories consumed; returns
    early if the pool stopped and is drained.
    """
    consumed = 0
    next_sample = _clock() + every
    while True:
        now = _clock()
        if sample is not None and now >= next_sample:
            sample()
            next_sample = now + every
        left = end - now
        if left <= 0:
            return consumed
        wait = left if sample is None else min(left, max(next_sample - now, 0.0))
        try:
            pool.get(timeout=wait)
            consumed += 1
        except TimeoutError:
            continue
        except PoolStopped:
            return consumed


def measure_pool(pool, policy=None, *, warmup: float, duration: float,
                 sample: Callable[[], None] | None = None, sample_every: float = 0.1) -> StepRate:
    """Steps/s of a started ActorPool over `duration` s after `warmup` s, draining its trajectories.

    `policy` (its PolicyService or BatchedService) gives `mean_batch`: mean valid rows per batch
    over the measured span. `sample` (e.g. `report.Recorder.sample`) is called about every
    `sample_every` s during warm-up and measurement; the `series` of the result holds the pool's
    (elapsed, env steps) at the start and end of the measured span. Raises RuntimeError naming the
    actor if any actor recorded an error. The caller stops the pool.
    """
    drain_until(pool, _clock() + warmup, sample, sample_every)
    a0, t0 = pool.stats, _clock()
    b0 = policy.stats if policy is not None else None
    drain_until(pool, t0 + duration, sample, sample_every)
    a1, t1 = pool.stats, _clock()
    b1 = policy.stats if policy is not None else None
    errors = pool.errors
    if errors:
        e = errors[-1]
        raise RuntimeError(f"measure_pool: actor {e.actor_id} of {pool.num_actors} ({pool.num_actors} x "
                           f"{pool.envs_per_actor} envs) failed in {e.where}: {e.error}")
    steps = a1.env_steps - a0.env_steps
    return StepRate(steps_per_s=steps / (t1 - t0), num_actors=pool.num_actors, envs_per_actor=pool.envs_per_actor,
                    mean_batch=_mean_rows(b0, b1) if policy is not None else float("nan"), env_steps=steps,
                    elapsed_s=t1 - t0, series=((a0.elapsed, a0.env_steps), (a1.elapsed, a1.env_steps)))


def _mean_rows(before, after) -> float:
    """Mean valid rows per batch between two service stats snapshots."""
    batches = after.batches - before.batches
    rows = (sum(k * c for k, c in after.batch_size_hist.items())
            - sum(k * c for k, c in before.batch_size_hist.items()))
    return rows / batches if batches else 0.0


def handoff_round_trip_us(rounds: int = 5000) -> float:
    """Microseconds for two threads to wake each other once through a lock (a calibration).

    Thread hand-offs bound every threaded batcher. On a shared VM this figure varies several-fold
    over a day (14 to 90 us was seen on the same machine), so benchmark tables print it beside
    their numbers: compare runs only when it is similar, and compare within a run by ratios.
    """
    import threading
    import time

    ping, pong = threading.Lock(), threading.Lock()
    ping.acquire()
    pong.acquire()

    def other():
        for _ in range(rounds):
            ping.acquire()
            pong.release()

    t = threading.Thread(target=other, name="handoff-calibration")
    t.start()
    t0 = time.perf_counter()
    for _ in range(rounds):
        ping.release()
        pong.acquire()
    elapsed = time.perf_counter() - t0
    t.join()
    return 1e6 * elapsed / rounds
