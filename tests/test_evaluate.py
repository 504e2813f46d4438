"""Scoring rules and the evaluation loop (with a stand-in generator of known outputs)."""
import pytest

from lavida_jax import evaluate, generate


def test_normalize_and_choice_letter():
  assert evaluate.normalize_answer("  The Red, circle! ") == "red circle"
  assert evaluate.choice_letter("(b) a cat") == "B"
  assert evaluate.choice_letter("C. dog") == "C"
  assert evaluate.choice_letter("...") is None


def test_constraint_scores_closed_form():
  drafts = ["the sun <|mdm_mask|><|mdm_mask|> over the hill <|mdm_mask|> night",
            "red <|mdm_mask|> blue"]
  outputs = ["the sun rose over the hill at night", "blue then red"]
  s = evaluate.constraint_scores(outputs, drafts)
  # Sample 0 meets its 3 pieces; sample 1 meets "red" but "blue" is not after it.
  assert s["constraint_sentence"] == pytest.approx(4 / 5)
  assert s["constraint_sample"] == pytest.approx(1 / 2)
  assert evaluate.constraint_segments("a [FIM] b <|mdm_mask|>[FIM] c") == ["a", "b", "c"]


def test_caption_scores_rank_correct_above_wrong():
  refs = ["a red circle and a blue square", "a green triangle", "a yellow square"]
  perfect = evaluate.caption_scores(refs, refs)
  wrong = evaluate.caption_scores(["a blue square", "a red circle", "a green circle"], refs)
  assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)
  assert perfect["cider"] > wrong["cider"] and perfect["bleu4"] > wrong["bleu4"]


class _Fixed:
  """Stands in for a Generator: answers from a table, raising on a bad request."""

  def __init__(self, answers):
    self.answers = answers

  def __call__(self, reqs, rng=None):
    for r in reqs:
      if r.prompt == "broken":
        raise ValueError("bad request")
    return [generate.Result(self.answers[r.prompt], [], 5, 0.1) for r in reqs]


def test_evaluate_counts_hits_errors_and_reports_nfe():
  records = [{"prompt": f"q{i}", "answer": "red"} for i in range(5)]
  records.append({"prompt": "broken", "answer": "red"})
  answers = {f"q{i}": "Red." if i < 3 else "blue" for i in range(5)}
  pairs = evaluate.qa_pairs(records)
  out = evaluate.evaluate(_Fixed(answers), pairs, "vqa", batch_size=4)
  assert out["exact_match"] == pytest.approx(3 / 5)
  assert out["n"] == 5 and out["errors"] == 1 and out["nfe"] == 5.0
  assert out["seconds_per_sample"] >= 0
  # Per group (the demo's question kinds): q0, q1, q3 | q2, q4 | the broken one.
  by = evaluate.evaluate(_Fixed(answers), pairs, "vqa", 4, ["a", "a", "b", "a", "b", "c"])
  assert by["exact_match/a"] == pytest.approx(2 / 3) and by["exact_match/b"] == 0.5
  assert "exact_match/c" not in by and by["exact_match"] == out["exact_match"]


def test_qa_pairs_from_llava_records(tmp_path):
  rec = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                             {"from": "gpt", "value": "A"}]}
  (req, ref), = evaluate.qa_pairs([rec], str(tmp_path))
  assert req.image == str(tmp_path / "a.png") and req.prompt == "<image>\nQ?" and ref == "A"
