"""One stage's jitted train step, built as `recipe/phases.py` and `loop.run_stage` build it, on a
random batch and random parameters: what bench/train_step.py and bench/device_check.py time.

The same library pieces (`objective.batch_loss`, `optim.make_optimizer`, `loop.abstract_state`/
`create_state`, `loop.jit_train_step` with its shardings and donation), with nothing read from
disk: every `init` of the config is set to '' and the host batch is random (uint8 images, token
ids and mask, image ids, and for a distilling stage precomputed teacher features of the teachers'
widths).
"""

import dataclasses
import functools

import jax
import numpy as np

from rebalance_jax.config import spec
from rebalance_jax.infra import sharding
from rebalance_jax.models.student import Student, init_student
from rebalance_jax.recipe import workdirs
from rebalance_jax.training import loop, objective
from rebalance_jax.training.optim import make_optimizer


def without_init_weights(config):
  """Every `init` of the config set to '' (random parameters): the whole student's, each
  tower's, the fusion encoder's and the teachers'."""
  for section in (config.model, config.model.image, config.model.text, config.model.fusion,
                  config.teachers.image, config.teachers.text):
    if "init" in section:
      section.init = ""
  return config


def random_batch(exp: spec.Experiment, stage: spec.StageSpec, vocab: int, seed: int = 0):
  """A host batch shaped as `pipeline.pair_rows` (plus `TeacherFeatures.rows`) makes one."""
  rng = np.random.default_rng(seed)
  b, size, tokens = stage.batch_size, exp.data.image_size, exp.data.max_tokens
  lengths = rng.integers(max(tokens // 2, 1), tokens + 1, b)
  mask = (np.arange(tokens)[None] < lengths[:, None]).astype(np.int32)
  batch = {"image": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
           "ids": (rng.integers(1, vocab, (b, tokens)) * mask).astype(np.int32),
           "mask": mask, "image_id": np.arange(b, dtype=np.int32)}
  if stage.objective.uses_teachers:
    s = exp.student
    batch["teacher_image"] = rng.normal(size=(b, s.image_teacher_dim)).astype(np.float32)
    batch["teacher_text"] = rng.normal(size=(b, s.text_teacher_dim)).astype(np.float32)
  return batch


@dataclasses.dataclass
class StageStep:
  exp: spec.Experiment
  stage: spec.StageSpec
  mesh: jax.sharding.Mesh
  model: Student
  abstract_params: dict
  tx: object
  target: dict       # the train state's shapes and shardings
  train_step: object  # jitted (state, batch, frozen, rng) -> (state, metrics)
  batch: dict        # global arrays
  rng: jax.Array
  seed: int

  @property
  def args(self):
    return (self.batch, None, self.rng)

  def lower(self):
    return self.train_step.lower(self.target, *self.args)

  def fresh_state(self):
    """The initial train state from random parameters (the parameters alone are freed)."""
    params = jax.jit(functools.partial(init_student, self.model))(jax.random.key(self.seed))
    return loop.create_state(params, self.tx, self.mesh, self.exp.param_rules)


def flops(compiled) -> float:
  """The model FLOPs of one device's compiled program (XLA's cost analysis; 0 if it has none)."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return cost.get("flops", 0.0)


def build(config, stage_name: str, vocab: int) -> StageStep:
  """The stage `stage_name` of `config` (random weights: see `without_init_weights`) with a
  random batch of its global batch size. Raises InputError for a config the library refuses."""
  exp = spec.from_config(without_init_weights(config))
  stage = exp.stage(stage_name)
  if stage.objective.uses_teachers and exp.teachers.mode != "precomputed":
    raise ValueError(f"config.teachers.mode={exp.teachers.mode!r}: the bench times precomputed "
                     "teacher features; pass --config.teachers.mode=precomputed")
  mesh = workdirs.make_mesh(exp)
  sharding.check_batch_size(stage.batch_size, mesh, f"{stage.field}.batch_size")
  model = workdirs.student_model(exp, vocab)
  seed = loop.stage_seed(exp.seed, stage.name)
  abstract_params = jax.eval_shape(functools.partial(init_student, model), jax.random.key(0))
  total_steps = stage.num_steps if stage.num_steps > 0 else 10_000  # only the lr schedule's shape
  tx, _ = make_optimizer(exp.optim, abstract_params, total_steps)
  loss_fn = functools.partial(objective.batch_loss, model=model, objective=stage.objective,
                              augment_shift=exp.data.augment_shift, online_teachers=None,
                              mesh=mesh)
  target = loop.abstract_state(abstract_params, tx, mesh, exp.param_rules)
  return StageStep(exp, stage, mesh, model, abstract_params, tx, target,
                   loop.jit_train_step(loss_fn, tx, mesh, target),
                   sharding.to_global(random_batch(exp, stage, vocab), mesh), jax.random.key(seed),
                   seed)
