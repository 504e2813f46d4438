"""Tokenizers (host only, no JAX): one `Tokenizer` over three backends (SPEC §5).

  * a Hugging Face `tokenizer.json` (LLaDA, LLaDA-V);
  * Dream's byte-level BPE, `vocab.json` + `merges.txt` with Qwen2's
    pre-tokenizer and the added tokens of `tokenizer_config.json`;
  * a sentencepiece `.model` (the CPU demo); special strings are
    user-defined symbols.
`encode` never adds BOS/EOS; special tokens written in the text encode to
their single ids.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

# Qwen2's pre-tokenizer split (Dream's tokenizer uses it unchanged).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Ids the model needs; `end_of_turn` is the string closing a chat turn."""
  mask_id: int
  eos_id: int
  pad_id: int
  bos_id: int | None
  end_of_turn: str

  @classmethod
  def llada(cls) -> SpecialTokens:
    return cls(126336, 126081, 126081, 126080, "<|eot_id|>")

  @classmethod
  def dream(cls) -> SpecialTokens:
    return cls(151666, 151643, 151643, None, "<|im_end|>")


class Tokenizer:
  """Encode/decode over a `tokenizers.Tokenizer` or a sentencepiece model."""

  def __init__(self, backend: tokenizers.Tokenizer | spm.SentencePieceProcessor,
               name: str = "tokenizer"):
    self.name = name
    if isinstance(backend, tokenizers.Tokenizer):
      self._hf, self._sp = backend, None
      self._size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    elif isinstance(backend, spm.SentencePieceProcessor):
      self._hf, self._sp = None, backend
      self._size = backend.get_piece_size()
      self._sp_special = _sentencepiece_special_ids(backend)
    else:
      raise TypeError(f"{name}: unsupported tokenizer backend {type(backend)}")

  @classmethod
  def from_tokenizer_json(cls, path: str) -> Tokenizer:
    return cls(tokenizers.Tokenizer.from_file(path), name=path)

  @classmethod
  def from_bpe_files(cls, vocab: str, merges: str,
                     added_tokens: Mapping[int, tuple[str, bool]] | None = None,
                     name: str | None = None) -> Tokenizer:
    """Qwen2/Dream byte-level BPE; `added_tokens`: id -> (content, special)."""
    vocab_map, merge_list = models.BPE.read_file(vocab, merges)
    added_tokens = added_tokens or {}
    # Added tokens enter the model's vocabulary under their own ids (which
    # need not follow the BPE ids), then are registered so they split text.
    vocab_map.update({c: i for i, (c, _) in added_tokens.items()})
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab_map, merges=merge_list))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN2_PATTERN), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([tokenizers.AddedToken(c, special=s, normalized=False)
                    for _, (c, s) in sorted(added_tokens.items())])
    return cls(tok, name=name or os.path.dirname(vocab))

  @classmethod
  def from_sentencepiece(cls, path: str) -> Tokenizer:
    return cls(spm.SentencePieceProcessor(model_file=path), name=path)

  def encode(self, text: str) -> list[int]:
    if self._sp is not None:
      return self._sp.encode(text, out_type=int)
    return self._hf.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int],
             skip_special_tokens: bool = False) -> str:
    ids = [int(i) for i in ids]
    if self._sp is None:
      return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
    if skip_special_tokens:
      ids = [i for i in ids if i not in self._sp_special]
    return self._sp.decode(ids)

  def token_to_id(self, token: str) -> int | None:
    if self._hf is not None:
      return self._hf.token_to_id(token)
    i = self._sp.piece_to_id(token)
    unknown = self._sp.is_unknown(i) and token != self._sp.id_to_piece(i)
    return None if unknown else i

  def id_to_token(self, i: int) -> str | None:
    if self._hf is not None:
      return self._hf.id_to_token(i)
    return self._sp.id_to_piece(i) if 0 <= i < self._size else None

  @property
  def vocab_size(self) -> int:
    """Size of the id space (largest id + 1): the embedding rows needed."""
    return self._size

  def __len__(self) -> int:
    return self._size

  def __repr__(self) -> str:
    kind = "sentencepiece" if self._sp is not None else "tokenizers"
    return f"Tokenizer({kind}, {self.name!r}, vocab_size={self._size})"


def _sentencepiece_special_ids(sp: spm.SentencePieceProcessor) -> frozenset:
  """Control, unknown and user-defined pieces (skip_special_tokens drops)."""
  special = {i for i in range(sp.get_piece_size())
             if sp.is_control(i) or sp.is_unknown(i)}
  try:
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf
  except ImportError:
    return frozenset(special)
  model_proto = sentencepiece_model_pb2.ModelProto
  proto = model_proto.FromString(sp.serialized_model_proto())
  user = model_proto.SentencePiece.USER_DEFINED
  special |= {i for i, p in enumerate(proto.pieces) if p.type == user}
  return frozenset(special)


def _read_added_tokens(folder: str) -> dict[int, tuple[str, bool]]:
  """id -> (content, special): added_tokens.json, tokenizer_config.json."""
  added = {}
  path = os.path.join(folder, "added_tokens.json")
  if os.path.exists(path):
    with open(path) as f:
      added.update({int(i): (c, True) for c, i in json.load(f).items()})
  path = os.path.join(folder, "tokenizer_config.json")
  if os.path.exists(path):
    with open(path) as f:
      decoder = json.load(f).get("added_tokens_decoder", {})
    added.update({int(i): (t["content"], bool(t.get("special", True)))
                  for i, t in decoder.items()})
  return added


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a tokenizer file or folder, picking the backend from its files.

  Folder: `tokenizer.json`, else `vocab.json` + `merges.txt` (Dream), else a
  single `*.model` (sentencepiece). File: `*.json` or `*.model`.
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    if path.endswith(".model"):
      return Tokenizer.from_sentencepiece(path)
    if path.endswith(".json"):
      return Tokenizer.from_tokenizer_json(path)
    raise ValueError(f"tokenizer file {path}: expected a tokenizer.json or a "
                     "sentencepiece .model file")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer path {path} does not exist")
  files = set(os.listdir(path))
  if "tokenizer.json" in files:
    return Tokenizer.from_tokenizer_json(os.path.join(path, "tokenizer.json"))
  if {"vocab.json", "merges.txt"} <= files:
    return Tokenizer.from_bpe_files(
        os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"),
        _read_added_tokens(path), name=path)
  sp_models = glob.glob(os.path.join(path, "*.model"))
  if len(sp_models) == 1:
    return Tokenizer.from_sentencepiece(sp_models[0])
  raise ValueError(
      f"no tokenizer in {path}: expected tokenizer.json, vocab.json + "
      f"merges.txt, or one sentencepiece *.model; found {sorted(files)}")


def train_sentencepiece(sentences: Iterable[str], path: str, vocab_size: int,
                        user_defined_symbols: Sequence[str] = ()) -> Tokenizer:
  """Trains a byte-fallback BPE sentencepiece model (the CPU demo's).

  Text is kept verbatim (identity normalisation, whitespace and newlines
  kept, no dummy "▁" prefix), so pieces of a chat template encoded one by
  one concatenate to the encoding of the whole, as with the BPE tokenizers.
  `vocab_size` is a soft limit (small corpora give fewer pieces).
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model,
      vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
      user_defined_symbols=list(user_defined_symbols),
      normalization_rule_name="identity", add_dummy_prefix=False,
      remove_extra_whitespaces=False, hard_vocab_limit=False,
      split_digits=True, minloglevel=2)
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return Tokenizer.from_sentencepiece(path)
