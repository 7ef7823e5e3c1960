"""Transformer building blocks shared by the student and teacher towers."""

import flax.linen as nn
import jax

# Dense and conv kernels scale with their fan (ViT's choice): a fixed std of 0.02 (BERT's) suits
# 768-wide towers but starves narrow ones trained from scratch of signal. Embedding tables and
# position embeddings use 0.02; converted checkpoints replace all of these.
default_kernel_init = nn.initializers.xavier_uniform()
embedding_init = nn.initializers.truncated_normal(0.02)


def attention_mask(key_mask: jax.Array) -> jax.Array:
  """(B, L) key padding mask -> (B, 1, 1, L) boolean attention mask."""
  return key_mask[:, None, None, :].astype(bool)


class Mlp(nn.Module):
  """Dense -> GELU -> Dense."""
  hidden_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.Dense(self.hidden_dim, kernel_init=default_kernel_init, name="fc1")(x)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(x.shape[-1], kernel_init=default_kernel_init, name="fc2")(y)
    return nn.Dropout(self.dropout)(y, deterministic=not train)


def _attention(num_heads: int, dropout: float, name: str) -> nn.MultiHeadDotProductAttention:
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads, kernel_init=default_kernel_init, dropout_rate=dropout, name=name)


class PreNormBlock(nn.Module):
  """ViT encoder block: x + MHA(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.LayerNorm(epsilon=1e-6, name="norm1")(x)
    x = x + _attention(self.num_heads, self.dropout, "attention")(
        y, y, deterministic=not train)
    y = nn.LayerNorm(epsilon=1e-6, name="norm2")(x)
    return x + Mlp(self.mlp_dim, self.dropout, name="mlp")(y, train)


class PostNormBlock(nn.Module):
  """BERT layer: LN(x + MHA(x)), optionally LN(x + CrossMHA(x, context)), then LN(x + MLP(x))."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x, mask, train: bool, context=None, context_mask=None):
    def residual(y, name):
      y = nn.Dropout(self.dropout)(y, deterministic=not train)
      return nn.LayerNorm(epsilon=1e-12, name=name)(x + y)

    x = residual(_attention(self.num_heads, self.dropout, "attention")(
        x, x, mask=attention_mask(mask), deterministic=not train), "attention_norm")
    if self.cross_attention:
      x = residual(_attention(self.num_heads, self.dropout, "cross_attention")(
          x, context, mask=attention_mask(context_mask), deterministic=not train),
                   "cross_attention_norm")
    y = Mlp(self.mlp_dim, 0.0, name="mlp")(x, train)
    return residual(y, "mlp_norm")


