"""Tests for lavida_jax.text: tokenizers, chat templates, labels, FIM."""

import collections
import json
import re

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from lavida_jax import text

CORPUS = [
    "The red square is left of the blue circle.",
    "What colour is the circle?\nIt is blue.",
    "A green triangle sits above a yellow star.",
    "How many shapes are there? There are three shapes.",
    "I'm sure they've got 12345 shapes  here.\n\nYes, they're drawn.",
    "You are a helpful language and vision assistant.",
]
LLADA_SPECIALS = {
    126080: "<|startoftext|>", 126081: "<|endoftext|>",
    126085: "<|reserved_token_1|>", 126086: "<|reserved_token_2|>",
    126336: "<|mdm_mask|>", 126346: "<|start_header_id|>",
    126347: "<|end_header_id|>", 126348: "<|eot_id|>"}
DREAM_SPECIALS = {
    151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
    151665: "<|beginoftext|>", 151666: "<|mask|>"}
SP_SYMBOLS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>",
              "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BOS, EOS, MASK, SH, EH, EOT = 126080, 126081, 126336, 126346, 126347, 126348
IM_START, IM_END = 151644, 151645

QA = [{"role": "user", "content": "<image>\nWhat colour is the circle?"},
      {"role": "assistant", "content": "It is blue."},
      {"role": "user", "content": "How many shapes are there?"},
      {"role": "assistant", "content": "There are three shapes."}]


def _train_bpe(pre_tokenizer, vocab_size=400):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizer
  tok.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(
      vocab_size=vocab_size, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
  """A byte-level BPE tokenizer.json whose specials sit at LLaDA's real ids."""
  folder = tmp_path_factory.mktemp("llada")
  bpe = _train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False))
  bpe.model.save(str(folder))
  vocab, merges = models.BPE.read_file(str(folder / "vocab.json"),
                                       str(folder / "merges.txt"))
  vocab.update({c: i for i, c in LLADA_SPECIALS.items()})
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
  tok.pre_tokenizer = bpe.pre_tokenizer
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens(list(LLADA_SPECIALS.values()))
  (folder / "vocab.json").unlink()
  (folder / "merges.txt").unlink()
  tok.save(str(folder / "tokenizer.json"))
  return folder


@pytest.fixture(scope="module")
def llada(llada_dir):
  return text.load_tokenizer(str(llada_dir))


