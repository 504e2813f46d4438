"""The OpenAI chat-completions wire format (SPEC §15), as pydantic models.

Unknown top-level fields are ignored, as OpenAI-compatible servers do (clients
send `user`, `top_p`, ...); the diffusion settings are extra body fields
(vLLM's `extra_body` convention): steps, block_length, schedule, alpha, decoder,
threshold, factor, lookahead, cache, draft.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class ImageURL(BaseModel):
  url: str
  detail: str | None = None


class TextPart(BaseModel):
  type: Literal["text"]
  text: str


class ImagePart(BaseModel):
  type: Literal["image_url"]
  image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
  role: Literal["system", "user", "assistant"]
  content: str | list[Part]


class ChatRequest(BaseModel):
  model_config = ConfigDict(extra="ignore")

  model: str | None = None
  messages: list[Message] = Field(min_length=1)
  max_tokens: int | None = Field(None, ge=1)
  max_completion_tokens: int | None = Field(None, ge=1)  # the newer OpenAI name
  temperature: float | None = Field(None, ge=0)
  stream: bool = False
  n: int = Field(1, ge=1, le=1)  # one answer per request
  seed: int | None = None
  # diffusion settings (extra body)
  steps: int | None = Field(None, ge=1)
  block_length: int | None = Field(None, ge=1)
  schedule: str | None = None
  alpha: float | None = Field(None, gt=0)
  decoder: str | None = None
  threshold: float | None = Field(None, gt=0, le=1)
  factor: float | None = Field(None, gt=0)
  lookahead: int | None = Field(None, ge=0, le=8)
  cache: str | None = None
  draft: str | None = None


class AnswerMessage(BaseModel):
  role: Literal["assistant"] = "assistant"
  content: str


class Choice(BaseModel):
  index: int = 0
  message: AnswerMessage
  finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
  prompt_tokens: int
  completion_tokens: int
  total_tokens: int
  nfe: int  # forward passes (prefill included)
  denoise_seconds: float  # the batch's device time


class ChatCompletion(BaseModel):
  id: str
  object: Literal["chat.completion"] = "chat.completion"
  created: int
  model: str
  choices: list[Choice]
  usage: Usage


class Delta(BaseModel):
  role: Literal["assistant"] | None = None
  content: str | None = None


class ChunkChoice(BaseModel):
  index: int = 0
  delta: Delta
  finish_reason: Literal["stop", "length"] | None = None


class Canvas(BaseModel):
  """The extension field of a streamed chunk: the canvas after a step."""
  step: int
  seconds: float
  tokens: list[str | None]  # each position's text; None where still masked


class ChatChunk(BaseModel):
  id: str
  object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
  created: int
  model: str
  choices: list[ChunkChoice]
  usage: Usage | None = None
  lavida: Canvas | None = None


class ModelCard(BaseModel):
  id: str
  object: Literal["model"] = "model"
  created: int
  owned_by: str = "lavida-jax"


class ModelList(BaseModel):
  object: Literal["list"] = "list"
  data: list[ModelCard]


class ErrorBody(BaseModel):
  message: str
  type: str
  code: str | None = None
  param: str | None = None


class Error(BaseModel):
  error: ErrorBody
