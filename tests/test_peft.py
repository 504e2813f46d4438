"""PEFT interchange against the `peft` package on transformers' reference models (fp32).

Out: adapters trained here, exported, loaded by `peft.PeftModel.from_pretrained` onto
the family's transformers model give our logits. In: a random PEFT adapter
(init_lora_weights=False) saved by peft, imported here, gives peft's logits.
LaViDa-L's OLMo module names are renamed to LLaMA's for the Llama reference.
"""
import copy
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lavida_jax
from lavida_jax import optimizer, train_step
from lavida_jax.checkpoint import peft as peft_io
from lavida_jax.checkpoint.errors import CheckpointError
from lavida_jax.models import lora
from tests.conftest import assert_close

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

FAMILIES = ["lavida-llada", "llada-v", "lavida-dream"]
LLAMA_MODULES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
                 "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
                 "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}


def _as_llama(folder: str, out: str) -> str:
  """A LaViDa-L (OLMo names) PEFT folder renamed onto LlamaForCausalLM's modules."""
  from safetensors.numpy import load_file, save_file
  tensors = load_file(os.path.join(folder, peft_io.WEIGHTS_FILE))
  renamed = {}
  for key, value in tensors.items():
    parts = key.split(".")  # base_model.model.model.transformer.blocks.N.<mod>.lora_X.weight
    assert parts[3:5] == ["transformer", "blocks"], key
    renamed[".".join(parts[:3] + ["layers", parts[5], LLAMA_MODULES[parts[6]]] + parts[7:])] = value
  os.makedirs(out, exist_ok=True)
  save_file(renamed, os.path.join(out, peft_io.WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(folder, peft_io.CONFIG_FILE)) as f:
    config = json.load(f)
  config["target_modules"] = sorted(set(LLAMA_MODULES.values()))
  with open(os.path.join(out, peft_io.CONFIG_FILE), "w") as f:
    json.dump(config, f)
  return out


def _peft_logits(peft_model, ids):
  b, t = ids.shape
  with torch.no_grad():
    return peft_model(input_ids=torch.from_numpy(ids),
                      attention_mask=torch.zeros(b, 1, t, t)).logits.numpy()


def _train_adapters(model, steps=3, targets=lora.LM_TARGETS):
  """A few real LoRA steps (text-only rows through loss_fn's path) on `model`."""
  lora.add_adapters(model, lora.LoRAConfig(rank=4, alpha=8.0, targets=targets), seed=3)
  groups = ("lm",)
  graphdef, params, frozen = train_step.split_params(model, groups, adapters_only=True)
  tx, _ = optimizer.make_optimizer({"lm": 1e-2}, 10, warmup_ratio=0.0)
  opt_state = tx.init(params)
  ids = jnp.asarray(np.random.default_rng(5).integers(0, 240, (4, 12)))

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      m = nnx.merge(graphdef, nnx.State(p), nnx.State(frozen))
      logits = m.lm(ids)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], -1))
    g = jax.grad(loss)(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return jax.tree.map(jnp.add, params, updates), opt_state

  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return nnx.merge(graphdef, nnx.State(params), nnx.State(frozen))


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_trained_here_loads_in_peft(reference_checkpoint, tmp_path, family):
  ref, folder = reference_checkpoint(family)
  model = _train_adapters(lavida_jax.load_pretrained(folder))
  assert np.abs(np.asarray(model.lm.blocks.mlp.up.lora_b[...])).max() > 0  # trained
  out = peft_io.export_peft(model, str(tmp_path / "adapter"), base=folder)
  if family == "lavida-llada":
    out = _as_llama(out, str(tmp_path / "llama"))
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(ref.lm), out).eval()
  ids = np.random.default_rng(0).integers(0, ref.cfg.lm.vocab_size, (2, 13))
  theirs = _peft_logits(peft_model, ids)
  assert np.abs(theirs - ref.text_logits(ids)).max() > 1e-3  # the adapter does something
  assert_close(model.text_logits(ids), theirs, rel=1e-5)


