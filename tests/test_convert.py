"""Conversion both ways: bit-exact round trips, transformers loads our exports, Orbax
restores onto meshes, and every refusal leaves no half-written destination."""
import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import lavida_jax
from lavida_jax import convert, sharding
from lavida_jax.checkpoint import export, hf, streamed
from lavida_jax.checkpoint import orbax as orbax_lib
from lavida_jax.checkpoint.shards import INDEX_NAME, Checkpoint, CheckpointError
from lavida_jax.models.lavida import FAMILIES, LaViDaConfig
from tests.conftest import assert_close
from tests.torch_reference import _OLMO

SIDE_FILES = {"tokenizer.json": "{}", "tokenizer_config.json": "{\"a\": 1}",
              "special_tokens_map.json": "{}", "spm.model": "model-bytes",
              "generation_config.json": "{\"do_sample\": false}"}
IDS = np.array([[3, 17, 42, 99, 7, 254, 1, 128, 64, 5, 200, 31]])


def _source(ref, folder, dtype, shards):
  """The reference checkpoint in `dtype`, plus tokenizer files and an unrelated file."""
  sd = ref.state_dict()
  if dtype == "bfloat16":
    sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
  ref.save(folder, shards=shards, state_dict=sd)
  for name, text in {**SIDE_FILES, "notes.txt": "not copied"}.items():
    with open(os.path.join(folder, name), "w") as f:
      f.write(text)
  return folder


@pytest.fixture(scope="module")
def converted(reference_checkpoint, tmp_path_factory):
  """(ref, hf source, orbax folder, exported hf folder) per (family, dtype)."""
  cache = {}

  def get(family, dtype):
    if (family, dtype) not in cache:
      ref, _ = reference_checkpoint(family)
      root = tmp_path_factory.mktemp(f"conv-{family}-{dtype}")
      src = _source(ref, str(root / "hf"), dtype, shards=3 if family == "llada-v" else 1)
      orb, out = str(root / "orbax"), str(root / "export")
      convert.hf_to_orbax(src, orb)
      convert.orbax_to_hf(orb, out, max_shard_bytes=40_000)  # forces several shards
      cache[family, dtype] = (ref, src, orb, out)
    return cache[family, dtype]

  return get


def _assert_same_tensors(a_dir, b_dir):
  with Checkpoint(a_dir) as a, Checkpoint(b_dir) as b:
    assert a.keys() == b.keys()
    for k in a.keys():
      x, y = a.get(k), b.get(k)
      assert (x.dtype, x.shape) == (y.dtype, y.shape), k
      assert x.tobytes() == y.tobytes(), f"{k} changed in the round trip"


# --- exactness ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(converted, family, dtype):
  _, src, orb, out = converted(family, dtype)
  _assert_same_tensors(src, out)
  with open(os.path.join(src, "config.json"), "rb") as f, \
       open(os.path.join(out, "config.json"), "rb") as g:
    assert f.read() == g.read()  # config.json verbatim
  for folder in (orb, out):
    for name, text in SIDE_FILES.items():
      with open(os.path.join(folder, name)) as f:
        assert f.read() == text
    assert not os.path.exists(os.path.join(folder, "notes.txt"))
  index = json.load(open(os.path.join(out, INDEX_NAME)))
  shards = set(index["weight_map"].values())
  assert len(shards) > 1 and all(os.path.exists(os.path.join(out, s)) for s in shards)
  assert index["metadata"]["total_size"] == sum(
      np.prod(v["shape"]) * (2 if dtype == "bfloat16" else 4)
      for s in shards for k, v in _header(os.path.join(out, s)).items())


def _header(path):
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  header.pop("__metadata__")
  return header


def test_shard_plan_respects_the_limit():
  entries = [(f"t{i}", (10, 10), np.dtype("float32")) for i in range(7)]  # 400 B each
  shards = export.plan_shards(entries, max_shard_bytes=1000)
  assert [len(s) for s in shards] == [2, 2, 2, 1]
  assert [len(s) for s in export.plan_shards(entries, max_shard_bytes=100)] == [1] * 7


