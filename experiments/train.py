"""The main job: train an agent on a gymnasium environment through the batched policy service.

Actor threads play the environment, asking a shared PolicyService for actions; a Trainer consumes
their trajectories, updates the learner (PPO or IMPALA) and publishes new parameters while they
play. Stops when solved (mean return of the last 100 episodes >= the threshold) or at the step or
time budget. Every run prints a periodic report line under a tqdm bar and the throughput report at
the end, and writes to --out: report.jsonl (the report, the learning curve, the checkpoint's path),
PNG plots of the learning curve and of throughput, checkpoint.npz (the learner state, step and
update counts, these arguments) and TensorBoard scalars in tensorboard/ (when tensorboardX is installed).

The environment picks the defaults (experiments/lib/presets.py): classic control (4 actor threads
x 8 environments, PPO with rl-baselines3-zoo's CartPole settings), gymnasium MuJoCo ids (PPO with a Gaussian policy, CleanRL's
ppo_continuous_action settings), ALE ids (actors owning EnvPool vector environments, the Nature CNN,
CleanRL's ppo_atari_envpool settings, or IMPALA's). A flag given explicitly wins over the preset.

    python -m experiments.train                          # CartPole-v1, PPO, 4 actors x 8 envs
    python -m experiments.train --seed 1 --agent impala
    python -m experiments.train --env rlbatch/Catch-v0 --solve-return 0.9
    python -m experiments.train --env HalfCheetah-v5
    python -m experiments.train --env ALE/Pong-v5 --agent impala
    python -m experiments.train --processes 2               # 2 actor processes on a local Ray
    python -m experiments.train --env HalfCheetah-v5 --resume runs/train/checkpoint.npz --total-steps 2000000
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Literal, NamedTuple, Optional

import jax
import optax
import tyro

import agents
import rlbatch
from experiments.lib import checkpoints, curves, fleet_job, presets, runtime, tasks, tensorboard
from experiments.lib.warmup import UpdateWarmUp
from rlbatch import report


@dataclasses.dataclass(frozen=True)
class Args:
    env: str = "CartPole-v1"
    """gymnasium id of the environment (ALE ids such as ALE/Pong-v5 play through EnvPool)"""
    agent: Literal["ppo", "impala"] = "ppo"
    """learner"""
    network: Optional[Literal["mlp", "cnn", "impala"]] = None
    """torso of the actor-critic (preset: mlp; cnn, the Nature CNN, for Atari)"""
    num_actors: Optional[int] = None
    """actor threads, per process with --processes (preset: 4 classic control, 4 MuJoCo, 2 Atari PPO, 4 Atari IMPALA)"""
    envs_per_actor: Optional[int] = None
    """environments per actor thread, sent to the policy as one request (preset: 8 classic control, 4 MuJoCo, 4 or 8 Atari)"""
    unroll_length: Optional[int] = None
    """T: steps per trajectory (preset: 16, 128 MuJoCo and Atari PPO, 20 Atari IMPALA)"""
    batch_size: Optional[int] = None
    """B: trajectories per learner update, times envs_per_actor columns (preset: 2 classic control, 4 MuJoCo, 2 or 4 Atari)"""
    queue_batches: Optional[int] = None
    """learner batches of finished trajectories the actors may have waiting; fewer keep the policy lag down
    (preset: 1 classic control, 4 otherwise)"""
    buckets: Optional[tuple[int, ...]] = None
    """padded batch sizes of the policy service, each compiled once (preset: 8 16 32 classic control)"""
    max_delay: float = 0.002
    """seconds a request may wait for its batch to fill"""
    inline_policy: bool = False
    """each actor runs its own request as a batch in its own thread (ActorPool inline_policy): no waiting for
    other actors and no hand-off to the service's thread; for a few actors of many environments each (one
    process; the fleet's processes keep the queue)"""
    seed: int = 0
    """seeds the parameters, the policy's key schedule and the environments"""
    # Seed 0 solved CartPole in 23.3 s pinned against 32.2 s not, on the 2-core machine.
    pin_python: bool = True
    """confine the Python threads to one CPU after JAX starts (rlbatch.pin_threads); with --processes, each
    actor process's threads to a CPU of its own instead; classic control only, since MuJoCo's steps and
    EnvPool's threads need every CPU"""
    total_steps: Optional[int] = None
    """env step budget, counting the steps of the run resumed from (preset: 2M classic, 1M MuJoCo, 10M Atari)"""
    max_seconds: Optional[float] = None
    """wall-clock budget in seconds of this run (preset: 300 classic, 3600 MuJoCo, 1800 Atari)"""
    solve_return: Optional[float] = None
    """stop once the mean return of the last --solve-window episodes reaches this; None: the env's reward threshold"""
    solve_window: int = 100
    """episodes in the solve rule's mean (and in the reported recent return)"""
    learning_rate: Optional[float] = None
    """optimizer step size (preset: 1e-3 classic, 3e-4 MuJoCo, 2.5e-4 Atari PPO, 6e-4 Atari IMPALA)"""
    anneal_lr: Optional[bool] = None
    """anneal the learning rate linearly to 0 over the step budget (preset: off classic, on MuJoCo and Atari)"""
    num_epochs: Optional[int] = None
    """PPO: passes over each batch (preset: 20 classic control, 10 MuJoCo, 4 Atari)"""
    num_minibatches: Optional[int] = None
    """PPO: minibatches per pass (preset: 1 classic control, 32 MuJoCo, 4 Atari)"""
    unroll_update: Optional[bool] = None
    """PPO: compile the epochs and minibatches without loops (agents.make_ppo unroll: XLA's CPU backend runs
    convolutions in a loop about 14x slower); preset: on for Atari, off otherwise"""
    clip_eps: Optional[float] = None
    """PPO: clipping of the probability ratio (preset: 0.2, 0.1 Atari)"""
    clip_value_loss: Optional[bool] = None
    """PPO: CleanRL's clipped value loss (preset: off classic, on MuJoCo and Atari)"""
    ent_coef: Optional[float] = None
    """entropy bonus (preset: 0 classic control and MuJoCo, 0.01 Atari)"""
    vf_coef: Optional[float] = None
    """value loss weight (preset: 0.5)"""
    max_grad_norm: Optional[float] = None
    """global gradient norm clip (preset: 0.5, 40 Atari IMPALA)"""
    gamma: Optional[float] = None
    """discount (preset: 0.98 classic control, 0.99 MuJoCo and Atari)"""
    gae_lambda: Optional[float] = None
    """PPO: GAE lambda (preset: 0.8 classic control, 0.95 MuJoCo and Atari)"""
    max_policy_lag: Optional[int] = None
    """drop trajectories staler than this many updates"""
    normalize_obs: Optional[bool] = None
    """normalise observations by running mean and variance kept in the learner state and applied inside the
    served policy (preset: on MuJoCo)"""
    normalize_reward: Optional[bool] = None
    """scale rewards by the running std of the discounted return, as CleanRL's NormalizeReward (preset: on MuJoCo)"""
    hidden: Optional[tuple[int, ...]] = None
    """widths of the hidden dense layers (preset: 64 64; 512 after the CNN; 256 256 with --hyperparams zoo)"""
    activation: Optional[Literal["tanh", "relu"]] = None
    """activation of the MLP torso (preset: tanh; relu with --hyperparams zoo)"""
    log_std_init: Optional[float] = None
    """initial log-std of the Gaussian policy, Box actions (preset: 0; -2 with --hyperparams zoo)"""
    hyperparams: Literal["default", "zoo"] = "default"
    """default: the family's preset (CleanRL's settings for MuJoCo and Atari); zoo: rl-baselines3-zoo's tuned PPO
    settings of --env where the zoo has them (HalfCheetah-v5, Hopper-v5), the sample-efficient ones SBX runs in
    experiments.compare_peers"""
    out: str = "runs/train"
    """directory for the report (JSON), plots, checkpoint and TensorBoard scalars"""
    progress: bool = True
    """show the tqdm bar"""
    plots: bool = True
    """draw PNG plots (needs matplotlib)"""
    track_tensorboard: bool = True
    """write TensorBoard scalars to <out>/tensorboard (CleanRL's tags) when tensorboardX, the tensorboard
    extra, is installed"""
    save_checkpoint: bool = True
    """write <out>/checkpoint.npz at the end of the run"""
    checkpoint_every: Optional[int] = None
    """also write the checkpoint every this many learner updates"""
    resume: Optional[str] = None
    """continue from this checkpoint: its parameters, optimizer state, update count and env steps"""
    processes: Optional[int] = None
    """N >= 1: play in N actor processes on Ray (rlbatch.distributed.ActorFleet, the ray extra) instead
    of this process's threads, each process with --num-actors actors x --envs-per-actor environments and
    its own batched inference, shipping groups of --batch-size trajectories; None: one process"""
    placement: Literal["local", "server"] = "local"
    """with --processes: inference in every actor process ("local") or in one server per node ("server")"""
    address: Optional[str] = None
    """with --processes: the Ray cluster to join (None: start a local Ray bound to 127.0.0.1)"""
    compilation_cache: str = runtime.DEFAULT_COMPILATION_CACHE
    """JAX's persistent compilation cache: later runs load the policy's buckets and the update from it ('' for none)"""


