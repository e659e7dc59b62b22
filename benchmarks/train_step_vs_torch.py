"""NEO's loss and gradients, neo-jax against PyTorch on the same work: tokens/s and peak RSS.

    .venv/bin/python benchmarks/train_step_vs_torch.py --threads 2 --repeats 5 \\
        --L 1024 2048 --pass fwd fwdbwd --json vs_torch.json
    .venv/bin/python benchmarks/train_step_vs_torch.py --official /path/to/NEO \
        --official-python /path/to/venv/bin/python        # the official code, its transformers
    .venv/bin/python benchmarks/train_step_vs_torch.py --impls jax "jax:fused=0" --L 1024
    .venv/bin/python benchmarks/train_step_vs_torch.py --impls torch "torch:malloc=hugetlb" \
        "jax:malloc=default" jax "jax:tensor=2"

The work (fp32, batch 1): a 177.5M-parameter NEO (hidden 512, 8 query / 4 kv heads, head_dim
64, intermediate 1536, 6 layers of which 2 pre-Buffer, vocabulary 151,936, untied head,
vision hidden 256) on one row: a short prompt, one image (512x512 = 256 visual tokens at
L = 1024, 512x1024 = 512 at L = 2048), text to fill L. Loss = mean next-token cross-entropy
over every position; `fwdbwd` also computes the gradient of every parameter (no optimizer).

PyTorch side (`torch`): tests/torch_neo_reference.py under autograd, computing what the
official HF code computes: eager attention under a dense [L, L] block-causal mask, full
[L, V] float32 logits, `F.cross_entropy` over them; the forward pass runs under `no_grad`.
With `--official DIR` (a checkout of EvolvingLMMs-Lab/NEO, or its `to_hf` folder) the
official modeling files are imported from DIR at run time and timed instead (`official`).
neo-jax side (`jax`): the jitted training loss (`next_token_loss`) and `jax.value_and_grad`
of it; `jax:key=value;...` sets options (JAX_OPTIONS): e.g. `jax:tensor=2` runs it
tensor-parallel over two host devices, as `JAX_NUM_CPU_DEVICES=2 neo-jax train ...
--config.mesh.tensor=2` does. Like the `neo-jax` command, a jax worker runs with glibc's
huge-page tunable (neo_jax/cli/allocator.py; `malloc=default` turns it off); a PyTorch worker
runs with this process's environment unless given `torch:malloc=hugetlb`.

Every implementation runs in its own worker process (so each has its own peak RSS and XLA
flags), pinned to `--threads` CPUs. Before timing, the parent checks that they agree on the
loss, on rows of the logits and (fwdbwd) on gradient norms. Steps then run alternately (A, B,
A, B, ...), one at a time, or with `--order blocks` each implementation's steps back to back
(as a training run takes them; the JSON also has the page faults of each step); the table
gives medians and ranges, ratios of paired steps, the
ratio of median process CPU seconds per step (steadier than wall time on a shared machine)
and peak RSS during the timed steps (VmHWM, reset after setup, once the heap pages freed
during setup are returned to the OS) next to the RSS the step starts from.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

MODEL = dict(
  vocab_size=151936,
  hidden_size=512,
  intermediate_size=1536,
  num_hidden_layers=6,
  num_prebuffer_layers=2,
  num_attention_heads=8,
  num_key_value_heads=4,
  head_dim=64,
  vision_hidden_size=256,
  tie_word_embeddings=False,
)
IMAGE_GRID16 = {1024: (32, 32), 2048: (32, 64)}  # 16-px grid of the image at each L
PROMPT = 8  # text tokens before the image
CHECK_ROWS = 8  # logits rows compared (spread over the row)
LOGITS_ATOL = 1e-4
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4

# neo-jax options (`jax:key=value;...`): the loss (`next_token_loss` arguments), the model's
# attention and remat settings, and extra XLA flags for the worker
JAX_OPTIONS = dict(
  fused=1,
  chunk=0,  # 0: the library's default (cross_entropy.DEFAULT_CHUNK)
  loss_remat=1,
  vocab_chunk=0,
  attention="auto",
  q_chunk=512,
  remat="none",
  xla_flags="",
  tensor=1,  # > 1: that many host devices, the step tensor-parallel over them (mesh.tensor)
  malloc="hugetlb",  # as the neo-jax command runs (neo_jax/cli/allocator.py); "default": off
)
# PyTorch options (`torch:malloc=hugetlb`, `official:...`): the same allocator setting
TORCH_OPTIONS = dict(malloc="default")


# --- data (written once by the parent, read by every worker) -----------------------------------


def model_config():
  from neo_jax.config import NeoConfig

  return NeoConfig(**MODEL)


def image_grid(length: int) -> tuple[int, int]:
  if length in IMAGE_GRID16:
    return IMAGE_GRID16[length]
  side = max(2, 2 * int(np.sqrt(length / 4) // 2))  # about a quarter of the row, even sides
  return side, side


def make_data(directory: str, length: int, seed: int = 0) -> None:
  """weights.safetensors (HF keys: `random_state_dict` of tests/torch_neo_reference.py) and
  inputs.npz."""
  import torch_neo_reference as ref
  from safetensors.torch import save_file

  config = model_config()
  hf = config.to_hf_dict("float32")
  weights = os.path.join(directory, "weights.safetensors")
  if not os.path.exists(weights):
    save_file(ref.random_state_dict(hf, seed=seed, tied=False), weights)
  h16, w16 = image_grid(length)
  pixel_values, grid_hw = ref.random_images([(h16, w16)], seed)
  n_visual = h16 * w16 // 4
  rng = np.random.default_rng(seed + length)
  text = lambda n: rng.integers(0, config.pad_token_id, n).tolist()
  fill = length - PROMPT - n_visual - 2
  if fill < 1:
    raise SystemExit(f"L={length} is too short for a {h16 * 16}x{w16 * 16} image")
  ids = (
    text(PROMPT)
    + [config.img_start_token_id]
    + [config.img_context_token_id] * n_visual
    + [config.img_end_token_id]
    + text(fill)
  )
  np.savez(
    os.path.join(directory, f"inputs_{length}.npz"),
    input_ids=np.asarray(ids, np.int64),
    pixel_values=pixel_values.numpy(),
    grid_hw=grid_hw.numpy(),
  )


def load_inputs(directory: str, length: int) -> dict:
  with np.load(os.path.join(directory, f"inputs_{length}.npz")) as f:
    return {k: f[k] for k in f.files}


def check_rows(length: int) -> np.ndarray:
  return np.unique(np.linspace(0, length - 1, CHECK_ROWS).astype(np.int64))


def read_status_bytes(field: str = "VmHWM") -> int:
  """A size from /proc/self/status (VmHWM: peak resident set, VmRSS: current), in bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  return 0


