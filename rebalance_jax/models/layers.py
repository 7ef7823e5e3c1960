"""Transformer building blocks shared by the towers and the fusion encoder.

Every block computes in `dtype` (e.g. bfloat16) with float32 parameters; `block_class(cls, remat)`
wraps a block in `nn.remat` so its activations are recomputed in the backward pass.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Dense and conv kernels scale with their fan (ViT's choice): a fixed std of 0.02 (BERT's) suits
# 768-wide towers but starves narrow ones trained from scratch of signal. Embedding tables and
# position embeddings use 0.02; converted checkpoints replace all of these.
default_kernel_init = nn.initializers.xavier_uniform()
embedding_init = nn.initializers.truncated_normal(0.02)
DTYPES = ("float32", "bfloat16")


def attention_mask(key_mask: jax.Array) -> jax.Array:
  """(B, L) key padding mask -> (B, 1, 1, L) boolean attention mask."""
  return key_mask[:, None, None, :].astype(bool)


def block_class(cls, remat: bool):
  """`cls`, rematerialized when `remat` (its `train` argument, index 2 after self and x, static)."""
  return nn.remat(cls, static_argnums=(2,)) if remat else cls


ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # BERT's and ViT's exact GELU
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),  # CLIP's
}


class Mlp(nn.Module):
  """Dense -> activation (exact GELU, or CLIP's quick GELU) -> Dense."""
  hidden_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x, train: bool):
    dense = lambda n, name: nn.Dense(n, kernel_init=default_kernel_init, dtype=self.dtype,
                                     name=name)
    y = ACTIVATIONS[self.activation](dense(self.hidden_dim, "fc1")(x))
    y = dense(x.shape[-1], "fc2")(y)
    return nn.Dropout(self.dropout)(y, deterministic=not train)


def patch_tokens(images, width: int, patch_size: int, dtype, use_bias: bool = True):
  """Images (B, S, S, 3) -> (B, (S / patch)², width): a patch-sized, patch-strided conv named
  `patch_embed` (call it inside a tower's compact method; its kernel is (p, p, 3, width))."""
  x = nn.Conv(width, (patch_size,) * 2, strides=(patch_size,) * 2, padding="VALID",
              use_bias=use_bias, kernel_init=default_kernel_init, dtype=dtype,
              name="patch_embed")(images)
  return x.reshape(x.shape[0], -1, width)


def _attention(num_heads: int, dropout: float, dtype, name: str) -> nn.MultiHeadDotProductAttention:
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads, kernel_init=default_kernel_init, dropout_rate=dropout, dtype=dtype,
      name=name)


class PreNormBlock(nn.Module):
  """ViT / CLIP encoder block: x + MHA(LN(x)), then x + MLP(LN(x)) (CLIP: LayerNorm eps 1e-5,
  quick GELU)."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  epsilon: float = 1e-6
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype, name=name)
    y = norm("norm1")(x)
    x = x + _attention(self.num_heads, self.dropout, self.dtype, "attention")(
        y, y, deterministic=not train)
    y = norm("norm2")(x)
    return x + Mlp(self.mlp_dim, self.dropout, self.dtype, self.activation, name="mlp")(y, train)


class PostNormBlock(nn.Module):
  """BERT layer: LN(x + MHA(x)), optionally LN(x + CrossMHA(x, context)), then LN(x + MLP(x))."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  cross_attention: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, mask=None, context=None, context_mask=None):
    def residual(y, name):
      y = nn.Dropout(self.dropout)(y, deterministic=not train)
      return nn.LayerNorm(epsilon=1e-12, dtype=self.dtype, name=name)(x + y)

    attention = lambda name: _attention(self.num_heads, self.dropout, self.dtype, name)
    x = residual(attention("attention")(x, x, mask=attention_mask(mask),
                                        deterministic=not train), "attention_norm")
    if self.cross_attention:
      x = residual(attention("cross_attention")(
          x, context, mask=attention_mask(context_mask), deterministic=not train),
                   "cross_attention_norm")
    y = Mlp(self.mlp_dim, 0.0, self.dtype, name="mlp")(x, train)
    return residual(y, "mlp_norm")
