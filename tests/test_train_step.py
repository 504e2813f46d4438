"""The jitted train step: loss value, freezing, accumulation, 1 vs 8 devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from lavida_jax import image as image_lib
from lavida_jax import optimizer, sharding, train_step
from lavida_jax.data import packing
from lavida_jax.models.lavida import LaViDa, LaViDaConfig

CFG = LaViDaConfig.create("lavida-llada", "tiny", image_size=112)  # 8x8 patches: fast


def _batch(b=4, length=None, seed=0):
  rng = np.random.default_rng(seed)
  rows, pix = [], []
  for i in range(b):
    img = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    pixels, size = image_lib.process_anyres(img, CFG.image)
    pixels, view_mask = image_lib.pad_views(pixels, CFG.image.max_views)
    q = rng.integers(1, 200, 4)
    a = rng.integers(1, 200, 3)
    ids = np.concatenate([[1, -200], q, a])
    labels = np.concatenate([[-100] * 6, a])
    rows.append(packing.pack_example(ids, labels, size, CFG, length or 80, 254,
                                     CFG.image.max_views))
    pix.append((pixels, view_mask))
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  batch["pixel_values"] = np.stack([p for p, _ in pix])
  batch["view_mask"] = np.stack([m for _, m in pix])
  return batch


@functools.cache
def _model():
  """Initialised once, jitted (eager NNX init runs op by op and is slow)."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: LaViDa(CFG, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(LaViDa(CFG, rngs=nnx.Rngs(0))))())


def _state(groups=("projector", "lm"), steps=10, lr=1e-2):
  model = _model()
  graphdef, params, frozen = train_step.split_params(model, groups)
  tx, scheds = optimizer.make_optimizer({g: lr for g in groups}, steps)
  state = dict(step=jnp.int32(0), params=params, frozen=frozen, opt_state=tx.init(params),
               rng=jax.random.key(0))
  return graphdef, tx, scheds, state


SC = train_step.StepConfig(mask_id=CFG.lm.mask_id, vocab_chunk=100)


def test_loss_equals_hand_computed_value():
  """Fixed masks: the loss is the mean CE of full logits at the masked positions."""
  graphdef, _, _, state = _state()
  batch = jax.tree.map(jnp.asarray, _batch(2))
  rng = jax.random.key(3)
  loss, metrics = jax.jit(functools.partial(train_step.loss_fn, graphdef=graphdef, sc=SC))(
      state["params"], state["frozen"], batch=batch, rng=rng)
  from lavida_jax.diffusion import masking

  @jax.jit
  def full_logits(params, frozen):
    model = nnx.merge(graphdef, nnx.State(params), nnx.State(frozen))
    x = model.embed_packed(batch["input_ids"], batch["pixel_values"], batch["image_index"],
                           batch["image_weight"])
    e = model.lm.embed[...][CFG.lm.mask_id]
    return [model.lm.logits_from_hidden(model.lm.hidden(jnp.where(m[..., None], e, x)))
            for m in (m1, m2)]

  eligible = masking.eligible_positions(batch["labels"])
  m1, m2, _ = masking.complementary_masks(rng, eligible, SC.eps)
  ces = []
  for m, logits in zip((m1, m2), full_logits(state["params"], state["frozen"])):
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    labels = np.asarray(batch["labels"])
    picked = np.take_along_axis(logp, np.maximum(labels, 0)[..., None], -1)[..., 0]
    ces.append(-picked[np.asarray(m)])
  expected = np.concatenate(ces).mean()
  assert int(metrics["n_masked"]) == int(eligible.sum())  # each label predicted exactly once
  np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


def test_training_lowers_loss_and_frozen_parameters_do_not_change():
  graphdef, tx, scheds, state = _state(groups=("projector",), steps=20, lr=3e-2)
  frozen_before = jax.tree.map(np.asarray, state["frozen"])
  step = jax.jit(functools.partial(train_step.train_step, graphdef=graphdef, tx=tx, sc=SC,
                                   schedules=scheds))
  batch = jax.tree.map(jnp.asarray, _batch(2))
  losses = []
  for _ in range(12):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert set(state["params"]) == {"projector", "image_newline"}
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  jax.tree.map(np.testing.assert_array_equal, frozen_before,
               jax.tree.map(np.asarray, state["frozen"]))


def test_gradient_accumulation_matches_one_big_batch_for_plain_grads():
  """With accumulation the update uses the mean of micro-batch gradients."""
  graphdef, tx, _, state = _state()
  batch = jax.tree.map(jnp.asarray, _batch(4))
  sc2 = train_step.StepConfig(mask_id=CFG.lm.mask_id, vocab_chunk=100, grad_accum=2)
  new, metrics = jax.jit(functools.partial(train_step.train_step, graphdef=graphdef, tx=tx,
                                           sc=sc2))(state, batch)
  rng = jax.random.fold_in(state["rng"], 0)
  grad = jax.jit(jax.grad(lambda p, mb, r: train_step.loss_fn(
      p, state["frozen"], graphdef, mb, r, sc2)[0]))
  grads = [grad(state["params"], jax.tree.map(lambda x: x[2 * i:2 * i + 2], batch),
                jax.random.fold_in(rng, i)) for i in range(2)]
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax_norm(mean)), rtol=1e-4)


def optax_norm(tree):
  import optax
  return optax.tree.norm(tree)


def test_three_steps_same_losses_on_one_and_eight_devices():
  batch = _batch(4)
  losses = {}
  for name, shape in (("one", None), ("eight", (2, 2, 2))):
    graphdef, tx, _, state = _state()
    step = functools.partial(train_step.train_step, graphdef=graphdef, tx=tx, sc=SC)
    if shape is None:
      run, b = jax.jit(step), jax.tree.map(jnp.asarray, batch)
    else:
      mesh = sharding.make_mesh(shape)
      state = jax.device_put(state, _state_shardings(graphdef, state, mesh))
      b = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
      run = jax.jit(step, donate_argnums=0)
    out = []
    for _ in range(3):
      state, metrics = run(state, b)
      out.append(float(metrics["loss"]))
    losses[name] = out
  np.testing.assert_allclose(losses["one"], losses["eight"], rtol=2e-4)


def _state_shardings(graphdef, state, mesh):
  from jax.sharding import NamedSharding, PartitionSpec as P
  rep = NamedSharding(mesh, P())
  model = nnx.merge(graphdef, nnx.State(state["params"]), nnx.State(state["frozen"]))
  specs = sharding.state_shardings(nnx.state(model), mesh)
  flat = {path: v.get_value() for path, v in nnx.to_flat_state(specs)}
  by_path = lambda tree: jax.tree_util.tree_map_with_path(
      lambda p, _: flat[tuple(k.key for k in p)], tree)
  return dict(step=rep, params=by_path(state["params"]), frozen=by_path(state["frozen"]),
              opt_state=jax.tree.map(lambda _: rep, state["opt_state"]), rng=rep)
