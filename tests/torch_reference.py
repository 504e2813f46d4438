"""Independent PyTorch references and tiny checkpoints in the released layouts.

The references are `transformers` classes (SiglipVisionModel, LlamaForCausalLM,
Qwen2ForCausalLM) from tiny random configs plus a PyTorch re-statement of
LaViDa's connector (project, F.interpolate, LLaVA-NeXT spatial_unpad). Their
weights are saved with `safetensors.torch` under each family's key names and
read back through our own loader.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          SiglipVisionConfig, SiglipVisionModel)

from lavida_jax.models.lavida import FAMILIES, LaViDaConfig

TINY = {f: LaViDaConfig.create(f, "tiny") for f in FAMILIES}
PINPOINTS = [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]


def _randomize(module: torch.nn.Module, seed: int):
  """Non-trivial values everywhere (HF inits norms to 1 and biases to 0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.08 * noise)


def siglip(cfg: LaViDaConfig, seed: int = 0) -> SiglipVisionModel:
  """SigLIP with one layer more than we keep, then the last deleted as LaViDa does."""
  v = cfg.vision
  hc = SiglipVisionConfig(hidden_size=v.width, intermediate_size=v.mlp_dim,
                          num_hidden_layers=v.depth + 1, num_attention_heads=v.num_heads,
                          image_size=v.image_size, patch_size=v.patch_size,
                          layer_norm_eps=v.eps, hidden_act="gelu_pytorch_tanh",
                          vision_use_head=False)  # LaViDa replaces the head by Identity
  model = SiglipVisionModel(hc).eval()
  _randomize(model, seed)
  del model.encoder.layers[-1:]  # transformers 5 flattens `vision_model` away
  return model


def language_model(cfg: LaViDaConfig, seed: int = 1):
  lm = cfg.lm
  common = dict(vocab_size=lm.vocab_size, hidden_size=lm.d_model, intermediate_size=lm.mlp_dim,
                num_hidden_layers=lm.n_layers, num_attention_heads=lm.n_heads,
                num_key_value_heads=lm.n_kv_heads, rms_norm_eps=lm.norm_eps,
                rope_theta=lm.rope_theta, tie_word_embeddings=False,
                max_position_embeddings=4096)
  if lm.head_dim * lm.n_heads != lm.d_model:
    common["head_dim"] = lm.head_dim
  if cfg.family == "lavida-dream":
    model = Qwen2ForCausalLM(Qwen2Config(**common))
  else:
    model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=False, mlp_bias=False))
  model = model.eval()
  _randomize(model, seed)
  return model


def projector(cfg: LaViDaConfig, seed: int = 2) -> torch.nn.Sequential:
  c = cfg.connector
  proj = torch.nn.Sequential(torch.nn.Linear(c.vision_dim, c.lm_dim), torch.nn.GELU(),
                             torch.nn.Linear(c.lm_dim, c.lm_dim))
  _randomize(proj, seed)
  return proj


