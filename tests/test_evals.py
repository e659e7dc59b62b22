"""Evaluation math on hand-made data with known answers: VQA normalisation and exact match,
POPE metrics, file reading with skip counting, and the loop with a fixed-answer predictor."""

import json

import pytest

from neo_jax.data.image import ImageError
from neo_jax.errors import UserError
from neo_jax.evals.evaluate import evaluate
from neo_jax.evals.examples import EvalExample, SkipLog, read_eval_file, read_examples
from neo_jax.evals.metrics import normalize_vqa_answer, pope_metrics, vqa_correct, yes_no


@pytest.mark.parametrize(
  "raw, normalized",
  [
    ("Red.", "red"),
    ("  The RED circle!\n", "red circle"),
    ("two", "2"),
    ("There are Three apples", "there are 3 apples"),
    ("none", "0"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("It is 3. Or 4.", "it is 3 or 4"),
    ("don't", "dont"),
    ("red/blue", "red blue"),
    ("an apple", "apple"),
    ("“yes”", "yes"),
  ],
)
def test_vqa_normalisation(raw, normalized):
  assert normalize_vqa_answer(raw) == normalized


def test_vqa_exact_match_against_one_or_several_answers():
  assert vqa_correct("Two.", ["2"])
  assert vqa_correct("the triangle", ["triangle"])
  assert not vqa_correct("a red triangle", ["triangle"])  # exact match, not containment
  assert vqa_correct("Grey", ["gray", "grey"])
  assert not vqa_correct("", ["gray"])


def test_yes_no_reads_the_first_yes_or_no_word():
  assert yes_no("Yes, there is a dog.") == "yes"
  assert yes_no("No.") == "no"
  assert yes_no("There is no dog, yes.") == "no"
  assert yes_no("Not sure") is None
  assert yes_no("yesterday nobody came") is None


def test_pope_metrics_by_hand():
  labels = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
  answers = ["Yes, there is.", "no", "I think yes", "No.", "yes", "There is no dog", "maybe", "yes"]
  m = pope_metrics([yes_no(a) for a in answers], labels)
  # TP = 3 (0, 2, 7), FN = 1 (1), FP = 1 (4), TN = 2 (3, 5), unanswered = 1 (6, label no)
  assert (m["tp"], m["fn"], m["fp"], m["tn"], m["unanswered"]) == (3, 1, 1, 2, 1)
  assert m["accuracy"] == pytest.approx(5 / 8)
  assert m["precision"] == pytest.approx(3 / 4)
  assert m["recall"] == pytest.approx(3 / 4)
  assert m["f1"] == pytest.approx(3 / 4)
  assert m["yes_ratio"] == pytest.approx(4 / 8)


def test_pope_metrics_without_positive_predictions_are_zero_not_nan():
  m = pope_metrics(["no", "no"], ["yes", "no"])
  assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.5)


class FixedAnswers:
  """A predictor with known answers; `bad` names images that fail to load."""

  def __init__(self, answers, bad=()):
    self.answers, self.bad, self.batches = answers, set(bad), []

  def prepare(self, example):
    if example.image_name in self.bad:
      raise ImageError("corrupt_image", f"cannot decode {example.image_name}")
    return example.question

  def answer(self, questions):
    self.batches.append(len(questions))
    return [self.answers[q] for q in questions]


def examples(rows):
  return [
    EvalExample(i + 1, f"/img/{i}.png", f"{i}.png", q, tuple(a)) for i, (q, a) in enumerate(rows)
  ]


def test_vqa_loop_with_known_answers():
  rows = [("q1", ["red"]), ("q2", ["2"]), ("q3", ["circle"]), ("q4", ["green"]), ("q5", ["3.5"])]
  predictor = FixedAnswers(
    {"q1": "Red.", "q2": "two", "q3": "The circle", "q4": "blue", "q5": "3,5"}
  )
  seen = []
  result = evaluate(
    examples(rows), predictor, "vqa", batch_size=2, progress=False, on_record=seen.append
  )
  assert predictor.batches == [2, 2, 1]
  assert [r["correct"] for r in result.records] == [True, True, True, False, False]
  assert result.metrics["accuracy"] == pytest.approx(3 / 5)
  assert result.metrics["examples"] == 5 and result.metrics["skipped_total"] == 0
  assert seen == result.records
  assert result.records[1]["normalized_prediction"] == "2"
  assert result.records[0]["answer"] == "red"


