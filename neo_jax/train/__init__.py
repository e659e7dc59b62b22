"""Training: stages, losses, the jitted step, the trainer loop, checkpoints, metrics.

    neo-jax train --config configs/X.py [--config.FIELD=VALUE ...]      (train/cli.py)
    Trainer(config, objective="next_token").run() -> TrainResult       (train/trainer.py)

Module map: config_lib (ml_collections configs and overrides), optimizer (AdamW, schedules,
stage masks), state (TrainState and its shardings), losses (chunked cross-entropy, K
positions), step (the generic jitted step, next-token loss), data (grain or synthetic
batches), synthetic, checkpoint (orbax run checkpoints, stage initialisation), run_dir (run
directories as a checkpoint kind), metrics (FLOP model, JSONL / TensorBoard), evaluation
(held-out loss, VQA exact match), trainer, cli. docs/training.md explains the whole.
Nothing is imported here, so `import neo_jax.train.run_dir` stays light.
"""
