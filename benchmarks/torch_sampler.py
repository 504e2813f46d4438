"""LaViDa's prefix-cache sampler restated in plain PyTorch: the baseline of `generate.py`.

What one generation does here, as LaViDa's `llada/generate.py` (prefix_lm=True)
and its OLMo-style LLaDA model do it:
  - vision: `transformers.SiglipVisionModel` (the kept layers), the hidden state
    before post_layernorm; projector Linear-GELU-Linear; bilinear pooling
    (`F.interpolate`, 27x27 -> 14x14); anyres layout + `image_newline`, taken from
    the same host-side index table our model uses (`connector.anyres_layout`);
  - prefill: one pass over the prompt embeddings keeping every layer's K/V
    *before* RoPE (LaViDa's `attn_key_values`);
  - each step: embed the whole canvas (L tokens), every layer concatenates the
    cached K/V with the canvas's, applies RoPE to all P + L keys (LaViDa
    re-rotates the cache every step), unmasked SDPA, LM head on the L rows;
    float64 softmax; x0 = argmax; low-confidence remasking: `torch.topk` of the
    confidence at mask positions with the step's transfer count.
Weights are carried over from our model (`export_weights`: the LaViDa-L key
names of `checkpoint.hf`); the transfer counts are ours (the same integers).
Greedy only (temperature 0), batch 1, fp32.

Run by `generate.py` as a subprocess (so neither runtime's threads compete):
  python benchmarks/torch_sampler.py --inputs=FILE.npz --runs=5 --out=FILE.json [--no_cache]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

SIGLIP = "model.vision_tower.vision_tower.vision_model."
BLOCK = "model.transformer.blocks.{i}."


def export_weights(model) -> dict[str, np.ndarray]:
  """Our LaViDa-L model -> {LaViDa checkpoint name: array in PyTorch layout}."""
  from flax import nnx

  from lavida_jax.checkpoint import hf

  flat = {"/".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  out = {}
  for path, names, transform, stacked in hf.expand_rows(model.cfg):
    arrays = flat[path] if stacked else [flat[path]]
    for name, a in zip(names, arrays):
      out[name] = np.ascontiguousarray(hf.TO_HF[transform](a))
  return out


def rotate_half(x):
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat((-x2, x1), dim=-1)


class LLaDA:
  """LLaDA's bidirectional transformer (OLMo names), forward with a prefix cache."""

  def __init__(self, w: dict[str, torch.Tensor], cfg: dict):
    self.w, self.cfg = w, cfg
    self.n_layers, self.n_heads = cfg["n_layers"], cfg["n_heads"]
    self.eps = cfg["norm_eps"]
    self.wte = w["model.transformer.wte.weight"]
    self.head = w["model.transformer.ff_out.weight"]
    self.ln_f = w["model.transformer.ln_f.weight"]
    self.blocks = [{k[len(BLOCK.format(i=i)):]: v for k, v in w.items()
                    if k.startswith(BLOCK.format(i=i))} for i in range(self.n_layers)]
    d = cfg["d_model"] // self.n_heads
    # torch's float32 pow, as LLaDA computes the table (SPEC §13).
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    pos = torch.arange(cfg.get("max_len", 8192), dtype=torch.float)
    ang = torch.cat([torch.outer(pos, inv)] * 2, dim=-1)
    self.sin, self.cos = ang.sin()[None, None], ang.cos()[None, None]

  def _heads(self, x):
    b, t, _ = x.shape
    return x.view(b, t, self.n_heads, -1).transpose(1, 2)

  def forward(self, x_BTD, past=None):
    """-> (hidden [B, T, D] after ln_f, [(k, v) pre-RoPE per layer incl. x's own])."""
    b, t, _ = x_BTD.shape
    kv = []
    for blk in self.blocks:
      h = F.rms_norm(x_BTD, (x_BTD.shape[-1],), blk["attn_norm.weight"], self.eps)
      q = self._heads(F.linear(h, blk["q_proj.weight"]))
      k = self._heads(F.linear(h, blk["k_proj.weight"]))
      v = self._heads(F.linear(h, blk["v_proj.weight"]))
      if past is not None:  # LaViDa: concatenate the pre-RoPE cache, then rotate all keys
        k = torch.cat([past[len(kv)][0], k], dim=-2)
        v = torch.cat([past[len(kv)][1], v], dim=-2)
      kv.append((k, v))
      s = k.shape[-2]
      sin, cos = self.sin[:, :, :s], self.cos[:, :, :s]
      qr = q * cos[:, :, s - t:] + rotate_half(q) * sin[:, :, s - t:]
      kr = k * cos + rotate_half(k) * sin
      att = F.scaled_dot_product_attention(qr, kr, v, attn_mask=None, is_causal=False)
      x_BTD = x_BTD + F.linear(att.transpose(1, 2).reshape(b, t, -1), blk["attn_out.weight"])
      h = F.rms_norm(x_BTD, (x_BTD.shape[-1],), blk["ff_norm.weight"], self.eps)
      h = F.silu(F.linear(h, blk["ff_proj.weight"])) * F.linear(h, blk["up_proj.weight"])
      x_BTD = x_BTD + F.linear(h, blk["ff_out.weight"])
    return F.rms_norm(x_BTD, (x_BTD.shape[-1],), self.ln_f, self.eps), kv


