"""The config read once: stages as data in dependency order, and fingerprints that cover exactly
what each phase depends on."""

import pytest

from rebalance_jax.config import defaults, spec
from rebalance_jax.infra.errors import InputError


def test_stages_run_in_init_from_order(tiny_config):
  c = tiny_config
  c.stages.a_finetune = defaults.stage("stage2", {"itc": 1.0})
  c.stages.z_scratch = defaults.stage("", {"itc": 1.0}, num_steps=2, batch_size=16)
  names = spec.from_config(c).stage_names
  assert names.index("stage1") < names.index("stage2") < names.index("a_finetune")
  assert set(names) == {"stage1", "stage2", "a_finetune", "z_scratch"}
  exp = spec.from_config(c)
  assert exp.stage("a_finetune").init_from == "stage2"
  assert not exp.stage("a_finetune").objective.uses_teachers
  assert exp.stage("stage2").objective.uses_teachers and exp.uses_teachers
  with pytest.raises(InputError, match=r"no stage 'b' in config\.stages"):
    exp.stage("b")


def test_a_stage_misses_a_field(tiny_config):
  del tiny_config.stages.stage2["fresh_params"]
  with pytest.raises(InputError,
                     match=r"config\.stages\.stage2: missing fields \['fresh_params'\]"):
    spec.from_config(tiny_config)


def _prints(config):
  return spec.from_config(config).fingerprints


@pytest.mark.parametrize("field, value, unchanged, changed", [
    # Options of the distillation terms, and stage 2's own fields: stage 1 and the teachers share.
    ("model.lam_init", 0.3, ("teachers", "stage1"), ("stage2",)),
    ("loss.distance", "mse", ("teachers", "stage1"), ("stage2",)),
    ("stages.stage2.loss_weights.kd", 0.0, ("teachers", "stage1"), ("stage2",)),
    # Stage 1's fields reach stage 2 through its init_from.
    ("stages.stage1.num_steps", 6, ("teachers",), ("stage1", "stage2")),
    # What the teachers never see.
    ("data.synthetic.num_test", 24, ("teachers",), ("stage1", "stage2")),
    ("data.augment_shift", 1, ("teachers",), ("stage1", "stage2")),
    ("teachers.lr", 0.01, ("stage1",), ("teachers", "stage2")),
    ("teachers.mode", "online", ("teachers", "stage1"), ("stage2",)),
    # The shapes of U_v, U_t are in every stage's parameters.
    ("teachers.image.width", 48, (), ("teachers", "stage1", "stage2")),
    # Where the data lies does not change what it is.
    ("data.cache_dir", "/elsewhere", ("teachers", "stage1", "stage2"), ()),
])
def test_each_phase_fingerprints_what_it_depends_on(tiny_config, field, value, unchanged,
                                                    changed):
  before = _prints(tiny_config)
  *path, key = field.split(".")
  node = tiny_config
  for name in path:
    node = node[name]
  node[key] = value
  after = _prints(tiny_config)
  for phase in unchanged:
    assert after[phase] == before[phase], phase
  for phase in changed:
    assert after[phase] != before[phase], phase


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.stages.update(teachers=defaults.stage("", {"itc": 1.0})),
     r"config\.stages\.teachers: a stage name is lower-case"),
    (lambda c: c.stages.update(Stage3=defaults.stage("", {"itc": 1.0})),
     r"config\.stages\.Stage3: a stage name is lower-case"),
    (lambda c: c.stages.stage2.update(fresh_params=("lam",)),
     r"config\.stages\.stage2\.fresh_params must include \['teacher_image_proj', "
     r"'teacher_text_proj', 'temp2'\]: no stage before it distills"),
    (lambda c: c.stages.update(arm=defaults.stage("stage1", {"itc": "one"})),
     r"config\.stages\.arm\.loss_weights: every weight must be a number"),
    (lambda c: c.teachers.update(image_view="center_crop"),
     r"config\.teachers\.image_view='center_crop' applies to precomputed features of encoded "
     r"images"),
    (lambda c: c.stages.stage1.loss_weights.update(itc=float("nan")),
     r"config\.stages\.stage1\.loss_weights\.itc=nan must be a finite number >= 0"),
    (lambda c: c.stages.stage2.loss_weights.update(kd=-1.0),
     r"config\.stages\.stage2\.loss_weights\.kd=-1\.0 must be a finite number >= 0"),
    (lambda c: c.model.text.update(vocab_size=5),
     r"config\.model\.text: \['vocab_size'\] cannot be set here"),
    (lambda c: c.eval.update(itm_k=0, select_metric="itm/r_mean"),
     r"config\.eval\.select_metric='itm/r_mean' needs ITM re-ranking"),
])
def test_bad_stages_and_fields_are_named(tiny_config, edit, match):
  edit(tiny_config)
  with pytest.raises(InputError, match=match):
    spec.from_config(tiny_config)


def test_a_later_distilling_stage_may_inherit_trained_distillation_parameters(tiny_config):
  tiny_config.stages.stage3 = defaults.stage("stage2", {"itc": 1.0, "kd": 1.0})
  assert spec.from_config(tiny_config).stage("stage3").fresh_params == ()


def test_teachers_are_pretrained_only_when_used_and_without_weights(tiny_config, tmp_path):
  assert spec.from_config(tiny_config).pretrained_teachers() == ("image", "text")
  (tmp_path / "vit.safetensors").write_bytes(b"")  # the spec checks that it exists, not reads it
  tiny_config.teachers.image.init = str(tmp_path / "vit.safetensors")
  assert spec.from_config(tiny_config).pretrained_teachers() == ("text",)
  del tiny_config.stages["stage2"]
  assert spec.from_config(tiny_config).pretrained_teachers() == ()
