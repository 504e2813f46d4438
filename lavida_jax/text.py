"""Text side of LaViDa (host only, no JAX): tokenizers, chat templates, labels.

One `Tokenizer` over three backends (SPEC §5):
  * a Hugging Face `tokenizer.json` (LLaDA, LLaDA-V);
  * Dream's byte-level BPE, `vocab.json` + `merges.txt` with Qwen2's
    pre-tokenizer and the added tokens of `tokenizer_config.json`;
  * a sentencepiece `.model` (the CPU demo); special strings are
    user-defined symbols.
`encode` never adds BOS/EOS; special tokens written in the text encode to
their single ids.

Training examples follow LaViDa's `preprocess_llada`/`preprocess_dream`: one
QA turn per example; ids `[T]` and labels `[T]` (IGNORE_ID except on the
answer and the end of its turn). The image is the placeholder id
IMAGE_TOKEN_ID in the ids; the model splices the image features there.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = -200
IGNORE_ID = -100
SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to "
    "understand the visual content that the user provides, and assist the "
    "user with a variety of tasks using natural language.")

# Qwen2's pre-tokenizer split (Dream's tokenizer uses it unchanged).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

Messages = Sequence[Mapping[str, str]]


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


# -------------------------------------------------------------- tokenizers --


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


# ---------------------------------------------------------- chat templates --


@dataclasses.dataclass(frozen=True)
class _Chat:
  begin: str   # once, before the first turn
  header: str  # opens a turn; "{role}" is filled in
  end: str     # closes a turn
  strip: bool  # the template trims message content

  def body(self, content: str) -> str:
    return (content.strip() if self.strip else content) + self.end

  def turn(self, role: str, content: str) -> str:
    return self.header.format(role=role) + self.body(content)


# LLaDA's template is Llama-3's (content `| trim`med) with its own BOS; Dream's
# is Qwen2.5's ChatML.
_CHATS = {
    "llada": _Chat("<|startoftext|>",
                   "<|start_header_id|>{role}<|end_header_id|>\n\n",
                   "<|eot_id|>", strip=True),
    "dream": _Chat("", "<|im_start|>{role}\n", "<|im_end|>\n", strip=False),
}
_ROLES = ("system", "user", "assistant")


def _format(chat: _Chat, messages: Messages, add_generation_prompt: bool,
            system_prompt: str | None) -> str:
  messages = list(messages)
  for i, m in enumerate(messages):
    if m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
      raise ValueError(f"message {i} is {m!r}; expected a role in {_ROLES} "
                       "and a string content")
  if system_prompt is not None and (not messages
                                    or messages[0]["role"] != "system"):
    messages.insert(0, {"role": "system", "content": system_prompt})
  text = chat.begin + "".join(chat.turn(m["role"], m["content"])
                              for m in messages)
  if add_generation_prompt:
    text += chat.header.format(role="assistant")
  return text


def format_llada(messages: Messages, add_generation_prompt: bool = True,
                 system_prompt: str | None = SYSTEM_PROMPT) -> str:
  """`<|startoftext|>` + `<|start_header_id|>{role}<|end_header_id|>\\n\\n
  {content}<|eot_id|>` per message (+ the assistant header).

  Content is stripped as LLaDA's template does (`| trim`). A system message
  with `system_prompt` is prepended unless one is given (None: none).
  """
  return _format(_CHATS["llada"], messages, add_generation_prompt,
                 system_prompt)


def format_dream(messages: Messages, add_generation_prompt: bool = True,
                 system_prompt: str | None = SYSTEM_PROMPT) -> str:
  """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message
  (+ `<|im_start|>assistant\\n`); system message as in `format_llada`."""
  return _format(_CHATS["dream"], messages, add_generation_prompt,
                 system_prompt)


TEMPLATES = {"llada": format_llada, "dream": format_dream}


def tokenize_prompt(text: str, tokenizer: Tokenizer,
                    reference_compat: bool = False,
                    bos_id: int | None = None) -> list[int]:
  """Encodes `text` with IMAGE_TOKEN_ID in place of each `<image>`.

  The text between markers is encoded piece by piece. `reference_compat`
  reproduces LLaVA's `tokenizer_image_token` (SPEC §13): when the first
  piece starts with `bos_id`, the first token of every piece after an
  `<image>` is dropped. For LaViDa-L's `<image>\\n{question}` that is the
  "\\n" token; Dream prompts have no BOS (`bos_id=None`), so nothing is.
  Training (`build_training_example`) always keeps it.
  """
  pieces = [tokenizer.encode(p) for p in text.split(IMAGE_TOKEN)]
  drop = int(reference_compat and bos_id is not None
             and pieces[0][:1] == [bos_id])
  ids = list(pieces[0])
  for piece in pieces[1:]:
    ids += [IMAGE_TOKEN_ID] + piece[drop:]
  return ids


# ---------------------------------------------------------- training data --

_LLAVA_ROLES = {"human": "user", "gpt": "assistant"}


def _image_first(value: str) -> str:
  """LLaVA's `preprocess_multimodal`: a lone `<image>` moves to the front."""
  if value.count(IMAGE_TOKEN) == 1 and not value.startswith(IMAGE_TOKEN):
    value = IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()
    value = value.strip()
  return value


