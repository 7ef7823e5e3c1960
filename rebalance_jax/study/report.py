"""The ablation study's report: per group (student, imbalance level), each arm's test metrics over
seeds, its paired differences against the equal-compute baseline, verdicts on the headline
metrics, the matching-head diagnostic, and the figures (`figures`)."""

import json
import os

import ml_collections
import numpy as np
from scipy import stats

from rebalance_jax.evaluators.results import NDCG_COLUMNS, column_header
from rebalance_jax.evaluators.results import RECALL_COLUMNS as SCORE_RECALL_COLUMNS
from rebalance_jax.infra.files import atomic_write_text
from rebalance_jax.infra.logs import format_duration
from rebalance_jax.study import figures, grid
from rebalance_jax.study.figures import mean_std

BASELINE = "baseline"
RECALL_COLUMNS = [f"{mode}/{name}" for mode in ("itc", "itm") for name in SCORE_RECALL_COLUMNS]
REPORTED = RECALL_COLUMNS + NDCG_COLUMNS
HEADLINE = ("itc/rsum", "itm/rsum", "i2i_ndcg@10", "t2t_ndcg@10", "mixed_ndcg@10")
MATCHING = ("itc_vs_random", "itm_vs_random", "itm_vs_hard")  # evaluators/matching.py
MISSING = "–"
MIN_SEEDS = 3  # for a verdict
SIGNIFICANCE = 0.05  # two-sided, per comparison (no correction for the many comparisons)
FIGURES = "figures"  # the figures' directory, under the workdir beside report.md
FIGURE_CAPTIONS = {
    "relations": "Relation matrices of one batch: the teachers', the fused target, and the "
                 "student's at stage 1 and after the full arm.",
    "trajectories": "λ, τ, τ2 and each loss term against the total step, stage 1 then each arm.",
    "metric_curves": "NDCG@K per protocol (mean ± std over seeds) and ITC recall@K curves of the "
                     "main group's arms.",
    "embeddings": "PCA of the test embeddings per arm, coloured by object count and by a red "
                  "object's presence.",
}


def _run_name(record: dict) -> str:
  return f"{record['trunk']}/{record['arm']}"


def _values(records: list[dict], section: str, keys) -> dict[str, list[float]]:
  """Per key present in the section of any record: its value in each; a non-finite value, or a
  key some records lack, is a ValueError naming the run."""
  present = [k for k in keys if any(k in r.get(section, {}) for r in records)]
  values = {}
  for key in present:
    for r in records:
      value = r.get(section, {}).get(key)
      if value is None or not np.isfinite(value):
        raise ValueError(f"run {_run_name(r)}: {section}[{key!r}] is {value!r}, not a finite "
                         "number")
    values[key] = [float(r[section][key]) for r in records]
  return values


def _stats(values: list[float]) -> dict:
  mean, std = mean_std(values)
  return {"mean": mean, "std": std}


def _paired(records: list[dict], baselines: dict[int, dict]) -> dict[str, dict]:
  """Per reported metric: the arm − baseline differences over the seeds both have."""
  pairs = [(r, baselines[r["seed"]]) for r in records if r["seed"] in baselines]
  out = {}
  for key in REPORTED:
    diffs = [r["metrics"][key] - b["metrics"][key] for r, b in pairs
             if key in r["metrics"] and key in b["metrics"]]
    if diffs:
      out[key] = {**_stats(diffs), "n": len(diffs), "positive": sum(d > 0 for d in diffs),
                  "negative": sum(d < 0 for d in diffs)}
  return out


