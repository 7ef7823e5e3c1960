"""Swin Transformer image tower (the paper's student backbone, docs/method.md §2), in the layout of
Microsoft's release so its checkpoints convert name by name (`convert --format=swin`).

Patch embedding (conv + LayerNorm), then stages of blocks that attend within non-overlapping
windows (with a learned relative-position bias), every second block on windows shifted by half a
window (with the mask that keeps wrapped-around regions apart); a patch merging between stages
halves the resolution and doubles the width. Where a stage's resolution is not larger than the
window, the window is that resolution and nothing is shifted (as the reference). The output tokens
are [average of the final normed tokens; the final tokens], so the pooled [CLS] is the average.
Stochastic depth (`drop_path`, rising linearly over the blocks) as the reference's 0.1.
"""

import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.interpolate

from rebalance_jax.infra.errors import InputError
from rebalance_jax.models import towers
from rebalance_jax.models.layers import (
  Dense,
  Mlp,
  block_class,
  default_kernel_init,
  embedding_init,
  patch_tokens,
)
from rebalance_jax.models.towers import conversion
from rebalance_jax.models.towers.clip_vit import CLIP_MEAN, CLIP_STD

_EPS = 1e-5  # PyTorch's LayerNorm default, used throughout the release


@dataclasses.dataclass(frozen=True)
class SwinConfig:
  image_size: int = 384
  patch_size: int = 4
  embed_dim: int = 128
  depths: tuple[int, ...] = (2, 2, 18, 2)
  num_heads: tuple[int, ...] = (4, 8, 16, 32)
  window_size: int = 12
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  drop_path: float = 0.1
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    towers.check_patch_grid(self.image_size, self.patch_size)
    if len(self.depths) != len(self.num_heads) or not self.depths:
      raise ValueError(f"depths={self.depths} and num_heads={self.num_heads} must name the same "
                       "number of stages")
    if not 0.0 <= self.drop_path < 1.0:
      raise ValueError(f"drop_path={self.drop_path} must lie in [0, 1)")
    for i, (resolution, window) in enumerate(self.stage_windows()):
      width = self.embed_dim * 2**i
      if resolution % window:
        raise ValueError(f"stage {i}: resolution {resolution} (image_size={self.image_size}) is "
                         f"not a multiple of window_size={window}")
      if width % self.num_heads[i]:
        raise ValueError(f"stage {i}: width {width} is not a multiple of num_heads="
                         f"{self.num_heads[i]}")

  def stage_windows(self) -> list[tuple[int, int]]:
    """(resolution, window) per stage: the window is clamped to a smaller resolution."""
    grid, out = self.image_size // self.patch_size, []
    for i in range(len(self.depths)):
      resolution = grid // 2**i
      if resolution * 2**i != grid or resolution == 0:
        raise ValueError(f"the {grid}x{grid} patch grid does not halve {len(self.depths) - 1} "
                         "times evenly")
      out.append((resolution, min(self.window_size, resolution)))
    return out


@functools.cache
def relative_position_index(window: int) -> np.ndarray:
  """(w², w²): the row of the ((2w-1)², heads) bias table for each (query, key) pair of a window."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  offsets = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
  return offsets[..., 0] * (2 * window - 1) + offsets[..., 1]


@functools.cache
def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray:
  """(windows, w², w²) additive mask (0 or -100, as the reference): after the cyclic shift, tokens
  from regions that were not adjacent in the image must not attend to each other."""
  regions = np.zeros((resolution, resolution))
  spans = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for label, (rows, cols) in enumerate((r, c) for r in spans for c in spans):
    regions[rows, cols] = label
  regions = _partition(regions[None, :, :, None], window)[..., 0]  # (windows, w²)
  return np.where(regions[:, None, :] != regions[:, :, None], -100.0, 0.0).astype(np.float32)


def _partition(x, window: int):
  """(B, H, W, C) -> (B * windows, w², C), windows in row-major order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, c)


