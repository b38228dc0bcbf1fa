"""Throughput sweep: ActorPool + PolicyService steps/s over actors, grouping, buckets, delay and env.

For every environment (CartPole-v1; rlbatch/Latency-v0, CartPole sleeping 1 ms per step; and
rlbatch/Catch-v0, a [50] observation and 3 actions) and every combination of num_actors x
envs_per_actor x buckets x max_delay, a fresh PolicyService (its buckets compiled when it starts)
serves the same small MLP policy as bench_actors (obs-64-64-actions tanh, sampling its action;
experiments.bench_policy.mlp_policy) to a fresh ActorPool. Each run is measured for `duration` s
after `warmup` s while the main thread drains the trajectories, as a trainer would; pool.stats is
sampled every `sample_every` s for the time series, and the run's throughput report is the
rlbatch.report.Summary its report.Recorder builds.

In the same sweep, for each environment and total number of environments N = num_actors x
envs_per_actor, the baselines of experiments.lib.env_loops with the same jitted policy: a SyncVectorEnv
loop with one policy call per step on all N observations, and N unbatched actor threads each
calling the policy on a batch of one.

Writes <out>.md (the table: steps/s measured after warm-up, ratios to both baselines, and the
report's mean batch, padding and latency, which cover the whole run, warm-up included),
<out>.json (args, devices, every row with its summary, the baselines, the best configuration per
environment and, with --latency-budget-ms, experiments.lib.tuning.suggest_settings' suggestion per
environment; the summaries leave out their raw latency samples) and, with matplotlib, <out>_steps_per_sec.png (a
bar per configuration and baseline) and the report's plots of each environment's best
configuration, <out>_best_<env>_*.png.

    python -m experiments.throughput                              # the full sweep (several minutes)
    python -m experiments.throughput --quick                      # 6 short runs (well under 2 minutes)
    python -m experiments.throughput --quick --latency-budget-ms 5
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import NamedTuple, Optional

import gymnasium
import jax
import numpy as np
import tyro
from tqdm import tqdm

import envs  # noqa: F401 - registers the rlbatch/ environments
import rlbatch
from experiments.bench_actors import env_factory
from experiments.bench_policy import mlp_policy
from experiments.lib import calibration, env_loops, outputs, policy_step, runtime, tuning
from rlbatch import report


@dataclasses.dataclass(frozen=True)
class Args:
    """ActorPool + PolicyService throughput sweep against a SyncVectorEnv loop and unbatched threads."""

    envs: tuple[str, ...] = ("CartPole-v1", "rlbatch/Latency-v0", "rlbatch/Catch-v0")
    """gymnasium ids of the environments (flat Box observations, Discrete actions)"""
    num_actors: tuple[int, ...] = (16, 64, 256)
    """numbers of actor threads to sweep"""
    envs_per_actor: tuple[int, ...] = (1, 4)
    """environments per actor to sweep, each actor sending its environments' observations as one request"""
    buckets: tuple[str, ...] = ("8,16,32,64,128,256", "16,64,256")
    """bucket sets to sweep, each comma-separated (--buckets 8,16,32 16,64); the largest is the max batch size"""
    max_delay: tuple[float, ...] = (0.0005, 0.002)
    """seconds the oldest request of a batch may wait, to sweep"""
    step_latency: float = 0.001
    """seconds rlbatch/Latency-v0 sleeps in every step"""
    unroll_length: int = 32
    """T: steps per trajectory"""
    max_queue: int = 64
    """trajectories the pool's queue holds (the main thread drains it)"""
    hidden: tuple[int, ...] = (64, 64)
    """hidden layer sizes of the MLP policy"""
    warmup: float = 0.5
    """seconds each run (and baseline) plays before its measurement starts"""
    duration: float = 2.0
    """seconds of measurement per run and baseline"""
    sample_every: float = 0.1
    """seconds between samples of pool.stats for the report's time series"""
    seed: int = 0
    """seeds the parameters, the policy's key schedule and the environments"""
    latency_budget_ms: Optional[float] = None
    """p99 request latency budget in ms: print and store suggested settings per environment (tuning.suggest_settings)"""
    pin_python: bool = True
    """confine the Python threads to one CPU after JAX starts (rlbatch.pin_threads): hand-offs stay on that CPU"""
    quick: bool = False
    """a smoke run: 16 single-env actors, buckets 8,16, max delay 0.5 and 2 ms, 0.2 s warm-up and 0.6 s per run"""
    progress: bool = True
    """show the tqdm bar over configurations"""
    plots: bool = True
    """draw PNG plots (needs matplotlib: pip install -e .[plots])"""
    out: str = "runs/throughput"
    """file stem for the markdown, JSON and PNG outputs"""


