"""The evaluation suite of an experiment: every protocol on the test split and its configured
sub-splits (e.g. COCO-1K), accumulated over models into one results table and plot."""

import json
import os
import time

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from rebalance_jax.config import spec
from rebalance_jax.data.dataset import load_dataset
from rebalance_jax.data.sources import Split
from rebalance_jax.evaluators import predict, results, retrieval
from rebalance_jax.evaluators.predict import Predictor
from rebalance_jax.infra import interrupts, logs
from rebalance_jax.infra.errors import InputError
from rebalance_jax.models import weights
from rebalance_jax.models.student import init_student
from rebalance_jax.recipe import workdirs


class Evaluator:
  """Evaluates parameters with `retrieval.evaluate`; rows are named '<model>' or '<model> (<n>)'.

  `directory` holds results.{json,md,png}. Rows already there are kept and merged with the new
  ones (a rerun that evaluates one stage never drops another's row). Each row records which
  checkpoint it evaluated, how that checkpoint was selected, and a fingerprint of config.eval, so a
  rerun of a finished run does not evaluate it again (`is_recorded`).
  """

  def __init__(self, eval_spec: spec.EvalSpec, predictor: Predictor, test: Split, mesh: Mesh,
               directory: str, relevance_cache: str | None):
    self._spec, self._predictor, self._mesh = eval_spec, predictor, mesh
    self._directory, self._relevance_cache = directory, relevance_cache
    self._splits = {"": test, **{f" ({n})": test.first(n) for n in eval_spec.subsets}}
    self._relevance: dict[int, np.ndarray] = {}
    self._fingerprint = eval_spec.fingerprint
    self.rows, self.curves = _saved_results(os.path.join(directory, "results.json"))

  def _relevance_of(self, split: Split) -> np.ndarray:
    if id(split) not in self._relevance:
      self._relevance[id(split)] = retrieval.split_relevance(split, self._relevance_cache)
    return self._relevance[id(split)]

  def _evaluate(self, params, split: Split):
    e = self._spec
    return retrieval.evaluate(self._predictor, params, split, self._relevance_of(split),
                              itm_k=e.itm_k, batch_size=e.batch_size, mesh=self._mesh,
                              single_modal_self=e.single_modal_self)

  def selection_metrics(self, params, split: Split) -> dict:
    """Every protocol's metrics of `params` on `split` (model selection during training)."""
    metrics, _ = self._evaluate(params, split)
    metric = self._spec.select_metric
    if metric not in metrics:  # an "itm/" metric of a student without ITM re-ranking
      raise InputError(f"config.eval.select_metric={metric!r}: this student does not report it "
                       "(no ITM re-ranking)")
    return metrics

  def is_recorded(self, name: str, record: dict) -> bool:
    """Whether every row of `name` holds this checkpoint's evaluation under this config.eval."""
    expected = {**record, "eval_fingerprint": self._fingerprint}
    return all(name + suffix in self.rows and
               all(self.rows[name + suffix].get(k) == v for k, v in expected.items())
               for suffix in self._splits)

  def add(self, name: str, params, record: dict | None = None) -> None:
    """Evaluates `params` on the test split and its subsets; `record` (e.g. the checkpoint step
    and how it was selected) is stored in each row. Rows of sub-splits no longer configured are
    dropped with it."""
    for stale in [k for k in self.rows if k.startswith(f"{name} (") and
                  k[len(name):] not in self._splits]:
      del self.rows[stale]
      self.curves.pop(stale, None)
    for suffix, split in self._splits.items():
      metrics, curves = self._evaluate(params, split)
      self.rows[name + suffix] = {**metrics, **(record or {}),
                                  "eval_fingerprint": self._fingerprint}
      if curves is not None:
        self.curves[name + suffix] = curves

  def current_rows(self) -> dict[str, dict]:
    """The rows evaluated under this config.eval (results.json may hold older ones too)."""
    return {k: v for k, v in self.rows.items() if v.get("eval_fingerprint") == self._fingerprint}

  def write(self) -> None:
    """Logs the table; process 0 writes results.{json,md,png}."""
    logging.info("test retrieval:\n%s", results.results_table(self.rows))
    if logs.is_main_process():
      results.write_results(self._directory, self.rows, self.curves)


def _saved_results(path: str) -> tuple[dict, dict]:
  """(rows, curves) of a results.json; an unreadable one is moved aside (never overwritten)."""
  if not os.path.exists(path):
    return {}, {}
  try:
    with open(path) as f:
      saved = json.load(f)
    return dict(saved["metrics"]), dict(saved["recall_curves"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    if logs.is_main_process():
      aside = f"{path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
      os.replace(path, aside)
      logging.warning("%s is unreadable (%s); moved to %s, its rows are evaluated again", path,
                      e, aside)
    return {}, {}


def relevance_cache(exp: spec.Experiment) -> str:
  return os.path.join(os.path.expanduser(exp.data.cache_dir), "relevance")


def evaluate_run(exp: spec.Experiment, workdir: str, stages=None,
                 step: int | None = None, weights_file: str | None = None) -> dict:
  """Evaluates each stage's checkpoint (default: every stage) into <workdir>/eval; returns
  {row: metrics} of this call. A stage's selected checkpoint is the row '<stage>', as in the run's
  own results.json; another checkpoint (`step`) is '<stage>@<step>'. Reads the run's checkpoints
  and writes nothing else.
  With `weights_file` (a whole student's converted weights, e.g. a model trained with the
  reference implementation) it evaluates that file instead, as the row 'weights:<file name>'."""
  if weights_file and (stages is not None or step is not None):
    raise InputError("--weights evaluates a weights file, not a stage: drop --stages and --step")
  stages = [] if weights_file else exp.stage_names if stages is None else stages
  workdir = workdirs.check_workdir(workdir, must_exist=not weights_file)
  unknown = set(stages) - set(exp.stage_names)
  if unknown:
    raise InputError(f"--stages: unknown {sorted(unknown)}; known: {exp.stage_names}")
  if step is not None and step < 0:
    raise InputError(f"--step={step} must be a checkpoint step (>= 0)")
  mesh = workdirs.make_mesh(exp)
  workdirs.check_batch_sizes(exp, mesh)
  for stage in stages:  # before anything is loaded or written
    workdirs.check_stage_checkpoints(workdir, stage)
  output = os.path.join(workdir, "eval")
  with interrupts.catching(), workdirs.workdir_lock(output, "evaluation"):
    data = load_dataset(exp.data)
    model = workdirs.student_model(exp, data.vocab_size)
    params_like = jax.eval_shape(lambda r: init_student(model, r), jax.random.key(exp.seed))
    evaluator = Evaluator(exp.eval, predict.student_predictor(model, data.eval_encoder),
                          data.test, mesh, output, relevance_cache(exp))
    names = []
    if weights_file:
      names.append(f"weights:{os.path.basename(weights_file)}")
      params = workdirs.place_params(exp, weights.load_safetensors(weights_file, params_like),
                                       mesh)
      evaluator.add(names[-1], params, {"weights": os.path.abspath(weights_file)})
    for stage in stages:
      loaded_step, params, record = workdirs.load_stage_params(
          exp, workdir, stage, params_like, mesh, data.content, step)
      names.append(stage if step is None else f"{stage}@{loaded_step}")
      evaluator.add(names[-1], params, record)
    evaluator.write()
  return {name: evaluator.rows[name] for name in names}

