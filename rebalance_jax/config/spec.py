"""The config, read once: validated, and turned into the frozen specs library code takes.

`from_config(config)` is the only reader of an experiment's ConfigDict (besides the entry points'
flags). It checks every field that would fail later or silently mislead, with an error naming the
field, and returns an `Experiment`: the data spec, the student's and teachers' tower specs, the
stages (a DAG: each stage starts from the one named by its `init_from`, run in dependency order),
an objective per stage, the optimizer, the evaluation spec, and each phase's fingerprint.

A phase's fingerprint covers exactly the config fields its outputs depend on, so that runs that
differ only in a later stage share the earlier phases' checkpoints.
"""

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping

import ml_collections

from rebalance_jax.data import annotations, sources
from rebalance_jax.evaluators import ranking, retrieval
from rebalance_jax.infra import sharding
from rebalance_jax.infra.errors import InputError
from rebalance_jax.models import towers, weights
from rebalance_jax.models.fusion import FusionConfig
from rebalance_jax.models.student import DISTILLATION_PARAMS, StudentConfig

TEACHER_TERMS = ("iic", "ttc", "kd", "kdi", "kdt")
FEATURE_DTYPES = ("float32", "float16")  # of precomputed teacher features
ALL_TERMS = ("itc", "itm") + TEACHER_TERMS
_CHOICES = {
    "loss.lambda_mode": ("raw", "sigmoid", "fixed"),
    "loss.tau2_mode": ("learned", "clamped", "fixed"),
    "loss.distance": ("mae", "mse"),
    "loss.itm_negatives": ("device", "global"),
    "teachers.mode": ("precomputed", "online"),
    "teachers.feature_dtype": FEATURE_DTYPES,
    "teachers.image_view": ("resize", "center_crop"),
    "model.dual_relation": ("image", "text", "both"),
    "eval.single_modal_self": ranking.SELF_RULES,
    "eval.select_on": ("val", "test", "last"),
    "data.on_bad_example": annotations.POLICIES,
    "data.augment": ("shift", "reference"),
    "data.exif_orientation": ("ignore", "apply"),
}
# Where the data lies, and how many processes read it, do not change what it is.
# A real dataset's annotation files are in the fingerprints by content (Dataset.content).
_LOCATION_FIELDS = ("cache_dir", "image_root", "prepared_dir", "num_workers", "annotation_file",
                    "train_file", "val_file", "test_file")
# Data fields only the evaluation splits or the student's augmentation depend on.
_EVAL_ONLY_DATA = ("max_words_eval", "augment", "augment_shift", "crop_scale", "randaugment")
_EVAL_ONLY_SYNTHETIC = ("num_val", "num_test")
# Fields of the objective and the model that only matter to a stage with distillation terms: the
# distillation parameters (student.DISTILLATION_PARAMS) a stage without them holds are never read
# (a distilling stage must start them fresh unless it inherits them trained, see _stages).
_DISTILLATION_LOSS = ("lambda_mode", "lambda_fixed", "tau2_mode", "tau2_range", "tau2_fixed",
                      "distance")
_DISTILLATION_MODEL = ("dual_relation", "lam_init", "temp2_init")
# Teacher fields that change neither the teachers' weights nor their features.
_TEACHER_USE = ("mode", "features_dir")
# Model selection decides which checkpoints a stage keeps and what their saved metrics mean.
_SELECTION = ("select_on", "select_metric", "every_steps", "itm_k", "single_modal_self")
# A stage's name is a directory of the workdir; these are taken.
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_RESERVED_NAMES = ("teachers", "teacher_features", "teacher_image", "teacher_text", "eval")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  name: str
  cache_dir: str
  image_root: str
  annotation_file: str
  train_file: str
  val_file: str
  test_file: str
  prepared_dir: str
  on_bad_example: str
  num_workers: int
  image_size: int
  max_tokens: int
  text_buckets: tuple[int, ...]  # the lengths below max_tokens that training batches pad to
  max_words_train: int
  max_words_eval: int
  augment: str
  augment_shift: int
  crop_scale: tuple[float, float]
  randaugment: tuple[int, int]
  exif_orientation: str
  vocab_file: str      # '' trains a WordPiece vocabulary on the training captions
  vocab_size: int      # of that trained vocabulary
  append_sep: bool
  options: Mapping     # the source's own section (e.g. config.data.synthetic)


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  """A stage's loss: the weight of each term, and the §4 options."""
  weights: Mapping[str, float]
  lambda_mode: str = "raw"
  lambda_fixed: float = 0.5
  tau2_mode: str = "learned"
  tau2_range: tuple[float, float] = (0.03, 0.5)
  tau2_fixed: float = 0.07
  distance: str = "mae"
  itm_negatives: str = "device"
  chunked: bool = False
  chunk_tile: int = 0
  dual_relation: str = "image"

  @property
  def uses_teachers(self) -> bool:
    return any(term in self.weights for term in TEACHER_TERMS)