@pytest.mark.parametrize("family", FAMILIES)
def test_config_to_hf_inverts_config_from_hf(family):
  cfg = LaViDaConfig.create(family)
  assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
  tiny = LaViDaConfig.create("lavida-llada", "tiny")
  assert hf.config_from_hf(hf.config_to_hf(tiny)) == tiny


def _lm_state_dict(folder, family):
  """The exported LM tensors under transformers' LLaMA / Qwen2 names."""
  sd = {}
  for name in set(json.load(open(os.path.join(folder, INDEX_NAME)))["weight_map"].values()):
    sd.update(load_file(os.path.join(folder, name)))
  sd = {k: v for k, v in sd.items()
        if not k.startswith(("model.vision_tower.", "model.mm_projector.", "model.image_newline"))}
  if family == "lavida-llada":  # OLMo names -> LLaMA names
    olmo_to_llama = {v: k for k, v in _OLMO.items()}
    renamed = {}
    for k, v in sd.items():
      if k == "model.transformer.wte.weight":
        renamed["model.embed_tokens.weight"] = v
      elif k == "model.transformer.ln_f.weight":
        renamed["model.norm.weight"] = v
      elif k == "model.transformer.ff_out.weight":
        renamed["lm_head.weight"] = v
      else:
        _, _, _, i, module, w = k.split(".")
        renamed[f"model.layers.{i}.{olmo_to_llama[module]}.{w}"] = v
    sd = renamed
  return sd


def _transformers_logits(folder, family):
  raw = json.load(open(os.path.join(folder, "config.json")))
  if family == "lavida-llada":
    kw = dict(hidden_size=raw["d_model"], num_attention_heads=raw["n_heads"],
              num_key_value_heads=raw["n_kv_heads"], num_hidden_layers=raw["n_layers"],
              intermediate_size=raw["mlp_hidden_size"], vocab_size=raw["vocab_size"])
  else:
    kw = {k: raw[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                              "num_hidden_layers", "intermediate_size", "vocab_size")}
  kw.update(rope_theta=raw["rope_theta"], rms_norm_eps=raw["rms_norm_eps"],
            tie_word_embeddings=False, max_position_embeddings=4096)
  if family == "lavida-dream":
    model = Qwen2ForCausalLM(Qwen2Config(**kw))
  else:
    model = LlamaForCausalLM(LlamaConfig(**kw, attention_bias=False, mlp_bias=False))
  model.load_state_dict(_lm_state_dict(folder, family), strict=True)
  t = IDS.shape[1]
  with torch.no_grad():  # bidirectional: an all-zero additive 4-D mask
    return model.eval()(input_ids=torch.from_numpy(IDS),
                        attention_mask=torch.zeros(1, 1, t, t)).logits.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_into_transformers(converted, family):
  _, _, orb, out = converted(family, "float32")
  ours = lavida_jax.load_pretrained(orb).text_logits(IDS)
  assert_close(ours, _transformers_logits(out, family))


