"""Where the time of neo-jax's loss (and gradient) goes, by part of the model, on XLA:CPU.

    .venv/bin/python benchmarks/profile_step.py --L 1024 --pass fwdbwd
    .venv/bin/python benchmarks/profile_step.py --L 2048 --impl "jax:fused=0" --top 20

Same work as benchmarks/train_step_vs_torch.py (its model, row and `jax:key=value` options).
The jitted step runs under jax.profiler with XLA:CPU's per-thunk trace annotations; every
executed HLO instruction is attributed to a part by the name stack XLA keeps in its metadata
(Flax module paths: `.../self_attn/q_proj/...`, `.../mlp/...`, the `attention_op` scope),
and the times are summed per part. Independent thunks run concurrently on the CPU pool; while
k run at once each is charged 1/k of the wall time, so the parts add up to the time the step
kept the pool busy (the rest of the wall time is dispatch and waiting). The AdamW update of all
parameters (not part of the step compared with PyTorch) is timed on its own. With
`--hlo DIR` the optimised HLO of the step is written there.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import train_step_vs_torch as vs  # noqa: E402

# (part, pattern on the op_name metadata); the first match wins
PARTS = (
  ("embedding", r"/embed_tokens/"),
  ("vision", r"/vision/"),
  ("attention (scores, softmax, values)", r"/attention_op"),
  ("attention projections", r"/self_attn/(q_proj|k_proj|v_proj|o_proj|q_proj_hw|k_proj_hw)/"),
  ("norms and RoPE", r"(_norm|_norm_h|_norm_w|layernorm)/|/self_attn/|NeoModel\)?/norm/"),
  ("MLP", r"/mlp/"),
  ("layer glue (residuals, scan)", r"NeoModel"),
  ("head + loss", r""),
)
CONTROL = ("while", "call", "conditional")


def instruction_names(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (opcode, op_name metadata) over every computation.

  XLA drops the metadata of some rewritten instructions (e.g. canonicalised dots inside a
  fusion); those take the name of an instruction in the computation they call, else of an
  operand.
  """
  line_re = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+(?: \S+)*? (\w[\w\-]*)\((.*)")
  computation_re = re.compile(r"^%?([\w.\-]+) .*\{$")
  info: dict[str, tuple[str, str, list[str], str]] = {}
  by_computation: dict[str, list[str]] = collections.defaultdict(list)
  computation = ""
  for line in hlo_text.splitlines():
    head = computation_re.match(line)
    if head and not line.startswith(" "):
      computation = head.group(1)
      continue
    m = line_re.match(line)
    if not m:
      continue
    meta = re.search(r'op_name="([^"]*)"', line)
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    operands = re.findall(r"%([\w.\-]+)", m.group(3).split("), ")[0])
    info[m.group(1)] = (
      m.group(2),
      meta.group(1) if meta else "",
      operands,
      calls.group(1) if calls else "",
    )
    by_computation[computation].append(m.group(1))

  def named(name: str, depth: int = 0) -> str:
    opcode, op_name, operands, calls = info[name]
    if op_name or depth > 3:
      return op_name
    for inner in by_computation.get(calls, ()):
      if info[inner][1]:
        return info[inner][1]
    for operand in operands:
      if operand in info and (found := named(operand, depth + 1)):
        return found
    return ""

  return {name: (opcode, named(name)) for name, (opcode, *_rest) in info.items()}


def part_of(op_name: str) -> str:
  for part, pattern in PARTS:
    if re.search(pattern, op_name):
      return part
  return PARTS[-1][0]


def trace_step(worker, steps: int, directory: str) -> tuple[list[float], list]:
  """Wall seconds of `steps` traced steps and their XLA:CPU events (start, end, name)."""
  import jax

  walls = []
  jax.profiler.start_trace(directory)
  for _ in range(steps):
    t = time.perf_counter()
    worker.step()
    walls.append(time.perf_counter() - t)
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))[-1]
  events = []
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      if line.name.startswith("tf_XLA"):  # the XLA:CPU worker threads
        events += [(e.start_ns, e.end_ns, e.name) for e in line.events]
  return walls, events