@pytest.mark.parametrize("family", ["llada-v", "lavida-dream"])
def test_adapted_head_exports_as_lm_head(reference_checkpoint, tmp_path, family):
  """lora.targets with "head": the LM head's adapter is PEFT's lm_head LoRA."""
  ref, folder = reference_checkpoint(family)
  model = _train_adapters(lavida_jax.load_pretrained(folder), steps=2,
                          targets=lora.LM_TARGETS + ("head",))
  assert np.abs(np.asarray(model.lm.head.lora_b[...])).max() > 0  # the head's adapter trained
  out = peft_io.export_peft(model, str(tmp_path / "adapter"))
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(ref.lm), out).eval()
  assert any(n.endswith(".lm_head.lora_A") for n, _ in peft_model.named_modules())
  ids = np.random.default_rng(2).integers(0, ref.cfg.lm.vocab_size, (2, 10))
  assert_close(model.text_logits(ids), _peft_logits(peft_model, ids), rel=1e-5)


@pytest.mark.parametrize("family", ["llada-v", "lavida-dream"])
def test_random_peft_adapter_imports_with_peft_logits(reference_checkpoint, tmp_path, family):
  """peft's own random LoRA (some modules, per-module rank and alpha) imported here."""
  ref, folder = reference_checkpoint(family)
  torch.manual_seed(0)
  config = peft.LoraConfig(r=4, lora_alpha=12, init_lora_weights=False,
                           target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                           rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3})
  peft_model = peft.get_peft_model(copy.deepcopy(ref.lm), config).eval()
  peft_model.save_pretrained(str(tmp_path / "adapter"))
  model = lavida_jax.load_pretrained(folder)
  paths = peft_io.import_peft(model, str(tmp_path / "adapter"))
  assert {"/".join(p) for p in paths} == {"lm/blocks/attn/q", "lm/blocks/attn/v",
                                          "lm/blocks/attn/o", "lm/blocks/mlp/down"}
  ids = np.random.default_rng(1).integers(0, ref.cfg.lm.vocab_size, (2, 11))
  theirs = _peft_logits(peft_model, ids)
  assert np.abs(theirs - ref.text_logits(ids)).max() > 1e-3
  assert_close(model.text_logits(ids), theirs, rel=1e-5)
  # ... and merged into the base: the same logits without adapters.
  lora.merge(model)
  assert_close(model.text_logits(ids), theirs, rel=1e-5)


def test_export_names_olmo_modules_and_skips_the_head(reference_checkpoint, tmp_path):
  """LaViDa-L: PEFT keys on model.transformer.blocks.N.<module>; the target regex takes
  the MLP's ff_out but not the head model.transformer.ff_out."""
  import re
  _, folder = reference_checkpoint("lavida-llada")
  model = lavida_jax.load_pretrained(folder)
  lora.add_adapters(model, lora.LoRAConfig(rank=2, alpha=4.0, targets=("down", "q")))
  out = peft_io.export_peft(model, str(tmp_path / "a"))
  from safetensors.numpy import load_file
  keys = set(load_file(os.path.join(out, peft_io.WEIGHTS_FILE)))
  assert "base_model.model.model.transformer.blocks.1.ff_out.lora_A.weight" in keys
  assert "base_model.model.model.transformer.blocks.0.q_proj.lora_B.weight" in keys
  assert len(keys) == 2 * 2 * model.cfg.lm.n_layers
  with open(os.path.join(out, peft_io.CONFIG_FILE)) as f:
    config = json.load(f)
  assert config["r"] == 2 and config["lora_alpha"] == 4.0
  regex = config["target_modules"]
  assert re.fullmatch(regex, "model.transformer.blocks.3.ff_out")
  assert not re.fullmatch(regex, "model.transformer.ff_out")


def test_import_refuses_foreign_tensors_by_name(reference_checkpoint, tmp_path):
  from safetensors.numpy import save_file
  _, folder = reference_checkpoint("llada-v")
  model = lavida_jax.load_pretrained(folder)
  out = tmp_path / "bad"
  out.mkdir()
  (out / peft_io.CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 2,
                                                     "lora_alpha": 2}))
  key = "base_model.model.model.embed_tokens.lora_A.weight"
  save_file({key: np.zeros((2, 4), np.float32)}, str(out / peft_io.WEIGHTS_FILE))
  with pytest.raises(CheckpointError, match=f"PEFT tensor {key} .* matches no linear"):
    peft_io.import_peft(model, str(out))
  (out / peft_io.CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
  with pytest.raises(CheckpointError, match="use_dora=True is not supported"):
    peft_io.import_peft(model, str(out))
