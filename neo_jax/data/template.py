"""NEO's `neo1_0` chat template (ChatML) and SFT label masking.

NEO's rules and their sources: docs/reference/neo.md#chat-template and
docs/reference/neo.md#sft-labels-and-loss-weights.

Every encoder returns token ids and a per-token `supervised` flag: True where the token is a
label (its prediction from the previous token is trained). Pieces are tokenised separately
(so BPE never merges across them) and no BOS is added:

    user / system turn   "<|im_start|>{role}\\n{content}<|im_end|>\\n"          all masked
    assistant turn       "<|im_start|>assistant\\n"                             masked
                         "{content}<|im_end|>\\n"                               supervised
                         (fully masked when the turn has `is_input: true`)

Images: when a sample has images but no `<image>` tag, the first user turn gets "<image>\\n"
(one image) or "Image-1: <image>\\nImage-2: <image>\\n..." (several) in front. Each `<image>`
becomes `<img>` + `<IMG_CONTEXT>` x n + `</img>` for that image's n visual tokens.

Formats for the other sample kinds (chosen here; NEO's code does not fix them):

    caption (pre-training)  [<img> C..C </img>]*  "{caption}<|im_end|>"
                            image blocks masked; caption and <|im_end|> supervised
    text (LM data)          "{text}<|endoftext|>", every token supervised
    preference pair         prompt = user turn(s) + "<|im_start|>assistant\\n" (branch 0),
                            chosen "{chosen}<|im_end|>\\n" (branch 1),
                            rejected "{rejected}<|im_end|>\\n" (branch 2); responses supervised
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from neo_jax.data.tokenizer import NeoTokenizer

IMAGE_TAG = "<image>"
ROLES = {
  "human": "user",
  "user": "user",
  "gpt": "assistant",
  "assistant": "assistant",
  "system": "system",
}


class TemplateError(ValueError):
  """A sample the template cannot encode; `reason` is the skip-counter key."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Message:
  role: str  # "user" | "assistant" | "system"
  content: str
  is_input: bool = False  # an assistant turn given as context, never supervised


@dataclasses.dataclass
class TokenizedSample:
  """One sample's tokens. input_ids int32 [n]; supervised bool [n]; branch_ids int32 [n]
  (preference only: 0 prompt, 1 chosen, 2 rejected)."""

  input_ids: np.ndarray
  supervised: np.ndarray
  branch_ids: np.ndarray | None = None

  def __len__(self) -> int:
    return int(self.input_ids.shape[0])


def as_messages(conversation: Sequence[Mapping[str, Any] | Message]) -> list[Message]:
  """LLaVA (`from`/`value`) or OpenAI (`role`/`content`) turns -> Messages."""
  out = []
  for i, turn in enumerate(conversation):
    if isinstance(turn, Message):
      out.append(turn)
      continue
    if not isinstance(turn, Mapping):
      raise TemplateError("bad_conversation", f"turn {i} is not an object: {turn!r:.80}")
    role = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    if role not in ROLES:
      raise TemplateError("bad_conversation", f"turn {i}: unknown role {role!r}")
    if not isinstance(content, str):
      raise TemplateError("bad_conversation", f"turn {i}: content is not a string")
    out.append(Message(ROLES[role], content, bool(turn.get("is_input", False))))
  return out


def image_prefix(n_images: int) -> str:
  """The text put in front of the first user turn when images come without `<image>` tags."""
  if n_images == 1:
    return IMAGE_TAG + "\n"
  return "".join(f"Image-{i + 1}: {IMAGE_TAG}\n" for i in range(n_images))


def place_image_tags(messages: Sequence[Message], n_images: int) -> list[Message]:
  """Adds the `<image>` prefix when needed and checks that tags and images match."""
  messages = list(messages)
  n_tags = sum(m.content.count(IMAGE_TAG) for m in messages)
  if n_images and n_tags == 0:
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), None)
    if first_user is None:
      raise TemplateError("bad_conversation", "sample has images but no user turn")
    m = messages[first_user]
    messages[first_user] = dataclasses.replace(m, content=image_prefix(n_images) + m.content)
    n_tags = n_images
  if n_tags != n_images:
    raise TemplateError("image_tag_mismatch", f"{n_tags} {IMAGE_TAG} tags but {n_images} images")
  return messages


def image_block(tokenizer: NeoTokenizer, n_tokens: int) -> list[int]:
  """`<img>` + `<IMG_CONTEXT>` x n_tokens + `</img>`."""
  return [tokenizer.img_start_id] + [tokenizer.img_context_id] * n_tokens + [tokenizer.img_end_id]


class _Builder:
  """Accumulates (ids, supervised, branch) pieces; `<image>` tags consume image token counts."""

  def __init__(self, tokenizer: NeoTokenizer, image_tokens: Sequence[int]):
    self.tok = tokenizer
    self.image_tokens = list(image_tokens)
    self.next_image = 0
    self.ids: list[int] = []
    self.sup: list[bool] = []
    self.branch: list[int] = []

  def add_ids(self, ids: Sequence[int], supervised: bool, branch: int = 0) -> None:
    self.ids.extend(ids)
    self.sup.extend([supervised] * len(ids))
    self.branch.extend([branch] * len(ids))

  def add_text(self, text: str, supervised: bool, branch: int = 0) -> None:
    """Tokenises one piece; `<image>` tags in it become image blocks (never supervised)."""
    parts = text.split(IMAGE_TAG)
    for k, part in enumerate(parts):
      if k > 0:
        if self.next_image >= len(self.image_tokens):
          raise TemplateError("image_tag_mismatch", "more <image> tags than images")
        self.add_ids(image_block(self.tok, self.image_tokens[self.next_image]), False, branch)
        self.next_image += 1
      if part:
        self.add_ids(self.tok.encode(part), supervised, branch)

  def turn(self, message: Message, supervise_assistant: bool = True, branch: int = 0) -> None:
    if message.role == "assistant":
      self.add_text("<|im_start|>assistant\n", False, branch)
      self.add_text(
        message.content + "<|im_end|>\n", supervise_assistant and not message.is_input, branch
      )
    else:
      self.add_text(f"<|im_start|>{message.role}\n{message.content}<|im_end|>\n", False, branch)

  def finish(self, with_branches: bool = False) -> TokenizedSample:
    if self.next_image != len(self.image_tokens):
      raise TemplateError(
        "image_tag_mismatch", f"{self.next_image} <image> tags but {len(self.image_tokens)} images"
      )
    return TokenizedSample(
      np.asarray(self.ids, np.int32),
      np.asarray(self.sup, bool),
      np.asarray(self.branch, np.int32) if with_branches else None,
    )


