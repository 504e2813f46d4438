"""No silent corruption, self-contained steps (issue 16, items 1-2).

Every file of a saved Orbax folder, of a training step and of a safetensors export is
flipped (one byte) and truncated in turn: loading then either refuses in one line
naming the tensor and the file, or gives bit-identical parameters (a byte nothing
reads, e.g. Orbax's commit marker). Never different numbers without a word.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lavida_jax
from lavida_jax import convert, generate, train
from lavida_jax.checkpoint import checksum, export
from lavida_jax.checkpoint import orbax as orbax_lib
from lavida_jax.checkpoint.shards import INDEX_NAME, CheckpointError, SafetensorsFile
from lavida_jax.diffusion.sampler import SamplerConfig


@pytest.fixture(scope="module")
def saved(reference_checkpoint, tmp_path_factory):
  """(hf source, orbax folder, safetensors export, {path: params} of the source)."""
  _, src = reference_checkpoint("lavida-llada")
  root = tmp_path_factory.mktemp("hardening")
  orb, out = str(root / "orbax"), str(root / "export")
  convert.hf_to_orbax(src, orb)
  with open(os.path.join(orb, "tokenizer.json"), "w") as f:
    f.write("{}")  # a side file, recorded below with the rest
  orbax_lib.write_meta(orb, None, "lavida-llada", orbax_lib.checksums(orb))
  convert.orbax_to_hf(orb, out, max_shard_bytes=200_000)
  return src, orb, out, _params(lavida_jax.load_pretrained(src))


def _params(model) -> dict:
  return {"/".join(map(str, p)): np.asarray(v)
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _files(folder) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, f), folder)
                for d, _, fs in os.walk(folder) for f in fs)


def _damage(path, how):
  data = bytearray(open(path, "rb").read())
  if how == "flip":
    data[len(data) // 2] ^= 0x10
  else:
    data = data[:len(data) // 2]
  with open(path, "wb") as f:
    f.write(bytes(data))


def _refused_or_identical(folder, want, rel):
  """-> the one-line refusal, or None when the load is bit-identical to `want`."""
  try:
    got = _params(lavida_jax.load_pretrained(folder))
  except CheckpointError as e:
    msg = str(e)
    assert "\n" not in msg and len(msg) < 400, (rel, msg)
    return msg
  differ = [k for k in want if not np.array_equal(want[k], got[k])]
  assert not differ, f"{rel}: loaded without complaint, but {differ[:3]} changed"
  return None


def _largest(folder, under):
  return max((f for f in _files(folder) if f.startswith(under)),
             key=lambda f: os.path.getsize(os.path.join(folder, f)))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_every_file_of_an_orbax_folder_damaged(saved, tmp_path, how):
  _, orb, _, want = saved
  refused = {}
  for rel in _files(orb):
    copy = str(tmp_path / rel.replace("/", "_"))
    shutil.copytree(orb, copy)
    _damage(os.path.join(copy, rel), how)
    refused[rel] = _refused_or_identical(copy, want, rel)
    shutil.rmtree(copy)
  data = _largest(orb, "params/ocdbt.process_0/d/")  # the parameters' bytes
  assert "parameter " in refused[data] and "/params" in refused[data], refused[data]
  for side in ("config.json", "tokenizer.json"):
    assert f"file {side}" in refused[side] or "corrupt" in refused[side], refused[side]
  assert refused["lavida_jax.json"] is not None


def test_random_bytes_inside_a_parameter_chunk_are_refused(saved, tmp_path):
  """The issue's failure (a): 200 random bytes inside a chunk used to load silently."""
  _, orb, _, _ = saved
  copy = str(tmp_path / "orbax")
  shutil.copytree(orb, copy)
  path = os.path.join(copy, _largest(copy, "params/ocdbt.process_0/d/"))
  data = bytearray(open(path, "rb").read())
  at = len(data) // 3
  data[at:at + 200] = np.random.default_rng(0).bytes(200)
  open(path, "wb").write(bytes(data))
  with pytest.raises(CheckpointError, match=r"checksum mismatch: parameter \S+ in .*params"):
    lavida_jax.load_pretrained(copy)
  # export reads through the same checks
  with pytest.raises(CheckpointError, match="checksum mismatch: parameter"):
    convert.orbax_to_hf(copy, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_every_file_of_a_safetensors_export_damaged(saved, tmp_path, how):
  _, _, out, want = saved
  shards = [f for f in _files(out) if f.endswith(".safetensors")]
  assert len(shards) > 1
  for rel in _files(out):
    copy = str(tmp_path / rel.replace("/", "_"))
    shutil.copytree(out, copy)
    _damage(os.path.join(copy, rel), how)
    msg = _refused_or_identical(copy, want, rel)
    shutil.rmtree(copy)
    if rel.endswith(".safetensors"):  # the middle byte is data: the tensor is named
      assert msg is not None and rel in msg and "tensor " in msg, (rel, msg)
    if rel in ("config.json", "tokenizer.json"):
      assert msg is not None and (f"file {rel}" in msg or f"{rel} is corrupt" in msg), msg


def test_export_records_a_checksum_of_every_tensor(saved):
  _, _, out, _ = saved
  index = json.load(open(os.path.join(out, INDEX_NAME)))
  for name, fname in index["weight_map"].items():
    f = SafetensorsFile(os.path.join(out, fname))
    assert f.checksums[name] == checksum.of_array(f.get(name))
    f.close()
  assert set(index["metadata"]["crc32"]) == {"config.json", "tokenizer.json"}


def test_released_checkpoints_without_checksums_still_load(saved):
  src, _, _, want = saved
  assert not SafetensorsFile(os.path.join(src, "model.safetensors")).checksums
  assert _refused_or_identical(src, want, "source") is None


# --- training steps -------------------------------------------------------------------

def _state(model):
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tx = optax.adam(1e-3)
  _, opt_state = tx.update(params, tx.init(params), params)  # non-zero moments
  return dict(step=jnp.int32(7), params=params, frozen={},
              opt_state=opt_state, rng=jax.random.key(3))


@pytest.fixture(scope="module")
def step(saved, tmp_path_factory, tiny_tokenizer):
  """A training step saved by train.Checkpoints: (workdir, step folder, state); tests
  damage copies only."""
  tmp_path = tmp_path_factory.mktemp("step")
  src, _, _, _ = saved
  model = lavida_jax.load_pretrained(src)
  state = _state(model)
  tok_path = str(tmp_path / "tokenizer.json")
  tiny_tokenizer._hf.save(tok_path)
  ckpts = train.Checkpoints(str(tmp_path / "work"), 2, json.load(open(f"{src}/config.json")),
                            tok_path, {"system_prompt": "You answer in one word."})
  ckpts.save(state, {"it": 1}, {"skipped": {}}, force=True)
  ckpts.wait()
  ckpts.close()
  return str(tmp_path / "work"), ckpts.step_dir(7), state


def _restore(work, state):
  ckpts = train.Checkpoints(work, 2, None)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  try:
    return ckpts.restore(7, state, dict(shardings, frozen={}))
  finally:
    ckpts.close()


def test_training_step_restores_and_refuses_each_damaged_item(step, tmp_path):
  work, folder, state = step
  new, _, _ = _restore(work, state)
  np.testing.assert_array_equal(new["opt_state"][0].mu["lm"]["embed"],
                                state["opt_state"][0].mu["lm"]["embed"])
  for item, what in (("params", "parameter"), ("opt_state", "optimizer state")):
    for how, message in (("flip", f"checksum mismatch: {what} .* in .*{item}"),
                         ("truncate", f"cannot be read from .*{item}, a truncated")):
      copy = str(tmp_path / f"copy-{item}-{how}")
      shutil.copytree(work, copy)
      step_copy = os.path.join(copy, "checkpoints", "7")
      data = _largest(step_copy, f"{item}/ocdbt.process_0/d/")
      _damage(os.path.join(step_copy, data), how)
      with pytest.raises(CheckpointError, match=message) as e:
        _restore(copy, state)
      assert "\n" not in str(e.value)


def test_a_step_folder_copied_alone_answers_the_same(step, tmp_path, tiny_tokenizer):
  """The issue's failure (b): a step copied without its parent lost generation.json
  (its system prompt) and answered differently."""
  work, folder, _ = step
  alone = str(tmp_path / "elsewhere" / "step7")
  shutil.copytree(folder, alone)
  assert {"config.json", "generation.json", "lavida_jax.json", "tokenizer.json"} <= set(
      os.listdir(os.path.join(alone, "files")))
  answers = []
  for ckpt in (folder, alone, os.path.join(work, "checkpoints")):
    assert generate.system_prompt_for(ckpt) == "You answer in one word."
    model = lavida_jax.load_pretrained(ckpt)
    gen = generate.Generator(model, generate.load_tokenizer_for(ckpt),
                             SamplerConfig(gen_length=8, steps=4, block_length=8,
                                           mask_id=model.cfg.lm.mask_id),
                             cache="prefix",
                             system_prompt=generate.system_prompt_for(ckpt))
    answers.append([r.ids for r in gen([generate.Request("what colour is the circle")])])
  assert answers[0] == answers[1] == answers[2]
  # the system prompt is in the prompt: LaViDa's would be another prompt
  ids = generate.prompt_ids(model, gen.tokenizer, generate.Request("hi"),
                            generate.system_prompt_for(alone))[0]
  default = generate.prompt_ids(model, gen.tokenizer, generate.Request("hi"))[0]
  assert list(ids) != list(default)


def test_a_step_with_a_changed_side_file_is_refused(step, tmp_path):
  _, folder, _ = step
  alone = str(tmp_path / "step")
  shutil.copytree(folder, alone)
  with open(os.path.join(alone, "files", "generation.json"), "w") as f:
    f.write('{"system_prompt": "something else"}')
  with pytest.raises(CheckpointError, match="file generation.json"):
    lavida_jax.load_pretrained(alone)


def test_an_older_step_without_side_files_says_so(step, tmp_path, caplog):
  """Steps written before they were self-contained kept generation.json beside them:
  moved alone, the fallback to LaViDa's system prompt is announced, not silent."""
  _, folder, _ = step
  old = str(tmp_path / "old-step")
  shutil.copytree(folder, old)
  shutil.rmtree(os.path.join(old, "files"))
  with caplog.at_level("WARNING"):
    assert generate.system_prompt_for(old) == generate.text_lib.SYSTEM_PROMPT
  assert "training step without generation.json" in caplog.text
