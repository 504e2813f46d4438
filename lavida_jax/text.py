"""Text side of LaViDa (host only, no JAX), one name for its three parts:

  tokenizer.py  `Tokenizer` over tokenizer.json / Dream's BPE / sentencepiece,
                `load_tokenizer`, `SpecialTokens`
  chat.py       chat templates (`format_llada`, `format_dream`), `tokenize_prompt`
                with the image placeholder, the LaViDa system prompt
  labels.py     training examples from LLaVA records (ids + labels), batches, FIM

`text.X` stays the one place callers reach all of them.
"""
# pylint: disable=unused-import
from lavida_jax.chat import (IMAGE_TOKEN, IMAGE_TOKEN_ID, SYSTEM_PROMPT, TEMPLATES,  # noqa: F401
                             Messages, format_dream, format_llada, tokenize_prompt)
from lavida_jax.labels import (IGNORE_ID, bucket_length, build_training_example,  # noqa: F401
                               conversation_from_llava, fim_augment, pad_batch)
from lavida_jax.tokenizer import (QWEN2_PATTERN, SpecialTokens, Tokenizer,  # noqa: F401
                                  load_tokenizer, train_sentencepiece)

__all__ = ["IMAGE_TOKEN", "IMAGE_TOKEN_ID", "SYSTEM_PROMPT", "TEMPLATES", "Messages",
           "format_dream", "format_llada", "tokenize_prompt", "IGNORE_ID", "bucket_length",
           "build_training_example", "conversation_from_llava", "fim_augment", "pad_batch",
           "QWEN2_PATTERN", "SpecialTokens", "Tokenizer", "load_tokenizer",
           "train_sentencepiece"]