def wall_shares(events: list) -> dict[str, float]:
  """Nanoseconds of wall time per event name: while k events run at once, each gets 1/k of
  the time, so the shares add up to the time anything ran."""
  bounds = sorted({t for start, end, _ in events for t in (start, end)})
  index = {t: i for i, t in enumerate(bounds)}
  delta = [0] * (len(bounds) + 1)  # active-count changes, then the per-interval weights
  for start, end, _ in events:
    delta[index[start]] += 1
    delta[index[end]] -= 1
  active, weight = 0, []
  for i in range(len(bounds) - 1):
    active += delta[i]
    weight.append((bounds[i + 1] - bounds[i]) / active if active else 0.0)
  prefix = [0.0]
  for w in weight:
    prefix.append(prefix[-1] + w)
  out: dict[str, float] = collections.Counter()
  for start, end, name in events:
    out[name] += prefix[index[end]] - prefix[index[start]]
  return out


def optimizer_seconds(params, repeats: int = 3) -> float:
  """Median time of one AdamW update (neo_jax.trainer.optimizer.adamw) of all parameters."""
  import jax
  import optax

  from neo_jax.trainer.optimizer import adamw

  tx = adamw()
  state = tx.init(params)
  grads = jax.tree.map(lambda p: p * 1e-3, params)

  @jax.jit
  def update(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, jax.tree.map(lambda u: 1e-4 * u, updates)), state

  jax.block_until_ready(update(params, state, grads))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(update(params, state, grads))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--L", type=int, default=1024, dest="length")
  p.add_argument("--pass", default="fwdbwd", dest="pass_", choices=["fwd", "fwdbwd"])
  p.add_argument("--impl", default="jax", help="jax[:key=value;...] as in train_step_vs_torch")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--steps", type=int, default=3, help="traced steps (after one warm-up)")
  p.add_argument("--top", type=int, default=12, help="list this many of the slowest ops")
  p.add_argument("--data", default="", help="weights/inputs folder (default: a temp dir)")
  p.add_argument("--hlo", default="", help="write the optimised HLO of the step here")
  args = p.parse_args(argv)

  kind, options = vs.parse_impl(args.impl)
  if kind != "jax":
    raise SystemExit("--impl: only jax implementations can be profiled here")
  if options["malloc"] == "hugetlb":  # as the benchmark's jax workers and the neo-jax command
    from neo_jax.cli.allocator import reexec_with_hugepages

    reexec_with_hugepages()
  data = args.data or tempfile.mkdtemp(prefix="neo_profile_")
  os.makedirs(data, exist_ok=True)
  vs.make_data(data, args.length)
  vs.pin_threads(args.threads)
  vs.set_xla_cpu_threads(args.threads, "--xla_cpu_enable_xprof_traceme=true", options["xla_flags"])

  worker = vs.JaxWorker(options, data, args.length, args.pass_)
  with worker.context():
    compiled = worker.run.lower(worker.params, worker.batch).compile()
  hlo = compiled.as_text()
  if args.hlo:
    os.makedirs(args.hlo, exist_ok=True)
    with open(os.path.join(args.hlo, f"step_{args.length}_{args.pass_}.hlo"), "w") as f:
      f.write(hlo)
  names = instruction_names(hlo)
  worker.step()
  walls, events = trace_step(worker, args.steps, tempfile.mkdtemp(prefix="neo_trace_"))
  # runtime spans and loops are left out (their bodies' instructions are counted)
  leaves = [e for e in events if e[2] in names and names[e[2]][0] not in CONTROL]
  totals = wall_shares(leaves)

  parts: dict[str, float] = collections.Counter()
  ops = []
  for name, ns in totals.items():
    seconds = ns / 1e9 / args.steps
    parts[part_of(names[name][1])] += seconds
    ops.append((seconds, name, names[name][1]))
  summed = sum(parts.values())
  wall = statistics.median(walls)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  temp = compiled.memory_analysis().temp_size_in_bytes
  print(
    f"L={args.length} {args.pass_} {args.impl}: wall {wall:.3f} s per step (median of "
    f"{args.steps}), busy {summed:.3f} s, XLA cost analysis {cost.get('flops', 0) / 1e9:.0f} "
    f"GFLOP (loop bodies once), temp buffers {temp / 2**30:.2f} GiB, load average "
    f"{os.getloadavg()[0]:.2f}\n"
  )
  print("| part | s per step | share |")
  print("|---|---|---|")
  for part, _ in PARTS:
    if parts.get(part):
      print(f"| {part} | {parts[part]:.3f} | {parts[part] / summed:.1%} |")
  print(f"\nslowest {args.top} instructions (s per step, name, op_name):")
  for seconds, name, op_name in sorted(ops, reverse=True)[: args.top]:
    print(f"  {seconds:7.3f}  {name:32s} {op_name[-110:]}")
  print(f"\nAdamW update of all parameters (separately): {optimizer_seconds(worker.params):.3f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
