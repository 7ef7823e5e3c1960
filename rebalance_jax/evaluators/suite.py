"""The evaluation suite of an experiment: every protocol on the test split and its configured
sub-splits (e.g. COCO-1K), accumulated over models into one results table and plot."""

import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from rebalance_jax import experiment, reporting
from rebalance_jax.data.datasets import EvalSplit, load_retrieval_data
from rebalance_jax.errors import InputError
from rebalance_jax.evaluators import report, retrieval
from rebalance_jax.models.student import Student, init_student


class Evaluator:
  """Evaluates parameters with `retrieval.evaluate`; rows are named '<model>' or '<model> (<n>)'."""

  def __init__(self, config: ml_collections.ConfigDict, model: Student, test: EvalSplit,
               mesh: Mesh):
    self._config, self._model, self._mesh = config, model, mesh
    self._splits = {"": test, **{f" ({n})": test.first(n) for n in config.eval.subsets}}
    self._relevance: dict[str, np.ndarray] = {}
    self.rows: dict[str, dict] = {}
    self.curves: dict[str, dict] = {}

  def _relevance_of(self, suffix: str) -> np.ndarray:
    if suffix not in self._relevance:
      cache_dir = os.path.join(os.path.expanduser(self._config.data.cache_dir), "relevance")
      self._relevance[suffix] = retrieval.split_relevance(self._splits[suffix], cache_dir)
    return self._relevance[suffix]

  def add(self, name: str, params) -> None:
    for suffix, split in self._splits.items():
      metrics, curves = retrieval.evaluate(
          self._model, params, split, self._relevance_of(suffix), itm_k=self._config.eval.itm_k,
          batch_size=self._config.eval.batch_size, mesh=self._mesh)
      self.rows[name + suffix] = metrics
      self.curves[name + suffix] = curves

  def write(self, directory: str) -> None:
    """Logs the table; process 0 writes results.{json,md,png} to `directory`."""
    logging.info("test retrieval:\n%s", report.results_table(self.rows))
    if reporting.is_main_process():
      report.write_results(directory, self.rows, self.curves)


def evaluate_run(config, workdir: str, stages, step: int | None = None) -> dict:
  """Evaluates each stage's checkpoint; returns {'<stage>@<step>': metrics}."""
  experiment.validate_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  unknown = set(stages) - set(experiment.STAGES)
  if unknown:
    raise InputError(f"--stages: unknown {sorted(unknown)}; known: {experiment.STAGES}")
  mesh = experiment.make_mesh(config)
  data = load_retrieval_data(config)
  model = experiment.student_model(config, data.vocab_size)
  params_like = init_student(model, jax.random.key(config.seed))
  evaluator = Evaluator(config, model, data.test, mesh)
  for stage in stages:
    params, loaded_step = experiment.load_stage_params(
        config, workdir, stage, params_like, data.train.num_pairs, mesh, step)
    evaluator.add(f"{stage}@{loaded_step}", params)
  evaluator.write(os.path.join(workdir, "eval"))
  return evaluator.rows
