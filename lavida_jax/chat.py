"""Chat templates (LLaDA's Llama-3 style, Dream's ChatML) and prompt ids with the
image placeholder (SPEC §5, §13)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from lavida_jax.tokenizer import Tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = -200
SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to "
    "understand the visual content that the user provides, and assist the "
    "user with a variety of tasks using natural language.")

Messages = Sequence[Mapping[str, str]]


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
CHATS = {
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
  return _format(CHATS["llada"], messages, add_generation_prompt,
                 system_prompt)


def format_dream(messages: Messages, add_generation_prompt: bool = True,
                 system_prompt: str | None = SYSTEM_PROMPT) -> str:
  """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message
  (+ `<|im_start|>assistant\\n`); system message as in `format_llada`."""
  return _format(CHATS["dream"], messages, add_generation_prompt,
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
