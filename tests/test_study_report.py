"""Tests of the ablation study's summary, report and figures (study.report, study.figures), on
hand-made records and tiny fake trunk files."""

import json
import math
import os
import re

import numpy as np
import pytest

from rebalance_jax.study import figures, report

FUSION_ARMS = ("baseline", "full_faithful", "lambda_0")
DUAL_ARMS = ("baseline", "full_fixed")
SEED_BASE = {0: 100.0, 1: 110.0}  # every reported metric of a seed's baseline
SHIFT = {"baseline": (0.0, 0.0), "full_faithful": (3.0, 5.0), "lambda_0": (-5.0, -2.0),
         "full_fixed": (-1.0, 1.0)}  # arm − baseline per seed
FIGURE_GROUP = ("fusion", "demo")
FIGURE_TRUNK = "fusion/demo/seed0"  # the group's first record's trunk
FIGURE_ARMS = ("baseline", "full_faithful")


def _record(student: str, arm: str, seed: int) -> dict:
  keys = [k for k in report.REPORTED if student == "fusion" or not k.startswith("itm/")]
  metrics = {k: SEED_BASE[seed] + SHIFT[arm][seed] for k in keys}
  if arm == "full_faithful":
    metrics["itm/rsum"] = SEED_BASE[seed] + (2.0, -1.0)[seed]
  metrics.update(selected_by="val itc/rsum", checkpoint_step=4, score_mode="itm")
  record = {"student": student, "level": "demo", "seed": seed, "arm": arm,
            "trunk": f"{student}/demo/seed{seed}", "fingerprint": "f" * 16, "wall_s": 1.5,
            "metrics": metrics, "stage1": dict(metrics)}
  if student == "fusion":
    record["matching"] = {k: 60.0 + 10 * seed for k in report.MATCHING}
  return record


def _records() -> list[dict]:
  return [_record(student, arm, seed) for seed in (0, 1)
          for student, arms in (("fusion", FUSION_ARMS), ("dual_encoder", DUAL_ARMS))
          for arm in arms]


def _curves(itm: bool) -> dict:
  curves = {"ks": [1, 2, 5, 10], "itc": {"i2t": [10.0, 20.0, 40.0, 60.0],
                                          "t2i": [5.0, 15.0, 30.0, 50.0]}}
  if itm:
    curves["itm"] = {"i2t": [12.0, 22.0], "t2i": [6.0, 16.0], "max_k": 2}
  return curves


def _write_log(path: str, lines: list[dict]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)


def _fake_workdir(workdir: str, records: list[dict]) -> None:
  for trunk in {r["trunk"] for r in records}:
    os.makedirs(os.path.join(workdir, trunk))
    arms = [r["arm"] for r in records if r["trunk"] == trunk]
    curves = {stage: _curves(trunk.startswith("fusion")) for stage in ["stage1"] + arms}
    with open(os.path.join(workdir, trunk, "results.json"), "w") as f:
      json.dump({"metrics": {}, "recall_curves": curves}, f)
  stage1 = [{"step": s, "loss/itc": 2.0 - 0.1 * s, "loss/itm": 0.7, "loss/total": 2.7 - 0.1 * s,
             "scalars/temp": 0.07, "lr": 1e-4, "grad_norm": 1.0} for s in (1, 2, 3, 4)]
  stage1.insert(2, {"step": 2, "loss/itc": 9.0, "scalars/temp": 0.07})  # repeated after a resume
  stage1[-1]["val/itc/rsum"] = 50.0
  _write_log(os.path.join(workdir, FIGURE_TRUNK, "stage1", "logs", "metrics.jsonl"), stage1)
  for arm in FIGURE_ARMS:
    terms = {"loss/itc": 1.5, "loss/itm": 0.6} if arm == "baseline" else {
        "loss/itc": 1.5, "loss/iic": 0.4, "loss/kd": 0.2, "scalars/lam": 0.3,
        "scalars/temp2": 0.05}
    _write_log(os.path.join(workdir, FIGURE_TRUNK, arm, "logs", "metrics.jsonl"),
               [{"step": s, **terms, "scalars/temp": 0.07} for s in (1, 2, 3, 4)])


def _probes() -> dict:
  rng = np.random.default_rng(0)
  names = np.array(["count=1", "count=2", "count=3", "count=4", "shape=circle", "colour=red",
                    "red circle", "size=small", "pos=left"])
  attributes = (rng.random((10, len(names))) < 0.5).astype(np.uint8)
  attributes[:, :4] = np.eye(4, dtype=np.uint8)[np.arange(10) % 4]
  unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  probes = {f"relation/{k}": rng.normal(size=(6, 6)).astype(np.float32)
            for k in figures.RELATIONS}
  probes.update({"relation/lam": np.float32(0.4), "relation/tau2": np.float32(0.05),
                 "relation/arm": np.array("full_faithful"),
                 "teacher/i2i_ndcg@10": np.float32(61.25), "teacher/t2t_ndcg@10": np.float32(70.5),
                 "arms": np.array(FIGURE_ARMS), "attributes": attributes,
                 "attribute_names": names, "caption_image": np.repeat(np.arange(10), 5)})
  for arm in FIGURE_ARMS:
    probes[f"embedding/{arm}/image"] = unit(rng.normal(size=(10, 8)))
    probes[f"embedding/{arm}/text"] = unit(rng.normal(size=(50, 8)))
  return probes


