"""Optimizer rules, the learning-rate schedule and tokenization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rebalance_jax.config import defaults
from rebalance_jax.data import text
from rebalance_jax.infra.errors import InputError
from rebalance_jax.training import optim


def test_warmup_then_linear_decay_to_zero():
  schedule = optim.warmup_linear_decay(1.0, total_steps=100, warmup_fraction=0.1)
  np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 55, 100)], [0.0, 0.5, 1.0, 0.5, 0.0],
                             atol=1e-6)


def _optim_config(**overrides):
  c = defaults.base_config().optim
  c.update(lr=0.1, warmup_fraction=0.0, **overrides)
  return c


PARAMS = {"image_proj": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
          "layer0": {"attention_norm": {"scale": jnp.ones(2)}}, "temp": jnp.ones(())}


def _first_update(config, grads):
  tx, _ = optim.make_optimizer(config, PARAMS, total_steps=10)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  return updates


def test_weight_decay_skips_biases_and_norms():
  zero = jax.tree.map(jnp.zeros_like, PARAMS)  # with zero gradients only decay moves parameters
  updates = _first_update(_optim_config(weight_decay=0.5), zero)
  np.testing.assert_allclose(updates["image_proj"]["kernel"], -0.1 * 0.5)
  np.testing.assert_allclose(updates["temp"], -0.1 * 0.5)  # [ref] decays the temperature too
  np.testing.assert_array_equal(updates["image_proj"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["layer0"]["attention_norm"]["scale"], 0.0)


def test_lr_multipliers_scale_matching_parameters():
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  base = _first_update(_optim_config(weight_decay=0.0), grads)
  doubled = _first_update(_optim_config(weight_decay=0.0, lr_multipliers=(("proj|^temp", 2.0),)),
                          grads)
  np.testing.assert_allclose(doubled["image_proj"]["kernel"], 2 * base["image_proj"]["kernel"])
  np.testing.assert_allclose(doubled["temp"], 2 * base["temp"])
  np.testing.assert_allclose(doubled["layer0"]["attention_norm"]["scale"],
                             base["layer0"]["attention_norm"]["scale"])
  np.testing.assert_allclose(base["temp"], -0.1, rtol=1e-4)  # Adam's first step is lr·sign(g)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  captions = ["a red circle on the left", "two big blue squares", "a tiny green triangle"] * 20
  vocab = str(tmp_path_factory.mktemp("vocab") / "vocab.txt")
  return text.load_tokenizer(text.train_wordpiece_vocab(captions, vocab, vocab_size=100))


def test_tokenize_like_the_reference(tokenizer):
  assert text.clean_caption("A Red circle, on the LEFT!  ", 3) == "a red circle"
  ids, mask = text.tokenize(tokenizer, ["A red circle!", "two big blue squares"], 8, 30)
  assert ids[0, 0] == tokenizer.cls_token_id and tokenizer.sep_token_id not in ids[0]
  assert tokenizer.decode(ids[0][mask[0] == 1][1:]) == "a red circle"
  np.testing.assert_array_equal(mask.sum(1), [4, 5])
  np.testing.assert_array_equal(ids[mask == 0], tokenizer.pad_token_id)
  ids, mask = text.tokenize(tokenizer, ["two big blue squares"], 4, 30, append_sep=True)
  assert list(ids[0]) == [tokenizer.cls_token_id, *tokenizer("two big")["input_ids"][1:-1],
                          tokenizer.sep_token_id]


def test_empty_caption_is_named(tokenizer):
  with pytest.raises(InputError, match=r"caption 1 is empty"):
    text.tokenize(tokenizer, ["a red circle", " !! "], 8, 30)
