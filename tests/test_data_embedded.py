"""Embedded easy-vqa / pydoc data: labels, captions, wrong answers, builds, the eval reader."""

import re

import pytest

from neo_jax.config import tiny
from neo_jax.data import embedded as E
from neo_jax.data.image import preprocess_image
from neo_jax.data.pipeline import DataConfig, build_train_iterator
from neo_jax.data.tokenizer import load_tokenizer


def test_image_labels_from_questions():
  qs = [
    "what color is the circle?",
    "is there not a triangle?",  # image 0
    "is there a red shape?",
    "is no rectangle present?",
    "is a circle present?",  # 1
    "does the image not contain a blue shape?",
    "what shape is present?",
  ]  # 2
  ans = ["teal", "yes", "yes", "no", "no", "no", "circle"]
  ids = [0, 0, 1, 1, 1, 2, 2]
  labels = E.image_labels(qs, ans, ids)
  assert labels[0] == ("teal", "circle")
  # image 1: red; "is no rectangle present? no" -> rectangle present
  assert labels[1] == ("red", "rectangle")
  assert labels[2] == ("blue", "circle")
  only_absent = E.image_labels(
    [f"is there a {c} shape?" for c in E.COLORS[:-1]], ["no"] * 7, [5] * 7
  )
  assert only_absent[5] == (E.COLORS[-1], None)  # by elimination; shape unknown
  assert E.caption_for("blue", "circle") == "A blue circle."
  assert E.caption_for(None, "circle") == "A circle."
  assert E.caption_for("red", None) == "A red shape."


def test_wrong_answers_are_plausible_and_deterministic():
  assert E.wrong_answer("yes", "q", 1) == "no" and E.wrong_answer("no", "q", 1) == "yes"
  for family in (E.COLORS, E.SHAPES):
    picks = set()
    for i in range(50):
      w = E.wrong_answer(family[0], f"question {i}", i)
      assert w in family and w != family[0]
      assert w == E.wrong_answer(family[0], f"question {i}", i)
      picks.add(w)
    assert len(picks) == len(family) - 1  # spread over the alternatives
  with pytest.raises(ValueError):
    E.wrong_answer("maybe", "q", 0)
  records = list(E._easy_vqa_records("test", "preference"))
  assert len(records) == 9673
  for r in records[:500]:
    chosen, rejected = r["chosen"], r["rejected"]
    same = [f for f in (E.YES_NO, E.COLORS, E.SHAPES) if chosen in f][0]
    assert rejected in same and rejected != chosen


def test_text_pieces():
  text = "\n\n".join(f"para {i} " + "x" * 300 for i in range(10))
  pieces = E.text_pieces(text, max_chars=700)
  assert all(len(p) <= 700 for p in pieces) and len(pieces) == 5
  assert "\n\n".join(pieces) == text


def test_captions_build_and_match_direct_answers(neo_cache):
  source = E.embedded_source("easy_vqa/captions", "test")
  assert len(source) == 1000 and len(E.embedded_source("easy_vqa/captions", "train")) == 4000
  qs, answers, ids, _ = E._questions("test")
  direct = {i: a for q, a, i in zip(qs, answers, ids) if a in E.COLORS}
  n_checked = 0
  for k in range(len(source)):
    record = source[k]
    assert re.fullmatch(r"A ((\w+) )?(circle|rectangle|triangle|shape)\.", record["caption"])
    image_id = int(record["id"].split("/")[1])
    if image_id in direct:
      assert record["caption"].split()[1] == direct[image_id]
      n_checked += 1
  assert n_checked > 700


def test_vqa_build_eval_reader_and_default_pipelines(neo_cache):
  examples = E.read_vqa_eval()
  assert len(examples) == 9673
  assert {e.answer for e in examples} <= set(E.answers()) and len(E.answers()) == 13
  first = examples[0]
  image = preprocess_image(first.image, tiny().min_pixels, tiny().max_pixels, inference=True)
  assert image.grid == (2, 2)  # 64x64 -> smart_resize -> 2x2 visual tokens
  assert E.read_vqa_eval(limit=5) == examples[:5]
  tok = load_tokenizer()
  for kind, marker in (("sft", "<|im_start|>assistant\n"), ("text", "")):
    it = build_train_iterator(
      DataConfig(kind=kind, seq_len=256, visual_budget=32, batch_size=2), tok, tiny()
    )
    batch = next(it)
    text = tok.decode(batch["input_ids"][0][batch["segment_ids"][0] == 1])
    assert marker in text and it.stats()["samples"] > 0
  assert "easy_vqa/vqa: {'train': 38575, 'test': 9673}" in E.describe()


def test_question_family():
  assert E.question_family("what color is the circle?", "teal") == "color"
  assert E.question_family("what shape is present?", "circle") == "shape"
  assert E.question_family("is there not a red shape?", "no") == "yes_no_color"
  assert E.question_family("is a circle present?", "yes") == "yes_no_shape"
  with pytest.raises(ValueError, match="maybe"):
    E.question_family("is a circle present?", "maybe")
  with pytest.raises(ValueError, match="names no colour or shape"):
    E.question_family("is it present?", "yes")


def test_family_sets_split_the_vqa_set(neo_cache):
  """The four vqa_<family> sets hold every vqa question once, each in its own family."""
  whole = E.embedded_source("easy_vqa/vqa", "test")
  seen = {}
  for family in E.QUESTION_FAMILIES:
    source = E.embedded_source(f"easy_vqa/vqa_{family}", "test")
    assert len(source) > 0
    for k in range(len(source)):
      record = source[k]
      question, answer = (turn["value"] for turn in record["conversations"])
      assert E.question_family(question, answer) == family
      seen[record["id"]] = (question, answer)
  assert len(seen) == len(whole) == 9673
  for k in range(0, len(whole), 97):
    record = whole[k]
    assert seen[record["id"]] == tuple(turn["value"] for turn in record["conversations"])
