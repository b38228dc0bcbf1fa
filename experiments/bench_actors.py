"""Benchmark of ActorPool: environment steps per second with actors sharing one PolicyService.

For CartPole-v1 and rlbatch/Latency-v0 (CartPole that sleeps 1 ms per step, releasing the GIL, like
a remote or C simulator) and N = 16, 64, 256 environments, with the same 4-64-64-2 MLP policy that
samples its actions (jitted), in the same run:

- pool-single: an ActorPool of N actors with one environment each (PolicyService with the default
  buckets, max delay 2 ms);
- pool-grouped: an ActorPool of N / 32 actors with 32 environments each (1x16, 2x32, 8x32;
  --group-size), each actor sending its environments' observations as one request;
- sync-vector: gymnasium.vector.SyncVectorEnv of the N environments and one policy call per step
  on the whole [N, 4] observation: obs -> jitted policy -> np.asarray(actions) -> envs.step, the
  ideal synchronous loop (same-step autoreset, so every env step is a real step);
- unbatched: N threads, each stepping its own environment and calling the jitted policy itself on
  a batch of one;
- service-threads: N threads, each stepping its own environment with actions from a PolicyService
  like the pool's, and nothing else: what the pool's trajectories and bookkeeping cost;
- thread-floor: N threads, each stepping its own environment and waiting once per step until all N
  wait, released as relays like the service's callers, with no policy, no data and no trajectory:
  the ceiling of any design with one thread per environment on this machine. The targets table
  shows the floor's ratio beside each single-env target.

The sync-vector and unbatched loops, the pool measurement and the grouping are
experiments.lib.env_loops'.
Steps/s are counted over `duration` seconds after a discarded warm-up (ActorPool.stats.env_steps
for the pools). The main thread consumes the pools' trajectories with pool.get(), as a trainer
would, so actors never block on a full queue and nothing is dropped. Every pool is stopped and its
service closed after its configuration. Then 512 single-env CartPole actors run for a while and
pool.stop() is timed. Prints the median of --repeats runs, ratios to the sync-vector loop of the
same environment and N, and the targets: >= 0.5x sync-vector with 256 single-env CartPole actors,
>= 1.0x with the same 256 environments grouped, >= 35x with 1 ms step latency and 256 actors,
stop with 512 actors within about 2 s.

    python -m experiments.bench_actors            # the full table (several minutes)
    python -m experiments.bench_actors --quick    # a smoke run (under a minute on a CPU)
"""
from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Any, Callable, NamedTuple

import gymnasium
import jax
import numpy as np
import tyro

import envs  # noqa: F401 - registers the rlbatch/ environments
import rlbatch
from experiments.bench_policy import mlp_policy
from experiments.lib import calibration, env_loops, outputs, policy_step, runtime
from rlbatch import report

_clock = time.perf_counter


@dataclasses.dataclass(frozen=True)
class Args:
    """ActorPool benchmark: environment steps/s against a SyncVectorEnv loop (see the module docstring)."""

    envs: tuple[str, ...] = ("CartPole-v1", "rlbatch/Latency-v0")
    """gymnasium ids of the environments (all with CartPole's [4] observation and 2 actions)"""
    num_envs: tuple[int, ...] = (16, 64, 256)
    """numbers of environments N; grouped pools use N / group_size actors"""
    # Measured on the 2-core machine with 256 CartPole envs: 16 x 16 38k, 8 x 32 56k, 4 x 64 57k steps/s.
    group_size: int = 32
    """environments per actor in the grouped pools (N / group_size actors; fewer when N is smaller)"""
    step_latency: float = 0.001
    """seconds rlbatch/Latency-v0 sleeps in every step"""
    unroll_length: int = 32
    """T: steps per trajectory of the pools"""
    max_queue: int = 64
    """trajectories the pools' queues hold (the main thread consumes them)"""
    buckets: tuple[int, ...] = rlbatch.DEFAULT_BUCKETS
    """padded batch sizes of the policy service, each compiled once"""
    max_delay: float = 0.002
    """seconds the oldest request of a batch may wait"""
    warmup: float = 1.0
    """seconds run and discarded before each measurement"""
    duration: float = 3.0
    """seconds of measurement per configuration and repeat"""
    repeats: int = 3
    """runs per configuration; the table shows the median"""
    stop_actors: int = 512
    """single-env CartPole actors of the pool whose stop() is timed"""
    stop_after: float = 2.0
    """seconds that pool runs before stop() is called"""
    seed: int = 0
    """seeds the parameters, the policy's key schedule and the environments"""
    pin_python: bool = True
    """confine the Python threads to one CPU after JAX starts (rlbatch.pin_threads): hand-offs stay on that CPU"""
    quick: bool = False
    """a smoke test: 64 environments only, 0.3 s warm-up, 0.4 s measurement, one repeat, stop of 128 actors timed after 0.5 s"""
    out: str = "runs/bench_actors"
    """file stem for the JSON and markdown outputs"""


