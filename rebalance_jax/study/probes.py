"""What the report shows beyond the test metrics, read from a finished run's checkpoints: the
matching head's pairwise accuracy, the relation matrices of one batch, test embeddings, and the
frozen teachers' own single-modal NDCG."""

import dataclasses
import functools

import jax
import ml_collections
import numpy as np

from rebalance_jax import losses
from rebalance_jax.config import spec
from rebalance_jax.data import synthetic
from rebalance_jax.data.dataset import Dataset, load_dataset
from rebalance_jax.evaluators import matching, predict, retrieval
from rebalance_jax.evaluators.results import NDCG_COLUMNS
from rebalance_jax.models import towers
from rebalance_jax.models.student import Student, init_student
from rebalance_jax.recipe import workdirs
from rebalance_jax.recipe.evaluation import relevance_cache
from rebalance_jax.recipe.teachers import feature_job, obtain
from rebalance_jax.study import grid
from rebalance_jax.training import objective

RELATION_BATCH = 32  # images in the heatmaps' batch: the first training images, one caption each


@dataclasses.dataclass
class LoadedRun:
  """A run's experiment, data and student, on the devices; `params(stage)` reads a stage's
  selected checkpoint."""
  exp: spec.Experiment
  workdir: str
  data: Dataset
  model: Student
  mesh: object
  _params: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def open(cls, config: ml_collections.ConfigDict, workdir: str) -> "LoadedRun":
    exp = spec.from_config(config)
    data = load_dataset(exp.data)
    return cls(exp, workdir, data, workdirs.student_model(exp, data.vocab_size),
               workdirs.make_mesh(exp))

  def params(self, stage: str):
    if stage not in self._params:
      like = jax.eval_shape(lambda r: init_student(self.model, r), jax.random.key(self.exp.seed))
      self._params[stage] = workdirs.load_stage_params(
          self.exp, self.workdir, stage, like, self.mesh, self.data.content)[1]
    return self._params[stage]

  @property
  def predictor(self) -> predict.Predictor:
    return predict.student_predictor(self.model, self.data.eval_encoder)


def matching_accuracy(run: LoadedRun, stage: str) -> dict[str, float]:
  """`matching.diagnose` of a stage's model on the test split."""
  return matching.diagnose(run.predictor, run.params(stage), run.data.test,
                           run.exp.eval.batch_size, run.mesh)


def relations(run: LoadedRun, arm: str) -> dict[str, np.ndarray]:
  """R^V, R^T (the teachers'), R^E (fused with the arm's λ) and the student's R^M after stage 1
  and after the arm, over the first RELATION_BATCH training images with their first caption, all
  at the arm's τ2 (docs/method.md §4.3). The student relation is the fusion [CLS] of each matched pair
  (a dual encoder's: config.model.dual_relation embeddings; with "both", the mean of the image and
  text relations, where training sums their two distances)."""
  split = run.data.train
  rows = np.arange(min(RELATION_BATCH, split.num_images))
  captions = split.image_to_texts[rows, 0]
  teachers = obtain.obtain_teachers(run.exp, run.data, run.mesh, run.workdir)
  features = feature_job.for_experiment(run.exp, teachers, run.data, run.mesh, run.workdir)
  teacher = features.rows(rows, captions)
  stage = run.exp.stage(arm)
  params = run.params(arm)
  scalars = objective.effective_scalars(
      run.model.apply({"params": params}, method=Student.scalars), stage.objective)
  tau2, lam = scalars["temp2"], scalars["lam"]
  images = towers.preprocess_images(run.model.config.image.config,
                                    np.asarray(split.images[rows]))
  tokens = run.data.eval_encoder([split.captions[c] for c in captions])

  def student_relation(stage_params):
    apply = functools.partial(run.model.apply, {"params": stage_params})
    image, v = apply(images, method=Student.encode_image)
    text, t = apply(tokens["ids"], tokens["mask"], method=Student.encode_text)
    if run.model.config.dual_encoder:
      chosen = {"image": [v], "text": [t], "both": [v, t]}[stage.objective.dual_relation]
      return sum(losses.relation_matrix(f, tau2) for f in chosen) / len(chosen)
    fused = apply(text.tokens, tokens["mask"], image.tokens, image.mask, method=Student.fuse)
    return losses.relation_matrix(fused, tau2)

  r_image = losses.relation_matrix(teacher["teacher_image"], tau2)
  r_text = losses.relation_matrix(teacher["teacher_text"], tau2)
  out = {"R_V": r_image, "R_T": r_text, "R_E": losses.fuse_relations(r_text, r_image, lam),
         "R_M_before": student_relation(run.params(grid.FIRST_STAGE)),
         "R_M_after": student_relation(params), "lam": lam, "tau2": tau2}
  return {"relation/arm": np.array(arm),
          **{f"relation/{k}": np.asarray(v, np.float32) for k, v in out.items()}}


def teacher_ndcg(run: LoadedRun) -> dict[str, np.ndarray]:
  """The frozen teachers' own single-modal NDCG on the test split (the image teacher's i2i, the
  text teacher's t2t; under config.eval.single_modal_self): what the relation targets know."""
  teachers = obtain.obtain_teachers(run.exp, run.data, run.mesh, run.workdir)
  metrics, _ = retrieval.evaluate(
      predict.teacher_predictor(teachers["image"], teachers["text"]),
      {m: t.params for m, t in teachers.items()}, run.data.test,
      retrieval.split_relevance(run.data.test, relevance_cache(run.exp)), itm_k=0,
      batch_size=run.exp.eval.batch_size, mesh=run.mesh,
      single_modal_self=run.exp.eval.single_modal_self)
  return {f"teacher/{k}": np.float32(metrics[k]) for k in NDCG_COLUMNS if k in metrics}


def embeddings(run: LoadedRun, arm: str) -> dict[str, np.ndarray]:
  """The arm's normalized test embeddings of every image and caption."""
  images, texts = retrieval.encode_split(run.predictor, run.params(arm), run.data.test,
                                         run.exp.eval.batch_size, run.mesh, keep_states=False)
  return {f"embedding/{arm}/image": images.emb, f"embedding/{arm}/text": texts.emb}


def figure_probes(runs: dict[str, LoadedRun], relation_arm: str) -> dict[str, np.ndarray]:
  """Everything `study.figures` draws from one trunk: `runs` maps each figure arm to its opened
  run; the heatmaps are `relation_arm`'s."""
  test = next(iter(runs.values())).data.test  # synthetic (grid.plan): it has scene attributes
  out = {"arms": np.array(list(runs)), "caption_image": test.caption_image,
         "attributes": test.attributes, "attribute_names": np.array(synthetic.ATTRIBUTE_NAMES)}
  out.update(relations(runs[relation_arm], relation_arm))
  out.update(teacher_ndcg(runs[relation_arm]))
  for arm, run in runs.items():
    out.update(embeddings(run, arm))
  return out