class Reference:
  """The PyTorch side of one tiny model: vision, projector, newline, LM."""

  def __init__(self, family: str, seed: int = 0, cfg: LaViDaConfig | None = None):
    self.cfg = TINY[family] if cfg is None else cfg
    self.vision = siglip(self.cfg, seed)
    self.projector = projector(self.cfg, seed + 2)
    self.newline = torch.randn(self.cfg.connector.lm_dim,
                               generator=torch.Generator().manual_seed(seed + 3))
    self.lm = language_model(self.cfg, seed + 1)

  # -- forward passes, PyTorch semantics as in LaViDa / LLaVA-NeXT --

  def vision_features(self, pixels_NHWC: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(pixels_NHWC.transpose(0, 3, 1, 2)))
    with torch.no_grad():
      return self.vision(x, output_hidden_states=True).hidden_states[-1]

  def image_tokens(self, pixels_NHWC: np.ndarray, image_size, grid_rc) -> torch.Tensor:
    c = self.cfg.connector
    with torch.no_grad():
      feats = self.projector(self.vision_features(pixels_NHWC))  # [V, P, H]
      v, p, h = feats.shape
      g = math.isqrt(p)
      if c.pool_mode is not None:
        grid = feats.view(v, g, g, h).permute(0, 3, 1, 2)
        if c.pool_mode == "bilinear":
          grid = F.interpolate(grid, size=[math.ceil(g / 2)] * 2, mode="bilinear")
        else:
          grid = F.avg_pool2d(grid, 2)
        feats = grid.flatten(2).transpose(1, 2)
      return spatial_unpad(feats, self.newline, image_size, grid_rc, c.max_tiles)

  def logits_from_embeds(self, embeds: torch.Tensor, additive_mask=None) -> torch.Tensor:
    """Bidirectional: an all-zero additive 4-D mask (or the one given, [B, 1, T, T])."""
    b, t, _ = embeds.shape
    mask = torch.zeros(b, 1, t, t) if additive_mask is None else additive_mask
    with torch.no_grad():
      return self.lm(inputs_embeds=embeds, attention_mask=mask).logits

  def text_logits(self, ids: np.ndarray) -> np.ndarray:
    emb = self.lm.get_input_embeddings()(torch.from_numpy(ids))
    return self.logits_from_embeds(emb).numpy()

  def multimodal_embeds(self, ids_row: np.ndarray, images) -> torch.Tensor:
    """[T', H]: one row with -200 markers spliced; images: [(pixels, image_size, grid_rc)]."""
    emb = self.lm.get_input_embeddings()
    pieces, start, it = [], 0, iter(images)
    with torch.no_grad():
      for pos in np.flatnonzero(ids_row == -200):
        pieces.append(emb(torch.from_numpy(ids_row[start:pos])))
        pieces.append(self.image_tokens(*next(it)))
        start = pos + 1
      pieces.append(emb(torch.from_numpy(ids_row[start:])))
    return torch.cat(pieces)

  def multimodal_logits(self, ids_row: np.ndarray, images) -> np.ndarray:
    """One row with -200 markers; images: [(pixels, image_size, grid_rc)]."""
    return self.logits_from_embeds(self.multimodal_embeds(ids_row, images)[None]).numpy()[0]

  # -- the checkpoint in the family's released layout --

  def state_dict(self) -> dict[str, torch.Tensor]:
    sd = {f"model.vision_tower.vision_tower.vision_model.{k}": v
          for k, v in self.vision.state_dict().items()}
    sd.update({f"model.mm_projector.{k}": v for k, v in self.projector.state_dict().items()})
    sd["model.image_newline"] = self.newline
    lm_sd = self.lm.state_dict()
    if self.cfg.family == "lavida-llada":
      lm_sd = {olmo_name(k): v for k, v in lm_sd.items()}
    sd.update(lm_sd)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}

  def config_json(self) -> dict:
    lm, v = self.cfg.lm, self.cfg.vision
    mm = dict(mm_hidden_size=v.width, mm_projector_type="mlp2x_gelu",
              mm_vision_select_layer=-2, mm_patch_merge_type="spatial_unpad",
              mm_spatial_pool_mode="bilinear",
              vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_dim,
                                 num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
                                 image_size=v.image_size, patch_size=v.patch_size,
                                 layer_norm_eps=v.eps))
    if self.cfg.family == "lavida-llada":
      return dict(model_type="llava_llada", architectures=["LlavaLladaForMaskedDiffusion"],
                  d_model=lm.d_model, n_heads=lm.n_heads, n_kv_heads=lm.n_kv_heads,
                  n_layers=lm.n_layers, mlp_hidden_size=lm.mlp_dim, mlp_ratio=4,
                  vocab_size=lm.vocab_size, embedding_size=lm.vocab_size,
                  rope_theta=lm.rope_theta, rms_norm_eps=lm.norm_eps,
                  mask_token_id=lm.mask_id, eos_token_id=lm.eos_id, weight_tying=False,
                  image_aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS, **mm)
    llama = dict(hidden_size=lm.d_model, num_attention_heads=lm.n_heads,
                 num_key_value_heads=lm.n_kv_heads, num_hidden_layers=lm.n_layers,
                 intermediate_size=lm.mlp_dim, vocab_size=lm.vocab_size,
                 rope_theta=lm.rope_theta, rms_norm_eps=lm.norm_eps,
                 tie_word_embeddings=False,
                 **({"head_dim": lm.head_dim} if lm.head_dim * lm.n_heads != lm.d_model else {}))
    if self.cfg.family == "lavida-dream":
      return dict(model_type="llava_dream", architectures=["LlavaDreamForMaskedDiffusion"],
                  mask_token_id=lm.mask_id, pad_token_id=lm.eos_id,
                  image_aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS, **llama, **mm)
    return dict(model_type="llava_llada", architectures=["LlavaLLaDAModelLM"],
                image_aspect_ratio="anyres_max_4",
                image_grid_pinpoints="(1x1),...,(6x6)", **llama, **mm)

  def save(self, folder: str, shards: int = 1, state_dict=None, config=None) -> str:
    """Writes config.json + safetensors (an index json when shards > 1)."""
    os.makedirs(folder, exist_ok=True)
    sd = self.state_dict() if state_dict is None else state_dict
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump(self.config_json() if config is None else config, f)
    keys = sorted(sd)
    if shards == 1:
      save_file(sd, os.path.join(folder, "model.safetensors"))
      return folder
    weight_map = {}
    for s in range(shards):
      name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
      part = {k: sd[k] for k in keys[s::shards]}
      save_file(part, os.path.join(folder, name))
      weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder


