"""The ablation study: every arm of config.study over its seeds, then report.md and its figures.

  python -m rebalance_jax.ablation --config=configs/ablation.py --workdir=runs/ablation

Runs are trained one after another (`study.runner`); re-running the command skips the finished
ones and resumes an interrupted one. The workdir ends up with:
  <student>/<level>/seed<k>/   one trunk per (student, imbalance level, seed): a training
                               workdir (phases.py) with stage 1 and each arm's stage, and
                               study/<arm>.json, each run's record
  study.json                   every run's record
  report.md, figures/          the tables (mean ± std over seeds, paired differences against
                               the equal-compute baseline) and figures
"""

import hashlib
import json
import os

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from rebalance_jax import cli, experiment, files, interrupts, reporting
from rebalance_jax.study import grid, probes, report, runner

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Study config file, e.g. configs/ablation.py (or configs/ablation.py:quick). "
    "Override any field with --config.<field>=<value> (the study's own: --config.study.<field>).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the study's runs and report.")


def _settings(config: ml_collections.ConfigDict, runs: list[grid.Run]) -> str:
  s = config.study
  first = runs[0].config.stages[grid.FIRST_STAGE]
  levels = "; ".join(f"{name}: caption_keep_prob={v.caption_keep_prob}, "
                     f"degrade_fraction={v.degrade_fraction}" for name, v in s.levels.items())
  return (f"{len(runs)} runs over seeds {tuple(s.seeds)}. Every run trains stage 1 (ITC + ITM) "
          f"for {s.num_steps} steps at batch {first.batch_size}, then its arm's stage for "
          f"{s.num_steps} more from stage 1's selected checkpoint (selected on the validation "
          f"split, config.eval.select_on={config.eval.select_on!r}); the baseline arm's stage is "
          f"ITC + ITM again, so every arm has the same {2 * s.num_steps} steps. Test split: "
          f"{config.data.synthetic.num_test} images. Imbalance levels: {levels}.")


def _figure_probes(config, workdir: str, runs: list[grid.Run]) -> dict[str, np.ndarray]:
  """The figure trunk's probes, cached in figures/probes.npz under its runs' fingerprints."""
  student, level = config.study.figure_trunk
  seed = config.study.seeds[0]
  chosen = {r.arm: r for r in runs if (r.student, r.level, r.seed) == (student, level, seed)
            and r.arm in config.study.figure_arms}
  missing = sorted(set(config.study.figure_arms) - set(chosen))
  if missing:
    raise ValueError(f"config.study.figure_arms: {missing} are not runs of {student}/{level} "
                     f"at seed {seed}")
  key = hashlib.sha256(json.dumps(sorted(runner.run_fingerprint(r) for r in chosen.values()))
                       .encode()).hexdigest()[:16]
  path = os.path.join(workdir, report.FIGURES, "probes.npz")
  if os.path.exists(path):
    with np.load(path) as saved:
      if str(saved["key"]) == key:
        return {k: saved[k] for k in saved.files if k != "key"}
  opened = {arm: probes.LoadedRun.open(r.config, os.path.join(workdir, r.trunk))
            for arm, r in chosen.items()}
  relation_arm = next(a for a in config.study.figure_arms if a != "baseline")
  out = probes.figure_probes(opened, relation_arm)
  if reporting.is_main_process():
    files.atomic_write(path, lambda f: np.savez(f, key=key, **out))
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Trains what is missing, writes study.json, report.md and the figures; returns report.md."""
  runs = grid.plan(config)
  workdir = experiment.check_workdir(workdir)
  with interrupts.catching(), experiment.workdir_lock(workdir, "ablation study"):
    records = runner.run_all(runs, workdir)
    if reporting.is_main_process():
      files.atomic_write_text(os.path.join(workdir, "study.json"),
                              json.dumps({"runs": records}, indent=1))
    figure_probes = _figure_probes(config, workdir, runs)
  wall = sum(r["wall_s"] for r in records)
  markdown = report.write_report(workdir, records, figure_probes, config.study.figure_trunk,
                                 config.study.figure_arms, wall, _settings(config, runs))
  logging.info("study: report in %s", os.path.join(workdir, "report.md"))
  return markdown


def main(argv):
  cli.run_guarded("rebalance_jax.ablation", argv, lambda: run(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)