def _row(text: str, section: str, group: str, table: int, arm: str) -> list[str]:
  """The cells of `arm`'s row in the `table`-th table of `group` under `section`."""
  body = text.split(f"## {section}\n")[1].split("\n## ")[0]
  tables = body.split(f"### {group}\n")[1].split("\n### ")[0].strip().split("\n\n")
  for line in tables[table].splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if cells[0] == arm:
      return cells
  raise AssertionError(f"no row {arm} in {section}/{group}[{table}]")


def test_summarize_means_stds_and_paired_differences():
  summary = report.summarize(_records())
  assert list(summary) == [("fusion", "demo", a) for a in FUSION_ARMS] + [
      ("dual_encoder", "demo", a) for a in DUAL_ARMS]
  base = summary[("fusion", "demo", "baseline")]
  assert base["n"] == 2 and base["seeds"] == [0, 1] and base["vs_baseline"] == {}
  assert base["metrics"]["itc/rsum"] == pytest.approx({"mean": 105.0, "std": math.sqrt(50)})
  assert set(base["metrics"]) == set(report.REPORTED)  # the string entries are ignored
  full = summary[("fusion", "demo", "full_faithful")]
  assert full["metrics"]["itc/rsum"] == pytest.approx({"mean": 109.0, "std": math.sqrt(72)})
  assert full["vs_baseline"]["itc/rsum"] == pytest.approx(
      {"mean": 4.0, "std": math.sqrt(2), "n": 2, "positive": 2, "negative": 0})
  assert full["vs_baseline"]["itm/rsum"] == pytest.approx(
      {"mean": 0.5, "std": math.sqrt(4.5), "n": 2, "positive": 1, "negative": 1})
  assert full["matching"]["itm_vs_hard"] == pytest.approx({"mean": 65.0, "std": math.sqrt(50)})
  lam = summary[("fusion", "demo", "lambda_0")]["vs_baseline"]["i2i_ndcg@10"]
  assert lam == pytest.approx({"mean": -3.5, "std": math.sqrt(4.5), "n": 2, "positive": 0,
                               "negative": 2})
  dual = summary[("dual_encoder", "demo", "full_fixed")]
  assert not any(k.startswith("itm/") for k in dual["metrics"]) and dual["matching"] == {}
  assert dual["vs_baseline"]["itc/rsum"]["mean"] == pytest.approx(0.0)


def test_summarize_of_one_seed_has_zero_std():
  one = report.summarize([_record("fusion", "baseline", 1), _record("fusion", "lambda_0", 1)])
  assert one[("fusion", "demo", "baseline")]["metrics"]["itc/rsum"] == {"mean": 110.0, "std": 0.0}
  assert one[("fusion", "demo", "lambda_0")]["vs_baseline"]["itc/rsum"] == pytest.approx(
      {"mean": -2.0, "std": 0.0, "n": 1, "positive": 0, "negative": 1})


def test_verdicts_are_paired_t_tests_from_three_seeds():
  # Differences 1, 2, 3: mean 2, std 1, t = 2 / (1 / sqrt 3) = 3.464 on 2 degrees of freedom:
  # p = 1 - (t / sqrt(t^2 + 2)) = 0.0742 (the t distribution's closed form for 2 df).
  diff = {"mean": 2.0, "std": 1.0, "n": 3, "positive": 3, "negative": 0}
  t = 2 / (1 / math.sqrt(3))
  assert report.p_value(diff) == pytest.approx(1 - t / math.sqrt(t * t + 2))
  assert report.verdict(diff) == "no significant difference"
  strong = {"mean": -2.0, "std": 0.2, "n": 3, "positive": 0, "negative": 3}  # t = -17.3
  assert report.p_value(strong) == pytest.approx(1 - 17.3205 / math.sqrt(17.3205 ** 2 + 2),
                                                 rel=1e-3)
  assert report.verdict(strong) == "worse"
  assert report.verdict({**strong, "mean": 2.0, "positive": 3, "negative": 0}) == "better"
  assert report.verdict({"mean": 4.0, "std": 1.0, "n": 2, "positive": 2, "negative": 0}) == (
      "too few seeds")
  assert report.verdict({"mean": 0.0, "std": 0.0, "n": 3, "positive": 0, "negative": 0}) == (
      "no significant difference")


