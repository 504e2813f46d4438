"""Hugging Face (PyTorch) checkpoints of LaViDa-L, LaViDa-D and LLaDA-V (SPEC §8).

Each family is one table of rows (hf_name, our_path, transform): `{i}` in a
name is the layer index, and those tensors stack on our leading 'layers'
axis. Transforms turn PyTorch layouts into ours (Linear [out, in] -> kernel
[in, out], heads split out of the projection widths, Conv2d OIHW -> HWIO).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from lavida_jax import image as image_lib
from lavida_jax import sharding as sharding_lib
from lavida_jax.checkpoint import hub
from lavida_jax.checkpoint.shards import Checkpoint, CheckpointError
from lavida_jax.models import connector
from lavida_jax.models.lavida import LaViDa, LaViDaConfig
from lavida_jax.models.lm import LMConfig
from lavida_jax.models.siglip import SiglipConfig

# --- layout transforms: HF array -> ours, given our shape; and our shape -> HF shape ---

TO_OURS = {
    "none": lambda x, shape: x,
    "linear": lambda x, shape: x.T,
    "heads_in": lambda x, shape: x.T.reshape(shape),  # [N*H, D] -> [D, N, H]
    "heads_out": lambda x, shape: x.T.reshape(shape),  # [D, N*H] -> [N, H, D]
    "heads_bias": lambda x, shape: x.reshape(shape),  # [N*H] -> [N, H]
    "conv": lambda x, shape: x.transpose(2, 3, 1, 0),  # [O, I, kh, kw] -> [kh, kw, I, O]
}
HF_SHAPE = {
    "none": lambda s: tuple(s),
    "linear": lambda s: (s[1], s[0]),
    "heads_in": lambda s: (math.prod(s[1:]), s[0]),
    "heads_out": lambda s: (s[-1], math.prod(s[:-1])),
    "heads_bias": lambda s: (math.prod(s),),
    "conv": lambda s: (s[3], s[2], s[0], s[1]),
}
# ours -> HF array (the inverse of TO_OURS): exact, only reshapes and transposes.
TO_HF = {
    "none": lambda x: x,
    "linear": lambda x: x.T,
    "heads_in": lambda x: x.reshape(x.shape[0], -1).T,  # [D, N, H] -> [N*H, D]
    "heads_out": lambda x: x.reshape(-1, x.shape[-1]).T,  # [N, H, D] -> [D, N*H]
    "heads_bias": lambda x: x.reshape(-1),  # [N, H] -> [N*H]
    "conv": lambda x: x.transpose(3, 2, 0, 1),  # [kh, kw, I, O] -> [O, I, kh, kw]
}

_SIGLIP = "model.vision_tower.vision_tower.vision_model."
VISION_ROWS = [
    (_SIGLIP + "embeddings.patch_embedding.weight", "vision/patch/kernel", "conv"),
    (_SIGLIP + "embeddings.patch_embedding.bias", "vision/patch/bias", "none"),
    (_SIGLIP + "embeddings.position_embedding.weight", "vision/pos_embed", "none"),
    *[(_SIGLIP + f"encoder.layers.{{i}}.self_attn.{p}_proj.weight",
       f"vision/blocks/attn/{p}/kernel", "heads_in") for p in "qkv"],
    *[(_SIGLIP + f"encoder.layers.{{i}}.self_attn.{p}_proj.bias",
       f"vision/blocks/attn/{p}/bias", "heads_bias") for p in "qkv"],
    (_SIGLIP + "encoder.layers.{i}.self_attn.out_proj.weight", "vision/blocks/attn/o/kernel",
     "heads_out"),
    (_SIGLIP + "encoder.layers.{i}.self_attn.out_proj.bias", "vision/blocks/attn/o/bias", "none"),
    *[(_SIGLIP + f"encoder.layers.{{i}}.layer_norm{n}.{w}", f"vision/blocks/norm{n}/{o}", "none")
      for n in (1, 2) for w, o in (("weight", "scale"), ("bias", "bias"))],
    *[(_SIGLIP + f"encoder.layers.{{i}}.mlp.{fc}.weight", f"vision/blocks/mlp/{fc}/kernel",
       "linear") for fc in ("fc1", "fc2")],
    *[(_SIGLIP + f"encoder.layers.{{i}}.mlp.{fc}.bias", f"vision/blocks/mlp/{fc}/bias", "none")
      for fc in ("fc1", "fc2")],
    (_SIGLIP + "post_layernorm.weight", "vision/post_norm/scale", "none"),
    (_SIGLIP + "post_layernorm.bias", "vision/post_norm/bias", "none"),
    ("model.mm_projector.0.weight", "projector/fc1/kernel", "linear"),
    ("model.mm_projector.0.bias", "projector/fc1/bias", "none"),
    ("model.mm_projector.2.weight", "projector/fc2/kernel", "linear"),
    ("model.mm_projector.2.bias", "projector/fc2/bias", "none"),
    ("model.image_newline", "image_newline", "none"),
]

_LM_BLOCK = [  # our block path, transform; the names per family follow
    ("attn_norm/scale", "none"), ("attn/q/kernel", "heads_in"), ("attn/k/kernel", "heads_in"),
    ("attn/v/kernel", "heads_in"), ("attn/o/kernel", "heads_out"), ("mlp_norm/scale", "none"),
    ("mlp/gate/kernel", "linear"), ("mlp/up/kernel", "linear"), ("mlp/down/kernel", "linear"),
]
_OLMO_NAMES = ["attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj",
               "up_proj", "ff_out"]
_LLAMA_NAMES = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                "mlp.down_proj"]


def _lm_rows(prefix: str, names: list[str], embed: str, final_norm: str, head: str):
  rows = [(f"{prefix}.{{i}}.{n}.weight", f"lm/blocks/{p}", t)
          for n, (p, t) in zip(names, _LM_BLOCK)]
  return rows + [(embed, "lm/embed", "none"), (final_norm, "lm/final_norm/scale", "none"),
                 (head, "lm/head/kernel", "linear")]


_LLAMA_LM = _lm_rows("model.layers", _LLAMA_NAMES, "model.embed_tokens.weight",
                     "model.norm.weight", "lm_head.weight")
KEY_TABLES: dict[str, list[tuple[str, str, str]]] = {
    "lavida-llada": VISION_ROWS + _lm_rows(
        "model.transformer.blocks", _OLMO_NAMES, "model.transformer.wte.weight",
        "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"),
    "llada-v": VISION_ROWS + _LLAMA_LM,
    "lavida-dream": VISION_ROWS + _LLAMA_LM + [
        (f"model.layers.{{i}}.self_attn.{p}_proj.bias", f"lm/blocks/attn/{p}/bias", "heads_bias")
        for p in "qkv"],
}


# --- config.json -> LaViDaConfig ------------------------------------------------------

def detect_family(raw: dict) -> str:
  """LaViDa-L and LLaDA-V share model_type 'llava_llada': OLMo vs LLaMA field names."""
  model_type = raw.get("model_type")
  if model_type == "llava_dream":
    return "lavida-dream"
  if model_type == "llava_llada":
    return "lavida-llada" if "d_model" in raw else "llada-v"
  raise CheckpointError(f"unknown model family: config.json has model_type {model_type!r}; "
                        "expected 'llava_llada' (LaViDa-L, LLaDA-V) or 'llava_dream' (LaViDa-D)")


def _need(raw: dict, key: str, where: str):
  if key not in raw or raw[key] is None:
    raise CheckpointError(f"{where}: config.json lacks field {key!r}")
  return raw[key]


def parse_pinpoints(value, size: int) -> tuple[tuple[int, int], ...]:
  """[[w, h], ...] pixel pairs, or LLaVA-OneVision's '(1x1),...,(6x6)' grid range."""
  if isinstance(value, str):
    grids = [tuple(map(int, g)) for g in re.findall(r"\((\d+)x(\d+)\)", value)]
    if len(grids) < 2:
      raise CheckpointError(f"cannot parse image_grid_pinpoints {value!r}")
    (i0, j0), (i1, j1) = grids[0], grids[-1]
    return tuple((i * size, j * size) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1))
  return tuple((int(w), int(h)) for w, h in value)


