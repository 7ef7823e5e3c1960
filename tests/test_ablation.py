"""The ablation study: its grid (equal compute, shared trunks), the matching diagnostic, the λ
modes, and one tiny study end to end (report structure, skipping finished runs)."""

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from rebalance_jax import losses
from rebalance_jax.config import spec
from rebalance_jax.data.sources import Split
from rebalance_jax.evaluators import matching
from rebalance_jax.infra.errors import InputError
from rebalance_jax.study import grid, report, runner


def _runs(variant: str = ""):
  return grid.plan(load_config(f"configs/ablation.py:{variant}" if variant else
                               "configs/ablation.py"))


def test_default_grid_arms_have_equal_steps_and_share_each_trunk():
  runs = _runs()
  assert len(runs) == 3 * (9 + 3 * 2 + 2)
  by_trunk = {}
  for run in runs:
    exp = spec.from_config(run.config)
    assert exp.stage_names == ("stage1", run.arm)
    first, arm = exp.stage("stage1"), exp.stage(run.arm)
    assert first.num_steps == arm.num_steps == 500 and first.batch_size == arm.batch_size
    assert arm.init_from == "stage1"
    assert set(first.objective.weights) == ({"itc"} if run.student == "dual_encoder" else
                                            {"itc", "itm"})
    shared = (exp.fingerprints["stage1"], exp.fingerprints["teachers"])
    by_trunk.setdefault(run.trunk, set()).add(json.dumps(shared, sort_keys=True, default=str))
  assert all(len(prints) == 1 for prints in by_trunk.values())  # one stage 1, one set of teachers
  assert len(by_trunk) == 3 * 5


def test_arm_objectives():
  objectives = {r.arm: spec.from_config(r.config).stage(r.arm).objective
                for r in _runs() if (r.student, r.level, r.seed) == ("fusion", "demo", 0)}
  assert set(objectives["baseline"].weights) == {"itc", "itm"}
  assert set(objectives["repr_only"].weights) == {"itc", "itm", "iic", "ttc"}
  assert set(objectives["structure_only"].weights) == {"itc", "itm", "kd", "kdi", "kdt"}
  assert set(objectives["full_faithful"].weights) == set(spec.ALL_TERMS)
  assert (objectives["full_faithful"].lambda_mode, objectives["full_faithful"].tau2_mode) == (
      "raw", "learned")
  assert (objectives["full_fixed"].lambda_mode, objectives["full_fixed"].tau2_mode) == (
      "sigmoid", "clamped")
  for arm, value in (("lambda_0", 0.0), ("lambda_half", 0.5), ("lambda_1", 1.0)):
    assert (objectives[arm].lambda_mode, objectives[arm].lambda_fixed) == ("fixed", value)
  assert objectives["mse"].distance == "mse"
  dual = [r for r in _runs() if r.student == "dual_encoder" and r.arm == "full_faithful"][0]
  assert "itm" not in spec.from_config(dual.config).stage("full_faithful").objective.weights


def test_levels_set_the_synthetic_knobs():
  knobs = {(r.level, r.config.data.synthetic.caption_keep_prob,
            r.config.data.synthetic.degrade_fraction) for r in _runs()}
  assert knobs == {("demo", 0.6, 0.2), ("balanced", 1.0, 0.0), ("text_insufficient", 0.6, 0.0),
                   ("image_insufficient", 1.0, 0.2)}


@pytest.mark.parametrize("field, value, message", [
    ("groups", (("fusion", "demo", ("baseline", "nope")),), r"must be distinct names of"),
    ("groups", (("fusion", "demo", ("baseline", "baseline")),), r"must be distinct names of"),
    ("groups", (("fusion", "demo", "baseline"),), r"must be \(student, level, \(arm, ...\)\)"),
    ("groups", (("fusion", "nowhere", ("baseline",)),), r"unknown level 'nowhere'"),
    ("groups", (("siamese", "demo", ("baseline",)),), r"unknown student 'siamese'"),
    ("groups", (("fusion", "demo", ("baseline", "full_faithful")),) * 2, r"already a group"),
    ("groups", (("fusion", "demo", ("baseline", "lambda_0")),), r"each figure arm must be an arm"),
    ("figure_arms", ("baseline",), r"needs an arm besides the baseline"),
    ("seeds", (), r"must be distinct seeds"),
    ("seeds", (1, 1), r"must be distinct seeds"),
    ("num_steps", 0, r"config.study.num_steps=0 must be positive"),
    ("levels", {"demo": {"caption_keep_prop": 0.5}}, r"levels.demo: \['caption_keep_prop'\]"),
])
def test_bad_study_configs_name_the_field(field, value, message):
  config = load_config("configs/ablation.py:tiny")
  config.study[field] = value
  with pytest.raises(InputError, match=message):
    grid.plan(config)


