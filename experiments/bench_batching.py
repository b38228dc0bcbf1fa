"""Benchmark of the batching core: client threads calling a batch function one item at a time.

Each of N client threads (1, 16, 64, 256) submits one item and waits for its result, again and
again, as an actor does. The batch function is trivial or a small numpy MLP; max batch 64, max
delay 2 ms. Beside rlbatch, in the same run:

- seed-style: the design of the seed libraries (a queue.Queue, a worker that gathers up to
  max_batch_size items or waits max_delay after the first, a concurrent.futures.Future per item:
  experiments.lib.seed_style.SeedStyleBatcher);
- unbatched: every thread calls the function itself on a batch of one;
- full batches: one thread calls the function on full batches of 64 (the function's own limit);
- thread-floor: each thread's "call" only waits until all N threads wait, released as relays the
  way rlbatch wakes its callers (experiments.lib.client_load.run_client_floor): no queue, no data, no
  function. The most any service whose callers block for their results can do on this machine.

Prints items/s, mean batch size, p50/p99 latency and CPU seconds per 1000 items (median of
--repeats runs), ratios to seed-style, the CPU an idle service uses, and the targets (10x
seed-style at 16 threads, 5x at 256) beside the thread floor's ratio.

    python -m experiments.bench_batching            # the full table (a few minutes)
    python -m experiments.bench_batching --quick    # a smoke run
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np
import tyro

import rlbatch
from experiments.lib import calibration, client_load, outputs, runtime, seed_style
from rlbatch import report


@dataclasses.dataclass(frozen=True)
class Args:
    threads: tuple[int, ...] = (1, 16, 64, 256)
    """numbers of client threads to measure"""
    max_batch_size: int = 64
    """largest batch"""
    max_delay: float = 0.002
    """seconds the oldest item of a batch may wait"""
    duration: float = 1.5
    """seconds of measurement per configuration and repeat"""
    repeats: int = 3
    """runs per configuration; the table shows the median"""
    pin_python: bool = True
    """confine the Python threads to one CPU after JAX starts (rlbatch.pin_threads): hand-offs stay on that CPU"""
    quick: bool = False
    """tiny settings for a smoke test (threads 1 and 16, 0.3 s, one repeat)"""
    out: str = "runs/bench_batching"
    """file stem for the JSON and markdown outputs"""


def trivial(xs):
    return xs


_RNG = np.random.default_rng(0)
_W1, _W2, _W3 = (_RNG.normal(size=s).astype(np.float32) for s in ((4, 64), (64, 64), (64, 2)))


def mlp(xs):
    h = np.tanh(np.stack(xs) @ _W1)
    h = np.tanh(h @ _W2)
    return list(h @ _W3)


FUNCTIONS = {"trivial": (trivial, lambda i: i), "numpy-mlp": (mlp, lambda i: np.full(4, i % 7, np.float32))}


def measure_clients(n, make_call, make_item, duration):
    """n threads calling in a loop for `duration` s: the table's columns of their ClientLoad."""
    return load_row(client_load.run_clients(n, make_call, make_item, duration))


def load_row(r):
    """The table's columns of a client_load.ClientLoad: items/s, p50/p99 ms and CPU s per 1000 items."""
    return dict(items_per_s=r.items_per_s, p50_ms=r.p50_ms, p99_ms=r.p99_ms, cpu_per_1k=r.cpu_s_per_1k)


def measure(mode, fn, make_item, n, args, reports=None):
    if mode == "rlbatch":
        svc = rlbatch.BatchedService(fn, args.max_batch_size, args.max_delay)
        r = measure_clients(n, lambda i: svc.register(), make_item, args.duration)
        r["mean_batch"] = svc.stats.mean_batch_size
        svc.close()
        if reports is not None:
            reports.append(report.summarize(service=svc.stats, config=dict(threads=n, mode=mode,
                                                                           function=fn.__name__)))
    elif mode == "rlbatch-unregistered":
        svc = rlbatch.BatchedService(fn, args.max_batch_size, args.max_delay)
        r = measure_clients(n, lambda i: svc.__call__, make_item, args.duration)
        r["mean_batch"] = svc.stats.mean_batch_size
        svc.close()
    elif mode == "seed-style":
        with seed_style.SeedStyleBatcher(fn, args.max_batch_size, args.max_delay) as b:
            r = measure_clients(n, lambda i: b.__call__, make_item, args.duration)
        r["mean_batch"] = b.mean_batch_size
    elif mode == "thread-floor":
        r = load_row(client_load.run_client_floor(n, args.duration))
        r["mean_batch"] = float(n)  # each round releases every thread
    elif mode == "unbatched":
        r = measure_clients(n, lambda i: (lambda x: fn([x])[0]), make_item, args.duration)
        r["mean_batch"] = 1.0
    else:
        raise ValueError(f"measure: expected a mode of {MODES}, got {mode!r}")
    return r


