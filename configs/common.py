"""What every training config shares: each field with its default, the config argument, the
tiny model's CPU set-up and the `local` variant.

One file per stage (pretrain.py, midtrain.py, sft.py, preference.py) holds that stage's recipe
for each model. Its argument, after the file name, picks the model and variants:

    neo-jax train --config configs/sft.py:neo_2b          NEO-2B's recipe
    neo-jax train --config configs/sft.py:tiny            the demo's tiny NEO on easy-vqa, CPU
    neo-jax train --config configs/sft.py:tiny,local      seconds anywhere: a smoke test

Every field can be overridden on the command line with the type of its default, e.g.
`--config.optimizer.lr=3e-5 --config.mesh.tensor=4`; `--print-config` shows them all.
"""

import ml_collections

from neo_jax.config import preset
from neo_jax.data.embedded import load_named_tokenizer
from neo_jax.data.image import FACTOR
from neo_jax.data.synthetic import compact_vocab
from neo_jax.data.tokenizer import token_ids
from neo_jax.objectives.cross_entropy import DEFAULT_CHUNK
from neo_jax.parallel.sharding import rules_table
from neo_jax.trainer.config import model_config, model_fields

MODELS = ("tiny", "neo_2b", "neo_9b")
# the tiny configs' images: easy-vqa's 64x64 upscaled to 128x128, one visual token per 32x32
TINY_IMAGE_SIDE = 128
TINY_IMAGE_TOKENS = (TINY_IMAGE_SIDE // FACTOR) ** 2  # 16


def parse_arg(arg, *, models=MODELS, **defaults) -> ml_collections.ConfigDict:
  """`MODEL[,FLAG|,KEY=VALUE]...` -> {model, each default updated}.

  The first word names the model; a bare word sets a boolean default to True; KEY=VALUE takes
  the type of KEY's default. `parse_arg("tiny,local", local=False)` -> {model: "tiny",
  local: True}.
  """
  words = [w.strip() for w in (arg or "").split(",") if w.strip()]
  if not words or words[0] not in models:
    raise ValueError(
      f"name the model after the file, FILE.py:MODEL, MODEL one of "
      f"{', '.join(models)} (got {arg!r})"
    )
  out = ml_collections.ConfigDict(dict(defaults, model=words[0]))
  for word in words[1:]:
    key, eq, value = word.partition("=")
    if key not in defaults:
      raise ValueError(f"{word!r}: not one of {', '.join(sorted(defaults))}")
    if not eq:
      if not isinstance(defaults[key], bool):
        raise ValueError(f"{key} needs a value: {key}=...")
      out[key] = True
    elif isinstance(defaults[key], bool):
      if value.lower() not in ("true", "false"):
        raise ValueError(f"{word!r}: {key} is true or false")
      out[key] = value.lower() == "true"
    else:
      out[key] = type(defaults[key])(value)
  return out


def base_config(model: str, stage: str) -> ml_collections.ConfigDict:
  """Every field of a training config, with its default; `model` is a NeoConfig preset."""
  config = ml_collections.ConfigDict()
  config.name = f"{model}_{stage}"
  # pretrain trains vision/*, pre_buffer/* and the post-LLM's q/k_proj_hw and H/W norms;
  # midtrain, sft and preference train everything (neo_jax/trainer/optimizer.py)
  config.stage = stage
  config.workdir = f"workdir/{model}_{stage}"  # checkpoints, metrics.jsonl, tensorboard/
  config.seed = 42  # parameter init and the train state's RNG
  config.total_steps = 1000  # optimizer updates
  config.grad_accum_steps = 1  # micro-batches per update (data.batch_size counts per update)
  config.nan_policy = "stop"  # non-finite loss/grad norm: stop | skip (the update) | ignore
  # nan_policy=skip: a run that skipped more than this share of its updates fails (exit 1)
  config.max_skipped_share = 0.1
  config.trainable = ()  # regexes over parameter paths; empty: the stage's set (see below)
  config.objective = "next_token"  # what the step optimises: next_token | preference

  # the model: every NeoConfig field (architecture, how to compute, and the pixel range every
  # image is resized into: the data pipeline and evaluation read it from here)
  config.model = model_fields(
    preset(model),
    dtype="bfloat16",
    param_dtype="float32",
    attention_impl="auto",
    remat_policy="full",
  )

  # where the parameters come from when the run directory has no checkpoint yet
  config.init = ml_collections.ConfigDict()
  config.init.path = ""  # empty: random initialisation
  config.init.format = "neo"  # neo: any NEO checkpoint / run dir | run | qwen3: HF Qwen3 dir
  config.init.step = -1  # for run directories: which checkpoint (-1: the newest)

  # K: supervised positions per row; the packer enforces it, the loss gathers them (0: all)
  loss_positions = ml_collections.FieldReference(0)

  # the data: neo_jax.data.DataConfig fields, plus the pipeline and the global batch
  config.data = ml_collections.ConfigDict()
  config.data.pipeline = "grain"  # grain: neo_jax.data | synthetic: random packed batches
  config.data.kind = "sft"  # sft | pretrain | text | preference
  config.data.sources = ()  # empty: the embedded easy-vqa set for `kind`
  config.data.weights = ()  # mixing weights of `sources` (empty: equal)
  # "": Qwen3 + NEO's tokenizer; "easy_vqa": only the Qwen3 tokens easy-vqa's text uses
  # (neo_jax.data.embedded.load_named_tokenizer); or an HF tokenizer directory. The run
  # directory keeps a copy; config.model's vocab_size and token ids must fit it
  config.data.tokenizer = ""
  config.data.text_sources = ("pydoc/text",)
  config.data.text_ratio = 0.0  # fraction of plain-text samples
  # rows per update over all processes; 0: data.rows_per_shard for every batch shard (a device,
  # or a group of tensor-parallel devices) of every micro-batch, so the global batch grows
  # with the mesh: rows_per_shard x data x fsdp x grad_accum_steps (NEO: one row per GPU)
  config.data.batch_size = 0
  config.data.rows_per_shard = 1  # used when data.batch_size is 0
  config.data.seq_len = 4096  # L: tokens per packed row
  config.data.visual_budget = 1024  # N: visual tokens per row
  config.data.loss_token_budget = loss_positions
  config.data.loss_reduction = "square"  # NEO: each sample's tokens weigh 1/sqrt(count)
  config.data.system_prompt = ""
  config.data.seed = 42
  config.data.strict = False  # True: stop at the first bad record instead of skipping it
  # training images only, for data whose answers survive it: "flip" (left-right, p 1/2),
  # "shift:F" (up to F x the side on each axis); neo_jax.data.augment
  config.data.augment = ()
  config.data.num_workers = 0  # grain worker processes
  config.data.read_threads = 2

  config.loss = ml_collections.ConfigDict()
  config.loss.chunk_size = DEFAULT_CHUNK  # max positions per cross-entropy chunk (B*chunk*V fp32)
  config.loss.remat = True  # recompute each chunk's logits in the backward pass (less memory)
  config.loss.positions_per_row = loss_positions
  # > 0: stream the head over this many vocabulary entries at a time (online logsumexp, the
  # backward recomputes each piece): logits memory [chunk, piece] instead of [chunk, V]
  config.loss.vocab_chunk = 0

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.lr = 1e-4
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.01  # on matrices only, not norms / biases
  config.optimizer.clip_norm = 1.0  # global gradient norm (0: off)
  config.optimizer.schedule = "cosine_with_min_lr"  # | cosine (to 0) | constant
  config.optimizer.min_lr_ratio = 0.1
  config.optimizer.warmup_steps = 0  # > 0 wins over warmup_ratio
  config.optimizer.warmup_ratio = 0.0

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 1  # replicas (parameters copied)
  config.mesh.fsdp = -1  # -1: all remaining devices; parameters and optimizer state split
  config.mesh.tensor = 1  # heads / MLP / vocabulary split
  config.mesh.num_devices = 0  # 0: every device; n: the first n (single-process experiments)
  # logical axis -> mesh axes (() = whole), weights and activations apart (docs/training.md)
  config.mesh.rules = ml_collections.ConfigDict(rules_table())

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1000
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True

  config.log = ml_collections.ConfigDict()
  config.log.every_steps = 10  # metrics.jsonl / TensorBoard
  config.log.tensorboard = True
  config.log.progress_bar = True
  config.log.peak_tflops = 0.0  # per device, for MFU; 0: the vendor figure of the device kind

  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 0  # 0: no periodic evaluation
  config.eval.heldout_batches = 4  # held-out loss on this many batches of eval.split
  config.eval.split = "test"
  config.eval.sources = ()  # empty: data.sources (give a held-out file for JSONL sources)
  config.eval.vqa_examples = 0  # VQA exact match by greedy decoding (0: off)
  config.eval.max_new_tokens = 8
  return config


def tiny_cpu(config: ml_collections.ConfigDict) -> None:
  """The `tiny` NEO on the embedded easy-vqa data, sized for two CPU cores (the demo)."""
  config.name = f"tiny_vqa_{config.stage}"
  config.workdir = f"workdir/tiny_vqa_{config.stage}"
  config.model.dtype = "float32"
  config.model.remat_policy = "none"
  config.model.attention_impl = "xla"
  # easy-vqa's 64x64 images upscaled to 128x128: 4x4 visual tokens each. At 64x64 (2x2 tokens,
  # each a 32-px quadrant) the model confuses circles with rectangles; at 128x128 it names the
  # shape about 80% right after the same pretraining (docs/training.md, "Resolution")
  config.model.min_pixels = TINY_IMAGE_SIDE**2
  config.model.max_pixels = TINY_IMAGE_SIDE**2
  # 8 query heads of 32 (the preset has 4): with 4 the model takes longer to learn to compare a
  # question's colour with its image (yes/no stays at the answer prior until then)
  config.model.num_attention_heads = 8
  config.model.num_key_value_heads = 4
  # 427 tokens instead of 151,669: the head and the tied embedding were 19.4M of the 20.5M
  # parameters and most of the step (docs/training.md, "The main job")
  config.data.tokenizer = "easy_vqa"
  config.model.update(token_ids(load_named_tokenizer(config.data.tokenizer)))
  config.init.format = "run"
  # short rows of one sample (an image and its question, ~40 tokens): attention over a packed
  # row costs L^2, and at L=384 it was most of the step (docs/training.md, "Resolution")
  config.data.rows_per_shard = 8  # one CPU device: 8 rows per update
  config.data.seq_len = 48
  config.data.visual_budget = TINY_IMAGE_TOKENS  # one image per row
  config.loss.chunk_size = 16  # one chunk: K <= 16 positions per row
  config.loss.remat = False  # CPU: keep the logits rather than recompute them
  config.checkpoint.every_steps = 500
  config.checkpoint.max_to_keep = 2


def local(
  config: ml_collections.ConfigDict,
  *,
  batch_size: int,
  seq_len: int,
  visual_budget: int,
  positions_per_row: int,
  warmup_steps: int,
) -> None:
  """The `local` variant: the stage as it runs anywhere in seconds, for smoke tests and the
  test suite. The model keeps its width but has one pre-Buffer and one LLM layer and a
  512-token vocabulary; random weights; synthetic batches of the given shapes; one device;
  a record every step; no evaluation."""
  small = model_config(config).replace(num_hidden_layers=2, num_prebuffer_layers=1)
  config.model = model_fields(compact_vocab(small, 512))
  config.name += "_local"
  config.workdir += "_local"
  config.init.path = ""
  config.total_steps = 10
  config.data.pipeline = "synthetic"
  config.data.batch_size = batch_size
  config.data.rows_per_shard = 0  # the batch is global: the same on any device count
  config.data.seq_len = seq_len
  config.data.visual_budget = visual_budget
  config.loss.positions_per_row = positions_per_row
  config.loss.chunk_size = positions_per_row  # one chunk
  config.optimizer.warmup_steps = warmup_steps
  config.log.every_steps = 1
  config.log.progress_bar = False
  config.mesh.num_devices = 1
  config.eval.every_steps = 0
  config.eval.vqa_examples = 0
