"""Benchmark of PolicyService: caller threads asking a jitted JAX policy for one action at a time.

Each of N caller threads (16, 64, 256) registers with the service and calls it in a loop with ONE
observation, waiting for each result, as an actor does. Two plain-jax policies that sample a
categorical action and return extras `log_prob` and `value`: a CartPole-sized 4-64-64-2 tanh MLP and
a larger 64-256-256-18 one. In the same run, beside rlbatch (default buckets 8..256, max delay 2 ms):

- seed-style: the seed libraries' design (a queue.Queue, a worker that gathers up to 64
  observations or waits 2 ms after the first, np.stack, pads to 64 with the last row, calls the
  jitted policy, one concurrent.futures.Future per item) around the same jitted policy;
- no-buckets: the same batcher without padding, up to 256 rows like rlbatch, calling a plain
  jax.jit of the policy on exactly-sized batches, so every batch size not met before compiles
  during the run (the jit's cache is kept across the runs of one policy, as a long-running service
  would keep it). A PolicyService with buckets 1..256 would compile 256 shapes at start; this
  measures what skipping buckets costs without waiting for that.

Also measured: the per-request overhead of rlbatch over a bare jitted call (1 caller, max delay 0),
and the padding waste of the default buckets when one thread sends requests of uniformly random
sizes 1..256 rows. Prints requests/s, ratio to seed-style, mean batch size, p50/p99 latency and
compilations (median of --repeats runs), and the targets:
>= 2.5x seed-style at 256 callers, no compilation after start, padding waste <= 25%.

    python -m experiments.bench_policy            # the full table (several minutes)
    python -m experiments.bench_policy --quick    # a smoke run (under a minute on a CPU)
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import queue
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

import rlbatch
from rlbatch import cli

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
    """padding measure: multi-row requests of uniformly random sizes 1..largest bucket, sent by one
    thread to the first policy"""
    seed: int = 0
    """seeds the parameters, the observations and the policies' key schedule"""
    quick: bool = False
    """tiny settings for a smoke test (16 and 256 callers, 0.5 s, one repeat, 300 padding requests)"""
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


def make_step(apply_fn):
    """A fresh jax.jit of one policy step with PolicyService's key schedule (batch i: fold_in(key, i)).

    Fresh each call (a new function object), so its compilation cache starts empty.
    """

    def step(params, obs, key, i):
        return apply_fn(params, obs, jax.random.fold_in(key, i))

    return jax.jit(step)


class CompileCounter:
    """Counts XLA backend compilations in this process (jax.monitoring), to check 'none after start'."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, duration, **kwargs):
        if name == self.EVENT:
            self.count += 1


# ---------------------------------------------------------------------- the baseline batcher


class SeedStyleBatcher:
    """The seed libraries' design around a jitted policy, for comparison.

    A queue.Queue of (observation, Future); one worker gathers up to max_batch_size of them, or
    what came within max_delay of the first, stacks them with np.stack, calls the jitted step, and
    sets one concurrent.futures.Future per item. With pad=True every batch is padded to
    max_batch_size (one compiled shape); with pad=False the step sees the exact batch size, and
    every new size is a new compilation. `batch_sizes` holds the sizes the step was called with.
    """

    def __init__(self, step_fn, params, key, max_batch_size: int, max_delay: float, pad: bool):
        self.step_fn, self.params, self.key = step_fn, params, key
        self.max_batch_size, self.max_delay, self.pad = max_batch_size, max_delay, pad
        self.batch_sizes: set[int] = set()
        self.batches = self.items = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="seed-style", daemon=True)
        self._thread.start()

    def __call__(self, obs):
        f = concurrent.futures.Future()
        self._queue.put((obs, f))
        return f.result()

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
                self._run(batch)
            except BaseException as e:  # noqa: BLE001 - every waiting caller hears of it
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)

    def _run(self, batch):
        n = len(batch)
        obs = np.stack([x for x, _ in batch])
        if self.pad and n < self.max_batch_size:
            # Repeating a real row keeps the padding a valid input (zeros may not be one).
            obs = np.concatenate([obs, np.repeat(obs[-1:], self.max_batch_size - n, axis=0)])
        self.batch_sizes.add(len(obs))
        action, extras = jax.device_get(self.step_fn(self.params, obs, self.key, np.uint32(self.batches)))
        self.batches += 1
        self.items += n
        for j, (_, f) in enumerate(batch):
            f.set_result((action[j], {k: v[j] for k, v in extras.items()}))

    def close(self):
        self._queue.put(None)
        self._thread.join()


# ---------------------------------------------------------------------- measurements


def run_callers(n, open_caller, observations, duration):
    """n threads, each calling `open_caller(i)` with one observation in a loop for `duration` s.

    A caller with a `close` (a registered PolicyCaller) is closed when its thread is done, so the
    service stops counting it for early flush. Returns requests/s and p50/p99 latency in ms.
    """
    barrier = threading.Barrier(n + 1)
    latencies = [None] * n
    stop_at = [0.0]

    def client(i):
        call = open_caller(i)
        obs = observations[i]
        lat = []
        barrier.wait()
        end = stop_at[0]
        t = _clock()
        while t < end:
            call(obs)
            t2 = _clock()
            lat.append(t2 - t)
            t = t2
        latencies[i] = lat
        close = getattr(call, "close", None)
        if close is not None:
            close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    stop_at[0] = _clock() + duration
    t0 = _clock()
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = _clock() - t0
    lat = np.concatenate([np.asarray(x) for x in latencies])
    return dict(requests_per_s=len(lat) / elapsed, p50_ms=1e3 * float(np.median(lat)),
                p99_ms=1e3 * float(np.quantile(lat, 0.99)))


def measure(mode, ctx, n, args, compiles):
    """One run of `mode` with n callers; ctx holds the policy's service, step, params and observations."""
    observations = ctx["observations"]
    c0 = compiles.count
    if mode == "rlbatch":
        svc = ctx["service"]
        before = svc.stats
        r = run_callers(n, lambda i: svc.register(), observations, args.duration)
        after = svc.stats
        r["mean_batch"] = (after.rows - before.rows) / max(after.batches - before.batches, 1)
        r["compile_count"] = svc.compile_count
    elif mode in ("seed-style", "no-buckets"):
        if mode == "seed-style":
            step, size, pad = ctx["seed_step"], args.seed_max_batch_size, True
        else:
            step, size, pad = ctx["exact_step"], max(args.buckets), False
        b = SeedStyleBatcher(step, ctx["params"], ctx["key"], size, args.max_delay, pad=pad)
        r = run_callers(n, lambda i: b.__call__, observations, args.duration)
        b.close()
        r["mean_batch"] = b.items / max(b.batches, 1)
        # Shapes compiled so far: seed-style its one padded shape (before the runs); no-buckets every
        # batch size it met, in this run or an earlier one with this policy (its jit cache is kept,
        # as a long-running service would keep it).
        ctx["shapes"][mode] |= b.batch_sizes
        r["compile_count"] = len(ctx["shapes"][mode])
    else:
        raise ValueError(mode)
    r["compiles_during_run"] = compiles.count - c0
    r["wall_us_per_request"] = 1e6 / r["requests_per_s"]
    return r


