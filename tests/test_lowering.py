"""The whole training step lowers for TPU and GPU from this CPU host.

`jax.export` of the jitted, sharded step the trainer runs (next-token and preference, and the
preference reference pass), built from the neo_2b recipes with two layers (one pre-Buffer, one
LLM) at their real widths: hidden 2048, 16 / 8 heads of width 128 + 64 + 64, intermediate
6144, vocabulary 151,936, bf16 compute on fp32 master weights, full remat, `attention_impl`
"auto". Parameters, optimizer state and batch are ShapeDtypeStructs carrying their shardings
over the 8-device mesh (fsdp 4 x tensor 2), so nothing is allocated. `model.platform` names
the target: `auto` becomes its kernel, compiled (Mosaic for TPU, Triton for CUDA), not the
interpreter nor the XLA path this host would take. Each module is checked to hold exactly the
kernel calls of both layers, on per-device shards, and the shardings the step was given.
"""

import collections
import os
import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from neo_jax import objectives
from neo_jax.model import abstract_params
from neo_jax.objectives.preference import objective as preference
from neo_jax.parallel.mesh import make_mesh
from neo_jax.parallel.sharding import batch_shardings, batch_spec, mesh_context
from neo_jax.trainer import batches
from neo_jax.trainer import config as config_lib
from neo_jax.trainer import optimizer as opt_lib
from neo_jax.trainer.state import abstract_state, state_shardings
from neo_jax.trainer.step import compile_step, make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"next_token": "sft.py:neo_2b", "preference": "preference.py:neo_2b"}
ROWS, LENGTH, FSDP, TENSOR = 4, 1024, 4, 2  # rows per micro-batch: one per fsdp shard
OVERRIDES = (
  "--config.model.num_hidden_layers=2",
  "--config.model.num_prebuffer_layers=1",
  "--config.model.attention_impl=auto",
  "--config.model.remat_policy=full",
  "--config.data.pipeline=synthetic",
  f"--config.data.seq_len={LENGTH}",
  "--config.data.visual_budget=256",
  "--config.mesh.data=1",
  f"--config.mesh.fsdp={FSDP}",
  f"--config.mesh.tensor={TENSOR}",
)

# The kernels' custom calls (Triton's target was renamed after jaxlib 0.10.2). jax.export refuses
# a custom call without a stability guarantee unless told; Triton's has none.
TARGETS = {"tpu": ("tpu_custom_call",), "cuda": ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")}
NAME_ATTR = {"tpu": "kernel_name", "cuda": "name"}
SUFFIX = {"tpu": "", "cuda": "_gpu"}
# q as one device's kernel sees it: 1 row, 8 of 16 heads, width 256 (TPU: [B, L, H * D])
Q_SHARD = {"tpu": f"1x{LENGTH}x{8 * 256}xbf16", "cuda": f"1x{LENGTH}x8x256xbf16"}
# per layer: the forward, again in the remat recomputation, dq and dk/dv once each
STEP_CALLS = {"fwd": 4, "dq": 2, "dkv": 2}
REFERENCE_CALLS = {"fwd": 2}  # forward only, no gradient


def setup(objective_name: str, platform: str):
  """The step the trainer would compile for this config, over abstract state and batch; the
  recipe's micro-batches (preference: 4) of ROWS rows each."""
  config = config_lib.load_config(
    os.path.join(REPO, "configs", RECIPES[objective_name]),
    OVERRIDES
    + (f"--config.model.platform={platform}",)
    + (("--config.loss.positions_per_row=256",) if objective_name == "preference" else ()),
  )
  config.data.batch_size = ROWS * config.grad_accum_steps
  config_lib.validate(config)
  objective = objectives.from_config(config)
  model_config = config_lib.model_config(config)
  assert (
    model_config.hidden_size,
    model_config.intermediate_size,
    model_config.vocab_size,
    model_config.num_attention_heads,
    model_config.num_key_value_heads,
    model_config.qk_head_dim,
    model_config.dtype,
    model_config.param_dtype,
  ) == (2048, 6144, 151936, 16, 8, 256, "bfloat16", "float32")
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  rules = config_lib.sharding_rules(config)
  trainable = opt_lib.trainable_paths(
    abstract_params(model_config), opt_lib.stage_patterns(config.stage)
  )
  tx, schedule = opt_lib.from_config(config.optimizer, config.total_steps)
  objective_state = objective.init_state(model_config, config) if objective.stateful else None
  replicated = NamedSharding(mesh, P())
  shardings = state_shardings(model_config, tx, trainable, mesh, rules).replace(
    objective_state=jax.tree.map(lambda _: replicated, objective_state)
  )
  state = abstract_state(model_config, tx, trainable, shardings).replace(
    objective_state=jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=replicated),
      objective_state,
    )
  )
  host = next(batches.synthetic_iterator(config, model_config))
  if objective_name == "preference":  # what the reference pass adds to each batch
    pairs = preference.num_pairs(host["gather_index"].shape[1])
    rows = host["input_ids"].shape[0]
    host.update({k: np.zeros((rows, pairs), np.float32) for k in preference.REF_KEYS})
  in_batch = batch_shardings(host, mesh)
  batch = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=in_batch[k]) for k, x in host.items()}
  step_fn = make_train_step(
    objective.make_loss(model_config, config),
    tx,
    schedule,
    trainable,
    grad_accum_steps=config.grad_accum_steps,
    nan_policy=config.nan_policy,
    stateful=objective.stateful,
  )
  step = compile_step(step_fn, mesh, shardings, in_batch, rules)
  return config, model_config, mesh, rules, step, state, batch


