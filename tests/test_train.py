"""End-to-end runs of the tiny config: both stages, resume equivalence, and bad input."""

import copy
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from conftest import REPO, load_config, saved_state
from ml_collections import config_flags

from rebalance_jax import cli
from rebalance_jax.config import spec
from rebalance_jax.data import miniature, pipeline
from rebalance_jax.data.dataset import load_dataset
from rebalance_jax.evaluators import retrieval
from rebalance_jax.infra import files, interrupts
from rebalance_jax.infra.errors import InputError
from rebalance_jax.models import weights
from rebalance_jax.models.student import init_student, with_tower_weights
from rebalance_jax.recipe import phases, workdirs
from rebalance_jax.recipe.evaluation import Evaluator, evaluate_run
from rebalance_jax.recipe.teachers import feature_job, obtain
from rebalance_jax.training import checkpointing, loop, objective
from rebalance_jax.training.checkpointing import ConfigMismatchError


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_cache):
  """One uninterrupted tiny run, shared by the tests that only read its outputs."""
  config = load_config("configs/demo.py:tiny")
  config.data.cache_dir = data_cache
  workdir = str(tmp_path_factory.mktemp("full"))
  return config, workdir, phases.run(spec.from_config(config), workdir)


@pytest.mark.slow
def test_two_stage_run_writes_results_metrics_and_features(finished_run):
  config, workdir, results = finished_run
  assert set(results) == {"stage1", "stage2"}
  for metrics in results.values():
    assert metrics["score_mode"] == "itm"  # the fusion student re-ranks with its ITM head
    for mode in ("itc/", "itm/", ""):
      recalls = [metrics[f"{mode}{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
      assert all(0.0 <= r <= 100.0 for r in recalls)
      assert recalls[0] <= recalls[1] <= recalls[2] and recalls[3] <= recalls[4] <= recalls[5]
      assert metrics[f"{mode}rsum"] == pytest.approx(sum(recalls))
    for protocol in ("i2i", "t2t", "mixed", "mixed_faithful"):
      assert 0.0 < metrics[f"{protocol}_ndcg@10"] <= 100.0
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved["metrics"] == results
  curves = saved["recall_curves"]["stage2"]
  assert len(curves["itc"]["i2t"]) == 50 and curves["ks"] == list(range(1, 51))
  for direction in ("i2t", "t2i"):  # the curves are the recalls of the table
    assert np.all(np.diff(curves["itc"][direction]) >= 0)
    assert curves["itc"][direction][9] == results["stage2"][f"itc/{direction}_r10"]
    assert curves["itm"][direction][0] == results["stage2"][f"itm/{direction}_r1"]
  assert curves["itc"]["t2i"][15] == 100.0  # 16 test images: every caption's image within K=16
  assert curves["itm"]["max_k"] == config.eval.itm_k == len(curves["itm"]["t2i"])
  with open(os.path.join(workdir, "results.md")) as f:
    table = f.read()
  assert "| stage1 (itm), step " in table and "| stage2 (itm), step " in table
  assert "t2t N@10" in table
  assert os.path.getsize(os.path.join(workdir, "results.png")) > 10_000

  with open(os.path.join(workdir, "stage2", "logs", "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [2, 4]
  for key in ("loss/itc", "loss/itm", "loss/iic", "loss/ttc", "loss/kd", "loss/kdi", "loss/kdt",
              "loss/total", "scalars/temp", "scalars/temp2", "scalars/lam", "lr", "grad_norm"):
    assert np.isfinite(records[-1][key]), key
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(workdir, "stage2", "logs")))

  num_images = config.data.synthetic.num_train
  num_pairs = num_images * config.data.synthetic.captions_per_image
  directory = os.path.join(workdir, "teacher_features")
  # One chunk per modality (fewer rows than a chunk): a row per training image (48) and per
  # caption (240), not 5x repeated image rows.
  image = np.load(feature_job.chunk_path(directory, "image", 0))
  text = np.load(feature_job.chunk_path(directory, "text", 0))
  assert image.shape == (num_images, config.teachers.image.width)
  assert text.shape == (num_pairs, config.teachers.text.width)
  assert not np.allclose(image[0], image[1]) and not np.allclose(text[0], text[1])
  # A batch reads its pairs' rows by index: caption 7 is of image 1.
  rows = feature_job.TeacherFeatures(directory).rows(np.array([1, 0]), np.array([7, 0]))
  np.testing.assert_array_equal(rows["teacher_image"], image[[1, 0]])
  np.testing.assert_array_equal(rows["teacher_text"], text[[7, 0]])


@pytest.mark.slow
def test_checkpoints_hold_only_the_student(finished_run):
  config, workdir, _ = finished_run
  step, state = saved_state(workdir, "stage2")
  assert step == config.stages.stage2.num_steps and int(state["step"]) == step
  assert set(state) == {"step", "params", "opt_state"}
  assert set(state["params"]) == {"image_encoder", "text_encoder", "fusion_encoder", "itm_head",
                                  "image_proj", "text_proj", "teacher_image_proj",
                                  "teacher_text_proj", "temp", "temp2", "lam"}
  # U_v maps the image teacher's width to the embedding: its input side is the teacher's.
  kernel = state["params"]["teacher_image_proj"]["kernel"]
  assert kernel.shape == (config.teachers.image.width, config.model.embed_dim)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(finished_run, tmp_path, caplog):
  config, full_dir, full_results = finished_run
  # A copy of the run as a kill would leave it in the middle of each stage: the last checkpoint of
  # both stages gone, no results yet, and a torn metrics line (a kill while writing it).
  resumed_dir = _copy_of(full_dir, tmp_path)
  for stage in ("stage1", "stage2"):
    shutil.rmtree(os.path.join(resumed_dir, stage, "checkpoints", "4"))
    with open(os.path.join(resumed_dir, stage, "logs", "metrics.jsonl"), "a") as f:
      f.write('{"step": 3, "loss/itc": 0.')
  for name in ("results.json", "results.md", "results.png"):
    os.remove(os.path.join(resumed_dir, name))
  caplog.set_level(logging.INFO, logger="absl")
  assert phases.run(spec.from_config(config), resumed_dir) == full_results
  resumed = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
  assert [m for m in resumed if m.startswith("stage")] == [
      "stage1: resumed from step 2", "stage2: resumed from step 2"]
  for stage in ("stage1", "stage2"):
    with open(os.path.join(resumed_dir, stage, "logs", "metrics.jsonl")) as f:
      assert [json.loads(line)["step"] for line in f] == [2, 4]
    (_, full), (_, resumed) = saved_state(full_dir, stage), saved_state(resumed_dir, stage)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(full), jax.tree.leaves(resumed)):
      np.testing.assert_array_equal(a, b, err_msg=f"{stage} {jax.tree_util.keystr(path)}")


@pytest.mark.slow
def test_checkpoint_from_another_config_is_rejected(finished_run):
  config, workdir, _ = finished_run
  other = config.copy_and_resolve_references()
  other.model.embed_dim = 32
  with pytest.raises(ConfigMismatchError, match=r"model\.embed_dim"):
    phases.run(spec.from_config(other), workdir)


def test_batch_size_not_divisible_by_devices(tiny_config, tmp_path):
  tiny_config.stages.stage1.batch_size = 12
  with pytest.raises(InputError, match=r"config\.stages\.stage1\.batch_size=12 .*8 devices"):
    phases.run(spec.from_config(tiny_config), str(tmp_path))


@pytest.mark.slow
def test_non_finite_loss_stops_the_run(tiny_config, tmp_path):
  tiny_config.optim.lr = 1e30
  with pytest.raises(loop.NonFiniteLossError, match=r"stage1: non-finite .* at step 2"):
    phases.run(spec.from_config(tiny_config), str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "stage1", "checkpoints", "2"))


