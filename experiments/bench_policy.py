"""Benchmark of PolicyService: caller threads asking a jitted JAX policy for one action at a time.

Each of N caller threads (16, 64, 256) registers with the service and calls it in a loop with ONE
observation, waiting for each result, as an actor does. Two plain-jax policies that sample a
categorical action and return extras `log_prob` and `value`: a CartPole-sized 4-64-64-2 tanh MLP and
a larger 64-256-256-18 one. In the same run, beside rlbatch (default buckets 8..256, max delay 2 ms):

- seed-style: the seed libraries' design (a queue.Queue, a worker that gathers up to 64
  observations or waits 2 ms after the first, np.stack, pads to 64 with the last row, calls the
  jitted policy, one concurrent.futures.Future per item) around the same jitted policy
  (experiments.lib.seed_style.SeedStyleBatcher with a StackedPolicyBatch);
- no-buckets: the same batcher without padding, up to 256 rows like rlbatch, calling a plain
  jax.jit of the policy on exactly-sized batches, so every batch size not met before compiles
  during the run (the jit's cache is kept across the runs of one policy, as a long-running service
  would keep it). A PolicyService with buckets 1..256 would compile 256 shapes at start; this
  measures what skipping buckets costs without waiting for that;
- thread-floor: each thread's "call" only waits until all N threads wait, released as relays the
  way rlbatch wakes its callers (experiments.lib.client_load.run_client_floor): no policy, no
  data. The most any service whose callers block for their results can do on this machine.

Also measured: the per-request overhead of rlbatch over a bare jitted call (1 caller, max delay 0),
and the padding waste of the default buckets when one thread sends requests of uniformly random
sizes 1..256 rows. Prints requests/s, ratio to seed-style, mean batch size, p50/p99 latency and
compilations (median of --repeats runs), and the targets:
>= 2.5x seed-style at 256 callers, no compilation after start, padding waste <= 25%.

    python -m experiments.bench_policy            # the full table (several minutes)
    python -m experiments.bench_policy --quick    # a smoke run (under a minute on a CPU)
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tyro

import rlbatch
from experiments.lib import calibration, client_load, outputs, policy_step, runtime, seed_style
from rlbatch import report

_clock = time.perf_counter


@dataclasses.dataclass(frozen=True)
class Args:
    """PolicyService benchmark: caller threads, one observation per request (see the module docstring)."""

    threads: tuple[int, ...] = (16, 64, 256)
    """numbers of caller threads to measure"""
    policies: tuple[str, ...] = ("mlp-4x64x64x2", "mlp-64x256x256x18")
    """policies to serve, names from POLICIES: obs size x hidden sizes x actions"""
    buckets: tuple[int, ...] = rlbatch.DEFAULT_BUCKETS
    """rlbatch's padded batch sizes, each compiled once when the service starts"""
    max_delay: float = 0.002
    """seconds the oldest request of a batch may wait (rlbatch and both baselines)"""
    seed_max_batch_size: int = 64
    """seed-style batcher: largest batch; every batch is padded to it"""
    duration: float = 2.0
    """seconds of measurement per configuration and repeat"""
    repeats: int = 3
    """runs per configuration; the tables show the median"""
    padding_requests: int = 2000
    """padding measure: requests of uniformly random sizes 1..largest bucket, sent by one thread to the first policy"""
    seed: int = 0
    """seeds the parameters, the observations and the policies' key schedule"""
    pin_python: bool = True
    """confine the Python threads to one CPU after JAX starts (rlbatch.pin_threads): hand-offs stay on that CPU"""
    # Paired runs with 256 callers: async 2.34x / 2.34x seed-style for the larger policy against
    # 1.76x / 1.85x sync, 2.83x against 2.44x for the CartPole-sized one.
    cpu_dispatch: Literal["async", "sync"] = "async"
    """CPU only, every mode: async pipelines two batches (as on a GPU), sync runs each in the calling thread"""
    quick: bool = False
    """tiny settings for a smoke test (16 and 64 callers, 0.4 s, one repeat, 300 padding requests)"""
    out: str = "runs/bench_policy"
    """file stem for the JSON and markdown outputs"""


# ---------------------------------------------------------------------- the policies


