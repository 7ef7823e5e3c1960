"""Config fields shared by every experiment; each configs/<name>.py starts from `base_config()`
and edits it.

Field reference (all overridable with --config.<path>=value):
  seed                  fixed seed: data order, initialization, augmentation and ITM negatives.
  data.*                dataset name, paths (real datasets), image size, caption lengths.
  tokenizer.*           vocab_file ('' trains a WordPiece vocabulary on the training captions).
  model.*               student towers (model.image, model.text: kind, init, tower fields),
                        fusion encoder, embedding size, dual-encoder switch.
  teachers.*            frozen teacher towers (kind, init, tower fields), their tokenizer,
                        pre-training and feature mode.
  loss.*                §4 options: λ mode, τ2 mode, distance, ITM negative pool.
  optim.*               AdamW (§5): lr, betas, eps, weight decay, exclusions, lr multipliers.
  stages.<name>.*       each stage: init_from, fresh_params, epochs (or num_steps), global batch
                        size, loss weights.
  mesh.*, sharding.*    device mesh (fsdp axis size) and regex rules placing parameters on it.
  checkpoint.*, log_every, eval.*
"""

import dataclasses

import ml_collections

from rebalance_jax.data import miniature, sources
from rebalance_jax.models import towers
from rebalance_jax.models.student import DISTILLATION_PARAMS

STAGE1_WEIGHTS = {"itc": 1.0, "itm": 2.0}
STAGE2_WEIGHTS = {"itc": 1.0, "itm": 2.0, "iic": 1.0, "ttc": 2.0, "kd": 2.0, "kdi": 1.0,
                  "kdt": 1.0}


def tower(kind: str, init: str = "", **fields) -> ml_collections.ConfigDict:
  """A tower section: its registered `kind` (models/towers), converted weights to start from
  (`init`, '' for random), and every field of that kind's config dataclass (`fields` over its
  defaults, so each can be overridden on the command line). A text tower's vocab_size always
  comes from the tokenizer."""
  defaults = {f.name: f.default for f in dataclasses.fields(towers.get(kind).config_class)
              if f.name != "vocab_size"}
  unknown = set(fields) - set(defaults)
  if unknown:
    raise ValueError(f"{sorted(unknown)} are not fields of a {kind!r} tower")
  return ml_collections.ConfigDict(dict(kind=kind, init=init, **{**defaults, **fields}))


def vit(image_size, patch_size, width, depth, num_heads, mlp_dim, dropout=0.0, **fields):
  return tower("vit", image_size=image_size, patch_size=patch_size, width=width, depth=depth,
               num_heads=num_heads, mlp_dim=mlp_dim, dropout=dropout, **fields)


def text(max_tokens, width, depth, num_heads, mlp_dim, dropout=0.0, **fields):
  return tower("text", max_tokens=max_tokens, width=width, depth=depth, num_heads=num_heads,
               mlp_dim=mlp_dim, dropout=dropout, **fields)


def fusion(depth, num_heads, mlp_dim, dropout=0.0, init=""):
  """The fusion encoder: BERT-style layers with cross-attention to the image tokens; `init`:
  converted weights (`python -m rebalance_jax.convert --part=fusion`), '' for random."""
  return ml_collections.ConfigDict(dict(depth=depth, num_heads=num_heads, mlp_dim=mlp_dim,
                                        dropout=dropout, dtype="float32", remat=False, init=init))


