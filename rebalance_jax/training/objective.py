"""The training objective of one stage: student forward pass + weighted loss terms (§4.4).

`stage_loss` is a pure function of (params, batch, teacher features, rng); `batch_loss` wraps it
with the on-device preprocessing of a host batch and the teacher features, as the trainer
differentiates it. Loss terms are computed only when their weight is present in the stage's
objective, so a stage without distillation terms needs no teacher features.
"""

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from rebalance_jax import losses
from rebalance_jax.data import augment
from rebalance_jax.models import towers
from rebalance_jax.models.layers import take_in_groups
from rebalance_jax.models.student import Student
from rebalance_jax.training import chunked_losses

if TYPE_CHECKING:  # the config layer builds the spec; this library only reads it
  from rebalance_jax.config.spec import ObjectiveSpec


def effective_scalars(raw: Mapping[str, jax.Array], objective: "ObjectiveSpec"):
  """τ, τ2 and λ as the losses use them, from the raw parameters and the loss options."""
  return {
      "temp": raw["temp"],
      "temp2": losses.relation_temperature(raw["temp2"], objective.tau2_mode,
                                           tuple(objective.tau2_range), objective.tau2_fixed),
      "lam": losses.fusion_weight(raw["lam"], objective.lambda_mode, objective.lambda_fixed),
  }


def batch_loss(params, batch, frozen, rng, *, model: Student, objective: "ObjectiveSpec",
               augment_shift: int, online_teachers: dict | None, mesh):
  """`stage_loss` of a host batch (uint8 "image", "ids", "mask", "image_id", and the
  precomputed "teacher_image"/"teacher_text" rows when the objective distills): augments and
  preprocesses the images on the device; `online_teachers` ({"image", "text"} FrozenTeachers,
  their parameters in `frozen`) compute the teacher features in the step instead."""
  augment_rng, loss_rng = jax.random.split(rng)
  uint8_images = augment.random_shift(augment_rng, batch["image"], augment_shift)
  teacher_features = None
  if objective.uses_teachers and online_teachers is not None:
    text_inputs = ((batch["teacher_ids"], batch["teacher_mask"]) if "teacher_ids" in batch
                   else (batch["ids"], batch["mask"]))
    teacher_features = (online_teachers["image"].features(frozen["image"], uint8_images),
                        online_teachers["text"].features(frozen["text"], *text_inputs))
  elif objective.uses_teachers:
    teacher_features = (batch["teacher_image"], batch["teacher_text"])
  groups = mesh.devices.size if objective.itm_negatives == "device" else 1
  images = towers.preprocess_images(model.config.image.config, uint8_images)
  return stage_loss(params, {**batch, "image": images}, teacher_features, loss_rng, model=model,
                    objective=objective, num_negative_groups=groups, mesh=mesh)


