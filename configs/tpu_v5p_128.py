"""TPU v5p-128 (64 chips, 95 GiB HBM each): full-size LaViDa training, SPEC §6.3 stages.

  python -m lavida_jax.main --config=configs/tpu_v5p_128.py:model=lavida-llada,stage=2 \
      --workdir=gs://YOUR_BUCKET/lavida/v5p-128 --config.data.source=gs://YOUR_BUCKET/data

Mesh (data=1, fsdp=64, tensor=1): pure FSDP; every chip holds 1/64 of the fp32
master weights and Adam moments and, per micro-batch, 2 of the 64x2 complementary-
masking rows of a stage-2 step (2 micro-batches of 64). Layers scanned; remat policy
`dots` in stages 2/3 (weight-matmul outputs saved), full remat at stage 1's T=8192;
bf16 compute, fp32 master weights.
Attention (LM and vision tower) is JAX's Pallas splash-attention kernel
(`attention_impl="splash"`): no [T, T] scores in HBM, which XLA's attention spent most
of a layer's time writing and reading. The AOT compile of this config for v4/v5p/v5e
topologies is `benchmarks/aot_tpu.py` (est. MFU: benchmarks/README.md).

Two slices (2 x v5p-128; `launch/train.sh --num-slices=2` adds the first override):
`--config.dcn_mesh=2,1,1` puts the data axis across the slices (each keeps this mesh
over its own 64 chips, so only the gradient all-reduce crosses the data-centre
network). A micro-batch must then split over all 128 chips: halve train.grad_accum and
double train.batch_size (the job names the values otherwise; WORKSPACE.md, Multi-slice).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import base  # noqa: E402  pylint: disable=g-import-not-at-top

MESH = {1: (1, 32, 2), 2: (1, 64, 1), 3: (1, 64, 1)}  # (data, fsdp, tensor), by stage
GRAD_ACCUM = {1: 8, 2: 2, 3: 2}  # micro-batches per step, by stage
# Stages 2/3: save the weight matmuls' outputs (no recompute of them). With splash
# attention: 38 GiB/chip in two micro-batches, est. MFU 0.69 (XLA attention: 0.41, and
# 0.33 with full remat): benchmarks/README.md.
REMAT = {1: "full", 2: "dots", 3: "dots"}


def get_config(arg: str | None = None):
  return base.full_size(arg, workdir="gs://YOUR_BUCKET/lavida/v5p-128",
                        data_root="gs://YOUR_BUCKET/lavida",
                        mesh=MESH, grad_accum=GRAD_ACCUM, remat=REMAT,
                        attention_impl="splash")
