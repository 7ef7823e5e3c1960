"""The study: the grid's runs one after another, each with `phases.run` in its trunk's workdir,
then study.json, report.md and its figures (`run_study`).

A finished run leaves `<trunk>/study/<arm>.json`: its test metrics, stage 1's, the matching
head's pairwise accuracy (`probes.matching_accuracy`), the fingerprint of its experiment and its
wall time (of the invocation that finished it: a trunk's first run also trains stage 1, its first
distilling run the teachers, and a resumed run only what was left). A rerun skips every run whose
record matches its config; an interrupted one resumes inside `phases.run` (its checkpoints), and
a run whose config changed is refused there (its checkpoints belong to another config).
"""

import hashlib
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from rebalance_jax.config import spec
from rebalance_jax.infra import files, interrupts, logs
from rebalance_jax.infra.errors import InputError
from rebalance_jax.recipe import phases, workdirs
from rebalance_jax.study import grid, probes, report

RECORD_DIR = "study"


def run_fingerprint(run: grid.Run) -> str:
  """A hash of what the run's results depend on: its stage's fingerprint (which holds stage 1's
  and the teachers') and the evaluation config."""
  exp = spec.from_config(run.config)
  what = {"stage": exp.fingerprints[run.arm], "eval": exp.eval.fingerprint}
  return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_path(workdir: str, run: grid.Run) -> str:
  return os.path.join(workdir, run.trunk, RECORD_DIR, f"{run.arm}.json")


def read_record(workdir: str, run: grid.Run, fingerprint: str) -> dict | None:
  """The run's saved record if it is complete and from this config, else None."""
  path = record_path(workdir, run)
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if record.get("fingerprint") == fingerprint else None


def run_all(runs: list[grid.Run], workdir: str) -> list[dict]:
  """Trains and evaluates every run not yet recorded; returns every run's record, in order."""
  records, pending = [], []
  for index, run in enumerate(runs):
    fingerprint = run_fingerprint(run)
    records.append(read_record(workdir, run, fingerprint))
    if records[-1] is None:
      pending.append((index, run, fingerprint))
  logging.info("study: %d runs, %d recorded before, %d to run", len(runs),
               len(runs) - len(pending), len(pending))
  started = time.perf_counter()
  for done, (index, run, fingerprint) in enumerate(pending):
    interrupts.check("the study, between runs")
    if done:
      elapsed = time.perf_counter() - started
      eta = logs.format_duration(elapsed / done * (len(pending) - done))
      logging.info("study: %d/%d runs in %s | ETA %s", done, len(pending),
                   logs.format_duration(elapsed), eta)
    logging.info("study: run %s", run.name)
    run_start = time.perf_counter()
    trunk = os.path.join(workdir, run.trunk)
    rows = phases.run(spec.from_config(run.config), trunk)
    record = {"student": run.student, "level": run.level, "seed": run.seed, "arm": run.arm,
              "trunk": run.trunk, "fingerprint": fingerprint, "metrics": rows[run.arm],
              "stage1": rows[grid.FIRST_STAGE]}
    if not run.config.model.dual_encoder:
      record["matching"] = probes.matching_accuracy(probes.LoadedRun.open(run.config, trunk),
                                                    run.arm)
    record["wall_s"] = round(time.perf_counter() - run_start, 1)
    files.atomic_write_text(record_path(workdir, run), json.dumps(record, indent=1))
    records[index] = record
  if pending:
    logging.info("study: %d runs in %s", len(pending),
                 logs.format_duration(time.perf_counter() - started))
  return records


def figure_probes(config, workdir: str, runs: list[grid.Run]) -> dict[str, np.ndarray]:
  """The figure trunk's probes, cached in figures/probes.npz under its runs' fingerprints."""
  student, level = config.study.figure_trunk
  seed = config.study.seeds[0]
  arms = tuple(config.study.figure_arms)
  chosen = {r.arm: r for r in runs if (r.student, r.level, r.seed) == (student, level, seed)}
  relation_arm = next(a for a in arms if a != "baseline")
  key = hashlib.sha256(json.dumps([[a, run_fingerprint(chosen[a])] for a in arms] +
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


def run_study(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Trains what is missing, writes study.json, report.md and the figures; returns report.md."""
  if jax.process_count() > 1:
    raise InputError("the ablation study runs in one process (it trains small runs one after "
                     f"another); this job has {jax.process_count()}")
  runs = grid.plan(config)
  workdir = workdirs.check_workdir(workdir)
  with interrupts.catching(), workdirs.workdir_lock(workdir, "ablation study"):
    records = run_all(runs, workdir)
    files.atomic_write_text(os.path.join(workdir, "study.json"),
                            json.dumps({"runs": records}, indent=1))
    probed = figure_probes(config, workdir, runs)
    markdown = report.write_report(workdir, records, probed, config.study.figure_trunk,
                                   config.study.figure_arms, sum(r["wall_s"] for r in records),
                                   report.settings(config, runs))
  logging.info("study: report in %s", os.path.join(workdir, "report.md"))
  return markdown
