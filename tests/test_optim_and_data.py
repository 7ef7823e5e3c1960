"""Optimizer rules, the learning-rate schedule, data order, tokenization and the dataset splits."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rebalance_jax import config_base, optim, trainer
from rebalance_jax.data import datasets, text
from rebalance_jax.errors import InputError


def test_warmup_then_linear_decay_to_zero():
  schedule = optim.warmup_linear_decay(1.0, total_steps=100, warmup_fraction=0.1)
  np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 55, 100)], [0.0, 0.5, 1.0, 0.5, 0.0],
                             atol=1e-6)


def _optim_config(**overrides):
  c = config_base.base_config().optim
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


def test_train_batches_are_epoch_permutations_and_depend_only_on_step():
  steps_per_epoch = 10 // 3
  epoch0 = np.concatenate([trainer.train_batch_indices(10, 3, s, seed=1) for s in range(3)])
  assert len(set(epoch0)) == 9  # no repeats within an epoch; the partial batch is dropped
  again = trainer.train_batch_indices(10, 3, 1, seed=1)
  np.testing.assert_array_equal(again, epoch0[3:6])
  next_epoch = trainer.train_batch_indices(10, 3, steps_per_epoch, seed=1)
  assert not np.array_equal(next_epoch, epoch0[:3])


def test_steps_for_epochs_or_explicit_steps():
  stage = ml_collections.ConfigDict(dict(num_steps=0, num_epochs=2, batch_size=4))
  assert trainer.steps_for(stage, 10) == 4
  stage.num_steps = 7
  assert trainer.steps_for(stage, 10) == 7


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


def test_synthetic_splits_are_flickr_shaped(tiny_config):
  data = datasets.load_retrieval_data(tiny_config)
  synthetic = tiny_config.data.synthetic
  assert data.train.num_pairs == synthetic.num_train * synthetic.captions_per_image
  assert len(data.test.images) == synthetic.num_test
  assert data.test.ids.shape == (5 * synthetic.num_test, tiny_config.data.max_tokens)
  np.testing.assert_array_equal(data.test.image_to_texts[3], [15, 16, 17, 18, 19])
  batch = data.train.batch(np.array([0, 7]))
  np.testing.assert_array_equal(batch["image_id"], [0, 1])  # five captions per image
  np.testing.assert_array_equal(batch["image"][0], data.train.images[0])
  assert data.vocab_size <= tiny_config.tokenizer.vocab_size


def test_bad_synthetic_config_names_the_field(tiny_config):
  tiny_config.data.synthetic.caption_keep_prob = 1.5
  with pytest.raises(InputError, match=r"config\.data\.synthetic: .*caption_keep_prob"):
    datasets.load_retrieval_data(tiny_config)