def make_network(args: Args, task: tasks.Task) -> agents.ActorCritic:
    """The actor-critic of (resolved) `args` for `task`'s spaces."""
    # Checkpoints written before --activation and --log-std-init existed hold None for them.
    return agents.make_actor_critic(task.action_space, task.example_obs, hidden=args.hidden, torso=args.network,
                                    activation=args.activation or _BEFORE_THE_FLAG["activation"],
                                    log_std_init=args.log_std_init or 0.0)


def updates_in_budget(args: Args) -> int:
    """Learner updates the step budget pays for: the horizon of the annealed learning rate."""
    return max(1, math.ceil(args.total_steps / (args.unroll_length * args.batch_size * args.envs_per_actor)))


def optimizer_steps_per_update(args: Args) -> int:
    return args.num_epochs * args.num_minibatches if args.agent == "ppo" else 1


def learning_rate(args: Args):
    """A float, or with anneal_lr an optax schedule over the learner's optimizer steps."""
    if not args.anneal_lr:
        return args.learning_rate
    return optax.linear_schedule(args.learning_rate, 0.0, updates_in_budget(args) * optimizer_steps_per_update(args))


def make_learner(args: Args, network: agents.ActorCritic) -> rlbatch.Learner:
    """The learner of (resolved) `args`."""
    common = dict(learning_rate=learning_rate(args), gamma=args.gamma, ent_coef=args.ent_coef, vf_coef=args.vf_coef,
                  max_grad_norm=args.max_grad_norm, normalize_obs=args.normalize_obs,
                  normalize_reward=args.normalize_reward)
    if args.agent == "ppo":
        return agents.make_ppo(network, num_epochs=args.num_epochs, num_minibatches=args.num_minibatches,
                               clip_eps=args.clip_eps, gae_lambda=args.gae_lambda,
                               clip_value_loss=args.clip_value_loss, unroll=args.unroll_update, **common)
    if args.agent == "impala":
        return agents.make_impala(network, **common)
    raise ValueError(f"--agent: expected ppo or impala, got {args.agent!r}")


