"""8x H100 80 GB (one node): full-size LaViDa training, SPEC §6.3.

  python -m lavida_jax.main --config=configs/gpu_h100_8.py:model=lavida-llada,stage=2 \
      --workdir=/data/lavida/h100x8 --config.data.source=/data/lavida/data

Mesh (data=1, fsdp=8, tensor=1): FSDP over the 8 GPUs (NVLink). Attention through
cuDNN's fused kernel (`attention_impl="cudnn"`: no [T, T] scores in memory), so the
micro-batches are sized for the activations alone (train.batch_size is one
micro-batch; a step sees batch_size x grad_accum = SPEC's 128 / 256 examples).
Layers scanned with full remat; bf16 compute, fp32 master weights and Adam state.
Not compiled ahead of time here (no GPU topology description); see
`benchmarks/train_step.py` for timing it on a GPU.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import base  # noqa: E402  pylint: disable=g-import-not-at-top

MESH = {1: (1, 8, 1), 2: (1, 8, 1), 3: (1, 8, 1)}  # (data, fsdp, tensor), by stage
GRAD_ACCUM = {1: 32, 2: 16, 3: 16}  # micro-batches per step, by stage


def get_config(arg: str | None = None):
  return base.full_size(arg, workdir="/data/lavida/h100x8",
                        data_root="/data/lavida",
                        mesh=MESH, grad_accum=GRAD_ACCUM, remat=dict.fromkeys(MESH, "full"),
                        attention_impl="cudnn")
