"""The main job from its users' side: each task family trains for a few seconds as a subprocess and
leaves what a training script's users expect (the JSON report with the learning curve, PNG plots,
TensorBoard scalars, a checkpoint that loads); a resumed run continues from the saved parameters and
step count; experiments.evaluate plays a checkpoint.

Budgets are tiny: these check what the runs write, never how well or how fast they learn (the
benchmarks measure that).
"""
import glob
import json
import os
import pathlib
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

import rlbatch
from experiments import evaluate, train
from experiments.lib import checkpoints, presets, tasks, zoo

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The CartPole runs: 8 actors, one bucket, B=8 trajectories of T=16 per update.
SMALL_CARTPOLE = ("--num-actors", "8", "--buckets", "8", "--batch-size", "8", "--unroll-length", "16")


def run_train(out, *flags, cwd=ROOT):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "--out", str(out), "--no-progress", *flags],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"train exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads((pathlib.Path(out) / "report.jsonl").read_text().splitlines()[-1])
    return report, proc.stdout


def read_scalars(log_dir):
    """{tag: [(step, value)]} of the TensorBoard event files in log_dir (TFRecord framing, Event protos)."""
    from experiments.lib.tensorboard import import_summary_writer

    import_summary_writer()  # imports tensorboardX without PyTorch
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        data = pathlib.Path(path).read_bytes()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + length])  # after length and its crc
            i += 12 + length + 4  # the data's crc
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def load_checkpoint_of(report):
    """The learner state in the report's checkpoint, loaded against a fresh state of its saved args."""
    path = report["checkpoint"]
    args = evaluate.saved_args(path)
    task = tasks.probe(args.env)
    learner = train.make_learner(args, train.make_network(args, task))
    return rlbatch.load_checkpoint(path, learner.init(jax.random.PRNGKey(1), task.example_obs, task.action_space))


def assert_common_report(report, out, *, family_flags):
    """What every family's run writes: report fields, curve, throughput plot, TensorBoard, checkpoint."""
    learning, curve = report["learning"], report["learning_curve"]
    assert learning["updates"] >= 1 and learning["stop_reason"] == "budget"
    assert len(curve["env_steps"]) == len(curve["seconds"]) == len(curve["return"]) == learning["updates"]
    assert curve["env_steps"] == sorted(curve["env_steps"])
    assert curve["env_steps"][-1] <= report["throughput"]["env_steps"]
    for key, value in family_flags.items():
        assert report["config"][key] == value, key
    assert (out / "report_steps_per_sec.png").stat().st_size > 0 or learning["updates"] == 1
    scalars = read_scalars(out / "tensorboard")
    for tag in ("charts/SPS", "charts/policy_lag_mean", "charts/batch_fill", "losses/policy_loss",
                "losses/value_loss", "losses/entropy", "losses/approx_kl"):
        assert len(scalars.get(tag, ())) == learning["updates"], (tag, sorted(scalars))
    assert [step for step, _ in scalars["charts/SPS"]] == curve["env_steps"]
    assert scalars["losses/policy_loss"][-1][1] == pytest.approx(learning["last_metrics"]["policy_loss"], rel=1e-5)
    metadata = checkpoints.read_metadata(report["checkpoint"])
    assert metadata["env_steps"] == report["throughput"]["env_steps"] + report["env_steps_offset"]
    assert metadata["updates"] == learning["updates"]
    return scalars


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory):
    out = tmp_path_factory.mktemp("cartpole")
    report, stdout = run_train(out, *SMALL_CARTPOLE, "--total-steps", "3000", "--checkpoint-every", "3")
    return out, report, stdout


def test_cartpole_run_writes_report_curve_plots_tensorboard_and_checkpoint(cartpole):
    out, report, stdout = cartpole
    scalars = assert_common_report(report, out, family_flags={"num_actors": 8, "learning_rate": 1e-3,
                                                              "anneal_lr": False, "network": "mlp"})
    curve = report["learning_curve"]
    finite = [r for r in curve["return"] if not np.isnan(r)]
    assert finite and curve["return"][-1] == pytest.approx(report["learning"]["recent_return_mean"], abs=50)
    assert [v for _, v in scalars["charts/episodic_return"]] == pytest.approx(finite)
    for png in ("learning_curve_steps.png", "learning_curve_seconds.png", "report_steps_per_sec.png"):
        assert (out / png).stat().st_size > 0, png
    assert f"checkpoint: {out / 'checkpoint.npz'}" in stdout
    state, metadata = load_checkpoint_of(report)
    assert int(state.step) == report["learning"]["updates"]  # PPOState.step: updates done
    assert metadata["args"]["env"] == "CartPole-v1" and metadata["args"]["total_steps"] == 3000


