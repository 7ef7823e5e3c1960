"""Regex rules over '/'-joined pytree paths (first match wins): shared by the optimizer's
parameter groups and the parameter sharding rules."""

import re
from collections.abc import Sequence
from typing import Any

import jax


def path_string(path) -> str:
  """'/'-joined keys of a pytree key path, e.g. 'text_encoder/layer0/mlp/fc1/kernel'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def paths(tree):
  """A pytree of path strings, shaped like `tree`."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path_string(path), tree)


def first_match(path: str, rules: Sequence[tuple[str, Any]], default: Any = None) -> Any:
  """The value of the first (regex, value) rule that matches `path`, else `default`."""
  return next((value for pattern, value in rules if re.search(pattern, path)), default)
