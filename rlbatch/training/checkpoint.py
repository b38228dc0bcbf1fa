"""Checkpoints as plain .npz files: every array of a pytree under its key path, no pickled code.

    rlbatch.save_checkpoint("run/ckpt.npz", learner_state, metadata={"env_steps": 12345})
    state, metadata = rlbatch.load_checkpoint("run/ckpt.npz", template=learner.init(key, obs, space))

Loading needs a template of the same structure (a freshly initialised state): the file holds only
arrays and JSON strings (the metadata and each leaf's dtype name), so nothing in it can run code;
each leaf is checked against the template's shape and dtype. The dtype names are stored because
.npz keeps extension dtypes such as bfloat16 only as raw bytes (`|V2`).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax
import numpy as np

from rlbatch.errors import CheckpointError

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]

_META = "__metadata__"
_DTYPES = "__dtypes__"


def _leaves(tree):
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def save_checkpoint(path: str, tree: Any, metadata: dict | None = None) -> str:
    """Writes `tree`'s arrays (and JSON-able metadata) to `path` atomically; returns the path."""
    arrays = {}
    for name, leaf in _leaves(tree):
        arrays[name] = np.asarray(jax.device_get(leaf))
    dtypes = {name: str(arr.dtype) for name, arr in arrays.items()}
    arrays[_META] = np.asarray(json.dumps(metadata or {}))
    arrays[_DTYPES] = np.asarray(json.dumps(dtypes))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # a crash mid-write never leaves a half-written checkpoint at `path`
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path: str, template: Any) -> tuple[Any, dict]:
    """Reads a checkpoint into the structure of `template`; returns (tree, metadata)."""
    with np.load(path, allow_pickle=False) as data:
        stored = set(data.files) - {_META, _DTYPES}
        dtypes = json.loads(str(data[_DTYPES])) if _DTYPES in data.files else {}
        names = [name for name, _ in _leaves(template)]
        missing, extra = set(names) - stored, stored - set(names)
        if missing or extra:
            raise CheckpointError(f"checkpoint {path}: expected leaves {sorted(names)}, "
                                  f"missing {sorted(missing)}, unexpected {sorted(extra)}")
        leaves = []
        for name, like in _leaves(template):
            arr = data[name]
            like = np.asarray(like)
            dtype = dtypes.get(name, str(arr.dtype))
            if arr.shape != like.shape or dtype != str(like.dtype):
                raise CheckpointError(f"checkpoint {path}: leaf {name} expected {like.dtype}{list(like.shape)}, "
                                      f"got {dtype}{list(arr.shape)}")
            leaves.append(arr if arr.dtype == like.dtype else arr.view(like.dtype))  # raw bytes of bfloat16 etc.
        metadata = json.loads(str(data[_META])) if _META in data.files else {}
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, leaves), metadata