class Job(NamedTuple):
    """A built run, not started: what `main` runs and what tests inspect before the first update."""

    args: Args  # resolved: no preset field is None
    task: tasks.Task
    learner: rlbatch.Learner
    policy: rlbatch.PolicyService  # with --processes: the ActorFleet (the sink the trainer publishes to)
    pool: rlbatch.ActorPool  # with --processes: the ActorFleet (the source of trajectories)
    trainer: rlbatch.Trainer
    resumed: Optional[dict[str, Any]]  # the checkpoint's metadata when resuming, else None

    @property
    def env_steps_offset(self) -> int:
        return 0 if self.resumed is None else int(self.resumed["env_steps"])

    def close(self) -> None:
        """Releases a job that will not run (`Trainer.run` closes what it ran)."""
        self.pool.stop()
        self.policy.close()


# What a checkpoint written before a network flag existed was trained with.
_BEFORE_THE_FLAG = {"activation": "tanh"}


def _check_resume(args: Args, path: str) -> dict:
    metadata = checkpoints.read_metadata(path)
    saved = metadata["args"]
    for key in ("env", "agent", "network", "hidden", "activation"):
        value = list(getattr(args, key)) if isinstance(getattr(args, key), tuple) else getattr(args, key)
        trained = saved.get(key, _BEFORE_THE_FLAG.get(key))
        if trained != value:
            raise ValueError(f"--resume {path}: the checkpoint was trained with --{key.replace('_', '-')} "
                             f"{trained!r}, this run has {value!r}")
    if metadata["env_steps"] >= args.total_steps:
        raise ValueError(f"--resume {path}: the checkpoint has {metadata['env_steps']:,} env steps already, "
                         f"--total-steps {args.total_steps:,} leaves none to do")
    return metadata


