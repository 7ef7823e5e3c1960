"""Does the matching head tell a caption's image from others? Pairwise accuracy on the test split.

For each test caption, its image (the positive) is scored against one negative image: a random
one (with another image id), or the hardest by ITC cosine (the wrong image the ITC ranking puts
highest: what ITM re-ranking must demote). The accuracy is the fraction of captions whose positive
scores above the negative (ties count half); 50% is chance. Against random negatives it is given
for the ITM logit the re-ranking uses and for the ITC cosine beside it. Against the hard ones only
for ITM: ITC's own accuracy there is its t2i R@1 by construction (the hard negative is the image
it ranks above every other wrong one).
"""

import numpy as np
from jax.sharding import Mesh

from rebalance_jax.data.sources import Split
from rebalance_jax.evaluators import retrieval
from rebalance_jax.evaluators.predict import Predictor


def negative_images(split: Split, text_to_image: np.ndarray, seed: int) -> dict[str, np.ndarray]:
  """One negative image per caption: "random" (uniform over images with another image id) and
  "hard" (the highest `text_to_image` score among them)."""
  own_ids = split.image_ids[split.caption_image]
  wrong = split.image_ids[None, :] != own_ids[:, None]  # (captions, images)
  if not wrong.any(axis=1).all():
    raise ValueError("every test image has the same image id: there are no negatives")
  rng = np.random.default_rng(seed)
  random_choice = np.argmax(np.where(wrong, rng.random(wrong.shape), -1.0), axis=1)
  hard = np.argmax(np.where(wrong, text_to_image, -np.inf), axis=1)
  return {"random": random_choice, "hard": hard}


def pairwise_accuracy(positive: np.ndarray, negative: np.ndarray) -> float:
  """Fraction of rows with positive > negative, ties counting half."""
  return float(np.mean((positive > negative) + 0.5 * (positive == negative)))


def diagnose(predictor: Predictor, params, split: Split, batch_size: int, mesh: Mesh,
             seed: int = 0) -> dict[str, float]:
  """{"itc_vs_random", "itm_vs_random", "itm_vs_hard"}: pairwise accuracies in percent; the itm_
  entries only for a predictor with a matching head."""
  images, texts = retrieval.encode_split(predictor, params, split, batch_size, mesh,
                                         keep_states=predictor.match_logits is not None)
  text_to_image = texts.emb @ images.emb.T
  negatives = negative_images(split, text_to_image, seed)
  captions = np.arange(split.num_captions)
  positives = split.caption_image
  itm = lambda image_index: retrieval.itm_logits(predictor, params, images, texts, image_index,
                                                 captions, batch_size, mesh)
  itm_positive = itm(positives) if predictor.match_logits is not None else None
  out = {"itc_vs_random": 100 * pairwise_accuracy(text_to_image[captions, positives],
                                                  text_to_image[captions, negatives["random"]])}
  if itm_positive is not None:
    for kind, negative in negatives.items():
      out[f"itm_vs_{kind}"] = 100 * pairwise_accuracy(itm_positive, itm(negative))
  return out