def padding_waste(caller, obs_size, args):
    """One thread sends multi-row requests of uniformly random sizes; each runs alone in its batch."""
    rng = np.random.default_rng(args.seed)
    largest = max(args.buckets)
    for k in rng.integers(1, largest + 1, size=args.padding_requests):
        caller(rng.normal(size=(int(k), obs_size)).astype(np.float32))


def expected_padding(buckets, largest):
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


MODES = ("rlbatch", "seed-style", "no-buckets")


def median_of(runs):
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(args: Args):
    if args.quick:
        args = dataclasses.replace(args, threads=(16, 256), duration=0.5, repeats=1, padding_requests=300)
    devices = [str(d) for d in jax.devices()]
    print(f"jax.devices(): {devices}", flush=True)
    compiles = CompileCounter()
    rng = np.random.default_rng(args.seed)
    rows, overheads, paddings = [], [], []
    for name in args.policies:
        obs_size, hidden, num_actions = POLICIES[name]
        policy = mlp_policy(obs_size, hidden, num_actions)
        example_obs = np.zeros(obs_size, np.float32)
        key = jax.random.PRNGKey(args.seed)
        params = policy.init(key, example_obs)
        seed_step = make_step(policy.apply)
        warm = np.zeros((args.seed_max_batch_size, obs_size), np.float32)
        jax.device_get(seed_step(params, warm, key, np.uint32(0)))  # its one shape, compiled before the runs
        ctx = dict(params=params, key=key, seed_step=seed_step, exact_step=make_step(policy.apply),
                   shapes={"seed-style": set(), "no-buckets": set()},
                   observations=rng.normal(size=(max(args.threads), obs_size)).astype(np.float32))
        with rlbatch.PolicyService(policy.apply, params, example_obs=example_obs, buckets=args.buckets,
                                   max_delay=args.max_delay, seed=args.seed, name=name) as svc:
            ctx["service"] = svc
            for n in args.threads:
                for mode in MODES:
                    med = median_of([measure(mode, ctx, n, args, compiles) for _ in range(args.repeats)])
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
                                         expected_padding_fraction=expected_padding(svc.buckets, max(svc.buckets)),
                                         bucket_padding={int(b): f for b, f in st.bucket_padding.items()},
                                         compiles_during_run=compiles.count - c0, compile_count=svc.compile_count))
                    print(f"{name:18s} padding waste {st.padding_fraction:.1%} over {st.requests} requests",
                          flush=True)
                bare_step, obs = make_step(policy.apply), ctx["observations"][0]
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
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(args=dataclasses.asdict(args), devices=devices, num_buckets=len(set(args.buckets)),
                       rows=rows, overhead=overheads, padding=paddings, targets=targets), f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")
    return rows


def evaluate_targets(rows, paddings, args):
    """The targets, measured (shown, never asserted: timings depend on the machine)."""
    targets = []
    most = max(args.threads)
    for r in rows:
        if r["mode"] == "rlbatch" and r["threads"] == most:
            targets.append(dict(target=f"{r['policy']}: rlbatch >= 2.5x seed-style requests/s at {most} callers",
                                value=r["ratio_to_seed_style"], shown=f"{r['ratio_to_seed_style']:.2f}x",
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
             f"{1e3 * args.max_delay:g} ms; seed-style pads to {args.seed_max_batch_size}; median of {args.repeats}.",
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
    main(cli.parse(Args))
