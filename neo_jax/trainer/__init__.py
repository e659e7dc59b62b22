"""The trainer core: state, step, optimizer, loop and hooks, checkpoints, metrics, FLOPs.

    trainer = Trainer(config, objective, data_iterator=None)      (loop.py)
    trainer.add_hook(hook, every=N, first=False, last=False, on_stop=False)
    result = trainer.run() -> TrainResult

Module map: objective (the Objective interface, LossOutput), optimizer (AdamW, schedules,
stage masks), state (TrainState and its shardings), step (the generic jitted step), batches
(data iterators from config.data), checkpoint (orbax steps of a run, where a stage starts),
metrics (JSONL / TensorBoard), flops (the MFU model), hooks (what runs around each step),
loop (Trainer), config (config files and --config.* overrides). The core names no objective
and no evaluator: neo_jax/objectives/ and neo_jax/evals/ plug in, neo_jax/stage.py assembles.

Nothing is imported here, so that `import neo_jax.trainer.flops` (benchmarks, device checks)
stays free of the data pipeline's packages.
"""
