"""The costs a fleet of actor processes pays on Ray, and the learner's ingest rate, on this machine.

The figures that docs/scale.md scales up to 10,000 actors on 100 nodes, each a median over repeats:

- round trip: one Ray actor-method call and its answer, with a CartPole batch of 4 float32 rows as
  argument and result (what placement "server" pays per local batch);
- parameter broadcast: one publish as ActorFleet.update_params does it: `ray.put` of the parameters
  once, then N processes (1, 2, 4) each get them (the reference as a call's argument, which Ray
  resolves in the process) and copy every leaf once (what PolicyService.update_params's device_put
  does on a CPU). Parameters: the CartPole actor-critic MLP and the Atari Nature CNN actor-critic of
  the main job (agents, as experiments.train builds them) and a synthetic tree of `large_mb` MB.
  Publish ms runs from the put until every process has answered; MB/s is the bytes delivered (N x
  params) over that time;
- trajectory groups: N processes (1, 2, 4) each returning stacked groups of trajectories (the fields
  of rlbatch.Trajectory, `final_obs` included, as a fleet process ships them) to the driver, two
  calls outstanding per process (ActorFleet's `fetches_per_process`); the driver gets each group and
  copies it once (as the learner's batch is assembled). Groups: Atari (T=128 x 8 environments of
  4x84x84 uint8) and CartPole (T=32 x 128 environments of 4 float32). Groups/s and MB/s over the
  whole round, median of `rounds` rounds;
- learner ingest: one PPO update (the main job's presets: experiments.train's make_learner) on a
  batch of zeros of the actors' shapes, CartPole MLP and Nature CNN, on this machine's JAX device;
  samples/s = T x columns over the update's time (each sample is used epochs x minibatches times
  inside it). The first call (compilation) is timed apart.

On one machine Ray's object store is shared memory: a get maps the object, nothing crosses a
network; the cross-node costs in docs/scale.md come from published network and Ray figures.

Ray starts bound to 127.0.0.1 (rlbatch.distributed.cluster.connect) and is shut down at the end,
every actor ended first. Outputs: `--out`.md (tables naming the machine and every payload's size)
and `--out`.json (every row, and `figures`: a flat name -> value map that docs/scale.md's
placeholders name).

    python -m experiments.bench_ray_io            # about 2-3 minutes on 2 cores
    python -m experiments.bench_ray_io --quick    # a smoke run, under 30 s: small payloads, few repeats
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Mapping

import jax
import numpy as np
import ray
import tyro

from experiments import train
from experiments.lib import outputs, presets, runtime, tasks
from experiments.lib.warmup import example_batch
from rlbatch.distributed.cluster import connect, end_actors

_clock = time.perf_counter

# The fields of rlbatch.Trajectory, shipped as a dict so that the peers need numpy only.
_STEP_FIELDS = ("action", "reward", "terminated", "truncated", "log_prob", "value", "policy_version", "episode_id")
_STEP_DTYPES = dict(action=np.int32, reward=np.float32, terminated=np.bool_, truncated=np.bool_,
                    log_prob=np.float32, value=np.float32, policy_version=np.int64, episode_id=np.int64)


@dataclasses.dataclass(frozen=True)
class Args:
    processes: tuple[int, ...] = (1, 2, 4)
    """Ray actor processes that get each publish / ship groups at once"""
    large_mb: float = 100.0
    """size of the synthetic parameter tree (MB, float32)"""
    round_trips: int = 300
    """actor-method round trips timed"""
    broadcast_repeats: int = 9
    """publishes timed per parameter tree and process count"""
    atari_group: tuple[int, int] = (128, 8)
    """(T, environments) of an Atari group: obs [T+1, envs, 4, 84, 84] uint8"""
    cartpole_group: tuple[int, int] = (32, 128)
    """(T, environments) of a CartPole group: obs [T+1, envs, 4] float32"""
    groups_per_round: int = 16
    """groups each process ships per round"""
    rounds: int = 3
    """rounds of the group measurement (median)"""
    mlp_batch: tuple[int, int] = (16, 64)
    """(T, columns) of the CartPole learner batch"""
    cnn_batch: tuple[int, int] = (16, 4)
    """(T, columns) of the Nature CNN learner batch (small: this is a CPU)"""
    learner_repeats: int = 3
    """timed updates per network, after the compiling one"""
    seed: int = 0
    """seeds the networks' parameters"""
    compilation_cache: str = runtime.DEFAULT_COMPILATION_CACHE
    """JAX's persistent compilation cache ('' for none)"""
    quick: bool = False
    """a smoke run: small payloads and groups, processes 1 and 2, few repeats"""
    out: str = "runs/bench_ray_io"
    """file stem for the JSON and Markdown outputs"""


