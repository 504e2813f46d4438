"""CPU demo of LoRA: teaches the trained CPU demo a question kind it never saw.

The base is the CPU demo's checkpoint (`python -m lavida_jax.main`, configs/cpu_demo.py;
`--config.model.init=DIR` names another: a step folder or a checkpoints root, whose
newest step is used). Rank-16 adapters on the LM's q/k/v/o/gate/up/down (fp32) learn
"Is there a {colour} {shape}?" -> yes / no; the base stays frozen. Each training scene
is asked the new kind and one of the demo's old kinds (rehearsed, not forgotten; the
descriptions are left out: with them a third of the records, the adapters learned
only to say "yes"); 1000 held-out scenes are each asked one question of the six
kinds, and the accuracy per kind is printed.
Checkpoints hold the adapters and lora.json naming the base; `load_pretrained`,
generate, evaluate and serve take such a step (the adapters merged into the base).

  python -m lavida_jax.main --config=configs/cpu_demo_lora.py
  python -m lavida_jax.main --config=configs/cpu_demo_lora.py --config.train.steps=0 \\
      --workdir=/tmp/lavida_jax_demo_lora_before     # the base's scores on the same set
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import cpu_demo  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg: str | None = None):
  c = cpu_demo.get_config(arg)  # the same model, tokenizer, scenes and sampler
  c.workdir = "/tmp/lavida_jax_demo_lora"
  c.model.init = "/tmp/lavida_jax_demo/checkpoints"  # the base: the CPU demo's run

  c.lora.rank = 16
  c.lora.alpha = 16.0
  c.lora.targets = "q,k,v,o,gate,up,down"
  c.lora.lr = 5e-3

  c.data.demo_kinds = ("colour_of_shape,shape_of_colour,count,leftmost_colour,"
                       "rightmost_colour,exists")
  c.data.demo_train_extra_kinds = "exists"  # every training scene: the new kind too
  c.data.demo_heldout = 1000
  # Rows as long as the one-word kinds need (no descriptions here): at the demo's 44,
  # ~14 end-of-text fill positions per row outweighed the one answer token in the loss
  # (77.9% -> 79.3% on the new kind, 2 min 36 s -> 2 min 12 s; WORKSPACE.md).
  c.data.length = 36

  c.train.steps = 800
  c.train.warmup_ratio = 0.05

  c.eval.num_examples = 1000
  c.eval.num_captions = 0  # one-word answers only: the kinds before and after
  c.checkpoint.every = 200
  return c
