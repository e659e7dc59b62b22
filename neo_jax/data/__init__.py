"""NEO's data pipeline: sources -> preprocessing -> packing -> fixed-shape numpy batches.

Entry points (import the module that holds them; this package imports nothing heavy):

    tokenizer.load_tokenizer(path=None) -> NeoTokenizer      Qwen3 + NEO tokens, built offline
    image.preprocess_image(source, min_pixels, max_pixels, inference=False) -> ProcessedImage
    template.build_generation_prompt(tokenizer, question, image_tokens, system="") -> ids
    inputs.prepare_generation_inputs(tokenizer, model_config, question, images) -> arrays
    pipeline.DataConfig, pipeline.build_train_iterator(cfg, tokenizer, model_config,
        process_index=0, process_count=1) -> DataIterator (.stats(), grain checkpointing)
    pipeline.read_vqa_eval(split="test", limit=None) -> [VqaExample(image, question, answer)]
    embedded.build_embedded(), tfds_sources.build_tfds(...), jsonl.JsonlSource(path, images)

Module map: cache (cache directory), tokenizer, image, template, records (raw record form),
jsonl / tfds_sources / embedded (sources), encode (record -> sample, skip markers), stats
(skip / drop counters, strict mode), packing (rows and batches), pipeline (grain graph),
inputs (inference prompts), cli (`neo-jax data ...`).
"""