# --- the vision tower's geometry (SPEC §13) ---------------------------------------------

# The base towers the released models name (their config.json; LaViDa deletes the last
# of these layers): LaViDa's SigLIP and LLaDA-V's SigLIP2, the same module shape.
_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
               num_attention_heads=16, image_size=384, patch_size=14, layer_norm_eps=1e-6)
KNOWN_TOWERS = {"google/siglip-so400m-patch14-384": _SO400M,
                "google/siglip2-so400m-patch14-384": _SO400M}
_VISION_LAYER = re.compile(re.escape(_SIGLIP) + r"encoder\.layers\.(\d+)\.")


def _siglip_config(vc: dict, minus: int, source: str) -> SiglipConfig:
  try:
    return SiglipConfig(
        image_size=int(vc["image_size"]), patch_size=int(vc["patch_size"]),
        width=int(vc["hidden_size"]), depth=int(vc["num_hidden_layers"]) - minus,
        mlp_dim=int(vc["intermediate_size"]), num_heads=int(vc["num_attention_heads"]),
        eps=float(vc.get("layer_norm_eps", 1e-6)))
  except KeyError as e:
    raise CheckpointError(f"{source} lacks vision field {e.args[0]!r}") from None


def _tower_folders(tower: str, folder: str | None) -> list[str]:
  """Where a local `mm_vision_tower` may lie, in order: absolute; beside the
  checkpoint folder (as LaViDa's training output and a downloaded pair of repos lie;
  also under the id's last part); inside it; relative to the working directory."""
  if os.path.isabs(tower):
    return [tower]
  found = []
  if folder is not None and os.path.isdir(folder):
    parent = os.path.dirname(os.path.abspath(folder))
    found += [os.path.join(parent, tower), os.path.join(parent, os.path.basename(tower)),
              os.path.join(folder, tower)]
  return found + [os.path.abspath(tower)]


