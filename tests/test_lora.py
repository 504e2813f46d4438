"""LoRA adapters: the closed form, merge == unmerged, targets and axes, and a train step
that changes the adapters alone (their optimizer state alone)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lavida_jax import optimizer, train_step
from lavida_jax.models import layers, lora
from lavida_jax.models.lavida import LaViDa, LaViDaConfig
from tests.test_train_step import CFG, SC, _batch

LCFG = lora.LoRAConfig(rank=4, alpha=8.0)


@functools.cache
def _cached_graph_state():
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: LaViDa(CFG, rngs=nnx.Rngs(0))))
  return graphdef, jax.jit(lambda: nnx.state(LaViDa(CFG, rngs=nnx.Rngs(0))))()


def _graph_state():
  """The tiny model's graphdef and a state of its own Variables (merging the cached
  state itself would share its Variables, and a test's in-place update would leak)."""
  graphdef, state = _cached_graph_state()
  return graphdef, jax.tree.map(lambda x: x, state)


def _model(targets=lora.LM_TARGETS, random_b=True, dropout=0.0):
  """The tiny model (a fresh copy) with adapters; B random so that they do something."""
  model = nnx.merge(*_graph_state())
  cfg = lora.LoRAConfig(LCFG.rank, LCFG.alpha, dropout, tuple(targets))
  lora.add_adapters(model, cfg, seed=1)
  if random_b:
    for i, (_, linear) in enumerate(lora.adapted(model)):
      b = linear.lora_b[...]
      linear.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), b.shape, b.dtype)
  return model


def test_fresh_adapter_changes_nothing():
  """PEFT's init (B = 0): the adapted model's logits are the base's, bit for bit."""
  ids = np.random.default_rng(0).integers(0, 250, (2, 9))
  base = nnx.merge(*_graph_state())
  adapted = _model(random_b=False)
  np.testing.assert_array_equal(np.asarray(adapted.lm(ids)), np.asarray(base.lm(ids)))


def test_linear_closed_form_heads_layout():
  """q: kernel [D, N, H]; y = x W + (alpha / r) (x A) B, A [D, r], B [r, N, H]."""
  model = _model()
  q = model.lm.blocks.attn.q
  w, a, b = (np.asarray(v[...][0], np.float64) for v in (q.kernel, q.lora_a, q.lora_b))
  x = np.random.default_rng(1).normal(size=(3, w.shape[0]))
  layer0 = jax.tree.map(lambda v: v[0], nnx.state(q))
  y = nnx.merge(nnx.graphdef(q), layer0)(jnp.asarray(x, jnp.float32))
  d, n, h = w.shape
  want = (x @ w.reshape(d, n * h) + 2.0 * (x @ a) @ b.reshape(4, n * h)).reshape(3, n, h)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
  assert a.shape == (d, 4) and b.shape == (4, n, h)


@pytest.mark.parametrize("targets", [lora.LM_TARGETS, ("q", "v", "projector", "vision")])
def test_merge_equals_unmerged_forward(targets):
  """merge() folds scale A B into each kernel: the same logits with images, no adapters."""
  from tests.test_train_step import _batch
  batch = jax.tree.map(jnp.asarray, _batch(2))
  model = _model(targets)

  def logits(m):
    x = m.embed_packed(batch["input_ids"], batch["pixel_values"], batch["image_index"],
                       batch["image_weight"])
    return np.asarray(m.lm.logits_from_hidden(m.lm.hidden(x)))

  before = logits(model)
  base = logits(nnx.merge(*_graph_state()))
  lora.merge(model)
  assert not lora.adapted(model) and not jax.tree.leaves(nnx.state(model, lora.LoRAParam))
  after = logits(model)
  assert np.abs(before - base).max() > 1e-2  # the adapters do change the logits
  np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


def test_targets_and_logical_axes():
  model = _model(("q", "down", "projector", "vision"))
  paths = {"/".join(p) for p, _ in lora.adapted(model)}
  assert paths == {"lm/blocks/attn/q", "lm/blocks/mlp/down", "projector/fc1", "projector/fc2",
                   "vision/blocks/attn/q", "vision/blocks/attn/k", "vision/blocks/attn/v",
                   "vision/blocks/attn/o", "vision/blocks/mlp/fc1", "vision/blocks/mlp/fc2"}
  q = model.lm.blocks.attn.q
  assert q.lora_a.get_metadata()["out_sharding"] == ("layers", "embed", "lora_rank")
  assert q.lora_b.get_metadata()["out_sharding"] == ("layers", "lora_rank", "q_heads",
                                                     "head_dim")
  o = model.vision.blocks.attn.o
  assert o.lora_a[...].shape[-1] == 4 and o.lora_a[...].ndim == 4  # [L, N, H, r]
  for _, v in nnx.to_flat_state(nnx.state(model, lora.LoRAParam)):
    names = v.get_metadata()["out_sharding"]
    assert len(names) == v.get_value().ndim and v.get_value().dtype == jnp.float32


