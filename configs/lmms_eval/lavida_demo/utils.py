"""Document hooks and metrics of the lavida_demo tasks (lmms-eval `!function`s).

The metrics are `lavida_jax.evaluate`'s own (VQA-normalised exact match; CIDEr and
BLEU-4 over the whole split with pycocoevalcap), so the same answers give the same
scores through lmms-eval and through `python -m lavida_jax.evaluate`.
"""
from PIL import Image

from lavida_jax import evaluate
from lavida_jax.data import demo, shapes


def doc_to_visual(doc):
  return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
  return doc["question"]  # "<image>\n..." as in the demo's records


def vqa_process_results(doc, results):
  return {"exact_match": float(evaluate.score("vqa", results[:1], [doc["answer"]])["exact_match"])}


def caption_process_results(doc, results):
  pair = {"prediction": results[0], "reference": doc["answer"]}
  return {"exact_match": vqa_process_results(doc, results)["exact_match"],
          "cider": pair, "bleu4": pair}


def _corpus(items, key):
  return evaluate.caption_scores([p["prediction"] for p in items],
                                 [p["reference"] for p in items])[key]


def cider(items):
  return _corpus(items, "cider")


def bleu4(items):
  return _corpus(items, "bleu4")


def doc_to_choice(doc):
  """Every answer of the question's kind: numbers, shapes or colours."""
  if doc["kind"] == "count":
    return list(demo.NUMBERS[1:])
  if doc["kind"] == "shape_of_colour":
    return list(shapes.SHAPES)
  return list(shapes.COLOURS)


def doc_to_target_index(doc):
  return doc_to_choice(doc).index(doc["answer"])
