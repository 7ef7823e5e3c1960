"""The ablation study: every arm of config.study over its seeds, then report.md and its figures.

  python -m rebalance_jax.ablation --config=configs/ablation.py --workdir=runs/ablation

Runs are trained one after another (`study.runner`); re-running the command skips the finished
ones and resumes an interrupted one. The workdir ends up with:
  <student>/<level>/seed<k>/   one trunk per (student, imbalance level, seed): a training
                               workdir (recipe/phases.py) with stage 1 and each arm's stage, and
                               study/<arm>.json, each run's record
  study.json                   every run's record
  report.md, figures/          the tables (mean ± std over seeds, paired differences against
                               the equal-compute baseline) and figures
The study runs in one process: its runs are small, and trained one after another.
"""

import hashlib
import json
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from rebalance_jax import cli
from rebalance_jax.recipe import workdirs
from rebalance_jax.infra import files, interrupts
from rebalance_jax.infra.errors import InputError
from rebalance_jax.study import grid, probes, report, runner

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Study config file, e.g. configs/ablation.py (or configs/ablation.py:quick). "
    "Override any field with --config.<field>=<value> (the study's own: --config.study.<field>).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the study's runs and report.")


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


def _figure_probes(config, workdir: str, runs: list[grid.Run]) -> dict[str, np.ndarray]:
  """The figure trunk's probes, cached in figures/probes.npz under its runs' fingerprints."""
  student, level = config.study.figure_trunk
  seed = config.study.seeds[0]
  arms = tuple(config.study.figure_arms)
  chosen = {r.arm: r for r in runs if (r.student, r.level, r.seed) == (student, level, seed)}
  relation_arm = next(a for a in arms if a != "baseline")
  key = hashlib.sha256(json.dumps([[a, runner.run_fingerprint(chosen[a])] for a in arms] +
                                  [relation_arm]).encode()).hexdigest()[:16]
  path = os.path.join(workdir, report.FIGURES, "probes.npz")
  if os.path.exists(path):
    with np.load(path) as saved:
      if str(saved["key"]) == key:
        return {k: saved[k] for k in saved.files if k != "key"}
  opened = {a: probes.LoadedRun.open(chosen[a].config, os.path.join(workdir, chosen[a].trunk))
            for a in arms}
  out = probes.figure_probes(opened, relation_arm)
  files.atomic_write(path, lambda f: np.savez(f, key=key, **out))
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Trains what is missing, writes study.json, report.md and the figures; returns report.md."""
  if jax.process_count() > 1:
    raise InputError("the ablation study runs in one process (it trains small runs one after "
                     f"another); this job has {jax.process_count()}")
  runs = grid.plan(config)
  workdir = workdirs.check_workdir(workdir)
  with interrupts.catching(), workdirs.workdir_lock(workdir, "ablation study"):
    records = runner.run_all(runs, workdir)
    files.atomic_write_text(os.path.join(workdir, "study.json"),
                            json.dumps({"runs": records}, indent=1))
    figure_probes = _figure_probes(config, workdir, runs)
    markdown = report.write_report(workdir, records, figure_probes, config.study.figure_trunk,
                                   config.study.figure_arms, sum(r["wall_s"] for r in records),
                                   settings(config, runs))
  logging.info("study: report in %s", os.path.join(workdir, "report.md"))
  return markdown


def main(argv):
  cli.run_guarded("rebalance_jax.ablation", argv, lambda: run(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)
