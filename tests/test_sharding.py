"""Sharded over 8 fake devices (data x fsdp x tensor) == one device; multi-slice meshes
from fake devices that carry a slice_index."""
import dataclasses
import os
import sys

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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import cpu_demo  # noqa: E402


def test_make_mesh_sizes():
  mesh = sharding.make_mesh((2, -1, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh((2, 4, 2))
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh((-1, -1, 2))



@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What the mesh builder reads of a TPU device. Platform "fake" (not "tpu") makes
  jax's per-slice mesh keep the listed order, so the expected layout is exact."""
  id: int
  slice_index: int = 0
  platform: str = "fake"
  device_kind: str = "fake"
  coords: tuple[int, int, int] = (0, 0, 0)  # TPU chip position on the torus
  core_on_chip: int = 0


def _slices(n_slices, per_slice):
  devices = [FakeDevice(i, i // per_slice) for i in range(n_slices * per_slice)]
  return devices[per_slice:] + devices[:per_slice]  # listed out of slice order


def test_multislice_mesh_spans_slices_on_the_data_axis():
  mesh = sharding.make_mesh((2, -1, 1), _slices(2, 4), dcn_shape=(2, 1, 1))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert (slice_of[:2] == 0).all() and (slice_of[2:] == 1).all()
  # Slice s is one whole (data 2 x fsdp 2) block: its devices in its own ICI order.
  assert [d.id for d in mesh.devices[2:].flat] == [4, 5, 6, 7]
  # So each slice holds one contiguous half of the batch: only gradients cross DCN.
  rows = sharding.batch_sharding(mesh, 1).devices_indices_map((16,))
  assert {d.id: i[0].start for d, i in rows.items() if d.slice_index == 1} == {
      4: 8, 5: 10, 6: 12, 7: 14}


def test_multislice_mesh_on_another_axis():
  mesh = sharding.make_mesh((1, 2, 2), _slices(2, 4), dcn_shape=(1, 2, 1))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert (slice_of[:, :2] == 0).all() and (slice_of[:, 2:] == 1).all()


def test_multislice_mistakes_are_named():
  with pytest.raises(ValueError, match=r"spans 2 slice\(s\), but the 8 devices are in 1"):
    sharding.make_mesh((1, -1, 1), dcn_shape=(2, 1, 1))  # CPU devices: one slice
  with pytest.raises(ValueError, match="--config.dcn_mesh=2,1,1"):
    sharding.make_mesh((1, -1, 1), _slices(2, 4))  # two slices, dcn_mesh left at 1
  with pytest.raises(ValueError, match="4 devices per slice do not split"):
    sharding.make_mesh((3, -1, 1), _slices(2, 4), dcn_shape=(2, 1, 1))
  with pytest.raises(ValueError, match="needs 8 devices per slice, have 4"):
    sharding.make_mesh((2, 4, 1), _slices(2, 4), dcn_shape=(2, 1, 1))
  uneven = [FakeDevice(i, int(i >= 3)) for i in range(8)]
  with pytest.raises(ValueError, match=r"different device counts \[3, 5\]"):
    sharding.make_mesh((1, -1, 1), uneven, dcn_shape=(2, 1, 1))
  with pytest.raises(ValueError, match=">= 1"):
    sharding.make_mesh((1, -1, 1), dcn_shape=(-1, 1, 1))



def test_tpu_mesh_splits_a_torus_axis_only_when_it_must():
  # A v5p-128 as mesh building sees it (v5p reports "TPU v5"): 64 chips, a 4x4x4 torus.
  chips = [FakeDevice(i, platform="tpu", device_kind="TPU v5",
                      coords=(i % 4, i // 4 % 4, i // 16)) for i in range(64)]
  auto = (jax.sharding.AxisType.Auto,) * 3
  # tpu_v5p_128's stage-1 mesh: no product of whole torus axes is 2.
  with pytest.raises(NotImplementedError):
    jax.make_mesh((1, 32, 2), sharding.MESH_AXES, auto, devices=chips)
  mesh = sharding.make_mesh((1, 32, 2), chips)
  for pair in mesh.devices.reshape(32, 2):  # each tensor pair: torus neighbours
    assert sum(abs(a - b) for a, b in zip(pair[0].coords, pair[1].coords)) == 1
  # A layout of whole axes keeps jax.make_mesh's order (what benchmarks/README.md's AOT
  # rows were compiled with).
  for shape in ((1, 64, 1), (1, 16, 4)):
    ours = sharding.make_mesh(shape, chips).devices
    theirs = jax.make_mesh(shape, sharding.MESH_AXES, auto, devices=chips).devices
    assert [d.id for d in ours.flat] == [d.id for d in theirs.flat]

def test_train_mesh_refuses_a_micro_batch_that_does_not_split():
  from lavida_jax import train

  cfg = cpu_demo.get_config()
  cfg.mesh, cfg.train.batch_size, cfg.train.grad_accum = (2, 4, 1), 4, 2
  with pytest.raises(ValueError, match="grad_accum=1 --config.train.batch_size=8"):
    train.make_mesh(cfg)
  cfg.train.batch_size, cfg.train.grad_accum = 8, 1
  assert dict(train.make_mesh(cfg).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  cfg.dcn_mesh = (2, 1, 1)
  with pytest.raises(ValueError, match="dcn_mesh"):
    train.make_mesh(cfg)

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


def test_constrain_shards_activations_by_logical_name_under_a_mesh_only():
  mesh = sharding.make_mesh((2, 2, 2))
  x = np.zeros((8, 6, 4), np.float32)
  f = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "length", "mlp")))
  assert "sharding" not in f.lower(x).as_text().lower()  # no mesh: a no-op
  with jax.set_mesh(mesh):
    out = f(x)
  # batch -> (data, fsdp); mlp -> tensor (DEFAULT_RULES); length stays whole.
  assert out.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")
  assert out.addressable_shards[0].data.shape == (2, 6, 2)
