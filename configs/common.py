"""Defaults shared by every training config, and NEO's published stage recipes (spec 5.1).

A config file picks a model and a stage and changes only what differs:

    import common
    def get_config(arg=None):
      config = common.stage_config("neo_2b", "pretrain")
      config.data.sources = ("tfds:/data/captions",)
      return config

Every field below can be overridden on the command line, e.g.
`neo-jax train --config configs/neo_2b_sft.py --config.optimizer.lr=3e-5 --config.mesh.tensor=4`.
"""

import ml_collections

from neo_jax.config import preset
from neo_jax.train.config_lib import model_fields

# NEO's scripts (VLMTrainKit/scripts/*.sh): AdamW (0.9, 0.95), eps 1e-8, weight decay 0.01,
# clip 1.0, bf16 with gradient checkpointing, one packed row per GPU, 8 GPUs (NNODES is never
# passed to torchrun), seed 42. Per (model, stage):
RECIPES = {
    ("neo_2b", "pretrain"): dict(
        init="qwen3", lr=8e-4, grad_accum_steps=5, total_steps=200_000, warmup_steps=1000,
        warmup_ratio=0.0, schedule="cosine_with_min_lr", min_lr_ratio=0.1, seq_len=16384,
        min_pixels=65_536, max_pixels=4_194_304),
    ("neo_2b", "midtrain"): dict(
        init="neo", lr=5e-5, grad_accum_steps=2, total_steps=50_000, warmup_steps=0,
        warmup_ratio=0.03, schedule="cosine_with_min_lr", min_lr_ratio=0.2, seq_len=32768,
        min_pixels=65_536, max_pixels=16_777_216),
    ("neo_2b", "sft"): dict(
        init="neo", lr=6e-5, grad_accum_steps=1, total_steps=4_500, warmup_steps=0,
        warmup_ratio=0.03, schedule="cosine_with_min_lr", min_lr_ratio=0.1, seq_len=34816,
        min_pixels=65_536, max_pixels=16_777_216),
    ("neo_9b", "pretrain"): dict(
        init="qwen3", lr=8e-4, grad_accum_steps=5, total_steps=200_000, warmup_steps=1000,
        warmup_ratio=0.0, schedule="cosine_with_min_lr", min_lr_ratio=0.1, seq_len=16384,
        min_pixels=65_536, max_pixels=4_194_304),
    ("neo_9b", "midtrain"): dict(
        init="neo", lr=5e-5, grad_accum_steps=2, total_steps=50_000, warmup_steps=200,
        warmup_ratio=0.0, schedule="cosine_with_min_lr", min_lr_ratio=0.2, seq_len=18432,
        min_pixels=65_536, max_pixels=16_777_216),
    # the 8B SFT script asks for plain "cosine" (its min_lr_ratio is ignored): decays to 0
    ("neo_9b", "sft"): dict(
        init="neo", lr=6e-5, grad_accum_steps=1, total_steps=4_500, warmup_steps=200,
        warmup_ratio=0.0, schedule="cosine", min_lr_ratio=0.0, seq_len=18432,
        min_pixels=65_536, max_pixels=16_777_216),
}

# what each stage reads: pretrain learns from captions, midtrain and SFT from conversations
STAGE_DATA_KIND = {"pretrain": "pretrain", "midtrain": "sft", "sft": "sft"}