QUICK = dict(processes=(1, 2), large_mb=8.0, round_trips=20, broadcast_repeats=2, atari_group=(16, 4),
             cartpole_group=(8, 32), groups_per_round=2, rounds=1, mlp_batch=(4, 4), cnn_batch=(2, 2),
             learner_repeats=1)


def machine() -> dict:
    return dict(cpus=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                ray=ray.__version__, jax=jax.__version__, jax_device=str(jax.devices()[0]))


def machine_line(m: dict) -> str:
    return f"{m['cpus']} CPUs, {m['platform']}, Python {m['python']}, Ray {m['ray']}, JAX {m['jax']} on {m['jax_device']}"


# ---------------------------------------------------------------------- in the Ray processes

def copy_leaves(tree) -> int:
    """Copies every array of a tree of dicts, lists and tuples once; returns the bytes copied."""
    if isinstance(tree, Mapping):
        return sum(copy_leaves(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(copy_leaves(v) for v in tree)
    return np.array(tree, copy=True).nbytes


def make_group(obs_shape: tuple, obs_dtype: str, unroll_length: int, envs: int) -> dict:
    """A stacked group of trajectories as a fleet process ships it: obs [T+1, envs, ...], final_obs
    [T, envs, ...] (zeros where no episode ended, full size all the same), per-step fields [T, envs]."""
    T, n = unroll_length, envs
    group = dict(obs=np.ones((T + 1, n) + tuple(obs_shape), obs_dtype),
                 final_obs=np.zeros((T, n) + tuple(obs_shape), obs_dtype),
                 actor_id=np.arange(n, dtype=np.int64))
    for name in _STEP_FIELDS:
        group[name] = np.ones((T, n), _STEP_DTYPES[name])
    return group


class Peer:
    """One actor process of the measurements (run as a Ray actor)."""

    def __init__(self):
        self._group = None

    def echo(self, batch):
        return batch

    def receive(self, params) -> int:
        """A publish arriving: Ray resolved the reference; copies it as a service would."""
        return copy_leaves(params)

    def prepare(self, obs_shape: tuple, obs_dtype: str, unroll_length: int, envs: int) -> int:
        self._group = make_group(obs_shape, obs_dtype, unroll_length, envs)
        return copy_leaves(self._group)

    def ship(self) -> dict:
        return self._group  # Ray copies it into the object store with every return


# ---------------------------------------------------------------------- measurements (the driver)

def tree_nbytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)))


def measure_round_trip(peer, repeats: int) -> dict:
    batch = np.zeros((4, 4), np.float32)
    ray.get(peer.echo.remote(batch))
    times = []
    for _ in range(repeats):
        t0 = _clock()
        ray.get(peer.echo.remote(batch))
        times.append(_clock() - t0)
    times.sort()
    return dict(measure="round_trip", payload="CartPole batch 4 x 4 float32", payload_bytes=batch.nbytes,
                calls=repeats, median_ms=1e3 * statistics.median(times),
                p90_ms=1e3 * times[min(len(times) - 1, int(0.9 * len(times)))])


def publish_once(params, peers: list) -> tuple[float, float]:
    """(put seconds, publish seconds): one ray.put, every peer gets and copies the parameters."""
    t0 = _clock()
    ref = ray.put(params)
    t1 = _clock()
    copied = ray.get([p.receive.remote(ref) for p in peers])
    t2 = _clock()
    expected = tree_nbytes(params)
    if any(c != expected for c in copied):
        raise RuntimeError(f"broadcast: every process should have copied {expected} bytes, got {copied}")
    return t1 - t0, t2 - t0


def measure_broadcast(name: str, params, peers: list, n: int, repeats: int) -> dict:
    publish_once(params, peers[:n])  # the processes unpickle this tree's types once
    puts, publishes = zip(*[publish_once(params, peers[:n]) for _ in range(repeats)])
    nbytes = tree_nbytes(params)
    seconds = statistics.median(publishes)
    return dict(measure="broadcast", payload=name, payload_bytes=nbytes, processes=n, repeats=repeats,
                leaves=len(jax.tree_util.tree_leaves(params)), put_ms=1e3 * statistics.median(puts),
                publish_ms=1e3 * seconds, delivered_mb_per_s=n * nbytes / seconds / 1e6)


def ship_round(peers: list, groups_each: int) -> float:
    """Seconds until the driver got and copied `groups_each` groups from every peer, two calls out
    per peer, as an ActorFleet keeps them."""
    pending, asked = {}, {i: 0 for i in range(len(peers))}
    t0 = _clock()
    for i, peer in enumerate(peers):
        for _ in range(min(2, groups_each)):
            pending[peer.ship.remote()] = i
            asked[i] += 1
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        copy_leaves(ray.get(ready[0]))
        if asked[i] < groups_each:
            pending[peers[i].ship.remote()] = i
            asked[i] += 1
    return _clock() - t0


