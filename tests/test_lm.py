"""The diffusion LMs against transformers' Llama / Qwen2 (bidirectional), via our loader, at 1e-5."""
import numpy as np
import pytest

from tests.conftest import assert_close


@pytest.mark.parametrize("family", ["lavida-llada", "llada-v", "lavida-dream"])
def test_text_logits_match_transformers(loaded, family):
  ref, model = loaded(family)
  ids = np.random.default_rng(0).integers(0, ref.cfg.lm.vocab_size, (2, 13))
  assert_close(model.text_logits(ids), ref.text_logits(ids), rel=1e-5)


def test_dream_structure_is_kept_in_tiny_config(loaded):
  ref, model = loaded("lavida-dream")
  lm = model.lm
  assert lm.cfg.n_heads // lm.cfg.n_kv_heads == 7  # GQA 28/4
  assert lm.blocks.attn.k.kernel.shape[-2] == lm.cfg.n_kv_heads
  assert lm.blocks.attn.q.bias is not None and lm.blocks.attn.o.bias is None
  assert lm.cfg.shifted_logits


def test_attention_is_bidirectional(loaded):
  """Changing the last token changes the logits at the first position."""
  _, model = loaded("lavida-llada")
  ids = np.arange(1, 9)[None]
  ids2 = ids.copy()
  ids2[0, -1] = 100
  a, b = np.asarray(model.text_logits(ids)), np.asarray(model.text_logits(ids2))
  assert np.abs(a[0, 0] - b[0, 0]).max() > 1e-4


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream"])
def test_key_padding_mask_equals_unpadded_rows(loaded, family):
  """Right-padded rows under the key mask give the logits of the short rows alone."""
  ref, model = loaded(family)
  rng = np.random.default_rng(1)
  short = rng.integers(0, 200, (1, 7))
  padded = np.concatenate([short, rng.integers(0, 200, (1, 5))], axis=1)
  valid = np.arange(12)[None] < 7
  out = np.asarray(model.text_logits(padded, valid))[:, :7]
  assert_close(out, ref.text_logits(short), rel=1e-5)
  # Without the mask the padding leaks into the real tokens (what reference_compat keeps).
  leak = np.asarray(model.text_logits(padded))[:, :7]
  assert np.abs(leak - out).max() > 1e-4


@pytest.mark.parametrize("family", ["lavida-llada", "lavida-dream"])
def test_prefix_cache_equals_prefix_dlm_attention(loaded, family):
  """Prefill + canvas-only steps == one forward whose prefix rows cannot see the
  canvas (a 4-D additive mask in transformers); padded prefixes in a batch too."""
  import jax.numpy as jnp
  import torch

  ref, model = loaded(family)
  lm = model.lm
  rng = np.random.default_rng(3)
  prefix = rng.integers(0, 200, (2, 9))
  lengths = [9, 6]  # row 1: a 6-token prompt padded to the 9-token bucket
  valid = np.arange(9)[None] < np.array(lengths)[:, None]
  canvas = rng.integers(0, 200, (2, 5))
  cache, _ = lm.prefill(lm.embed_tokens(jnp.asarray(prefix)), jnp.asarray(valid))
  ours = np.asarray(lm.logits_from_hidden(
      lm.hidden_with_cache(lm.embed_tokens(jnp.asarray(canvas)), cache)))
  emb = ref.lm.get_input_embeddings()
  for b, n in enumerate(lengths):
    seq = np.concatenate([prefix[b, :n], canvas[b]])
    t = len(seq)
    allowed = (np.arange(t)[None, :] < n) | (np.arange(t)[:, None] >= n)
    additive = torch.from_numpy(np.where(allowed, 0.0, -1e30).astype(np.float32))[None, None]
    with torch.no_grad():
      expected = ref.lm(inputs_embeds=emb(torch.from_numpy(seq))[None],
                        attention_mask=additive).logits[0, n:].numpy()
    assert_close(ours[b], expected, rel=1e-5)