def mlp_policy(obs_size: int, hidden: tuple[int, ...], num_actions: int) -> rlbatch.Policy:
    """A tanh MLP with a categorical policy head and a value head, in plain jax.

    apply(params, obs [B, obs_size], key) -> (action [B], {"log_prob": [B], "value": [B]}).
    """

    def init(key, example_obs):
        sizes = (obs_size,) + hidden
        keys = jax.random.split(key, len(sizes) + 1)
        layers = [(jax.random.normal(k, (m, n)) / np.sqrt(m), jnp.zeros(n))
                  for k, m, n in zip(keys, sizes[:-1], sizes[1:])]
        pi = (jax.random.normal(keys[-2], (sizes[-1], num_actions)) * 0.01, jnp.zeros(num_actions))
        v = (jax.random.normal(keys[-1], (sizes[-1], 1)) / np.sqrt(sizes[-1]), jnp.zeros(1))
        return {"layers": layers, "pi": pi, "v": v}

    def apply(params, obs, key):
        h = obs
        for w, b in params["layers"]:
            h = jnp.tanh(h @ w + b)
        logits = h @ params["pi"][0] + params["pi"][1]
        action = jax.random.categorical(key, logits)
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], axis=-1)[:, 0]
        value = (h @ params["v"][0] + params["v"][1])[:, 0]
        return action, {"log_prob": log_prob, "value": value}

    return rlbatch.Policy(init, apply)


POLICIES = {
    "mlp-4x64x64x2": (4, (64, 64), 2),
    "mlp-64x256x256x18": (64, (256, 256), 18),
}


