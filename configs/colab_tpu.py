"""Colab TPU (v2-8: 8 cores of 8 GiB; v5e-1: one 16 GiB chip): a small LaViDa from scratch.

Trains on the generated demo set (shape scenes, no download) in minutes, with the
full-size code paths on an accelerator: bf16 compute with fp32 master weights,
scanned layers with full remat, FSDP over however many TPU cores Colab gives
(mesh (1, -1, 1): 8 on a v2-8, 1 on a v5e-1), then answers held-out questions
with the diffusion sampler.

  python -m lavida_jax.main --config=configs/colab_tpu.py --workdir=/content/lavida_run
  python -m lavida_jax.main --config=configs/colab_tpu.py:model=lavida-dream

Sizes: 224-px single-view images (16x16 = 256 image tokens), a 6-layer LM of width
512 (LLaDA or Dream structure), a 4-layer vision tower of width 256; about 35 M
parameters.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import base  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config(arg: str | None = None):
  args = base.parse_arg(arg, model="lavida-llada", stage=2)
  c = base.base(args["model"], args["stage"])
  c.workdir = "/content/lavida_jax_colab"
  c.mesh = (1, -1, 1)
  c.log_every = 50
  c.model.size = "tiny"
  c.model.image_size = 224
  c.model.anyres = False
  c.model.lm.d_model = 512
  c.model.lm.n_layers = 6
  c.model.lm.n_heads = 8
  c.model.lm.n_kv_heads = 2 if args["model"] == "lavida-dream" else 8
  c.model.lm.head_dim = 64
  c.model.lm.mlp_dim = 1536
  c.model.lm.attention_impl = "xla"
  c.model.vision.width = 256
  c.model.vision.depth = 4
  c.model.vision.num_heads = 4
  c.model.vision.mlp_dim = 1024

  c.data.source = "demo"
  c.data.tokenizer = "demo"
  c.data.length = 384
  c.data.system_prompt = False
  c.data.demo_train = 8000
  c.data.demo_heldout = 200
  c.data.num_workers = 0

  c.train.steps = 1500
  c.train.batch_size = 64  # divisible by the 8 cores of a v2-8
  c.train.capacity = c.train.get_ref("batch_size") * c.data.get_ref("length")
  c.train.lr = dict(vision=5e-4, projector=5e-4, lm=5e-4)
  c.train.final_ratio = 0.1
  c.train.vocab_chunk = 2048
  c.train.remat = "full"
  c.train.param_dtype = "float32"
  c.train.compute_dtype = "bfloat16"

  c.eval.num_examples = 200
  c.eval.batch_size = 64
  c.eval.gen_length = 4
  c.eval.block_length = 4
  c.eval.steps = 4

  c.checkpoint.every = 500
  c.checkpoint.keep = 2
  return c