def test_bad_configs_are_refused_by_name():
  with pytest.raises(ValueError, match="unknown LoRA target.*'qkv'"):
    lora.LoRAConfig(4, 8.0, targets=("qkv",))
  with pytest.raises(ValueError, match="rank is 0"):
    lora.LoRAConfig(0, 8.0)
  model = _model(("q",))
  with pytest.raises(ValueError, match="lm/blocks/attn/q already has"):
    lora.add_adapters(model, lora.LoRAConfig(4, 8.0, targets=("q",)))


def test_train_step_changes_only_the_adapters():
  """adapters_only: the params are the adapters (fp32) over a bf16 base; one step moves
  every adapter and no base weight; the optimizer state is the adapters' shape alone."""
  model = _model(random_b=False)
  # The base in bf16, the adapters stay fp32.
  base_state = nnx.state(model, nnx.Not(lora.LoRAParam))
  nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16)
                                 if x.dtype == jnp.float32 else x, base_state))
  groups = ("projector", "lm")
  graphdef, params, frozen = train_step.split_params(model, groups, adapters_only=True)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  assert leaves and all(str(p[-1].key) in ("lora_a", "lora_b") for p, _ in leaves)
  assert all(x.dtype == jnp.float32 for _, x in leaves)
  tx, scheds = optimizer.make_optimizer({g: 1e-2 for g in groups}, 10)
  opt_state = tx.init(params)
  n_adapter = sum(x.size for x in jax.tree.leaves(params))
  assert sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim) == 2 * n_adapter  # mu, nu
  state = dict(step=jnp.int32(0), params=params, frozen=frozen, opt_state=opt_state,
               rng=jax.random.key(0))
  step = jax.jit(functools.partial(train_step.train_step, graphdef=graphdef, tx=tx, sc=SC,
                                   schedules=scheds))
  new, _ = step(state, jax.tree.map(jnp.asarray, _batch(2)))  # optax's warmup: lr 0 at 0
  new, metrics = step(new, jax.tree.map(jnp.asarray, _batch(2, seed=1)))
  assert np.isfinite(float(metrics["loss"]))
  for (path, old), new_leaf in zip(leaves, jax.tree.leaves(new["params"])):
    if str(path[-1].key) == "lora_b":  # B = 0 at init: its gradient is x A (nonzero)
      assert np.abs(np.asarray(new_leaf - old)).max() > 0, path
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), frozen, new["frozen"])
  assert all(jax.tree.leaves(same))


def test_dropout_changes_training_forward_only():
  """With a dropout key (set by the train step) the adapter path drops inputs; without
  one (inference) the forward is deterministic and equal to the no-dropout model."""
  ids = np.random.default_rng(2).integers(0, 250, (1, 7))
  plain = np.asarray(_model(dropout=0.0).lm(ids))
  model = _model(dropout=0.5)
  np.testing.assert_array_equal(np.asarray(model.lm(ids)), plain)
  lora.set_dropout_keys(model, jax.random.key(0))
  dropped = np.asarray(model.lm(ids))
  assert np.abs(dropped - plain).max() > 1e-3


def test_int8_base_takes_adapters_but_not_merge():
  """QLoRA: an int8 base (quant.py) with fp32 adapters computes int8 x W + scale x A B."""
  from lavida_jax.models import quant
  ids = np.random.default_rng(3).integers(0, 250, (1, 7))
  model = _model(random_b=False)
  quant.quantize_lm(model)
  base_q = np.asarray(model.lm(ids))
  for i, (_, linear) in enumerate(lora.adapted(model)):
    b = linear.lora_b[...]
    linear.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), b.shape, b.dtype)
  assert np.abs(np.asarray(model.lm(ids)) - base_q).max() > 1e-2
  assert model.lm.blocks.attn.q.kernel[...].dtype == jnp.int8
  with pytest.raises(ValueError, match="int8 kernel"):
    lora.merge(model)


