"""Training examples (host only): LLaVA records -> ids and labels, batches, FIM.

They follow LaViDa's `preprocess_llada`/`preprocess_dream`: one QA turn per
example; ids `[T]` and labels `[T]` (IGNORE_ID except on the answer and the end
of its turn). The image is the placeholder id IMAGE_TOKEN_ID in the ids; the
model splices the image features there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lavida_jax.chat import CHATS, IMAGE_TOKEN, SYSTEM_PROMPT, Messages, tokenize_prompt
from lavida_jax.tokenizer import SpecialTokens, Tokenizer

IGNORE_ID = -100

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
  chat = CHATS[template]
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
