"""Where the reference implementation's paper-scale stage-2 step spends its time, part by part, to
set beside `bench/train_step.py --profile_ops` (the same parts of this project's step).

Runs in the reference's own environment (PyTorch), from a checkout of its code
(njustkmg/TIP24-Rebalanced_Vision_Language_Retrieval) with a CPU harness that builds its XVLM
model through its own loaders on random weights (`run_official_step.py`: `build`, `SIZES`,
`init_single_process_group`):

  cd REFERENCE_CHECKOUT && PYTHONPATH=HARNESS_DIR:HARNESS_DIR/stubs:. \\
      REFERENCE_VENV/bin/python -W ignore /path/to/rebalance_jax/bench/reference_breakdown.py \\
      --bs 4 --threads 2 --steps 4

Times the forward and backward pass of each part with module hooks (wall time between a part's
pre-hook and hook; the autograd engine runs a CPU backward on one thread, so parts do not
overlap): the Swin stages, the text tower (embeddings and the first 6 BERT layers), the fusion
encoder (the last 6, summed over its positive and negative passes); and the whole forward,
backward and optimizer step. Prints the last step's figures; the rest of a pass (heads, losses,
the ITM negatives' sampling) is its total minus its parts.
"""

import argparse
import collections
import time

import numpy as np
import torch


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bs", type=int, default=4)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--steps", type=int, default=4)
  return parser.parse_args()


def main():
  args = parse_args()
  torch.set_num_threads(args.threads)
  import run_official_step as harness
  import tv_shim  # noqa: F401  (the harness's: before any torchvision import)
  import utils
  from optim import create_optimizer

  harness.init_single_process_group()
  size = harness.SIZES["full"]
  torch.manual_seed(0)
  model, tokenizer, config, vision_width, _ = harness.build(size)
  model.train()
  optimizer = create_optimizer(utils.AttrDict(config["optimizer"]), model)
  g = torch.Generator().manual_seed(0)
  images = torch.randn(args.bs, 3, size["image_res"], size["image_res"], generator=g)
  captions = [" ".join(f"w{int(j)}" for j in torch.randint(0, size["vocab"] - 5, (int(n),),
                                                           generator=g))
              for n in torch.randint(3, size["seq_len"], (args.bs,), generator=g)]
  ids = torch.arange(args.bs) // 2
  text_teacher = torch.randn(args.bs, size["bert_hidden"], generator=g)
  image_teacher = torch.randn(args.bs, vision_width, generator=g)
  text = tokenizer(captions, padding="longest", max_length=60, return_tensors="pt")

  encoder = model.text_encoder.encoder
  fusion = size["fusion_layer"]
  parts = {f"image stage{i}": [layer] for i, layer in enumerate(model.vision_encoder.layers)}
  parts["text tower"] = [model.text_encoder.embeddings, *encoder.layer[:fusion]]
  parts["fusion encoder"] = list(encoder.layer[fusion:])
  seconds, started = collections.Counter(), {}

  def hook(name, module):
    def begin(key):
      return lambda *_: started.__setitem__((key, id(module)), time.perf_counter())

    def end(key):
      return lambda *_: seconds.update(
          {f"{name} {key}": time.perf_counter() - started[(key, id(module))]})
    module.register_forward_pre_hook(begin("forward"))
    module.register_forward_hook(end("forward"))
    module.register_full_backward_pre_hook(begin("backward"))
    module.register_full_backward_hook(end("backward"))

  for name, modules in parts.items():
    for module in modules:
      hook(name, module)
  weights = (config["a"], config["b"], config["c"], config["d"], config["e"], config["f"],
             config["g"])
  totals = []
  for _ in range(args.steps):
    seconds.clear()
    start = time.perf_counter()
    losses = model(images, text.input_ids, text.attention_mask, idx=ids,
                   single_text_embed=text_teacher, single_image_embed=image_teacher)
    loss = sum(w * term for w, term in zip(weights, losses))
    forward = time.perf_counter()
    optimizer.zero_grad()
    loss.backward()
    backward = time.perf_counter()
    optimizer.step()
    done = time.perf_counter()
    totals.append({"forward": forward - start, "backward": backward - forward,
                   "optimizer": done - backward, "step": done - start})
  print(f"reference stage-2 step, batch {args.bs}, {args.threads} threads, captions of "
        f"{text.input_ids.shape[1]} tokens, torch {torch.__version__}; median step "
        f"{np.median([t['step'] for t in totals]):.3f} s over {args.steps}; the last step:")
  last = totals[-1]
  for direction in ("forward", "backward"):
    named = {k: v for k, v in seconds.items() if k.endswith(direction)}
    for name in sorted(named):
      print(f"  {name:<28s} {named[name]:7.3f} s")
    print(f"  {'rest ' + direction:<28s} {last[direction] - sum(named.values()):7.3f} s")
  print(f"  {'optimizer update':<28s} {last['optimizer']:7.3f} s")
  print(f"  {'step':<28s} {last['step']:7.3f} s")


if __name__ == "__main__":
  main()
