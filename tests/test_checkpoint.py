"""Checkpoints: exact round trips, no pickled code, a template that must match, atomic writes."""
import os
import re

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlbatch
from tests.test_trainer_with_actors import catch_setup


def tree():
    return {"layers": [{"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32([1.5, -2])},
                       {"w": jnp.ones((3, 1), jnp.bfloat16)}],
            "step": np.int64(7), "mask": np.array([True, False])}


def zeros_like(t):
    return jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), t)


def test_round_trip_keeps_every_leaf_exactly_with_shape_and_dtype(tmp_path):
    path = rlbatch.save_checkpoint(str(tmp_path / "sub" / "c.npz"), tree(), {"updates": 3, "note": "x"})
    assert path == str(tmp_path / "sub" / "c.npz")
    restored, meta = rlbatch.load_checkpoint(path, zeros_like(tree()))
    assert meta == {"updates": 3, "note": "x"}
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(tree())
    for a, b in zip(jax.tree_util.tree_leaves(tree()), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), b, strict=True)


def test_metadata_defaults_to_empty(tmp_path):
    path = rlbatch.save_checkpoint(str(tmp_path / "c.npz"), {"a": np.zeros(2)})
    assert rlbatch.load_checkpoint(path, {"a": np.ones(2)})[1] == {}


def test_a_template_of_another_structure_is_refused_naming_the_leaves(tmp_path):
    path = rlbatch.save_checkpoint(str(tmp_path / "c.npz"), {"a": np.zeros(2), "b": np.zeros(1)})
    with pytest.raises(rlbatch.CheckpointError, match=re.escape("""missing ["['c']"], unexpected ["['b']"]""")):
        rlbatch.load_checkpoint(path, {"a": np.zeros(2), "c": np.zeros(1)})


@pytest.mark.parametrize("leaf, got", [(np.zeros(3, np.float32), "float32[3]"), (np.zeros(2, np.int32), "int32[2]")])
def test_a_leaf_of_another_shape_or_dtype_is_refused(tmp_path, leaf, got):
    path = rlbatch.save_checkpoint(str(tmp_path / "c.npz"), {"a": leaf})
    with pytest.raises(rlbatch.CheckpointError, match=re.escape(f"leaf ['a'] expected float32[2], got {got}")):
        rlbatch.load_checkpoint(path, {"a": np.zeros(2, np.float32)})


def test_overwriting_leaves_no_temporary_file(tmp_path):
    for step in range(3):
        rlbatch.save_checkpoint(str(tmp_path / "c.npz"), {"a": np.full(2, step)})
    assert os.listdir(tmp_path) == ["c.npz"]
    np.testing.assert_array_equal(rlbatch.load_checkpoint(str(tmp_path / "c.npz"), {"a": np.zeros(2, int)})[0]["a"],
                                  [2, 2])


def test_checkpoint_round_trip_gives_identical_params_and_training_continues(tmp_path):
    learner, state, policy, pool = catch_setup(num_actors=4)
    with pool:
        batch = rlbatch.stack_trajectories([pool.get(timeout=30) for _ in range(4)])
    policy.close()
    state, _ = learner.update(state, batch)
    path = rlbatch.save_checkpoint(str(tmp_path / "ckpt.npz"), state, {"updates": 1})
    template = learner.init(jax.random.PRNGKey(123), np.zeros(50, np.float32), gymnasium.spaces.Discrete(3))
    restored, meta = rlbatch.load_checkpoint(path, template)
    assert meta == {"updates": 1}
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    s1, m1 = learner.update(state, batch)
    s2, m2 = learner.update(restored, batch)  # continued training from the restored state is identical
    for a, b in zip(jax.tree_util.tree_leaves(learner.params(s1)), jax.tree_util.tree_leaves(learner.params(s2))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    with open(path, "rb") as f:
        assert b"pickle" not in f.read()
    bad_template = {"w": np.zeros(3)}
    with pytest.raises(rlbatch.CheckpointError, match="missing"):
        rlbatch.load_checkpoint(path, bad_template)


def test_a_file_without_dtype_names_loads_by_its_array_dtypes(tmp_path):
    path = str(tmp_path / "c.npz")
    np.savez(path, **{"['a']": np.arange(3, dtype=np.int32), "__metadata__": np.asarray('{"updates": 2}')})
    restored, meta = rlbatch.load_checkpoint(path, {"a": np.zeros(3, np.int32)})
    np.testing.assert_array_equal(restored["a"], np.arange(3, dtype=np.int32), strict=True)
    assert meta == {"updates": 2}