def test_training_checkpoint_exports_its_params_only(converted, tmp_path):
  """A CheckpointManager-style workdir: config.json at the root, step folders holding
  params beside optimizer state; export takes the newest step's params."""
  _, src, orb, _ = converted("lavida-dream", "float32")
  model = lavida_jax.load_pretrained(orb)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: x * 1.01 + 0.003, params))  # "trained"
  work = tmp_path / "workdir"
  work.mkdir()
  shutil.copy(os.path.join(src, "config.json"), work / "config.json")
  shutil.copy(os.path.join(src, "tokenizer.json"), work / "tokenizer.json")
  orbax_lib.save_model(model, str(work / "200"), hf_config=None)
  opt_state = optax.adamw(1e-3).init(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  with ocp.StandardCheckpointer() as c:
    c.save(str(work / "200" / "opt_state"), opt_state)
  (work / "100").mkdir()  # an older, incomplete step: ignored
  out = str(tmp_path / "export")
  assert convert.main(["orbax-to-hf", f"--src={work}", f"--dst={out}"]) == 0
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  assert_close(model.text_logits(IDS), _transformers_logits(out, "lavida-dream"))
  back = lavida_jax.load_pretrained(out)
  np.testing.assert_array_equal(back.lm.head.kernel[...], model.lm.head.kernel[...])


def test_orbax_restore_on_one_and_eight_devices(converted):
  _, src, orb, _ = converted("lavida-llada", "float32")
  from_hf = lavida_jax.load_pretrained(src)
  one = lavida_jax.load_pretrained(orb)
  mesh = sharding.make_mesh((1, 4, 2))
  eight = lavida_jax.load_pretrained(orb, mesh=mesh)
  q = eight.lm.blocks.attn.q.kernel[...]
  assert q.sharding.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}
  assert q.sharding.spec == sharding.logical_to_spec(
      ("layers", "embed", "q_heads", "head_dim"), q.shape, mesh)
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (
      q.shape[0], q.shape[1] // 4, q.shape[2] // 2, q.shape[3])
  for a, b, c in zip(*(jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (from_hf, one, eight))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(b), np.asarray(c))
  l1 = np.asarray(one.text_logits(IDS))
  np.testing.assert_array_equal(l1, np.asarray(from_hf.text_logits(IDS)))
  assert_close(np.asarray(eight.text_logits(IDS)), l1, rel=1e-5)  # only summation order differs


def test_bf16_orbax_loads_in_float32(converted):
  ref, _, orb, _ = converted("lavida-dream", "bfloat16")
  model = lavida_jax.load_pretrained(orb, dtype="float32")
  w = model.lm.head.kernel[...]
  assert w.dtype == np.float32
  expected = ref.lm.lm_head.weight.detach().T.to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(np.asarray(w), expected)


def test_dtype_cast_and_command_line(reference_checkpoint, tmp_path, capsys):
  ref, src = reference_checkpoint("lavida-llada")
  orb, out = str(tmp_path / "orbax"), str(tmp_path / "export")
  assert convert.main(["hf-to-orbax", f"--src={src}", f"--dst={orb}", "--dtype=bfloat16"]) == 0
  assert convert.main(["orbax-to-hf", f"--src={orb}", f"--dst={out}"]) == 0
  assert "orbax-to-hf: lavida-llada" in capsys.readouterr().out
  with Checkpoint(out) as ckpt:
    got = ckpt.get("model.transformer.ff_out.weight")
  assert got.dtype == np.dtype("bfloat16")
  expected = ref.lm.lm_head.weight.detach().to(torch.bfloat16).view(torch.int16).numpy()
  np.testing.assert_array_equal(got.view(np.int16), expected)
  for argv in (["--help"], ["hf-to-orbax", "--help"], ["orbax-to-hf", "--help"]):
    with pytest.raises(SystemExit) as e:
      convert.main(argv)
    assert e.value.code == 0
  assert "--max_shard_bytes" in capsys.readouterr().out
  run = subprocess.run([sys.executable, "-m", "lavida_jax.convert", "--help"],
                       capture_output=True, text=True)
  assert run.returncode == 0 and "hf-to-orbax" in run.stdout


# --- refusals: clear messages, nothing half-written ------------------------------------

def _leftovers(parent):
  return [n for n in os.listdir(parent) if ".tmp-" in n]


def _copy(folder, tmp_path, name="src"):
  dst = tmp_path / name
  shutil.copytree(folder, dst)
  return dst


def test_unknown_family_is_refused(reference_checkpoint, tmp_path):
  _, folder = reference_checkpoint("lavida-llada")
  src = _copy(folder, tmp_path)
  cfg = json.loads((src / "config.json").read_text())
  cfg["model_type"] = "llava_qwen"
  (src / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="unknown model family.*llava_qwen"):
    convert.hf_to_orbax(str(src), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


KEY = "model.transformer.blocks.1.q_proj.weight"


@pytest.mark.parametrize("mutate,message", [
    (lambda sd: sd.pop(KEY), f"missing tensor {KEY}"),
    (lambda sd: sd.__setitem__(KEY, sd[KEY][:32].clone()),
     rf"{KEY} has shape \(32, 64\), expected \(64, 64\)"),
    (lambda sd: sd.__setitem__("model.vision_tower.head.weight", torch.zeros(2)),
     "unexpected tensor.*model.vision_tower.head.weight"),
], ids=["missing", "misshaped", "extra"])
def test_bad_tensors_are_named(reference_checkpoint, tmp_path, mutate, message):
  ref, _ = reference_checkpoint("lavida-llada")
  sd = ref.state_dict()
  mutate(sd)
  src = ref.save(str(tmp_path / "src"), state_dict=sd)
  with pytest.raises(CheckpointError, match=message):
    convert.hf_to_orbax(src, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_truncated_shard_is_refused(reference_checkpoint, tmp_path):
  _, folder = reference_checkpoint("lavida-dream", shards=3)
  src = _copy(folder, tmp_path)
  path = src / "model-00002-of-00003.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) - 100])
  with pytest.raises(CheckpointError, match="truncated"):
    convert.hf_to_orbax(str(src), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_nonempty_destination_needs_overwrite(converted, tmp_path, capsys):
  _, src, orb, _ = converted("lavida-llada", "float32")
  dst = tmp_path / "dst"
  dst.mkdir()
  (dst / "keep.txt").write_text("precious")
  with pytest.raises(CheckpointError, match="not empty; pass --overwrite"):
    convert.orbax_to_hf(orb, str(dst))
  assert convert.main(["hf-to-orbax", f"--src={src}", f"--dst={dst}"]) == 2
  assert "error: destination" in capsys.readouterr().err
  assert (dst / "keep.txt").read_text() == "precious"
  convert.orbax_to_hf(orb, str(dst), overwrite=True)
  assert not (dst / "keep.txt").exists() and (dst / INDEX_NAME).exists()
  (tmp_path / "empty").mkdir()  # an empty folder is fine without --overwrite
  convert.orbax_to_hf(orb, str(tmp_path / "empty"))
  with pytest.raises(CheckpointError, match="overlaps the source"):
    convert.hf_to_orbax(src, os.path.join(src, "inside"))
  assert not _leftovers(tmp_path)


def _fail_after(n, real):
  calls = {"n": 0}

  def fail(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] > n:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(*args, **kwargs)

  return fail


def test_disk_full_during_hf_to_orbax_leaves_nothing(converted, tmp_path, monkeypatch):
  _, src, _, _ = converted("lavida-llada", "float32")
  dst = tmp_path / "orbax"
  dst.mkdir()
  (dst / "old.txt").write_text("previous")
  real = streamed.write_block

  async def fail(store, index, block, calls={"n": 0}):
    calls["n"] += 1
    if calls["n"] > 5:
      raise OSError(errno.ENOSPC, "No space left on device")
    await real(store, index, block)

  monkeypatch.setattr(streamed, "write_block", fail)
  with pytest.raises(CheckpointError, match="no space left"):
    convert.hf_to_orbax(src, str(dst), overwrite=True)
  assert sorted(os.listdir(dst)) == ["old.txt"]  # the old destination is untouched
  assert not _leftovers(tmp_path)


def test_disk_full_during_orbax_to_hf_leaves_nothing(converted, tmp_path, monkeypatch):
  _, _, orb, _ = converted("lavida-llada", "float32")
  monkeypatch.setattr(export, "write_tensor", _fail_after(7, export.write_tensor))
  with pytest.raises(CheckpointError, match="no space left"):
    convert.orbax_to_hf(orb, str(tmp_path / "hf"))
  assert not (tmp_path / "hf").exists() and not _leftovers(tmp_path)


def test_orbax_checkpoint_with_a_missing_parameter_is_refused(converted, tmp_path):
  _, _, orb, _ = converted("lavida-llada", "float32")
  model = lavida_jax.load_pretrained(orb)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  del params["lm"]["head"]
  (tmp_path / "ck").mkdir()
  shutil.copy(os.path.join(orb, "config.json"), tmp_path / "ck" / "config.json")
  with ocp.StandardCheckpointer() as c:
    c.save(str(tmp_path / "ck" / "params"), params)
  with pytest.raises(CheckpointError, match="missing parameter lm/head/kernel"):
    lavida_jax.load_pretrained(str(tmp_path / "ck"))
  with pytest.raises(CheckpointError, match="missing parameter lm/head/kernel"):
    convert.orbax_to_hf(str(tmp_path / "ck"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