def summarize(records: list[dict]) -> dict:
  """{(student, level, arm): {"n", "seeds", "metrics", "vs_baseline", "matching"}}, in record
  order. "metrics" and "matching": {key: {"mean", "std"}} over seeds (std with ddof=1 when n > 1,
  else 0); "vs_baseline" (not for the baseline itself, nor in a group without one): {key: {"mean",
  "std", "n", "positive", "negative"}} of the paired differences arm − baseline of each seed."""
  rows = {}
  for r in records:
    rows.setdefault((r["student"], r["level"], r["arm"]), []).append(r)
  summary = {}
  for (student, level, arm), runs in rows.items():
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) < len(seeds):
      raise ValueError(f"run {_run_name(runs[0])}: more than one record per seed")
    baselines = {r["seed"]: r for r in rows.get((student, level, BASELINE), [])}
    metrics = _values(runs, "metrics", REPORTED)
    summary[(student, level, arm)] = {
        "n": len(runs), "seeds": seeds,
        "metrics": {k: _stats(v) for k, v in metrics.items()},
        "vs_baseline": _paired(runs, baselines) if baselines and arm != BASELINE else {},
        "matching": {k: _stats(v) for k, v in _values(runs, "matching", MATCHING).items()}}
  return summary


def p_value(diff: dict) -> float | None:
  """Two-sided p-value of the paired t-test of a paired difference (None below MIN_SEEDS; 0 for
  identical non-zero differences, 1 for all-zero ones)."""
  if diff["n"] < MIN_SEEDS:
    return None
  if diff["std"] == 0:
    return 1.0 if diff["mean"] == 0 else 0.0
  t = diff["mean"] / (diff["std"] / np.sqrt(diff["n"]))
  return float(2 * stats.t.sf(abs(t), df=diff["n"] - 1))


def verdict(diff: dict) -> str:
  """"better" / "worse" when the paired t-test rejects no difference at SIGNIFICANCE, else "no
  significant difference"; "too few seeds" below MIN_SEEDS."""
  p = p_value(diff)
  if p is None:
    return "too few seeds"
  if p >= SIGNIFICANCE:
    return "no significant difference"
  return "better" if diff["mean"] > 0 else "worse"


def _header(column: str) -> str:
  """The results table's header, with the score mode ("ITC i2t R@1") of a recall column."""
  if "/" not in column:
    return column_header(column)
  mode, name = column.split("/")
  return f"{mode.upper()} {column_header(name)}"


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _groups(summary: dict) -> dict[tuple[str, str], dict[str, dict]]:
  groups = {}
  for (student, level, arm), row in summary.items():
    groups.setdefault((student, level), {})[arm] = row
  return groups


def _mean_cell(cell: dict | None, best: float | None, n: int) -> str:
  """"mean ± std" (the mean alone from one seed), in bold when it is the column's best."""
  if cell is None:
    return MISSING
  text = f"{cell['mean']:.2f}" + (f" ± {cell['std']:.2f}" if n > 1 else "")
  return f"**{text}**" if cell["mean"] == best else text


def _mean_table(arms: dict[str, dict], columns: list[str]) -> str:
  """Arms × columns of "mean ± std", the best mean of each column in bold."""
  best = {c: max((row["metrics"][c]["mean"] for row in arms.values() if c in row["metrics"]),
                 default=None) for c in columns}
  return _table(["arm", "seeds"] + [_header(c) for c in columns],
                [[arm, str(row["n"])] + [_mean_cell(row["metrics"].get(c), best[c], row["n"])
                                         for c in columns] for arm, row in arms.items()])


def _diff_cell(diff: dict | None) -> str:
  if diff is None:
    return MISSING
  spread = f" ± {diff['std']:.2f}" if diff["n"] > 1 else ""
  return f"{diff['mean']:+.2f}{spread} ({diff['positive']}/{diff['n']})"


def _diff_table(arms: dict[str, dict], columns: list[str]) -> str:
  return _table(["arm"] + [_header(c) for c in columns],
                [[arm] + [_diff_cell(row["vs_baseline"].get(c)) for c in columns]
                 for arm, row in arms.items() if row["vs_baseline"]])


def _p_text(p: float) -> str:
  return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def _verdicts(groups: dict) -> list[str]:
  lines = []
  for (student, level), arms in groups.items():
    for arm, row in arms.items():
      parts = [f"{key} {verdict(d)} ({d['mean']:+.2f}, {d['positive']}/{d['n']} seeds positive"
               + ("" if (p := p_value(d)) is None else f", p {_p_text(p)}") + ")"
               for key in HEADLINE if (d := row["vs_baseline"].get(key))]
      if parts:
        lines.append(f"- {student} / {level}, {arm} vs {BASELINE}: " + "; ".join(parts))
  return lines