def base_config(model: str, stage: str, **model_overrides) -> ml_collections.ConfigDict:
  """Every field of a training config, with defaults; `model` is a NeoConfig preset."""
  config = ml_collections.ConfigDict()
  config.name = f"{model}_{stage}"
  # pretrain trains vision/*, pre_buffer/* and the post-LLM's q/k_proj_hw and H/W norms;
  # midtrain and sft train everything (neo_jax/train/optimizer.py, STAGE_TRAINABLE)
  config.stage = stage
  config.workdir = f"workdir/{model}_{stage}"  # checkpoints, metrics.jsonl, tensorboard/
  config.seed = 42  # parameter init and the train state's RNG
  config.total_steps = 1000  # optimizer updates
  config.grad_accum_steps = 1  # micro-batches per update (data.batch_size is per update)
  config.nan_policy = "stop"  # non-finite loss/grad norm: stop | skip (the update) | ignore
  config.trainable = ()  # regexes over parameter paths; empty: the stage's set (see below)

  # the model: every NeoConfig field (architecture, then how to compute)
  compute = dict(dtype="bfloat16", param_dtype="float32", attention_impl="auto",
                 remat_policy="full")
  config.model = model_fields(preset(model), **{**compute, **model_overrides})

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
  config.data.kind = STAGE_DATA_KIND[stage]  # sft | pretrain | text | preference
  config.data.sources = ()  # empty: the embedded easy-vqa set for `kind`
  config.data.weights = ()  # mixing weights of `sources` (empty: equal)
  config.data.text_sources = ("pydoc/text",)
  config.data.text_ratio = 0.0  # fraction of plain-text samples
  config.data.split = "train"
  config.data.batch_size = 8  # rows per update, all processes together (one row per GPU)
  config.data.seq_len = 4096  # L: tokens per packed row
  config.data.visual_budget = 1024  # N: visual tokens per row
  config.data.loss_token_budget = loss_positions
  config.data.min_pixels = 65_536
  config.data.max_pixels = 4_194_304
  config.data.loss_reduction = "square"  # NEO: each sample's tokens weigh 1/sqrt(count)
  config.data.system_prompt = ""
  config.data.seed = 42
  config.data.strict = False  # True: stop at the first bad record instead of skipping it
  config.data.num_workers = 0  # grain worker processes
  config.data.read_threads = 2

  config.loss = ml_collections.ConfigDict()
  config.loss.chunk_size = 1024  # max positions per cross-entropy chunk (B*chunk*V fp32 live)
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


def stage_config(model: str, stage: str, **model_overrides) -> ml_collections.ConfigDict:
  """base_config with NEO's recipe for (model, stage) from RECIPES."""
  recipe = RECIPES[(model, stage)]
  config = base_config(model, stage, **model_overrides)
  config.init.format = recipe["init"]
  config.total_steps = recipe["total_steps"]
  config.grad_accum_steps = recipe["grad_accum_steps"]
  config.data.batch_size = 8 * recipe["grad_accum_steps"]  # 8 rows per micro-batch
  config.data.seq_len = recipe["seq_len"]
  config.data.visual_budget = recipe["seq_len"] // 2
  config.data.min_pixels = recipe["min_pixels"]
  config.data.max_pixels = recipe["max_pixels"]
  config.model.min_pixels = recipe["min_pixels"]
  config.model.max_pixels = recipe["max_pixels"]
  opt = config.optimizer
  opt.lr = recipe["lr"]
  opt.schedule = recipe["schedule"]
  opt.min_lr_ratio = recipe["min_lr_ratio"]
  opt.warmup_steps = recipe["warmup_steps"]
  opt.warmup_ratio = recipe["warmup_ratio"]
  config.loss.chunk_size = 1024
  config.checkpoint.every_steps = 1000
  config.log.every_steps = 10
  return config


def tiny_config(stage: str) -> ml_collections.ConfigDict:
  """The `tiny` NEO on the embedded easy-vqa data, sized for two CPU cores."""
  config = base_config("tiny", stage, dtype="float32", remat_policy="none",
                       attention_impl="xla", min_pixels=64 * 64, max_pixels=64 * 64)
  config.name = f"tiny_vqa_{stage}"
  config.workdir = f"workdir/tiny_vqa_{stage}"
  config.init.format = "run"
  config.data.batch_size = 8
  config.data.seq_len = 256
  config.data.visual_budget = 64
  config.data.min_pixels = 64 * 64  # easy-vqa images are 64x64: 2x2 visual tokens each
  config.data.max_pixels = 64 * 64
  config.loss.chunk_size = 128  # one chunk: K <= 128 positions per row, 8 x 128 x V fp32
  config.loss.remat = False  # CPU: keep the logits (0.5 GB) rather than recompute them
  config.optimizer.schedule = "cosine_with_min_lr"
  config.optimizer.min_lr_ratio = 0.1
  config.checkpoint.every_steps = 100
  config.checkpoint.max_to_keep = 2
  config.log.every_steps = 10
  return config


# --- preference optimisation: ACPO and the DPO family (docs/acpo.md) -------------------------

