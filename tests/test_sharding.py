"""Sharded over 8 fake devices (data x fsdp x tensor) == one device."""
import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import lavida_jax
from lavida_jax import image as image_lib
from lavida_jax import sharding
from lavida_jax.models.lavida import LaViDa, LaViDaConfig
from tests.conftest import assert_close


def test_make_mesh_sizes():
  mesh = sharding.make_mesh((2, -1, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh((2, 4, 2))
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh((-1, -1, 2))


def test_logical_rules_drop_axes_that_do_not_divide():
  mesh = sharding.make_mesh((2, 2, 2))
  spec = sharding.logical_to_spec(("embed", "q_heads", "head_dim"), (64, 7, 16), mesh)
  assert tuple(spec) == ("fsdp", None, None)
  spec = sharding.logical_to_spec(("batch", "length"), (4, 9), mesh)
  assert tuple(spec) == (("data", "fsdp"), None)


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream"])
def test_sharded_logits_equal_single_device(reference_checkpoint, loaded, family):
  _, folder = reference_checkpoint(family)
  _, single = loaded(family)
  mesh = sharding.make_mesh((2, 2, 2))
  model = lavida_jax.load_pretrained(folder, mesh=mesh)
  q = model.lm.blocks.attn.q.kernel[...]
  assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
  rng = np.random.default_rng(0)
  img = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
  images = [image_lib.process_anyres(img, model.cfg.image)] * 4
  ids = np.array([[1, -200, 2, 3]] * 4)
  with jax.set_mesh(mesh):
    ours = model.logits(ids, images)
  assert_close(ours, single.logits(ids, images), rel=1e-5)


def test_init_is_created_sharded():
  cfg = LaViDaConfig.create("lavida-llada", "tiny")
  mesh = sharding.make_mesh((1, 4, 2))
  model = sharding.create_sharded(lambda: LaViDa(cfg, rngs=nnx.Rngs(0)), mesh)
  embed = model.lm.embed[...]
  assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert embed.addressable_shards[0].data.shape == (128, 16)
  # The same values as an unsharded init (jitted: XLA keeps only what embed needs).
  same = jax.jit(lambda: LaViDa(cfg, rngs=nnx.Rngs(0)).lm.embed[...])()
  np.testing.assert_allclose(np.asarray(embed), np.asarray(same), rtol=1e-6)


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream", "llada-v"])
def test_every_parameter_has_logical_axis_names(family):
  cfg = LaViDaConfig.create(family, "tiny")
  state = nnx.state(nnx.eval_shape(lambda: LaViDa(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  known = {name for name, _ in sharding.DEFAULT_RULES}
  for path, var in nnx.to_flat_state(state):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(var.shape), path
    assert set(names) - {None} <= known, (path, names)
    stacked = "blocks" in path
    assert (names[0] == "layers") == stacked, (path, names)