QUICK = dict(num_actors=(16,), envs_per_actor=(1,), buckets=("8,16",), max_delay=(0.0005, 0.002), warmup=0.2,
             duration=0.6)
BASELINES = ("sync-vector", "unbatched")


class Config(NamedTuple):
    env: str
    num_actors: int
    envs_per_actor: int
    buckets: tuple[int, ...]
    max_delay: float

    @property
    def num_envs(self) -> int:
        return self.num_actors * self.envs_per_actor

    def label(self) -> str:
        return (f"{self.env} {self.num_actors}x{self.envs_per_actor} buckets {','.join(map(str, self.buckets))} "
                f"delay {1e3 * self.max_delay:g} ms")


def parse_buckets(text: str) -> tuple[int, ...]:
    try:
        buckets = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        buckets = ()
    if not buckets or buckets[0] < 1:
        raise ValueError(f"--buckets: expected comma-separated positive ints like 8,16,32, got {text!r}")
    return buckets


class EnvPolicy(NamedTuple):
    """One environment's policy: the same parameters for the service and the baselines."""

    make_env: object
    example_obs: np.ndarray
    apply: object
    params: object
    act: object  # baselines' act_fn(obs [B, ...], i) -> actions, the same jitted step


def env_policy(env_id: str, args: Args) -> EnvPolicy:
    make_env = env_factory(env_id, args)
    probe = make_env()
    obs_space, action_space = probe.observation_space, probe.action_space
    probe.close()
    if not isinstance(action_space, gymnasium.spaces.Discrete) or not isinstance(obs_space, gymnasium.spaces.Box) \
            or len(obs_space.shape) != 1:
        raise ValueError(f"--envs: {env_id} needs a flat Box observation and Discrete actions for the MLP policy, "
                         f"got {obs_space} and {action_space}")
    mlp = mlp_policy(obs_space.shape[0], tuple(args.hidden), int(action_space.n))
    key = jax.random.PRNGKey(args.seed)
    example_obs = np.zeros(obs_space.shape, np.float32)
    params = mlp.init(key, example_obs)
    act = policy_step.policy_act_fn(policy_step.jit_policy_step(mlp.apply), params, key)
    return EnvPolicy(make_env, example_obs, mlp.apply, params, act)


# ---------------------------------------------------------------------- one run, one baseline


def run_config(cfg: Config, policy: EnvPolicy, args: Args) -> dict:
    """One ActorPool + PolicyService run: the table's row, with the run's report.Summary."""
    with rlbatch.PolicyService(policy.apply, policy.params, example_obs=policy.example_obs, buckets=cfg.buckets,
                               max_delay=cfg.max_delay, seed=args.seed) as svc:
        pool = rlbatch.ActorPool(policy.make_env, svc, num_actors=cfg.num_actors, unroll_length=args.unroll_length,
                                 envs_per_actor=cfg.envs_per_actor, seed=args.seed, max_queue=args.max_queue)
        recorder = report.Recorder(pool, svc, every=None)
        with pool:
            rate = env_loops.measure_pool(pool, svc, warmup=args.warmup, duration=args.duration,
                                          sample=recorder.sample, sample_every=args.sample_every)
        config = dict(cfg._asdict(), buckets=list(cfg.buckets), num_envs=cfg.num_envs,
                      warmup=args.warmup, duration=args.duration)
        summary = recorder.finish(config=config)
    b = summary.batching
    return dict(env=cfg.env, num_actors=cfg.num_actors, envs_per_actor=cfg.envs_per_actor, num_envs=cfg.num_envs,
                buckets=list(cfg.buckets), max_delay=cfg.max_delay, steps_per_s=rate.steps_per_s,
                mean_batch=b.mean_batch_size, padding_fraction=b.padding_fraction,
                latency_p50_ms=b.latency_p50_ms, latency_p99_ms=b.latency_p99_ms,
                batch_size_hist=dict(b.batch_size_hist), compile_count=b.compile_count, summary=summary)