def _set(config, field: str, value) -> None:
  *path, key = field.split(".")
  for name in path:
    config = config[name]
  config[key] = value


@pytest.mark.parametrize("field,value,match", [
    ("loss.lambda_mode", "softmax", r"config\.loss\.lambda_mode='softmax'"),
    ("loss.lambda_fixed", float("inf"), r"config\.loss\.lambda_fixed=inf must be finite"),
    ("optim.lr", float("nan"), r"config\.optim\.lr=nan must be a positive finite number"),
    ("optim.lr", -0.05, r"config\.optim\.lr=-0\.05 must be a positive finite number"),
    ("model.temp_init", 0.0, r"config\.model\.temp_init=0\.0 must be a positive"),
    ("checkpoint.keep", 0, r"config\.checkpoint\.keep=0 must be positive"),
    ("eval.itm_k", 5, r"config\.eval\.itm_k=5 must be 0 \(no re-ranking\) or at least 10"),
    ("eval.select_on", "best", r"config\.eval\.select_on='best' is not one of"),
    ("eval.select_metric", "rsumm", r"config\.eval\.select_metric='rsumm' is not a metric"),
    ("data.augment_shift", -2, r"config\.data\.augment_shift=-2 must lie in \[0, "),
    ("stages.stage2.init_from", "stage3", r"config\.stages\.stage2\.init_from='stage3' is not a "
                                          r"stage"),
    ("stages.stage1.init_from", "stage2", r"config\.stages: the init_from chain through "
                                          r"'stage1' is a cycle"),
    ("model.image.kind", "swin_v2", r"config\.model\.image\.kind: tower kind 'swin_v2' is not "
                                    r"registered; known: \['clip_vit', 'swin', 'text', 'vit'\]"),
    ("model.image.kind", "text", r"config\.model\.image\.kind='text' is a text tower"),
    ("teachers.image.dtype", "float16", r"config\.teachers\.image\.dtype='float16' is not one"),
    ("model.image.init", "/nonexistent.safetensors",
     r"config\.model\.image\.init='/nonexistent\.safetensors' does not exist: convert the "
     r"checkpoint into it first"),
])
def test_invalid_config_values_are_named_when_the_config_is_read(tiny_config, field, value, match):
  _set(tiny_config, field, value)
  with pytest.raises(InputError, match=match):
    spec.from_config(tiny_config)


