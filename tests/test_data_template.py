"""neo1_0 chat template and SFT label masks.

NEO's rules: docs/reference/neo.md#chat-template and
docs/reference/neo.md#sft-labels-and-loss-weights.
"""

import numpy as np
import pytest

from neo_jax.data import template as T


def block(tok, n):
  return "<img>" + "<IMG_CONTEXT>" * n + "</img>"


def spans(tok, sample):
  """Decoded maximal runs of supervised tokens."""
  out, run = [], []
  for t, s in zip(sample.input_ids, sample.supervised):
    if s:
      run.append(int(t))
    elif run:
      out.append(tok.decode(run))
      run = []
  if run:
    out.append(tok.decode(run))
  return out


def test_single_turn_single_image(tok):
  conv = [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Blue."}]
  s = T.encode_conversation(tok, conv, image_tokens=[4])
  text = (
    f"<|im_start|>user\n{block(tok, 4)}\nWhat colour?<|im_end|>\n"
    "<|im_start|>assistant\nBlue.<|im_end|>\n"
  )
  assert s.input_ids.tolist() == tok.encode(text)  # no BOS, tokenised like the whole string
  assert s.input_ids.dtype == np.int32 and s.supervised.dtype == bool
  assert spans(tok, s) == ["Blue.<|im_end|>\n"]
  n_sup = len(tok.encode("Blue.")) + 2  # content, <|im_end|>, "\n"
  assert s.supervised.sum() == n_sup and s.supervised[-n_sup:].all()


def test_multi_turn_multi_image_masks(tok):
  conv = [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "Compare them."},
    {"from": "gpt", "value": "The first is red."},
    {"from": "human", "value": "And this one? <image>"},
    {"from": "gpt", "value": "(given)", "is_input": True},
    {"from": "human", "value": "Count."},
    {"from": "gpt", "value": "Three."},
  ]
  # the explicit tag in turn 3 means no prefix is added: tags must match images (3 here)
  with pytest.raises(T.TemplateError) as e:
    T.encode_conversation(tok, conv, image_tokens=[2, 3])
  assert e.value.reason == "image_tag_mismatch"
  conv[1] = {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nCompare them."}
  s = T.encode_conversation(tok, conv, image_tokens=[2, 3, 1])
  text = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    f"<|im_start|>user\nImage-1: {block(tok, 2)}\nImage-2: {block(tok, 3)}\nCompare them."
    "<|im_end|>\n<|im_start|>assistant\nThe first is red.<|im_end|>\n"
    f"<|im_start|>user\nAnd this one? {block(tok, 1)}<|im_end|>\n"
    "<|im_start|>assistant\n(given)<|im_end|>\n"
    "<|im_start|>user\nCount.<|im_end|>\n<|im_start|>assistant\nThree.<|im_end|>\n"
  )
  assert s.input_ids.tolist() == tok.encode(text)
  assert spans(tok, s) == ["The first is red.<|im_end|>\n", "Three.<|im_end|>\n"]
  ctx = s.input_ids == tok.img_context_id
  assert ctx.sum() == 6 and not s.supervised[ctx].any()


def test_image_prefix_rules(tok):
  conv = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
  one = T.encode_conversation(tok, conv, image_tokens=[1])
  assert T.render_text(tok, one.input_ids).startswith(
    "<|im_start|>user\n<img><IMG_CONTEXT>x1</img>\nQ<|im_end|>"
  )
  two = T.encode_conversation(tok, conv, image_tokens=[1, 2])
  assert T.render_text(tok, two.input_ids).startswith(
    "<|im_start|>user\nImage-1: <img><IMG_CONTEXT>x1</img>\n"
    "Image-2: <img><IMG_CONTEXT>x2</img>\nQ<|im_end|>"
  )
  none = T.encode_conversation(tok, conv)
  assert tok.img_start_id not in none.input_ids
  # an empty system prompt emits no system block; a non-empty one does
  assert tok.decode(none.input_ids).startswith("<|im_start|>user\n")
  with_sys = T.encode_conversation(tok, conv, system="S")
  assert tok.decode(with_sys.input_ids).startswith("<|im_start|>system\nS<|im_end|>\n")