def test_pope_loop_and_bad_images_are_counted():
  rows = [("a", ["yes"]), ("b", ["no"]), ("c", ["yes"]), ("d", ["no"])]
  predictor = FixedAnswers({"a": "Yes.", "b": "Yes", "c": "no", "d": "No"}, bad={"2.png"})
  result = evaluate(examples(rows), predictor, "pope", batch_size=8, progress=False)
  assert [r["pred_label"] for r in result.records] == ["yes", "yes", "no"]
  m = result.metrics
  assert m["examples"] == 3 and m["skipped"] == {"bad_image": 1} and m["skipped_total"] == 1
  assert m["accuracy"] == pytest.approx(2 / 3) and m["precision"] == pytest.approx(1 / 2)
  assert m["recall"] == pytest.approx(1.0) and m["yes_ratio"] == pytest.approx(2 / 3)
  with pytest.raises(UserError, match="2.png"):
    evaluate(examples(rows), predictor, "pope", progress=False, skips=SkipLog(strict=True))


def write_lines(path, lines):
  path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")


def test_reading_a_pope_file_skips_and_counts_bad_lines(tmp_path):
  (tmp_path / "img").mkdir()
  (tmp_path / "img" / "a.png").write_bytes(b"x")
  data = tmp_path / "pope.jsonl"
  write_lines(
    data,
    [
      {"question_id": 1, "image": "img/a.png", "text": "Is there a dog?", "label": "yes"},
      "{not json",
      "",
      {"image": "img/a.png", "text": "Is there a cat?", "label": "maybe"},
      {"image": "img/a.png", "label": "no"},
      {"image": "img/missing.png", "text": "Is there a car?", "label": "no"},
      ["a list"],
      {"image": "img/a.png", "question": "Is there a bus?", "answer": "No"},
    ],
  )
  skips = SkipLog()
  got = read_eval_file(str(data), "pope", skips=skips)
  assert [(e.index, e.question, e.answers) for e in got] == [
    (1, "Is there a dog?", ("yes",)),
    (8, "Is there a bus?", ("no",)),
  ]
  assert got[0].image == str(tmp_path / "img" / "a.png") and got[0].extra == {"question_id": 1}
  assert dict(skips.counts) == {
    "bad_json": 1,
    "bad_label": 1,
    "missing_field": 1,
    "missing_image": 1,
    "not_object": 1,
  }
  assert "pope.jsonl:2" in skips.first["bad_json"]
  with pytest.raises(UserError, match=r"pope.jsonl:2: not valid JSON"):
    read_eval_file(str(data), "pope", skips=SkipLog(strict=True))


def test_reading_a_vqa_file_with_an_image_root_and_answer_lists(tmp_path):
  root = tmp_path / "images"
  root.mkdir()
  (root / "1.png").write_bytes(b"x")
  data = tmp_path / "vqa.jsonl"
  write_lines(
    data,
    [
      {"image": "1.png", "question": "Color?", "answer": "red"},
      {"image": "1.png", "question": "Count?", "answers": ["2", "two"]},
      {"image": "1.png", "question": "Shape?", "answer": 3},
      {"image": str(root / "1.png"), "question": "Abs?", "answer": "yes"},
    ],
  )
  skips = SkipLog()
  got = read_eval_file(str(data), "vqa", image_root=str(root), skips=skips)
  assert [e.answers for e in got] == [("red",), ("2", "two"), ("yes",)]
  assert dict(skips.counts) == {"missing_field": 1}
  assert len(read_eval_file(str(data), "vqa", image_root=str(root), limit=1)) == 1
  with pytest.raises(UserError, match="no such data file"):
    read_eval_file(str(tmp_path / "nope.jsonl"), "vqa")


def test_builtin_easy_vqa_reader():
  vqa = read_examples("easy-vqa:test", "vqa", limit=5)
  assert len(vqa) == 5 and all(isinstance(e.image, bytes) and e.answers for e in vqa)
  pope = read_examples("easy-vqa:test", "pope", limit=5)
  assert len(pope) == 5 and all(e.answers[0] in ("yes", "no") for e in pope)
  with pytest.raises(UserError, match="unknown split"):
    read_examples("easy-vqa:val", "vqa")