def build(args: Args) -> Job:
    """Resolves the presets, builds the learner, policy service, actor pool and trainer, and
    restores the checkpoint of `--resume` (its parameters are published before any actor starts)."""
    args = presets.resolve(args)
    if args.processes is not None and args.processes < 1:
        raise ValueError(f"--processes: expected N >= 1 actor processes, got {args.processes}")
    if args.processes is None and (args.placement != "local" or args.address is not None):
        raise ValueError(f"--placement and --address apply to a fleet: expected --processes N with them, got "
                         f"--placement {args.placement} --address {args.address} without --processes")
    resumed = _check_resume(args, args.resume) if args.resume else None
    task = tasks.probe(args.env)
    learner = make_learner(args, make_network(args, task))
    state = learner.init(jax.random.PRNGKey(args.seed), task.example_obs, task.action_space)
    # The update compiles in a thread of its own while the service compiles and the pool is built.
    warm_up = UpdateWarmUp(learner, state, task.example_obs, unroll_length=args.unroll_length,
                           columns=args.batch_size * args.envs_per_actor).start()
    if args.processes is not None:
        fleet = fleet_job.make_fleet(args, task, learner, state, num_processes=args.processes,
                                     placement=args.placement, address=args.address)
        trainer = rlbatch.Trainer(learner, fleet, fleet, state=state, batch_size=args.batch_size,
                                  max_policy_lag=args.max_policy_lag)
        try:
            if resumed is not None:
                trainer.restore(args.resume)  # before the processes start: they begin with its parameters
            # Ray and the processes start (imports, compiling the buckets) while the update compiles.
            fleet.start()
            warm_up.join()
        except BaseException:
            fleet.stop()
            raise
        return Job(args, task, learner, fleet, fleet, trainer, resumed)
    policy = rlbatch.PolicyService(learner.policy.apply, learner.params(state), example_obs=task.example_obs,
                                   buckets=args.buckets, max_delay=args.max_delay, seed=args.seed)
    pool = rlbatch.ActorPool(policy_service=policy, num_actors=args.num_actors, unroll_length=args.unroll_length,
                             envs_per_actor=args.envs_per_actor, seed=args.seed,
                             max_queue=args.queue_batches * args.batch_size,
                             recent_episodes=args.solve_window, inline_policy=args.inline_policy,
                             **tasks.pool_envs(task, args.env, args.num_actors))
    trainer = rlbatch.Trainer(learner, pool, policy, state=state, batch_size=args.batch_size,
                              max_policy_lag=args.max_policy_lag)
    if resumed is not None:
        trainer.restore(args.resume)
    warm_up.join()
    return Job(args, task, learner, policy, pool, trainer, resumed)


