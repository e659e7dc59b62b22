"""Embedded data: easy-vqa images and questions, and English text from the standard library.

Everything here is built from installed packages (no network) into TFDS array_record data sets
under `<cache>/tfds`, once, on first use:

    easy_vqa captions     one caption per image, e.g. "A blue circle."; colour and shape are
                          derived from the image's questions (direct answers, yes/no answers,
                          and elimination); an unknown part is left out ("A blue shape.")
    easy_vqa vqa          one single-turn conversation per question: question -> the one-word
                          answer (13 answers)
    easy_vqa vqa_<family> the vqa conversations of one question family
                          (QUESTION_FAMILIES): colour or shape named ("what color is the
                          shape?"), or yes/no about a named colour or shape ("is there not a
                          red shape?"), so that a mix can weigh the families apart
    easy_vqa preference   the same questions; chosen = the right answer, rejected = a plausible
                          wrong one from the same family (yes <-> no, another colour, another
                          shape), picked deterministically from a hash of the question
    pydoc text            `pydoc_data/topics.py` (Python's own docs), paragraphs grouped into
                          pieces of at most ~1500 characters

Each has a train and a test split (easy-vqa's own 4000 / 1000 images; for text every tenth
topic is held out). `read_vqa_eval()` gives the easy-vqa test questions for VQA accuracy.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import json
import pathlib
import re
import time
import zlib
from collections.abc import Iterator

from neo_jax.data.cache import cache_root
from neo_jax.data.stats import logger
from neo_jax.data.tfds_sources import TfdsSource, build_tfds, built_dir, is_built
from neo_jax.data.tokenizer import NeoTokenizer, load_tokenizer, subset_tokenizer_dir

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
# question families (finer than the evaluation's three answer families): what the answer
# names, and what a yes/no question asks about
QUESTION_FAMILIES = ("color", "shape", "yes_no_color", "yes_no_shape")

EASY_VQA = "easy_vqa"
PYDOC = "pydoc"
# embedded data set -> (record kind, config name)
DATASETS = {
  "easy_vqa/captions": ("caption", EASY_VQA),
  "easy_vqa/vqa": ("conversation", EASY_VQA),
  **{f"easy_vqa/vqa_{f}": ("conversation", f"{EASY_VQA}_{f}") for f in QUESTION_FAMILIES},
  "easy_vqa/preference": ("preference", EASY_VQA),
  "pydoc/text": ("text", PYDOC),
}
TEXT_PIECE_CHARS = 1500


def tfds_dir() -> pathlib.Path:
  return cache_root() / "tfds"


# --- easy-vqa ---------------------------------------------------------------------------------


def _questions(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
  import easy_vqa

  if split == "train":
    (qs, answers, ids), paths = easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
  elif split == "test":
    (qs, answers, ids), paths = easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
  else:
    raise ValueError(f"easy_vqa has splits 'train' and 'test', not {split!r}")
  return list(qs), list(answers), [int(i) for i in ids], dict(paths)


def _words(question: str) -> list[str]:
  return re.findall(r"[a-z]+", question.lower())


def image_labels(
  questions: list[str], answers: list[str], image_ids: list[int]
) -> dict[int, tuple[str | None, str | None]]:
  """image id -> (colour or None, shape or None), derived from the image's questions.

  A colour / shape answer names it directly; a colour question about a named shape ("what
  color is the circle?") names the shape too; a yes/no answer about a named colour or shape
  says it is present or absent ("is there not a red shape?" -> "no" means present); when all
  but one are absent, the remaining one is it.
  """
  present = collections.defaultdict(lambda: (set(), set()))
  absent = collections.defaultdict(lambda: (set(), set()))
  for q, a, i in zip(questions, answers, image_ids):
    words = _words(q)
    q_colors = [w for w in words if w in COLORS]
    q_shapes = [w for w in words if w in SHAPES]
    if a in COLORS:
      present[i][0].add(a)
      present[i][1].update(q_shapes)
    elif a in SHAPES:
      present[i][1].add(a)
      present[i][0].update(q_colors)
    elif a in YES_NO:
      negated = "not" in words or "no" in words
      target = present if (a == "yes") != negated else absent
      target[i][0].update(q_colors)
      target[i][1].update(q_shapes)
  labels = {}
  for i in set(image_ids):
    out = []
    for k, options in ((0, COLORS), (1, SHAPES)):
      known = present[i][k] or (set(options) - absent[i][k])
      out.append(next(iter(known)) if len(known) == 1 else None)
    labels[i] = (out[0], out[1])
  return labels


def answer_kind(answer: str) -> str:
  """easy-vqa's three answer families ("color", "shape", "yes/no"), for the per-family
  accuracy (neo_jax.evals.easy_vqa.FAMILIES)."""
  if answer in COLORS:
    return "color"
  if answer in SHAPES:
    return "shape"
  return "yes/no"


def question_family(question: str, answer: str) -> str:
  """One of QUESTION_FAMILIES: the answer's kind when it names a colour or a shape, else
  "yes_no_color" or "yes_no_shape" by the word the question names ("is a circle present?" ->
  yes_no_shape)."""
  kind = answer_kind(answer)
  if kind != "yes/no":
    return kind
  if answer not in YES_NO:
    raise ValueError(f"easy_vqa answer {answer!r} is not yes/no, a colour or a shape")
  words = _words(question)
  if any(w in SHAPES for w in words):
    return "yes_no_shape"
  if any(w in COLORS for w in words):
    return "yes_no_color"
  raise ValueError(f"easy_vqa yes/no question {question!r} names no colour or shape")


def caption_for(color: str | None, shape: str | None) -> str:
  """ "A blue circle.", with the unknown part left out: "A blue shape.", "A circle."."""
  return f"A {color + ' ' if color else ''}{shape or 'shape'}."


def wrong_answer(answer: str, question: str, image_id: int) -> str:
  """A plausible wrong answer of the same family, chosen deterministically."""
  if answer in YES_NO:
    return "no" if answer == "yes" else "yes"
  family = COLORS if answer in COLORS else SHAPES if answer in SHAPES else None
  if family is None:
    raise ValueError(f"easy_vqa answer {answer!r} is not yes/no, a colour or a shape")
  others = [x for x in family if x != answer]
  return others[zlib.crc32(f"{image_id}|{question}".encode()) % len(others)]


def _read_png(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _easy_vqa_records(split: str, what: str) -> Iterator[dict]:
  qs, answers, ids, paths = _questions(split)
  pngs = {i: _read_png(p) for i, p in paths.items()}
  if what == "captions":
    labels = image_labels(qs, answers, ids)
    for i in sorted(pngs):
      color, shape = labels.get(i, (None, None))
      yield {
        "kind": "caption",
        "images": [pngs[i]],
        "caption": caption_for(color, shape),
        "id": f"{split}/{i}",
      }
    return
  family = what.removeprefix("vqa_") if what.startswith("vqa_") else None
  for k, (q, a, i) in enumerate(zip(qs, answers, ids)):
    rid = f"{split}/{i}/{k}"
    if family and question_family(q, a) != family:
      continue
    if what == "vqa" or family:
      yield {
        "kind": "conversation",
        "images": [pngs[i]],
        "system": "",
        "id": rid,
        "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
      }
    else:
      yield {
        "kind": "preference",
        "images": [pngs[i]],
        "id": rid,
        "prompt": [{"from": "human", "value": q}],
        "chosen": a,
        "rejected": wrong_answer(a, q, i),
      }


# --- pydoc text -------------------------------------------------------------------------------


def text_pieces(text: str, max_chars: int = TEXT_PIECE_CHARS) -> list[str]:
  """Paragraph groups of at most max_chars (a longer paragraph is its own piece)."""
  pieces, current = [], ""
  for para in re.split(r"\n\s*\n", text.strip()):
    if current and len(current) + 2 + len(para) > max_chars:
      pieces.append(current)
      current = ""
    current = f"{current}\n\n{para}" if current else para
  if current:
    pieces.append(current)
  return pieces


def _pydoc_records(split: str) -> Iterator[dict]:
  from pydoc_data import topics

  for t, name in enumerate(sorted(topics.topics)):
    if (t % 10 == 0) != (split == "test"):
      continue
    for k, piece in enumerate(text_pieces(topics.topics[name])):
      yield {"kind": "text", "text": piece, "id": f"{name}/{k}"}


# --- building ---------------------------------------------------------------------------------


def _splits(name: str) -> dict:
  if name == "pydoc/text":
    return {s: (lambda s=s: _pydoc_records(s)) for s in ("train", "test")}
  what = name.split("/")[1]
  return {s: (lambda s=s: _easy_vqa_records(s, what)) for s in ("train", "test")}


@contextlib.contextmanager
def _build_lock(directory: pathlib.Path):
  """Serialises builders of the cache across processes on one machine."""
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / ".build.lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def embedded_dir(name: str, build: bool = True) -> pathlib.Path:
  """The TFDS directory of an embedded data set (e.g. "easy_vqa/vqa"), built on first use."""
  if name not in DATASETS:
    raise ValueError(f"unknown embedded data set {name!r}; one of {sorted(DATASETS)}")
  kind, config = DATASETS[name]
  data_dir = tfds_dir()
  directory = built_dir(kind, config, data_dir)
  if build and not is_built(directory):
    with _build_lock(data_dir):
      if not is_built(directory):
        start = time.perf_counter()
        build_tfds(
          kind, config, _splits(name), data_dir, description=f"neo_jax embedded data set {name}"
        )
        logger.info("built %s in %.1f s", name, time.perf_counter() - start)
  return directory


def build_embedded(names: list[str] | None = None) -> dict[str, pathlib.Path]:
  """Builds the embedded data sets (all by default); returns name -> directory."""
  return {name: embedded_dir(name) for name in (names or list(DATASETS))}


def embedded_source(name: str, split: str = "train") -> TfdsSource:
  return TfdsSource(embedded_dir(name), split)


@dataclasses.dataclass(frozen=True)
class VqaExample:
  image: bytes  # PNG bytes (64x64); give to image.preprocess_image(..., inference=True)
  question: str
  answer: str  # one of answers()
  id: str


def answers() -> tuple[str, ...]:
  """easy-vqa's 13 answers."""
  return YES_NO + SHAPES + COLORS


def read_vqa_eval(split: str = "test", limit: int | None = None) -> list[VqaExample]:
  """easy-vqa questions of a split (default: the held-out test split), in a fixed order."""
  source = embedded_source("easy_vqa/vqa", split)
  out = []
  for index in range(len(source)):
    record = source[index]
    if record["kind"] != "conversation":
      continue
    turns = record["conversations"]
    out.append(VqaExample(record["images"][0], turns[0]["value"], turns[1]["value"], record["id"]))
  out.sort(key=lambda e: tuple(int(x) for x in e.id.split("/")[1:]))
  return out[:limit] if limit is not None else out


# --- the easy-vqa tokenizer ---------------------------------------------------------------------

EASY_VQA_TOKENIZER = "easy_vqa"
# what the chat template and the sample formats write around easy-vqa's own text
TEMPLATE_TEXTS = (
  "user",
  "assistant",
  "system",
  "\n",
  "Image-1: ",
  "Image-2: ",
  "shape",
  ".",
  "A ",
  " ",
  "0123456789",
)


def easy_vqa_texts() -> list[str]:
  """Every string the easy-vqa data sets encode: questions, answers, caption words, template
  pieces (the easy-vqa tokenizer keeps exactly the Qwen3 tokens these use)."""
  import easy_vqa

  texts = list(TEMPLATE_TEXTS) + [
    caption_for(c, s) for c in COLORS + (None,) for s in SHAPES + (None,)
  ]
  for questions, answers_, _ in (easy_vqa.get_train_questions(), easy_vqa.get_test_questions()):
    texts.extend(questions)
    texts.extend(answers_)
  return texts


def load_named_tokenizer(name: str = "") -> NeoTokenizer:
  """A training config's `data.tokenizer`: "" the Qwen3 + NEO tokenizer; "easy_vqa" its
  tokens that easy-vqa's text uses (a few hundred ids instead of 151,669: a model trained
  only on easy-vqa needs no bigger head), built into the cache on first use; else an HF
  tokenizer directory."""
  if name == EASY_VQA_TOKENIZER:
    return NeoTokenizer(subset_tokenizer_dir(EASY_VQA_TOKENIZER, easy_vqa_texts))
  return load_tokenizer(name or None)


def describe() -> str:
  """Sizes of the built embedded data sets (for `neo-jax data build-embedded`)."""
  lines = []
  for name in DATASETS:
    directory = embedded_dir(name, build=False)
    if not is_built(directory):
      lines.append(f"{name}: not built")
      continue
    info = json.loads((directory / "dataset_info.json").read_text())
    splits = {s["name"]: sum(int(x) for x in s.get("shardLengths", [])) for s in info["splits"]}
    lines.append(f"{name}: {splits}  ({directory})")
  return "\n".join(lines)
