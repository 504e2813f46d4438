"""Meshes and logical-axis sharding (SPEC §9).

Parameters carry logical axis names (`embed`, `mlp`, `q_heads`, ...); a rules
table maps each name to mesh axes of the ('data', 'fsdp', 'tensor') mesh. A
mesh axis that does not divide a dimension is dropped for that parameter (tiny
test models on 8 devices; GQA with fewer kv heads than tensor shards). Several TPU
slices form one hybrid mesh: the config's mesh within each slice (ICI) times
`dcn_mesh` across slices (DCN), normally the data axis only.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis, a tuple of mesh axes, or None (replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    # The 400M vision tower is small: FSDP over its width, no tensor parallelism.
    ("vision_embed", "fsdp"),
    ("vision_mlp", None),
    ("vision_heads", None),
    ("vision_patches", None),
)


def constrain(x, names, rules=DEFAULT_RULES):
  """Activation sharding constraint from logical axis names (no-op without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


def _sizes(shape: dict[str, int] | Sequence[int], what: str) -> list[int]:
  sizes = [shape[a] for a in MESH_AXES] if isinstance(shape, dict) else list(shape)
  if len(sizes) != 3:
    raise ValueError(f"{what} needs 3 sizes for {MESH_AXES}, got {shape}")
  return [int(s) for s in sizes]


def make_mesh(shape: dict[str, int] | Sequence[int] = (1, -1, 1),
              devices: Sequence[jax.Device] | None = None,
              dcn_shape: dict[str, int] | Sequence[int] = (1, 1, 1)) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one size of `shape` may be -1 (the rest).

  shape: the mesh within one slice (its chips talk over ICI).
  dcn_shape: how many slices each axis spans (slices talk over the slower data-centre
    network, DCN), e.g. (2, 1, 1): two slices, data-parallel across them, so only the
    gradient all-reduce crosses DCN. The mesh is the elementwise product of the two.
  Devices carry their slice in `slice_index` (TPU); devices without it form one slice.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes, dcn = _sizes(shape, "mesh shape"), _sizes(dcn_shape, "dcn mesh shape")
  if any(s < 1 for s in dcn):
    raise ValueError(f"dcn mesh sizes must be >= 1 (slices per axis), got {dcn_shape}")
  slices: dict[int, list[jax.Device]] = {}
  for d in devices:
    slices.setdefault(getattr(d, "slice_index", 0), []).append(d)
  if math.prod(dcn) != len(slices):
    raise ValueError(
        f"dcn mesh (config.dcn_mesh) {tuple(dcn)} spans {math.prod(dcn)} slice(s), but the "
        f"{len(devices)} devices are in {len(slices)}; for data parallelism across them: "
        f"--config.dcn_mesh={len(slices)},1,1")
  per_slice = {len(ds) for ds in slices.values()}
  if len(per_slice) != 1:
    raise ValueError(f"slices have different device counts {sorted(per_slice)}; a hybrid "
                     "mesh needs equal slices")
  n = per_slice.pop()
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {shape}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise ValueError(f"{n} devices per slice do not split into mesh {shape}")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices "
                     f"per slice, have {n}")
  # allow_split_physical_axes: a torus axis is split only when no whole-axes layout
  # exists (jax.make_mesh allows it on v5e alone, so (1, 32, 2) on v5p's 4x4x4 failed);
  # meshes that fit whole axes keep jax.make_mesh's device order.
  if len(slices) == 1:
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  else:  # one topology-aware block per slice, laid out by `dcn` in slice_index order
    grid = mesh_utils.create_hybrid_device_mesh(sizes, dcn, devices,
                                                allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> P:
  """PartitionSpec for one array from its logical axis names."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    # Keep mesh axes that are unused so far and still divide the dimension.
    kept, size = [], 1
    for a in axes:
      if a not in used and dim % (size * mesh.shape[a]) == 0:
        kept.append(a)
        size *= mesh.shape[a]
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding per variable of an (abstract or concrete) nnx state."""

  def one(_, var):
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return var.replace(NamedSharding(mesh, logical_to_spec(names, var.shape, mesh, rules)))

  return nnx.map_state(one, state)


def create_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh, rules=DEFAULT_RULES):
  """Initialise a model directly sharded: no device ever holds all of it."""
  graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
  shardings = state_shardings(abstract, mesh, rules)

  init = jax.jit(lambda: nnx.state(make_model()), out_shardings=shardings)
  with jax.set_mesh(mesh):
    state = init()
  return nnx.merge(graphdef, state)


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
  """Moves an existing model's parameters onto `mesh` by their logical names."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh, rules)))


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Inputs [B, ...]: batch over the data-parallel axes, the rest replicated."""
  batch_axes = dict(rules)["batch"]
  return NamedSharding(mesh, P(batch_axes, *([None] * (ndim - 1))))