def _with_system(messages: list[Message], system: str) -> list[Message]:
  messages = [m for m in messages if not (m.role == "system" and not m.content)]
  if system and not any(m.role == "system" for m in messages):
    messages.insert(0, Message("system", system))
  return messages


def encode_conversation(
  tokenizer: NeoTokenizer,
  conversation: Sequence[Mapping | Message],
  image_tokens: Sequence[int] = (),
  system: str = "",
) -> TokenizedSample:
  """An SFT conversation: user/system masked, assistant content + `<|im_end|>\\n` supervised.

  Raises TemplateError("no_assistant_turn") when nothing would be supervised.
  """
  messages = place_image_tags(_with_system(as_messages(conversation), system), len(image_tokens))
  if not any(m.role == "assistant" and not m.is_input for m in messages):
    raise TemplateError("no_assistant_turn", "conversation has no (non-input) assistant turn")
  b = _Builder(tokenizer, image_tokens)
  for m in messages:
    b.turn(m)
  return b.finish()


def encode_caption(
  tokenizer: NeoTokenizer, caption: str, image_tokens: Sequence[int]
) -> TokenizedSample:
  """Pre-training caption: image blocks (masked) then "{caption}<|im_end|>" supervised."""
  if not caption.strip():
    raise TemplateError("empty_text", "caption is empty")
  b = _Builder(tokenizer, image_tokens)
  for n in image_tokens:
    b.add_ids(image_block(tokenizer, n), False)
  b.next_image = len(image_tokens)
  b.add_text(caption.replace(IMAGE_TAG, "") + "<|im_end|>", True)
  return b.finish()


def encode_text(tokenizer: NeoTokenizer, text: str) -> TokenizedSample:
  """LM text: "{text}<|endoftext|>", every token supervised."""
  if not text.strip():
    raise TemplateError("empty_text", "text is empty")
  ids = tokenizer.encode(text) + [tokenizer.pad_id]
  return TokenizedSample(np.asarray(ids, np.int32), np.ones(len(ids), bool))


def encode_preference(
  tokenizer: NeoTokenizer,
  prompt: str | Sequence[Mapping | Message],
  chosen: str,
  rejected: str,
  image_tokens: Sequence[int] = (),
  system: str = "",
) -> TokenizedSample:
  """A preference pair laid out prompt | chosen | rejected with branch ids 0 / 1 / 2."""
  if isinstance(prompt, str):
    prompt = [Message("user", prompt)]
  messages = place_image_tags(_with_system(as_messages(prompt), system), len(image_tokens))
  if not messages or messages[-1].role != "user":
    raise TemplateError("bad_conversation", "preference prompt must end with a user turn")
  if not chosen.strip() or not rejected.strip():
    raise TemplateError("empty_text", "chosen or rejected response is empty")
  b = _Builder(tokenizer, image_tokens)
  for m in messages:
    b.turn(m, supervise_assistant=False)
  b.add_text("<|im_start|>assistant\n", False, 0)
  b.add_text(chosen + "<|im_end|>\n", True, 1)
  b.add_text(rejected + "<|im_end|>\n", True, 2)
  return b.finish(with_branches=True)


def build_generation_prompt(
  tokenizer: NeoTokenizer,
  question: str | Sequence[Mapping | Message],
  image_tokens: Sequence[int] = (),
  system: str = "",
) -> np.ndarray:
  """int32 [n] prompt ids for generation, ending with "<|im_start|>assistant\\n".

  `question` is the user text, or a whole history ending with a user turn. Images without
  `<image>` tags get NEO's eval prefix ("<image>\\n", or "Image-k: <image>\\n" per image).
  """
  if isinstance(question, str):
    question = [Message("user", question)]
  messages = place_image_tags(_with_system(as_messages(question), system), len(image_tokens))
  if not messages or messages[-1].role != "user":
    raise TemplateError("bad_conversation", "a generation prompt must end with a user turn")
  b = _Builder(tokenizer, image_tokens)
  for m in messages:
    b.turn(m, supervise_assistant=False)
  b.add_text("<|im_start|>assistant\n", False)
  return b.finish().input_ids


def render_text(tokenizer: NeoTokenizer, ids: Sequence[int], collapse_images: bool = True) -> str:
  """Decoded text with each run of `<IMG_CONTEXT>` shown once with its count (for inspection)."""
  out, text_run, image_run = [], [], 0
  for t in [int(x) for x in ids] + [None]:
    if collapse_images and t == tokenizer.img_context_id:
      if text_run:
        out.append(tokenizer.decode(text_run))
        text_run = []
      image_run += 1
      continue
    if image_run:
      out.append(f"<IMG_CONTEXT>x{image_run}")
      image_run = 0
    if t is not None:
      text_run.append(t)
  if text_run:
    out.append(tokenizer.decode(text_run))
  return "".join(out)