def stage(init_from, loss_weights, fresh_params=(), num_epochs=10, num_steps=0, batch_size=36):
  """A stage: trained from `init_from` (another stage's selected checkpoint; '' : from scratch),
  with the top-level parameter subtrees `fresh_params` initialized fresh."""
  return ml_collections.ConfigDict(dict(
      init_from=init_from, fresh_params=tuple(fresh_params), num_epochs=num_epochs,
      num_steps=num_steps, batch_size=batch_size,
      loss_weights=ml_collections.ConfigDict(loss_weights)))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic"
  c.data.cache_dir = "~/.cache/rebalance_jax"
  # A real dataset (flickr30k, coco, vizwiz; data/real.py) from local files: the images, and the
  # Karpathy split file (annotation_file) or the train/val/test annotation files (the
  # reference's JSON lists; VizWiz-Captions' train.json and val.json).
  c.data.image_root = ""
  c.data.annotation_file = ""
  c.data.train_file = ""
  c.data.val_file = ""
  c.data.test_file = ""
  # Where `python -m rebalance_jax.prepare` writes it ('': <cache_dir>/prepared/<name>-<hash of
  # the annotations>), and what preparing does with a bad example: "error" or "skip" (counted
  # and reported).
  c.data.prepared_dir = ""
  c.data.on_bad_example = "error"
  c.data.num_workers = 0  # training batches: > 0 worker processes decode and augment them
  c.data.image_size = 32
  c.data.max_tokens = 24
  # Training captions are padded to the smallest of these lengths that holds the longest caption
  # of the global batch (max_tokens if none does); each length compiles the train step once.
  # () pads every batch to max_tokens.
  c.data.text_buckets = ()
  c.data.max_words_train = 60
  c.data.max_words_eval = 30
  # Training augmentation: "shift" (a random translation of up to augment_shift pixels, on the
  # device; the synthetic data) or "reference" ([ref]: RandomResizedCrop(crop_scale), horizontal
  # flip, RandAugment(randaugment = (ops, magnitude)); records of encoded images only).
  c.data.augment = "shift"
  c.data.augment_shift = 2
  c.data.crop_scale = (0.5, 1.0)
  c.data.randaugment = (2, 7)
  # A photo's EXIF orientation: "ignore" ([ref]: the pixels as stored, so a phone photo taken
  # upright may lie on its side) or "apply" (turned upright, as a viewer shows it; VizWiz's phone
  # photos are where it matters). Encoded-image sources only.
  c.data.exif_orientation = "ignore"
  c.data.synthetic = ml_collections.ConfigDict(dict(
      num_train=3000, num_val=200, num_test=1000, captions_per_image=5, max_objects=3,
      caption_keep_prob=0.6, degrade_fraction=0.2, seed=0))

  c.tokenizer = ml_collections.ConfigDict(dict(vocab_file="", vocab_size=512, append_sep=False))

  c.model = ml_collections.ConfigDict()
  c.model.image = vit(32, 8, 64, 2, 4, 128)
  c.model.text = text(24, 64, 2, 4, 128)
  c.model.fusion = fusion(1, 4, 128)  # its width is the text tower's
  c.model.embed_dim = 64
  # The whole student's converted weights (convert --format=reference: a model trained with the
  # reference implementation); '' : random, plus the towers' and fusion's own `init`.
  c.model.init = ""
  c.model.dual_encoder = False
  c.model.dual_relation = "image"  # dual encoder: student relation from "image", "text" or "both"
  c.model.temp_init = 0.07
  c.model.temp2_init = 0.07
  c.model.lam_init = 0.5

  c.teachers = ml_collections.ConfigDict()
  c.teachers.mode = "precomputed"  # "precomputed" (feature files, as [ref]) or "online"
  c.teachers.image = vit(32, 4, 64, 2, 4, 128)
  c.teachers.text = text(24, 80, 2, 4, 160)
  c.teachers.vocab_file = ""  # the text teacher's tokenizer ('': the student's)
  # Precomputed features (python -m rebalance_jax.teachers writes them; training computes any
  # that are missing): their directory ('': <workdir>/teacher_features) and stored dtype.
  c.teachers.features_dir = ""
  c.teachers.feature_dtype = "float32"
  # How an encoded image becomes the image teacher's input for its features: "resize" ([ref]:
  # squashed to the teacher's image_size) or "center_crop" (CLIP's own: the shorter side resized to
  # image_size, then the centre square). Recorded in the features' manifest.
  c.teachers.image_view = "resize"
  # A teacher without `init` weights is pre-trained on the dataset's scene attributes (synthetic
  # data only), for num_steps at batch_size and lr.
  c.teachers.num_steps = 400
  c.teachers.batch_size = 64
  c.teachers.lr = 1e-3

  c.loss = ml_collections.ConfigDict()
  c.loss.lambda_mode = "raw"       # [ref] raw λ; fixed: "sigmoid"; "fixed": λ = lambda_fixed
  c.loss.lambda_fixed = 0.5        # for "fixed" (an ablation: λ not learned)
  c.loss.tau2_mode = "learned"     # [ref] unclamped; fixed: "clamped" or "fixed"
  c.loss.tau2_range = (0.03, 0.5)  # for "clamped"
  c.loss.tau2_fixed = 0.07         # for "fixed"
  c.loss.distance = "mae"          # or "mse"
  c.loss.itm_negatives = "device"  # [ref] "device": within each device's batch; or "global"
  # Ring-chunked ITC, L_iic/L_ttc and relation losses (training/chunked_losses.py): per-device
  # memory O(B_local x tile) instead of O(B_local x B), same values; chunk_tile 0 = B_local.
  c.loss.chunked = False
  c.loss.chunk_tile = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-5
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.warmup_fraction = 0.1
  c.optim.no_decay = (r"bias$", r"norm", r"/scale$")
  # [ref] trains every parameter at the base lr; the paper's ×2 groups:
  # (("proj|itm_head|^temp|^lam", 2.0),)
  c.optim.lr_multipliers = ()

  # The stages, run in init_from order; stage 2 starts from stage 1's selected checkpoint with
  # the distillation parameters (U_v, U_t, λ, τ2) fresh (docs/method.md §5).
  c.stages = ml_collections.ConfigDict(dict(
      stage1=stage("", STAGE1_WEIGHTS),
      stage2=stage("stage1", STAGE2_WEIGHTS, fresh_params=DISTILLATION_PARAMS)))

  c.mesh = ml_collections.ConfigDict(dict(fsdp=1))  # >1: a ('data', 'fsdp') mesh
  c.sharding = ml_collections.ConfigDict(dict(
      # First match wins: "replicate" or "fsdp" (split over the fsdp axis when >= fsdp_min_size).
      rules=((r"^(temp|temp2|lam)$", "replicate"), (r"norm", "replicate"), (r".*", "fsdp")),
      fsdp_min_size=2**14))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=2))
  c.log_every = 50
  # itm_k: ITC candidates re-ranked by the ITM head ([ref]: 256 COCO, 128 Flickr30K/VizWiz; 0: off;
  # otherwise at least 10, the largest recall cut-off).
  # subsets: also evaluate on the first n test images (COCO-1K: (1000,)).
  # single_modal_self: the query itself in the headline i2i/t2t NDCG, [ref] "zeroed" (score and
  # relevance 0, still ranked); fixed: "removed". Both are always reported as i2i_<rule>_ndcg@K.
  # Model selection: each stage is evaluated on `select_on` every `every_steps` steps (0: once per
  # epoch) and at its end, and its checkpoint with the best `select_metric` is the stage's model
  # (reported on test; stage 2 starts from stage 1's). "val" (the fix); [ref] "test" (selects on
  # the reported split: optimistic); "last": the final checkpoint, no evaluation while training.
  c.eval = ml_collections.ConfigDict(dict(batch_size=256, itm_k=16, subsets=(),
                                          single_modal_self="zeroed", select_on="val",
                                          select_metric="r_mean", every_steps=0))
  return c


