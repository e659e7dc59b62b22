"""`neo-jax eval` end to end on a tiny random model (plumbing: files in, predictions and metrics
out, skips counted), and the training hook's answer function against the same predictions."""

import json

import pytest
from PIL import Image
from test_inference_support import image, random_model, tokenizer

from neo_jax import cli
from neo_jax.convert import save_params
from neo_jax.data.pipeline import read_vqa_eval
from neo_jax.evals.evaluate import metrics_of
from neo_jax.inference.generation import vqa_answer_fn
from neo_jax.inference.loading import load_for_inference

BATCH = "2"
MAX_NEW = "4"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  params, config = random_model()
  root = tmp_path_factory.mktemp("eval")
  return save_params(str(root / "model"), params, config, tokenizer_dir=str(tokenizer().directory))


@pytest.fixture()
def data(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  Image.fromarray(image(64, 64, 1)).save(images / "a.png")
  Image.fromarray(image(96, 64, 2)).save(images / "b.png")
  (images / "broken.png").write_bytes(b"not a png")
  vqa = [
    {"image": "a.png", "question": "What color is the shape?", "answer": "red"},
    "{oops",
    {"image": "b.png", "question": "How many shapes?", "answer": ["1", "one"]},
    {"image": "missing.png", "question": "What shape?", "answer": "circle"},
    {"image": "broken.png", "question": "What shape?", "answer": "circle"},
    {"image": "a.png", "question": "What shape is it?", "answer": "square"},
  ]
  pope = [
    {"image": "images/a.png", "text": "Is there a circle in the image?", "label": "yes"},
    {"image": "images/b.png", "text": "Is there a dog in the image?", "label": "no"},
    {"image": "images/b.png", "text": "Is there a cat in the image?", "label": "unsure"},
  ]
  for name, lines in (("vqa.jsonl", vqa), ("pope.jsonl", pope)):
    (tmp_path / name).write_text(
      "\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n"
    )
  return tmp_path


def run_eval(capsys, *args):
  rc = cli.main(["eval", *args])
  captured = capsys.readouterr()
  return rc, captured.out, captured.err


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_vqa_end_to_end(ckpt, data, capsys):
  out = str(data / "preds.jsonl")
  rc, stdout, stderr = run_eval(
    capsys,
    "--checkpoint",
    ckpt,
    "--task",
    "vqa",
    "--data",
    str(data / "vqa.jsonl"),
    "--image-root",
    str(data / "images"),
    "--batch-size",
    BATCH,
    "--max-new-tokens",
    MAX_NEW,
    "--out",
    out,
  )
  assert rc == 0, stderr
  records = read_jsonl(out)
  assert [r["index"] for r in records] == [1, 3, 6]
  assert [r["answer"] for r in records] == ["red", ["1", "one"], "square"]
  assert all(isinstance(r["prediction"], str) and isinstance(r["correct"], bool) for r in records)
  metrics = json.load(open(str(data / "preds.metrics.json")))
  assert metrics["examples"] == 3
  assert metrics["skipped"] == {"bad_json": 1, "missing_image": 1, "bad_image": 1}
  assert metrics["accuracy"] == metrics_of("vqa", records)["accuracy"]
  assert "vqa: accuracy" in stdout and "3 samples, 3 skipped" in stdout
  assert "skipped 3 samples" in stderr and "vqa.jsonl:2" in stderr


def test_pope_end_to_end_and_strict(ckpt, data, capsys):
  out = str(data / "pope_preds.jsonl")
  metrics_path = str(data / "m.json")
  args = [
    "--checkpoint",
    ckpt,
    "--task",
    "pope",
    "--data",
    str(data / "pope.jsonl"),
    "--batch-size",
    BATCH,
    "--max-new-tokens",
    MAX_NEW,
    "--out",
    out,
  ]
  rc, stdout, stderr = run_eval(capsys, *args, "--metrics", metrics_path)
  assert rc == 0, stderr
  records = read_jsonl(out)
  assert [r["label"] for r in records] == ["yes", "no"]
  assert all(r["pred_label"] in ("yes", "no", None) for r in records)
  metrics = json.load(open(metrics_path))
  assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= set(metrics)
  assert metrics["skipped"] == {"bad_label": 1}
  expected = metrics_of("pope", records)
  assert all(metrics[k] == expected[k] for k in expected)

  rc, _, stderr = run_eval(capsys, *args, "--strict")
  assert rc == 2 and "pope.jsonl:3" in stderr and len(stderr.strip().splitlines()) == 1


def test_training_hook_answers_equal_the_eval_predictions(ckpt, tmp_path, capsys):
  out = str(tmp_path / "easy.jsonl")
  rc, _, stderr = run_eval(
    capsys,
    "--checkpoint",
    ckpt,
    "--task",
    "vqa",
    "--data",
    "easy-vqa:test",
    "--limit",
    "3",
    "--batch-size",
    BATCH,
    "--max-new-tokens",
    MAX_NEW,
    "--out",
    out,
  )
  assert rc == 0, stderr
  records = read_jsonl(out)
  model = load_for_inference(ckpt)
  answer = vqa_answer_fn(
    model.config, model.tokenizer, max_new_tokens=int(MAX_NEW), batch_size=int(BATCH)
  )
  examples = read_vqa_eval("test", limit=3)
  assert [r["question"] for r in records] == [e.question for e in examples]
  assert answer(model.params, examples) == [r["prediction"] for r in records]


def test_eval_flag_errors(ckpt, data, capsys):
  base = ["--checkpoint", ckpt, "--task", "vqa"]
  rc, _, err = run_eval(capsys, *base, "--data", str(data / "nope.jsonl"))
  assert rc == 2 and "nope.jsonl" in err
  rc, _, err = run_eval(capsys, *base, "--data", str(data / "vqa.jsonl"), "--batch-size", "0")
  assert rc == 2 and "--batch-size" in err
  empty = data / "empty.jsonl"
  empty.write_text("{oops\n")
  rc, _, err = run_eval(capsys, *base, "--data", str(empty))
  assert rc == 2 and "no usable samples" in err and "bad_json 1" in err
