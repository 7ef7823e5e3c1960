"""Image and text towers (pure flax.linen modules), sized by frozen dataclass configs.

The ViT is the spine's image tower; Swin-B (METHOD.md §2) slots in as another `ImageTower` kind.
The text encoder follows BERT's layout (post-norm, word/position/type embeddings) so that BERT
checkpoints can be converted into it; the fusion encoder is BERT layers with cross-attention.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from rebalance_jax.models.layers import (PostNormBlock, PreNormBlock, default_kernel_init,
                                         embedding_init)


@dataclasses.dataclass(frozen=True)
class VitConfig:
  image_size: int = 32
  patch_size: int = 4
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 1000
  max_tokens: int = 24
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.0


class VisionTransformer(nn.Module):
  """Images (B, H, W, 3) in [0, 1] -> tokens (B, 1 + patches, width); token 0 is CLS."""
  config: VitConfig

  @nn.compact
  def __call__(self, images, train: bool = False):
    c = self.config
    if images.shape[1:3] != (c.image_size, c.image_size):
      raise ValueError(f"image tower expects {c.image_size}x{c.image_size} images, "
                       f"got {images.shape[1]}x{images.shape[2]}")
    x = nn.Conv(c.width, (c.patch_size,) * 2, strides=(c.patch_size,) * 2, padding="VALID",
                kernel_init=default_kernel_init, name="patch_embed")(images)
    x = x.reshape(x.shape[0], -1, c.width)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, c.width)), x], axis=1)
    x = x + self.param("pos_embed", embedding_init, (1, x.shape[1], c.width))
    x = nn.Dropout(c.dropout)(x, deterministic=not train)
    for i in range(c.depth):
      x = PreNormBlock(c.num_heads, c.mlp_dim, c.dropout, name=f"block{i}")(x, train)
    return nn.LayerNorm(epsilon=1e-6, name="norm")(x)


class TextEncoder(nn.Module):
  """Token ids (B, L) and mask -> hidden states (B, L, width); position 0 is [CLS]."""
  config: TextConfig

  @nn.compact
  def __call__(self, ids, mask, train: bool = False):
    c = self.config
    if ids.shape[1] > c.max_tokens:
      raise ValueError(f"text tower takes at most {c.max_tokens} tokens, got {ids.shape[1]}")
    embed = lambda n, name: nn.Embed(n, c.width, embedding_init=embedding_init, name=name)
    x = embed(c.vocab_size, "word_embed")(ids)
    x = x + embed(c.max_tokens, "position_embed")(jnp.arange(ids.shape[1])[None])
    x = x + embed(2, "type_embed")(jnp.zeros_like(ids))
    x = nn.LayerNorm(epsilon=1e-12, name="embed_norm")(x)
    x = nn.Dropout(c.dropout)(x, deterministic=not train)
    for i in range(c.depth):
      x = PostNormBlock(c.num_heads, c.mlp_dim, c.dropout, name=f"layer{i}")(x, mask, train)
    return x


class FusionEncoder(nn.Module):
  """Text hidden states cross-attending to image tokens -> fused states (B, L, width)."""
  config: TextConfig
  depth: int

  @nn.compact
  def __call__(self, text_hidden, text_mask, image_tokens, train: bool = False):
    c = self.config
    image_mask = jnp.ones(image_tokens.shape[:2], jnp.int32)
    x = text_hidden
    for i in range(self.depth):
      x = PostNormBlock(c.num_heads, c.mlp_dim, c.dropout, cross_attention=True,
                        name=f"layer{i}")(x, text_mask, train, image_tokens, image_mask)
    return x


class ItmHead(nn.Module):
  """Linear(w -> 2w) -> LayerNorm -> GELU -> Linear(2w -> 2), on the fusion CLS."""

  @nn.compact
  def __call__(self, x):
    w = x.shape[-1]
    x = nn.Dense(2 * w, kernel_init=default_kernel_init, name="fc1")(x)
    x = nn.gelu(nn.LayerNorm(epsilon=1e-12, name="norm")(x), approximate=False)
    return nn.Dense(2, kernel_init=default_kernel_init, name="fc2")(x)


def cls(tokens: jax.Array) -> jax.Array:
  """The [CLS] (first) token of each sequence."""
  return tokens[:, 0]