def release_freed_memory() -> None:
  """Returns heap pages freed during setup (loading, compilation) to the OS (glibc
  malloc_trim), so the timed steps' peak counts what the process holds, not what the
  allocator kept."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


def reset_peak_rss() -> None:
  """Sets VmHWM to the current RSS (Linux clear_refs 5) so setup does not count."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


# --- workers ------------------------------------------------------------------------------------


class TorchWorker:
  """The in-repo baseline (`torch`) or the official HF modules (`official`)."""

  def __init__(self, kind: str, data: str, length: int, pass_: str, official: str):
    import torch
    import torch.nn.functional as F
    import torch_neo_reference as ref
    from safetensors.torch import load_file

    self.torch = torch
    config = model_config()
    self.hf = config.to_hf_dict("float32")
    inputs = load_inputs(data, length)
    self.ids = torch.from_numpy(inputs["input_ids"])
    self.pixels = torch.from_numpy(inputs["pixel_values"])
    self.grid_hw = torch.from_numpy(inputs["grid_hw"])
    sd = load_file(os.path.join(data, "weights.safetensors"))
    self.pass_ = pass_
    if kind == "official":
      self.model = official_model(official, self.hf, sd)
      self.params = list(self.model.parameters())
      self.logits_fn = lambda: official_logits(self.model, self.ids, self.pixels, self.grid_hw)
      self.grad_of = {
        "lm_head": self.model.language_model.lm_head.weight,
        "embedding": self.model.language_model.model.embed_tokens.weight,
      }
    else:
      self.params = list(sd.values())
      self.logits_fn = lambda: ref.neo_forward(sd, self.hf, self.ids, self.pixels, self.grid_hw)
      self.grad_of = {
        "lm_head": sd["language_model.lm_head.weight"],
        "embedding": sd["language_model.model.embed_tokens.weight"],
      }
    for p in self.params:
      p.requires_grad_(pass_ == "fwdbwd")
    self.loss_fn = lambda logits: F.cross_entropy(logits[:-1].float(), self.ids[1:])

  def gemm_peak(self) -> float:
    torch = self.torch
    a = torch.ones(2048, 2048)
    a @ a
    best = float("inf")
    for _ in range(5):
      t = time.perf_counter()
      a @ a
      best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best

  def check(self, out_dir: str) -> dict:
    torch = self.torch
    with torch.no_grad():
      logits = self.logits_fn()
      loss = self.loss_fn(logits)
      np.save(out_dir, logits[torch.from_numpy(check_rows(logits.shape[0]))].numpy())
    result = {"loss": float(loss)}
    del logits
    if self.pass_ == "fwdbwd":
      self.step()
      result["grad_norms"] = self.grad_norms()
    return result

  def grad_norms(self) -> dict:
    sq = sum(float((p.grad.double() ** 2).sum()) for p in self.params)
    out = {name: float(p.grad.double().norm()) for name, p in self.grad_of.items()}
    out["all"] = sq**0.5
    return out

  def step(self) -> float:
    torch = self.torch
    if self.pass_ == "fwd":
      with torch.no_grad():
        return float(self.loss_fn(self.logits_fn()))
    for p in self.params:
      p.grad = None
    loss = self.loss_fn(self.logits_fn())
    loss.backward()
    return float(loss)