@pytest.fixture(scope="module")
def dream_dirs(tmp_path_factory):
  """Dream layout (vocab.json + merges.txt + tokenizer_config.json), and the
  same tokenizer laid out for transformers' Qwen2Tokenizer (specials also in
  vocab.json, since transformers numbers new added tokens consecutively)."""
  ours, ref = (tmp_path_factory.mktemp(n) for n in ("dream", "dream_ref"))
  bpe = _train_bpe(pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(text.QWEN2_PATTERN), "isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
  config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>", "bos_token": None,
            "added_tokens_decoder": {
                str(i): {"content": c, "special": True, "lstrip": False,
                         "rstrip": False, "normalized": False,
                         "single_word": False}
                for i, c in DREAM_SPECIALS.items()}}
  for folder in (ours, ref):
    bpe.model.save(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
  vocab = json.loads((ref / "vocab.json").read_text())
  vocab.update({c: i for i, c in DREAM_SPECIALS.items()})
  (ref / "vocab.json").write_text(json.dumps(vocab))
  return ours, ref


@pytest.fixture(scope="module")
def dream(dream_dirs):
  return text.load_tokenizer(str(dream_dirs[0]))


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("sp") / "demo.model"
  text.train_sentencepiece(CORPUS * 5, str(path), vocab_size=400,
                           user_defined_symbols=SP_SYMBOLS)
  return path


# ------------------------------------------------------------ tokenizers --


def test_llada_tokenizer_matches_transformers(llada, llada_dir):
  from transformers import PreTrainedTokenizerFast
  ref = PreTrainedTokenizerFast(tokenizer_file=str(llada_dir / "tokenizer.json"))
  prompt = text.format_llada(QA)
  for s in [prompt, *CORPUS, "  odd\tspacing\n\n\nend "]:
    assert llada.encode(s) == ref(s, add_special_tokens=False).input_ids
  for i, c in LLADA_SPECIALS.items():
    assert llada.token_to_id(c) == i and llada.encode(c) == [i]
  assert llada.token_to_id("<|not_a_token|>") is None
  assert len(llada) == llada.vocab_size == max(LLADA_SPECIALS) + 1


def test_dream_tokenizer_matches_transformers(dream, dream_dirs):
  from transformers import AutoTokenizer
  ref = AutoTokenizer.from_pretrained(str(dream_dirs[1]))
  assert type(ref).__name__ == "Qwen2Tokenizer"
  prompt = text.format_dream(QA)
  for s in [prompt, *CORPUS, "it's 2025!  x\n\n y", "café"]:
    assert dream.encode(s) == ref(s, add_special_tokens=False).input_ids
  for i, c in DREAM_SPECIALS.items():
    assert dream.token_to_id(c) == i and dream.encode(c) == [i]
  # Qwen2's split: single digits, contractions apart.
  assert len(dream.encode("12345")) == 5


@pytest.mark.parametrize("name", ["llada", "dream", "sp"])
def test_round_trip_and_special_tokens(name, llada, dream, sp_path):
  tok = {"llada": llada, "dream": dream,
         "sp": text.load_tokenizer(str(sp_path))}[name]
  fmt = text.format_dream if name == "dream" else text.format_llada
  prompt = fmt(QA)
  ids = tok.encode(prompt)
  assert tok.decode(ids) == prompt
  assert tok.decode(np.asarray(ids)) == prompt
  plain = tok.decode(ids, skip_special_tokens=True)
  assert "<|" not in plain and "There are three shapes." in plain
  for s in CORPUS:
    assert tok.decode(tok.encode(s)) == s


def test_sentencepiece_backend(sp_path):
  by_file = text.load_tokenizer(str(sp_path))
  by_dir = text.load_tokenizer(str(sp_path.parent))
  s = "<|start_header_id|>user<|end_header_id|>\n\nHow many?<|eot_id|>"
  assert by_file.encode(s) == by_dir.encode(s)
  ids = by_file.encode(s)
  for sym in SP_SYMBOLS:
    i = by_file.token_to_id(sym)
    assert i is not None and by_file.encode(sym) == [i]
  assert ids[0] == by_file.token_to_id("<|start_header_id|>")
  assert ids[-1] == by_file.token_to_id("<|eot_id|>")
  assert by_file.token_to_id("<|nope|>") is None
  # No dummy prefix: pieces encoded one by one concatenate.
  assert by_file.encode("\n\nHow") == by_file.encode("\n\n") + by_file.encode("How")


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
    text.load_tokenizer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="missing"):
    text.load_tokenizer(str(tmp_path / "missing"))


# -------------------------------------------------------- chat templates --