@pytest.mark.parametrize("section", ["metrics", "matching"])
def test_a_non_finite_metric_names_the_run(section):
  records = _records()
  bad = next(r for r in records if r["trunk"] == "fusion/demo/seed1" and r["arm"] == "lambda_0")
  bad[section]["itm_vs_hard" if section == "matching" else "itc/i2t_r1"] = float("nan")
  with pytest.raises(ValueError, match=re.escape("fusion/demo/seed1/lambda_0")):
    report.summarize(records)


def test_a_metric_missing_in_one_seed_names_the_run():
  records = _records()
  del records[0]["metrics"]["t2t_ndcg@20"]
  with pytest.raises(ValueError, match=re.escape("fusion/demo/seed0/baseline")):
    report.summarize(records)


def test_read_log_keeps_the_last_record_of_each_step(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  _write_log(path, [{"step": 1, "loss/itc": 3.0}, {"step": 2, "loss/itc": 2.0},
                    {"step": 2, "loss/itc": 1.0}, {"step": 3, "loss/itc": 0.5}])
  assert [(r["step"], r["loss/itc"]) for r in figures.read_log(path)] == [
      (1, 3.0), (2, 1.0), (3, 0.5)]


def test_pca_2d_variance_explained():
  points = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [3.0, 6.0, 0.0]])
  projected, variance = figures.pca_2d(points)
  assert variance == pytest.approx([1.0, 0.0], abs=1e-9)
  assert np.abs(projected[:, 0]) == pytest.approx(np.sqrt(5) * np.array([1.5, 0.5, 0.5, 1.5]))


def test_write_report(tmp_path):
  records = _records()
  workdir = str(tmp_path)
  _fake_workdir(workdir, records)
  text = report.write_report(workdir, records, _probes(), FIGURE_GROUP, FIGURE_ARMS, 3725.0,
                             "Tiny settings: 4 steps per stage.")
  with open(os.path.join(workdir, "report.md")) as f:
    assert f.read() == text
  assert "Tiny settings: 4 steps per stage." in text and "wall time 1h02m05s" in text
  assert "- full_faithful: every term; raw λ, learned τ2 ([ref])" in text

  # Results: every metric of an arm has the same value, so the first cells are itc/i2t_r1's.
  full = _row(text, "Results", "fusion / demo", 0, "full_faithful")
  assert full[:3] == ["full_faithful", "2", "**109.00 ± 8.49**"]
  assert _row(text, "Results", "fusion / demo", 0, "baseline")[2] == "105.00 ± 7.07"
  assert _row(text, "Results", "fusion / demo", 1, "full_faithful")[2] == "**109.00 ± 8.49**"
  assert report.MISSING not in full
  dual = _row(text, "Results", "dual_encoder / demo", 0, "full_fixed")
  columns = ["arm", "seeds"] + report.RECALL_COLUMNS
  assert [c for c, cell in zip(columns, dual) if cell == report.MISSING] == [
      c for c in report.RECALL_COLUMNS if c.startswith("itm/")]

  assert "| frozen teachers | 61.25 | 70.50 |" in text  # only the NDCG columns it has

  # Paired differences and verdicts.
  assert _row(text, "Paired differences against the baseline", "fusion / demo", 0,
              "full_faithful")[1] == "+4.00 ± 1.41 (2/2)"
  assert _row(text, "Paired differences against the baseline", "fusion / demo", 1,
              "lambda_0")[1] == "-3.50 ± 2.12 (0/2)"
  verdicts = text.split("## Verdicts\n")[1].split("\n## ")[0]
  assert ("- fusion / demo, full_faithful vs baseline: itc/rsum too few seeds (+4.00, 2/2 seeds "
          "positive); itm/rsum too few seeds (+0.50, 1/2 seeds positive)" in verdicts)
  assert "- fusion / demo, lambda_0 vs baseline: itc/rsum too few seeds (-3.50, 0/2 seeds " in (
      verdicts)
  assert "dual_encoder / demo, full_fixed vs baseline: itc/rsum too few seeds " \
         "(+0.00, 1/2 seeds positive); i2i_ndcg@10" in verdicts  # no itm/rsum verdict
  assert "p < 0.05" in verdicts and "uncorrected" in verdicts

  # Matching: fusion rows only.
  matching = text.split("## Matching diagnostic\n")[1].split("\n## ")[0]
  assert "| fusion / demo | full_faithful | 65.0 ± 7.1 |" in matching
  assert "50 = chance" in matching and "dual_encoder" not in matching

  for name in report.FIGURE_CAPTIONS:
    assert f"]({report.FIGURES}/{name}.png)" in text
    with open(os.path.join(workdir, report.FIGURES, f"{name}.png"), "rb") as f:
      assert f.read(4) == b"\x89PNG"