def run_baseline(mode: str, env_id: str, num_envs: int, policy: EnvPolicy, args: Args) -> dict:
    timing = dict(warmup=args.warmup, duration=args.duration, seed=args.seed)
    run = env_loops.run_sync_vector if mode == "sync-vector" else env_loops.run_unbatched
    rate = run(policy.make_env, policy.act, num_envs, **timing)
    return dict(env=env_id, num_envs=num_envs, mode=mode, steps_per_s=rate.steps_per_s,
                num_actors=rate.num_actors, envs_per_actor=rate.envs_per_actor, mean_batch=rate.mean_batch)


# ---------------------------------------------------------------------- main


def main(args: Args) -> dict:
    print(rlbatch.configure_cpu_jax())
    print(runtime.pin_python_threads(args.pin_python))
    print(f"thread hand-off round trip: {calibration.handoff_round_trip_us():.1f} us (machine calibration)")
    if args.quick:
        args = dataclasses.replace(args, **QUICK)
    bucket_sets = [parse_buckets(b) for b in args.buckets]
    devices = [str(d) for d in jax.devices()]
    print(f"jax.devices(): {devices}", flush=True)
    configs = [Config(env, a, k, b, d) for env in args.envs for a in args.num_actors for k in args.envs_per_actor
               for b in bucket_sets for d in args.max_delay]
    jobs = []
    for env in args.envs:
        for n in sorted({c.num_envs for c in configs if c.env == env}):
            jobs += [(mode, env, n) for mode in BASELINES]
        jobs += [("pool", c.env, c) for c in configs if c.env == env]

    rows, base_rows, policies = [], [], {}
    with tqdm(total=len(jobs), desc="throughput", unit="run", disable=not args.progress) as bar:
        for kind, env, what in jobs:
            if env not in policies:
                policies[env] = env_policy(env, args)
            bar.set_postfix_str(what.label() if kind == "pool" else f"{env} {kind} {what} envs")
            if kind == "pool":
                row = run_config(what, policies[env], args)
                rows.append(row)
                tqdm.write(f"{what.label():58s} steps/s={row['steps_per_s']:9.0f} batch={row['mean_batch']:6.1f} "
                           f"p99={row['latency_p99_ms']:.2f}ms")
            else:
                row = run_baseline(kind, env, what, policies[env], args)
                base_rows.append(row)
                tqdm.write(f"{env} {kind:11s} envs={what:<5d} steps/s={row['steps_per_s']:9.0f}")
            bar.update(1)

    for r in rows:
        for mode in BASELINES:
            base = next(b for b in base_rows if b["env"] == r["env"] and b["num_envs"] == r["num_envs"]
                        and b["mode"] == mode)
            r["ratio_to_" + mode.replace("-", "_")] = r["steps_per_s"] / base["steps_per_s"]
    best = {env: max((i for i, r in enumerate(rows) if r["env"] == env), key=lambda i: rows[i]["steps_per_s"])
            for env in args.envs}
    suggestions = suggest(rows, args) if args.latency_budget_ms is not None else None
    table = render(rows, base_rows, best, suggestions, devices, args)
    print(table)

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    plots = draw(rows, base_rows, best, args) if args.plots else []
    for r in rows:  # the raw latency samples stay out of the JSON (they are in the best runs' plots)
        r["summary"] = r["summary"].as_json()
        del r["summary"]["batching"]["latency_samples_ms"]
    result = dict(args=dataclasses.asdict(args), devices=devices, rows=rows, baselines=base_rows,
                  best={env: dict(row_index=i, config=rows[i]["summary"]["config"]) for env, i in best.items()},
                  suggestions=suggestions, plots=plots)
    outputs.write(args.out, result, table, default=float)
    if suggestions is not None:
        for env, s in suggestions.items():
            if "error" in s:
                print(f"\n{env}: {s['error']}")
            else:
                print(f"\n{env}: suggested max_batch_size={s['max_batch_size']}, max_delay="
                      f"{1e3 * s['max_delay']:g} ms, buckets={tuple(s['buckets'])}\n  {s['reason']}")
    return result