def _official_package(path: str) -> str:
  """The folder that holds the official HF modeling files under `path`."""
  for root, _, files in os.walk(path):
    if "modeling_neo_chat.py" in files and "modeling_qwen3.py" in files:
      return root
  raise SystemExit(
    f"--official {path}: no folder with modeling_neo_chat.py and "
    "modeling_qwen3.py (the HF modeling files of EvolvingLMMs-Lab/NEO)"
  )


def official_model(path: str, hf: dict, sd: dict):
  import importlib.util  # noqa: F401 (importlib.util is a submodule)

  folder = _official_package(path)
  spec = importlib.util.spec_from_file_location(
    "neo_official", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
  )
  package = importlib.util.module_from_spec(spec)
  sys.modules["neo_official"] = package
  spec.loader.exec_module(package)
  chat = importlib.import_module("neo_official.modeling_neo_chat")
  conf = importlib.import_module("neo_official.configuration_neo_chat")
  model = chat.NEOChatModel(conf.NEOChatConfig(**hf))
  missing, unexpected = model.load_state_dict(sd, strict=False)
  if missing or unexpected:
    raise SystemExit(f"official model: missing {missing[:4]}, unexpected {unexpected[:4]}")
  model.img_context_token_id = hf["img_context_token_id"]
  model.img_start_token_id = hf["img_start_token_id"]
  return model.float().train()


