"""The Flax NEO against an independent PyTorch reference written from docs/reference/neo.md.

Weights are random and non-zero everywhere (H/W sub-heads and their norms included), inputs
contain several images of different grids, and the weights reach the Flax side through the
converter, so the table, the layouts and the model are checked together.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_neo_reference as ref
from safetensors.torch import save_file

from neo_jax import cli
from neo_jax.config import tiny
from neo_jax.convert import hf_checkpoint, jax_checkpoint, mapping
from neo_jax.convert.hf_inputs import hf_inputs_to_batch
from neo_jax.model.neo import DecoderLayer, LayerContext, rope_tables
from neo_jax.model.vision import PatchEmbedding
from neo_jax.ops.masks import AttnIds
from neo_jax.positions import image_ids

GRIDS = [(4, 6), (2, 2), (6, 4)]  # 16-px grids: 6, 1 and 6 visual tokens


def convert(sd, config):
  """Torch state dict -> our params through the conversion table."""
  arrays = {k: v.numpy() for k, v in sd.items()}
  return mapping.params_from_hf(
    arrays.__getitem__,
    {k: a.shape for k, a in arrays.items()},
    {k: a.dtype for k, a in arrays.items()},
    config,
  )


def inputs(config, grids=GRIDS, seed=0):
  hf = config.to_hf_dict("float32")
  pixel_values, grid_hw = ref.random_images(grids, seed)
  ids = ref.sequence_with_images(grids, hf, seed)
  return ids, pixel_values, grid_hw


def test_positions_agree_with_reference():
  config = tiny()
  ids, pixel_values, grid_hw = inputs(config)
  batch = hf_inputs_to_batch(ids.numpy(), pixel_values.numpy(), grid_hw.numpy(), config)
  expected = ref.thw_indexes(ids, grid_hw, ref.Dims(config.to_hf_dict()))
  np.testing.assert_array_equal(batch["positions"][0], expected.numpy())


def test_decoder_layer_matches_torch():
  config = tiny(vocab_size=256, num_hidden_layers=1, num_prebuffer_layers=0)
  hf = config.to_hf_dict("float32")
  sd = ref.random_state_dict(hf, seed=1)
  params = convert(sd, config)
  layer = jax.tree.map(lambda leaf: leaf[0], params["llm"])
  ids, pixel_values, grid_hw = inputs(config)
  batch = hf_inputs_to_batch(ids.numpy(), pixel_values.numpy(), grid_hw.numpy(), config)
  x = torch.randn(ids.shape[0], config.hidden_size, generator=torch.Generator().manual_seed(3))

  expected = ref.decoder_layer(sd, 0, ref.Dims(hf), x, ref.thw_indexes(ids, grid_hw, ref.Dims(hf)))
  positions = jnp.asarray(batch["positions"])
  ids_j = jnp.asarray(batch["input_ids"])
  attn_ids = AttnIds(
    jnp.asarray(batch["segment_ids"]),
    image_ids(ids_j, positions[:, 0], config.img_context_token_id),
  )
  ctx = LayerContext(rope_tables(positions, config), attn_ids, None, None)
  got, _ = DecoderLayer(config).apply({"params": layer}, jnp.asarray(x.numpy())[None], ctx, None)
  err = np.abs(np.asarray(got[0]) - expected.numpy()).max()
  assert err <= 1e-5, err
  assert expected.abs().max() > 1.0  # O(1) activations: 1e-5 is a tight bound


def test_hw_subheads_matter_in_the_layer():
  """Zeroing the H/W projections changes the output: the parity above exercises them."""
  config = tiny(vocab_size=256, num_hidden_layers=1, num_prebuffer_layers=0)
  hf = config.to_hf_dict("float32")
  sd = ref.random_state_dict(hf, seed=1)
  ids, _, grid_hw = inputs(config)
  x = torch.randn(ids.shape[0], config.hidden_size, generator=torch.Generator().manual_seed(3))
  thw = ref.thw_indexes(ids, grid_hw, ref.Dims(hf))
  full = ref.decoder_layer(sd, 0, ref.Dims(hf), x, thw)
  no_hw = dict(sd)
  no_hw["language_model.model.layers.0.self_attn.k_proj_hw.weight"] = torch.zeros_like(
    sd["language_model.model.layers.0.self_attn.k_proj_hw.weight"]
  )
  assert (full - ref.decoder_layer(no_hw, 0, ref.Dims(hf), x, thw)).abs().max() > 1e-2


def test_patch_embedding_matches_torch():
  config = tiny(vocab_size=256)
  hf = config.to_hf_dict("float32")
  sd = ref.random_state_dict(hf, seed=2)
  params = convert(sd, config)
  ids, pixel_values, grid_hw = inputs(config, seed=4)
  batch = hf_inputs_to_batch(ids.numpy(), pixel_values.numpy(), grid_hw.numpy(), config)
  expected = ref.vision(sd, ref.Dims(hf), pixel_values, grid_hw)
  got = PatchEmbedding(config).apply(
    {"params": params["vision"]}, jnp.asarray(batch["pixels"]), jnp.asarray(batch["pixel_rc"])
  )
  assert got.shape == (1, expected.shape[0], config.hidden_size)
  err = np.abs(np.asarray(got[0]) - expected.numpy()).max()
  assert err <= 1e-5, err


@pytest.fixture(scope="module")
def golden_model(tmp_path_factory):
  """An HF NEO directory of a tiny random model and a golden file from the torch reference."""
  root = tmp_path_factory.mktemp("golden")
  config = tiny()  # vocab holds the image token ids
  hf = config.to_hf_dict("float32")
  sd = ref.random_state_dict(hf, seed=5, tied=False)
  hf_dir = root / "hf"
  hf_dir.mkdir()
  save_file(sd, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
  (hf_dir / "config.json").write_text(json.dumps(hf))
  ids, pixel_values, grid_hw = inputs(config, grids=[(4, 6), (2, 4)], seed=6)
  # float64 reference logits: the golden is then exact to float32 rounding, and the fp32
  # model's own rounding (about 8e-6 here, the same as the fp32 torch reference's) is all
  # that separates them
  sd64 = {k: v.double() for k, v in sd.items()}
  logits = ref.neo_logits(sd64, hf, ids, pixel_values.double(), grid_hw).float()
  golden = root / "golden.npz"
  np.savez(
    golden,
    input_ids=ids.numpy(),
    pixel_values=pixel_values.numpy(),
    grid_hw=grid_hw.numpy(),
    logits=logits.numpy(),
  )
  return hf_dir, golden, root


def test_compare_logits_passes_on_torch_golden(golden_model, capsys):
  hf_dir, golden, _ = golden_model
  code = cli.main(
    ["compare-logits", "--checkpoint", str(hf_dir), "--golden", str(golden), "--atol", "1e-5"]
  )
  out = capsys.readouterr().out
  assert code == 0, out
  assert "OK" in out and "mean KL" in out


def test_compare_logits_on_neo_jax_params_dir(golden_model, capsys):
  hf_dir, golden, root = golden_model
  params, config = hf_checkpoint.read_hf_neo(str(hf_dir))
  jax_checkpoint.save_params(str(root / "jax"), params, config)
  code = cli.main(["compare-logits", "--checkpoint", str(root / "jax"), "--golden", str(golden)])
  assert code == 0, capsys.readouterr().out


def test_compare_logits_fails_on_perturbed_golden(golden_model, capsys):
  hf_dir, golden, root = golden_model
  with np.load(golden) as data:
    perturbed = {k: data[k] for k in data.files}
  perturbed["logits"][7, 123] += 1e-3
  path = root / "perturbed.npz"
  np.savez(path, **perturbed)
  code = cli.main(["compare-logits", "--checkpoint", str(hf_dir), "--golden", str(path)])
  out = capsys.readouterr().out
  assert code == 1, out
  assert "FAIL" in out and "worst position 7" in out