def resolve_vision(raw: dict, folder: str | None = None) -> tuple[SiglipConfig, str]:
  """(SiglipConfig, where its sizes came from), as LaViDa builds its tower.

  In order: `vision_config` in config.json (our exports: the kept layers); the
  base SigLIP named by `mm_vision_tower` as a local folder holding its config.json
  (flat, or nested under `vision_config` as SiglipConfig writes it), minus the last
  layer; the same from the local Hugging Face cache (never downloads); the built-in
  sizes of the towers the released models name; else an error naming the ways to
  supply it. Heads are not visible in tensor shapes, so they must come from one of
  these, never from a guess.
  """
  if raw.get("vision_config"):
    return _siglip_config(raw["vision_config"], 0, "config.json vision_config"), (
        "vision_config in config.json")
  tower = raw.get("mm_vision_tower") or raw.get("vision_tower")
  where = folder or "checkpoint"
  if not tower:
    raise CheckpointError(f"{where}: config.json has neither vision_config nor "
                          "mm_vision_tower; add one of them (the base SigLIP's id or folder)")
  for path in _tower_folders(tower, folder):
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
      with open(config_path) as f:
        base = json.load(f)
      return _siglip_config(base.get("vision_config") or base, 1, config_path), (
          f"mm_vision_tower folder {path} (its config.json, minus the last layer)")
  cached = hub.cached_file(tower, "config.json")
  if cached is not None:
    with open(cached) as f:
      base = json.load(f)
    return _siglip_config(base.get("vision_config") or base, 1, cached), (
        f"mm_vision_tower {tower} in the Hugging Face cache ({cached}, minus the last layer)")
  if tower in KNOWN_TOWERS:
    return _siglip_config(KNOWN_TOWERS[tower], 1, tower), (
        f"built-in sizes of {tower} (minus the last layer)")
  raise CheckpointError(
      f"{where}: cannot size the vision tower: config.json's mm_vision_tower {tower!r} is not "
      "a local folder with a config.json (absolute, beside or inside the checkpoint, or "
      "relative to the working directory), not in the Hugging Face cache "
      f"({hub.cache_dir()}), and not a known tower ({', '.join(KNOWN_TOWERS)}); put the "
      "base SigLIP folder beside the checkpoint, download it into the cache "
      f"(huggingface-cli download {tower} config.json), or add a vision_config to config.json")