def _matching_table(groups: dict) -> str:
  rows = []
  for (student, level), arms in groups.items():
    for arm, row in arms.items():
      if row["matching"]:
        stats = [row["matching"].get(k) for k in MATCHING]
        rows.append([f"{student} / {level}", arm] + [
            MISSING if s is None else f"{s['mean']:.1f} ± {s['std']:.1f}" for s in stats])
  return _table(["group", "arm"] + list(MATCHING), rows) if rows else ""


def _teacher_table(teacher_ndcg: dict[str, float]) -> str:
  """One row: the frozen teachers' single-modal NDCG (image teacher i2i, text teacher t2t)."""
  columns = [c for c in NDCG_COLUMNS if c in teacher_ndcg]
  return _table(["teachers"] + [_header(c) for c in columns],
                [["frozen teachers"] + [f"{teacher_ndcg[c]:.2f}" for c in columns]])


def markdown(summary: dict, wall_seconds: float, settings_text: str, num_runs: int,
             teacher_ndcg: dict[str, float] | None = None) -> str:
  """The report's text, from `summarize`'s summary; it links the figures (FIGURE_CAPTIONS) in
  FIGURES."""
  groups = _groups(summary)
  out = ["# Ablation study: structure-aware distillation against an equal-compute baseline", "",
         settings_text, "",
         f"{num_runs} runs; wall time {format_duration(wall_seconds)} (the sum of the runs' "
         "training and evaluation, each measured by the invocation that finished it).", "",
         "## Arms", ""]
  arms = dict.fromkeys(arm for _, _, arm in summary)
  out += [f"- {arm}: {grid.ARMS[arm].description}" for arm in arms] + [""]
  out += ["## Results", "", "Test metrics in percent (NDCG × 100), mean ± std over seeds; the "
          "best mean of each column within a group in bold; – where the student has no such "
          "metric (a dual encoder has no ITM re-ranking).", ""]
  for (student, level), rows in groups.items():
    out += [f"### {student} / {level}", "", _mean_table(rows, RECALL_COLUMNS), "",
            _mean_table(rows, NDCG_COLUMNS), ""]
  if teacher_ndcg:
    out += ["### The teachers", "", "The relation targets' own single-modal NDCG on the test "
            "split (the image teacher's i2i, the text teacher's t2t), for the figure trunk: what "
            "distillation can pass on.", "", _teacher_table(teacher_ndcg), ""]
  out += ["## Paired differences against the baseline", "", "Arm − baseline of the same trunk "
          "(student, level, seed): mean ± std over seeds (the number of seeds with a positive "
          "difference / the seeds paired).", ""]
  for (student, level), rows in groups.items():
    out += [f"### {student} / {level}", ""]
    if not any(row["vs_baseline"] for row in rows.values()):
      out += [f"No {BASELINE} arm or no other arm in this group: nothing to pair.", ""]
      continue
    out += [_diff_table(rows, RECALL_COLUMNS), "", _diff_table(rows, NDCG_COLUMNS), ""]
  out += ["## Verdicts", "", f"On {', '.join(HEADLINE)}: better (worse) when the paired t-test "
          f"of the differences against the baseline over the seeds rejects no difference at "
          f"p < {SIGNIFICANCE} (two-sided; at least {MIN_SEEDS} seeds), else no significant "
          "difference. Each line is one of many comparisons, uncorrected: at this threshold about "
          "one in twenty would come out significant with no real difference.", ""]
  out += (_verdicts(groups) or ["No arm has a baseline to compare with."]) + [""]
  matching = _matching_table(groups)
  if matching:
    out += ["## Matching diagnostic", "", "Pairwise accuracy (%) of scoring a test caption's own "
            "image above one negative image (random, or the hardest by ITC cosine), by the ITM "
            "logit and by the ITC cosine; 50 = chance.", "", matching, ""]
  out += ["## Figures", ""]
  for name, caption in FIGURE_CAPTIONS.items():
    out += [f"![{name}]({FIGURES}/{name}.png)", "", caption, ""]
  return "\n".join(out)


