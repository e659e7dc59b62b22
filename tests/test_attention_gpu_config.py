"""The GPU kernel's launch settings: shared-memory arithmetic, defaults per device that fit,
explicit settings kept, and the per-device defaults lowering for CUDA at NEO's widths."""

import re

import jax
import jax.numpy as jnp
import pytest
from test_attention_kernels import neo_width_inputs

from neo_jax.ops import pallas_gpu

H100, A100, SM89 = 232448, 166912, 101376  # shared memory per block (opt-in), bytes


def test_smem_formula_reproduces_the_measured_figure():
  # Triton on an H200: 128 x 128 forward blocks, 2 stages, widths 256 / 128, bf16 requested
  # 262144 bytes (device-check 2026-11-30)
  sizes = pallas_gpu.BlockSizes(128, 128, 64, 64, 8, 2, 8, 2)
  assert pallas_gpu.smem_bytes(sizes, 256, 128)["fwd"] == 262144


@pytest.mark.parametrize("smem", [H100, A100, SM89])
@pytest.mark.parametrize("widths", [(256, 128), (128, 128), (64, 32)])
def test_defaults_fit_the_device(smem, widths):
  sizes = pallas_gpu.block_sizes_for(*widths, jnp.bfloat16, smem=smem)
  assert None not in vars(sizes).values()
  use = pallas_gpu.smem_bytes(sizes, *widths)
  assert max(use.values()) <= smem - pallas_gpu.SMEM_MARGIN, (sizes, use)


def test_neo_defaults_per_device():
  # H100/H200 and A100 keep the measured best (it fits both); 99 KB parts get smaller blocks
  best = pallas_gpu.PREFERRED[256]
  assert pallas_gpu.block_sizes_for(256, 128, smem=H100) == best
  assert pallas_gpu.block_sizes_for(256, 128, smem=A100) == best
  small = pallas_gpu.block_sizes_for(256, 128, smem=SM89)
  assert (small.block_q, small.block_kv, small.block_q_bwd, small.block_kv_bwd) == (64, 32, 32, 32)
  assert (small.num_warps, small.num_stages) == (best.num_warps, best.num_stages)


def test_explicit_fields_are_kept():
  given = pallas_gpu.BlockSizes(block_kv=64, num_stages_bwd=3)
  sizes = pallas_gpu.block_sizes_for(256, 128, smem=H100, sizes=given)
  assert sizes.block_kv == 64 and sizes.num_stages_bwd == 3
  assert sizes.block_q == pallas_gpu.PREFERRED[256].block_q


def test_device_smem_without_a_gpu_is_the_safe_fallback():
  assert pallas_gpu.device_smem_bytes() == pallas_gpu.SMEM_FALLBACK


def lowered_fwd_bwd(sizes, length, seed) -> str:
  """StableHLO for CUDA of the kernel's forward and backward with `sizes`, NEO's widths."""
  ids, q, k, v = neo_width_inputs(length, seed)
  fwd = lambda q, k, v: pallas_gpu.flash_attention(
    q, k, v, ids, scale=128**-0.5, block_sizes=sizes, interpret=False
  )
  bwd = jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  return jax.jit(bwd).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("smem", [H100, A100, SM89])
def test_device_defaults_lower_for_cuda(smem):
  # the Triton lowering of forward, dq and dk/dv with each device's default settings
  text = lowered_fwd_bwd(pallas_gpu.block_sizes_for(256, 128, smem=smem), 700, 5)
  assert text.count("xla.gpu.triton") == 3


def test_forward_and_backward_launch_apart():
  # num_warps / num_stages reach the forward's Triton call and both backward calls separately
  sizes = pallas_gpu.BlockSizes(
    64, 32, 32, 64, num_warps=4, num_stages=3, num_warps_bwd=8, num_stages_bwd=2
  )
  calls = [line for line in lowered_fwd_bwd(sizes, 300, 6).splitlines() if "xla.gpu.triton" in line]
  launch = [
    (re.search(r"num_warps = (\d+)", c).group(1), re.search(r"num_stages = (\d+)", c).group(1))
    for c in calls
  ]
  assert launch == [("4", "3"), ("8", "2"), ("8", "2")]