def full_batch_limit(fn, make_item, args):
    batch = [make_item(i) for i in range(args.max_batch_size)]
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.duration:
        fn(batch)
        n += len(batch)
    return n / (time.perf_counter() - t0)


def idle_cpu(seconds=1.0):
    svc = rlbatch.BatchedService(trivial, 64, 0.002)
    svc(1)
    c0 = time.process_time()
    time.sleep(seconds)
    used = time.process_time() - c0
    svc.close()
    return used


MODES = ("rlbatch", "rlbatch-unregistered", "seed-style", "unbatched", "thread-floor")
# The issue's targets: x the seed libraries' items/s (they reach about 7k at 16 threads, 20k at 256).
TARGETS = {16: 10.0, 256: 5.0}


def main(args: Args):
    print(runtime.pin_python_threads(args.pin_python))
    print(f"thread hand-off round trip: {calibration.handoff_round_trip_us():.1f} us (machine calibration)")
    if args.quick:
        args = dataclasses.replace(args, threads=(1, 16), duration=0.3, repeats=1)
    rows, reports = [], []
    for fname, (fn, make_item) in FUNCTIONS.items():
        limit = full_batch_limit(fn, make_item, args)
        for n in args.threads:
            for mode in MODES:
                runs = [measure(mode, fn, make_item, n, args, reports) for _ in range(args.repeats)]
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                rows.append(dict(function=fname, threads=n, mode=mode, full_batch_items_per_s=limit, **med))
                print(f"{fname:9s} threads={n:4d} {mode:21s} items/s={med['items_per_s']:9.0f} "
                      f"batch={med['mean_batch']:5.1f} p50={med['p50_ms']:.3f}ms p99={med['p99_ms']:.3f}ms "
                      f"cpu/1k={med['cpu_per_1k']:.4f}s", flush=True)
    idle = idle_cpu()
    lines = ["| function | threads | mode | items/s | x seed-style | mean batch | p50 ms | p99 ms | CPU s/1k items |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        seed = next(x for x in rows if x["function"] == r["function"] and x["threads"] == r["threads"]
                    and x["mode"] == "seed-style")
        r["ratio_to_seed_style"] = r["items_per_s"] / seed["items_per_s"]
        lines.append(f"| {r['function']} | {r['threads']} | {r['mode']} | {r['items_per_s']:,.0f} | "
                     f"{r['ratio_to_seed_style']:.2f} | {r['mean_batch']:.1f} | {r['p50_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} | {r['cpu_per_1k']:.4f} |")
    limits = {f: next(r["full_batch_items_per_s"] for r in rows if r["function"] == f) for f in FUNCTIONS}
    lines.append("")
    lines.append("Full batches of %d on one thread (the function's own limit): %s. Idle service CPU: %.4f s in 1 s." % (
        args.max_batch_size, ", ".join(f"{f} {v:,.0f} items/s" for f, v in limits.items()), idle))
    lines += ["", "| target | measured | thread floor | met |", "|---|---:|---:|---|"]
    targets = []
    for r in rows:
        want = TARGETS.get(r["threads"])
        if r["mode"] != "rlbatch" or want is None:
            continue
        floor = next(x["ratio_to_seed_style"] for x in rows if x["function"] == r["function"]
                     and x["threads"] == r["threads"] and x["mode"] == "thread-floor")
        targets.append(dict(function=r["function"], threads=r["threads"], target=want,
                            measured=r["ratio_to_seed_style"], thread_floor=floor, met=r["ratio_to_seed_style"] >= want))
        lines.append(f"| {r['function']}: rlbatch >= {want:g}x seed-style at {r['threads']} threads | "
                     f"{r['ratio_to_seed_style']:.2f}x | {floor:.2f}x | {'yes' if targets[-1]['met'] else 'NO'} |")
    table = "\n".join(lines)
    print(table)
    outputs.write(args.out, dict(args=dataclasses.asdict(args), rows=rows, idle_cpu_s=idle, full_batch=limits,
                                 targets=targets), table)
    report.write_runs(reports, args.out)  # the library's report of every rlbatch run, and plots
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args, prog="python -m experiments.bench_batching", description=__doc__))
