"""Text tower in BERT's layout (word/position/type embeddings, post-norm layers), so that BERT
checkpoints convert into it. Its pooled output is `pooling`: "cls", position 0 ([CLS], BERT's and
the reference's), or "mean", the mean of the hidden states over the real tokens (mask 1), as
sentence-transformers pools all-MiniLM-L6-v2. `vocab_size` always comes from the tokenizer, never
from the config."""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from rebalance_jax.models import towers
from rebalance_jax.models.layers import PostNormBlock, block_class, embedding_init

POOLINGS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 1000
  max_tokens: int = 24
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.0
  dtype: str = "float32"
  remat: bool = False
  pooling: str = "cls"  # the pooled output: "cls" (position 0) or "mean" (over real tokens)

  def __post_init__(self):
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling={self.pooling!r} is not one of {POOLINGS}")


def mean_pool(x, mask):
  """(B, L, W) states, (B, L) mask -> (B, W): the mean over the positions where mask is 1 (a row
  without any is 0)."""
  weights = mask.astype(x.dtype)[..., None]
  return (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


class TextEncoder(nn.Module):
  """Token ids (B, L) and mask -> TowerOutput of hidden states (B, L, width)."""
  config: TextConfig

  @nn.compact
  def __call__(self, ids, mask, train: bool = False) -> towers.TowerOutput:
    c = self.config
    if ids.shape[1] > c.max_tokens:
      raise ValueError(f"text tower takes at most {c.max_tokens} tokens, got {ids.shape[1]}")
    dtype = towers.compute_dtype(c)
    embed = lambda n, name: nn.Embed(n, c.width, embedding_init=embedding_init, dtype=dtype,
                                     name=name)
    x = embed(c.vocab_size, "word_embed")(ids)
    x = x + embed(c.max_tokens, "position_embed")(jnp.arange(ids.shape[1])[None])
    x = x + embed(2, "type_embed")(jnp.zeros_like(ids))
    x = nn.LayerNorm(epsilon=1e-12, dtype=dtype, name="embed_norm")(x)
    x = nn.Dropout(c.dropout)(x, deterministic=not train)
    layer = block_class(PostNormBlock, c.remat)
    for i in range(c.depth):
      x = layer(c.num_heads, c.mlp_dim, c.dropout, dtype=dtype, name=f"layer{i}")(x, train, mask)
    x = x.astype(jnp.float32)
    pooled = mean_pool(x, mask) if c.pooling == "mean" else x[:, 0]
    return towers.TowerOutput(x, pooled, mask)


towers.register("text", towers.TowerKind("text", TextConfig, TextEncoder))