# What the config alone cannot tell: sizes against the devices and the data, parameter names
# against the student; and one case of the above, to show the run refuses all before any work.
@pytest.mark.parametrize("field,value,match", [
    ("data.name", "flickr8k", r"config\.data\.name='flickr8k'"),
    ("teachers.batch_size", 12, r"config\.teachers\.batch_size=12 must be a positive multiple "
                                r"of the device count \(8 devices"),
    ("teachers.batch_size", 64, r"config\.teachers\.batch_size=64 exceeds the 48 training images"),
    ("stages.stage1.batch_size", 320,
     r"config\.stages\.stage1\.batch_size=320 exceeds the 240 training pairs"),
    ("stages.stage2.fresh_params", ("teacher_image_proj", "teacher_text_proj", "lam", "temp2",
                                    "lambda"),
     r"config\.stages\.stage2\.fresh_params: \['lambda'\] are not parameter subtrees"),
    ("loss.lambda_mode", "softmax", r"config\.loss\.lambda_mode='softmax'"),
])
def test_invalid_values_stop_the_run_before_any_work(tiny_config, tmp_path, field, value, match):
  _set(tiny_config, field, value)
  workdir = tmp_path / "run"
  with pytest.raises(InputError, match=match):
    phases.run(spec.from_config(tiny_config), str(workdir))
  assert not os.path.exists(workdir / "teachers")  # refused before any work


def test_bad_workdirs_and_a_second_run_are_refused(tiny_config, tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(InputError, match=r"--workdir=.*/file is a file, not a directory"):
    phases.run(spec.from_config(tiny_config), str(tmp_path / "file"))
  with pytest.raises(InputError, match=r"--workdir is empty"):
    phases.run(spec.from_config(tiny_config), "")
  with files.WorkdirLock(str(tmp_path), "training run"):
    with pytest.raises(InputError, match=r"is in use by a training run"):
      phases.run(spec.from_config(tiny_config), str(tmp_path))


def test_dual_encoder_needs_no_itm_weight(tiny_config, tmp_path):
  tiny_config.model.dual_encoder = True
  with pytest.raises(InputError, match=r"config\.stages\.stage1\.loss_weights has an 'itm' "
                                       r"weight"):
    phases.run(spec.from_config(tiny_config), str(tmp_path))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "rebalance_jax.train", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})  # 1 device


@pytest.mark.parametrize("flags_given, message", [
    (["--config.stages.stage1.no_such_key=3"], "--config.stages.stage1.no_such_key: the config has "
     "no field 'no_such_key' (the fields are listed in rebalance_jax/config/defaults.py)"),
    (["--config.stages.stage2.loss_weights.bogus=1"], "--config.stages.stage2.loss_weights.bogus: "
     "the config has no field 'bogus' (the fields are listed in rebalance_jax/config/defaults.py)"),
    # The wrong path is named, not the valid override beside it; ml_collections' hint is kept.
    (["--config.data.cache_dir=/tmp/x", "--config.stage1.batch_size=abc"], "--config.stage1."
     "batch_size: the config has no field 'stage1'; did you mean \"stages\" instead of \"stage1\"? "
     "(the fields are listed in rebalance_jax/config/defaults.py)"),
    (["--config.stages.stage1.batch_size=abc"], "--config.stages.stage1.batch_size=abc: invalid "
     "literal for int() with base 10: 'abc'"),
    (["--config=configs/nothere.py"], "--config=configs/nothere.py: configs/nothere.py is not a "
     "file"),
    (["--config=configs"], "--config=configs: configs is not a file"),
    # The config's own reason, whole, not ml_collections' first line.
    (["--config=configs/demo.py:nonsense"], "--config=configs/demo.py:nonsense: ValueError: "
     "configs/demo.py: unknown variant 'nonsense' (known: 'tiny', 'minilm', 'minilm_student')"),
])
def test_flag_errors_are_one_line_naming_the_flag(flags_given, message, capsys, monkeypatch):
  """The entry points' flag parsing (cli.parse_flags) on their --config flag."""
  monkeypatch.chdir(REPO)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
  argv = ["train", "--config=configs/demo.py:tiny", *flags_given]
  monkeypatch.setattr(sys, "argv", argv)  # where ml_collections reads the overrides from
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_flags(argv, flag_values)
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == f"FATAL Flags parsing error: {message}\n"


@pytest.mark.slow
def test_cli_missing_weights_or_dataset_path_is_one_clear_line(tmp_path):
  # Through the command once: one line, exit status 1, no traceback.
  result = _cli("--config=configs/flickr.py", f"--workdir={tmp_path}")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  # Every missing file at once, in one line.
  assert len([line for line in result.stderr.splitlines() if "error:" in line]) == 1
  assert ("config.model.image.init='weights/swin_base_patch4_window12_384_22k.safetensors', "
          "config.model.text.init=") in result.stderr
  assert ("config.teachers.text.init='weights/bert_base_uncased_teacher_60.safetensors' do not exist: "
          "convert the checkpoints into them first") in result.stderr
  # The next missing inputs, where they are found: reading the config, then the data.
  for field in ("model.image", "model.text", "model.fusion", "teachers.image", "teachers.text"):
    (tmp_path / f"{field}.safetensors").write_bytes(b"")  # read only once training starts

  def with_weights(name):
    config = load_config(name)
    for field in ("model.image", "model.text", "model.fusion", "teachers.image", "teachers.text"):
      section, part = field.split(".")
      config[section][part].init = str(tmp_path / f"{field}.safetensors")
    return config

  flickr = spec.from_config(with_weights("configs/flickr.py"))
  with pytest.raises(InputError, match=r"^config\.data\.image_root is not set"):
    load_dataset(flickr.data)
  coco = with_weights("configs/coco.py")
  coco.data.image_root, coco.data.annotation_file = str(tmp_path), "/nonexistent.json"
  with pytest.raises(InputError, match=r"config\.data\.annotation_file='/nonexistent\.json' "
                                       r"does not exist"):
    load_dataset(spec.from_config(coco).data)