class TorchLaViDa:
  def __init__(self, w: dict[str, np.ndarray], cfg: dict):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    t = {k: torch.from_numpy(np.asarray(v)) for k, v in w.items()}
    v = cfg["vision"]
    hc = SiglipVisionConfig(hidden_size=v["width"], intermediate_size=v["mlp_dim"],
                            num_hidden_layers=v["depth"], num_attention_heads=v["num_heads"],
                            image_size=v["image_size"], patch_size=v["patch_size"],
                            layer_norm_eps=v["eps"], hidden_act="gelu_pytorch_tanh",
                            vision_use_head=False)
    self.vision = SiglipVisionModel(hc).eval()
    self.vision.load_state_dict({k[len(SIGLIP):]: x for k, x in t.items()
                                 if k.startswith(SIGLIP)}, strict=True)
    self.proj = [(t[f"model.mm_projector.{i}.weight"], t[f"model.mm_projector.{i}.bias"])
                 for i in (0, 2)]
    self.newline = t["model.image_newline"]
    self.pool = cfg["pool_size"]
    self.lm = LLaDA(t, cfg["lm"])

  def image_tokens(self, pixels_NHWC, base, canvas, out_hw):
    """All views of one image -> image tokens [n, D] (the layout's host indices)."""
    x = torch.from_numpy(np.ascontiguousarray(pixels_NHWC.transpose(0, 3, 1, 2)))
    feats = self.vision(x, output_hidden_states=True).hidden_states[-1]
    (w1, b1), (w2, b2) = self.proj
    feats = F.linear(F.gelu(F.linear(feats, w1, b1)), w2, b2)
    n, p, d = feats.shape
    g = math.isqrt(p)
    grid = feats.view(n, g, g, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=[self.pool] * 2, mode="bilinear")
    flat = grid.flatten(2).transpose(1, 2).reshape(-1, d)
    canvas_t = flat[torch.from_numpy(canvas)]  # [h, w, D]
    if tuple(out_hw) != tuple(canvas_t.shape[:2]):
      raise NotImplementedError("anyres_max downsampling (LLaDA-V) is not restated here")
    rows = torch.cat([canvas_t, self.newline.expand(canvas_t.shape[0], 1, d)], dim=1)
    return torch.cat([flat[torch.from_numpy(base)], rows.reshape(-1, d)])

  def embed_prompt(self, ids, image_tokens):
    pos = int(np.flatnonzero(ids == -200)[0])
    emb = self.lm.wte
    return torch.cat([emb[torch.from_numpy(ids[:pos])], image_tokens,
                      emb[torch.from_numpy(ids[pos + 1:])]])[None]

  def sample(self, past, canvas0, counts, mask_id, prompt=None):
    """LLaDA's loop (one block, greedy, low_confidence) -> (tokens [L], first logits).

    past: the prefix cache; None: the whole prompt + canvas every step (`prompt`
    [1, P, D]), logits over all of it, as LaViDa's no-cache path computes them."""
    x = torch.from_numpy(canvas0.astype(np.int64))[None]
    first = None
    for k in counts:
      if k == 0:
        continue
      if past is not None:
        h, _ = self.lm.forward(self.lm.wte[x], past)
        logits = F.linear(h, self.lm.head)
      else:
        h, _ = self.lm.forward(torch.cat([prompt, self.lm.wte[x]], dim=1))
        logits = F.linear(h, self.lm.head)[:, prompt.shape[1]:]
      first = logits if first is None else first
      x0 = torch.argmax(logits, dim=-1)
      p = F.softmax(logits.to(torch.float64), dim=-1)
      x0_p = torch.gather(p, -1, x0[..., None])[..., 0]
      masked = x == mask_id
      x0 = torch.where(masked, x0, x)
      conf = torch.where(masked, x0_p, torch.tensor(-np.inf, dtype=torch.float64))
      _, idx = torch.topk(conf[0], k=int(k))
      x[0, idx] = x0[0, idx]
    return x[0].numpy(), first[0].numpy()


def timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def run(inputs: dict, runs: int, threads: int | None = None, cache: bool = True) -> dict:
  if threads:
    torch.set_num_threads(threads)
  cfg = json.loads(str(inputs["config"]))
  w = {k[2:]: inputs[k] for k in inputs if k.startswith("w/")}
  model = TorchLaViDa(w, cfg)
  ids, pixels = inputs["ids"], inputs["pixels"]
  base, canvas, out_hw = inputs["layout_base"], inputs["layout_canvas"], inputs["out_hw"]
  canvas0, counts, mask_id = inputs["canvas0"], inputs["counts"], int(inputs["mask_id"])
  rows = []
  with torch.inference_mode():
    for r in range(runs + 1):  # the first is a warm-up
      t0 = time.perf_counter()
      img, t_vision = timed(lambda: model.image_tokens(pixels, base, canvas, out_hw))
      x = model.embed_prompt(ids, img)
      past, t_prefill = None, 0.0
      if cache:
        (_, past), t_prefill = timed(lambda: model.lm.forward(x))
      (tokens, first), t_steps = timed(
          lambda: model.sample(past, canvas0, counts, mask_id, prompt=x))
      total = time.perf_counter() - t0
      if r:
        rows.append(dict(vision_s=t_vision, prefill_s=t_prefill, steps_s=t_steps,
                         total_s=total))
  med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
  nfe = int((np.asarray(counts) > 0).sum())
  return dict(**med, per_step_ms=1e3 * med["steps_s"] / nfe, steps=nfe, prefix=x.shape[1],
              tokens=[int(t) for t in tokens], first_logits=first.tolist(),
              threads=torch.get_num_threads(), torch=torch.__version__)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--inputs", required=True, help="npz written by generate.py")
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--threads", type=int, default=None)
  ap.add_argument("--no_cache", action="store_true", help="no prefix cache: full passes")
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  res = run(dict(np.load(args.inputs)), args.runs, args.threads, not args.no_cache)
  with open(args.out, "w") as f:
    json.dump(res, f)


if __name__ == "__main__":
  main()