def test_fixed_lambda_is_the_constant_and_sigmoid_stays_in_the_unit_interval():
  raw = jnp.float32(3.0)
  assert float(losses.fusion_weight(raw, "raw")) == 3.0
  assert float(losses.fusion_weight(raw, "fixed", 0.25)) == 0.25
  assert 0 < float(losses.fusion_weight(raw, "sigmoid")) < 1
  r_text, r_image = jnp.eye(3), jnp.ones((3, 3))
  grad = lambda mode: jax.grad(lambda a: jnp.sum(
      losses.fuse_relations(r_text, r_image, losses.fusion_weight(a, mode))))(raw)
  assert float(grad("fixed")) == 0.0 and float(grad("raw")) == -6.0  # Σ (R^T − R^V)


def test_matching_negatives_and_pairwise_accuracy():
  # 3 images (ids 7, 7, 9: images 0 and 1 are the same image), 2 captions each.
  split = Split(images=np.zeros((3, 2, 2, 3), np.uint8), captions=tuple("abcdef"),
                caption_image=np.array([0, 0, 1, 1, 2, 2]), image_ids=np.array([7, 7, 9]))
  scores = np.array([[0.9, 0.8, 0.1], [0.2, 0.3, 0.4], [0.5, 0.6, 0.1], [0.1, 0.1, 0.2],
                     [0.7, 0.2, 0.3], [0.3, 0.4, 0.1]])
  negatives = matching.negative_images(split, scores, seed=0)
  # Captions of images 0 and 1 have only image 2 as a negative; image 2's have 0 and 1.
  np.testing.assert_array_equal(negatives["hard"], [2, 2, 2, 2, 0, 1])
  assert all(negatives["random"][:4] == 2) and set(negatives["random"][4:]) <= {0, 1}
  positive = scores[np.arange(6), split.caption_image]
  hard = scores[np.arange(6), negatives["hard"]]
  # positives .9 .2 .6 .1 .3 .1 against hard negatives .1 .4 .1 .2 .7 .4: captions 0 and 2 win.
  assert matching.pairwise_accuracy(positive, hard) == pytest.approx(2 / 6)
  assert matching.pairwise_accuracy(np.array([1.0, 2.0]), np.array([1.0, 3.0])) == 0.25


@pytest.mark.slow
def test_tiny_study_end_to_end(data_cache, tmp_path):
  config = load_config("configs/ablation.py:tiny")
  config.data.cache_dir = data_cache
  workdir = str(tmp_path / "study")
  markdown = runner.run_study(config, workdir)
  runs = grid.plan(config)
  with open(os.path.join(workdir, "study.json")) as f:
    records = json.load(f)["runs"]
  assert [(r["trunk"], r["arm"]) for r in records] == [(r.trunk, r.arm) for r in runs]
  for record in records:
    for key in report.REPORTED:
      if key in record["metrics"]:
        assert math.isfinite(record["metrics"][key])
    assert set(record["matching"]) == set(report.MATCHING)
  # Every table cell after the row's labels (group, arm) is a finite number, or '–' where the
  # student has no such metric.
  lines = markdown.splitlines()
  header = lambda i: i + 1 < len(lines) and lines[i + 1].startswith("|---")
  rows = [line for i, line in enumerate(lines) if line.startswith("| ") and not header(i)]
  # Results (2 arms x 2 tables), the teachers, paired differences, matching.
  assert len(rows) == 4 + 1 + 2 + 2
  # "mean" or "mean ± std" (bold if best, a paired difference with its seed count), a seed
  # count, or a single value (the teachers' row).
  number = re.compile(r"^\**[+-]?\d+\.\d+( ± \d+\.\d+)?\**( \(\d+/\d+\))?$|^\d+(\.\d+)?$")
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    labels = [c for c in cells if c in grid.ARMS or c == "frozen teachers" or
              re.match(r"^\w+ / \w+$", c)]
    assert labels and cells[:len(labels)] == labels, row
    for cell in cells[len(labels):]:
      assert cell == report.MISSING or number.match(cell), (row, cell)
  for name in report.FIGURE_CAPTIONS:
    path = os.path.join(workdir, report.FIGURES, f"{name}.png")
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"{report.FIGURES}/{name}.png" in markdown
  # A rerun trains nothing: every run is skipped on its record, the probes are reused.
  written = lambda: {path: os.path.getmtime(path) for path in
                     [runner.record_path(workdir, r) for r in runs] +
                     [os.path.join(workdir, report.FIGURES, "probes.npz")]}
  before = written()
  assert runner.run_study(config, workdir) == markdown
  assert written() == before
  # A record from another config, or a torn one, is not a finished run.
  run = runs[0]
  fingerprint = runner.run_fingerprint(run)
  assert runner.read_record(workdir, run, fingerprint)["arm"] == run.arm
  assert runner.read_record(workdir, run, "another config") is None
  with open(runner.record_path(workdir, run), "r+") as f:
    f.truncate(20)
  assert runner.read_record(workdir, run, fingerprint) is None