@pytest.mark.slow
def test_dual_encoder_with_online_teachers(tiny_config, tmp_path, monkeypatch):
  """The plug-and-play setting: no fusion/ITM, student relations from both embeddings, teachers
  run inside the train step (no feature files); the text teacher has a tokenizer of its own."""
  c = tiny_config
  c.model.dual_encoder = True
  c.model.dual_relation = "both"
  c.teachers.mode = "online"
  steps_with_teacher_ids = []
  loss = objective.batch_loss

  def spy(params, batch, *args, **kwargs):
    steps_with_teacher_ids.append("teacher_ids" in batch)
    return loss(params, batch, *args, **kwargs)

  monkeypatch.setattr(objective, "batch_loss", spy)
  del c.stages.stage1.loss_weights["itm"]
  del c.stages.stage2.loss_weights["itm"]
  own_vocab = tmp_path / "teacher_vocab.txt"  # the same tokens, read as the teacher's own file
  shutil.copy(load_dataset(spec.from_config(c).data).vocab_file, own_vocab)
  c.teachers.vocab_file = str(own_vocab)
  results = phases.run(spec.from_config(c), str(tmp_path))
  assert set(results) == {"stage1", "stage2"}
  assert not os.path.exists(os.path.join(tmp_path, "teacher_features"))
  _, state = saved_state(str(tmp_path), "stage2")
  assert "fusion_encoder" not in state["params"] and "itm_head" not in state["params"]
  with open(os.path.join(tmp_path, "stage2", "logs", "metrics.jsonl")) as f:
    last = json.loads(f.readlines()[-1])
  assert "loss/itm" not in last and np.isfinite(last["loss/kd"]) and last["loss/kd"] > 0
  assert steps_with_teacher_ids == [False, True]  # traced once per stage: stage 2 feeds them


@pytest.mark.slow
def test_evaluate_run_on_a_finished_run(finished_run, monkeypatch):
  config, workdir, results = finished_run
  restores = []
  restore = checkpointing.Checkpointer.restore

  def spy(self, step, target, partial=False):
    restores.append((set(target), partial))
    return restore(self, step, target, partial)

  monkeypatch.setattr(checkpointing.Checkpointer, "restore", spy)
  rows = evaluate_run(spec.from_config(config), workdir, ["stage1", "stage2"])
  assert set(rows) == {"stage1", "stage2"}  # the rows' names in the run's own results.json
  assert restores == [({"params"}, True)] * 2  # the parameters alone: no optimizer state
  numbers = lambda m: {k: v for k, v in m.items() if isinstance(v, float)}
  for stage in rows:  # the same checkpoints give the same numbers as training's
    assert numbers(rows[stage]) == pytest.approx(numbers(results[stage]))
    assert rows[stage]["selected_by"] == results[stage]["selected_by"]
    assert rows[stage]["checkpoint_step"] == results[stage]["checkpoint_step"]
  other = 2 if results["stage1"]["checkpoint_step"] == 4 else 4  # not the selected one
  assert set(evaluate_run(spec.from_config(config), workdir, ["stage1"], step=other)) == {
      f"stage1@{other}"}
  assert os.path.exists(os.path.join(workdir, "eval", "results.png"))
  with pytest.raises(InputError, match=r"--stages: unknown \['stage3'\]"):
    evaluate_run(spec.from_config(config), workdir, ["stage3"])


