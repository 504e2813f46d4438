"""Faster formulations for CPU decoding compute the same function (issue 12).

`layers.unstack_layers` + the unrolled `scan_layers` must equal the scanned
stacked layers for every call the models make: the LM forward, the prefill's
KV cache, a cached denoising step (both cache layouts' keys), remat, and the
vision tower. No timing here: benchmarks/generate.py measures speed.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lavida_jax import generate
from lavida_jax.diffusion import sampler as sampler_lib
from lavida_jax.models import layers
from lavida_jax.models.lm import DiffusionLM, LMConfig
from lavida_jax.models.siglip import SiglipConfig, SiglipVisionTower
from tests.conftest import assert_close


def _pair(make):
  """(stacked, unstacked) copies of one model."""
  a = make()
  b = nnx.clone(a)
  b.blocks = layers.unstack_layers(b.blocks)
  return a, b


@pytest.mark.parametrize("cfg", [LMConfig.tiny_llada(n_layers=3),
                                 LMConfig.tiny_dream(n_layers=3)], ids=["llada", "dream"])
def test_unstacked_lm_equals_scanned(cfg):
  a, b = _pair(lambda: DiffusionLM(cfg, rngs=nnx.Rngs(0)))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 200, (2, 11)))
  valid = jnp.arange(11)[None] < jnp.array([[11], [7]])
  assert_close(b(ids, valid), a(ids, valid))

  x = a.embed_tokens(ids)
  (ca, ha), (cb, hb) = a.prefill(x, valid), b.prefill(x, valid)
  # Stacked caches for scanned layers, per-layer tuples for unrolled ones (no
  # step slices a layer out of a stack); keys [B, K, P, H], values [B, K, H, P].
  assert ca.k.shape == (cfg.n_layers, 2, cfg.n_kv_heads, 11, cfg.head_dim)
  assert ca.v.shape == (cfg.n_layers, 2, cfg.n_kv_heads, cfg.head_dim, 11)
  assert isinstance(cb.k, tuple) and len(cb.k) == cfg.n_layers
  for got, want in ((jnp.stack(cb.k), ca.k), (jnp.stack(cb.v), ca.v), (hb, ha)):
    assert_close(got, want)
  # The cached keys are the layer's post-RoPE keys of the prompt, position by position.
  rope = layers.rope_angles(jnp.cumsum(valid, 1) - 1, cfg.head_dim, cfg.rope_theta)
  blk = b.blocks[1]
  k = layers.apply_rope(blk.attn.k(blk.attn_norm(b.blocks[0](x, valid, rope)[0])), *rope)
  assert_close(cb.k[1], k.transpose(0, 2, 1, 3))

  canvas = a.embed_tokens(jnp.full((2, 5), cfg.mask_id))
  assert_close(b.hidden_with_cache(canvas, cb), a.hidden_with_cache(canvas, ca))
  # The dual cache's extension keeps each form, and both forms give the same step.
  (hb2, kvb), (ha2, kva) = (b.hidden_with_cache(canvas, cb, collect_kv=True),
                            a.hidden_with_cache(canvas, ca, collect_kv=True))
  ones = jnp.ones((2, 5), bool)
  da, db = ca.extend(*kva, ones), cb.extend(*kvb, ones)
  assert da.k.shape[-2] == da.v.shape[-1] == 16 and len(db.k) == cfg.n_layers
  assert generate.KVCache.batch_axes(da).k == 1 and generate.KVCache.batch_axes(db).k == (0,) * 3
  block = a.embed_tokens(jnp.full((2, 2), cfg.mask_id))
  start = jnp.array([1, 3])
  pos = jnp.arange(16)[None] - 11  # canvas positions of the 11 + 5 cached keys
  window = (pos >= start[:, None]) & (pos < start[:, None] + 2)
  assert_close(b.hidden_with_cache(block, db._replace(valid=db.valid & ~window), start_B=start),
               a.hidden_with_cache(block, da._replace(valid=da.valid & ~window), start_B=start))


def test_unstacked_lm_under_jit_and_remat():
  cfg = LMConfig.tiny_llada(n_layers=2, remat="full")
  a, b = _pair(lambda: DiffusionLM(cfg, rngs=nnx.Rngs(1)))
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 200, (1, 9)))

  def loss(model):
    return jnp.mean(model(ids) ** 2)

  la, ga = nnx.jit(nnx.value_and_grad(loss))(a)
  lb, gb = nnx.jit(nnx.value_and_grad(loss))(b)
  assert_close(lb, la)
  # The gradient of layer i's q kernel is slice i of the stacked gradient.
  for i in range(cfg.n_layers):
    assert_close(gb.blocks[i].attn.q.kernel[...], ga.blocks.attn.q.kernel[...][i])


def test_unstacked_vision_tower_equals_scanned():
  cfg = dataclasses.replace(SiglipConfig.tiny(), depth=3)
  a, b = _pair(lambda: SiglipVisionTower(cfg, rngs=nnx.Rngs(2)))
  px = jax.random.uniform(jax.random.key(0), (2, 384, 384, 3), minval=-1, maxval=1)
  assert_close(b(px), a(px))


def test_unstacked_layers_are_copies_with_layer_axis_dropped():
  cfg = LMConfig.tiny_llada(n_layers=3)
  lm = DiffusionLM(cfg, rngs=nnx.Rngs(0))
  per_layer = layers.unstack_layers(lm.blocks)
  assert len(per_layer) == 3
  q = per_layer[2].attn.q.kernel
  np.testing.assert_array_equal(q[...], lm.blocks.attn.q.kernel[...][2])
  assert q.get_metadata()["out_sharding"] == ("embed", "q_heads", "head_dim")
  assert lm.blocks.attn.q.kernel.get_metadata()["out_sharding"][0] == "layers"


def test_prefix_buckets_are_multiples_of_128():
  """A 601-token prompt pads to 640, not 1024; the buckets still cover 8192."""
  assert generate.bucket(601) == 640
  assert generate.bucket(128) == 128 and generate.bucket(129) == 256
  assert all(b % 128 == 0 for b in generate.PREFIX_BUCKETS if b >= 128)
  assert list(generate.PREFIX_BUCKETS) == sorted(set(generate.PREFIX_BUCKETS))
  assert generate.PREFIX_BUCKETS[-1] == 8192


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1)], ids=["mha", "gqa"])
@pytest.mark.parametrize("mask_kind", ["none", "keys", "full"])
def test_xla_cpu_attention_equals_jax(heads, kv_heads, mask_kind):
  """The rearranged XLA attention (heads-major, normalisation deferred) is jax's,
  including a query that sees no key (jax averages over every key)."""
  rng = np.random.default_rng(3)
  b, t, s, h = 2, 7, 9, 16
  q = jnp.asarray(rng.standard_normal((b, t, heads, h)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, s, kv_heads, h)), jnp.float32) for _ in range(2))
  mask, jax_mask = None, None
  if mask_kind == "keys":
    mask = jnp.arange(s)[None] >= jnp.array([[0], [4]])
    jax_mask = mask[:, None, None, :]
  elif mask_kind == "full":
    mask = jnp.asarray(rng.random((b, t, s)) < 0.6).at[1, 2].set(False)  # row 2 sees nothing
    jax_mask = mask[:, None, :, :]
  want = jax.nn.dot_product_attention(q, k, v, mask=jax_mask)
  assert_close(layers.xla_attention(q, k, v, mask), want, rel=1e-6)
  assert_close(layers.dot_product_attention(q, k, v, mask, "xla_cpu"), want, rel=1e-6)


@pytest.mark.parametrize("in_shape,out_shape,lead", [((12,), (3, 8), ()), ((3, 8), (12,), ()),
                                                    ((12,), (20,), (2,))],
                         ids=["to_heads", "from_heads", "stacked"])
def test_out_major_kernels_give_the_same_products(in_shape, out_shape, lead):
  """[out, in] storage: the same y = x W + b for head-shaped and stacked kernels, the
  logical axis names carried to the merged axes; int8 and adapted kernels untouched."""
  names = {((12,), (3, 8)): ("embed", "q_heads", "head_dim"),
           ((3, 8), (12,)): ("q_heads", "head_dim", "embed"),
           ((12,), (20,)): ("embed", "mlp")}[in_shape, out_shape]
  lin = layers.Linear(in_shape, out_shape, names, bias=True, rngs=nnx.Rngs(0))
  lin.bias[...] = jax.random.normal(jax.random.key(1), out_shape)
  if lead:
    lin.kernel = nnx.Param(jax.random.normal(jax.random.key(2), lead + in_shape + out_shape),
                           out_sharding=("layers",) + names, eager_sharding=False)
  x = jax.random.normal(jax.random.key(3), (2, 5) + in_shape)
  ref = nnx.clone(lin)
  layers.out_major_kernels(lin)
  assert lin.out_major and lin.kernel[...].shape == lead + (
      int(np.prod(out_shape)), int(np.prod(in_shape)))
  want = {((12,), (3, 8)): ("q_heads", "embed"), ((3, 8), (12,)): ("embed", "q_heads"),
          ((12,), (20,)): ("layers", "mlp", "embed")}[in_shape, out_shape]
  assert lin.kernel.get_metadata()["out_sharding"] == want
  if lead:  # a scanned layer sees one slice of the stack
    for i in range(lead[0]):
      ref_i, lin_i = nnx.clone(ref), nnx.clone(lin)
      ref_i.kernel, lin_i.kernel = nnx.Param(ref.kernel[...][i]), nnx.Param(lin.kernel[...][i])
      assert_close(lin_i(x), ref_i(x), rel=1e-6)
  else:
    assert_close(lin(x), ref(x), rel=1e-6)
  k0 = lin.kernel[...]
  layers.out_major_kernels(lin)  # idempotent
  assert lin.kernel[...] is k0
  # int8 kernels (qwix scales per output channel) and adapted ones keep their layout
  from lavida_jax.models import lora, quant
  int8, adapted = nnx.clone(ref), nnx.clone(ref)
  quant.quantize_linear(int8)
  n = int(np.prod(in_shape))
  lora.attach(adapted, jnp.ones(lead + in_shape + (2,)), jnp.ones(lead + (2,) + out_shape), 0.5)
  for m in (int8, adapted):
    k = m.kernel[...]
    layers.out_major_kernels(m)
    assert not m.out_major and m.kernel[...] is k and k.shape[-1] != n


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("masked", [False, True], ids=["all_keys", "cache_padding"])
def test_per_head_cached_attention_equals_batched(heads, kv_heads, masked):
  """Batch 1 as 2-D matmuls per kv head (XLA:CPU) == the head-batched form, with the
  prompt's left padding and a query group per kv head; batch > 1 takes the batched
  form (4 dots, not 4 per kv head)."""
  rng = np.random.default_rng(5)
  t, p, h = 6, 11, 16
  a = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q, k, v = a(2, t, heads, h), a(2, t, kv_heads, h), a(2, t, kv_heads, h)
  ck, cv = a(2, kv_heads, p, h), a(2, kv_heads, h, p)
  valid = (jnp.arange(p)[None] >= jnp.array([[3], [0]])) if masked else None
  dots = lambda *args, **kw: str(jax.make_jaxpr(
      lambda *a: layers.cached_attention(*a, **kw))(*args)).count("dot_general")
  for b in (1, 2):
    args = (q[:b], k[:b], v[:b], ck[:b], cv[:b], None if valid is None else valid[:b])
    assert_close(layers.cached_attention(*args, per_head=True),
                 layers.cached_attention(*args), rel=1e-6)
    assert dots(*args) == 4
    assert dots(*args, per_head=True) == (4 * kv_heads if b == 1 else 4)
  # and both are softmax attention over [cache, own] keys
  keys = jnp.concatenate([jnp.swapaxes(ck, 1, 2), k], axis=1)
  values = jnp.concatenate([jnp.moveaxis(cv, 3, 1), v], axis=1)
  mask = None if valid is None else jnp.concatenate([valid, jnp.ones((2, t), bool)], 1)
  want = jax.nn.dot_product_attention(q, keys, values,
                                      mask=None if mask is None else mask[:, None, None])
  assert_close(layers.cached_attention(q[:1], k[:1], v[:1], ck[:1], cv[:1],
                                       None if valid is None else valid[:1], per_head=True),
               want[:1], rel=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_query_groups_are_canvases_that_never_see_each_other(heads, kv_heads):
  """groups=3 (the lookahead's canvases side by side) == each canvas alone over the
  same cache, in the batched, per-head and head-split forms; a cache split by head
  (`split_heads`) == the unsplit one."""
  rng = np.random.default_rng(6)
  t, p, h, c = 5, 9, 16, 3
  a = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q, k, v = a(2, c * t, heads, h), a(2, c * t, kv_heads, h), a(2, c * t, kv_heads, h)
  ck, cv = a(2, kv_heads, p, h), a(2, kv_heads, h, p)
  valid = jnp.arange(p)[None] >= jnp.array([[2], [0]])
  part = lambda x, i: x[:, i * t:(i + 1) * t]
  want = jnp.concatenate([layers.cached_attention(part(q, i), part(k, i), part(v, i), ck, cv,
                                                  valid) for i in range(c)], axis=1)
  assert_close(layers.cached_attention(q, k, v, ck, cv, valid, groups=c), want, rel=1e-6)
  one = (q[:1], k[:1], v[:1])
  assert_close(layers.cached_attention(*one, ck[:1], cv[:1], valid[:1], per_head=True,
                                       groups=c), want[:1], rel=1e-6)
  split = layers.split_heads(ck[:1], cv[:1])
  assert len(split[0]) == kv_heads and split[0][0].shape == (1, p, h)
  assert_close(layers.cached_attention(*one, *split, valid[:1], groups=c), want[:1], rel=1e-6)
  assert_close(layers.cached_attention(*one, *split, valid[:1]),
               layers.cached_attention(*one, ck[:1], cv[:1], valid[:1]), rel=1e-6)
  with pytest.raises(ValueError, match="15 queries do not split into 4 groups"):
    layers.cached_attention(q, k, v, ck, cv, valid, groups=4)


def test_generator_uses_xla_cpu_attention_and_leaves_the_model(loaded):
  """On the CPU the Generator's own modules take `xla_attention` (vision and prefill)
  and, with its unrolled copy of the weights, [out, in] kernels; the model it was
  given keeps jax's attention and its own kernels, and its prefill's cache and
  logits are the model's own to fp32 rounding."""
  _, model = loaded("lavida-llada")
  cfg = sampler_lib.SamplerConfig(gen_length=8, steps=8, block_length=8,
                                  mask_id=model.cfg.lm.mask_id)
  gen = generate.Generator(model, None, cfg)
  impl = lambda m: {a.implementation for _, a in nnx.iter_modules(m)
                    if isinstance(a, layers.Attention)}
  assert impl(nnx.merge(gen.graphdef, gen.state)) == {"xla_cpu"}
  assert impl(model) == {model.cfg.lm.attention_impl}
  linears = lambda m: [a for _, a in nnx.iter_modules(m) if isinstance(a, layers.Linear)]
  assert all(a.out_major for a in linears(nnx.merge(gen.graphdef, gen.state)))
  assert not any(a.out_major for a in linears(model))
  scanned = generate.Generator(model, None, cfg, unroll_layers=False)  # no copy: as stored
  assert not any(a.out_major for a in linears(nnx.merge(scanned.graphdef, scanned.state)))
  assert model.lm.head.kernel[...].shape == (model.cfg.lm.d_model, model.cfg.lm.vocab_size)
  x = jax.random.normal(jax.random.key(0), (2, 12, model.cfg.lm.d_model))
  valid = jnp.arange(12)[None] >= jnp.array([[0], [5]])  # left padding
  (kv, logits), (kv0, h0) = gen._prefill(gen.lm_state, x, valid), model.lm.prefill(x, valid)
  assert_close(logits, model.lm.logits_from_hidden(h0[:, -1]), rel=1e-5)
  assert_close(kv.layers()[0][0], kv0.layers()[0][0], rel=1e-5)


def test_generator_splits_the_batch_one_prefix_cache_by_head(loaded, tiny_tokenizer):
  """On the CPU the prefix denoiser's setup hands the steps a cache split by head at
  batch 1 (no head slice copied per step) and the unsplit one at batch 2; its logits
  are the unsplit cache's."""
  from tests.test_generate import REQS, _cfg
  _, model = loaded("lavida-llada")
  gen = generate.Generator(model, tiny_tokenizer, _cfg(model), cache="prefix")
  den = generate.denoiser("prefix", gen.lm_graphdef, False, 4, split_heads=True)
  prompts = [generate.prompt_ids(model, tiny_tokenizer, r) for r in REQS[:2]]
  x, valid = generate.embed_prompts(model, prompts, 1024)
  cache, first = gen._prefill(gen.lm_state, x, valid)
  heads = model.cfg.lm.n_kv_heads
  canvas = jnp.full((2, 8), model.cfg.lm.mask_id, jnp.int32)
  start = jnp.zeros((2,), jnp.int32)
  for b in (1, 2):
    one = jax.tree.map(lambda a, b=b: a[:b], (cache, first))
    ops = den.setup(canvas[:b], gen.lm_state, *one)
    split = isinstance(ops[1].k[0], tuple)
    assert split == (b == 1) and (not split or len(ops[1].k[0]) == heads)
    plain = generate.denoiser("prefix", gen.lm_graphdef, False, 4).setup(
        canvas[:b], gen.lm_state, *one)
    assert_close(den.logits(canvas[:b], start[:b], None, *ops),
                 den.logits(canvas[:b], start[:b], None, *plain), rel=1e-6)


def test_generators_of_one_model_share_one_inference_copy(loaded, tiny_tokenizer):
  """A server's or harness's Generators (one per setting) and the likelihood scorer
  hold one copy of the weights, not one each; new weights get a new copy, which
  decodes from them; the copy goes with its last holder."""
  import gc
  import weakref

  from lavida_jax.lmms import likelihood

  _, loaded_model = loaded("lavida-llada")
  model = nnx.clone(loaded_model)  # its weights are replaced below
  cfg = lambda n: sampler_lib.SamplerConfig(gen_length=n, steps=n, block_length=n,
                                            mask_id=model.cfg.lm.mask_id)
  leaves = lambda state: jax.tree.leaves(state)
  a = generate.Generator(model, tiny_tokenizer, cfg(8))
  b = generate.Generator(model, tiny_tokenizer, cfg(4), cache="dual")
  scorer = likelihood.Scorer(model, tiny_tokenizer, None, mc_num=2, rows=2)
  assert all(x is y for x, y in zip(leaves(a.state), leaves(b.state)))
  assert all(x is y for x, y in zip(leaves(a.lm_state), leaves(scorer.lm_state)))
  req = [generate.Request("What colour is the circle?", None)]
  before = a(req)[0].ids
  # new weights (as after training steps): a new copy, and the old Generators keep theirs
  nnx.update(model, jax.tree.map(lambda w: -w, nnx.state(model, nnx.Param)))
  c = generate.Generator(model, tiny_tokenizer, cfg(8))
  params = lambda g: leaves(nnx.state(g._copy.model, nnx.Param))
  assert a._copy is not c._copy and not any(x is y for x, y in zip(params(a), params(c)))
  assert c(req)[0].ids == generate.Generator(model, tiny_tokenizer, cfg(8),
                                             unroll_layers=False)(req)[0].ids
  assert a(req)[0].ids == before  # its copy has its own variables: the update missed it
  assert_close(a._copy.model.lm.embed[...], -model.lm.embed[...], rel=0)
  ref = weakref.ref(a._copy)
  del a, b, scorer
  gc.collect()
  assert ref() is None
