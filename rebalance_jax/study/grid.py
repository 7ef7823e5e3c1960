"""The ablation grid as data: each run is one arm's stage on one trunk, a config edit of the base.

A trunk is (student, imbalance level, seed): its workdir holds the teachers, their features and
stage 1, which every arm on it shares (the phases' fingerprints leave out what only later stages
read). An arm is one more stage from stage 1's selected checkpoint, with the same steps, batch
and schedule as the others; the baseline's is stage 1's objective (ITC + ITM), so it has been
trained exactly as long as every distilling arm: the equal-compute control.
"""

import dataclasses
import os

import ml_collections

from rebalance_jax.infra.errors import InputError
from rebalance_jax.models.student import DISTILLATION_PARAMS

REPRESENTATION_TERMS = ("iic", "ttc")
STRUCTURE_TERMS = ("kd", "kdi", "kdt")
FIRST_STAGE = "stage1"  # the base config's stage every arm starts from
TEMPLATE_STAGE = "stage2"  # the base config's distilling stage: the arms' steps, batch, weights


@dataclasses.dataclass(frozen=True)
class Arm:
  """What an arm changes: the terms it keeps of the template stage's weights ("matching": the
  first stage's weights, no distillation), and config fields it sets."""
  terms: str  # "matching", "all", "representation" or "structure"
  overrides: tuple[tuple[str, object], ...] = ()
  description: str = ""


ARMS = {
    "baseline": Arm("matching", description="stage 1's objective again (ITC + ITM; a dual "
                    "encoder's: ITC), as many steps as stage 1 + any other arm's stage"),
    "repr_only": Arm("representation", description="+ L_iic, L_ttc"),
    "structure_only": Arm("structure", description="+ L_kd, L_kdi, L_kdt"),
    "full_faithful": Arm("all", description="every term; raw λ, learned τ2 ([ref])"),
    "full_fixed": Arm("all", (("loss.lambda_mode", "sigmoid"), ("loss.tau2_mode", "clamped")),
                      "every term; sigmoid λ, clamped τ2 (L_kdi + L_kdt is then constant in λ "
                      "under MAE: they only act on τ2)"),
    "lambda_0": Arm("all", (("loss.lambda_mode", "fixed"), ("loss.lambda_fixed", 0.0)),
                    "full_faithful with λ fixed at 0 (image teacher only)"),
    "lambda_half": Arm("all", (("loss.lambda_mode", "fixed"), ("loss.lambda_fixed", 0.5)),
                       "full_faithful with λ fixed at 0.5"),
    "lambda_1": Arm("all", (("loss.lambda_mode", "fixed"), ("loss.lambda_fixed", 1.0)),
                    "full_faithful with λ fixed at 1 (text teacher only)"),
    "mse": Arm("all", (("loss.distance", "mse"),),
               "full_faithful with the MSE relation distance (L_kdi + L_kdt then also pull λ "
               "towards 0.5)"),
}

# Students: config fields set on the base (a dual encoder also drops every 'itm' weight).
STUDENTS = {
    "fusion": (),
    "dual_encoder": (("model.dual_encoder", True),),
}


@dataclasses.dataclass(frozen=True)
class Run:
  student: str
  level: str
  seed: int
  arm: str
  trunk: str                           # the trunk's workdir, relative to the study's
  config: ml_collections.ConfigDict    # the experiment: stage1 and this arm's stage

  @property
  def name(self) -> str:
    return f"{self.trunk}/{self.arm}"


def _set(config: ml_collections.ConfigDict, field: str, value) -> None:
  *parents, last = field.split(".")
  node = config
  for key in parents:
    node = node[key]
  if last not in node:
    raise InputError(f"config.study: {field!r} is not a config field")
  node[last] = value


def arm_weights(arm: Arm, matching: dict, template: dict) -> dict:
  """The arm's loss weights from the first stage's (`matching`) and the template stage's."""
  if arm.terms == "matching":
    return dict(matching)
  dropped = {"all": (), "representation": STRUCTURE_TERMS,
             "structure": REPRESENTATION_TERMS}[arm.terms]
  return {k: v for k, v in template.items() if k not in dropped}