def official_logits(model, ids, pixel_values, grid_hw):
  """What the official model computes for a training row: vision, embedding, the decoder with
  its dense block-causal mask (built from the T index), the head on every position."""
  import torch
  from transformers.cache_utils import DynamicCache

  vit = model.extract_feature(pixel_values, grid_hw=grid_hw)
  embeds = model.language_model.get_input_embeddings()(ids[None]).clone()
  embeds[ids[None] == model.img_context_token_id] = vit.to(embeds.dtype)
  indexes = model.get_thw_indexes(ids, grid_hw)
  positions = torch.arange(ids.shape[0])
  lm = model.language_model
  out = lm(
    inputs_embeds=embeds,
    indexes=indexes,
    position_ids=positions[None],
    cache_position=positions,
    past_key_values=DynamicCache(config=lm.config),
    use_cache=False,
  )
  return out.logits[0]


class JaxWorker:
  """neo-jax: the jitted next-token loss and its value_and_grad."""

  def __init__(self, options: dict, data: str, length: int, pass_: str):
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    tensor = int(options["tensor"])
    if tensor > 1:  # that many host devices; must come before anything starts the backend
      jax.config.update("jax_num_cpu_devices", tensor)

    from neo_jax.convert import mapping
    from neo_jax.convert.hf_inputs import hf_inputs_to_batch
    from neo_jax.model import NeoModel
    from neo_jax.objectives.next_token import next_token_loss
    from neo_jax.parallel.mesh import make_mesh
    from neo_jax.parallel.sharding import RULES, replicated
    from neo_jax.trainer.state import param_shardings

    self.jax, self.jnp = jax, jnp
    config = model_config().replace(
      attention_impl=options["attention"],
      attention_q_chunk=int(options["q_chunk"]),
      remat_policy=options["remat"],
    )
    arrays = load_file(os.path.join(data, "weights.safetensors"))
    params = mapping.params_from_hf(
      arrays.__getitem__,
      {k: a.shape for k, a in arrays.items()},
      {k: a.dtype for k, a in arrays.items()},
      config,
    )
    del arrays
    self.mesh = make_mesh(data=1, fsdp=1, tensor=tensor) if tensor > 1 else None
    if self.mesh is None:
      self.params = jax.tree.map(jnp.asarray, params)
    else:  # weights split as a training run splits them
      self.params = jax.device_put(params, param_shardings(config, self.mesh, RULES))
    del params
    inputs = load_inputs(data, length)
    batch = hf_inputs_to_batch(
      inputs["input_ids"], inputs["pixel_values"], inputs["grid_hw"], config
    )
    ids = batch["input_ids"]
    batch["targets"] = np.concatenate([ids[:, 1:], ids[:, :1]], axis=1)
    weights = np.ones(ids.shape, np.float32)
    weights[:, -1] = 0.0
    batch["loss_weights"] = weights
    if self.mesh is None:
      self.batch = {k: jnp.asarray(v) for k, v in batch.items()}
    else:
      self.batch = jax.device_put(batch, replicated(self.mesh))
    loss_fn = next_token_loss(config, **loss_kwargs(options))

    def loss(params, batch):
      out = loss_fn(params, batch)
      return out.loss_sum / out.weight_sum

    self.pass_ = pass_
    self.run = jax.jit(loss if pass_ == "fwd" else jax.value_and_grad(loss))
    model = NeoModel(config)
    rows = jnp.asarray(check_rows(length))
    self.logits_rows = jax.jit(
      lambda p, b: model.apply(
        {"params": p}, b["input_ids"], b["positions"], b["segment_ids"], b["pixels"], b["pixel_rc"]
      )[0, rows]
    )

  def context(self):
    """The mesh and sharding rules the step is traced under (as the trainer's), or nothing."""
    from neo_jax.parallel.sharding import mesh_context

    return contextlib.nullcontext() if self.mesh is None else mesh_context(self.mesh)

  def gemm_peak(self) -> float:
    jnp = self.jnp
    a = jnp.ones((2048, 2048), jnp.float32)
    f = self.jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
      t = time.perf_counter()
      f(a).block_until_ready()
      best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best

  def check(self, out_path: str) -> dict:
    with self.context():
      np.save(out_path, np.asarray(self.logits_rows(self.params, self.batch)))
      out = self.run(self.params, self.batch)
    if self.pass_ == "fwd":
      return {"loss": float(out)}
    loss, grads = out
    norm = lambda x: float(np.linalg.norm(np.asarray(x, np.float64)))
    leaves = self.jax.tree.leaves(grads)
    total = sum(float((np.asarray(g, np.float64) ** 2).sum()) for g in leaves) ** 0.5
    return {
      "loss": float(loss),
      "grad_norms": {
        "lm_head": norm(grads["lm_head"]["kernel"]),
        "embedding": norm(grads["embed_tokens"]["embedding"]),
        "all": total,
      },
    }

  def step(self) -> float:
    with self.context():
      out = self.jax.block_until_ready(self.run(self.params, self.batch))
    return float(out if self.pass_ == "fwd" else out[0])


