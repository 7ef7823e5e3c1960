"""The tower contract and registry: a config `kind` string -> one image or text tower.

A tower module is built from its frozen config dataclass and returns a `TowerOutput`: image towers
are called as `tower(images, train)` on preprocessed float images (B, S, S, 3), text towers as
`tower(ids, mask, train)`. Each kind also owns its preprocessing (image towers: `image_size`,
`mean`, `std` fields, applied by `preprocess_images`) and a weight-loader hook that reads a
converted checkpoint (`init` in the config) into the tower's parameter tree.

In a config a tower is `dict(kind=..., init=..., <fields of the kind's config dataclass>)`
(`config.defaults.tower`); `spec_from_config` turns it into a `TowerSpec`. Nothing outside this
package names a tower type: a new tower is one module in this package that calls `register` (every
module here is imported on first use), or a `register` call from the user's own code.
"""

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rebalance_jax.infra.errors import InputError
from rebalance_jax.models import weights
from rebalance_jax.models.layers import DTYPES

MODALITIES = ("image", "text")


class TowerOutput(NamedTuple):
  tokens: jax.Array  # (B, N, W) float32 token states
  pooled: jax.Array  # (B, W) float32: the tower's pooling of the tokens (its [CLS], or a mean)
  mask: jax.Array    # (B, N) int32: 1 for real tokens


@dataclasses.dataclass(frozen=True)
class TowerKind:
  modality: str                 # "image" or "text"
  config_class: type            # frozen dataclass; image towers have image_size, mean, std
  module_class: type            # linen module taking `config`
  # (path, abstract params) -> params: reads `init`; the default reads a safetensors file of
  # '/'-joined parameter names (`weights.save_safetensors`, what weight conversion writes).
  load_weights: Callable = weights.load_safetensors
  # {format: converter} of other frameworks' checkpoints into this tower
  # (`python -m rebalance_jax.convert --format=...`; `models/towers/conversion.py`).
  converters: Mapping[str, Callable] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TowerSpec:
  kind: str
  config: Any
  init: str = ""  # converted weights to start from ('' = random initialization)

  @property
  def modality(self) -> str:
    return get(self.kind).modality

  def build(self, name: str | None = None):
    return get(self.kind).module_class(self.config, name=name)


_REGISTRY: dict[str, TowerKind] = {}


def register(kind: str, tower: TowerKind) -> None:
  if tower.modality not in MODALITIES:
    raise ValueError(f"tower {kind!r}: modality {tower.modality!r} is not one of {MODALITIES}")
  _REGISTRY[kind] = tower


def get(kind: str) -> TowerKind:
  _load_builtin()
  if kind not in _REGISTRY:
    raise InputError(f"tower kind {kind!r} is not registered; known: {sorted(_REGISTRY)}")
  return _REGISTRY[kind]


def kinds() -> list[str]:
  _load_builtin()
  return sorted(_REGISTRY)


@functools.cache
def _load_builtin() -> None:
  """Imports every module of this package once: each registers its tower."""
  for module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{module.name}")


def spec_from_config(section: Mapping, field: str, modality: str, **fixed) -> TowerSpec:
  """The TowerSpec of a config tower `section` at `field` (e.g. 'config.model.image'), checked to
  be a `modality` tower; `fixed` sets fields the config does not own (e.g. vocab_size)."""
  values = dict(section)
  kind, init = values.pop("kind", None), values.pop("init", "")
  if kind is None:
    raise InputError(f"{field}.kind is not set; known kinds: {kinds()}")
  try:
    tower = get(kind)
  except InputError as e:
    raise InputError(f"{field}.kind: {e}") from None
  if tower.modality != modality:
    raise InputError(f"{field}.kind={kind!r} is a {tower.modality} tower, not a {modality} one")
  known = {f.name for f in dataclasses.fields(tower.config_class)}
  owned = sorted(set(values) & set(fixed))
  if owned:
    raise InputError(f"{field}: {owned} cannot be set here (it comes from the tokenizer)")
  unknown = sorted(set(values) - known)
  if unknown:
    raise InputError(f"{field}: {unknown} are not fields of a {kind!r} tower; its fields: "
                     f"{sorted(known - set(fixed))}")
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
  try:
    config = tower.config_class(**values, **fixed)
  except (TypeError, ValueError) as e:
    raise InputError(f"{field}: {e}") from None
  if getattr(config, "dtype", "float32") not in DTYPES:
    raise InputError(f"{field}.dtype={config.dtype!r} is not one of {DTYPES}")
  return TowerSpec(kind, config, init or "")


def compute_dtype(config):
  return jnp.dtype(config.dtype)


def check_patch_grid(image_size: int, patch_size: int) -> None:
  """For a patch tower's config: the image is a whole number of patches."""
  if image_size % patch_size:
    raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")


def check_image_size(config, images: jax.Array) -> None:
  """For an image tower's input: (B, image_size, image_size, 3)."""
  if images.shape[1:3] != (config.image_size, config.image_size):
    raise ValueError(f"image tower expects {config.image_size}x{config.image_size} images, "
                     f"got {images.shape[1]}x{images.shape[2]}")


def preprocess_images(config, images: jax.Array) -> jax.Array:
  """uint8 images (B, H, W, 3) -> the float input of an image tower: [0, 1], resized (bicubic) to
  its image_size if it differs, then (x - mean) / std per channel as its config says."""
  x = images.astype(jnp.float32) / 255.0
  size = config.image_size
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bicubic")
  mean, std = jnp.asarray(config.mean, jnp.float32), jnp.asarray(config.std, jnp.float32)
  return (x - mean) / std


def init_params(spec: TowerSpec, rng: jax.Array, batch_size: int = 2):
  """Random initial parameters of a tower from dummy inputs shaped by its config."""
  # jitted: one program instead of one compilation per op
  return jax.jit(spec.build().init)(rng, *dummy_inputs(spec, batch_size))["params"]


def dummy_inputs(spec: TowerSpec, batch_size: int = 2) -> tuple:
  c = spec.config
  if spec.modality == "image":
    return (jnp.zeros((batch_size, c.image_size, c.image_size, 3), jnp.float32),)
  ids = jnp.zeros((batch_size, c.max_tokens), jnp.int32)
  return ids, jnp.ones_like(ids)


def output_dim(spec: TowerSpec) -> int:
  """The width of the tower's pooled output (e.g. a teacher's feature dimension)."""
  pooled = jax.eval_shape(
      lambda rng: spec.build().init_with_output(rng, *dummy_inputs(spec, 1))[0].pooled,
      jax.random.key(0))
  return pooled.shape[-1]


def load_init(spec: TowerSpec, params_like, field: str):
  """The tower's converted weights from `spec.init`, matched name by name and shape by shape
  against `params_like` (the kind's `load_weights` hook)."""
  try:
    return get(spec.kind).load_weights(spec.init, params_like)
  except InputError as e:
    raise InputError(f"{field}.init={spec.init!r}: {e}") from None