# The converted checkpoints the paper's student starts from (docs/method.md §2), relative to the
# working directory; configs/flickr.py's docstring gives the commands that write them.
SWIN_B_384 = "weights/swin_base_patch4_window12_384_22k.safetensors"
BERT_VOCAB = "weights/bert-base-uncased-vocab.txt"
BERT_FUSION = "weights/bert_base_uncased_fusion.safetensors"


def bert_text_weights(max_tokens: int) -> str:
  return f"weights/bert_base_uncased_text_{max_tokens}.safetensors"


CLIP_L14_VISION = "weights/clip_vit_large_patch14_vision.safetensors"


def bert_teacher_weights(max_tokens: int) -> str:
  return f"weights/bert_base_uncased_teacher_{max_tokens}.safetensors"


def reference_config(name: str, lr: float, max_tokens: int, variant: str = ""):
  """The [ref] recipe shared by the three datasets: Swin-B/384 (window 12, from ImageNet-22k)
  and BERT-base layers 0-5 (text) and 6-11 (fusion, fresh cross-attention), from the converted
  checkpoints (configs/flickr.py's docstring; each path can be overridden). The frozen teachers:
  CLIP ViT-L/14's vision tower (1024-d, its own 224 px view and normalization) and BERT-base
  (768-d, all 12 layers). Variant "tiny": the same data pipeline with tiny towers
  (`tiny_reference_model`)."""
  if variant not in ("", "tiny"):
    raise ValueError(f"configs/{name}: unknown variant {variant!r} (it has 'tiny')")
  c = base_config()
  c.data.name = name
  c.data.image_size = 384
  c.data.max_tokens = max_tokens
  # [ref] pads to each batch's longest caption; most Flickr and COCO captions fit in 16-24 tokens.
  c.data.text_buckets = (16, 24, 32, 48)
  c.data.augment = "reference"
  c.data.augment_shift = 0
  c.data[name] = sources.get(name).options  # the split conventions, editable
  del c.data.synthetic
  c.tokenizer.append_sep = False
  c.tokenizer.vocab_file = BERT_VOCAB
  c.model.image = tower("swin", init=SWIN_B_384)  # the kind's defaults are Swin-B/384 window 12
  c.model.text = text(max_tokens, 768, 6, 12, 3072, dropout=0.1, init=bert_text_weights(max_tokens))
  c.model.fusion = fusion(6, 12, 3072, dropout=0.1, init=BERT_FUSION)
  c.model.embed_dim = 256
  c.teachers.image = tower("clip_vit", init=CLIP_L14_VISION, image_size=224, patch_size=14,
                           width=1024, depth=24, num_heads=16, mlp_dim=4096)
  c.teachers.text = text(max_tokens, 768, 12, 12, 3072, init=bert_teacher_weights(max_tokens))
  c.optim.lr = lr
  for stage_config in c.stages.values():
    stage_config.update(num_epochs=10, num_steps=0, batch_size=36)
  c.checkpoint.every_steps = 1000
  c.log_every = 100
  c.eval.itm_k = 256 if name == "coco" else 128
  # The Swin-B/384 image pass needs 3.0 GiB of temporaries at 64 images, 12.1 GiB at 256
  # (bench/eval_memory.py, fp32): 64 fits a 24 GB host and leaves an accelerator room.
  c.eval.batch_size = 64
  # [ref] selects each epoch's best r_mean on the test split: --config.eval.select_on=test
  # reproduces that (optimistic); the default selects on the validation split.
  c.eval.subsets = (1000,) if name == "coco" else ()
  if variant == "tiny":
    tiny_reference_model(c)
  return c