_OLMO = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
         "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
         "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm"}


def olmo_name(llama_key: str) -> str:
  """LLaMA names -> LLaDA's OLMo-style names (the inverse of LLaDA-V's rename)."""
  if llama_key == "model.embed_tokens.weight":
    return "model.transformer.wte.weight"
  if llama_key == "model.norm.weight":
    return "model.transformer.ln_f.weight"
  if llama_key == "lm_head.weight":
    return "model.transformer.ff_out.weight"
  parts = llama_key.split(".")  # model.layers.N.<module...>.weight
  module = ".".join(parts[3:-1])
  return f"model.transformer.blocks.{parts[2]}.{_OLMO[module]}.{parts[-1]}"


def unpad_image(t_CHW: torch.Tensor, original_size) -> torch.Tensor:
  """LLaVA-NeXT's unpad_image, restated: original_size is (W, H)."""
  ow, oh = original_size
  ch, cw = t_CHW.shape[1:]
  if ow / oh > cw / ch:
    nh = int(oh * (cw / ow))
    pad = (ch - nh) // 2
    return t_CHW[:, pad:ch - pad, :]
  nw = int(ow * (ch / oh))
  pad = (cw - nw) // 2
  return t_CHW[:, :, pad:cw - pad]


def spatial_unpad(feats_VPH: torch.Tensor, newline: torch.Tensor, image_size, grid_rc,
                  max_tiles=None) -> torch.Tensor:
  """LLaVA-NeXT / OneVision 'spatial_unpad' merge of [V, s*s, H] view features."""
  base, crops = feats_VPH[0], feats_VPH[1:]
  s = math.isqrt(base.shape[0])
  rows, cols = grid_rc
  x = crops.view(rows, cols, s, s, -1).permute(4, 0, 2, 1, 3).contiguous()
  x = x.flatten(1, 2).flatten(2, 3)  # [H, rows*s, cols*s]
  x = unpad_image(x, image_size)
  if max_tiles is not None:
    c, h, w = x.shape
    times = math.sqrt(h * w / (max_tiles * s ** 2))
    if times > 1.1:
      x = F.interpolate(x[None], [int(h // times), int(w // times)], mode="bilinear")[0]
  x = torch.cat([x, newline[:, None, None].expand(*x.shape[:-1], 1)], dim=-1)
  x = x.flatten(1, 2).transpose(0, 1)
  return torch.cat([base, x], dim=0)