def test_conversation_errors(tok):
  with pytest.raises(T.TemplateError) as e:
    T.encode_conversation(tok, [{"from": "human", "value": "only a question"}])
  assert e.value.reason == "no_assistant_turn"
  with pytest.raises(T.TemplateError) as e:
    T.encode_conversation(
      tok, [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "is_input": True}]
    )
  assert e.value.reason == "no_assistant_turn"
  with pytest.raises(T.TemplateError) as e:
    T.encode_conversation(tok, [{"from": "robot", "value": "q"}])
  assert e.value.reason == "bad_conversation"
  with pytest.raises(T.TemplateError) as e:
    T.encode_conversation(
      tok,
      [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "a"}],
      image_tokens=[1],
    )
  assert e.value.reason == "image_tag_mismatch"


def test_generation_prompt_is_the_conversation_prefix(tok):
  prompt = T.build_generation_prompt(tok, "What is in this image?", image_tokens=[6])
  assert tok.decode(prompt[-3:]) == "<|im_start|>assistant\n"
  full = T.encode_conversation(
    tok,
    [{"from": "human", "value": "What is in this image?"}, {"from": "gpt", "value": "An apple."}],
    image_tokens=[6],
  )
  np.testing.assert_array_equal(full.input_ids[: len(prompt)], prompt)
  assert not full.supervised[: len(prompt)].any() and full.supervised[len(prompt) :].all()
  history = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
  ]
  assert tok.decode(T.build_generation_prompt(tok, history)) == (
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
  )


def test_caption_text_and_preference_formats(tok):
  cap = T.encode_caption(tok, "A blue circle.", [4, 2])
  assert T.render_text(tok, cap.input_ids) == (
    "<img><IMG_CONTEXT>x4</img><img><IMG_CONTEXT>x2</img>A blue circle.<|im_end|>"
  )
  assert spans(tok, cap) == ["A blue circle.<|im_end|>"]
  text = T.encode_text(tok, "Plain text.")
  assert tok.decode(text.input_ids) == "Plain text.<|endoftext|>" and text.supervised.all()
  pref = T.encode_preference(tok, "Is it red?", "yes", "no", image_tokens=[1])
  assert tok.decode(pref.input_ids[pref.branch_ids == 1]) == "yes<|im_end|>\n"
  assert tok.decode(pref.input_ids[pref.branch_ids == 2]) == "no<|im_end|>\n"
  prompt = T.build_generation_prompt(tok, "Is it red?", image_tokens=[1])
  np.testing.assert_array_equal(pref.input_ids[pref.branch_ids == 0], prompt)
  np.testing.assert_array_equal(pref.supervised, pref.branch_ids > 0)
  for bad in (
    lambda: T.encode_caption(tok, " ", [1]),
    lambda: T.encode_text(tok, ""),
    lambda: T.encode_preference(tok, "q", "", "no"),
  ):
    with pytest.raises(T.TemplateError) as e:
      bad()
    assert e.value.reason == "empty_text"


def test_generation_inputs_for_inference(tok):
  import io

  from PIL import Image

  from neo_jax.config import tiny
  from neo_jax.data.inputs import prepare_generation_inputs

  buf = io.BytesIO()
  Image.new("RGBA", (96, 64), (10, 200, 30, 0)).save(buf, "PNG")  # fully transparent
  inputs = prepare_generation_inputs(tok, tiny(), "What is it?", [buf.getvalue(), buf.getvalue()])
  ids = inputs["input_ids"][0]
  assert inputs["pixels"].shape == (1, 12, 4, 768)  # two 2x3 grids (64x96, tiny pixel range)
  assert (inputs["pixels"] == 255).all()  # transparent -> white (inference RGBA rule)
  np.testing.assert_array_equal(ids, T.build_generation_prompt(tok, "What is it?", [6, 6]))
  t = inputs["positions"][0, 0]
  assert t.max() == len(ids) - 1 - 2 * 5  # each image of 6 tokens shares one T
  np.testing.assert_array_equal(
    inputs["pixel_rc"][0, :6], [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
  )
  assert inputs["segment_ids"].shape == (1, len(ids)) and (inputs["segment_ids"] == 1).all()
