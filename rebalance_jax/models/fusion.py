"""The student's fusion encoder (text states cross-attending to image tokens) and ITM head."""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from rebalance_jax.models.layers import (
  DTYPES,
  PostNormBlock,
  block_class,
  default_kernel_init,
  gelu,
)


@dataclasses.dataclass(frozen=True)
class FusionConfig:
  depth: int = 1
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.0
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r} is not one of {DTYPES}")


class FusionEncoder(nn.Module):
  """Text hidden states (B, L, W) with their mask, cross-attending to image tokens (B, T, W') and
  their mask -> fused states (B, L, W) in float32. With `image_index` (G, B / G), the image tokens
  and mask hold distinct images (G·N, T, W') and the rows attend to `take_in_groups(images,
  image_index)`: each image's keys and values are computed once however many rows pair with it."""
  config: FusionConfig

  @nn.compact
  def __call__(self, text_hidden, text_mask, image_tokens, image_mask, train: bool = False,
               image_index=None):
    c = self.config
    layer = block_class(PostNormBlock, c.remat)
    x = text_hidden
    for i in range(c.depth):
      x = layer(c.num_heads, c.mlp_dim, c.dropout, cross_attention=True, dtype=jnp.dtype(c.dtype),
                name=f"layer{i}")(x, train, text_mask, image_tokens, image_mask, image_index)
    return x.astype(jnp.float32)


class ItmHead(nn.Module):
  """Linear(w -> 2w) -> LayerNorm -> GELU -> Linear(2w -> 2), on the fusion [CLS] (the
  reference's `itm_head`)."""

  @nn.compact
  def __call__(self, x):
    w = x.shape[-1]
    x = nn.Dense(2 * w, kernel_init=default_kernel_init, name="fc1")(x)
    x = gelu(nn.LayerNorm(epsilon=1e-5, name="norm")(x))  # [ref]'s eps
    return nn.Dense(2, kernel_init=default_kernel_init, name="fc2")(x)
