"""Hugging Face hub ids ("org/name") as checkpoints, through the local HF cache.

`resolve("GSAI-ML/...")` downloads (or, offline, finds in the cache) a snapshot
of only what loading needs: config.json, the safetensors weights and index, and
the tokenizer files. The environment is read at call time, not at import:
HF_HOME / HF_HUB_CACHE (where the cache is) and HF_HUB_OFFLINE (never touch the
network; the cache must hold the snapshot). A path that exists locally is
returned unchanged.
"""
from __future__ import annotations

import os
import re

from lavida_jax.checkpoint.shards import CheckpointError

# config, weights, tokenizer files (LLaDA/LLaDA-V tokenizer.json, Dream's BPE,
# a sentencepiece model), the generation settings.
ALLOW_PATTERNS = ["config.json", "generation_config.json", "*.safetensors",
                  "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                  "*.model"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(path: str) -> bool:
  """'org/name' that is not a local path."""
  return bool(_REPO_ID.fullmatch(path)) and not os.path.exists(path)


def cache_dir() -> str:
  """The hub cache as huggingface_hub places it, from the environment now."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.environ["HF_HUB_CACHE"]
  home = os.environ.get("HF_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
  return os.path.join(home, "hub")


def offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(path: str, revision: str | None = None) -> str:
  """A local checkpoint folder for `path` (a folder, or a hub id fetched/cached)."""
  if not is_hub_id(path):
    return path
  import huggingface_hub
  try:
    return huggingface_hub.snapshot_download(
        path, revision=revision, cache_dir=cache_dir(), allow_patterns=ALLOW_PATTERNS,
        local_files_only=offline())
  except Exception as e:  # noqa: BLE001 -- one message whatever the hub raised
    where = "in the cache " + cache_dir() + " (HF_HUB_OFFLINE is set)" if offline() else ""
    raise CheckpointError(f"cannot get checkpoint {path!r}"
                          f"{'@' + revision if revision else ''}: no such local folder, and "
                          "not from the Hugging Face hub"
                          f"{' ' + where if where else ''}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e


def cached_file(repo_id: str, filename: str, revision: str | None = None) -> str | None:
  """`filename` of a hub repo if the local cache holds it; never downloads."""
  if not _REPO_ID.fullmatch(repo_id):
    return None
  import huggingface_hub
  try:
    found = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir(),
                                                   revision=revision)
  except Exception:  # noqa: BLE001 -- an id the hub would refuse is simply not cached
    return None
  return found if isinstance(found, str) else None
