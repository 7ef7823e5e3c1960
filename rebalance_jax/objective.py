"""The training objective of one stage: student forward pass + weighted loss terms (§4.4).

`stage_loss` is a pure function of (params, batch, teacher features, rng); the trainer
differentiates it. Loss terms are computed only when their weight is present in the stage's
`loss_weights`, so stage 1 needs no teacher features.
"""

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from rebalance_jax import chunked_losses, losses
from rebalance_jax.errors import InputError
from rebalance_jax.models.student import Student

TEACHER_TERMS = ("iic", "ttc", "kd", "kdi", "kdt")
ALL_TERMS = ("itc", "itm") + TEACHER_TERMS


def effective_scalars(raw: Mapping[str, jax.Array], loss: ml_collections.ConfigDict):
  """τ, τ2 and λ as the losses use them, from the raw parameters and the loss options."""
  return {
      "temp": raw["temp"],
      "temp2": losses.relation_temperature(raw["temp2"], loss.tau2_mode, tuple(loss.tau2_range),
                                           loss.tau2_fixed),
      "lam": losses.fusion_weight(raw["lam"], loss.lambda_mode),
  }


def stage_loss(params, batch: Mapping[str, jax.Array], teacher_features, rng: jax.Array, *,
               model: Student, loss_config: ml_collections.ConfigDict,
               weights: Mapping[str, float], dual_relation: str, num_negative_groups: int,
               mesh=None, train: bool = True):
  """Weighted sum of the stage's loss terms over the global batch.

  Args:
    params: student parameters.
    batch: "image" (float, preprocessed), "ids", "mask", "image_id".
    teacher_features: (g^v, g^t) raw teacher features for the batch rows, or None in stage 1.
    rng: per-step key (dropout and ITM negative sampling).
    weights: loss weight of each term to compute.
    num_negative_groups: ITM negatives are drawn within this many contiguous batch groups.
    mesh: the device mesh; needed when loss_config.chunked selects the ring-chunked losses.

  Returns:
    (total loss, metrics: each term, the total and the effective scalars).
  """
  dropout_rng, negatives_rng = jax.random.split(rng)
  apply = functools.partial(model.apply, {"params": params}, rngs={"dropout": dropout_rng})
  ids = batch["image_id"]
  image_tokens, v = apply(batch["image"], train, method=Student.encode_image)
  text_hidden, t = apply(batch["ids"], batch["mask"], train, method=Student.encode_text)
  scalars = effective_scalars(apply(method=Student.scalars), loss_config)
  temp = scalars["temp"]

  global_losses = _global_batch_losses(loss_config, mesh)
  terms = {"itc": global_losses.itc_loss(v, t, ids, temp)}
  fused = None
  if "itm" in weights or (not model.config.dual_encoder and "kd" in weights):
    neg_image, neg_text = losses.sample_hard_negatives(negatives_rng, v, t, ids, temp,
                                                       num_negative_groups)
    # Rows: B matched pairs, B (text, negative image), B (negative text, image).
    take = functools.partial(_take_within_groups, num_groups=num_negative_groups)
    all_text = jnp.concatenate([text_hidden, text_hidden, take(text_hidden, neg_text)])
    all_mask = jnp.concatenate([batch["mask"], batch["mask"], take(batch["mask"], neg_text)])
    all_images = jnp.concatenate([image_tokens, take(image_tokens, neg_image), image_tokens])
    fused_all = apply(all_text, all_mask, all_images, train, method=Student.fuse)
    itm_logits = apply(fused_all, method=Student.itm_logits)
    b = v.shape[0]
    fused = fused_all[:b]
    terms["itm"] = losses.itm_loss(itm_logits[:b], itm_logits[b:])

  if any(term in weights for term in TEACHER_TERMS):
    image_teacher, text_teacher = teacher_features
    projected_image, projected_text = apply(image_teacher, text_teacher,
                                            method=Student.project_teachers)
    terms["iic"] = global_losses.representation_distillation(v, projected_image, ids, temp)
    terms["ttc"] = global_losses.representation_distillation(t, projected_text, ids, temp)
    terms.update(global_losses.structure_distillation(
        _student_relation_features(fused, v, t, dual_relation), image_teacher, text_teacher,
        scalars["lam"], scalars["temp2"], distance=loss_config.distance))

  total = sum(weights[name] * terms[name] for name in weights)
  metrics = {f"loss/{name}": value for name, value in terms.items()}
  metrics["loss/total"] = total
  metrics.update({f"scalars/{name}": value for name, value in scalars.items()})
  return total, metrics


def _take_within_groups(x: jax.Array, index: jax.Array, num_groups: int) -> jax.Array:
  """x[index] for indices that stay within their row's contiguous group: gathered group by
  group, so that with one group per device no rows cross devices."""
  b = x.shape[0] // num_groups
  grouped = x.reshape(num_groups, b, *x.shape[1:])
  local = (index - jnp.arange(x.shape[0]) // b * b).reshape(num_groups, b)
  return jax.vmap(lambda rows, i: rows[i])(grouped, local).reshape(x.shape)


class _ChunkedLosses:
  """The global-batch losses of `chunked_losses`, bound to a mesh and tile size."""

  def __init__(self, mesh, tile_size):
    bind = lambda fn: functools.partial(fn, mesh=mesh, tile_size=tile_size)
    self.itc_loss = bind(chunked_losses.itc_loss)
    self.representation_distillation = bind(chunked_losses.representation_distillation)
    self.structure_distillation = bind(chunked_losses.structure_distillation)


def _global_batch_losses(loss_config: ml_collections.ConfigDict, mesh):
  """`losses` (global view under GSPMD), or the ring-chunked equivalents."""
  if not loss_config.chunked:
    return losses
  if mesh is None:
    raise ValueError("config.loss.chunked=True needs the device mesh")
  return _ChunkedLosses(mesh, loss_config.chunk_tile or None)


def _student_relation_features(fused, v, t, dual_relation: str):
  """R^M from the fusion CLS (§4.3), or in a dual encoder from v, t or both."""
  if fused is not None:
    return [fused]
  return {"image": [v], "text": [t], "both": [v, t]}[dual_relation]


def validate_weights(weights: Mapping[str, float], dual_encoder: bool, field: str) -> None:
  unknown = set(weights) - set(ALL_TERMS)
  if unknown:
    raise InputError(f"{field}: unknown loss terms {sorted(unknown)}; known: {ALL_TERMS}")
  if dual_encoder and "itm" in weights:
    raise InputError(f"{field} has an 'itm' weight but model.dual_encoder=True has no ITM head")