def experiment_config(base: ml_collections.ConfigDict, student: str, level: dict, seed: int,
                      arm_name: str, num_steps: int) -> ml_collections.ConfigDict:
  """The experiment of one run: the base config without its `study` section, at the level's data
  and the seed, with the first stage and the arm's stage only, both `num_steps` long."""
  config = ml_collections.ConfigDict({k: v for k, v in base.to_dict().items() if k != "study"})
  config.seed = seed
  config.data.synthetic.update(level)
  for field, value in STUDENTS[student]:
    _set(config, field, value)
  first, template = config.stages[FIRST_STAGE], config.stages[TEMPLATE_STAGE]
  arm = ARMS[arm_name]
  weights = arm_weights(arm, first.loss_weights.to_dict(), template.loss_weights.to_dict())
  first_weights = first.loss_weights.to_dict()
  if config.model.dual_encoder:  # no ITM head
    weights.pop("itm", None)
    first_weights.pop("itm", None)
  # Weights are assigned, not update()d: an update would merge them into the old ones.
  first.loss_weights = ml_collections.ConfigDict(first_weights)
  first.num_steps = num_steps
  stage = ml_collections.ConfigDict(template.to_dict())
  stage.loss_weights = ml_collections.ConfigDict(weights)
  stage.update(init_from=FIRST_STAGE, fresh_params=tuple(DISTILLATION_PARAMS),
               num_steps=num_steps)
  config.stages = ml_collections.ConfigDict({FIRST_STAGE: first, arm_name: stage})
  for field, value in arm.overrides:
    _set(config, field, value)
  return config


def _check_study(config: ml_collections.ConfigDict) -> None:
  """Everything about config.study that would fail later or silently mislead."""
  if "study" not in config:
    raise InputError("the config has no `study` section: pass a study config, e.g. "
                     "--config=configs/ablation.py")
  s = config.study
  if config.data.name != "synthetic":
    raise InputError(f"config.data.name={config.data.name!r}: the study's levels set the "
                     "synthetic data's knobs (config.data.synthetic); it runs on 'synthetic'")
  seeds = tuple(s.seeds)
  if not seeds or len(set(seeds)) != len(seeds):
    raise InputError(f"config.study.seeds={seeds} must be distinct seeds, at least one")
  if s.num_steps <= 0:
    raise InputError(f"config.study.num_steps={s.num_steps} must be positive")
  for stage in (FIRST_STAGE, TEMPLATE_STAGE):
    if stage not in config.stages:
      raise InputError(f"config.stages has no {stage!r}: the study starts every arm from "
                       f"{FIRST_STAGE} and takes its arms' settings from {TEMPLATE_STAGE}")
  for name, level in s.levels.items():
    unknown = sorted(set(level) - set(config.data.synthetic))
    if unknown:
      raise InputError(f"config.study.levels.{name}: {unknown} are not fields of "
                       f"config.data.synthetic")
  trunks = set()
  for index, group in enumerate(s.groups):
    field = f"config.study.groups[{index}]"
    if len(group) != 3 or isinstance(group[2], str):
      raise InputError(f"{field}={group!r} must be (student, level, (arm, ...))")
    student, level, arms = group
    if student not in STUDENTS:
      raise InputError(f"{field}: unknown student {student!r} (known: {sorted(STUDENTS)})")
    if level not in s.levels:
      raise InputError(f"{field}: unknown level {level!r} (config.study.levels has "
                       f"{sorted(s.levels)})")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms or len(set(arms)) != len(arms):
      raise InputError(f"{field}: the arms {tuple(arms)} must be distinct names of "
                       f"{sorted(ARMS)}")
    if (student, level) in trunks:
      raise InputError(f"{field}: ({student!r}, {level!r}) is already a group")
    trunks.add((student, level))
  figure_arms = tuple(s.figure_arms)
  figure_group = [g for g in s.groups if tuple(g[:2]) == tuple(s.figure_trunk)]
  if not figure_group or not set(figure_arms) <= set(figure_group[0][2]):
    raise InputError(f"config.study.figure_trunk={tuple(s.figure_trunk)} with figure_arms="
                     f"{figure_arms}: each figure arm must be an arm of that group")
  if not any(arm != "baseline" for arm in figure_arms):
    raise InputError(f"config.study.figure_arms={figure_arms} needs an arm besides the baseline "
                     "(its relation matrices are drawn)")


def plan(config: ml_collections.ConfigDict) -> list[Run]:
  """Every run of config.study, trunk by trunk (seed-major, so that a partial study has whole
  seeds), each trunk's arms in the order given."""
  _check_study(config)
  s = config.study
  return [Run(student, level, seed, arm, os.path.join(student, level, f"seed{seed}"),
              experiment_config(config, student, s.levels[level].to_dict(), seed, arm,
                                s.num_steps))
          for seed in s.seeds for student, level, arms in s.groups for arm in arms]