def loss_kwargs(options: dict) -> dict:
  from neo_jax.objectives.cross_entropy import DEFAULT_CHUNK

  return dict(
    chunk=int(options["chunk"]) or DEFAULT_CHUNK,
    remat=bool(int(options["loss_remat"])),
    vocab_chunk=int(options["vocab_chunk"]),
    fused=bool(int(options["fused"])),
  )


def parse_impl(spec: str) -> tuple[str, dict]:
  """'torch' | 'official' | 'jax' | 'jax:key=value;key=value' -> (kind, options)."""
  kind, _, rest = spec.partition(":")
  if kind not in ("torch", "official", "jax"):
    raise SystemExit(
      f"--impls: unknown implementation {spec!r} (torch[:k=v], official[:k=v], jax[:k=v;...])"
    )
  options = dict(JAX_OPTIONS if kind == "jax" else TORCH_OPTIONS)
  for item in filter(None, rest.split(";")):
    key, _, value = item.partition("=")
    if key not in options:
      raise SystemExit(f"--impls {spec!r}: unknown option {key!r}; options: {sorted(options)}")
    if key == "malloc" and value not in ("hugetlb", "default"):
      raise SystemExit(f"--impls {spec!r}: malloc is hugetlb or default, not {value!r}")
    options[key] = value
  return kind, options


def pin_threads(threads: int) -> None:
  """Restricts this process to `threads` CPUs (XLA sizes its pool by the affinity mask)."""
  cpus = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, cpus[:threads])


def set_xla_cpu_threads(threads: int, *extra_flags: str) -> None:
  """XLA:CPU's thread pool sized to `threads`, plus `extra_flags`, in XLA_FLAGS (before jax is
  imported); flags already in the environment come first."""
  flags = [
    os.environ.get("XLA_FLAGS", ""),
    "--xla_cpu_multi_thread_eigen=true",
    f"intra_op_parallelism_threads={threads}",
    *extra_flags,
  ]
  os.environ["XLA_FLAGS"] = " ".join(f for f in flags if f)