def test_checkpoints_are_written_every_n_updates_with_counts_and_args(tmp_path):
    class Trainer:
        state = {"w": np.zeros(3, np.float32)}
        updates = 0

    path = str(tmp_path / "c.npz")
    saver = checkpoints.RunCheckpoints(path, every=2, args={"env": "X"}, env_steps_offset=100)
    trainer = Trainer()
    for updates in (1, 2, 3):
        trainer.updates = updates
        trainer.state = {"w": np.full(3, updates, np.float32)}
        saver.on_update(trainer, rlbatch.Progress(env_steps=10 * updates, episodes=0, recent_return_mean=0.0,
                                                  updates=updates, elapsed=1.0, metrics={}))
    assert saver.saves == 1  # at update 2 only
    state, metadata = rlbatch.load_checkpoint(path, {"w": np.zeros(3, np.float32)})
    assert metadata == {"env_steps": 120, "updates": 2, "args": {"env": "X"}}
    np.testing.assert_array_equal(state["w"], np.full(3, 2.0))
    with pytest.raises(ValueError, match="--checkpoint-every: expected a positive int or None, got 0"):
        checkpoints.RunCheckpoints(path, every=0, args={})


def test_a_resumed_job_starts_from_the_saved_parameters_updates_and_steps(cartpole, tmp_path):
    _, report, _ = cartpole
    path = report["checkpoint"]
    metadata = checkpoints.read_metadata(path)
    args = train.Args(env="CartPole-v1", num_actors=8, buckets=(8,), batch_size=8, total_steps=6000,
                      resume=path, out=str(tmp_path))
    job = train.build(args)
    try:
        saved, _ = rlbatch.load_checkpoint(path, job.trainer.state)
        fresh = job.learner.init(jax.random.PRNGKey(0), job.task.example_obs, job.task.action_space)
        for got, want in zip(jax.tree_util.tree_leaves(job.trainer.state), jax.tree_util.tree_leaves(saved)):
            np.testing.assert_array_equal(np.asarray(got), want)
        # the checkpoint's parameters are trained ones, so a job that skipped the restore would fail above
        assert not np.array_equal(jax.tree_util.tree_leaves(fresh.params)[0],
                                  jax.tree_util.tree_leaves(saved.params)[0])
        for served, want in zip(jax.tree_util.tree_leaves(job.policy.params), jax.tree_util.tree_leaves(saved.params)):
            np.testing.assert_array_equal(np.asarray(served), want)  # the actors will play the saved policy
        assert job.trainer.updates == metadata["updates"] and job.env_steps_offset == metadata["env_steps"]
    finally:
        job.close()


def test_a_resumed_run_counts_its_steps_and_updates_after_the_saved_ones(cartpole, tmp_path):
    _, first, _ = cartpole
    saved = checkpoints.read_metadata(first["checkpoint"])
    total = saved["env_steps"] + 1500
    report, stdout = run_train(tmp_path, *SMALL_CARTPOLE, "--total-steps", str(total), "--resume", first["checkpoint"])
    assert f"resumed from {first['checkpoint']}: {saved['env_steps']:,} env steps, {saved['updates']} updates" in stdout
    assert report["env_steps_offset"] == saved["env_steps"] and report["resumed_from"] == first["checkpoint"]
    ran = report["throughput"]["env_steps"]
    assert total - saved["env_steps"] <= ran < total  # the budget counts the steps done before
    assert report["learning_curve"]["env_steps"][0] > saved["env_steps"]
    assert report["learning"]["updates"] > saved["updates"]
    metadata = checkpoints.read_metadata(report["checkpoint"])
    assert metadata["env_steps"] == saved["env_steps"] + ran and metadata["updates"] == report["learning"]["updates"]
    scalars = read_scalars(tmp_path / "tensorboard")
    assert min(step for step, _ in scalars["charts/SPS"]) > saved["env_steps"]


