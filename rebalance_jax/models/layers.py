"""Transformer building blocks shared by the towers and the fusion encoder.

Every block computes in `dtype` (e.g. bfloat16) with float32 parameters; `block_class(cls, remat)`
wraps a block in `nn.remat` so its activations are recomputed in the backward pass.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Dense and conv kernels scale with their fan (ViT's choice): a fixed std of 0.02 (BERT's) suits
# 768-wide towers but starves narrow ones trained from scratch of signal. Embedding tables and
# position embeddings use 0.02; converted checkpoints replace all of these.
default_kernel_init = nn.initializers.xavier_uniform()
embedding_init = nn.initializers.truncated_normal(0.02)
DTYPES = ("float32", "bfloat16")


def attention_mask(key_mask: jax.Array) -> jax.Array:
  """(B, L) key padding mask -> (B, 1, 1, L) boolean attention mask."""
  return key_mask[:, None, None, :].astype(bool)


def take_in_groups(x: jax.Array, index: jax.Array) -> jax.Array:
  """x (G·N, ...) as G contiguous groups of rows; index (G, R) row numbers within each group ->
  (G·R, ...): group g's picks of its own rows. A gather over the group axis, so that with one
  group per device no row leaves its device."""
  grouped = x.reshape(index.shape[0], -1, *x.shape[1:])
  return jax.vmap(lambda rows, i: rows[i])(grouped, index).reshape(-1, *x.shape[1:])


def block_class(cls, remat: bool):
  """`cls`, rematerialized when `remat` (its `train` argument, index 2 after self and x, static)."""
  return nn.remat(cls, static_argnums=(2,)) if remat else cls


@jax.custom_vjp
def gelu(x):
  """Exact GELU through erf, as PyTorch computes it (jax.nn.gelu's exact form goes through erfc,
  which XLA expands into two branches and an exp). Only the input is kept for the backward pass,
  which recomputes erf from it: autodiff would keep erf(x) too, a second copy of every MLP's
  widest activation."""
  return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(2**-0.5, x.dtype)))


def _gelu_forward(x):
  return gelu(x), x


def _gelu_backward(x, grad):
  cdf = 0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(2**-0.5, x.dtype))
  pdf = jnp.exp(-0.5 * x * x) * jnp.asarray((2 * np.pi) ** -0.5, x.dtype)
  return (grad * (cdf + x * pdf),)


gelu.defvjp(_gelu_forward, _gelu_backward)


ACTIVATIONS = {
    "gelu": gelu,  # BERT's and ViT's exact GELU
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),  # CLIP's
}


class Dense(nn.Dense):
  """nn.Dense (same parameters and arithmetic) applied to the input's rows as one matrix: the
  kernel's gradient is then a product over a single axis of rows. Over (batch, tokens) XLA:CPU
  first transposes the activation or its gradient into a copy, which made a Swin MLP's backward
  pass twice as slow."""

  def __call__(self, x):
    y = super().__call__(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


class DenseGeneral(nn.DenseGeneral):
  """nn.DenseGeneral over trailing axes, applied to the rows as one batch axis (see `Dense`)."""

  def __call__(self, x):
    axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    n = len(axes)
    if sorted(a % x.ndim for a in axes) != list(range(x.ndim - n, x.ndim)) or self.batch_dims:
      raise ValueError(f"DenseGeneral: axis={self.axis} must be the input's trailing axes")
    y = super().__call__(x.reshape(-1, *x.shape[x.ndim - n:]))
    return y.reshape(*x.shape[:x.ndim - n], *y.shape[1:])


class _ActivatedDense(Dense):
  """Dense applied to activation(x), with Dense's parameters."""
  activation: str = "gelu"

  def __call__(self, x):
    return super().__call__(ACTIVATIONS[self.activation](x))


class Mlp(nn.Module):
  """Dense -> activation (exact GELU, or CLIP's quick GELU) -> Dense. The activation's output, the
  widest array of a block, is not kept for the backward pass but recomputed from its input (one
  elementwise pass)."""
  hidden_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x, train: bool):
    y = Dense(self.hidden_dim, kernel_init=default_kernel_init, dtype=self.dtype, name="fc1")(x)
    y = nn.remat(_ActivatedDense)(x.shape[-1], kernel_init=default_kernel_init, dtype=self.dtype,
                                  activation=self.activation, name="fc2")(y)
    return nn.Dropout(self.dropout)(y, deterministic=not train)


def patch_tokens(images, width: int, patch_size: int, dtype, use_bias: bool = True):
  """Images (B, S, S, 3) -> (B, (S / patch)², width): a patch-sized, patch-strided conv named
  `patch_embed` (call it inside a tower's compact method; its kernel is (p, p, 3, width))."""
  x = nn.Conv(width, (patch_size,) * 2, strides=(patch_size,) * 2, padding="VALID",
              use_bias=use_bias, kernel_init=default_kernel_init, dtype=dtype,
              name="patch_embed")(images)
  return x.reshape(x.shape[0], -1, width)


class Attention(nn.Module):
  """Multi-head attention with Flax's `MultiHeadDotProductAttention` parameters (query, key,
  value: (in, heads, head_dim); out: (heads, head_dim, width)) and arithmetic, its attention
  dropout included (one mask shared by every example and head).

  With `context_index` (G, R), `context` holds distinct rows and the query rows, in G groups of
  R, attend to `take_in_groups(context, context_index)`: keys and values are projected once per
  distinct row and gathered, so pairs that share an image (the ITM negatives, a re-ranking block)
  do not recompute them."""
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context, mask=None, train: bool = False, context_index=None):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    dense = lambda name: DenseGeneral((self.num_heads, head_dim), kernel_init=default_kernel_init,
                                      dtype=self.dtype, name=name)
    query, key, value = dense("query")(x), dense("key")(context), dense("value")(context)
    if context_index is not None:
      key, value = take_in_groups(key, context_index), take_in_groups(value, context_index)
    query = query / jnp.sqrt(head_dim).astype(query.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits).astype(query.dtype)
    if train and self.dropout > 0.0:
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout,
                                  (1, 1) + weights.shape[-2:])
      weights = weights * (keep.astype(weights.dtype) / jnp.asarray(1.0 - self.dropout,
                                                                   weights.dtype))
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return DenseGeneral(width, axis=(-2, -1), kernel_init=default_kernel_init, dtype=self.dtype,
                        name="out")(out)


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
    x = x + Attention(self.num_heads, self.dropout, self.dtype, name="attention")(y, y,
                                                                                  train=train)
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
  def __call__(self, x, train: bool, mask=None, context=None, context_mask=None,
               context_index=None):
    """`context_index`: see `Attention` (`context_mask` has the context's rows)."""
    def residual(y, name):
      y = nn.Dropout(self.dropout)(y, deterministic=not train)
      return nn.LayerNorm(epsilon=1e-12, dtype=self.dtype, name=name)(x + y)

    attention = lambda name: Attention(self.num_heads, self.dropout, self.dtype, name=name)
    x = residual(attention("attention")(x, x, attention_mask(mask), train), "attention_norm")
    if self.cross_attention:
      if context_index is not None:
        context_mask = take_in_groups(context_mask, context_index)
      x = residual(attention("cross_attention")(x, context, attention_mask(context_mask), train,
                                                context_index), "cross_attention_norm")
    y = Mlp(self.mlp_dim, 0.0, self.dtype, name="mlp")(x, train)
    return residual(y, "mlp_norm")