def measure_groups(name: str, spec: tuple, peers: list, n: int, groups_each: int, rounds: int) -> dict:
    obs_shape, obs_dtype, unroll_length, envs = spec
    sizes = ray.get([p.prepare.remote(obs_shape, obs_dtype, unroll_length, envs) for p in peers[:n]])
    ship_round(peers[:n], 1)  # warm-up
    seconds = statistics.median([ship_round(peers[:n], groups_each) for _ in range(rounds)])
    groups_per_s = n * groups_each / seconds
    obs_bytes = int(np.prod((unroll_length + 1, envs) + tuple(obs_shape)) * np.dtype(obs_dtype).itemsize)
    return dict(measure="group", payload=name, shape=f"T={unroll_length} x {envs} envs x {list(obs_shape)} {obs_dtype}",
                payload_bytes=sizes[0], obs_bytes=obs_bytes, processes=n, groups=n * groups_each,
                rounds=rounds, groups_per_s=groups_per_s, mb_per_s=groups_per_s * sizes[0] / 1e6,
                env_steps_per_s=groups_per_s * unroll_length * envs)


def build_learner(env_id: str, seed: int):
    """The main job's learner for `env_id` (its presets), its state and the task."""
    args = presets.resolve(train.Args(env=env_id))
    task = tasks.probe(env_id)
    learner = train.make_learner(args, train.make_network(args, task))
    state = learner.init(jax.random.PRNGKey(seed), task.example_obs, task.action_space)
    return args, task, learner, state


def measure_learner(name: str, built, batch_shape: tuple, repeats: int) -> dict:
    args, task, learner, state = built
    T, columns = batch_shape
    batch = example_batch(learner, learner.params(state), task.example_obs, T, columns)
    t0 = _clock()
    state, _ = jax.block_until_ready(learner.update(state, batch))
    compile_s = _clock() - t0
    times = []
    for _ in range(repeats):
        t0 = _clock()
        state, _ = jax.block_until_ready(learner.update(state, batch))
        times.append(_clock() - t0)
    seconds = statistics.median(times)
    return dict(measure="learner", payload=name, payload_bytes=tree_nbytes(batch), batch=f"T={T} x {columns}",
                samples=T * columns, epochs=args.num_epochs, minibatches=args.num_minibatches,
                repeats=repeats, first_call_s=compile_s, update_ms=1e3 * seconds,
                samples_per_s=T * columns / seconds)


def synthetic_params(megabytes: float) -> dict:
    """Four float32 leaves of `megabytes` MB together."""
    n = max(1, int(megabytes * 1e6 / 4 / 4))
    return {f"layer{i}": {"kernel": np.ones(n, np.float32)} for i in range(4)}


# ---------------------------------------------------------------------- results

def figures(rows: list[dict], m: dict) -> dict:
    """The flat name -> value map that docs/scale.md's placeholders name."""
    out = {"machine.cpus": m["cpus"], "machine.platform": m["platform"]}
    for r in rows:
        key = f"{r['measure']}.{r['payload']}" + (f".p{r['processes']}" if "processes" in r else "")
        if r["measure"] == "round_trip":
            out["round_trip.median_ms"] = r["median_ms"]
            out["round_trip.p90_ms"] = r["p90_ms"]
        elif r["measure"] == "broadcast":
            out[f"broadcast.{r['payload']}.bytes"] = r["payload_bytes"]
            out[f"{key}.publish_ms"] = r["publish_ms"]
            out[f"{key}.put_ms"] = r["put_ms"]
            out[f"{key}.delivered_mb_per_s"] = r["delivered_mb_per_s"]
        elif r["measure"] == "group":
            out[f"group.{r['payload']}.bytes"] = r["payload_bytes"]
            out[f"{key}.groups_per_s"] = r["groups_per_s"]
            out[f"{key}.mb_per_s"] = r["mb_per_s"]
            out[f"{key}.env_steps_per_s"] = r["env_steps_per_s"]
        elif r["measure"] == "learner":
            out[f"{key}.samples_per_s"] = r["samples_per_s"]
            out[f"{key}.update_ms"] = r["update_ms"]
    return out


