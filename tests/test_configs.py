"""Configs (every file x model x stage), refusal of unknown arguments, the model-FLOPs
formula against a hand count, and a shrunk TPU config's step lowered and compiled on
the 8 fake CPU devices (the same code path as benchmarks/aot_tpu.py)."""
import importlib.util
import math
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from lavida_jax import flops
from lavida_jax.models import connector, lavida, lm, siglip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
MODELS = ("lavida-llada", "lavida-dream", "llada-v")
STAGES = (1, 2, 3)
# config -> devices of its slice (None: whatever is present)
SLICES = {"tpu_v4_64": 32, "tpu_v5p_128": 64, "tpu_v5e_256": 256, "gpu_h100_8": 8,
          "colab_tpu": None}


def _load(name):
  path = os.path.join(CONFIGS, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_test_cfg_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _aot():
  spec = importlib.util.spec_from_file_location(
      "_aot_tpu", os.path.join(ROOT, "benchmarks", "aot_tpu.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", sorted(SLICES))
def test_every_model_and_stage_loads(name):
  module = _load(name)
  for model in MODELS:
    for stage in STAGES:
      c = module.get_config(f"model={model},stage={stage}")
      assert c.model.family == model and c.train.stage == stage
      d, f, t = c.mesh
      chips = SLICES[name]
      if chips is None:  # Colab: all present devices on the fsdp axis
        assert tuple(c.mesh) == (1, -1, 1)
        continue
      assert d * f * t == chips, (name, stage, c.mesh)
      # Full size, SPEC §6.3 stage defaults, bf16 compute on fp32 master weights.
      assert c.model.size == "full" and c.model.image_size == 384
      assert c.model.anyres == (stage != 1)
      assert c.data.length == (8192 if stage == 1 else 4096)
      assert c.train.batch_size * c.train.grad_accum == (256 if stage == 1 else 128)
      assert c.train.lr.to_dict() == (dict(vision=0.0, projector=1e-3, lm=0.0) if stage == 1
                                      else dict(vision=2e-6, projector=2e-5, lm=2e-5))
      assert (c.train.param_dtype, c.train.compute_dtype) == ("float32", "bfloat16")
      assert c.train.remat in ("full", "dots")
      # A micro-batch splits evenly over the batch axes (data x fsdp).
      assert c.train.batch_size % (d * f) == 0, (name, stage, c.mesh, c.train.batch_size)
      # Capacity: the label tokens of one micro-batch can never exceed B x T.
      assert c.train.capacity == c.train.batch_size * c.data.length
      # Fused attention everywhere (no [T, T] scores in HBM): cuDNN on GPU, Pallas
      # splash on TPU (LM and vision tower).
      impl = c.model.lm.attention_impl
      assert impl == ("cudnn" if name.startswith("gpu") else "splash")


def test_capacity_follows_overrides():
  c = _load("tpu_v5p_128").get_config("stage=2")
  c.train.batch_size = 64
  assert c.train.capacity == 64 * 4096
  c.train.capacity = 1000  # and can still be set outright
  assert c.train.capacity == 1000


@pytest.mark.parametrize("arg,match", [
    ("model=gpt", "unknown model 'gpt'"),
    ("stage=4", "unknown stage 4"),
    ("size=big", "unknown config argument 'size=big'"),
    ("model", "unknown config argument 'model'"),
])
def test_unknown_arguments_are_refused(arg, match):
  for name in SLICES:
    with pytest.raises(ValueError, match=match):
      _load(name).get_config(arg)


@pytest.mark.parametrize("args, named", [
    (["--config.train.nope=1"], "unknown config key 'nope'"),  # the default config
    (["--config=configs/tpu_v4_64.py:stage=2", "--config.model.nope=3"],
     "unknown config key 'nope'"),
    (["--config.train.steps=abc"], "--config.train.steps=abc"),
])
def test_bad_override_stops_the_cli_with_a_message_naming_it(args, named, tmp_path):
  """The real command line: it stops before anything runs, without a traceback."""
  root = os.path.dirname(CONFIGS)
  out = subprocess.run([sys.executable, "-m", "lavida_jax.main", *args,
                        f"--workdir={tmp_path / 'run'}"], cwd=root, capture_output=True,
                       text=True, timeout=120, check=False)
  assert out.returncode != 0
  assert named in out.stderr and "Traceback" not in out.stderr, out.stderr
  assert not (tmp_path / "run").exists()


# --- model FLOPs -----------------------------------------------------------------------

def _tiny_cfg():
  """Hand-countable sizes: 28-px views (2x2 = 4 patches), one layer each."""
  vision = siglip.SiglipConfig(image_size=28, width=8, depth=1, mlp_dim=16, num_heads=2)
  lmc = lm.LMConfig.tiny_dream(vocab_size=100, d_model=16, n_layers=1, n_heads=2,
                               n_kv_heads=1, head_dim=8, mlp_dim=32)
  conn = connector.ConnectorConfig(vision_dim=8, lm_dim=16, pool_mode=None)
  base = lavida.LaViDaConfig.create("lavida-dream", "tiny", image_size=28)
  return lavida.LaViDaConfig(family="lavida-dream", vision=vision, connector=conn, lm=lmc,
                             image=base.image)


def test_flops_match_a_hand_count():
  cfg = _tiny_cfg()
  # Vision, one view, forward: patch 2*4*(14*14*3)*8 = 37632; q,k,v,o 2*4*4*8*8 = 2048;
  # MLP 2*4*2*8*16 = 2048; attention 4*4^2*8 = 512.
  vision_view = 37632 + 2048 + 2048 + 512
  # Projector, one view: 2*4*(8*16 + 16*16) = 3072.
  proj_view = 3072
  # LM, per token: q 16*16, k and v 16*8 each, o 16*16, MLP 3*16*32 -> 2*(256+128+128+256+1536).
  lm_token = 2 * 2304
  # Attention per row (T = 10): 4 * 10^2 * (2 heads * 8) = 6400.
  attn_row = 6400
  head_token = 2 * 16 * 100
  b, t, v, n = 3, 10, 2, 25
  f = flops.train_step_flops(cfg, batch_size=b, length=t, views=v, label_tokens=n,
                             trained=("vision", "projector", "lm"))
  assert f.vision == 3 * b * v * vision_view
  assert f.projector == 3 * b * v * proj_view
  assert f.lm_dense == 3 * (2 * b) * t * lm_token  # complementary masking: 2B rows
  assert f.lm_attention == 3 * (2 * b) * attn_row
  assert f.lm_head == 3 * n * head_token
  assert f.total == sum(f.as_dict()[k] for k in ("vision", "projector", "lm_dense",
                                                  "lm_attention", "lm_head"))
  # Stage 1: only the projector trains; the frozen LM still carries input gradients,
  # the frozen vision tower (upstream of everything trained) runs forward only.
  s1 = flops.train_step_flops(cfg, batch_size=b, length=t, views=v, label_tokens=n,
                              trained=("projector",))
  assert s1.vision == b * v * vision_view
  assert s1.projector == 3 * b * v * proj_view
  assert s1.lm_dense == 2 * (2 * b) * t * lm_token
  assert s1.lm_attention == 3 * (2 * b) * attn_row
  assert s1.lm_head == 2 * n * head_token
  # LLaDA-V's i.i.d. masking: B rows, not 2B.
  iid = flops.train_step_flops(cfg, batch_size=b, length=t, views=v, label_tokens=n,
                               trained=("vision", "projector", "lm"), masking="iid")
  assert iid.lm_dense == f.lm_dense / 2 and iid.lm_attention == f.lm_attention / 2


@pytest.mark.parametrize("family", MODELS)
def test_dense_flops_are_twice_the_matmul_parameters(family):
  """Per token, forward: 2 FLOPs per weight of every matmul (an independent count)."""
  cfg = lavida.LaViDaConfig.create(family, "full")
  model = nnx.eval_shape(lambda: lavida.LaViDa(cfg, rngs=nnx.Rngs(0)))
  kernels = lambda mod: sum(math.prod(x.shape) for path, x in nnx.to_flat_state(
      nnx.state(mod, nnx.Param)) if path[-1] == "kernel")
  assert flops.lm_dense_forward_per_token(cfg.lm) == 2 * kernels(model.lm.blocks)
  p = cfg.vision.num_patches
  attention = cfg.vision.depth * 4 * p * p * cfg.vision.width
  assert flops.vision_forward_per_view(cfg.vision) == 2 * p * (
      kernels(model.vision.patch) + kernels(model.vision.blocks)) + attention
  assert flops.projector_forward_per_view(cfg.vision, cfg.connector) == \
      2 * p * kernels(model.projector)


def test_full_size_step_flops_are_sane():
  """LaViDa-L stage 2, 128 x 4096: about 6 x 8B x 2 x 128 x 4096 plus attention."""
  cfg = lavida.LaViDaConfig.create("lavida-llada", "full")
  f = flops.train_step_flops(cfg, batch_size=128, length=4096, views=5,
                             label_tokens=128 * 4096, trained=("vision", "projector", "lm"))
  assert 4.3e16 < f.lm_dense < 4.5e16  # 6 x 6.98e9 weights x 2 x 128 x 4096 tokens
  # attention / dense = 4 T N H / (2 (4 D^2 + 3 D F)) per row and layer, T = D = 4096
  assert f.lm_attention / f.lm_dense == pytest.approx(
      4 * 4096 * 4096 / (2 * (4 * 4096 ** 2 + 3 * 4096 * 12288)), rel=1e-9)
  assert 2e15 < f.vision + f.projector + f.lm_head < 4e15


def test_mfu():
  assert flops.mfu(1e15, 2.0, 4, 250e12) == pytest.approx(0.5)
  assert flops.peak_for("TPU v5p") == 459e12 and flops.peak_for("TPU v5 lite") == 197e12
  assert flops.peak_for("TPU v4") == 275e12 and flops.peak_for("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_for("cpu") is None
  with pytest.raises(ValueError, match="positive"):
    flops.mfu(1.0, 0.0, 1, 1.0)


# --- the TPU config's step, shrunk, lowered and compiled on 8 CPU devices ------------------

def test_shrunk_tpu_config_lowers_and_compiles_on_8_devices():
  from lavida_jax import sharding

  aot = _aot()
  overrides = [
      "mesh=(2,4,1)", "model.size=tiny", "model.image_size=56",
      "model.lm.d_model=32", "model.lm.n_layers=2", "model.lm.n_heads=4",
      "model.lm.n_kv_heads=4", "model.lm.head_dim=8", "model.lm.mlp_dim=64",
      "model.vision.width=16", "model.vision.depth=2", "model.vision.num_heads=2",
      "model.vision.mlp_dim=32", "data.length=64", "train.batch_size=4",
      "train.grad_accum=2", "train.vocab_chunk=64"]
  cfg = aot.load_config("tpu_v5p_128", "model=lavida-llada,stage=2", overrides)
  assert cfg.model.lm.attention_impl == "splash"
  # The same kernel, in Pallas interpret mode: CPU devices cannot run Mosaic code.
  with cfg.unlocked():
    cfg.model.lm.attention_impl = "splash_interpret"
  assert cfg.train.capacity == 4 * 64  # the reference follows the overrides
  mesh = sharding.make_mesh(tuple(cfg.mesh))
  run, state, batch, mcfg, groups = aot.abstract_step(cfg, mesh)
  assert mcfg.lm.d_model == 32 and mcfg.lm.remat == "dots" and mcfg.vision.remat == "dots"
  assert mcfg.lm.attention_impl == "splash_interpret" and mcfg.connector.anyres
  assert batch["input_ids"].shape == (8, 64)  # batch_size x grad_accum examples per step
  assert batch["pixel_values"].shape[:2] == (8, mcfg.image.max_views)
  embed = state["params"]["lm"]["embed"]
  assert embed.sharding.spec == sharding.logical_to_spec(("vocab", "embed"), embed.shape, mesh)
  # Adam's moments are sharded like their parameters; the counts are replicated.
  mus = [x for path, x in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
         if "mu" in jax.tree_util.keystr(path) and x.shape == embed.shape]
  assert mus and all(m.sharding.spec == embed.sharding.spec for m in mus)
  with jax.set_mesh(mesh):
    compiled = run.lower(state, batch).compile()
  mem = compiled.memory_analysis()
  assert mem.argument_size_in_bytes > 0
  assert compiled.input_shardings[0][0]["params"]["lm"]["embed"].spec == embed.sharding.spec
  f = aot.model_flops(cfg, mcfg, groups)
  # The head runs on capacity rows of each of the 2 micro-batches.
  assert f["total"] > 0 and f["lm_head"] == 3 * (4 * 64 * 2) * 2 * 32 * mcfg.lm.vocab_size


def test_aot_extrapolates_per_layer_and_corrects_negative_calls():
  """Loop-free cost at depth 1 and 2 -> full depth; libtpu's -1 s custom calls added back."""
  aot = _aot()
  assert aot.negative_calls("tpu_v5p_128", {"PrepareAsyncCallStart": 1,
                                            "PrepareAsyncCallDone": 1, "ConcatBitcast": 3}) == 2
  assert aot.negative_calls("tpu_v4_64", {"PrepareAsyncCallStart": 1, "ConcatBitcast": 3}) == 3
  calls = {"PrepareAsyncCallStart": 1, "PrepareAsyncCallDone": 1}
  one = dict(optimal_seconds_micro=-1.5, custom_calls=calls, xla_flops_micro=10.0,
             mesh={}, while_loops=0)
  two = dict(optimal_seconds_micro=-1.0, custom_calls=calls, xla_flops_micro=12.0,
             mesh={}, while_loops=0)
  r = aot.extrapolate("tpu_v5p_128", "stage=2", [], one, two)
  s = r["lm_share_of_layer_pair"]
  assert 0.9 < s < 1.0  # a vision layer is a few % of an (LM + vision) layer pair
  assert r["optimal_seconds_micro"] == pytest.approx(0.5 + 31 * s * 0.5 + 25 * (1 - s) * 0.5,
                                                     rel=1e-3)
  accum = r["grad_accum"]  # the micro-batches of a step
  assert r["step_seconds"] == pytest.approx(r["optimal_seconds_micro"] * accum)
  assert r["xla_flops_step"] == pytest.approx((10 + 31 * s * 2 + 25 * (1 - s) * 2) * accum,
                                              rel=1e-3)


def test_aot_prices_splash_calls_by_hand():
  """Pallas calls carry no cost in cost_analysis: aot_tpu reads them from the HLO.

  fwd + dq + dkv on one [B, N, L, H] shard are 2 + 3 + 4 matmuls of 2 B N L^2 H;
  a GQA dkv call (it returns kv heads) is priced with the fwd call's query heads.
  """
  aot = _aot()
  out = lambda k: f"(f32[2,512,128]{{2,1,0:T(8,128)}}, bf16[2,{k},4096,128]{{3,2,1,0}})"
  hlo = "\n".join([
      "  %splash_mha_fwd_no_residuals.3 = " + out(28) + " custom-call(%a, %b)",
      "  %splash_mha_fwd_residuals.1 = " + out(28) + " custom-call(%a, %b)",
      "  %splash_mha_dq_no_residuals.1 = " + out(28) + " custom-call(%a)",
      "  %splash_mha_dkv_no_residuals = " + out(4) + " custom-call(%a)",
      "  %fusion.1 = bf16[2,28,4096,128]{3,2,1,0} fusion(%a), kind=kLoop"])
  calls = aot.splash_calls(hlo)
  assert calls == {"fwd 2 28 4096 128": 2, "dq 2 28 4096 128": 1, "dkv 2 4 4096 128": 1}
  assert aot.splash_flops(calls) == (2 + 2 + 3 + 4) * 2 * 2 * 28 * 4096 ** 2 * 128
