"""The split conventions of the paper's datasets (METHOD.md §6): config.data.<name>, with their
defaults and validation. Kept apart from `real.py` so that configs read them without importing
the data stack."""

from rebalance_jax.infra.errors import InputError
from rebalance_jax.evaluators.ranking import CAPTIONS_PER_IMAGE

FORMATS = ("karpathy", "reference", "vizwiz")
# config.data.<name>: the split conventions, with their defaults ([ref]'s, except where noted).
OPTIONS = {
    # add_val_to_train: [ref] trains on the val images too (then val selects on training data).
    "flickr30k": dict(format="karpathy", add_val_to_train=False, eval_captions_per_image=5),
    "coco": dict(format="karpathy", use_restval=True, eval_captions_per_image=5),
    # val: "rest" (the official val images after the test ones: held out); [ref] "test" (the
    # test images themselves, so that selecting on val selects on test).
    "vizwiz": dict(format="vizwiz", test_images=1000, val="rest", include_rejected=False,
                   include_precanned=False, eval_captions_per_image=5),
}


def options(data) -> dict:
  """config.data.<name> of `data` (a spec.DataSpec) over its defaults; unknown or invalid
  values are an InputError naming the field."""
  field = f"config.data.{data.name}"
  defaults = OPTIONS[data.name]
  unknown = sorted(set(data.options) - set(defaults))
  if unknown:
    raise InputError(f"{field}: unknown fields {unknown}; it has {sorted(defaults)}")
  o = {**defaults, **data.options}
  if o["format"] not in FORMATS or (data.name == "vizwiz") != (o["format"] == "vizwiz"):
    allowed = ("vizwiz",) if data.name == "vizwiz" else ("karpathy", "reference")
    raise InputError(f"{field}.format={o['format']!r} is not one of {allowed}")
  if o["eval_captions_per_image"] < CAPTIONS_PER_IMAGE:
    raise InputError(f"{field}.eval_captions_per_image={o['eval_captions_per_image']} is below "
                     f"the {CAPTIONS_PER_IMAGE} the evaluation protocols need")
  if data.name == "vizwiz":
    if o["val"] not in ("test", "rest"):
      raise InputError(f"{field}.val={o['val']!r} is not one of ('test', 'rest')")
    if o["test_images"] <= 0:
      raise InputError(f"{field}.test_images={o['test_images']} must be positive")
  return o