def test_evaluate_plays_a_checkpoint_and_prints_the_mean_of_its_returns(cartpole, capsys):
    _, report, _ = cartpole
    result = evaluate.main(evaluate.Args(checkpoint=report["checkpoint"], episodes=3, greedy=True))
    printed = capsys.readouterr().out
    assert len(result["returns"]) == 3 and all(r >= 1 for r in result["returns"])
    assert result["mean"] == pytest.approx(np.mean(result["returns"]))
    assert result["std"] == pytest.approx(np.std(result["returns"]))
    assert f"CartPole-v1: mean return {result['mean']:.2f} +- {result['std']:.2f} over 3 episodes" in printed
    assert json.loads(printed.strip().splitlines()[-1])["returns"] == result["returns"]


def test_evaluate_captures_a_video_of_each_episode(cartpole, tmp_path):
    _, report, _ = cartpole
    result = evaluate.main(evaluate.Args(checkpoint=report["checkpoint"], episodes=2, capture_video=True,
                                         video_dir=str(tmp_path / "videos")))
    videos = sorted((tmp_path / "videos").glob("*.mp4"))
    assert len(videos) == 2 and all(v.stat().st_size > 0 for v in videos)
    assert result["video_dir"] == str(tmp_path / "videos")


def test_halfcheetah_trains_ppo_with_a_gaussian_policy_and_cleanrl_settings(tmp_path):
    out = tmp_path / "out"
    # cwd: MuJoCo writes MUJOCO_LOG.TXT (a model deprecation warning) into the working directory.
    report, _ = run_train(out, "--env", "HalfCheetah-v5", "--total-steps", "1024", "--num-actors", "2",
                          "--envs-per-actor", "2", "--unroll-length", "64", "--batch-size", "2", "--num-epochs", "1",
                          "--buckets", "2", "4", "--inline-policy", cwd=tmp_path)
    # Each actor ran its own 2 rows as a batch: never merged with the other's into a batch of 4.
    assert report["config"]["inline_policy"] is True
    assert report["batching"]["batch_size_hist"] == {"2": report["batching"]["batches"]}
    scalars = assert_common_report(report, out, family_flags={
        "num_epochs": 1, "num_minibatches": 32, "learning_rate": 3e-4, "anneal_lr": True, "ent_coef": 0.0,
        "clip_eps": 0.2, "clip_value_loss": True, "gamma": 0.99, "gae_lambda": 0.95, "vf_coef": 0.5,
        "max_grad_norm": 0.5, "normalize_obs": True, "normalize_reward": True})
    rates = [v for _, v in scalars["charts/learning_rate"]]
    assert rates[0] < 3e-4 and rates == sorted(rates, reverse=True)  # annealed
    state, _ = load_checkpoint_of(report)
    assert state.params["params"]["log_std"].shape == (6,)  # a Gaussian over HalfCheetah's 6 joints


def test_pong_trains_on_envpool_vector_envs_with_the_cnn(tmp_path):
    out = tmp_path / "out"
    report, _ = run_train(out, "--env", "ALE/Pong-v5", "--total-steps", "64", "--num-actors", "1", "--batch-size", "1",
                          "--buckets", "4", "--unroll-length", "8", "--num-epochs", "1", "--num-minibatches", "1",
                          "--hidden", "16")
    assert_common_report(report, out, family_flags={"network": "cnn", "envs_per_actor": 4, "clip_eps": 0.1,
                                                    "learning_rate": 2.5e-4, "ent_coef": 0.01, "hidden": [16]})
    assert report["actors"]["num_envs"] == 4  # one actor owning the preset's 4 EnvPool environments
    assert report["batching"]["batch_size_hist"] == {"4": report["batching"]["batches"]}
    state, _ = load_checkpoint_of(report)
    net = state.params["params"]
    assert net["torso"]["Conv_2"]["kernel"].shape == (3, 3, 64, 64)  # the Nature CNN, frames first
    assert net["torso"]["Conv_0"]["kernel"].shape == (8, 8, 4, 32) and net["policy_head"]["kernel"].shape == (16, 6)