@pytest.mark.slow
def test_each_stage_reports_the_checkpoint_it_selected_on_val(finished_run):
  config, workdir, results = finished_run
  # What config.eval.select_metric may name is exactly what the evaluation reports.
  assert {k for k, v in results["stage2"].items() if isinstance(v, float)} == (
      retrieval.metric_names())
  for stage in ("stage1", "stage2"):
    reader = workdirs.checkpointer(spec.from_config(config), workdir, stage,
                                     load_dataset(spec.from_config(config).data).vocab,
                                     read_only=True)
    scores = {s: reader.metrics(s)["r_mean"] for s in reader.all_steps()}
    reader.close()
    assert sorted(scores) == [2, 4]  # evaluated on val at every_steps=2 and the last step
    best = min(scores, key=lambda s: (-scores[s], s))  # ties: the earlier step
    assert results[stage]["checkpoint_step"] == best
    assert results[stage]["selected_by"] == f"best val r_mean ({scores[best]:.2f})"
  with open(os.path.join(workdir, "results.md")) as f:
    assert f"| stage2 (itm), step {results['stage2']['checkpoint_step']}: best val r_mean" in f.read()
  with open(os.path.join(workdir, "stage1", "logs", "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [2, 4] and "val/r_mean" in records[0]


@pytest.mark.slow
def test_a_rerun_of_a_finished_run_evaluates_nothing(finished_run, tmp_path, monkeypatch):
  config, full_dir, full_results = finished_run
  workdir = _copy_of(full_dir, tmp_path)

  def fail(*args, **kwargs):
    raise AssertionError("evaluated again")

  monkeypatch.setattr(Evaluator, "add", fail)
  monkeypatch.setattr(Evaluator, "selection_metrics", fail)
  assert phases.run(spec.from_config(config), workdir) == full_results


@pytest.mark.slow
def test_changing_the_selection_of_a_trained_run_is_refused(finished_run):
  config, workdir, _ = finished_run
  other = config.copy_and_resolve_references()
  other.eval.select_on = "last"
  with pytest.raises(ConfigMismatchError, match=r"eval\.select_on: checkpoint 'val' vs config "
                                                r"'last'"):
    evaluate_run(spec.from_config(other), workdir, ["stage1"])


@pytest.mark.slow
def test_evaluate_cli_help():
  result = subprocess.run([sys.executable, "-m", "rebalance_jax.evaluate", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert "--stages" in result.stdout and "--step" in result.stdout and "--workdir" in result.stdout


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes_identically(finished_run, tmp_path,
                                                                      monkeypatch):
  config, full_dir, full_results = finished_run
  batch = pipeline.TrainBatches.__call__
  stage1_seed = loop.stage_seed(config.seed, "stage1")

  def batch_with_sigterm(self, step):  # SIGTERM arrives while stage 1 prepares its first batch
    if self.seed == stage1_seed:
      monkeypatch.setattr(pipeline.TrainBatches, "__call__", batch)
      os.kill(os.getpid(), signal.SIGTERM)
    return batch(self, step)

  # The run's teachers and their features, none of its stages yet.
  workdir = _copy_of(full_dir, tmp_path)
  for name in ("stage1", "stage2", "results.json", "results.md", "results.png"):
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  monkeypatch.setattr(pipeline.TrainBatches, "__call__", batch_with_sigterm)
  with pytest.raises(loop.Preempted, match=r"stage1: stopped at step 1 \(SIGTERM\)") as stopped:
    phases.run(spec.from_config(config), workdir)
  assert stopped.value.step == 1 and saved_state(workdir, "stage1")[0] == 1
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
  assert phases.run(spec.from_config(config), workdir) == full_results
  (_, full), (_, resumed) = saved_state(full_dir, "stage2"), saved_state(workdir, "stage2")
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_rerun_after_freeing_space_finishes(finished_run, tmp_path):
  """The finished run without stage 2 on a tmpfs with 150 KB to spare (a stage-2 checkpoint takes
  more): `train` ends in one line, not the checkpointer's threads' tracebacks; with space, the same
  command finishes with the uninterrupted run's results. Then `prepare` on a full disk."""
  if os.geteuid() != 0:
    pytest.skip("mounting a small tmpfs needs root")
  small = tmp_path / "small"
  small.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(small)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here")
  config, full_dir, full_results = finished_run
  workdir = small / "run"
  remount = lambda size: subprocess.run(["mount", "-o", f"remount,size={size}", str(small)],
                                        check=True)
  command = [sys.executable, "-m", "rebalance_jax.train", "--config=configs/demo.py:tiny",
             f"--workdir={workdir}", f"--config.data.cache_dir={config.data.cache_dir}",
             "--compilation_cache_dir=" + os.environ["JAX_COMPILATION_CACHE_DIR"]]
  try:
    shutil.copytree(full_dir, workdir, ignore=lambda d, names: ["stage2"] if d == full_dir else [])
    _drop_result_rows(workdir, "stage2")
    remount(f"{shutil.disk_usage(small).used // 1024 + 150}k")
    full = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert full.returncode == 1
    assert full.stderr.splitlines()[-1].startswith(
        "rebalance_jax.train: error: no space left on the device (")
    assert "Traceback" not in full.stderr and "Event loop is closed" not in full.stderr
    assert len([line for line in full.stderr.splitlines() if not line.startswith("I")]) < 10
    remount("20m")
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _saved_rows(str(workdir)) == full_results
    # prepare, its cache on a full disk (the miniature's images take about 0.7 MB).
    shutil.rmtree(workdir)
    remount("200k")
    tree = miniature.write_miniatures(str(tmp_path / "miniature"))["flickr30k"]
    prepare = subprocess.run(
        [sys.executable, "-m", "rebalance_jax.prepare", "--config=configs/flickr.py:tiny",
         f"--config.data.image_root={tree['image_root']}",
         f"--config.data.annotation_file={tree['karpathy_file']}",
         f"--config.data.cache_dir={small / 'cache'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert prepare.returncode == 1 and "Traceback" not in prepare.stderr
    assert prepare.stderr.splitlines()[-1].startswith(
        "rebalance_jax.prepare: error: no space left on the device (")
  finally:
    subprocess.run(["umount", str(small)], check=False)


@pytest.mark.slow
def test_two_processes_resume_a_single_process_run_and_match_it(finished_run, tmp_path):
  """2 processes × 4 CPU devices on localhost finish a run that 1 process × 8 devices started."""
  config, full_dir, full_results = finished_run
  # The run as a preemption at stage 2's step 2 leaves it (stage 1 finished and recorded), without
  # the teacher features, which both processes compute again.
  workdir, logs = pathlib.Path(_copy_of(full_dir, tmp_path)), tmp_path / "logs"
  shutil.rmtree(workdir / "stage2" / "checkpoints" / "4")
  shutil.rmtree(workdir / "teacher_features")
  _drop_result_rows(workdir, "stage2")
  result = subprocess.run(
      [sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=4",
       f"--log_dir={logs}", "--timeout=600", "--", "-m", "rebalance_jax.train",
       "--config=configs/demo.py:tiny", f"--workdir={workdir}",
       f"--config.data.cache_dir={config.data.cache_dir}"],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  reported = []
  for i in range(2):
    with open(logs / f"process_{i}.log") as f:
      log = f.read()
    assert f"process {i} of 2, 4 local / 8 global devices" in log
    reported.append(dict(re.findall(rf"process {i}: (stage\d) rsum ([\d.]+)", log)))
  assert reported[0] == reported[1]  # both processes computed the same results
  # Computed again by two processes; row for row the single process's.
  two = feature_job.TeacherFeatures(str(workdir / "teacher_features"))
  one = feature_job.TeacherFeatures(os.path.join(full_dir, "teacher_features"))
  for modality, n in one.num_rows.items():
    np.testing.assert_array_equal(two.read(modality, np.arange(n)), one.read(modality, np.arange(n)))
  assert float(reported[0]["stage2"]) == pytest.approx(full_results["stage2"]["rsum"])
  (_, single), (_, multi) = saved_state(full_dir, "stage2"), saved_state(str(workdir), "stage2")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(single), jax.tree.leaves(multi)):
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name:
      # Softmax ignores the key bias: its gradient is rounding noise, which Adam's normalization
      # turns into lr-sized steps that differ with the reduction order of the device layout.
      continue
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


def _copy_of(workdir, tmp_path):
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  return copy


def _drop_result_rows(workdir, stage: str) -> None:
  """results.json as it was before `stage` was evaluated."""
  path = os.path.join(workdir, "results.json")
  with open(path) as f:
    saved = json.load(f)
  for part in ("metrics", "recall_curves"):
    saved[part] = {k: v for k, v in saved[part].items() if not k.startswith(stage)}
  with open(path, "w") as f:
    json.dump(saved, f)


def _saved_rows(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)["metrics"]


@pytest.mark.slow
def test_an_empty_latest_step_folder_resumes_from_the_previous_step(finished_run, tmp_path):
  config, full_dir, full_results = finished_run
  workdir = _copy_of(full_dir, tmp_path)
  latest = os.path.join(workdir, "stage2", "checkpoints", "4")
  shutil.rmtree(latest)
  os.mkdir(latest)
  assert phases.run(spec.from_config(config), workdir) == full_results  # step 2 restored, steps 3-4 trained again
  assert set(_saved_rows(workdir)) == {"stage1", "stage2"}
  assert os.path.isdir(os.path.join(workdir, "stage2", "checkpoints.damaged", "4"))
  (_, full), (_, resumed) = saved_state(full_dir, "stage2"), saved_state(workdir, "stage2")
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_refused_stage2_loses_no_results_row(finished_run, tmp_path):
  config, full_dir, _ = finished_run
  workdir = _copy_of(full_dir, tmp_path)
  with open(os.path.join(workdir, "results.json"), "rb") as f:
    before = f.read()
  other = config.copy_and_resolve_references()
  other.stages.stage2.loss_weights.kd = 3.0
  with pytest.raises(ConfigMismatchError, match=r"stage2/checkpoints/4 was written by another "
                                                r"config \(stages\.stage2\.loss_weights\.kd"):
    phases.run(spec.from_config(other), workdir)
  with open(os.path.join(workdir, "results.json"), "rb") as f:
    assert f.read() == before  # refused before stage 1 was evaluated again


@pytest.mark.slow
def test_a_new_stage_reuses_the_teachers_and_stage1_of_the_run(finished_run, tmp_path):
  """Experiments as data: an arm that differs only in a later stage trains only that stage."""
  config, full_dir, full_results = finished_run
  workdir = _copy_of(full_dir, tmp_path)
  shared = ["teachers/image", "teachers/text", "stage1/checkpoints", "stage2/checkpoints",
            "teacher_features"]
  listing = lambda: {d: sorted(os.listdir(os.path.join(workdir, d))) for d in shared}
  logs = lambda: open(os.path.join(workdir, "stage1", "logs", "metrics.jsonl")).read()
  before, before_logs = listing(), logs()
  arm = config.copy_and_resolve_references()
  arm.stages.stage2_no_kd = arm.stages.stage2.copy_and_resolve_references()
  del arm.stages.stage2_no_kd.loss_weights["kd"]
  results = phases.run(spec.from_config(arm), workdir)
  assert set(results) == {"stage1", "stage2", "stage2_no_kd"}
  assert results["stage1"] == full_results["stage1"] and results["stage2"] == full_results["stage2"]
  assert listing() == before and logs() == before_logs  # nothing of theirs trained again
  _, state = saved_state(workdir, "stage2_no_kd")
  assert int(state["step"]) == config.stages.stage2.num_steps


@pytest.mark.slow
def test_the_vocabulary_is_in_every_fingerprint(finished_run):
  config, workdir, _ = finished_run
  exp = spec.from_config(config)
  data = load_dataset(exp.data)
  reader = workdirs.checkpointer(exp, workdir, "stage2", data.content, read_only=True)
  reader.check_config()  # the run's own vocabulary
  other = {"size": data.vocab["size"], "sha256": "0" * 64}
  with pytest.raises(ConfigMismatchError, match=r"vocab\.sha256"):
    workdirs.checkpointer(exp, workdir, "stage2", {"vocab": other}, read_only=True).check_config()
  reader.close()


@pytest.mark.slow
def test_tampered_or_missing_teacher_features_are_recomputed(finished_run, tmp_path):
  config, full_dir, _ = finished_run
  workdir = _copy_of(full_dir, tmp_path)
  directory = os.path.join(workdir, "teacher_features")
  shard = lambda modality: feature_job.chunk_path(directory, modality, 0)
  expected = {m: np.load(shard(m)) for m in feature_job.MODALITIES}
  exp = spec.from_config(config)
  data = load_dataset(exp.data)
  mesh = workdirs.make_mesh(exp)
  teachers = obtain.obtain_teachers(exp, data, mesh, workdir)  # read when finished

  def tamper_image(path):  # zeros of the right shape
    np.save(path, np.zeros_like(expected["image"]))

  def tamper_text_and_its_digest(path):  # only the manifest's list of chunk hashes tells
    np.save(path, np.zeros_like(expected["text"]))
    files.write_digest(path)

  for target, tamper in [(shard("image"), tamper_image),
                         (shard("text"), tamper_text_and_its_digest), (shard("text"), os.remove),
                         (os.path.join(directory, "manifest.json"),
                          lambda p: open(p, "w").write("{garbled"))]:
    tamper(target)
    features = feature_job.teacher_features(
        teachers, data, mesh, directory, exp.fingerprint("teachers", data.content),
        exp.eval.batch_size)
    for modality, array in expected.items():
      np.testing.assert_array_equal(features.read(modality, np.arange(len(array))), array)
      np.testing.assert_array_equal(np.load(shard(modality)), array)

  # Features made from other teachers or preprocessing are refused, never overwritten.
  manifest_path = os.path.join(directory, "manifest.json")
  with open(manifest_path) as f:
    manifest = json.load(f)
  manifest["weights"]["image"] = "0" * 64
  manifest["preprocessing"]["text"]["max_words"] = 7
  with open(manifest_path, "w") as f:
    json.dump(manifest, f)
  with pytest.raises(InputError, match=r"teacher features in .* were made from other "
                                       r"preprocessing, weights than this config's"):
    feature_job.teacher_features(teachers, data, mesh, directory,
                                      exp.fingerprint("teachers", data.content),
                                      exp.eval.batch_size)
  np.testing.assert_array_equal(np.load(shard("image")), expected["image"])

  # A job killed after some chunks resumes at the missing ones, in float16 if asked.
  chunked = os.path.join(str(tmp_path), "chunked")
  compute = lambda: feature_job.teacher_features(
      teachers, data, mesh, chunked, exp.fingerprint("teachers", data.content),
      exp.eval.batch_size, dtype="float16", chunk_rows=100)
  compute()
  chunk = lambda m, c: feature_job.chunk_path(chunked, m, c)
  assert [np.load(chunk("text", c)).shape[0] for c in range(3)] == [100, 100, 40]
  os.remove(chunk("text", 1))
  kept = os.stat(chunk("text", 2)).st_mtime_ns
  features = compute()
  assert os.stat(chunk("text", 2)).st_mtime_ns == kept  # only the missing chunk is computed
  for modality, array in expected.items():
    np.testing.assert_array_equal(features.read(modality, np.arange(len(array))),
                                  array.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("tamper", ["truncate", "empty"])
def test_a_tampered_cached_vocabulary_is_trained_again(tiny_config, tmp_path, tamper):
  tiny_config.data.cache_dir = str(tmp_path)
  first = load_dataset(spec.from_config(tiny_config).data)
  with open(first.vocab_file, "r+") as f:
    lines = f.readlines()
    f.seek(0)
    f.truncate()
    if tamper == "truncate":  # the case: 101 of 200 tokens trained silently
      f.writelines(lines[:101])
  second = load_dataset(spec.from_config(tiny_config).data)
  assert second.vocab == first.vocab  # the same vocabulary: its training is deterministic
  captions = list(first.train.captions[:20])
  np.testing.assert_array_equal(second.encode(captions, True)["ids"],
                                first.encode(captions, True)["ids"])


@pytest.mark.slow
def test_sigint_during_evaluation_stops_cleanly_and_the_rerun_finishes(finished_run, tmp_path,
                                                                       monkeypatch):
  config, full_dir, full_results = finished_run
  workdir = _copy_of(full_dir, tmp_path)
  os.remove(os.path.join(workdir, "results.json"))
  add = Evaluator.add

  def add_after_ctrl_c(self, *args):
    monkeypatch.setattr(Evaluator, "add", add)
    os.kill(os.getpid(), signal.SIGINT)
    return add(self, *args)

  monkeypatch.setattr(Evaluator, "add", add_after_ctrl_c)
  with pytest.raises(interrupts.Interrupted, match="SIGINT: stopped during") as stopped:
    phases.run(spec.from_config(config), workdir)
  assert stopped.value.exit_code == 130
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  assert phases.run(spec.from_config(config), workdir) == full_results


@pytest.mark.slow
def test_evaluate_refuses_bad_steps_and_workdirs_without_writing(finished_run, tmp_path):
  config, workdir, _ = finished_run
  with pytest.raises(InputError, match=r"--step=999: .*stage1/checkpoints has no checkpoint of "
                                       r"that step \(it has \[2, 4\]\)"):
    evaluate_run(spec.from_config(config), workdir, ["stage1"], 999)
  with pytest.raises(InputError, match=r"--step=-1 must be a checkpoint step"):
    evaluate_run(spec.from_config(config), workdir, ["stage1"], -1)
  typo = tmp_path / "no_such_run"
  with pytest.raises(InputError, match=r"--workdir=.*no_such_run does not exist"):
    evaluate_run(spec.from_config(config), str(typo), ["stage1"])
  assert not typo.exists()
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputError, match=r"no stage1 checkpoints in .*empty/stage1/checkpoints: is "
                                       r"--workdir the run's workdir\?"):
    evaluate_run(spec.from_config(config), str(tmp_path / "empty"), ["stage1"])
  assert os.listdir(tmp_path / "empty") == []
  # A run still in its first phases: the training run holding the workdir is named.
  (tmp_path / "starting").mkdir()
  with files.WorkdirLock(str(tmp_path / "starting"), "training run"):
    with pytest.raises(InputError, match=r"no stage1 checkpoints in .*starting/stage1/checkpoints "
                                         rf"yet: a training run \(pid {os.getpid()} on .*\) holds "
                                         r".*; evaluate stage1 once it has saved a checkpoint"):
      evaluate_run(spec.from_config(config), str(tmp_path / "starting"), ["stage1"])


@pytest.mark.slow
def test_a_damaged_best_checkpoint_gives_way_to_the_next_best(finished_run, tmp_path):
  config, full_dir, results = finished_run
  workdir = _copy_of(full_dir, tmp_path)
  best = results["stage1"]["checkpoint_step"]
  with open(os.path.join(workdir, "stage1", "checkpoints", str(best), "config", "metadata"),
            "w") as f:
    f.write("{garbled")
  exp = spec.from_config(config)
  data = load_dataset(exp.data)
  model = workdirs.student_model(exp, data.vocab_size)
  like = init_student(model, jax.random.key(config.seed))
  step, _, record = workdirs.load_stage_params(exp, workdir, "stage1", like,
                                                 workdirs.make_mesh(exp), data.content)
  assert step != best and step in (2, 4)
  assert record["selected_by"].startswith("best val r_mean (")
  assert record["selected_by"].endswith(f"after the damaged step {best}")


@pytest.mark.slow
def test_a_whole_student_weights_file_scores_like_its_checkpoint(finished_run, tmp_path):
  # What convert --format=reference writes (the whole student as one safetensors tree), evaluated
  # with --weights: here stage 2's selected parameters, which must give stage 2's numbers.
  config, workdir, results = finished_run
  exp = spec.from_config(config)
  data = load_dataset(exp.data)
  model = workdirs.student_model(exp, data.vocab_size)
  like = jax.eval_shape(lambda r: init_student(model, r), jax.random.key(0))
  mesh = workdirs.make_mesh(exp)
  _, params, _ = workdirs.load_stage_params(exp, workdir, "stage2", like, mesh, data.content)
  path = str(tmp_path / "stage2.safetensors")
  weights.save_safetensors(path, jax.tree.map(np.asarray, params))
  rows = evaluate_run(spec.from_config(config), str(tmp_path / "eval_only"), weights_file=path)
  numbers = lambda m: {k: v for k, v in m.items() if isinstance(v, float)}
  assert numbers(rows["weights:stage2.safetensors"]) == pytest.approx(numbers(results["stage2"]))
  assert os.path.exists(tmp_path / "eval_only" / "eval" / "results.md")
  with pytest.raises(InputError, match="--weights evaluates a weights file, not a stage"):
    evaluate_run(spec.from_config(config), str(tmp_path / "eval_only"), ["stage1"], weights_file=path)
  # One command from the dataset's config: its own weights files (towers, teachers) need not
  # exist, and the fields the converter recorded in the file replace the config's.
  elsewhere = copy.deepcopy(config)
  elsewhere.model.image.init = elsewhere.teachers.image.init = str(tmp_path / "absent.safetensors")
  elsewhere.model.image.image_size = elsewhere.data.image_size = 24
  fields = {"model.image": {"image_size": config.model.image.image_size},
            "model.text": {"max_tokens": config.model.text.max_tokens}}
  weights.save_safetensors(path, jax.tree.map(np.asarray, params), fields)
  recorded = spec.from_config(spec.for_weights_file(elsewhere, path))
  assert recorded.student == exp.student and recorded.data == exp.data
  fields["model.image"]["kind"] = "swin"
  weights.save_safetensors(path, jax.tree.map(np.asarray, params), fields)
  with pytest.raises(InputError, match=r"holds a 'swin' tower for config\.model\.image, which is "
                                       r"'vit'"):
    spec.for_weights_file(elsewhere, path)
  weights.save_safetensors(path, jax.tree.map(np.asarray, params))
  # Training from it: config.model.init is the whole initial student, exclusive of tower inits.
  config = copy.deepcopy(config)
  config.model.init = path
  model = workdirs.student_model(spec.from_config(config), data.vocab_size)
  started = with_tower_weights(model, init_student(model, jax.random.key(1)))
  jax.tree.map(np.testing.assert_array_equal, started, jax.tree.map(np.asarray, params))
  config.model.text.init = path
  with pytest.raises(InputError, match=r"holds the whole student: unset \['config.model.text.init'"):
    spec.from_config(config)