class CompileCounter:
    """Counts XLA backend compilations in this process (jax.monitoring), to check 'none after start'."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, duration, **kwargs):
        if name == self.EVENT:
            self.count += 1


# ---------------------------------------------------------------------- measurements


def run_callers(n, open_caller, observations, duration):
    """n threads, each calling `open_caller(i)` with one observation in a loop for `duration` s.

    A caller with a `close` (a registered PolicyCaller) is closed when its thread is done, so the
    service stops counting it for early flush. Returns requests/s and p50/p99 latency in ms.
    """
    r = client_load.run_clients(n, open_caller, lambda i: observations[i], duration)
    return dict(requests_per_s=r.items_per_s, p50_ms=r.p50_ms, p99_ms=r.p99_ms)


@dataclasses.dataclass
class PolicyRuns:
    """What the runs of every mode with one policy share."""

    params: Any
    key: Any
    seed_step: Callable  # jitted step of the seed-style mode, its one padded shape compiled before the runs
    exact_step: Callable  # jitted step of the no-buckets mode: compiles each batch size it meets
    observations: np.ndarray  # [max threads, obs size]: caller i sends row i
    reports: list  # the library's report of every rlbatch run, appended as they finish
    service: Optional[rlbatch.PolicyService] = None  # set while the policy's service runs
    # Batch sizes each batcher mode has compiled over this policy's runs (its jit cache is kept).
    shapes: dict = dataclasses.field(default_factory=lambda: {"seed-style": set(), "no-buckets": set()})


def measure(mode, runs: PolicyRuns, n, args, compiles):
    """One run of `mode` with n callers."""
    observations = runs.observations
    c0 = compiles.count
    if mode == "rlbatch":
        svc = runs.service
        before = svc.stats
        r = run_callers(n, lambda i: svc.register(), observations, args.duration)
        after = svc.stats
        r["mean_batch"] = (after.rows - before.rows) / max(after.batches - before.batches, 1)
        r["compile_count"] = svc.compile_count
        runs.reports.append(report.summarize(service=svc.stats, latency_samples=svc.service.latency_samples(),
                                             config=dict(threads=n, mode=mode)))
    elif mode in ("seed-style", "no-buckets"):
        if mode == "seed-style":
            step, size, pad = runs.seed_step, args.seed_max_batch_size, True
        else:
            step, size, pad = runs.exact_step, max(args.buckets), False
        batch_fn = seed_style.StackedPolicyBatch(step, runs.params, runs.key, pad_to=size if pad else None)
        with seed_style.SeedStyleBatcher(batch_fn, size, args.max_delay, name=mode) as b:
            r = run_callers(n, lambda i: b.__call__, observations, args.duration)
        r["mean_batch"] = b.mean_batch_size
        # Shapes compiled so far: seed-style its one padded shape (before the runs); no-buckets every
        # batch size it met, in this run or an earlier one with this policy (its jit cache is kept,
        # as a long-running service would keep it).
        runs.shapes[mode] |= batch_fn.batch_sizes
        r["compile_count"] = len(runs.shapes[mode])
    elif mode == "thread-floor":
        load = client_load.run_client_floor(n, args.duration)
        r = dict(requests_per_s=load.items_per_s, p50_ms=load.p50_ms, p99_ms=load.p99_ms,
                 mean_batch=float(n), compile_count=0)  # each round releases every thread
    else:
        raise ValueError(f"measure: expected a mode of {MODES}, got {mode!r}")
    r["compiles_during_run"] = compiles.count - c0
    r["wall_us_per_request"] = 1e6 / r["requests_per_s"]
    return r


def padding_waste(caller, obs_size, args):
    """One thread sends multi-row requests of uniformly random sizes; each runs alone in its batch."""
    rng = np.random.default_rng(args.seed)
    largest = max(args.buckets)
    for k in rng.integers(1, largest + 1, size=args.padding_requests):
        caller(rng.normal(size=(int(k), obs_size)).astype(np.float32))


def uniform_sizes_padding(buckets, largest):
    """Exact padded fraction for request sizes uniform on 1..largest, each in its own batch."""
    padded = sum(min(b for b in buckets if b >= k) for k in range(1, largest + 1))
    return 1.0 - (largest * (largest + 1) / 2) / padded


def overhead(caller, step, params, key, obs, duration):
    """µs per request through rlbatch with one caller, and µs per bare jitted call on a batch of 1."""
    caller(obs)
    n, t0 = 0, _clock()
    while _clock() - t0 < duration:
        caller(obs)
        n += 1
    svc_us = 1e6 * (_clock() - t0) / n
    one = obs[None]
    jax.device_get(step(params, one, key, np.uint32(0)))  # compiles the batch-of-1 shape
    n, t0 = 0, _clock()
    while _clock() - t0 < duration:
        jax.device_get(step(params, one, key, np.uint32(n)))  # np.asarray of every output, as a caller needs
        n += 1
    bare_us = 1e6 * (_clock() - t0) / n
    return dict(rlbatch_us_per_request=svc_us, bare_call_us=bare_us, overhead_us=svc_us - bare_us)


MODES = ("rlbatch", "seed-style", "no-buckets", "thread-floor")


def median_of(runs):
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(args: Args):
    if args.cpu_dispatch not in ("sync", "async"):
        raise SystemExit(f'--cpu-dispatch must be "sync" or "async", got {args.cpu_dispatch!r}')
    print(rlbatch.configure_cpu_jax(sync_dispatch=args.cpu_dispatch == "sync"))
    print(runtime.pin_python_threads(args.pin_python))
    print(f"thread hand-off round trip: {calibration.handoff_round_trip_us():.1f} us (machine calibration)")
    if args.quick:
        args = dataclasses.replace(args, threads=(16, 64), duration=0.4, repeats=1, padding_requests=300)
    devices = [str(d) for d in jax.devices()]
    print(f"jax.devices(): {devices}", flush=True)
    compiles = CompileCounter()
    rng = np.random.default_rng(args.seed)
    rows, overheads, paddings, reports = [], [], [], []
    for name in args.policies:
        obs_size, hidden, num_actions = POLICIES[name]
        policy = mlp_policy(obs_size, hidden, num_actions)
        example_obs = np.zeros(obs_size, np.float32)
        key = jax.random.PRNGKey(args.seed)
        params = policy.init(key, example_obs)
        seed_step = policy_step.jit_policy_step(policy.apply)
        warm = np.zeros((args.seed_max_batch_size, obs_size), np.float32)
        jax.device_get(seed_step(params, warm, key, np.uint32(0)))  # its one shape, compiled before the runs
        runs = PolicyRuns(params=params, key=key, seed_step=seed_step,
                          exact_step=policy_step.jit_policy_step(policy.apply), reports=reports,
                          observations=rng.normal(size=(max(args.threads), obs_size)).astype(np.float32))
        with rlbatch.PolicyService(policy.apply, params, example_obs=example_obs, buckets=args.buckets,
                                   max_delay=args.max_delay, seed=args.seed, name=name) as svc:
            runs.service = svc
            for n in args.threads:
                for mode in MODES:
                    med = median_of([measure(mode, runs, n, args, compiles) for _ in range(args.repeats)])
                    rows.append(dict(policy=name, threads=n, mode=mode, **med))
                    print(f"{name:18s} callers={n:4d} {mode:10s} requests/s={med['requests_per_s']:9.0f} "
                          f"batch={med['mean_batch']:6.1f} p50={med['p50_ms']:.3f}ms p99={med['p99_ms']:.3f}ms "
                          f"compiled={med['compile_count']:g} during run={med['compiles_during_run']:g}", flush=True)

        # One caller, max_delay 0. With the first policy, first the padding of random-size requests
        # (while the service's stats are fresh: it depends on the buckets, not the policy), then overhead.
        with rlbatch.PolicyService(policy.apply, params, example_obs=example_obs, buckets=args.buckets,
                                   max_delay=0.0, seed=args.seed, name=name + "-one-caller") as svc:
            with svc.register() as caller:
                if not paddings:
                    c0 = compiles.count
                    padding_waste(caller, obs_size, args)
                    st = svc.stats
                    paddings.append(dict(policy=name, requests=st.requests, padding_fraction=st.padding_fraction,
                                         expected_padding_fraction=uniform_sizes_padding(svc.buckets, max(svc.buckets)),
                                         bucket_padding={int(b): f for b, f in st.bucket_padding.items()},
                                         compiles_during_run=compiles.count - c0, compile_count=svc.compile_count))
                    print(f"{name:18s} padding waste {st.padding_fraction:.1%} over {st.requests} requests",
                          flush=True)
                bare_step, obs = policy_step.jit_policy_step(policy.apply), runs.observations[0]
                med = median_of([overhead(caller, bare_step, params, key, obs, args.duration)
                                 for _ in range(args.repeats)])
            overheads.append(dict(policy=name, **med))
            print(f"{name:18s} 1 caller: {med['rlbatch_us_per_request']:.1f} us/request, bare jitted call "
                  f"{med['bare_call_us']:.1f} us, overhead {med['overhead_us']:.1f} us", flush=True)

    for r in rows:
        seed = next(x for x in rows if x["policy"] == r["policy"] and x["threads"] == r["threads"]
                    and x["mode"] == "seed-style")
        r["ratio_to_seed_style"] = r["requests_per_s"] / seed["requests_per_s"]
    targets = evaluate_targets(rows, paddings, args)
    table = render(rows, overheads, paddings, targets, devices, args)
    print(table)
    outputs.write(args.out, dict(args=dataclasses.asdict(args), devices=devices, num_buckets=len(set(args.buckets)),
                                 rows=rows, overhead=overheads, padding=paddings, targets=targets), table)
    report.write_runs(reports, args.out)  # the library's report of every rlbatch run, and plots
    return rows


def evaluate_targets(rows, paddings, args):
    """The targets, measured (shown, never asserted: timings depend on the machine)."""
    targets = []
    most = max(args.threads)
    for r in rows:
        if r["mode"] == "rlbatch" and r["threads"] == most:
            floor = next(x["ratio_to_seed_style"] for x in rows if x["policy"] == r["policy"]
                         and x["threads"] == most and x["mode"] == "thread-floor")
            targets.append(dict(target=f"{r['policy']}: rlbatch >= 2.5x seed-style requests/s at {most} callers",
                                value=r["ratio_to_seed_style"], thread_floor=floor,
                                shown=f"{r['ratio_to_seed_style']:.2f}x (thread floor {floor:.2f}x)",
                                met=r["ratio_to_seed_style"] >= 2.5))
    during = sum(r["compiles_during_run"] for r in rows if r["mode"] == "rlbatch")
    during += sum(p["compiles_during_run"] for p in paddings)
    targets.append(dict(target="rlbatch: zero compilations after start", value=during, shown=str(during),
                        met=during == 0))
    for p in paddings:
        targets.append(dict(target=f"padding waste <= 25% for random request sizes 1..{max(args.buckets)}",
                            value=p["padding_fraction"], shown=f"{p['padding_fraction']:.1%}",
                            met=p["padding_fraction"] <= 0.25))
    return targets


def render(rows, overheads, paddings, targets, devices, args):
    lines = [f"Devices: {', '.join(devices)}. rlbatch buckets {tuple(args.buckets)}, max delay "
             f"{1e3 * args.max_delay:g} ms; seed-style pads to {args.seed_max_batch_size}; median of {args.repeats}; "
             f"CPU dispatch {'synchronous' if not jax.config.read('jax_cpu_enable_async_dispatch') else 'asynchronous'}.",
             "",
             "| policy | callers | mode | requests/s | x seed-style | wall us/request | mean batch | p50 ms | p99 ms "
             "| compiled shapes | compiles during run |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['threads']} | {r['mode']} | {r['requests_per_s']:,.0f} | "
                     f"{r['ratio_to_seed_style']:.2f} | {r['wall_us_per_request']:.1f} | {r['mean_batch']:.1f} | "
                     f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['compile_count']:g} | {r['compiles_during_run']:g} |")
    lines += ["", "Per-request overhead, one caller, max delay 0 (rlbatch pads to the smallest bucket; the bare "
              "call is a batch of 1 including np.asarray of its outputs):", "",
              "| policy | rlbatch us/request | bare jitted call us | overhead us |", "|---|---:|---:|---:|"]
    for o in overheads:
        lines.append(f"| {o['policy']} | {o['rlbatch_us_per_request']:.1f} | {o['bare_call_us']:.1f} | "
                     f"{o['overhead_us']:.1f} |")
    lines += ["", "Padding waste, one thread, request sizes uniform on 1..%d rows:" % max(args.buckets), "",
              "| policy | requests | padded fraction | exact expectation |", "|---|---:|---:|---:|"]
    for p in paddings:
        lines.append(f"| {p['policy']} | {p['requests']} | {p['padding_fraction']:.1%} | "
                     f"{p['expected_padding_fraction']:.1%} |")
    lines += ["", "| target | measured | met |", "|---|---:|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['shown']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(tyro.cli(Args, prog="python -m experiments.bench_policy", description=__doc__))