def tiny_reference_model(c: ml_collections.ConfigDict) -> None:
  """Tiny towers on a real dataset's pipeline, for trying it on small data in minutes on a CPU
  (e.g. the miniature trees of `python -m rebalance_jax.data.miniature`): a 64 px ViT student
  with 2-layer text and 1-layer fusion encoders, a WordPiece vocabulary trained on the training
  captions, and tiny frozen teachers (a 32 px ViT; a 1-layer text tower with its own
  tokenizer, teachers.vocab_file) whose weights must be given: the miniature tool writes random
  stand-ins (`miniature.write_tiny_teachers`). Nothing here is meant to reach the paper's
  numbers."""
  c.data.image_size = 64
  c.tokenizer.vocab_file = ""
  c.model.image = vit(64, 16, 64, 2, 4, 128)
  c.model.text = text(c.data.max_tokens, 64, 2, 4, 128)
  c.model.fusion = fusion(1, 4, 128)
  c.model.embed_dim = 32
  c.teachers.image = tower(**miniature.TINY_TEACHERS["image"])
  c.teachers.text = tower(**miniature.TINY_TEACHERS["text"])
  for stage_config in c.stages.values():
    stage_config.update(num_epochs=2, batch_size=8)
  c.optim.lr = 1e-3
  c.checkpoint.every_steps = 50
  c.log_every = 5
  c.eval.update(batch_size=8, itm_k=16, subsets=())