def _merge(windows, window: int, b: int, h: int, w: int):
  """The inverse of `_partition`."""
  x = windows.reshape(b, h // window, w // window, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, -1)


def _drop_path(module: nn.Module, x, rate: float, train: bool):
  """Stochastic depth: the residual branch of a whole example is dropped with probability `rate`."""
  if not train or rate == 0.0:
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate,
                              (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


@jax.custom_vjp
def add_shared_bias(logits, bias):
  """logits (N, ...) + bias (...), the bias shared by all N rows. Its gradient, the sum of the
  logits' gradient over the N rows, is taken as a matrix-vector product: XLA reduces a leading
  axis of this size several times slower than it multiplies (the Swin blocks' largest cost)."""
  return logits + bias


def _add_shared_bias_forward(logits, bias):
  return logits + bias, None


def _add_shared_bias_backward(_, grad):
  rows = grad.shape[0]
  ones = jnp.ones((rows,), grad.dtype)
  return grad, (ones @ grad.reshape(rows, -1)).reshape(grad.shape[1:])


add_shared_bias.defvjp(_add_shared_bias_forward, _add_shared_bias_backward)


class WindowAttention(nn.Module):
  """Multi-head self-attention within each window, with the relative-position bias."""
  num_heads: int
  window: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    n, tokens, width = x.shape
    head_dim = width // self.num_heads
    qkv = Dense(3 * width, kernel_init=default_kernel_init, dtype=self.dtype, name="qkv")(x)
    # Heads ahead of tokens, so that both attention products are plain batched matmuls.
    q, k, v = qkv.reshape(n, tokens, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    table = self.param("relative_position_bias_table", embedding_init,
                       ((2 * self.window - 1) ** 2, self.num_heads))
    bias = table[relative_position_index(self.window).reshape(-1)]
    bias = bias.reshape(tokens, tokens, self.num_heads).transpose(2, 0, 1)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * head_dim**-0.5, k).astype(jnp.float32)
    logits = add_shared_bias(logits, bias)
    if mask is not None:
      # The mask tiled over the examples, (n, 1, w², w²): broadcast over both examples and heads
      # instead, XLA:CPU's fused matmul took 74 ms for a stage-0 block's logits against 41.
      logits = logits + jnp.broadcast_to(mask, (n // mask.shape[0], *mask.shape)).reshape(
          n, 1, tokens, tokens)
    # Softmax with its normalization applied after the product with v, to the (tokens, head_dim)
    # rows instead of the (tokens, tokens) weights: one pass less over the weights forward, and
    # backward a row sum over the output instead of over the weights.
    unnormalized = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = jnp.einsum("bhqk,bhkd->bhqd", unnormalized.astype(self.dtype), v)
    out = out / unnormalized.sum(axis=-1, keepdims=True).astype(out.dtype)
    out = out.transpose(0, 2, 1, 3).reshape(n, tokens, width)
    return Dense(width, kernel_init=default_kernel_init, dtype=self.dtype, name="proj")(out)


class SwinBlock(nn.Module):
  """x + DropPath(W-MSA(LN(x))) on (shifted) windows, then x + DropPath(MLP(LN(x)))."""
  num_heads: int
  resolution: int
  window: int
  shift: int
  mlp_dim: int
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    b, tokens, width = x.shape
    r, s = self.resolution, self.shift
    y = nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name="norm1")(x).reshape(b, r, r, width)
    if s:
      y = jnp.roll(y, (-s, -s), axis=(1, 2))
    mask = jnp.asarray(shifted_window_mask(r, self.window, s)) if s else None
    y = WindowAttention(self.num_heads, self.window, self.dtype, name="attention")(
        _partition(y, self.window), mask)
    y = _merge(y, self.window, b, r, r)
    if s:
      y = jnp.roll(y, (s, s), axis=(1, 2))
    y = nn.Dropout(self.dropout)(y.reshape(b, tokens, width), deterministic=not train)
    x = x + _drop_path(self, y, self.drop_path, train)
    y = Mlp(self.mlp_dim, self.dropout, self.dtype, name="mlp")(
        nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name="norm2")(x), train)
    return x + _drop_path(self, y, self.drop_path, train)


class PatchMerging(nn.Module):
  """Each 2x2 group of tokens -> one token: concatenated (in the release's order), LN, Linear."""
  resolution: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, _, width = x.shape
    half = self.resolution // 2
    x = x.reshape(b, half, 2, half, 2, width)  # (b, row, row parity, col, col parity, c)
    # The release concatenates (row, col) parities in the order (0,0), (1,0), (0,1), (1,1).
    x = x.transpose(0, 1, 3, 4, 2, 5).reshape(b, half * half, 4 * width)
    x = nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name="norm")(x)
    return Dense(2 * width, use_bias=False, kernel_init=default_kernel_init, dtype=self.dtype,
                 name="reduction")(x)