@dataclasses.dataclass(frozen=True)
class StageSpec:
  name: str
  init_from: str             # '' : the fresh initialization (plus the towers' `init` weights)
  fresh_params: tuple[str, ...]  # top-level parameter subtrees initialized fresh, not inherited
  num_steps: int
  num_epochs: int
  batch_size: int
  objective: ObjectiveSpec

  @property
  def field(self) -> str:
    return f"config.stages.{self.name}"

  def total_steps(self, num_pairs: int) -> int:
    """num_steps if set, else num_epochs full epochs of the global batch."""
    if num_pairs < self.batch_size:
      raise InputError(f"{self.field}.batch_size={self.batch_size} exceeds the {num_pairs} "
                       "training pairs")
    return self.num_steps if self.num_steps > 0 else self.num_epochs * (num_pairs //
                                                                        self.batch_size)


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  batch_size: int
  itm_k: int
  subsets: tuple[int, ...]
  single_modal_self: str
  select_on: str
  select_metric: str
  every_steps: int
  fingerprint: str  # of every eval field: recorded with each results row

  def every(self, stage: StageSpec, num_pairs: int) -> int:
    """How often `stage` evaluates for model selection: every_steps, or (0) once per epoch."""
    return self.every_steps or max(num_pairs // stage.batch_size, 1)


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  modality: str
  tower: towers.TowerSpec  # a text teacher's vocab_size is set once the tokenizer is known
  field: str


@dataclasses.dataclass(frozen=True)
class TeachersSpec:
  mode: str               # "precomputed" (feature files, as [ref]) or "online"
  image: TeacherSpec
  text: TeacherSpec
  vocab_file: str         # the text teacher's tokenizer ('' : the student's)
  features_dir: str       # precomputed features ('' : <workdir>/teacher_features)
  feature_dtype: str      # of the stored features: float32 or float16
  image_view: str         # "resize" ([ref]) or "center_crop" (CLIP's): the image teacher's input
  num_steps: int          # attribute pre-training of a teacher without `init` weights
  batch_size: int
  lr: float


@dataclasses.dataclass(frozen=True)
class OptimSpec:
  lr: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  warmup_fraction: float
  no_decay: tuple[str, ...]
  lr_multipliers: tuple[tuple[str, float], ...]


@dataclasses.dataclass(frozen=True)
class Experiment:
  seed: int
  data: DataSpec
  student: StudentConfig    # its text tower's vocab_size comes from the tokenizer: student_config
  teachers: TeachersSpec
  stages: tuple[StageSpec, ...]  # in dependency order
  optim: OptimSpec
  eval: EvalSpec
  fsdp: int
  param_rules: sharding.ParamRules
  checkpoint_every: int
  checkpoint_keep: int
  log_every: int
  fingerprints: Mapping[str, dict]  # phase ("teachers" or a stage name) -> its config fields

  def stage(self, name: str) -> StageSpec:
    for stage in self.stages:
      if stage.name == name:
        return stage
    raise InputError(f"no stage {name!r} in config.stages (it has {self.stage_names})")

  @property
  def stage_names(self) -> tuple[str, ...]:
    return tuple(s.name for s in self.stages)

  @property
  def uses_teachers(self) -> bool:
    return any(s.objective.uses_teachers for s in self.stages)

  def pretrained_teachers(self) -> tuple[str, ...]:
    """The modalities whose teacher this experiment pre-trains (used, without `init` weights)."""
    if not self.uses_teachers:
      return ()
    return tuple(t.modality for t in (self.teachers.image, self.teachers.text) if not t.tower.init)

  def fingerprint(self, phase: str, content: dict) -> dict:
    """What `phase` depends on, with what only the loaded data knows (`Dataset.content`: the
    vocabulary's size and hash, a real dataset's annotation hashes)."""
    return {**self.fingerprints[phase], **content}

  def student_config(self, vocab_size: int) -> StudentConfig:
    """The student's config with its text tower sized to the tokenizer's vocabulary."""
    return dataclasses.replace(self.student, text=with_vocab_size(self.student.text, vocab_size))


def with_vocab_size(tower: towers.TowerSpec, vocab_size: int) -> towers.TowerSpec:
  return dataclasses.replace(tower, config=dataclasses.replace(tower.config,
                                                               vocab_size=vocab_size))


def for_weights_file(config: ml_collections.ConfigDict, path: str) -> ml_collections.ConfigDict:
  """`config` made to evaluate the whole-student weights file `path` (`evaluate --weights`): the
  model fields the converter recorded in the file (image size, depths, widths, max_tokens...),
  the data's image size matched to the image tower's, and no weights file of its own (the file
  holds every weight an evaluation reads; the teachers are not used)."""
  config = config.copy_and_resolve_references()
  for section, values in weights.saved_fields(path).items():
    node = _get(config, section)
    if values.get("kind", node.get("kind")) != node.get("kind"):
      raise InputError(f"--weights={path} holds a {values['kind']!r} tower for config.{section}, "
                       f"which is {node.kind!r}: use the config the model was trained with")
    for key, value in values.items():
      node[key] = tuple(value) if isinstance(value, list) else value
  for field in _WEIGHT_FIELDS:
    *parents, key = field.split(".")
    _get(config, ".".join(parents))[key] = ""
  config.data.image_size = config.model.image.image_size
  return config


def from_config(config: ml_collections.ConfigDict) -> Experiment:
  """Validates `config` and reads it into an Experiment; raises InputError naming the field."""
  for field, choices in _CHOICES.items():
    if _get(config, field) not in choices:
      raise InputError(f"config.{field}={_get(config, field)!r} is not one of {choices}")
  _check_numbers(config)
  _check_weights_files(config)
  data = _data(config)
  teachers = _teachers(config)
  student = _student(config, teachers)
  if student.image.config.image_size != data.image_size:
    raise InputError(f"config.model.image.image_size={student.image.config.image_size} differs "
                     f"from config.data.image_size={data.image_size}")
  for field, tower in (("config.model.text", student.text),
                       (teachers.text.field, teachers.text.tower)):
    if tower.config.max_tokens < data.max_tokens:
      raise InputError(f"{field}.max_tokens={tower.config.max_tokens} is below "
                       f"config.data.max_tokens={data.max_tokens}")
  stages = _stages(config)
  eval_spec = _eval(config)
  if config.loss.lambda_mode == "sigmoid" and not 0 < config.model.lam_init < 1:
    raise InputError(f"config.model.lam_init={config.model.lam_init} must lie in (0, 1) with "
                     "config.loss.lambda_mode='sigmoid'")
  o = config.optim
  return Experiment(
      seed=config.seed, data=data, student=student, teachers=teachers, stages=stages,
      optim=OptimSpec(o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.warmup_fraction,
                      tuple(o.no_decay), tuple(tuple(m) for m in o.lr_multipliers)),
      eval=eval_spec, fsdp=config.mesh.fsdp,
      param_rules=sharding.ParamRules(tuple(tuple(r) for r in config.sharding.rules),
                                      config.sharding.fsdp_min_size),
      checkpoint_every=config.checkpoint.every_steps, checkpoint_keep=config.checkpoint.keep,
      log_every=config.log_every, fingerprints=_fingerprints(config, stages, student))


def _get(config: ml_collections.ConfigDict, field: str):
  node = config
  for key in field.split("."):
    node = node[key]
  return node


def _plain(node):
  return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def _tower(section, field: str, modality: str, **fixed) -> towers.TowerSpec:
  return towers.spec_from_config(_plain(section), field, modality, **fixed)


_WEIGHT_FIELDS = ("model.init", "model.image.init", "model.text.init", "model.fusion.init",
                  "teachers.image.init", "teachers.text.init")


def _check_weights_files(config: ml_collections.ConfigDict) -> None:
  """Every converted weights file the config names exists, before anything runs; the missing ones
  are named together."""
  missing = []
  for field in _WEIGHT_FIELDS:
    path = _get(config, field)
    if path and not os.path.isfile(os.path.expanduser(path)):
      missing.append(f"config.{field}={path!r}")
  if missing:
    raise InputError(f"{', '.join(missing)} {'does' if len(missing) == 1 else 'do'} not exist: "
                     f"convert the checkpoint{'s' * (len(missing) > 1)} into "
                     f"{'it' if len(missing) == 1 else 'them'} first (python -m "
                     "rebalance_jax.convert; docs/weights.md)")


def _student(config: ml_collections.ConfigDict, teachers: "TeachersSpec") -> StudentConfig:
  m = config.model
  fusion_fields = dict(_plain(m.fusion))
  fusion_init = fusion_fields.pop("init", "")
  try:
    fusion = FusionConfig(**fusion_fields)
  except (TypeError, ValueError) as e:
    raise InputError(f"config.model.fusion: {e}") from None
  own_inits = [f"config.model.{k}.init" for k in ("image", "text", "fusion") if m[k].init]
  if m.init and own_inits:
    raise InputError(f"config.model.init={m.init!r} holds the whole student: unset {own_inits}")
  image = _tower(m.image, "config.model.image", "image")
  text = _tower(m.text, "config.model.text", "text", vocab_size=1)
  return StudentConfig(
      init=m.init, image=image, text=text,
      fusion=fusion, fusion_init=fusion_init, embed_dim=m.embed_dim, dual_encoder=m.dual_encoder,
      image_teacher_dim=towers.output_dim(teachers.image.tower),
      text_teacher_dim=towers.output_dim(teachers.text.tower),
      temp_init=m.temp_init, temp2_init=m.temp2_init, lam_init=m.lam_init,
      lambda_mode=config.loss.lambda_mode)


def _check_numbers(config: ml_collections.ConfigDict) -> None:
  for field in ("checkpoint.every_steps", "checkpoint.keep", "log_every", "eval.batch_size",
                "teachers.num_steps", "teachers.batch_size"):
    if _get(config, field) <= 0:
      raise InputError(f"config.{field}={_get(config, field)} must be positive")
  for field in ("optim.lr", "teachers.lr", "optim.eps", "model.temp_init", "model.temp2_init",
                "loss.tau2_fixed"):
    value = _get(config, field)
    if not (math.isfinite(value) and value > 0):
      raise InputError(f"config.{field}={value} must be a positive finite number")
  for field, low, high in (("optim.b1", 0, 1), ("optim.b2", 0, 1), ("optim.warmup_fraction", 0, 1)):
    if not low <= _get(config, field) < high:
      raise InputError(f"config.{field}={_get(config, field)} must lie in [{low}, {high})")
  if not math.isfinite(config.loss.lambda_fixed):
    raise InputError(f"config.loss.lambda_fixed={config.loss.lambda_fixed} must be finite")
  if not (math.isfinite(config.optim.weight_decay) and config.optim.weight_decay >= 0):
    raise InputError(f"config.optim.weight_decay={config.optim.weight_decay} must be >= 0")
  if not 0 <= config.data.augment_shift < config.data.image_size:
    raise InputError(f"config.data.augment_shift={config.data.augment_shift} must lie in "
                     f"[0, config.data.image_size={config.data.image_size})")
  low, high = config.loss.tau2_range
  if not 0 < low <= high:
    raise InputError(f"config.loss.tau2_range={tuple(config.loss.tau2_range)} must be (low, high) "
                     "with 0 < low <= high")


def _data(config: ml_collections.ConfigDict) -> DataSpec:
  d, t = config.data, config.tokenizer
  options = d.get(d.name, {})  # the source's own section, e.g. config.data.synthetic
  for field, value in (("augment", "reference"), ("exif_orientation", "apply")):
    if d[field] == value and not sources.get(d.name).encoded_images:
      raise InputError(f"config.data.{field}={value!r} needs a source of encoded images (a real "
                       f"dataset), not config.data.name={d.name!r}")
  low, high = d.crop_scale
  if not 0 < low <= high <= 1:
    raise InputError(f"config.data.crop_scale={tuple(d.crop_scale)} must be (low, high) with "
                     "0 < low <= high <= 1")
  ops, magnitude = d.randaugment
  if ops < 0 or not 0 <= magnitude <= 10:
    raise InputError(f"config.data.randaugment={tuple(d.randaugment)} must be (ops >= 0, "
                     "magnitude in [0, 10])")
  if d.num_workers < 0:
    raise InputError(f"config.data.num_workers={d.num_workers} must be >= 0")
  buckets = tuple(d.text_buckets)
  if any(not isinstance(b, int) or b < 2 for b in buckets):
    raise InputError(f"config.data.text_buckets={buckets} must be whole numbers of tokens >= 2 "
                     "([CLS] and one word)")
  return DataSpec(
      name=d.name, cache_dir=d.cache_dir, image_root=d.image_root,
      annotation_file=d.annotation_file, train_file=d.train_file, val_file=d.val_file,
      test_file=d.test_file, prepared_dir=d.prepared_dir, on_bad_example=d.on_bad_example,
      num_workers=d.num_workers, image_size=d.image_size, max_tokens=d.max_tokens,
      text_buckets=tuple(sorted({b for b in buckets if b < d.max_tokens})),
      max_words_train=d.max_words_train, max_words_eval=d.max_words_eval, augment=d.augment,
      augment_shift=d.augment_shift, crop_scale=tuple(d.crop_scale),
      randaugment=tuple(d.randaugment), exif_orientation=d.exif_orientation,
      vocab_file=t.vocab_file, vocab_size=t.vocab_size,
      append_sep=t.append_sep, options=_plain(options))


def _teachers(config: ml_collections.ConfigDict) -> TeachersSpec:
  t = config.teachers
  image = TeacherSpec("image", _tower(t.image, "config.teachers.image", "image"),
                      "config.teachers.image")
  text = TeacherSpec("text", _tower(t.text, "config.teachers.text", "text", vocab_size=1),
                     "config.teachers.text")
  if t.image_view != "resize" and (t.mode != "precomputed" or
                                   not sources.get(config.data.name).encoded_images):
    raise InputError(f"config.teachers.image_view={t.image_view!r} applies to precomputed "
                     "features of encoded images (a real dataset, config.teachers.mode="
                     "'precomputed'); online teachers see the student's batch")
  return TeachersSpec(mode=t.mode, image=image, text=text, vocab_file=t.vocab_file,
                      features_dir=t.features_dir, feature_dtype=t.feature_dtype,
                      image_view=t.image_view, num_steps=t.num_steps, batch_size=t.batch_size,
                      lr=t.lr)


def _objective(config: ml_collections.ConfigDict, weights, field: str) -> ObjectiveSpec:
  try:
    weights = {k: float(v) for k, v in _plain(weights).items()}
  except (TypeError, ValueError) as e:
    raise InputError(f"{field}: every weight must be a number ({e})") from None
  unknown = set(weights) - set(ALL_TERMS)
  if unknown:
    raise InputError(f"{field}: unknown loss terms {sorted(unknown)}; known: {ALL_TERMS}")
  for term, weight in weights.items():
    # A negative weight would maximize its loss; NaN or infinity would only fail after the teachers.
    if not (math.isfinite(weight) and weight >= 0):
      raise InputError(f"{field}.{term}={weight} must be a finite number >= 0 (delete the term "
                       "to leave it out)")
  if config.model.dual_encoder and "itm" in weights:
    raise InputError(f"{field} has an 'itm' weight but config.model.dual_encoder=True has no ITM "
                     "head")
  loss = config.loss
  return ObjectiveSpec(
      weights=weights, lambda_mode=loss.lambda_mode, lambda_fixed=loss.lambda_fixed,
      tau2_mode=loss.tau2_mode, tau2_range=tuple(loss.tau2_range), tau2_fixed=loss.tau2_fixed,
      distance=loss.distance, itm_negatives=loss.itm_negatives, chunked=loss.chunked,
      chunk_tile=loss.chunk_tile, dual_relation=config.model.dual_relation)


_STAGE_FIELDS = ("init_from", "fresh_params", "num_epochs", "num_steps", "batch_size",
                 "loss_weights")


def _stages(config: ml_collections.ConfigDict) -> tuple[StageSpec, ...]:
  """The stages in dependency order (a stage after the one it starts from; ties by name)."""
  if not config.stages:
    raise InputError("config.stages is empty: define at least one stage")
  specs = {}
  for name, s in config.stages.items():
    field = f"config.stages.{name}"
    if not _STAGE_NAME.match(name) or name in _RESERVED_NAMES:
      raise InputError(f"{field}: a stage name is lower-case letters, digits and '_' (it names a "
                       f"workdir folder) and not one of {_RESERVED_NAMES}")
    missing = sorted(set(_STAGE_FIELDS) - set(s))
    unknown = sorted(set(s) - set(_STAGE_FIELDS))
    if missing or unknown:
      raise InputError(f"{field}: missing fields {missing}, unknown fields {unknown}; a stage has "
                       f"{_STAGE_FIELDS}")
    if s.num_steps <= 0 and s.num_epochs <= 0:
      raise InputError(f"{field}: set num_steps or num_epochs to a positive value")
    if s.init_from and s.init_from not in config.stages:
      raise InputError(f"{field}.init_from={s.init_from!r} is not a stage; stages: "
                       f"{sorted(config.stages)}")
    objective = _objective(config, s.loss_weights, f"{field}.loss_weights")
    specs[name] = StageSpec(name, s.init_from, tuple(s.fresh_params), s.num_steps, s.num_epochs,
                            s.batch_size, objective)
  ordered, visiting = [], set()

  def visit(name):
    if name in visiting:
      raise InputError(f"config.stages: the init_from chain through {name!r} is a cycle")
    if specs[name] in ordered:
      return
    visiting.add(name)
    if specs[name].init_from:
      visit(specs[name].init_from)
    visiting.discard(name)
    ordered.append(specs[name])

  for name in sorted(specs):
    visit(name)
  for stage in ordered:
    _check_distillation_params(stage, specs)
  return tuple(ordered)


def _check_distillation_params(stage: StageSpec, specs: dict) -> None:
  """A distilling stage that would inherit the distillation parameters untrained (no stage before
  it distills) must start them fresh: their values would be another config's initialization."""
  if not stage.objective.uses_teachers:
    return
  ancestor = specs.get(stage.init_from)
  while ancestor is not None:
    if ancestor.objective.uses_teachers:
      return
    ancestor = specs.get(ancestor.init_from)
  inherited = sorted(set(DISTILLATION_PARAMS) - set(stage.fresh_params)) if stage.init_from else []
  if inherited:
    raise InputError(f"{stage.field}.fresh_params must include {inherited}: no stage before it "
                     "distills, so it would inherit them untrained")


def _eval(config: ml_collections.ConfigDict) -> EvalSpec:
  e = config.eval
  if e.select_metric not in retrieval.metric_names():
    raise InputError(f"config.eval.select_metric={e.select_metric!r} is not a metric; "
                     f"known: {sorted(retrieval.metric_names())}")
  if 0 < e.itm_k < max(ranking.RECALL_KS):  # past k, positives tie at the fill: hits
    raise InputError(f"config.eval.itm_k={e.itm_k} must be 0 (no re-ranking) or at least "
                     f"{max(ranking.RECALL_KS)}, the largest recall K")
  if e.every_steps < 0:
    raise InputError(f"config.eval.every_steps={e.every_steps} must be >= 0 (0: once per epoch)")
  if e.select_metric.startswith("itm/") and e.select_on != "last" and (
      config.model.dual_encoder or e.itm_k == 0):
    raise InputError(f"config.eval.select_metric={e.select_metric!r} needs ITM re-ranking, which "
                     "config.model.dual_encoder=True or config.eval.itm_k=0 turns off")
  fingerprint = hashlib.sha256(json.dumps(e.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
  return EvalSpec(e.batch_size, e.itm_k, tuple(e.subsets), e.single_modal_self, e.select_on,
                  e.select_metric, e.every_steps, fingerprint)


def _fingerprints(config: ml_collections.ConfigDict, stages, student: StudentConfig
                  ) -> dict[str, dict]:
  data = {k: _plain(v) for k, v in config.data.items() if k not in _LOCATION_FIELDS}
  common = {"seed": config.seed, "tokenizer": config.tokenizer.to_dict()}
  training_data = {k: v for k, v in data.items() if k not in _EVAL_ONLY_DATA}
  if isinstance(training_data.get("synthetic"), dict):
    training_data["synthetic"] = {k: v for k, v in training_data["synthetic"].items()
                                  if k not in _EVAL_ONLY_SYNTHETIC}
  teachers = {k: v for k, v in config.teachers.to_dict().items() if k not in _TEACHER_USE}
  prints = {"teachers": {**common, "data": training_data, "teachers": teachers}}
  for stage in stages:
    distills = stage.objective.uses_teachers
    model = {k: v for k, v in config.model.to_dict().items()
             if (distills or k not in _DISTILLATION_MODEL) and not (k == "init" and not v)}
    # The shapes of U_v, U_t: every stage's parameters have them.
    model["teacher_dims"] = [student.image_teacher_dim, student.text_teacher_dim]
    loss = {k: v for k, v in config.loss.to_dict().items()
            if distills or k not in _DISTILLATION_LOSS}
    prints[stage.name] = {
        **common, "data": data, "model": model, "optim": config.optim.to_dict(), "loss": loss,
        f"stages.{stage.name}": config.stages[stage.name].to_dict(),
        "eval": {k: config.eval[k] for k in _SELECTION},
        "init_from": prints[stage.init_from] if stage.init_from else None,
        "teachers": prints["teachers"] if distills else None,
        "teachers_mode": config.teachers.mode if distills else None}
  return prints
