"""`neo-jax data ...`: build the embedded data sets and the tokenizer, build a TFDS data set
from a JSONL file, and print decoded batches."""

from __future__ import annotations

import argparse
import json
import time

from neo_jax.config import tiny
from neo_jax.data import embedded
from neo_jax.data.jsonl import JsonlSource
from neo_jax.data.pipeline import DataConfig, build_train_iterator, describe_batch
from neo_jax.data.tfds_sources import build_tfds
from neo_jax.data.tokenizer import default_tokenizer_dir, load_tokenizer
from neo_jax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.epilog = (
    "The cache directory is $NEO_JAX_CACHE (default ~/.cache/neo_jax); nothing is downloaded."
  )
  sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

  p = sub.add_parser(
    "build-embedded",
    help="build the embedded data sets into the cache "
    "(easy-vqa captions / vqa / preference pairs, pydoc text)",
  )
  p.add_argument(
    "--names",
    nargs="*",
    default=None,
    metavar="NAME",
    help="which ones (default: all): easy_vqa/captions easy_vqa/vqa easy_vqa/preference pydoc/text",
  )

  p = sub.add_parser("build-tokenizer", help="build the Qwen3 + NEO tokenizer (HF files)")
  p.add_argument(
    "--out",
    default=None,
    metavar="DIR",
    help="also copy tokenizer.json / tokenizer_config.json / special_tokens_map.json into DIR",
  )

  p = sub.add_parser(
    "build-tfds",
    help="turn a JSONL / LLaVA JSON file + image folder into "
    "a TFDS array_record data set (images stored inside)",
  )
  p.add_argument(
    "--kind",
    required=True,
    choices=("caption", "conversation", "preference", "text"),
    help="record kind of every line (others are stored as wrong_kind errors)",
  )
  p.add_argument("--name", required=True, help="data set (builder config) name")
  p.add_argument("--train", required=True, metavar="FILE", help="JSONL / JSON of the train split")
  p.add_argument("--test", default=None, metavar="FILE", help="optional test split file")
  p.add_argument(
    "--images", default=None, metavar="DIR", help="image folder (default: each file's directory)"
  )
  p.add_argument("--out", required=True, metavar="DIR", help="TFDS data_dir to write into")

  p = sub.add_parser("inspect", help="print decoded packed batches of a data configuration")
  p.add_argument(
    "--kind",
    default="sft",
    choices=("sft", "pretrain", "preference", "text"),
    help="pipeline kind (default: sft)",
  )
  p.add_argument(
    "--source",
    action="append",
    default=None,
    metavar="SPEC",
    help="source spec, repeatable: easy_vqa, easy_vqa/vqa, pydoc/text, tfds:DIR, "
    "jsonl:FILE[@IMAGE_DIR] (default: the kind's embedded data)",
  )
  p.add_argument("--split", default="train", help="split of TFDS / embedded sources")
  p.add_argument("--seq-len", type=int, default=512, help="tokens per row (L)")
  p.add_argument("--visual-budget", type=int, default=128, help="visual tokens per row (N)")
  p.add_argument(
    "--loss-token-budget",
    type=int,
    default=None,
    help="supervised positions per row (K); default: no cap",
  )
  p.add_argument("--batch-size", type=int, default=2, help="rows per batch (B)")
  p.add_argument("--text-ratio", type=float, default=0.0, help="fraction of plain-text samples")
  p.add_argument("--min-pixels", type=int, default=64 * 64, help="smart_resize minimum area")
  p.add_argument("--max-pixels", type=int, default=128 * 128, help="smart_resize maximum area")
  p.add_argument("--seed", type=int, default=0, help="shuffle / mixing seed")
  p.add_argument("--batches", type=int, default=1, help="how many batches to print")
  p.add_argument("--rows", type=int, default=1, help="rows of each batch to print")
  p.add_argument("--max-chars", type=int, default=1500, help="characters per segment shown")
  p.add_argument(
    "--tokenizer",
    default=None,
    metavar="DIR",
    help="HF tokenizer directory (default: the built Qwen3 + NEO tokenizer)",
  )
  p.add_argument("--strict", action="store_true", help="raise on bad input instead of skipping")


def _build_embedded(args) -> int:
  names = args.names or list(embedded.DATASETS)
  for name in names:
    if name not in embedded.DATASETS:
      raise UserError(f"--names: unknown data set {name!r}; one of {sorted(embedded.DATASETS)}")
  for name in names:
    start = time.perf_counter()
    directory = embedded.embedded_dir(name)
    print(f"{name}: {directory} ({time.perf_counter() - start:.1f} s)")
  print(embedded.describe())
  return 0


def _build_tokenizer(args) -> int:
  start = time.perf_counter()
  directory = default_tokenizer_dir()
  tok = load_tokenizer(directory)
  print(f"tokenizer: {directory} (vocab {tok.vocab_size}, {time.perf_counter() - start:.1f} s)")
  if args.out:
    print(f"copied to {tok.save(args.out)}")
  return 0


def _build_tfds(args) -> int:
  splits = {}
  for split, path in (("train", args.train), ("test", args.test)):
    if path:
      source = JsonlSource(path, args.images)
      splits[split] = lambda source=source: (source[i] for i in range(len(source)))
  directory = build_tfds(args.kind, args.name, splits, args.out)
  print(f"built {directory}")
  print(f"use it as a source: tfds:{directory}")
  return 0


def _inspect(args) -> int:
  tok = load_tokenizer(args.tokenizer)
  cfg = DataConfig(
    kind=args.kind,
    sources=tuple(args.source or ()),
    split=args.split,
    seq_len=args.seq_len,
    visual_budget=args.visual_budget,
    loss_token_budget=args.loss_token_budget,
    batch_size=args.batch_size,
    text_ratio=args.text_ratio,
    min_pixels=args.min_pixels,
    max_pixels=args.max_pixels,
    seed=args.seed,
    strict=args.strict,
  )
  it = build_train_iterator(cfg, tok, tiny())
  for b in range(args.batches):
    try:
      batch = next(it)
    except StopIteration:
      print("(no more batches)")
      break
    if b == 0:
      print("batch: " + ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in batch.items()))
    print(f"--- batch {b}")
    print(
      describe_batch(
        batch, tok, rows=range(min(args.rows, cfg.batch_size)), max_chars=args.max_chars
      )
    )
  print("stats: " + json.dumps({k: v for k, v in it.stats().items() if v}))
  return 0


def run(args: argparse.Namespace) -> int:
  return {
    "build-embedded": _build_embedded,
    "build-tokenizer": _build_tokenizer,
    "build-tfds": _build_tfds,
    "inspect": _inspect,
  }[args.action](args)