def preference_config(config: ml_collections.ConfigDict,
                      loss: str = "acpo") -> ml_collections.ConfigDict:
  """`config` (a stage config of the same model) turned into a preference stage.

  The step scores chosen and rejected in one forward over packed prompt | chosen | rejected
  rows; `loss.positions_per_row` (K) caps the response tokens of a row (and P = K // 2 pairs).
  """
  config.objective = "preference"  # neo_jax/train/preference.py
  config.stage = "preference"  # every parameter trains
  config.data.kind = "preference"
  config.data.sources = ()  # empty: the embedded easy-vqa pairs
  p = config.preference = ml_collections.ConfigDict()
  # sigmoid (= dpo) | robust | hinge | ipo | sigmoid_norm | simpo | dpop | nca_pair | sppo_hard
  # | apo_zero | apo_down | exo_pair | discopop | bco_pair | mpo | acpo
  p.loss = loss
  p.reference = "model"  # model: frozen copy of the start | batch: ref_*_logps keys | none
  p.beta = 0.1  # TRL / MPO default
  p.label_smoothing = 0.0  # cDPO / robust eps (exo_pair needs > 0, e.g. 1e-3)
  p.gamma = 0.5  # SimPO target margin (TRL's simpo_gamma)
  p.dpop_lambda = 50.0  # DPOP penalty weight
  p.discopop_tau = 0.05
  p.mpo_weights = (0.8, 0.2)  # MPO: DPO and BCO-pair weights
  p.sft_weight = -1.0  # NLL on the chosen response (RPO); < 0: the loss's default (mpo 1, else 0)
  p.sft_reduction = "token"  # token: token mean over the batch (TRL, MPO code) | sequence
  # ACPO (reconstruction, spec/acpo.md 1.3): alpha = clip((r_w - tau) / r_l), tau = delta *
  # (|y_w| + |y_l|) averaged over the batch; alpha = 1 where |r_l| < guard_eps
  p.delta = 0.01  # per-token reward target (unknown in the paper; sweep 0 - 0.05)
  p.alpha_mode = "per_sample"  # | batch (one alpha from the batch means of the rewards)
  p.alpha_clip = (0.0, 1.0)  # (): no clipping
  p.detach_alpha = True
  p.guard_eps = 1e-6
  return config


# MPO's recipe (InternVL2-8B MPO script, spec/acpo.md 3.3); ACPO's own is not published
MPO_RECIPE = dict(lr=5e-6, schedule="cosine", warmup_ratio=0.03, weight_decay=0.05, beta=0.1)


def preference_stage_config(model: str, loss: str = "acpo") -> ml_collections.ConfigDict:
  """NEO-2B / 9B preference stage on the MPO recipe, starting from the model's SFT run."""
  config = preference_config(stage_config(model, "sft"), loss)
  config.name = f"{model}_{loss}"
  config.workdir = f"workdir/{model}_{loss}"
  config.init.format = "neo"
  opt = config.optimizer
  opt.lr = MPO_RECIPE["lr"]
  opt.schedule = MPO_RECIPE["schedule"]
  opt.min_lr_ratio = 0.0
  opt.warmup_steps = 0
  opt.warmup_ratio = MPO_RECIPE["warmup_ratio"]
  opt.weight_decay = MPO_RECIPE["weight_decay"]
  config.preference.beta = MPO_RECIPE["beta"]
  # one epoch of ~320K pairs (the size of ACPO's proprietary set) at ~256 pairs per update
  # (MPO's global batch): 4 micro-batches of 8 packed 16,384-token rows, ~8 pairs per row
  config.grad_accum_steps = 4
  config.data.batch_size = 32
  config.total_steps = 1250
  config.data.seq_len = 16384
  config.data.visual_budget = 8192
  config.loss.positions_per_row = 4096  # response tokens per row (P = 2,048 pairs at most)
  config.checkpoint.every_steps = 250
  return config


def tiny_preference_config(loss: str) -> ml_collections.ConfigDict:
  """The tiny NEO's preference stage on the embedded easy-vqa pairs, from the tiny SFT run.

  Sized for two CPU cores: ~30 updates of 8 rows x ~9 pairs; lr small enough that the SFT
  model's VQA accuracy does not drop; one held-out evaluation (preference loss and easy-vqa
  exact match on 100 test questions) after the last step.
  """
  config = preference_config(tiny_config("sft"), loss=loss)
  config.name = f"tiny_vqa_{loss}"
  config.workdir = f"workdir/tiny_vqa_{loss}"
  config.total_steps = 30
  config.optimizer.lr = 2e-4
  config.optimizer.warmup_steps = 3
  config.init.path = "workdir/tiny_vqa_sft"
  config.init.format = "run"
  config.data.visual_budget = 64
  config.loss.positions_per_row = 64  # response tokens per row (~6 per pair)
  config.log.every_steps = 1
  config.checkpoint.every_steps = 30
  config.eval.every_steps = 30  # once, at the end
  config.eval.heldout_batches = 2  # preference loss on test pairs
  config.eval.vqa_examples = 100  # greedy answers to easy-vqa test questions
  return config