def check_vision_depth(vision: SiglipConfig, source: str, ckpt: Checkpoint, where: str):
  """The tower's layer count (from a config) against the checkpoint's encoder.layers.N."""
  found = {int(m.group(1)) for k in ckpt.keys() if (m := _VISION_LAYER.match(k))}
  depth = max(found) + 1 if found else 0
  if depth != vision.depth:
    raise CheckpointError(
        f"{where}: the checkpoint has {depth} vision encoder layers "
        f"({_SIGLIP}encoder.layers.N), but {source} gives {vision.depth}")


def config_from_hf(raw: dict, ckpt: Checkpoint | None = None, where: str = "checkpoint",
                   **overrides) -> LaViDaConfig:
  family = detect_family(raw)
  need = lambda k: _need(raw, k, where)
  if family == "lavida-llada":
    n_heads = need("n_heads")
    lm = LMConfig.llada_8b(
        d_model=need("d_model"), n_layers=need("n_layers"), n_heads=n_heads,
        n_kv_heads=raw.get("n_kv_heads") or n_heads, head_dim=need("d_model") // n_heads,
        mlp_dim=raw.get("mlp_hidden_size") or need("mlp_ratio") * need("d_model"),
        vocab_size=raw.get("embedding_size") or need("vocab_size"),
        rope_theta=float(raw.get("rope_theta", 10000.0)), norm_eps=raw.get("rms_norm_eps", 1e-5),
        mask_id=raw.get("mask_token_id", 126336), eos_id=raw.get("eos_token_id", 126081),
        max_length=raw.get("max_sequence_length", 4096))
  else:
    make = LMConfig.dream_7b if family == "lavida-dream" else LMConfig.llada_8b
    n_heads = need("num_attention_heads")
    lm = make(
        d_model=need("hidden_size"), n_layers=need("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=raw.get("num_key_value_heads") or n_heads,
        head_dim=raw.get("head_dim") or need("hidden_size") // n_heads,
        mlp_dim=need("intermediate_size"), vocab_size=need("vocab_size"),
        rope_theta=float(raw.get("rope_theta", 10000.0)), norm_eps=need("rms_norm_eps"),
        **({"mask_id": raw["mask_token_id"]} if raw.get("mask_token_id") is not None else {}),
        **({"eos_id": raw["eos_token_id"]} if isinstance(raw.get("eos_token_id"), int) else {}),
        **({"max_length": raw["max_position_embeddings"]}
           if raw.get("max_position_embeddings") is not None else {}))
  if lm.max_length is not None and (type(lm.max_length) is not int or lm.max_length < 1):
    raise CheckpointError(f"{where}: config.json's context length {lm.max_length!r} is not a "
                          "positive integer")
  if ckpt is not None:  # the input embedding may be narrower than the head (SPEC §13)
    embed_key = [r for r in KEY_TABLES[family] if r[1] == "lm/embed"][0][0]
    if embed_key in ckpt and ckpt.shape(embed_key)[0] != lm.vocab_size:
      lm = dataclasses.replace(lm, embed_vocab_size=ckpt.shape(embed_key)[0])

  vision, source = resolve_vision(raw, where if os.path.isdir(where) else None)
  logging.info("%s: vision tower geometry from %s", where, source)
  if ckpt is not None:
    check_vision_depth(vision, source, ckpt, where)
  if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
    raise CheckpointError(f"{where}: mm_projector_type {raw['mm_projector_type']!r} is not "
                          "supported; expected 'mlp2x_gelu'")
  aspect = raw.get("image_aspect_ratio", "anyres")
  anyres = aspect.startswith("anyres")
  if anyres and "unpad" not in raw.get("mm_patch_merge_type", "spatial_unpad"):
    raise CheckpointError(f"{where}: anyres needs mm_patch_merge_type 'spatial_unpad', got "
                          f"{raw.get('mm_patch_merge_type')!r}")
  max_tiles = None
  if m := re.fullmatch(r"anyres_max_(\d+)", aspect):
    max_tiles = int(m.group(1))
  # LaViDa pools every view (its training default); LLaDA-V pools only video frames.
  pool_mode = None if family == "llada-v" or not anyres else raw.get("mm_spatial_pool_mode",
                                                                     "bilinear")
  conn = connector.ConnectorConfig(vision.width, lm.d_model, pool_mode=pool_mode,
                                   pool_size=math.ceil(vision.grid / 2), anyres=anyres,
                                   max_tiles=max_tiles)
  conn.pooled_side(vision.grid)  # validates the pool mode
  pinpoints = parse_pinpoints(raw.get("image_grid_pinpoints") or image_lib.PINPOINTS_LAVIDA,
                              vision.image_size)
  img = image_lib.ImageConfig(size=vision.image_size, pinpoints=pinpoints, anyres=anyres)
  return LaViDaConfig(family=family, vision=vision, connector=conn, lm=lm, image=img,
                      **overrides)


def config_to_hf(cfg: LaViDaConfig) -> dict:
  """LaViDaConfig -> config.json in the family's released format (inverse of config_from_hf).

  The fields LaViDa's / LLaDA-V's PyTorch code reads: the LM's own config (OLMo-style
  names for LaViDa-L, Qwen2 names for LaViDa-D, LLaMA names for LLaDA-V) plus the
  LLaVA multimodal fields. `config_from_hf(config_to_hf(cfg)) == cfg` for every
  model-defining field (not runtime switches such as remat or reference_compat).
  """
  lm, v, c, img = cfg.lm, cfg.vision, cfg.connector, cfg.image
  if c.anyres and cfg.family != "llada-v" and c.pool_mode is None:
    raise CheckpointError(f"{cfg.family}: an anyres model without pooling has no "
                          "config.json form; set connector.pool_mode")
  aspect = ("pad" if not c.anyres else
            f"anyres_max_{c.max_tiles}" if c.max_tiles is not None else "anyres")
  pinpoints = [list(p) for p in img.pinpoints]
  side = img.size
  grid = [(w // side, h // side) for w, h in img.pinpoints]
  if cfg.family == "llada-v" and grid and len(grid) > 1:
    text = f"({grid[0][0]}x{grid[0][1]}),...,({grid[-1][0]}x{grid[-1][1]})"
    if parse_pinpoints(text, side) == img.pinpoints:
      pinpoints = text
  vision_tower = ("google/siglip2-so400m-patch14-384" if cfg.family == "llada-v"
                  else "google/siglip-so400m-patch14-384")
  mm = dict(
      mm_vision_tower=vision_tower, mm_hidden_size=v.width, mm_projector_type="mlp2x_gelu",
      mm_vision_select_layer=-2, mm_vision_select_feature="patch",
      mm_patch_merge_type="spatial_unpad", mm_use_im_start_end=False,
      mm_use_im_patch_token=False, image_aspect_ratio=aspect, image_grid_pinpoints=pinpoints,
      vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_dim,
                         num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
                         image_size=v.image_size, patch_size=v.patch_size,
                         layer_norm_eps=v.eps))
  if cfg.family != "llada-v" and c.pool_mode is not None:
    mm["mm_spatial_pool_mode"] = c.pool_mode
  if cfg.family == "lavida-llada":
    return dict(
        model_type="llava_llada", architectures=["LlavaLladaForMaskedDiffusion"],
        d_model=lm.d_model, n_heads=lm.n_heads, n_kv_heads=lm.n_kv_heads,
        n_layers=lm.n_layers, mlp_hidden_size=lm.mlp_dim, mlp_ratio=lm.mlp_dim // lm.d_model,
        vocab_size=lm.vocab_size, embedding_size=lm.vocab_size, rope=True,
        rope_theta=lm.rope_theta, rope_full_precision=True, rms_norm_eps=lm.norm_eps,
        layer_norm_type="rms", activation_type="silu", block_type="llama",
        include_bias=False, include_qkv_bias=False, alibi=False, weight_tying=False,
        mask_token_id=lm.mask_id, eos_token_id=lm.eos_id, pad_token_id=lm.eos_id,
        max_sequence_length=lm.max_length or 4096, **mm)
  common = dict(
      hidden_size=lm.d_model, num_attention_heads=lm.n_heads,
      num_key_value_heads=lm.n_kv_heads, num_hidden_layers=lm.n_layers,
      intermediate_size=lm.mlp_dim, vocab_size=lm.vocab_size, rope_theta=lm.rope_theta,
      rms_norm_eps=lm.norm_eps, hidden_act="silu", tie_word_embeddings=False,
      mask_token_id=lm.mask_id, eos_token_id=lm.eos_id, pad_token_id=lm.eos_id,
      **({"head_dim": lm.head_dim} if lm.head_dim * lm.n_heads != lm.d_model else {}))
  if cfg.family == "lavida-dream":
    return dict(model_type="llava_dream", architectures=["LlavaDreamForMaskedDiffusion"],
                max_position_embeddings=lm.max_length or 131072, **common, **mm)
  return dict(model_type="llava_llada", architectures=["LlavaLLaDAModelLM"],
              attention_bias=False, mlp_bias=False,
              max_position_embeddings=lm.max_length or 8192,
              **common, **mm)


def read_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{folder} is not a Hugging Face checkpoint: no config.json")
  try:
    with open(path) as f:
      raw = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is corrupt: {str(e)[:100]}") from None
  if not isinstance(raw, dict):
    raise CheckpointError(f"{path} is corrupt: a JSON {type(raw).__name__}, not an object")
  return raw


# --- loading ----------------------------------------------------------------------------

def expand_rows(cfg: LaViDaConfig):
  """Yields (our_path, [hf names], transform, stacked) for every parameter."""
  depth = {"vision/blocks": cfg.vision.depth, "lm/blocks": cfg.lm.n_layers}
  for hf_name, path, transform in KEY_TABLES[cfg.family]:
    if "{i}" in hf_name:
      n = depth[path[:path.index("/blocks") + 7]]
      yield path, [hf_name.format(i=i) for i in range(n)], transform, True
    else:
      yield path, [hf_name], transform, False


def load_hf(folder: str, dtype="float32", mesh=None, rules=sharding_lib.DEFAULT_RULES,
            **config_overrides) -> LaViDa:
  """Loads a LaViDa-L / LaViDa-D / LLaDA-V checkpoint folder (config.json + safetensors).

  Every tensor is checked: a missing, unexpected or mis-shaped one is refused by
  name. Tensors are read one at a time and placed (sharded over `mesh` when
  given) before the next is read.
  """
  dtype = jnp.dtype(dtype)
  raw = read_config(folder)
  with Checkpoint(folder) as ckpt:
    cfg = config_from_hf(raw, ckpt, where=folder, **config_overrides)
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: LaViDa(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype)))
    if mesh is not None:
      shardings = sharding_lib.state_shardings(abstract, mesh, rules)
      target = {"/".join(map(str, p)): v.get_value()
                for p, v in nnx.to_flat_state(shardings)}
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(abstract)}
    rows = list(expand_rows(cfg))
    check_tensors(ckpt, rows, flat, folder, cfg.family)  # headers only: fail before reading
    values = {}
    for path, names, transform, stacked in rows:
      layer_shape = flat[path].shape[1:] if stacked else flat[path].shape
      parts = [TO_OURS[transform](ckpt.get(n), layer_shape).astype(dtype) for n in names]
      host = np.stack(parts) if stacked else parts[0]
      del parts
      if path == "image_newline" and cfg.reference_compat:
        host = host.astype(jnp.bfloat16).astype(dtype)  # the reference keeps it in bf16
      values[path] = (jax.device_put(host, target[path]) if mesh is not None
                      else jnp.asarray(host))
      del host

  state = nnx.map_state(lambda p, v: v.replace(values["/".join(map(str, p))]), abstract)
  return nnx.merge(graphdef, state)


def check_tensors(ckpt: Checkpoint, rows, flat, folder: str, family: str):
  """Refuses a missing, mis-shaped or unexpected tensor, naming it."""
  used = set()
  for path, names, transform, stacked in rows:
    shape = flat[path].shape
    want = HF_SHAPE[transform](shape[1:] if stacked else shape)
    for name in names:
      if name not in ckpt:
        raise CheckpointError(f"checkpoint {folder} is missing tensor {name} ({family})")
      if ckpt.shape(name) != want:
        raise CheckpointError(f"checkpoint tensor {name} has shape {ckpt.shape(name)}, "
                              f"expected {want}")
      used.add(name)
  extra = sorted(set(ckpt.keys()) - used)
  if extra:
    raise CheckpointError(f"checkpoint {folder} has unexpected tensor(s) for {family}: "
                          f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