def _recall_curves(workdir: str, records: list[dict]) -> dict:
  """{(trunk, arm): the run's recall curves}, from each trunk's results.json."""
  by_trunk = {}
  for trunk in dict.fromkeys(r["trunk"] for r in records):
    with open(os.path.join(workdir, trunk, "results.json")) as f:
      by_trunk[trunk] = json.load(f)["recall_curves"]
  return {(r["trunk"], r["arm"]): by_trunk[r["trunk"]][r["arm"]] for r in records}


def write_report(workdir: str, records: list[dict], probes: dict, figure_trunk: tuple[str, str],
                 figure_arms, wall_seconds: float, settings_text: str) -> str:
  """Writes workdir/report.md and its figures (PNGs in workdir/FIGURES); returns the markdown.
  `figure_trunk`: (student, level); the trajectories show `figure_arms` on its first record's
  trunk (the first seed's); `probes`: the figure trunk's relation and embedding probes."""
  summary = summarize(records)
  trunk = next((r["trunk"] for r in records if (r["student"], r["level"]) == tuple(figure_trunk)),
               None)
  if trunk is None:
    raise ValueError(f"figure trunk {tuple(figure_trunk)}: no run of that student and level")
  path = lambda name: os.path.join(workdir, FIGURES, f"{name}.png")
  figures.relation_heatmaps(probes, path("relations"))
  figures.trajectories(workdir, trunk, figure_arms, path("trajectories"))
  figures.metric_curves(records, _recall_curves(workdir, records), path("metric_curves"))
  figures.embedding_pca(probes, path("embeddings"))
  teacher_ndcg = {k.split("/", 1)[1]: float(v) for k, v in probes.items()
                  if k.startswith("teacher/")}
  text = markdown(summary, wall_seconds, settings_text, len(records), teacher_ndcg)
  atomic_write_text(os.path.join(workdir, "report.md"), text)
  return text


def settings(config: ml_collections.ConfigDict, runs: list[grid.Run]) -> str:
  """The report's paragraph on what was run, from the config."""
  s = config.study
  first = runs[0].config.stages[grid.FIRST_STAGE]
  used = dict.fromkeys(r.level for r in runs)
  levels = "; ".join(f"{name} (" + ", ".join(f"{k}={v}" for k, v in s.levels[name].items()) + ")"
                     for name in used)
  select = {"val": "on the validation split", "test": "on the test split (optimistic)",
            "last": "as the last checkpoint"}[config.eval.select_on]
  return (
      f"{len(runs)} runs: seeds {tuple(s.seeds)} of each (student, imbalance level, arm). Every "
      f"run trains stage 1 (its student's matching losses: ITC + ITM, a dual encoder ITC) for "
      f"{s.num_steps} steps at batch {first.batch_size}, then its arm's stage for {s.num_steps} "
      f"more from stage 1's checkpoint selected {select} ({config.eval.select_metric}); the "
      f"baseline arm's stage is stage 1's objective again, so every arm's student trains the same "
      f"{2 * s.num_steps} steps on the same data and schedule, and each stage's model is "
      f"selected the same way. What differs besides the loss: the distilling arms read frozen "
      f"teachers, pre-trained for {config.teachers.num_steps} steps each on the scene attributes "
      f"(labels the student never sees; the paper's teachers are pre-trained models too). A seed "
      f"sets the student's and the teachers' initialization and batch order; stage 1 is shared "
      f"by the arms of a seed, and each arm's stage draws its own batch order (its seed depends "
      f"on its name), so the pairing against the baseline is through the seed's stage 1 and "
      f"teachers. The data is the same in every seed (data.synthetic.seed="
      f"{config.data.synthetic.seed}): {config.data.synthetic.num_train} training images, "
      f"{config.data.synthetic.num_val} validation, {config.data.synthetic.num_test} test. "
      f"Imbalance levels: {levels}.")