def main(args: Args) -> report.Summary:
    print(runtime.enable_compilation_cache(args.compilation_cache))
    print(rlbatch.configure_cpu_jax())
    # Not with --processes: Ray's processes, started from this thread, would inherit its one CPU.
    print(runtime.pin_python_threads(args.pin_python and presets.family_of(args.env) == "classic"
                                     and args.processes is None))
    job = build(args)
    args, offset = job.args, job.env_steps_offset
    if job.resumed is not None:
        print(f"resumed from {args.resume}: {offset:,} env steps, {job.trainer.updates} updates")
    threshold = args.solve_return if args.solve_return is not None else job.task.reward_threshold
    os.makedirs(args.out, exist_ok=True)
    config = dataclasses.asdict(args)
    curve = curves.LearningCurve(env_steps_offset=offset)
    saver = checkpoints.RunCheckpoints(os.path.join(args.out, "checkpoint.npz"), every=args.checkpoint_every,
                                       args=config, env_steps_offset=offset)
    from tqdm.auto import tqdm

    fleet = args.processes is not None
    recorder = (fleet_job.FleetRecorder(job.pool) if fleet
                else report.Recorder(job.pool, job.policy, echo=tqdm.write))  # a periodic line above the bar
    board = None
    if args.track_tensorboard and not tensorboard.tensorboard_available():
        print("TensorBoard scalars skipped: tensorboardX is not installed (pip install -e \".[tensorboard]\")")
    elif args.track_tensorboard:

        schedule = learning_rate(args)
        steps = optimizer_steps_per_update(args)
        board = tensorboard.TensorBoardLog(os.path.join(args.out, "tensorboard"),
                               pool=None if fleet else job.pool, policy=None if fleet else job.policy,
                               lag=job.trainer.lag, env_steps_offset=offset, config=config,
                               learning_rate_fn=(lambda u: schedule(u * steps)) if callable(schedule) else None)

    def on_update(progress: rlbatch.Progress) -> None:
        recorder.on_update(progress)
        curve.on_update(progress)
        if board is not None:
            board.on_update(progress)
        if args.save_checkpoint:
            saver.on_update(job.trainer, progress)

    training_started_at = time.time()  # Unix time: a comparison places it on its own clock (compare_peers)
    try:
        result = job.trainer.run(total_steps=args.total_steps - offset,
                                 until=rlbatch.solved(threshold if threshold is not None else float("inf"),
                                                      args.solve_window),
                                 progress=args.progress, max_seconds=args.max_seconds, on_update=on_update)
    finally:
        if board is not None:
            board.close()
    checkpoint = saver.save(job.trainer, job.pool.stats.env_steps) if args.save_checkpoint else None
    summary = recorder.finish(result, config=config)
    print(report.format_table(summary))
    if fleet:
        section = fleet_job.fleet_section(job.pool.stats)
        print(fleet_job.format_fleet(section))
    extra = {"learning_curve": curve.as_json(), "checkpoint": checkpoint, "env_steps_offset": offset,
             "resumed_from": args.resume, "updates_total": job.trainer.updates,
             "training_started_at": training_started_at,
             "solved_at": (None if result.solved_at_seconds is None
                           else training_started_at + result.solved_at_seconds)}
    if fleet:
        extra["fleet"] = section
    path = report.write(summary, args.out, plots=args.plots, extra=extra)
    if args.plots:
        curve.plot(args.out, title=args.env)
    print(f"report: {path}" + (f"\ncheckpoint: {checkpoint}" if checkpoint else ""))
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args, prog="python -m experiments.train", description=__doc__))
