"""Inference and evaluation: KV-cache generation, VQA / POPE scoring, the generate/eval commands.

Public API (imported on first use, so `neo-jax --help` stays instant):

  generate(params, config, prompts, max_new_tokens, sampling=GREEDY, rng=None, *,
           batch_size=None, stop_ids=None, return_logits=False) -> GenerationOutput
  Sampling(temperature=0.0, top_k=0, top_p=1.0), GREEDY
  decode_text(tokenizer, token_ids, stop_ids) -> str
  vqa_answer_fn(config, tokenizer, max_new_tokens=16, batch_size=8)
      -> answer(params, examples) -> [text]     (the training loop's VQA hook)
  load_for_inference(checkpoint, dtype="float32") -> InferenceModel(params, config, tokenizer, ..)
  normalize_vqa_answer, vqa_correct, yes_no, pope_metrics     (metrics)
  read_examples(data, task, ...), evaluate(examples, predictor, task, ...)  (evaluation)

Prompts come from `neo_jax.data.inputs.prepare_generation_inputs`.
"""

import importlib

_EXPORTS = {
    "generate": "neo_jax.inference.generation",
    "GenerationOutput": "neo_jax.inference.generation",
    "decode_text": "neo_jax.inference.generation",
    "vqa_answer_fn": "neo_jax.inference.generation",
    "batch_prompts": "neo_jax.inference.generation",
    "prefill": "neo_jax.inference.generation",
    "decode": "neo_jax.inference.generation",
    "Sampling": "neo_jax.inference.sampling",
    "GREEDY": "neo_jax.inference.sampling",
    "load_for_inference": "neo_jax.inference.loading",
    "normalize_vqa_answer": "neo_jax.inference.metrics",
    "vqa_correct": "neo_jax.inference.metrics",
    "yes_no": "neo_jax.inference.metrics",
    "pope_metrics": "neo_jax.inference.metrics",
    "read_examples": "neo_jax.inference.eval_data",
    "evaluate": "neo_jax.inference.evaluation",
    "ModelPredictor": "neo_jax.inference.evaluation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'neo_jax.inference' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)