MODES = ("pool-single", "pool-grouped", "sync-vector", "unbatched", "service-threads", "thread-floor")


class ServedPolicy(NamedTuple):
    """The one policy of the run: served by every pool's PolicyService and called by the baselines."""

    apply: Callable  # apply(params, obs [B, 4], key) -> (action [B], extras)
    params: Any
    act: Callable  # the baselines' act_fn(obs [B, 4], i) -> actions: the same jitted step
    reports: list  # the library's report of every pool run, appended as they finish


def env_factory(env_id, args):
    if env_id == "rlbatch/Latency-v0":
        return functools.partial(gymnasium.make, env_id, step_latency=args.step_latency)
    return functools.partial(gymnasium.make, env_id)


# ---------------------------------------------------------------------- the four ways to step N envs


def row(rate):
    """The table's columns of a env_loops.StepRate."""
    return dict(steps_per_s=rate.steps_per_s, num_actors=rate.num_actors, envs_per_actor=rate.envs_per_actor,
                mean_batch=rate.mean_batch)


def policy_service(policy, args):
    return rlbatch.PolicyService(policy.apply, policy.params, example_obs=np.zeros(4, np.float32),
                                 buckets=args.buckets, max_delay=args.max_delay, seed=args.seed)


def run_pool(make_env, policy, n, mode, args):
    """Steps/s of an ActorPool; the main thread drains its trajectories with pool.get()."""
    actors, per_actor = (n, 1) if mode == "pool-single" else env_loops.grouping(n, args.group_size)
    with policy_service(policy, args) as svc:
        with rlbatch.ActorPool(make_env, svc, num_actors=actors, unroll_length=args.unroll_length,
                               envs_per_actor=per_actor, seed=args.seed, max_queue=args.max_queue) as pool:
            recorder = report.Recorder(pool, svc, every=None)
            rate = env_loops.measure_pool(pool, svc, warmup=args.warmup, duration=args.duration,
                                          sample=recorder.sample)
            policy.reports.append(recorder.finish(config=dict(envs=n, mode=mode, actors=actors,
                                                                 envs_per_actor=per_actor)))
            return row(rate)


def measure(mode, make_env, policy, n, args):
    if mode in ("pool-single", "pool-grouped"):
        return run_pool(make_env, policy, n, mode, args)
    timing = dict(warmup=args.warmup, duration=args.duration, seed=args.seed)
    if mode == "sync-vector":
        return row(env_loops.run_sync_vector(make_env, policy.act, n, **timing))
    if mode == "unbatched":
        return row(env_loops.run_unbatched(make_env, policy.act, n, **timing))
    if mode == "service-threads":
        with policy_service(policy, args) as svc:
            return row(env_loops.run_service_threads(make_env, svc, n, **timing))
    if mode == "thread-floor":
        return row(env_loops.run_thread_floor(make_env, n, **timing))
    raise ValueError(f"measure: expected a mode of {MODES}, got {mode!r}")


def time_stop(policy, args):
    """Seconds pool.stop() takes with `stop_actors` single-env CartPole actors, after `stop_after` s."""
    with policy_service(policy, args) as svc:
        pool = rlbatch.ActorPool("CartPole-v1", svc, num_actors=args.stop_actors, unroll_length=args.unroll_length,
                                 seed=args.seed, max_queue=args.max_queue)
        pool.start()
        env_loops.drain_until(pool, _clock() + args.stop_after)
        steps = pool.stats.env_steps
        t0 = _clock()
        joined = pool.stop()
        stop_s = _clock() - t0
        envs_open = pool.envs_open
    return dict(num_actors=args.stop_actors, ran_s=args.stop_after, env_steps=steps, stop_s=stop_s,
                all_threads_joined=joined, envs_open_after=envs_open)


# ---------------------------------------------------------------------- main


