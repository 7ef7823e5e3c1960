"""Parameter trees as flat safetensors files of '/'-joined names: the format converted weights are
stored in, and the default weight-loader hook of every tower (models/towers)."""

import json
import os

import jax
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from rebalance_jax.infra import files
from rebalance_jax.infra.errors import InputError

_FIELDS_KEY = "rebalance_jax.config_fields"


def save_safetensors(path: str, params, fields: dict | None = None) -> None:
  """Writes `params` (a nested dict of arrays) atomically, with its content hash; `fields`
  ({config section: {field: value}}, e.g. a converter's) go into the file's metadata."""
  # Contiguous: safetensors writes an array's buffer as is, so a transposed view would be garbled
  # (np.require, not np.ascontiguousarray, which turns scalars into shape (1,)).
  flat = {"/".join(k): np.require(v, requirements="C") for k, v in
          traverse_util.flatten_dict(params).items()}
  metadata = {_FIELDS_KEY: json.dumps(fields)} if fields else None
  files.write_checked(path, lambda f: f.write(safetensors.numpy.save(flat, metadata)))


def saved_fields(path: str) -> dict:
  """The config fields `save_safetensors` recorded in the file ({} if none)."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise InputError(f"{path} does not exist")
  try:
    with safetensors.safe_open(path, "np") as f:
      metadata = f.metadata() or {}
    return json.loads(metadata.get(_FIELDS_KEY, "{}"))
  except Exception as e:  # safetensors raises its own error types for a damaged header
    raise InputError(f"{path} is not a readable safetensors file ({e})") from e


def load_safetensors(path: str, params_like, fresh: str | None = None) -> dict:
  """The tree of `params_like` (arrays or ShapeDtypeStructs) filled from `path`. Every name must
  match in both directions and every shape agree; otherwise an InputError lists the differences.
  Names containing `fresh` may be absent from the file all together: they keep `params_like`'s
  values (which must then be arrays)."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise InputError(f"{path} does not exist")
  try:
    stored = safetensors.numpy.load_file(path)
  except Exception as e:  # safetensors raises its own error types for a damaged header
    raise InputError(f"{path} is not a readable safetensors file ({e})") from e
  expected = {"/".join(k): v for k, v in traverse_util.flatten_dict(params_like).items()}
  kept = {k for k in expected if fresh and fresh in k}
  if kept & set(stored):
    kept = set()  # the file has them: they are loaded, and must all be there
  missing = sorted(set(expected) - set(stored) - kept)
  unused = sorted(set(stored) - set(expected))
  wrong = sorted(f"{k}: {stored[k].shape} in the file, {tuple(expected[k].shape)} expected"
                 for k in set(expected) & set(stored)
                 if stored[k].shape != tuple(expected[k].shape))
  problems = [f"{what} ({len(names)}): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
              for what, names in (("missing", missing), ("unused", unused), ("wrong shape", wrong))
              if names]
  if problems:
    raise InputError(f"{path} does not fit the tower: " + "; ".join(problems))
  flat = {tuple(k.split("/")): expected[k] if k in kept else stored[k].astype(expected[k].dtype)
          for k in expected}
  return jax.tree.map(np.asarray, traverse_util.unflatten_dict(flat))