def conversation_from_llava(record: Mapping | Sequence[Mapping]) -> list[dict]:
  """LLaVA `conversations` (from human/gpt, value) -> chat messages.

  Turns must alternate human, gpt, ..., and end with gpt. A single `<image>`
  inside a turn is moved to its front as `<image>\\n` (as LLaVA's loader does).
  """
  if isinstance(record, Mapping):
    where = f"record {record.get('id', '?')!r}"
    turns = record.get("conversations")
  else:
    where, turns = "conversation", record
  if not turns:
    raise ValueError(f"{where} has an empty conversation")
  messages = []
  for i, turn in enumerate(turns):
    expected = ("human", "gpt")[i % 2]
    source = turn.get("from") if isinstance(turn, Mapping) else None
    if source not in _LLAVA_ROLES:
      raise ValueError(f"{where} turn {i}: 'from' is {source!r}, expected "
                       "'human' or 'gpt'")
    if source != expected:
      raise ValueError(f"{where} turn {i} is from {source!r}, expected "
                       f"{expected!r}: turns must alternate human, gpt")
    if not isinstance(turn.get("value"), str):
      raise ValueError(f"{where} turn {i}: 'value' must be a string")
    messages.append({"role": _LLAVA_ROLES[source],
                     "content": _image_first(turn["value"])})
  if len(messages) % 2:
    raise ValueError(f"{where} ends with an unanswered human turn")
  return messages