class SwinTransformer(nn.Module):
  """Preprocessed images (B, S, S, 3) -> TowerOutput with 1 + (S / (patch · 2^(stages-1)))² tokens
  of width embed_dim · 2^(stages-1)."""
  config: SwinConfig

  @nn.compact
  def __call__(self, images, train: bool = False) -> towers.TowerOutput:
    c = self.config
    towers.check_image_size(c, images)
    dtype = towers.compute_dtype(c)
    x = patch_tokens(images, c.embed_dim, c.patch_size, dtype)
    x = nn.LayerNorm(epsilon=_EPS, dtype=dtype, name="patch_norm")(x)
    x = nn.Dropout(c.dropout)(x, deterministic=not train)
    rates = np.linspace(0.0, c.drop_path, sum(c.depths)).tolist()
    block = block_class(SwinBlock, c.remat)
    for i, (resolution, window) in enumerate(c.stage_windows()):
      width = c.embed_dim * 2**i
      for j in range(c.depths[i]):
        shift = window // 2 if j % 2 and resolution > c.window_size else 0
        x = block(c.num_heads[i], resolution, window, shift, int(width * c.mlp_ratio), c.dropout,
                  rates.pop(0), dtype, name=f"stage{i}_block{j}")(x, train)
      if i + 1 < len(c.depths):
        x = PatchMerging(resolution, dtype, name=f"stage{i}_merge")(x)
    x = nn.LayerNorm(epsilon=_EPS, dtype=dtype, name="norm")(x).astype(jnp.float32)
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
    return towers.TowerOutput(x, x[:, 0], jnp.ones(x.shape[:2], jnp.int32))


INTERPOLATIONS = ("geometric", "bicubic")