def test_configs():
  """base: rank 0 = no LoRA; the demo's LoRA config: LM targets, base from model.init."""
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
  import base
  import cpu_demo_lora
  assert lora.LoRAConfig.from_config(base.base().lora) is None
  c = cpu_demo_lora.get_config()
  cfg = lora.LoRAConfig.from_config(c.lora)
  assert cfg.targets == lora.LM_TARGETS and cfg.scale == c.lora.alpha / c.lora.rank
  from lavida_jax import train
  assert train.trained_groups(c) == (("lm",), {"lm": 5e-3})
  assert c.model.init == "/tmp/lavida_jax_demo/checkpoints"
  assert "exists" in c.data.demo_kinds.split(",")


def test_adapter_groups_take_their_own_rates():
  """lora.lr for every group holding adapters, lora.lr_projector / lr_vision where set."""
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
  import base
  from lavida_jax import train
  c = base.base()
  c.lora.rank, c.lora.lr, c.lora.targets = 4, 5e-3, "q,v,projector,vision"
  assert train.trained_groups(c) == (("vision", "projector", "lm"),
                                     {"vision": 5e-3, "projector": 5e-3, "lm": 5e-3})
  c.lora.lr_vision = 5e-4
  assert train.trained_groups(c)[1] == {"vision": 5e-4, "projector": 5e-3, "lm": 5e-3}
  c.lora.targets = "q,v"  # no adapters on the tower: no vision group, whatever its rate
  assert train.trained_groups(c) == (("lm",), {"lm": 5e-3})


@pytest.mark.parametrize("int8", [False, True])
def test_train_loss_sees_the_head_as_the_forward_does(int8):
  """The train step's chunked cross-entropy contracts with `head.dense_kernel()`: the
  same logits as `head(h)` for an adapted head and for an int8 one (QLoRA), whose raw
  int8 values would be off by 1/scale; and the CE equals the logits' own."""
  from lavida_jax.diffusion import loss as loss_lib
  from lavida_jax.models import quant
  model = _model(lora.LM_TARGETS + ("head",), random_b=not int8)
  head = model.lm.head
  assert head.lora_a is not None and "lm/head" in {"/".join(p) for p, _ in lora.adapted(model)}
  if int8:
    quant.quantize_lm(model)
    assert head.kernel[...].dtype == jnp.int8 and head.kernel_scale is not None
    head.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(7), head.lora_b[...].shape)
  h = jax.random.normal(jax.random.key(1), (6, head.in_shape[0]))
  np.testing.assert_allclose(h @ head.dense_kernel(), head(h), rtol=1e-4, atol=1e-4)
  targets = jnp.arange(6) * 7
  logits = np.asarray(head(h), np.float64)
  want = np.log(np.exp(logits).sum(-1)) - logits[np.arange(6), np.asarray(targets)]
  ce = loss_lib.chunked_cross_entropy(h, head.dense_kernel(), targets, 64)
  np.testing.assert_allclose(ce, want, rtol=1e-4)
  assert np.abs(np.asarray(h @ head.dense_kernel()) -
                np.asarray(h @ head.kernel[...].astype(jnp.float32))).max() > 1e-2


def test_qlora_train_loss_equals_the_dequantized_models():
  """The train step's loss on an int8 base (QLoRA, adapters on q..down and the head)
  equals its loss on a float copy holding the same int8 values times their scales:
  every int8 kernel, the LM head's too (the chunked cross-entropy's), is dequantized."""
  from lavida_jax.models import quant
  targets = lora.LM_TARGETS + ("head",)
  q_model, f_model = _model(targets), _model(targets)
  quant.quantize_lm(q_model)
  for (_, q), (_, f) in zip(lora.linears(q_model), lora.linears(f_model)):
    if q.kernel_scale is not None:
      f.kernel[...] = q.kernel[...].astype(jnp.float32) * q.kernel_scale[...]
  batch = jax.tree.map(jnp.asarray, _batch(2))

  def loss(model):
    graphdef, params, frozen = train_step.split_params(model, ("lm",), adapters_only=True)
    return float(train_step.loss_fn(params, frozen, graphdef, batch, jax.random.key(0), SC)[0])

  want = loss(f_model)
  assert loss(q_model) == pytest.approx(want, rel=1e-4)
  assert abs(loss(_model(targets)) - want) > 1e-4  # int8 rounding does show
