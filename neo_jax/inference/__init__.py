"""Inference: KV-cache generation, sampling, and loading a checkpoint to answer prompts.

  generate(params, config, prompts, max_new_tokens, sampling=GREEDY, rng=None, *,
           batch_size=None, stop_ids=None, return_logits=False) -> GenerationOutput
  Sampling(temperature=0.0, top_k=0, top_p=1.0), GREEDY
  decode_text(tokenizer, token_ids, stop_ids) -> str
  vqa_answer_fn(config, tokenizer, max_new_tokens=16, batch_size=8)
      -> answer(params, examples) -> [text]     (what the VQA evaluator of a training run calls)
  load_for_inference(checkpoint, dtype="float32") -> InferenceModel(params, config, tokenizer, ..)

Prompts come from `neo_jax.data.inputs.prepare_generation_inputs`; scoring answers is
neo_jax/evals/; the `neo-jax generate` command is neo_jax/cli/generate.py.
"""

from neo_jax.inference.generation import (
  GenerationOutput,
  batch_prompts,
  decode,
  decode_text,
  generate,
  prefill,
  vqa_answer_fn,
)
from neo_jax.inference.loading import InferenceModel, load_for_inference
from neo_jax.inference.sampling import GREEDY, Sampling

__all__ = [
  "GREEDY",
  "GenerationOutput",
  "InferenceModel",
  "Sampling",
  "batch_prompts",
  "decode",
  "decode_text",
  "generate",
  "load_for_inference",
  "prefill",
  "vqa_answer_fn",
]