def export(fn, platform: str, mesh, rules, *args) -> jax.export.Exported:
  checks = [
    jax.export.DisabledSafetyCheck.custom_call(t)
    for t in TARGETS[platform]
    if t != "tpu_custom_call"
  ]
  with mesh_context(mesh, rules):
    return jax.export.export(fn, platforms=[platform], disabled_checks=checks)(*args)


def kernel_calls(text: str, platform: str) -> tuple[collections.Counter, set[str], list[str]]:
  """(kernel name -> calls, every custom-call target of the module, kernel operand types)."""
  counts, targets, operands = collections.Counter(), set(), []
  for line in text.splitlines():
    found = re.search(r"stablehlo\.custom_call @([^(\s]+)\(", line)
    if not found:
      continue
    targets.add(found.group(1))
    name = re.search(NAME_ATTR[platform] + r' = "(neo_flash_\w+)"', line)
    if found.group(1) in TARGETS[platform] and name:
      counts[name.group(1)] += 1
      operands += re.findall(r"tensor<([^>]*)>", line.rsplit(" : (", 1)[1].split(") ->")[0])
  return counts, targets, operands


def check_kernels(exported: jax.export.Exported, platform: str, expected: dict) -> None:
  assert exported.platforms == (platform,)
  text = exported.mlir_module()
  counts, targets, operands = kernel_calls(text, platform)
  assert targets <= set(TARGETS[platform]), targets  # no other custom call, no interpreter
  assert counts == {f"neo_flash_{k}{SUFFIX[platform]}": n for k, n in expected.items()}
  # the kernels run inside the shard_map on one device's row and heads, never on the whole q
  assert Q_SHARD[platform] in operands, sorted(set(operands))
  rows = [o.split("x")[0] for o in operands if f"x{LENGTH}x" in o]
  assert rows and set(rows) == {"1"}, sorted(set(operands))
  assert f'"fsdp"={FSDP}, "tensor"={TENSOR}' in text  # the mesh the module is partitioned on


def check_shardings(exported: jax.export.Exported, mesh, args, outs=None) -> None:
  """Each argument (and each of `outs`, the leading outputs) has the sharding it was given,
  in the export's record and in the module's signature."""
  leaves = jax.tree.leaves(args)
  got = exported.in_shardings_jax(mesh)
  assert len(got) == len(leaves)
  kept = exported.module_kept_var_idx  # arguments the step reads (not e.g. `targets` here)
  assert all(got[i].is_equivalent_to(leaves[i].sharding, leaves[i].ndim) for i in kept)
  if outs is not None:
    outs = jax.tree.leaves(outs)
    got = exported.out_shardings_jax(mesh)[: len(outs)]
    assert all(s.is_equivalent_to(x.sharding, x.ndim) for s, x in zip(got, outs))
  # the module's arguments split over both axes: as many as the given shardings say
  main = next(line for line in exported.mlir_module().splitlines() if "func public @main" in line)
  arguments = main.split(") -> (")[0].split("%arg")[1:]
  split = [a for a in arguments if '{"fsdp"}' in a and '{"tensor"}' in a]
  both = lambda spec: {"fsdp", "tensor"} <= set(jax.tree.leaves(tuple(spec)))
  assert len(split) == sum(both(leaves[i].sharding.spec) for i in kept) > 0


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("objective_name", ["next_token", "preference"])
def test_train_step_lowers_for_the_device(objective_name, platform):
  _, model_config, mesh, rules, step, state, batch = setup(objective_name, platform)
  assert model_config.platform == platform and model_config.attention_impl == "auto"
  exported = export(step.jitted, platform, mesh, rules, state, batch)
  check_kernels(exported, platform, STEP_CALLS)
  assert exported.nr_devices == FSDP * TENSOR
  # parameters, optimizer moments and batch enter split as given; the new state leaves so
  check_shardings(exported, mesh, (state, batch), outs=state)
  assert state.params["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_preference_reference_pass_lowers_for_the_device(platform):
  config, model_config, mesh, rules, _, state, batch = setup("preference", platform)
  fn = preference.make_reference_fn(
    model_config,
    chunk=config.loss.chunk_size,
    micro_batches=config.grad_accum_steps,
    vocab_chunk=config.loss.vocab_chunk,
  )
  out = NamedSharding(mesh, batch_spec(2))  # as the objective's batch function jits it
  jitted = jax.jit(fn, out_shardings={k: out for k in preference.REF_KEYS})
  exported = export(jitted, platform, mesh, rules, state.params, batch)
  check_kernels(exported, platform, REFERENCE_CALLS)
  check_shardings(exported, mesh, (state.params, batch))