def resize_relative_position_table(table: np.ndarray, window: int, mode: str) -> np.ndarray:
  """A Swin bias table ((2w'-1)², heads) resized to `window` ((2w-1)², heads).

  "geometric" is the reference's loader (X-VLM, after BEiT): the source offsets are placed on a
  geometric progression spanning the target range and each head's table is fitted with an
  interpolating bicubic spline, evaluated at the integer target offsets (clamped at the edge).
  "bicubic" is Swin's own loader: PyTorch's bicubic resize (a = -0.75, align_corners=False)."""
  rows, heads = table.shape
  src, dst = math.isqrt(rows), 2 * window - 1
  if src * src != rows:
    raise InputError(f"a relative-position table of {rows} rows is not a square")
  if src == dst:
    return table
  grid = table.T.reshape(heads, src, src).astype(np.float64)
  if mode == "bicubic":
    weights = _bicubic_resize_matrix(src, dst)
    out = np.einsum("ij,hjk,lk->hil", weights, grid, weights)
  elif mode == "geometric":
    source = _geometric_offsets(src, dst)
    target = np.arange(-(dst // 2), dst // 2 + 0.1, 1.0)
    out = np.stack([scipy.interpolate.RectBivariateSpline(source, source, g, kx=3, ky=3, s=0)(
        target, target) for g in grid])
  else:
    raise InputError(f"--rel_pos_interpolation={mode!r} is not one of {INTERPOLATIONS}")
  return out.reshape(heads, dst * dst).T.astype(np.float32)


def _geometric_offsets(src: int, dst: int) -> np.ndarray:
  """The reference's source offsets: ±(1 + q + ... + q^(k-1)) for k = 1..src//2, with the ratio q
  found by bisection so that the outermost offset reaches dst//2."""
  half, low, high = src // 2, 1.01, 1.5
  while high - low > 1e-6:
    q = (low + high) / 2.0
    if (1.0 - q**half) / (1.0 - q) > dst // 2:
      high = q
    else:
      low = q
  distances = np.cumsum([q**i for i in range(half)])
  return np.concatenate([-distances[::-1], [0.0], distances])


def _bicubic_resize_matrix(src: int, dst: int) -> np.ndarray:
  """(dst, src): PyTorch's 1-D bicubic resize (a = -0.75, align_corners=False, edge clamped)."""
  def cubic(t):
    t, a = abs(t), -0.75
    if t <= 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    return (((t - 5) * t + 8) * t - 4) * a if t < 2 else 0.0

  weights = np.zeros((dst, src))
  for i in range(dst):
    x = (i + 0.5) * src / dst - 0.5
    base = math.floor(x)
    for k in range(base - 1, base + 3):
      weights[i, min(max(k, 0), src - 1)] += cubic(x - k)
  return weights


def swin_release_fields(tensors: dict[str, np.ndarray], image_size: int,
                        window_size: int | None) -> dict:
  """The `swin` tower fields of a release state dict (names without prefix) at `image_size`;
  the window is the checkpoint's unless `window_size` is given."""
  try:
    patch = tensors["patch_embed.proj.weight"]
  except KeyError:
    raise InputError("no patch_embed.proj.weight: not a Swin state dict") from None
  blocks = {}
  for name in tensors:
    match = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", name)
    if match:
      blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
  if sorted(blocks) != list(range(len(blocks))) or not blocks:
    raise InputError(f"the Swin stages {sorted(blocks)} are not 0..N-1")
  table = lambda i: tensors[f"layers.{i}.blocks.0.attn.relative_position_bias_table"]
  source_window = (math.isqrt(table(0).shape[0]) + 1) // 2
  embed_dim = patch.shape[0]
  return {"image_size": image_size, "patch_size": patch.shape[2], "embed_dim": embed_dim,
          "depths": tuple(len(blocks[i]) for i in sorted(blocks)),
          "num_heads": tuple(table(i).shape[1] for i in sorted(blocks)),
          "window_size": window_size or source_window,
          "mlp_ratio": tensors["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim}


def _swin_rules(config, interpolation: str):
  """Rules over Swin release names (layers.N.blocks.M...)."""
  kind = r"(?P<kind>weight|bias)"
  leaf = lambda m: "scale" if m.group("kind") == "weight" else "bias"
  block = lambda m: f"stage{m.group(1)}_block{m.group(2)}"
  windows = [w for _, w in config.stage_windows()]

  def linear(name):
    def to_ours(m, x):
      ours, value = conversion.from_linear(x, m.group("kind"), "plain", 1)
      return {f"{name(m)}/{ours}": value}
    return to_ours

  def table(m, x):
    return {f"{block(m)}/attention/relative_position_bias_table":
            resize_relative_position_table(x, windows[int(m.group(1))], interpolation)}

  blocks = r"layers\.(\d+)\.blocks\.(\d+)"
  return [
      (r"patch_embed\.proj\.weight", lambda m, x: {"patch_embed/kernel": x.transpose(2, 3, 1, 0)}),
      (r"patch_embed\.proj\.bias", lambda m, x: {"patch_embed/bias": x}),
      (rf"patch_embed\.norm\.{kind}", lambda m, x: {f"patch_norm/{leaf(m)}": x}),
      (rf"{blocks}\.(norm[12])\.{kind}", lambda m, x: {f"{block(m)}/{m.group(3)}/{leaf(m)}": x}),
      (rf"{blocks}\.attn\.(qkv|proj)\.{kind}",
       linear(lambda m: f"{block(m)}/attention/{m.group(3)}")),
      (rf"{blocks}\.attn\.relative_position_bias_table", table),
      (rf"{blocks}\.mlp\.(fc[12])\.{kind}", linear(lambda m: f"{block(m)}/mlp/{m.group(3)}")),
      (rf"layers\.(\d+)\.downsample\.norm\.{kind}",
       lambda m, x: {f"stage{m.group(1)}_merge/norm/{leaf(m)}": x}),
      (r"layers\.(\d+)\.downsample\.reduction\.(?P<kind>weight)",
       linear(lambda m: f"stage{m.group(1)}_merge/reduction")),
      (rf"norm\.{kind}", lambda m, x: {f"norm/{leaf(m)}": x}),
      (rf"{blocks}\.attn\.relative_position_index|{blocks}\.attn_mask",
       "a buffer, rebuilt from the window size"),
      (r"head\..*", "the ImageNet classifier is not part of the image tower"),
  ]


def convert_swin(tensors: dict[str, np.ndarray], image_size: int, window_size: int | None = None,
                 interpolation: str = "geometric", prefix: str = ""):
  """(params of the `swin` tower, its fields, {dropped name: reason}) from a Swin release state
  dict (names under `prefix`), at `image_size`, with the relative-position tables resized to the
  target window (`interpolation`: "geometric" as the reference's loader, or "bicubic")."""
  if interpolation not in INTERPOLATIONS:
    raise InputError(f"--rel_pos_interpolation={interpolation!r} is not one of {INTERPOLATIONS}")
  own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  fields = swin_release_fields(own, image_size, window_size)
  spec = towers.spec_from_config({"kind": "swin", **fields}, "--source", "image")
  params, dropped = conversion.apply_rules(own, _swin_rules(spec.config, interpolation),
                                 range(len(fields["depths"])), prefix="")
  conversion.check_filled(params, conversion.tower_shapes(spec), "swin tower")
  return conversion.tree(params), fields, {prefix + k: v for k, v in dropped.items()}




def _convert_release(source: str, options: conversion.Options) -> conversion.Converted:
  """--format=swin: a Swin release file ({'model': state_dict}) -> the `swin` tower at
  --image_size, its relative-position tables resized to --window_size."""
  params, fields, dropped = convert_swin(conversion.read_pytorch(source)[0], options.image_size,
                                         options.window_size or None, options.interpolation)
  return conversion.Converted(params, {"model.image": {"kind": "swin", **fields}},
                              "model.image.init", dropped)


towers.register("swin", towers.TowerKind("image", SwinConfig, SwinTransformer,
                                           converters={"swin": _convert_release}))