def worker_main(args) -> int:
  kind, options = parse_impl(args.worker)
  # replies go to the original stdout; anything the libraries print goes to stderr
  replies = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  pin_threads(args.threads)
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(args.threads)
  if kind == "jax":
    set_xla_cpu_threads(args.threads, options["xla_flags"])
    worker = JaxWorker(options, args.data, args.length, args.pass_)
  else:
    import torch

    torch.set_num_threads(args.threads)
    worker = TorchWorker(kind, args.data, args.length, args.pass_, args.official)
  t = time.perf_counter()
  check = worker.check(args.rows_out)
  setup = {"check": check, "first_s": time.perf_counter() - t}
  setup["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
  gc.collect()
  release_freed_memory()
  reset_peak_rss()
  setup["rss_before"] = read_status_bytes("VmRSS")  # runtime, parameters, inputs, executables
  reply = lambda obj: print(json.dumps(obj), file=replies, flush=True)
  reply(setup)
  for line in sys.stdin:
    cmd = line.strip()
    if cmd == "run":
      t, cpu = time.perf_counter(), time.process_time()
      minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      loss = worker.step()
      reply(
        {
          "seconds": time.perf_counter() - t,
          "cpu_seconds": time.process_time() - cpu,
          "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - minflt,
          "loss": loss,
        }
      )
    elif cmd == "peak":
      reply({"peak_rss": read_status_bytes("VmHWM")})
    elif cmd == "gemm":
      reply({"gemm_peak": worker.gemm_peak()})
    elif cmd == "quit":
      break
  return 0


# --- parent -------------------------------------------------------------------------------------


def worker_environment(spec: str) -> dict:
  """The environment of a worker: with `malloc=hugetlb`, glibc's huge-page tunable added as
  the `neo-jax` command adds it (where it helps); otherwise this process's environment."""
  _, options = parse_impl(spec)
  env = dict(os.environ)
  if options["malloc"] == "hugetlb":
    from neo_jax.cli.allocator import hugepage_environment

    env = hugepage_environment(env) or env
  return env


class Worker:
  def __init__(self, spec: str, args, data: str, length: int, pass_: str, index: int):
    self.spec = spec
    self.rows_path = os.path.join(data, f"rows_{index}_{length}_{pass_}.npy")
    official = parse_impl(spec)[0] == "official"
    python = args.official_python if official and args.official_python else sys.executable
    cmd = [
      python,
      os.path.abspath(__file__),
      "--worker",
      spec,
      "--data",
      data,
      "--length",
      str(length),
      "--pass-one",
      pass_,
      "--threads",
      str(args.threads),
      "--rows-out",
      self.rows_path,
    ]
    if args.official:
      cmd += ["--official", args.official]
    self.proc = subprocess.Popen(
      cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=worker_environment(spec)
    )

  def read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"worker {self.spec} exited (rc {self.proc.wait()})")
    return json.loads(line)

  def ask(self, cmd: str) -> dict:
    self.proc.stdin.write(cmd + "\n")
    self.proc.stdin.flush()
    return self.read()

  def close(self) -> None:
    try:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.close()
    except (BrokenPipeError, ValueError):
      pass
    self.proc.wait()


def compare(base: dict, other: dict, base_rows: np.ndarray, other_rows: np.ndarray) -> dict:
  """Agreement of two setups' checks; raises if they do not compute the same thing."""
  loss_rel = abs(base["loss"] - other["loss"]) / abs(base["loss"])
  logits_err = float(np.abs(base_rows - other_rows).max())
  out = {"loss_rel": loss_rel, "logits_max_abs": logits_err}
  problems = []
  if loss_rel > LOSS_RTOL:
    problems.append(f"loss {base['loss']} vs {other['loss']}")
  if logits_err > LOGITS_ATOL:
    problems.append(f"logits rows differ by {logits_err:.2e}")
  if "grad_norms" in base:
    rel = {
      k: abs(base["grad_norms"][k] - other["grad_norms"][k]) / base["grad_norms"][k]
      for k in base["grad_norms"]
    }
    out["grad_norm_rel"] = max(rel.values())
    if out["grad_norm_rel"] > GRAD_RTOL:
      problems.append(f"gradient norms differ: {rel}")
  if problems:
    raise SystemExit("implementations disagree: " + "; ".join(problems))
  return out


def model_flops(length: int, data: str) -> dict:
  from neo_jax.convert.hf_inputs import hf_inputs_to_batch
  from neo_jax.trainer.flops import step_flops

  config = model_config()
  inputs = load_inputs(data, length)
  batch = hf_inputs_to_batch(inputs["input_ids"], inputs["pixel_values"], inputs["grid_hw"], config)
  return step_flops(config, batch)