def main(args: Args):
    print(rlbatch.configure_cpu_jax())
    print(runtime.pin_python_threads(args.pin_python))
    print(f"thread hand-off round trip: {calibration.handoff_round_trip_us():.1f} us (machine calibration)")
    if args.quick:
        args = dataclasses.replace(args, num_envs=(64,), warmup=0.3, duration=0.4, repeats=1, stop_actors=128,
                                   stop_after=0.5)
    devices = [str(d) for d in jax.devices()]
    print(f"jax.devices(): {devices}", flush=True)
    mlp = mlp_policy(4, (64, 64), 2)
    key = jax.random.PRNGKey(args.seed)
    params = mlp.init(key, np.zeros(4, np.float32))
    policy = ServedPolicy(apply=mlp.apply, params=params, reports=[],
                          act=policy_step.policy_act_fn(policy_step.jit_policy_step(mlp.apply), params, key))
    rows = []
    for env_id in args.envs:
        make_env = env_factory(env_id, args)
        for n in args.num_envs:
            for mode in MODES:
                runs = [measure(mode, make_env, policy, n, args) for _ in range(args.repeats)]
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                rows.append(dict(env=env_id, num_envs=n, mode=mode, **med))
                print(f"{env_id:18s} envs={n:4d} {mode:12s} "
                      f"actors={med['num_actors']:4g} x {med['envs_per_actor']:<4g} "
                      f"steps/s={med['steps_per_s']:9.0f} batch={med['mean_batch']:6.1f}", flush=True)
    stop = time_stop(policy, args)
    print(f"stop(): {stop['stop_s']:.3f} s with {stop['num_actors']} actors (all joined: {stop['all_threads_joined']})",
          flush=True)

    for r in rows:
        sync = next(x for x in rows if x["env"] == r["env"] and x["num_envs"] == r["num_envs"]
                    and x["mode"] == "sync-vector")
        r["ratio_to_sync_vector"] = r["steps_per_s"] / sync["steps_per_s"]
    targets = evaluate_targets(rows, stop)
    table = render(rows, stop, targets, devices, args)
    print(table)
    outputs.write(args.out, dict(args=dataclasses.asdict(args), devices=devices, rows=rows, stop=stop,
                                 targets=targets), table)
    report.write_runs(policy.reports, args.out)  # the library's report of every pool run, and plots
    return rows


def evaluate_targets(rows, stop):
    """The targets, measured (shown, never asserted: timings depend on the machine)."""
    def ratio(env, mode, n=256):
        r = next((x for x in rows if x["env"] == env and x["mode"] == mode and x["num_envs"] == n), None)
        return None if r is None else r["ratio_to_sync_vector"]

    targets = []
    for env, mode, want, what in (("CartPole-v1", "pool-single", 0.5, "256 single-env CartPole actors"),
                                  ("CartPole-v1", "pool-grouped", 1.0, "the same 256 CartPole envs grouped"),
                                  ("rlbatch/Latency-v0", "pool-single", 35.0, "256 actors, 1 ms step latency")):
        got = ratio(env, mode)
        if got is not None:
            floor = ratio(env, "thread-floor") if mode == "pool-single" else None
            served = ratio(env, "service-threads") if mode == "pool-single" else None
            shown = f"{got:.2f}x" + ("" if floor is None else
                                     f" (service threads {served:.2f}x, thread floor {floor:.2f}x)")
            targets.append(dict(target=f"{what}: >= {want:g}x sync-vector", value=got, shown=shown,
                                met=got >= want, thread_floor=floor, service_threads=served))
    targets.append(dict(target=f"stop() with {stop['num_actors']} actors within about 2 s", value=stop["stop_s"],
                        shown=f"{stop['stop_s']:.2f} s", met=stop["stop_s"] <= 2.0 and stop["all_threads_joined"]))
    return targets


def render(rows, stop, targets, devices, args):
    lines = [f"Devices: {', '.join(devices)}. Policy 4-64-64-2 MLP, buckets {tuple(args.buckets)}, max delay "
             f"{1e3 * args.max_delay:g} ms, T={args.unroll_length}; {args.duration:g} s after {args.warmup:g} s "
             f"warm-up, median of {args.repeats}; the main thread consumes trajectories.",
             "",
             "| env | envs | mode | actors x envs | steps/s | x sync-vector | mean batch |",
             "|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['env']} | {r['num_envs']} | {r['mode']} | {r['num_actors']:g} x {r['envs_per_actor']:g} | "
                     f"{r['steps_per_s']:,.0f} | {r['ratio_to_sync_vector']:.2f} | {r['mean_batch']:.1f} |")
    lines += ["", f"pool.stop() with {stop['num_actors']} single-env CartPole actors after {stop['ran_s']:g} s: "
              f"{stop['stop_s']:.3f} s (all threads joined: {stop['all_threads_joined']}, environments left open: "
              f"{stop['envs_open_after']}).",
              "", "| target | measured | met |", "|---|---:|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['shown']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(tyro.cli(Args, prog="python -m experiments.bench_actors", description=__doc__))