def _qa_pairs(messages: Messages) -> tuple[str | None, list[tuple[str, str]]]:
  """(system content or None, [(question, answer), ...]) of a chat."""
  messages = list(messages)
  system = None
  if messages and messages[0].get("role") == "system":
    system = messages.pop(0)["content"]
  roles = [m.get("role") for m in messages]
  if not messages or len(messages) % 2 or roles != ["user", "assistant"] * (
      len(messages) // 2):
    raise ValueError(f"expected turns user, assistant, user, ... ending with "
                     f"assistant, got roles {roles}")
  return system, [(q["content"], a["content"])
                  for q, a in zip(messages[::2], messages[1::2])]


def build_training_example(
    example: Mapping | Messages, tokenizer: Tokenizer, template: str,
    rng: np.random.Generator, specials: SpecialTokens, *,
    has_image: bool | None = None, system_prompt: str | None = SYSTEM_PROMPT,
    fim: tuple[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One LaViDa training example: `(input_ids [T], labels [T])`, int32.

  `example` is a LLaVA record (`conversations`, optional `image`) or chat
  messages. As LaViDa's `preprocess_llada`/`preprocess_dream` do:
    * one QA pair is drawn uniformly; the other turns are dropped (not kept
      as context). When the example has an image and the drawn question has
      no `<image>` (LLaVA data puts it in the first question only), the
      question becomes `<image>\\n{question}`;
    * ids = BOS + system turn + user turn + assistant header + answer,
      each encoded on its own ("\\n" after `<image>` kept); `<image>` ->
      IMAGE_TOKEN_ID. (LaViDa encodes the assistant turn whole and ignores
      its first 6 (LLaDA) / 3 (Dream) tokens: the same split, as these
      pre-tokenizers break after the header's newline and special tokens.)
    * labels: IGNORE_ID for system, user and the assistant header; the
      answer and the rest of its turn are labels: `<|eot_id|>` (LLaDA),
      `<|im_end|>` and the "\\n" after it (Dream, whose turns end so).
  `has_image`: default from the record's `image` field, or for messages
  whether any contains `<image>`. `fim=(fim_token, s_token)` applies
  `fim_augment` to the answer (the stage-3 model; `[FIM]` tokens stay
  labels here, the masking excludes them).
  """
  chat = _CHATS[template]
  if not chat.end.startswith(specials.end_of_turn):
    raise ValueError(f"template {template!r} ends turns with {chat.end!r}, "
                     f"but specials.end_of_turn is {specials.end_of_turn!r}")
  if isinstance(example, Mapping):
    messages = conversation_from_llava(example)
    if has_image is None:
      has_image = bool(example.get("image"))
  else:
    messages = list(example)
  system, pairs = _qa_pairs(messages)
  if has_image is None:
    has_image = any(IMAGE_TOKEN in m["content"] for m in messages)
  if system is None:
    system = system_prompt
  question, answer = pairs[rng.integers(len(pairs))]
  if has_image and IMAGE_TOKEN not in question:
    question = IMAGE_TOKEN + "\n" + question
  if not has_image and IMAGE_TOKEN in question:
    raise ValueError(f"question {question!r} has {IMAGE_TOKEN} but the "
                     "example has no image")
  if fim is not None:
    answer = fim_augment(answer, rng, *fim)

  prefix = chat.begin + ("" if system is None else chat.turn("system", system))
  prompt = (tokenizer.encode(prefix)
            + tokenize_prompt(chat.turn("user", question), tokenizer)
            + tokenizer.encode(chat.header.format(role="assistant")))
  target = tokenizer.encode(chat.body(answer))
  if specials.mask_id in prompt or specials.mask_id in target:
    raise ValueError(f"the example's text contains the mask token (id "
                     f"{specials.mask_id}): {question!r} / {answer!r}")
  ids = np.asarray(prompt + target, np.int32)
  labels = np.asarray([IGNORE_ID] * len(prompt) + target, np.int32)
  return ids, labels


def pad_batch(examples: Sequence[tuple[np.ndarray, np.ndarray]], length: int,
              pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads to `[B, length]` with `pad_id` (EOS); pads ARE labels."""
  ids = np.full((len(examples), length), pad_id, np.int32)
  labels = np.full((len(examples), length), pad_id, np.int32)
  for row, (x, y) in enumerate(examples):
    if len(x) != len(y):
      raise ValueError(f"example {row}: {len(x)} ids but {len(y)} labels")
    if len(x) > length:
      raise ValueError(f"example {row} has {len(x)} tokens, more than the "
                       f"padded length {length}")
    ids[row, :len(x)] = x
    labels[row, :len(x)] = y
  return ids, labels


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """Smallest bucket >= n."""
  fits = [b for b in buckets if b >= n]
  if not fits:
    raise ValueError(f"sequence of {n} tokens is longer than the largest "
                     f"bucket {max(buckets, default=None)}")
  return min(fits)


def fim_augment(answer: str, rng: np.random.Generator, fim_token: str = "[FIM]",
                s_token: str = "[S]", p: float = 0.8, max_s: int = 5) -> str:
  """Stage-3 FIM augmentation of an answer (SPEC §6.4; LaViDa infill_utils).

  Words are `answer.split()`. Answers of more than 3 words are augmented
  with probability p: n ~ U{1..min(max(5, floor(0.1·words)), 10)} (at most
  words−1) distinct boundaries *between* words (never before the first or
  after the last) each get a new word `[S]`·k + `[FIM]`, k ~ U{0..max_s},
  written without spaces inside and separated by single spaces from the
  words around it ("a [S][S][FIM] b"). An augmented answer is re-joined
  with single spaces (its original whitespace is not kept); otherwise the
  answer is returned unchanged. For LLaDA's tokenizer the two tokens are
  `<|reserved_token_1|>` (126085, [FIM]) and `<|reserved_token_2|>` (126086,
  [S]), as LaViDa writes them.
  """
  words = answer.split()
  if len(words) <= 3 or rng.random() >= p:
    return answer
  n = rng.integers(1, min(max(5, int(0.1 * len(words))), 10) + 1)
  where = set(rng.choice(np.arange(1, len(words)), min(n, len(words) - 1),
                         replace=False).tolist())
  out = []
  for i, word in enumerate(words):
    if i in where:
      out.append(s_token * int(rng.integers(0, max_s + 1)) + fim_token)
    out.append(word)
  return " ".join(out)