def measure(args, data: str, length: int, pass_: str) -> dict:
  workers = [Worker(spec, args, data, length, pass_, i) for i, spec in enumerate(args.impls)]
  try:
    setups = [w.read() for w in workers]
    base_rows = np.load(workers[0].rows_path)
    agreement = [
      compare(setups[0]["check"], s["check"], base_rows, np.load(w.rows_path))
      for w, s in zip(workers[1:], setups[1:])
    ]
    seconds = [[] for _ in workers]
    cpu_seconds = [[] for _ in workers]
    faults = [[] for _ in workers]

    def timed(i: int) -> None:
      reply = workers[i].ask("run")
      seconds[i].append(reply["seconds"])
      cpu_seconds[i].append(reply["cpu_seconds"])
      faults[i].append(reply["minor_faults"])

    if args.order == "alternate":  # A, B, A, B, ...: both see the same load
      for _ in range(args.warmup):
        for w in workers:
          w.ask("run")
      for _ in range(args.repeats):
        for i in range(len(workers)):
          timed(i)
    else:  # "blocks": each worker's steps back to back, as in training
      for i, w in enumerate(workers):
        for _ in range(args.warmup):
          w.ask("run")
        for _ in range(args.repeats):
          timed(i)
    peaks = [w.ask("peak")["peak_rss"] for w in workers]
    gemm = [0.0] * len(workers)
    for _ in range(3):  # alternately too, the best of three
      for i, w in enumerate(workers):
        gemm[i] = max(gemm[i], w.ask("gemm")["gemm_peak"])
  finally:
    for w in workers:
      w.close()
  flops = model_flops(length, data)["forward" if pass_ == "fwd" else "total"]
  impls = []
  for spec, setup, secs, cpu, fault, peak, gemm_peak in zip(
    args.impls, setups, seconds, cpu_seconds, faults, peaks, gemm
  ):
    median = statistics.median(secs)
    impls.append(
      {
        "impl": spec,
        "seconds": secs,
        "median_s": median,
        "cpu_seconds": cpu,
        "median_cpu_s": statistics.median(cpu),
        "median_minor_faults": statistics.median(fault),
        "tokens_per_s": length / median,
        "tokens_per_s_range": [length / max(secs), length / min(secs)],
        "mfu": flops / median / gemm_peak,
        "gemm_peak_gflops": gemm_peak / 1e9,
        "peak_rss_gib": peak / 2**30,
        "rss_before_step_gib": setup["rss_before"] / 2**30,
        "first_step_s": setup["first_s"],
        "glibc_tunables": setup["glibc_tunables"],
        "loss": setup["check"]["loss"],
      }
    )
  for impl, secs in zip(impls[1:], seconds[1:]):
    paired = [a / b for a, b in zip(seconds[0], secs)]
    impl["speedup_vs_first"] = statistics.median(paired)
    impl["speedup_range"] = [min(paired), max(paired)]
    impl["rss_vs_first"] = impl["peak_rss_gib"] / impls[0]["peak_rss_gib"]
    impl["cpu_speedup_vs_first"] = impls[0]["median_cpu_s"] / impl["median_cpu_s"]
  return {"L": length, "pass": pass_, "model_flops": flops, "agreement": agreement, "impls": impls}


