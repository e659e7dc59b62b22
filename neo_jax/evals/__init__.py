"""Evaluation: VQA / POPE metrics, evaluation files, the evaluation loop, and the evaluators a
training run calls periodically.

  metrics.normalize_vqa_answer, vqa_correct, yes_no, pope_metrics
  examples.read_examples(data, task, ...) -> [EvalExample]      JSONL files, built-in easy-vqa
  evaluate.evaluate(examples, predictor, task, ...) -> result   (`neo-jax eval`)
  evaluators.from_config(config, trainer) -> [evaluator]         held-out loss, VQA exact match
      (config.eval; the trainer calls them through its evaluation hook)
"""
