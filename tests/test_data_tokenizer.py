"""The offline Qwen3 + NEO tokenizer: published ids, added-token ids, HF compatibility."""

import json
import pickle

import pytest

from neo_jax import config as neo_config
from neo_jax.data import tokenizer as tok_lib

PUBLISHED = {  # encodings of Qwen's own tokenizer (docs/reference/neo.md#qwen3-tokenizer)
  "Hello, world!": [9707, 11, 1879, 0],
  "The quick brown fox.": [785, 3974, 13876, 38835, 13],
  "Describe this image in detail.": [74785, 419, 2168, 304, 7716, 13],
  "<|im_start|>hello<|im_end|>": [151644, 14990, 151645],
  "杭州是个好地方": [104130, 104104, 52801, 100371],
}


@pytest.mark.parametrize("text", list(PUBLISHED))
def test_published_ids(tok, text):
  assert tok.encode(text) == PUBLISHED[text]
  assert tok.decode(PUBLISHED[text]) == text


def test_added_token_ids(tok):
  qwen3 = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
  ]
  for i, t in enumerate(qwen3):
    assert tok.token_to_id(t) == 151643 + i, t
  neo = [
    "<IMG_CONTEXT>",
    "<img>",
    "</img>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<|action_start|>",
    "<|action_end|>",
    "<|plugin|>",
    "<|interpreter|>",
  ]
  for i, t in enumerate(neo):
    assert tok.token_to_id(t) == 151669 + i, t
  # the ids the model config relies on (docs/reference/neo.md#special-tokens: three confirmed)
  assert tok.img_context_id == neo_config.IMG_CONTEXT_TOKEN_ID == 151669
  assert tok.img_start_id == neo_config.IMG_START_TOKEN_ID == 151670
  assert tok.img_end_id == neo_config.IMG_END_TOKEN_ID == 151671
  assert tok.im_start_id == neo_config.IM_START_TOKEN_ID
  assert tok.eos_id == tok.im_end_id == neo_config.IM_END_TOKEN_ID
  assert tok.pad_id == neo_config.PAD_TOKEN_ID
  assert tok.vocab_size == 151682 <= neo_config.NeoConfig().vocab_size
  # added tokens written in text become single ids, with text around them kept
  assert tok.encode("a<img><IMG_CONTEXT></img>b") == (
    tok.encode("a") + [151670, 151669, 151671] + tok.encode("b")
  )


def test_saved_files_and_merges(tok):
  with open(tok.directory / "tokenizer.json", encoding="utf-8") as f:
    data = json.load(f)
  assert len(data["model"]["vocab"]) == 151643
  assert len(data["model"]["merges"]) == 151387  # one merge per multi-byte token
  assert data["normalizer"] == {"type": "NFC"}
  config = json.loads((tok.directory / "tokenizer_config.json").read_text())
  # as the official NEO files (Qwen3-Base settings); chat generation stops at <|im_end|>
  assert config["eos_token"] == "<|endoftext|>" and config["pad_token"] == "<|endoftext|>"
  assert tok.eos_id == tok.im_end_id == 151645
  assert config["added_tokens_decoder"]["151669"]["content"] == "<IMG_CONTEXT>"
  assert (tok.directory / "special_tokens_map.json").exists()


def test_canonical_merges_small_vocab():
  # ranks: single bytes, then "ab" (merge a+b), then "abc" (ab + c, not a + bc)
  tokens = [b"a", b"b", b"c", b"ab", b"bc", b"abc"]
  assert tok_lib.canonical_merges(tokens) == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c")]
  with pytest.raises(ValueError, match="lower ranks"):
    tok_lib.canonical_merges([b"a", b"b", b"abb"])


def test_nfc_and_round_trip(tok):
  assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")
  text = "def f(x):\n    return x ** 2  # 12345\n\n\tTabs, ÜML, 日本語, emoji 🙂."
  assert tok.decode(tok.encode(text)) == text


def test_load_directory_save_and_pickle(tok, tmp_path):
  out = tok.save(tmp_path / "ckpt")
  assert sorted(p.name for p in out.iterdir()) == sorted(tok_lib.TOKENIZER_FILES)
  again = tok_lib.load_tokenizer(out)
  assert again.encode("Hello, world!") == PUBLISHED["Hello, world!"]
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode("杭州是个好地方") == PUBLISHED["杭州是个好地方"]
  with pytest.raises(FileNotFoundError):
    tok_lib.load_tokenizer(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tok_lib.load_tokenizer(tmp_path / "empty")


def test_transformers_loads_the_saved_directory(tok):
  transformers = pytest.importorskip("transformers")
  texts = list(PUBLISHED) + [
    "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is it?<|im_end|>\n",
    "  leading spaces, 3.14159 and 2024-01-01\r\n\r\nCRLF",
    "cafe\u0301 Ｆｕｌｌ ñ",
    "<box>1</box>",
  ]
  auto = transformers.AutoTokenizer.from_pretrained(str(tok.directory))
  fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(tok.directory))
  for text in texts:
    ours = tok.encode(text)
    assert auto.encode(text, add_special_tokens=False) == ours, text
    assert fast.encode(text, add_special_tokens=False) == ours, text
  assert auto.convert_tokens_to_ids("<IMG_CONTEXT>") == 151669
  assert auto.eos_token_id == 151643 and auto.pad_token_id == 151643  # as the official files
  assert auto.decode([151669, 151645], skip_special_tokens=True) == ""
  prompt = auto.apply_chat_template(
    [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
  )
  assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_subset_tokenizer_keeps_the_tokens_of_its_texts(tok, tmp_path):
  """Qwen3's BPE cut down to the tokens of a few texts: those texts give the same tokens as
  the full tokenizer (renumbered from 0, every added token after the BPE ones), any other text
  still encodes and decodes, and transformers loads the directory."""
  texts = ["what is the blue shape?", "circle", "<|im_start|>user\nhi<|im_end|>\n"]
  directory = tok_lib.subset_tokenizer_dir("test_subset", lambda: texts)
  small = tok_lib.NeoTokenizer(directory)
  added = tok_lib.added_token_table()
  assert 256 < small.vocab_size - len(added) < 300  # the bytes, the texts' tokens, their parts
  for text in texts:
    assert [small.id_to_token(i) for i in small.encode(text)] == [
      tok.id_to_token(i) for i in tok.encode(text)
    ], text
  other = "The quick brown fox, 杭州 <IMG_CONTEXT>"
  assert small.decode(small.encode(other)) == other
  assert len(small.encode(other)) > len(tok.encode(other))  # smaller pieces
  first_added = small.vocab_size - len(added)
  assert [small.token_to_id(t) for _, t, _ in added] == list(range(first_added, small.vocab_size))
  ids = tok_lib.token_ids(small)
  assert ids["vocab_size"] % 128 == 0 and ids["vocab_size"] >= small.vocab_size
  assert ids["img_context_token_id"] == small.img_context_id == small.token_to_id("<IMG_CONTEXT>")
  assert ids["eos_token_id"] == small.token_to_id("<|im_end|>")
  with open(directory / "tokenizer_config.json") as f:
    decoder = json.load(f)["added_tokens_decoder"]
  assert decoder[str(small.img_context_id)]["content"] == "<IMG_CONTEXT>"
  transformers = pytest.importorskip("transformers")
  auto = transformers.AutoTokenizer.from_pretrained(str(directory))
  for text in texts + [other]:
    assert auto.encode(text, add_special_tokens=False) == small.encode(text), text