def test_llada_template_is_spec_string():
  want = (
      "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\n"
      "You are a helpful language and vision assistant. You are able to "
      "understand the visual content that the user provides, and assist the "
      "user with a variety of tasks using natural language.<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is shown?"
      "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
  got = text.format_llada([{"role": "user", "content": "<image>\nWhat is shown?"}])
  assert got == want
  assert text.TEMPLATES["llada"] is text.format_llada
  assert text.format_llada([], add_generation_prompt=False,
                           system_prompt=None) == "<|startoftext|>"


def test_dream_template_is_chatml():
  got = text.format_dream([{"role": "user", "content": "Hi"}],
                          system_prompt="Sys")
  assert got == ("<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi"
                 "<|im_end|>\n<|im_start|>assistant\n")
  given = [{"role": "system", "content": "Mine"}, {"role": "user", "content": "Hi"}]
  assert text.format_dream(given).count("system") == 1
  assert "Mine" in text.format_dream(given)


def test_templates_match_jinja_chat_templates():
  """Independent reference: the models' Jinja templates rendered by jinja2."""
  import jinja2
  llada_jinja = (
      "{% for message in messages %}{% set content = '<|start_header_id|>' + "
      "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
      "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + "
      "content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt"
      " %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
  chatml_jinja = (
      "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + "
      "m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt"
      " %}{{ '<|im_start|>assistant\n' }}{% endif %}")
  msgs = [{"role": "system", "content": text.SYSTEM_PROMPT}] + [
      dict(m, content=f"  {m['content']} \n") for m in QA]
  for gen in (True, False):
    want = jinja2.Template(llada_jinja).render(
        messages=msgs, bos_token="<|startoftext|>", add_generation_prompt=gen)
    assert text.format_llada(msgs, add_generation_prompt=gen) == want
    want = jinja2.Template(chatml_jinja).render(
        messages=msgs, add_generation_prompt=gen)
    assert text.format_dream(msgs, add_generation_prompt=gen) == want


def test_llada_prompt_ids(llada):
  enc = llada.encode
  ids = text.tokenize_prompt(
      text.format_llada(QA[:1], system_prompt="Be brief."), llada)
  want = ([BOS, SH] + enc("system") + [EH] + enc("\n\n") + enc("Be brief.")
          + [EOT, SH] + enc("user") + [EH] + enc("\n\n") + [text.IMAGE_TOKEN_ID]
          + enc("\nWhat colour is the circle?") + [EOT, SH] + enc("assistant")
          + [EH] + enc("\n\n"))
  assert ids == want
  assert ids.count(text.IMAGE_TOKEN_ID) == 1
  # The text pieces hold no special ids; "\n" after <image> is kept.
  assert not set(enc("\nWhat colour is the circle?")) & set(LLADA_SPECIALS)
  assert ids[ids.index(text.IMAGE_TOKEN_ID) + 1] == enc("\n")[0]


def test_dream_prompt_ids(dream):
  enc = dream.encode
  ids = text.tokenize_prompt(text.format_dream(QA[:1], system_prompt="S"), dream)
  nl = enc("\n")
  want = ([IM_START] + enc("system") + nl + enc("S") + [IM_END] + nl
          + [IM_START] + enc("user") + nl + [text.IMAGE_TOKEN_ID]
          + enc("\nWhat colour is the circle?") + [IM_END] + nl
          + [IM_START] + enc("assistant") + nl)
  assert ids == want


def test_reference_compat_drops_the_newline_after_image(llada, dream):
  prompt = text.format_llada(QA[:1])
  keep = text.tokenize_prompt(prompt, llada)
  drop = text.tokenize_prompt(prompt, llada, reference_compat=True, bos_id=BOS)
  at = keep.index(text.IMAGE_TOKEN_ID)
  assert keep[at + 1] == llada.encode("\n")[0]
  assert drop == keep[:at + 1] + keep[at + 2:]
  # Two images: one token dropped after each.
  two = text.tokenize_prompt("<|startoftext|>a<image>\nb<image>\nc", llada,
                             reference_compat=True, bos_id=BOS)
  assert two == ([BOS] + llada.encode("a") + [text.IMAGE_TOKEN_ID]
                 + llada.encode("b") + [text.IMAGE_TOKEN_ID] + llada.encode("c"))
  # Dream prompts have no BOS: nothing dropped.
  prompt = text.format_dream(QA[:1])
  assert (text.tokenize_prompt(prompt, dream, reference_compat=True, bos_id=None)
          == text.tokenize_prompt(prompt, dream))


# ------------------------------------------------------- training labels --


def _label_span(ids, labels):
  on = np.flatnonzero(labels != text.IGNORE_ID)
  assert on.size and np.array_equal(on, np.arange(on[0], len(ids))), on
  assert np.array_equal(labels[on], ids[on])
  return on[0]


def test_llada_labels(llada):
  specials = text.SpecialTokens.llada()
  header = llada.encode("<|start_header_id|>assistant<|end_header_id|>\n\n")
  seen = set()
  for seed in range(20):
    ids, labels = text.build_training_example(
        QA, llada, "llada", np.random.default_rng(seed), specials)
    assert ids.dtype == labels.dtype == np.int32 and ids.shape == labels.shape
    start = _label_span(ids, labels)
    assert list(ids[start - len(header):start]) == header
    assert ids[-1] == EOT and llada.decode(ids[start:-1]) in (
        "It is blue.", "There are three shapes.")
    assert list(ids[:2]) == [BOS, SH] and ids.tolist().count(BOS) == 1
    # The image stays, before the sampled question, "\n" kept.
    at = ids.tolist().index(text.IMAGE_TOKEN_ID)
    assert ids.tolist().count(text.IMAGE_TOKEN_ID) == 1
    assert ids[at + 1] == llada.encode("\n")[0]
    # Exactly the one-pair chat, as formatted for inference (+ the answer).
    answer = llada.decode(ids[start:-1])
    question = next(q["content"] for q, a in zip(QA[::2], QA[1::2])
                    if a["content"] == answer)
    if "<image>" not in question:
      question = "<image>\n" + question
    pair = [{"role": "user", "content": question},
            {"role": "assistant", "content": answer}]
    want = text.tokenize_prompt(text.format_llada(pair, add_generation_prompt=False), llada)
    assert ids.tolist() == want
    seen.add(answer)
  assert len(seen) == 2  # both QA pairs get drawn


def test_dream_labels_end_with_im_end_and_newline(dream):
  ids, labels = text.build_training_example(
      QA[:2], dream, "dream", np.random.default_rng(0), text.SpecialTokens.dream())
  start = _label_span(ids, labels)
  nl = dream.encode("\n")
  header = [IM_START] + dream.encode("assistant") + nl
  assert list(ids[start - len(header):start]) == header
  assert list(ids[-2:]) == [IM_END] + nl
  assert dream.decode(ids[start:-2]) == "It is blue."


def test_labels_from_llava_record_and_sentencepiece(sp_path):
  tok = text.load_tokenizer(str(sp_path))
  specials = text.SpecialTokens(
      mask_id=tok.token_to_id("<|mdm_mask|>"), eos_id=tok.token_to_id("<|endoftext|>"),
      pad_id=tok.token_to_id("<|endoftext|>"),
      bos_id=tok.token_to_id("<|startoftext|>"), end_of_turn="<|eot_id|>")
  record = {"id": "x", "image": "a.png", "conversations": [
      {"from": "human", "value": "What colour is the circle?\n<image>"},
      {"from": "gpt", "value": "It is blue."}]}
  ids, labels = text.build_training_example(
      record, tok, "llada", np.random.default_rng(0), specials)
  start = _label_span(ids, labels)
  assert tok.decode(ids[start:-1]) == "It is blue."
  assert ids[-1] == tok.token_to_id("<|eot_id|>")
  prompt = tok.decode(i for i in ids[:start] if i != text.IMAGE_TOKEN_ID)
  assert prompt.endswith("user<|end_header_id|>\n\n\nWhat colour is the circle?"
                         "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_image_added_to_later_question_only_with_image(llada):
  specials = text.SpecialTokens.llada()
  turns = [{"from": "human", "value": "<image>\nQ one?"},
           {"from": "gpt", "value": "A one."},
           {"from": "human", "value": "Q two?"}, {"from": "gpt", "value": "A two."}]
  text_only = [dict(t, value=t["value"].replace("<image>\n", "")) for t in turns]
  answers = set()
  for seed in range(10):
    for record in ({"image": "x.png", "conversations": turns},
                   {"conversations": text_only}):
      ids, labels = text.build_training_example(
          record, llada, "llada", np.random.default_rng(seed), specials)
      start = _label_span(ids, labels)
      answer = llada.decode(ids[start:-1])
      answers.add(answer)
      # Earlier turns are dropped: only the drawn question is in the prompt.
      prompt = llada.decode(ids[:start][ids[:start] >= 0])
      assert ("Q one?" in prompt) == (answer == "A one.")
      assert ("Q two?" in prompt) == (answer == "A two.")
      n_img = ids.tolist().count(text.IMAGE_TOKEN_ID)
      assert n_img == ("image" in record)
  assert answers == {"A one.", "A two."}
  with pytest.raises(ValueError, match="no image"):
    text.build_training_example({"conversations": turns[:2]}, llada, "llada",
                                np.random.default_rng(0), specials)


def test_fim_in_training_example(llada):
  messages = [{"role": "user", "content": "Describe."},
              {"role": "assistant", "content": " ".join(["word"] * 30)}]
  fim = ("<|reserved_token_1|>", "<|reserved_token_2|>")
  counts = []
  for seed in range(20):
    ids, labels = text.build_training_example(
        messages, llada, "llada", np.random.default_rng(seed),
        text.SpecialTokens.llada(), fim=fim)
    counts.append(int(np.sum(labels == 126085)))
  assert max(counts) >= 1 and all(c <= 5 for c in counts)


def test_mask_token_in_text_is_rejected(llada):
  bad = [{"role": "user", "content": "hi <|mdm_mask|>"},
         {"role": "assistant", "content": "ok"}]
  with pytest.raises(ValueError, match="mask token"):
    text.build_training_example(bad, llada, "llada", np.random.default_rng(0),
                                text.SpecialTokens.llada())
  with pytest.raises(ValueError, match="end_of_turn"):
    text.build_training_example(QA, llada, "dream", np.random.default_rng(0),
                                text.SpecialTokens.llada())


def test_conversation_from_llava():
  msgs = text.conversation_from_llava({"conversations": [
      {"from": "human", "value": "Look: <image> what?"},
      {"from": "gpt", "value": "A dog."}]})
  assert msgs == [{"role": "user", "content": "<image>\nLook:  what?"},
                  {"role": "assistant", "content": "A dog."}]


@pytest.mark.parametrize("conversations, match", [
    ([], "empty"),
    ([{"from": "human", "value": "a"}], "unanswered"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], "alternate"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "alternate"),
    ([{"from": "user", "value": "a"}, {"from": "gpt", "value": "b"}], "'from' is 'user'"),
    ([{"value": "a"}, {"from": "gpt", "value": "b"}], "'from' is None"),
])
def test_conversation_errors(conversations, match):
  with pytest.raises(ValueError, match=match):
    text.conversation_from_llava({"id": "r1", "conversations": conversations})


def test_messages_errors(llada):
  with pytest.raises(ValueError, match="user, assistant"):
    text.build_training_example([], llada, "llada", np.random.default_rng(0),
                                text.SpecialTokens.llada())
  with pytest.raises(ValueError, match="user, assistant"):
    text.build_training_example(QA[:1], llada, "llada", np.random.default_rng(0),
                                text.SpecialTokens.llada())


# ------------------------------------------------------- batching --


def test_pad_batch_pads_are_labels():
  a = (np.array([5, 6, 7], np.int32), np.array([-100, 6, 7], np.int32))
  b = (np.array([5], np.int32), np.array([-100], np.int32))
  ids, labels = text.pad_batch([a, b], 6, pad_id=EOS)
  assert ids.shape == labels.shape == (2, 6) and ids.dtype == np.int32
  assert ids.tolist() == [[5, 6, 7, EOS, EOS, EOS], [5, EOS, EOS, EOS, EOS, EOS]]
  assert labels.tolist() == [[-100, 6, 7, EOS, EOS, EOS],
                             [-100, EOS, EOS, EOS, EOS, EOS]]
  with pytest.raises(ValueError, match="example 1 has 3 tokens.*length 2"):
    text.pad_batch([b, a], 2, pad_id=EOS)


def test_bucket_length():
  assert text.bucket_length(100, [256, 128, 512]) == 128
  assert text.bucket_length(128, [256, 128, 512]) == 128
  assert text.bucket_length(129, [256, 128, 512]) == 256
  with pytest.raises(ValueError, match="513 tokens.*512"):
    text.bucket_length(513, [256, 128, 512])


# ------------------------------------------------------- FIM --

_FIM_WORD = re.compile(r"^(\[S\]){0,5}\[FIM\]$")


def _fim_words(s):
  return [w for w in s.split() if "[FIM]" in w]


def test_fim_invariants():
  answer = "the  quick brown\nfox jumps over the lazy dog and runs far away"
  words = answer.split()
  n_max = min(max(5, len(words) // 10), 10)
  for seed in range(300):
    out = text.fim_augment(answer, np.random.default_rng(seed))
    if out == answer:
      continue
    toks = out.split()
    assert [t for t in toks if "[" not in t] == words  # words kept, in order
    inserted = _fim_words(out)
    assert all(_FIM_WORD.match(t) for t in inserted)
    assert all("[" not in t or _FIM_WORD.match(t) for t in toks)
    assert 1 <= len(inserted) <= n_max
    assert "[" not in toks[0] and "[" not in toks[-1]  # interior boundaries
    assert all("[" not in a or "[" not in b for a, b in zip(toks, toks[1:]))
    assert out.count("[FIM]") == len(inserted)


def test_fim_statistics():
  answer = " ".join(f"w{i}" for i in range(120))  # N = min(max(5, 12), 10) = 10
  outs = [text.fim_augment(answer, np.random.default_rng(s)) for s in range(3000)]
  augmented = [o for o in outs if o != answer]
  assert abs(len(augmented) / len(outs) - 0.8) < 0.025
  n = collections.Counter(len(_fim_words(o)) for o in augmented)
  assert set(n) == set(range(1, 11))
  assert abs(np.mean([len(_fim_words(o)) for o in augmented]) - 5.5) < 0.2
  k = collections.Counter(w.count("[S]") for o in augmented for w in _fim_words(o))
  assert set(k) == set(range(6))
  assert abs(np.mean([w.count("[S]") for o in augmented
                      for w in _fim_words(o)]) - 2.5) < 0.1
  # Short answers are never touched; 20 words -> at most 5 insertions.
  assert all(text.fim_augment("one two three", np.random.default_rng(s))
             == "one two three" for s in range(50))
  twenty = " ".join(["x"] * 20)
  assert max(len(_fim_words(text.fim_augment(twenty, np.random.default_rng(s))))
             for s in range(500)) == 5
  # Four words: at most 3 interior boundaries.
  four = "a b c d"
  assert max(len(_fim_words(text.fim_augment(four, np.random.default_rng(s))))
             for s in range(500)) == 3


def test_fim_custom_tokens():
  out = text.fim_augment("a b c d e f", np.random.default_rng(1), "<F>", "<s>")
  assert "<F>" in out or out == "a b c d e f"
  assert "[FIM]" not in out
