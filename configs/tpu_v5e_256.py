"""TPU v5e-256 (256 chips, 16 GiB HBM each): full-size LaViDa training, SPEC §6.3.

  python -m lavida_jax.main --config=configs/tpu_v5e_256.py:model=lavida-llada,stage=2 \
      --workdir=gs://YOUR_BUCKET/lavida/v5e-256 --config.data.source=gs://YOUR_BUCKET/data

Mesh (data=1, fsdp=128, tensor=2): 128 examples cannot split over 256 chips, so a
2-way tensor axis (heads, MLP width, vocabulary) pairs chips; FSDP over the other
128. 16 GiB per chip (train.batch_size is one micro-batch; a step sees batch_size x
grad_accum examples). Attention (LM and vision tower) is JAX's Pallas splash kernel
(`attention_impl="splash"`: no [T, T] scores in HBM).
Layers scanned with full remat; bf16 compute, fp32 master weights and Adam state.
AOT compile and memory/MFU estimate: `benchmarks/aot_tpu.py` (benchmarks/README.md).

Two slices (2 x v5e-256; `launch/train.sh --num-slices=2` adds the first override):
`--config.dcn_mesh=2,1,1` puts the data axis across the slices (only the gradient
all-reduce crosses the data-centre network). A micro-batch must then split over the
data x fsdp chips of both: stage 1 halves train.grad_accum and doubles
train.batch_size; stages 2/3 (grad_accum 1) keep them and take stage 1's layout per
slice, `--config.mesh=1,64,4` (not AOT-compiled for stage 2; WORKSPACE.md, Multi-slice).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import base  # noqa: E402  pylint: disable=g-import-not-at-top

MESH = {1: (1, 64, 4), 2: (1, 128, 2), 3: (1, 128, 2)}  # (data, fsdp, tensor), by stage
GRAD_ACCUM = {1: 4, 2: 1, 3: 1}  # micro-batches per step, by stage


def get_config(arg: str | None = None):
  return base.full_size(arg, workdir="gs://YOUR_BUCKET/lavida/v5e-256",
                        data_root="gs://YOUR_BUCKET/lavida",
                        mesh=MESH, grad_accum=GRAD_ACCUM, remat=dict.fromkeys(MESH, "full"),
                        attention_impl="splash")