def render(rows: list[dict], m: dict, quick: bool) -> str:
    mb = lambda b: f"{b / 1e6:,.3f} MB"  # noqa: E731
    lines = [f"## Ray I/O and learner ingest{' (--quick)' if quick else ''}", "",
             f"Machine: {machine_line(m)}. One machine: the object store is shared memory, nothing crosses "
             "a network."]
    # (measure, the line above its table, its columns, one row's cells)
    sections = (
        ("round_trip", "", ("round trip", "payload", "median ms", "p90 ms", "calls"),
         lambda r: (f"actor method, {m['cpus']} CPUs", f"{r['payload']} ({r['payload_bytes']} B)",
                    f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}", r["calls"])),
        ("broadcast", f"Parameter broadcast ({m['cpus']} CPUs): one ray.put, then N processes get and copy the tree.",
         ("params", "size", "leaves", "processes", "put ms", "publish ms", "delivered MB/s"),
         lambda r: (r["payload"], mb(r["payload_bytes"]), r["leaves"], r["processes"], f"{r['put_ms']:.2f}",
                    f"{r['publish_ms']:.2f}", f"{r['delivered_mb_per_s']:,.0f}")),
        ("group", f"Trajectory groups to the driver ({m['cpus']} CPUs): N processes, two calls out each; the "
                  "driver gets and copies every group.",
         ("group", "shape", "size (obs)", "processes", "groups/s", "MB/s", "env steps/s"),
         lambda r: (r["payload"], r["shape"], f"{mb(r['payload_bytes'])} ({mb(r['obs_bytes'])})", r["processes"],
                    f"{r['groups_per_s']:,.1f}", f"{r['mb_per_s']:,.0f}", f"{r['env_steps_per_s']:,.0f}")),
        ("learner", f"Learner ingest ({m['cpus']} CPUs, {m['jax_device']}): one PPO update of the main job's presets.",
         ("network", "batch", "batch size", "epochs x minibatches", "first call s", "update ms", "samples/s"),
         lambda r: (r["payload"], r["batch"], mb(r["payload_bytes"]), f"{r['epochs']} x {r['minibatches']}",
                    f"{r['first_call_s']:.2f}", f"{r['update_ms']:.1f}", f"{r['samples_per_s']:,.0f}")),
    )
    for measure, intro, columns, cells in sections:
        lines += [""] + ([intro, ""] if intro else [])
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(c) for c in cells(r)) + " |" for r in rows if r["measure"] == measure]
    return "\n".join(lines)


def main(args: Args) -> dict:
    if args.quick:
        args = dataclasses.replace(args, **QUICK)
    print(runtime.enable_compilation_cache(args.compilation_cache))
    m = machine()
    rows: list[dict] = []
    # The learners first, without Ray's processes beside them; their parameters are then broadcast.
    mlp = build_learner("CartPole-v1", args.seed)
    cnn = build_learner("ALE/Pong-v5", args.seed)
    rows.append(measure_learner("cartpole-mlp", mlp, args.mlp_batch, args.learner_repeats))
    rows.append(measure_learner("nature-cnn", cnn, args.cnn_batch, args.learner_repeats))
    trees = [("cartpole-mlp", jax.device_get(mlp[2].params(mlp[3]))),
             ("nature-cnn", jax.device_get(cnn[2].params(cnn[3]))),
             (f"synthetic-{args.large_mb:g}mb", synthetic_params(args.large_mb))]
    groups = [("atari", ((4, 84, 84), "uint8") + tuple(args.atari_group)),
              ("cartpole", ((4,), "float32") + tuple(args.cartpole_group))]
    most = max(args.processes)
    owns_ray = connect(None, max(os.cpu_count() or 1, most + 1))
    peers = []
    try:
        peers = [ray.remote(Peer).options(num_cpus=1).remote() for _ in range(most)]
        ray.get([p.__ray_ready__.remote() for p in peers])
        rows.insert(0, measure_round_trip(peers[0], args.round_trips))
        for name, params in trees:
            for n in args.processes:
                rows.append(measure_broadcast(name, params, peers, n, args.broadcast_repeats))
        for name, spec in groups:
            for n in args.processes:
                rows.append(measure_groups(name, spec, peers, n, args.groups_per_round, args.rounds))
    finally:
        ended = end_actors(peers, [], timeout=30.0)
        if owns_ray:
            ray.shutdown()
    if not ended:
        raise RuntimeError(f"bench_ray_io: expected its {len(peers)} Ray processes to end within 30 s, "
                           "Ray reported some still alive")
    for r in rows:
        r["machine"] = f"{m['cpus']} CPUs, {m['platform']}"
    table = render(rows, m, args.quick)
    print(table)
    result = dict(args=dataclasses.asdict(args), machine=m, rows=rows, figures=figures(rows, m))
    outputs.write(args.out, result, table)
    return result


if __name__ == "__main__":
    main(tyro.cli(Args, prog="python -m experiments.bench_ray_io", description=__doc__))
