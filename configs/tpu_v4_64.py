"""TPU v4-64 (32 chips, megacore, 32 GiB HBM each): full-size LaViDa training, SPEC §6.3.

  python -m lavida_jax.main --config=configs/tpu_v4_64.py:model=lavida-llada,stage=2 \
      --workdir=gs://YOUR_BUCKET/lavida/v4-64 --config.data.source=gs://YOUR_BUCKET/data

Mesh (data=1, fsdp=32, tensor=1): pure FSDP over the 32 chips. The step runs as
micro-batches (train.batch_size is one micro-batch; the step sees batch_size x
grad_accum = SPEC's 128 / 256 examples), sized when attention was plain XLA and
materialised the [T, T] scores of every head. Attention (LM and vision tower) is now
JAX's Pallas splash kernel (`attention_impl="splash"`: no scores in HBM).
Layers scanned with full remat; bf16 compute, fp32 master weights and Adam state.
AOT compile and memory/MFU estimate: `benchmarks/aot_tpu.py` (benchmarks/README.md).

Two slices (2 x v4-64; `launch/train.sh --num-slices=2` adds the first override):
`--config.dcn_mesh=2,1,1` puts the data axis across the slices (each keeps this mesh
over its own 32 chips, so only the gradient all-reduce crosses the data-centre
network). A micro-batch must then split over all 64 chips: halve train.grad_accum and
double train.batch_size (the job names the values otherwise; WORKSPACE.md, Multi-slice).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import base  # noqa: E402  pylint: disable=g-import-not-at-top

MESH = {1: (1, 16, 2), 2: (1, 32, 1), 3: (1, 32, 1)}  # (data, fsdp, tensor), by stage
GRAD_ACCUM = {1: 16, 2: 4, 3: 4}  # micro-batches per step, by stage


def get_config(arg: str | None = None):
  return base.full_size(arg, workdir="gs://YOUR_BUCKET/lavida/v4-64",
                        data_root="gs://YOUR_BUCKET/lavida",
                        mesh=MESH, grad_accum=GRAD_ACCUM, remat=dict.fromkeys(MESH, "full"),
                        attention_impl="splash")