def suggest(rows, args) -> dict:
    """tuning.suggest_settings for each environment's rows, or the reason there is none."""
    out = {}
    for env in args.envs:
        measured = [tuning.SweepRow.from_json(r, i) for i, r in enumerate(r for r in rows if r["env"] == env)]
        try:
            out[env] = tuning.suggest_settings(measured, args.latency_budget_ms).as_dict()
        except ValueError as e:
            out[env] = {"error": str(e)}
    return out


def render(rows, base_rows, best, suggestions, devices, args) -> str:
    lines = [f"Devices: {', '.join(devices)}. Policy obs-{'-'.join(map(str, args.hidden))}-actions MLP, "
             f"T={args.unroll_length}; steps/s over {args.duration:g} s after {args.warmup:g} s warm-up; mean "
             f"batch, padding and latency from the run's report (whole run). * = best of its env.",
             "",
             "| env | actors x envs | buckets | max delay ms | steps/s | x sync-vector | x unbatched | mean batch "
             "| padding % | p50 ms | p99 ms |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    best_rows = set(best.values())
    for i, r in enumerate(rows):
        star = " *" if i in best_rows else ""
        lines.append(f"| {r['env']} | {r['num_actors']} x {r['envs_per_actor']} | {','.join(map(str, r['buckets']))} "
                     f"| {1e3 * r['max_delay']:g} | {r['steps_per_s']:,.0f}{star} | {r['ratio_to_sync_vector']:.2f} "
                     f"| {r['ratio_to_unbatched']:.2f} | {r['mean_batch']:.1f} | {100 * r['padding_fraction']:.1f} "
                     f"| {r['latency_p50_ms']:.2f} | {r['latency_p99_ms']:.2f} |")
    lines += ["", "| env | envs | baseline | steps/s |", "|---|---:|---|---:|"]
    for b in base_rows:
        lines.append(f"| {b['env']} | {b['num_envs']} | {b['mode']} | {b['steps_per_s']:,.0f} |")
    if suggestions is not None:
        lines += ["", f"Suggested settings for a p99 latency budget of {args.latency_budget_ms:g} ms "
                  "(experiments.lib.tuning.suggest_settings):", "",
                  "| env | max_batch_size | max delay ms | buckets | expected padding % |", "|---|---:|---:|---|---:|"]
        for env, s in suggestions.items():
            if "error" in s:
                lines.append(f"| {env} | - | - | - | - |")
            else:
                lines.append(f"| {env} | {s['max_batch_size']} | {1e3 * s['max_delay']:g} | "
                             f"{','.join(map(str, s['buckets']))} | {100 * s['expected_padding']:.1f} |")
    return "\n".join(lines)


def draw(rows, base_rows, best, args) -> list[str]:
    """The steps/s bar chart and the report's plots of each environment's best run; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install -e .[plots])")
        return []
    out_dir, stem = os.path.dirname(args.out) or ".", os.path.basename(args.out)
    fig, axes = plt.subplots(len(args.envs), 1, squeeze=False,
                             figsize=(8, sum(1.5 + 0.25 * sum(r["env"] == e for r in rows + base_rows)
                                             for e in args.envs)))
    for ax, env in zip(axes[:, 0], args.envs):
        items = [(f"{r['num_actors']}x{r['envs_per_actor']} buckets {','.join(map(str, r['buckets']))} "
                  f"delay {1e3 * r['max_delay']:g} ms", r["steps_per_s"], "tab:blue") for r in rows if r["env"] == env]
        items += [(f"{b['mode']} N={b['num_envs']}", b["steps_per_s"], "tab:gray") for b in base_rows
                  if b["env"] == env]
        ax.barh([label for label, _, _ in items], [v for _, v, _ in items], color=[c for _, _, c in items])
        ax.invert_yaxis()
        ax.set_title(env)
        ax.set_xlabel("env steps / s")
    path = os.path.join(out_dir, f"{stem}_steps_per_sec.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths = [path]
    for env, i in best.items():
        paths += report.plot(rows[i]["summary"], out_dir, f"{stem}_best_{re.sub(r'[^A-Za-z0-9]+', '_', env)}")
    return paths


if __name__ == "__main__":
    main(tyro.cli(Args, prog="python -m experiments.throughput", description=__doc__))