def print_table(results: list[dict]) -> None:
  names = [impl["impl"] for impl in results[0]["impls"]]
  head = "| L | pass | " + " | ".join(f"{n} tokens/s (MFU)" for n in names)
  head += " | " + " | ".join(f"{n} / {names[0]}" for n in names[1:])
  head += " | peak RSS GiB " + " / ".join(names) + " (before the step) |"
  print(head)
  print("|" + "---|" * (head.count("|") - 1))
  for r in results:
    cells = [str(r["L"]), r["pass"]]
    for impl in r["impls"]:
      lo, hi = impl["tokens_per_s_range"]
      cells.append(f"{impl['tokens_per_s']:.0f} ({lo:.0f}-{hi:.0f}) ({impl['mfu']:.0%})")
    for impl in r["impls"][1:]:
      lo, hi = impl["speedup_range"]
      cells.append(
        f"**{impl['speedup_vs_first']:.2f}x** ({lo:.2f}-{hi:.2f}), "
        f"CPU time {impl['cpu_speedup_vs_first']:.2f}x, RSS {impl['rss_vs_first']:.2f}x"
      )
    cells.append(
      " / ".join(
        f"{impl['peak_rss_gib']:.2f} ({impl['rss_before_step_gib']:.2f})" for impl in r["impls"]
      )
    )
    print("| " + " | ".join(cells) + " |")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--threads", type=int, default=2, help="CPU threads (and CPUs) per framework")
  p.add_argument("--repeats", type=int, default=5, help="timed steps per implementation")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after the checks")
  p.add_argument(
    "--order",
    default="alternate",
    choices=["alternate", "blocks"],
    help="alternate: one step of each implementation in turn (both see the same load); "
    "blocks: all steps of one, then the next (steps back to back, as in training)",
  )
  p.add_argument("--L", type=int, nargs="+", default=[1024, 2048], dest="lengths")
  p.add_argument(
    "--pass", nargs="+", default=["fwd", "fwdbwd"], dest="passes", choices=["fwd", "fwdbwd"]
  )
  p.add_argument(
    "--impls",
    nargs="+",
    default=None,
    help="implementations, the first is the baseline (default: torch jax, or "
    "official jax with --official)",
  )
  p.add_argument("--official", default="", help="checkout of EvolvingLMMs-Lab/NEO")
  p.add_argument(
    "--official-python",
    default="",
    help="interpreter for the official code (an environment with the transformers "
    "version it pins, 4.57.1); default: this one",
  )
  p.add_argument("--data", default="", help="folder for weights and inputs (default: a temp dir)")
  p.add_argument("--json", default="", help="write the results here")
  # worker side (internal)
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--pass-one", default="", dest="pass_", help=argparse.SUPPRESS)
  p.add_argument("--rows-out", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    return worker_main(args)
  if args.impls is None:
    args.impls = ["official", "jax"] if args.official else ["torch", "jax"]
  if any(parse_impl(spec)[0] == "official" for spec in args.impls) and not args.official:
    raise SystemExit("--impls official needs --official DIR")
  for spec in args.impls:
    parse_impl(spec)
  if args.official:
    args.official = os.path.abspath(args.official)
    _official_package(args.official)

  data = args.data or tempfile.mkdtemp(prefix="neo_vs_torch_")
  os.makedirs(data, exist_ok=True)
  load_before = os.getloadavg()
  started = time.time()
  results = []
  for length in args.lengths:
    make_data(data, length)
    for pass_ in args.passes:
      r = measure(args, data, length, pass_)
      results.append(r)
      print(json.dumps({k: r[k] for k in ("L", "pass", "agreement")}), flush=True)
  load_after = os.getloadavg()
  import jax
  import torch

  meta = {
    "date": datetime.date.today().isoformat(),
    "machine": platform.node(),
    "cpu": _cpu_name(),
    "cpus_visible": len(os.sched_getaffinity(0)),
    "threads": args.threads,
    "repeats": args.repeats,
    "python": platform.python_version(),
    "jax": jax.__version__,
    "torch": torch.__version__,
    "load_average_before": load_before,
    "load_average_after": load_after,
    "wall_s": time.time() - started,
    "order": args.order,
    "impls": args.impls,
  }
  print(
    f"\n{meta['date']}, {meta['cpu']}, {args.threads} threads, jax {meta['jax']}, "
    f"torch {meta['torch']}, load average {load_before[0]:.2f} before / "
    f"{load_after[0]:.2f} after, medians of {args.repeats} steps ({args.order})\n"
  )
  print_table(results)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "results": results}, f, indent=1)
  return 0


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


if __name__ == "__main__":
  sys.exit(main())