def test_presets_fill_what_the_user_left_unset_and_keep_what_they_set():
    cartpole = presets.resolve(train.Args())
    assert (cartpole.num_actors, cartpole.unroll_length, cartpole.batch_size, cartpole.learning_rate,
            cartpole.buckets, cartpole.hidden) == (4, 16, 2, 1e-3, (8, 16, 32), (64, 64))
    assert (cartpole.envs_per_actor, cartpole.num_epochs, cartpole.num_minibatches, cartpole.gamma) == (8, 20, 1, 0.98)
    cheetah = presets.resolve(train.Args(env="HalfCheetah-v5", learning_rate=1e-3, num_epochs=3))
    assert (cheetah.learning_rate, cheetah.num_epochs, cheetah.num_minibatches, cheetah.ent_coef) == (1e-3, 3, 32, 0.0)
    impala = presets.resolve(train.Args(env="ALE/Breakout-v5", agent="impala"))
    assert (impala.unroll_length, impala.max_grad_norm, impala.network) == (20, 40.0, "cnn")
    assert [presets.family_of(e) for e in ("CartPole-v1", "Hopper-v5", "ALE/Pong-v5", "rlbatch/Catch-v0")] == [
        "classic", "mujoco", "atari", "classic"]


def test_the_reports_extra_fields_never_replace_the_summarys(tmp_path):
    from rlbatch import report

    summary = report.summarize(config={"env": "X"})
    path = report.write(summary, str(tmp_path), plots=False, extra={"learning_curve": {"env_steps": [1]}})
    line = json.loads(pathlib.Path(path).read_text())
    assert line["config"] == {"env": "X"} and line["learning_curve"] == {"env_steps": [1]}
    with pytest.raises(ValueError, match=r"extra fields must not replace the summary's, got \['config'\]"):
        report.write(summary, str(tmp_path), plots=False, extra={"config": {}})


def test_zoo_hyperparams_are_the_zoos_tuned_ppo_entry_laid_out_on_the_actors():
    cheetah = presets.resolve(train.Args(env="HalfCheetah-v5", hyperparams="zoo"))
    entry = zoo.ZOO_PPO["HalfCheetah-v5"]
    # The zoo's 1 env x 512 steps per update, as 2 trajectory groups of 4 columns x 64 steps.
    assert cheetah.batch_size * cheetah.envs_per_actor * cheetah.unroll_length == entry["n_envs"] * entry["n_steps"]
    assert cheetah.unroll_length * cheetah.batch_size * cheetah.envs_per_actor // cheetah.num_minibatches == 64
    assert (cheetah.learning_rate, cheetah.anneal_lr, cheetah.num_epochs, cheetah.clip_eps, cheetah.gamma,
            cheetah.gae_lambda, cheetah.ent_coef, cheetah.vf_coef, cheetah.max_grad_norm) == (
        2.0633e-05, False, 20, 0.1, 0.98, 0.92, 0.000401762, 0.58096, 0.8)
    assert (cheetah.hidden, cheetah.activation, cheetah.log_std_init, cheetah.normalize_obs,
            cheetah.normalize_reward, cheetah.clip_value_loss) == ((256, 256), "relu", -2.0, True, True, False)
    assert (cheetah.queue_batches, cheetah.max_policy_lag) == (1, 1)
    hopper = presets.resolve(train.Args(env="Hopper-v5", hyperparams="zoo", num_epochs=7))
    assert (hopper.num_epochs, hopper.num_minibatches, hopper.gamma) == (7, 16, 0.999)  # the flag wins
    default = presets.resolve(train.Args(env="HalfCheetah-v5"))
    assert (default.activation, default.log_std_init, default.hidden) == ("tanh", 0.0, (64, 64))
    with pytest.raises(ValueError, match="expected an env with an rl-baselines3-zoo PPO entry"):
        presets.resolve(train.Args(env="Walker2d-v5", hyperparams="zoo"))
    with pytest.raises(ValueError, match="clip range is a schedule"):
        presets.resolve(train.Args(env="CartPole-v1", hyperparams="zoo"))
    with pytest.raises(ValueError, match="the zoo's tuned settings are PPO's"):
        presets.resolve(train.Args(env="Hopper-v5", hyperparams="zoo", agent="impala"))


def test_resume_takes_a_checkpoint_from_before_activation_existed_as_tanh(monkeypatch):
    saved = dict(env="HalfCheetah-v5", agent="ppo", network="mlp", hidden=[64, 64])  # no "activation" key
    monkeypatch.setattr(checkpoints, "read_metadata", lambda path: dict(args=saved, env_steps=10))
    tanh = presets.resolve(train.Args(env="HalfCheetah-v5"))
    assert train._check_resume(tanh, "old.npz")["env_steps"] == 10
    relu = presets.resolve(train.Args(env="HalfCheetah-v5", activation="relu"))
    with pytest.raises(ValueError, match="trained with --activation 'tanh', this run has 'relu'"):
        train._check_resume(relu, "old.npz")
