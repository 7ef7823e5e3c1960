"""Loss terms of structure-aware distillation (docs/method.md §4) as small pure functions.

This module is the plug-and-play public API: it depends on nothing but JAX, so any image-text model
can add the paper's representation-level and structure-aware distillation to its own loss. Every
function takes arrays of the **global** batch (rows are pairs, ``ids`` are image ids); under ``jit``
with a batch-sharded mesh, XLA computes the B×B matrices across devices.

Example (dual encoder, precomputed teacher features)::

    from rebalance_jax import losses
    lam = losses.fusion_weight(params["lam"], "sigmoid")
    kd = losses.structure_distillation(
        [img_emb], teacher_img, teacher_txt, lam, temperature=0.07)
    loss = losses.itc_loss(img_emb, txt_emb, ids, 0.07) + 2.0 * kd["kd"]
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Added to the hard-negative sampling weights, as the reference does.
_NEGATIVE_WEIGHT_FLOOR = 1e-5


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """L2-normalizes along the last axis."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def soft_targets(ids: jax.Array) -> jax.Array:
  """y_ij = 1[id_i == id_j] / #{k: id_k == id_i}: all pairs of the same image are positives."""
  same = (ids[:, None] == ids[None, :]).astype(jnp.float32)
  return same / jnp.sum(same, axis=1, keepdims=True)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-(1/B) Σ_i Σ_j y_ij log softmax_j(S_ij)."""
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def itc_loss(image_emb: jax.Array, text_emb: jax.Array, ids: jax.Array,
             temperature: jax.Array) -> jax.Array:
  """Symmetric id-aware image-text contrastive loss over normalized embeddings (§4.1)."""
  logits = image_emb @ text_emb.T / temperature
  targets = soft_targets(ids)
  return 0.5 * (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.T, targets))


def representation_distillation(student_emb: jax.Array, teacher_emb: jax.Array,
                                ids: jax.Array, temperature: jax.Array) -> jax.Array:
  """One-directional InfoNCE of student rows against projected teacher rows: L_iic / L_ttc (§4.2)."""
  return soft_cross_entropy(student_emb @ teacher_emb.T / temperature, soft_targets(ids))


def relation_matrix(features: jax.Array, temperature: jax.Array) -> jax.Array:
  """R_ij = cos(x_i, x_j) / τ2 over the batch (§4.3)."""
  x = l2_normalize(features.astype(jnp.float32))
  return x @ x.T / temperature


def fuse_relations(text_relation: jax.Array, image_relation: jax.Array,
                   lam: jax.Array) -> jax.Array:
  """R^E = λ·R^T + (1−λ)·R^V: λ weights the text teacher."""
  return lam * text_relation + (1.0 - lam) * image_relation


def relation_distance(a: jax.Array, b: jax.Array, distance: str = "mae") -> jax.Array:
  """Mean |a−b| ("mae") or (a−b)² ("mse") over the B(B−1) off-diagonal entries."""
  diff = a - b
  if distance == "mae":
    per_entry = jnp.abs(diff)
  elif distance == "mse":
    per_entry = diff * diff
  else:
    raise ValueError(f"relation distance must be 'mae' or 'mse', got {distance!r}")
  n = a.shape[0]
  off_diagonal = 1.0 - jnp.eye(n, dtype=per_entry.dtype)
  return jnp.sum(per_entry * off_diagonal) / float(n * (n - 1))  # a Python int overflows int32


def structure_distillation(student_features: Sequence[jax.Array],
                           image_teacher_features: jax.Array,
                           text_teacher_features: jax.Array,
                           lam: jax.Array,
                           temperature: jax.Array,
                           distance: str = "mae") -> dict[str, jax.Array]:
  """Structure-aware distillation terms (§4.3).

  Args:
    student_features: one or more (B, D) student feature sets (the fusion CLS `m`, or in a dual
      encoder the image and/or text embeddings); their relation terms are summed into "kd".
    image_teacher_features, text_teacher_features: raw teacher features g^v, g^t. They are treated
      as constants (no gradient flows into them).
    lam: fusion weight λ (a scalar; see `fusion_weight`).
    temperature: relation temperature τ2.
    distance: "mae" (the paper) or "mse".

  Returns:
    {"kd": Σ_s d(R^S, R^E), "kdi": d(R^V, R^E), "kdt": d(R^T, R^E)}.
  """
  r_image = relation_matrix(jax.lax.stop_gradient(image_teacher_features), temperature)
  r_text = relation_matrix(jax.lax.stop_gradient(text_teacher_features), temperature)
  r_fused = fuse_relations(r_text, r_image, lam)
  kd = sum(relation_distance(relation_matrix(f, temperature), r_fused, distance)
           for f in student_features)
  return {
      "kd": kd,
      "kdi": relation_distance(r_image, r_fused, distance),
      "kdt": relation_distance(r_text, r_fused, distance),
  }


def fusion_weight(raw: jax.Array, mode: str, fixed_value: float = 0.5) -> jax.Array:
  """λ from its parameter: "raw" uses it as is (the reference), "sigmoid" keeps it in (0, 1),
  "fixed" is the constant `fixed_value` (not learned; an ablation)."""
  if mode == "raw":
    return raw
  if mode == "sigmoid":
    return jax.nn.sigmoid(raw)
  if mode == "fixed":
    return jnp.asarray(fixed_value, jnp.float32)
  raise ValueError(f"lambda mode must be 'raw', 'sigmoid' or 'fixed', got {mode!r}")


def relation_temperature(raw: jax.Array, mode: str, value_range: tuple[float, float],
                         fixed_value: float) -> jax.Array:
  """τ2 from its parameter: "learned" unclamped (the reference), "clamped" to value_range, "fixed"."""
  if mode == "learned":
    return raw
  if mode == "clamped":
    return jnp.clip(raw, *value_range)
  if mode == "fixed":
    return jnp.asarray(fixed_value, jnp.float32)
  raise ValueError(f"tau2 mode must be 'learned', 'clamped' or 'fixed', got {mode!r}")


def sample_hard_negatives(rng: jax.Array, image_emb: jax.Array, text_emb: jax.Array,
                          ids: jax.Array, temperature: jax.Array,
                          num_groups: int = 1) -> tuple[jax.Array, jax.Array]:
  """Samples one hard negative image per text and one hard negative text per image (§4.1).

  The batch is split into `num_groups` contiguous groups (one per device reproduces the reference's
  per-device sampling); within a row's group, weights are softmax(similarity/τ) + 1e-5 with
  same-id entries zeroed, as in the reference. A row whose group holds no
  other image id falls back to any other pair of its group. Not differentiated.

  Returns:
    (negative image index for each text, negative text index for each image), indices into the batch.
  """
  b = ids.shape[0]
  if b % num_groups:
    raise ValueError(f"batch of {b} cannot be split into {num_groups} negative-sampling groups")
  size = b // num_groups
  grouped = lambda x: x.reshape(num_groups, size, *x.shape[1:])
  # (groups, size, size) similarities: only each group's own block is ever formed.
  sim = jax.lax.stop_gradient(
      jnp.einsum("gid,gjd->gij", grouped(image_emb), grouped(text_emb)) / temperature)
  group_ids = grouped(ids)
  candidates = group_ids[:, :, None] != group_ids[:, None, :]
  fallback = ~jnp.eye(size, dtype=bool)
  candidates = jnp.where(jnp.any(candidates, axis=2, keepdims=True), candidates, fallback)

  def draw(key, scores):
    weights = jax.nn.softmax(scores, axis=2) + _NEGATIVE_WEIGHT_FLOOR
    local = jax.random.categorical(key, jnp.where(candidates, jnp.log(weights), -jnp.inf), axis=2)
    return (local + jnp.arange(num_groups)[:, None] * size).reshape(b)

  text_key, image_key = jax.random.split(rng)
  negative_image_for_text = draw(text_key, jnp.swapaxes(sim, 1, 2))
  negative_text_for_image = draw(image_key, sim)
  return negative_image_for_text, negative_text_for_image


def itm_loss(positive_logits: jax.Array, negative_logits: jax.Array) -> jax.Array:
  """Cross-entropy of the 2-way ITM head: B positive pairs (label 1), 2B negative pairs (label 0)."""
  logits = jnp.concatenate([positive_logits, negative_logits], axis=0)
  labels = jnp.concatenate([jnp.ones(positive_logits.shape[0], jnp.int32),
                            jnp.zeros(negative_logits.shape[0], jnp.int32)])
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