def stage_loss(params, batch: Mapping[str, jax.Array], teacher_features, rng: jax.Array, *,
               model: Student, objective: "ObjectiveSpec", num_negative_groups: int, mesh=None,
               train: bool = True):
  """Weighted sum of the stage's loss terms over the global batch.

  Args:
    params: student parameters.
    batch: "image" (float, preprocessed), "ids", "mask", "image_id".
    teacher_features: (g^v, g^t) raw teacher features for the batch rows, or None without
      distillation terms.
    rng: per-step key (dropout and ITM negative sampling).
    objective: the weight of each term to compute, and the loss options.
    num_negative_groups: ITM negatives are drawn within this many contiguous batch groups.
    mesh: the device mesh; needed when objective.chunked selects the ring-chunked losses.

  Returns:
    (total loss, metrics: each term, the total and the effective scalars).
  """
  weights = objective.weights
  dropout_rng, negatives_rng = jax.random.split(rng)
  apply = functools.partial(model.apply, {"params": params}, rngs={"dropout": dropout_rng})
  ids = batch["image_id"]
  image, v = apply(batch["image"], train, method=Student.encode_image)
  text, t = apply(batch["ids"], batch["mask"], train, method=Student.encode_text)
  image_tokens, text_hidden = image.tokens, text.tokens
  scalars = effective_scalars(apply(method=Student.scalars), objective)
  temp = scalars["temp"]

  global_losses = _global_batch_losses(objective, mesh)
  terms = {"itc": global_losses.itc_loss(v, t, ids, temp)}
  fused = None
  if "itm" in weights or (not model.config.dual_encoder and "kd" in weights):
    neg_image, neg_text = losses.sample_hard_negatives(negatives_rng, v, t, ids, temp,
                                                       num_negative_groups)
    # Rows: B matched pairs, B (text, negative image), B (negative text, image), laid out group by
    # group so that each device fuses its own rows. Each image's cross-attention keys and values
    # are computed once, for the B images of the batch.
    groups = num_negative_groups
    local = lambda index: _index_within_groups(index, groups)
    rows = jnp.arange(v.shape[0])
    by_group = lambda *parts: jnp.stack([p.reshape(groups, -1, *p.shape[1:]) for p in parts],
                                        1).reshape(-1, *parts[0].shape[1:])
    neg_text_hidden = take_in_groups(text_hidden, local(neg_text))
    neg_text_mask = take_in_groups(batch["mask"], local(neg_text))
    image_index = by_group(local(rows), local(neg_image), local(rows)).reshape(groups, -1)
    fused_all = apply(by_group(text_hidden, text_hidden, neg_text_hidden),
                      by_group(batch["mask"], batch["mask"], neg_text_mask), image_tokens,
                      image.mask, train, image_index, method=Student.fuse)
    # Back to [matched pairs; negatives] in batch order.
    fused_all = fused_all.reshape(groups, 3, -1, fused_all.shape[-1]).transpose(1, 0, 2, 3)
    fused_all = fused_all.reshape(-1, fused_all.shape[-1])
    itm_logits = apply(fused_all, method=Student.itm_logits)
    b = v.shape[0]
    fused = fused_all[:b]
    terms["itm"] = losses.itm_loss(itm_logits[:b], itm_logits[b:])

  if objective.uses_teachers:
    image_teacher, text_teacher = teacher_features
    projected_image, projected_text = apply(image_teacher, text_teacher,
                                            method=Student.project_teachers)
    terms["iic"] = global_losses.representation_distillation(v, projected_image, ids, temp)
    terms["ttc"] = global_losses.representation_distillation(t, projected_text, ids, temp)
    terms.update(global_losses.structure_distillation(
        _student_relation_features(fused, v, t, objective.dual_relation), image_teacher,
        text_teacher, scalars["lam"], scalars["temp2"], distance=objective.distance))

  total = sum(weights[name] * terms[name] for name in weights)
  metrics = {f"loss/{name}": value for name, value in terms.items()}
  metrics["loss/total"] = total
  metrics.update({f"scalars/{name}": value for name, value in scalars.items()})
  return total, metrics


def _index_within_groups(index: jax.Array, num_groups: int) -> jax.Array:
  """Batch row numbers (B,) that stay within their row's contiguous group -> (G, B / G) row
  numbers within the group (`take_in_groups`)."""
  b = index.shape[0] // num_groups
  return (index - jnp.arange(index.shape[0]) // b * b).reshape(num_groups, b)


class _ChunkedLosses:
  """The global-batch losses of `chunked_losses`, bound to a mesh and tile size."""

  def __init__(self, mesh, tile_size):
    bind = lambda fn: functools.partial(fn, mesh=mesh, tile_size=tile_size)
    self.itc_loss = bind(chunked_losses.itc_loss)
    self.representation_distillation = bind(chunked_losses.representation_distillation)
    self.structure_distillation = bind(chunked_losses.structure_distillation)


def _global_batch_losses(objective: "ObjectiveSpec", mesh):
  """`losses` (global view under GSPMD), or the ring-chunked equivalents."""
  if not objective.chunked:
    return losses
  if mesh is None:
    raise ValueError("config.loss.chunked=True needs the device mesh")
  return _ChunkedLosses(mesh, objective.chunk_tile or None)


def _student_relation_features(fused, v, t, dual_relation: str):
  """R^M from the fusion CLS (§4.3), or in a dual encoder from v, t or both."""
  if fused is not None:
    return [fused]
  return {"image": [v], "text": [t], "both": [v, t]}[dual_relation]
