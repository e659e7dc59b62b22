"""The pipeline end to end: determinism, orbax resume, process sharding, bad input, sources."""

import io
import json
import logging
import re

import grain
import numpy as np
import pytest
from PIL import Image

from neo_jax.config import tiny
from neo_jax.data import pipeline as P
from neo_jax.data import stats as stats_lib
from neo_jax.data.jsonl import JsonlSource
from neo_jax.data.stats import DataError
from neo_jax.data.tfds_sources import build_tfds

N_ITEMS = 40


def png(h, w, seed=0):
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write(r if isinstance(r, str) else json.dumps(r))
      f.write("\n")
  return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("user_data")
  (d / "img").mkdir()
  records = []
  for i in range(N_ITEMS):
    (d / "img" / f"{i}.png").write_bytes(png(32 + 16 * (i % 4), 64, seed=i))
    records.append(
      {
        "image": f"{i}.png",
        "conversations": [
          {"from": "human", "value": f"What is item {i}?"},
          {"from": "gpt", "value": f"It is item {i}."},
        ],
      }
    )
  write_jsonl(d / "conv.jsonl", records)
  write_jsonl(d / "text.jsonl", [{"text": f"Plain text number {i}. " * 3} for i in range(10)])
  write_jsonl(
    d / "pref.jsonl",
    [
      {"image": f"{i}.png", "question": f"Item {i}?", "chosen": f"item {i}", "rejected": "no idea"}
      for i in range(12)
    ],
  )
  # bad input, one of each kind, between good records
  good = png(64, 64, seed=99)
  (d / "img" / "truncated.png").write_bytes(good[: len(good) // 2])
  (d / "img" / "garbage.png").write_bytes(b"\x00garbage" * 20)
  (d / "img" / "zero.png").write_bytes(b"")
  (d / "img" / "thin.png").write_bytes(png(1, 300))
  conv = lambda img: {
    "image": img,
    "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
  }
  write_jsonl(
    d / "bad.jsonl",
    [
      conv("0.png"),
      conv("truncated.png"),
      conv("garbage.png"),
      conv("nowhere.png"),
      conv("zero.png"),
      conv("thin.png"),
      '{"image": "1.png", "conversations": [',
      {"image": "2.png", "conversations": [{"from": "human", "value": "no answer"}]},
      conv("3.png"),
      {"something": "else"},
      conv("4.png"),
    ],
  )
  return d


def config(data_dir, **kw):
  base = dict(
    kind="sft",
    sources=(f"jsonl:{data_dir / 'conv.jsonl'}@{data_dir / 'img'}",),
    seq_len=96,
    visual_budget=16,
    batch_size=2,
    min_pixels=32 * 32,
    max_pixels=64 * 64,
    seed=3,
  )
  base.update(kw)
  return P.DataConfig(**base)


def segment_texts(batch, tok):
  out = []
  for r in range(batch["input_ids"].shape[0]):
    seg = batch["segment_ids"][r]
    out += [tok.decode(batch["input_ids"][r][seg == s]) for s in range(1, seg.max() + 1)]
  return out


def items_in(batch, tok):
  """The item numbers asked about in a batch (one per conversation segment)."""
  return [int(x) for text in segment_texts(batch, tok) for x in re.findall(r"item (\d+)\?", text)]


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_same_seed_same_batches_other_seed_other_batches(tok, data_dir):
  cfg = config(data_dir)
  first = [next(it) for it in [P.build_train_iterator(cfg, tok, tiny())] for _ in range(6)]
  it = P.build_train_iterator(cfg, tok, tiny())
  for expected in first:
    assert_batches_equal(next(it), expected)
  other = P.build_train_iterator(config(data_dir, seed=4), tok, tiny())
  assert not np.array_equal(next(other)["input_ids"], first[0]["input_ids"])
  shapes = P.batch_shapes(cfg, tok)
  for k, (shape, dtype) in shapes.items():
    assert first[0][k].shape == shape and first[0][k].dtype == dtype


def test_exact_resume_through_orbax(tok, data_dir, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  cfg = config(data_dir, text_ratio=0.25, text_sources=(f"jsonl:{data_dir / 'text.jsonl'}",))
  it = P.build_train_iterator(cfg, tok, tiny())
  for _ in range(3):
    next(it)
  manager = ocp.CheckpointManager(
    tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  )
  manager.save(
    3,
    args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointSave(it), meta=ocp.args.JsonSave({"step": 3})
    ),
  )
  manager.wait_until_finished()
  stats_at_save = it.stats()
  expected = [next(it) for _ in range(5)]
  restored = P.build_train_iterator(cfg, tok, tiny())
  manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert restored.stats() == stats_at_save and stats_at_save["samples"] > 0
  for e in expected:
    assert_batches_equal(next(restored), e)
  assert restored.stats() == it.stats()
  manager.close()


def test_processes_read_disjoint_complete_shards(tok, data_dir):
  seen = []
  for process in range(2):
    it = P.build_train_iterator(
      config(data_dir, num_epochs=1), tok, tiny(), process_index=process, process_count=2
    )
    items = [x for batch in it for x in items_in(batch, tok)]
    assert it.stats()["samples"] == len(items)
    seen.append(items)
  assert len(seen[0]) == len(seen[1]) == N_ITEMS // 2
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(N_ITEMS))
  # a second epoch is reshuffled, and again complete
  it = P.build_train_iterator(config(data_dir, num_epochs=2), tok, tiny())
  items = [x for batch in it for x in items_in(batch, tok)]
  assert sorted(items[:N_ITEMS]) == sorted(items[N_ITEMS:]) == list(range(N_ITEMS))
  assert items[:N_ITEMS] != items[N_ITEMS:]


def test_bad_input_is_skipped_counted_and_named(tok, data_dir, caplog):
  src = f"jsonl:{data_dir / 'bad.jsonl'}@{data_dir / 'img'}"
  caplog.set_level(logging.WARNING, logger="neo_jax.data")
  stats_lib.reset_skip_warnings()
  it = P.build_train_iterator(config(data_dir, sources=(src,), num_epochs=1), tok, tiny())
  batches = list(it)
  stats = it.stats()
  expected = {
    "corrupt_image": 2,
    "missing_file": 1,
    "empty_image": 1,
    "bad_aspect_ratio": 1,
    "invalid_json": 1,
    "no_assistant_turn": 1,
    "bad_record": 1,
  }
  assert {
    k[len("skipped/") :]: v for k, v in stats.items() if k.startswith("skipped/") and v
  } == expected
  assert stats["samples"] == 3
  texts = [t for b in batches for t in segment_texts(b, tok)]
  assert len(texts) == 3 and all(
    t.endswith("\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n") for t in texts
  )
  logged = caplog.text
  assert "nowhere.png" in logged and "bad.jsonl:7" in logged and "no_assistant_turn" in logged


@pytest.mark.parametrize(
  "line, reason",
  [
    (2, "corrupt_image"),
    (3, "corrupt_image"),
    (4, "missing_file"),
    (5, "empty_image"),
    (6, "bad_aspect_ratio"),
    (7, "invalid_json"),
    (8, "no_assistant_turn"),
  ],
)
def test_strict_mode_raises(tok, data_dir, tmp_path, line, reason):
  lines = (data_dir / "bad.jsonl").read_text().splitlines()
  path = write_jsonl(tmp_path / "one_bad.jsonl", [lines[0], lines[line - 1]])
  cfg = config(data_dir, sources=(f"jsonl:{path}@{data_dir / 'img'}",), num_epochs=1, strict=True)
  with pytest.raises(DataError, match=reason):
    list(P.build_train_iterator(cfg, tok, tiny()))
  lenient = P.build_train_iterator(config(data_dir, sources=cfg.sources, num_epochs=1), tok, tiny())
  list(lenient)
  assert lenient.stats()[f"skipped/{reason}"] == 1 and lenient.stats()["samples"] == 1


def test_text_ratio_and_preference_and_pretrain_kinds(tok, data_dir):
  text_src = f"jsonl:{data_dir / 'text.jsonl'}"
  it = P.build_train_iterator(
    config(data_dir, text_ratio=0.5, text_sources=(text_src,), seq_len=200), tok, tiny()
  )
  n_text = n_conv = 0
  for _ in range(6):
    batch = next(it)
    for r in range(2):
      seg = batch["segment_ids"][r]
      for s in range(1, seg.max() + 1):
        text = tok.decode(batch["input_ids"][r][seg == s])
        n_text += "Plain text" in text
        n_conv += "<|im_start|>" in text
  assert n_text > 0 and n_conv > 0 and abs(n_text - n_conv) <= 3
  pref = P.build_train_iterator(
    config(
      data_dir,
      kind="preference",
      seq_len=128,
      sources=(f"jsonl:{data_dir / 'pref.jsonl'}@{data_dir / 'img'}",),
    ),
    tok,
    tiny(),
  )
  batch = next(pref)
  assert {"branch_ids", "gather_index", "gather_branch"} <= set(batch)
  assert set(np.unique(batch["branch_ids"])) == {0, 1, 2}
  # a caption-free conversation source in a preference pipeline is the wrong kind
  wrong = P.build_train_iterator(config(data_dir, kind="preference", num_epochs=1), tok, tiny())
  assert list(wrong) == [] and wrong.stats()["skipped/wrong_kind"] == N_ITEMS


def test_tfds_builder_round_trip_matches_jsonl(tok, data_dir, tmp_path):
  source = JsonlSource(data_dir / "conv.jsonl", data_dir / "img")
  directory = build_tfds(
    "conversation",
    "mine",
    {"train": lambda: (source[i] for i in range(len(source)))},
    tmp_path / "tfds",
  )
  items = {}
  for name, spec in (
    ("tfds", f"tfds:{directory}"),
    ("jsonl", f"jsonl:{data_dir / 'conv.jsonl'}@{data_dir / 'img'}"),
  ):
    it = P.build_train_iterator(config(data_dir, sources=(spec,), num_epochs=1), tok, tiny())
    items[name] = sorted(x for b in it for x in items_in(b, tok))
  assert items["tfds"] == items["jsonl"] == list(range(N_ITEMS))


def test_config_and_source_errors(tok, data_dir):
  with pytest.raises(Exception, match="kind"):
    P.DataConfig(kind="nope")
  with pytest.raises(Exception, match="text_ratio"):
    P.DataConfig(kind="preference", text_ratio=0.1)
  with pytest.raises(Exception, match="not an embedded"):
    P.resolve_source("no/such/thing", "sft")
  with pytest.raises(FileNotFoundError):
    P.resolve_source("jsonl:/no/such/file.jsonl", "sft")
  with pytest.raises(Exception, match="IMG_CONTEXT"):
    P.build_train_iterator(config(data_dir), tok, tiny(img_context_token_id=5))


def test_cli_inspect_prints_a_decoded_batch(tok, data_dir, capsys):
  from neo_jax.cli import main

  rc = main(
    [
      "data",
      "inspect",
      "--source",
      f"jsonl:{data_dir / 'conv.jsonl'}@{data_dir / 'img'}",
      "--seq-len",
      "96",
      "--visual-budget",
      "16",
      "--min-pixels",
      "1024",
      "--max-pixels",
      "4096",
    ]
  )
  out = capsys.readouterr().out
  assert rc == 0 and "segment 1" in out and "[[It is item" in out and "stats:" in out
  assert main(["data", "inspect", "--source", "jsonl:/missing.jsonl"]) == 2


@pytest.mark.slow
def test_worker_processes_deterministic_and_exact_resume(tok, data_dir):
  cfg = config(data_dir, num_workers=2)
  it = P.build_train_iterator(cfg, tok, tiny())
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  restored = P.build_train_iterator(cfg, tok, tiny())
  restored.set_state(state)
  for e in expected:
    assert_batches_equal(next(restored), e)
  assert restored.stats() == it.stats()
  fresh = P.build_train_iterator(cfg, tok, tiny())
  for _ in range(3):
    next(fresh)
  assert_batches_equal(next(fresh), expected[0])
  for i in (it, restored, fresh):
    i.close()


def test_records_of_unexpected_shape_are_bad_records(tok, data_dir):
  from neo_jax.data.encode import SampleEncoder

  encoder = SampleEncoder(tok, "sft", 1024, 4096)
  odd = [
    {"kind": "conversation", "images": [], "conversations": [{"from": "human", "value": 3}]},
    {"kind": "conversation", "images": 5, "conversations": []},
    {"kind": "caption", "images": [], "caption": ["not", "text"]},
    {"kind": "text", "text": None},
  ]
  assert [encoder(r) for r in odd] == [
    {"skip": "bad_conversation"},
    {"skip": "bad_record"},
    {"skip": "bad_record"},
    {"skip": "bad_record"},
  ]
  with pytest.raises(DataError, match="bad_record"):
    SampleEncoder(tok, "sft", 1024, 4096, strict=True)(odd[1])


def test_augmented_images_are_deterministic_resumable_and_change_only_pixels(tok, data_dir):
  cfg = config(data_dir, augment=("flip", "shift:0.125"))
  it = P.build_train_iterator(cfg, tok, tiny())
  plain = P.build_train_iterator(config(data_dir), tok, tiny())
  first = [next(it) for _ in range(3)]
  for a, p in zip(first, [next(plain) for _ in range(3)]):
    for k in a:  # the same samples in the same rows: only the images differ
      if k != "pixels":
        np.testing.assert_array_equal(a[k], p[k], err_msg=k)
    assert not np.array_equal(a["pixels"], p["pixels"])
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  again = P.build_train_iterator(cfg, tok, tiny())
  for e in first:
    assert_batches_equal(next(again), e)
  restored = P.build_train_iterator(cfg, tok, tiny())
  restored.set_state(state)
  for e in expected:
    assert_batches_equal(next(restored), e)
