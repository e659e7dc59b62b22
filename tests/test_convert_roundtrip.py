"""HF NEO -> neo-jax -> HF reproduces every tensor byte; shards, carried files, loading kinds.

Source checkpoints are written by the reference `safetensors` library (torch tensors, bf16
included) and read back with it, so our own safetensors code is checked against it too.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
import torch_neo_reference as ref
from safetensors.torch import load_file, save_file

from neo_jax.config import neo_2b, neo_9b, tiny
from neo_jax.convert import files, hf_checkpoint, jax_checkpoint, loading, mapping
from neo_jax.convert.safetensors_io import SafetensorsFile, TensorSpec, write_safetensors
from neo_jax.errors import UserError
from neo_jax.model import abstract_params

CARRIED = {
  "tokenizer.json": '{"model": {}}',
  "tokenizer_config.json": "{}",
  "generation_config.json": '{"eos_token_id": 151645}',
  "merges.txt": "#v\n",
  "chat_template.jinja": "{{ messages }}",
}


def small_config(**overrides):
  return tiny(vocab_size=512, **overrides)


def write_hf_dir(path, config, dtype=torch.float32, tied=True, seed=0, shard_keys=None):
  """An HF NEO directory written by the reference library; returns its state dict."""
  os.makedirs(path, exist_ok=True)
  hf = config.replace(tie_word_embeddings=tied).to_hf_dict(str(dtype).removeprefix("torch."))
  sd = ref.random_state_dict(hf, seed=seed, tied=tied, dtype=dtype)
  if shard_keys is None:
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  else:  # two shards: the given keys, then the rest
    first = {k: sd[k] for k in shard_keys}
    rest = {k: v for k, v in sd.items() if k not in first}
    save_file(first, os.path.join(path, "model-00001-of-00002.safetensors"))
    save_file(rest, os.path.join(path, "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 if k in first else 2}-of-00002.safetensors" for k in sd}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  for name, text in CARRIED.items():
    with open(os.path.join(path, name), "w") as f:
      f.write(text)
  return sd


def read_all_tensors(path):
  """Every tensor of an HF directory through the reference library."""
  index = os.path.join(path, "model.safetensors.index.json")
  if not os.path.exists(index):
    return load_file(os.path.join(path, "model.safetensors"))
  with open(index) as f:
    names = set(json.load(f)["weight_map"].values())
  out = {}
  for name in names:
    out.update(load_file(os.path.join(path, name)))
  return out


def assert_bit_identical(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    assert a[key].shape == b[key].shape, key
    assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hf_to_jax_to_hf_is_bit_identical(tmp_path, dtype, tied):
  config = small_config()
  sd = write_hf_dir(tmp_path / "src", config, dtype, tied)
  params, loaded = hf_checkpoint.read_hf_neo(str(tmp_path / "src"))
  assert loaded.tie_word_embeddings == tied
  assert loaded.param_dtype == str(dtype).removeprefix("torch.")
  assert ("lm_head" in params) == (not tied)
  jax_checkpoint.save_params(
    str(tmp_path / "jax"), params, loaded, tokenizer_dir=str(tmp_path / "src")
  )
  restored, config2 = jax_checkpoint.load_params(str(tmp_path / "jax"))
  assert config2 == loaded
  hf_checkpoint.write_hf_neo(
    str(tmp_path / "out"), restored, config2, carry_from=str(tmp_path / "jax")
  )
  assert_bit_identical(sd, read_all_tensors(tmp_path / "out"))
  for name, text in CARRIED.items():  # carried HF -> JAX -> HF
    assert (tmp_path / "jax" / name).read_text() == text
    assert (tmp_path / "out" / name).read_text() == text
  out_config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert out_config["torch_dtype"] == str(dtype).removeprefix("torch.")
  assert out_config["tie_word_embeddings"] == tied


def test_params_follow_the_documented_layouts(tmp_path):
  config = small_config(tie_word_embeddings=False)
  sd = write_hf_dir(tmp_path, config, tied=False)
  params, _ = hf_checkpoint.read_hf_neo(str(tmp_path))
  np_ = lambda key: sd[key].numpy()
  e = config.num_prebuffer_layers
  layer = lambda i, name: np_(f"language_model.model.layers.{i}.{name}")
  np.testing.assert_array_equal(
    params["pre_buffer"]["self_attn"]["q_proj"]["kernel"][1], layer(1, "self_attn.q_proj.weight").T
  )
  np.testing.assert_array_equal(
    params["llm"]["mlp"]["down_proj"]["kernel"][0], layer(e, "mlp.down_proj.weight").T
  )
  np.testing.assert_array_equal(
    params["llm"]["self_attn"]["k_norm_w"]["scale"][1], layer(e + 1, "self_attn.k_norm_w.weight")
  )
  conv1 = np_("vision_model.embeddings.patch_embedding.weight")  # [C, 3, 16, 16]
  np.testing.assert_array_equal(
    params["vision"]["patch_embedding"]["kernel"], conv1.reshape(conv1.shape[0], 768).T
  )
  conv2 = np_("vision_model.embeddings.dense_embedding.weight")  # [D, C, 2, 2]
  kernel = params["vision"]["dense_embedding"]["kernel"]  # [4C, D], rows (dy, dx, c)
  c = config.vision_hidden_size
  for dy in range(2):
    for dx in range(2):
      block = kernel[(2 * dy + dx) * c : (2 * dy + dx + 1) * c]
      np.testing.assert_array_equal(block, conv2[:, :, dy, dx].T)
  np.testing.assert_array_equal(params["lm_head"]["kernel"], np_("language_model.lm_head.weight").T)


def test_table_covers_the_model_and_counts_match_the_spec():
  for config in (
    small_config(),
    small_config(tie_word_embeddings=False),
    small_config(num_prebuffer_layers=0),
    small_config(num_prebuffer_layers=4),
  ):
    mapping.check_covers(abstract_params(config), config)
  with pytest.raises(ValueError, match=r"only in the parameters \[\('lm_head', 'kernel'\)\]"):
    mapping.check_covers(abstract_params(small_config(tie_word_embeddings=False)), small_config())
  counts = {
    (name, tied): len(mapping.locations(fn(tie_word_embeddings=tied)))
    for name, fn in (("2b", neo_2b), ("9b", neo_9b))
    for tied in (True, False)
  }
  assert counts == {("2b", True): 686, ("2b", False): 687, ("9b", True): 720, ("9b", False): 721}
  shapes = mapping.expected_hf_shapes(neo_2b())
  assert shapes["vision_model.embeddings.dense_embedding.weight"] == (2048, 1024, 2, 2)
  assert shapes["language_model.model.layers.39.self_attn.k_proj_hw.weight"] == (1024, 2048)
  assert shapes["language_model.model.layers.0.self_attn.q_norm_h.weight"] == (64,)


def test_reads_sharded_checkpoint_with_index(tmp_path):
  config = small_config()
  sd = write_hf_dir(tmp_path / "single", config, torch.bfloat16)
  keys = [k for k in sd if "layers.1." in k or k.startswith("vision")]
  write_hf_dir(tmp_path / "sharded", config, torch.bfloat16, shard_keys=keys)
  single, _ = hf_checkpoint.read_hf_neo(str(tmp_path / "single"))
  sharded, _ = hf_checkpoint.read_hf_neo(str(tmp_path / "sharded"))
  jax.tree.map(np.testing.assert_array_equal, single, sharded)


def test_writes_shards_above_max_size(tmp_path):
  config = small_config()
  sd = write_hf_dir(tmp_path / "src", config, torch.bfloat16, tied=False)
  params, loaded = hf_checkpoint.read_hf_neo(str(tmp_path / "src"))
  written = hf_checkpoint.write_hf_neo(
    str(tmp_path / "out"), params, loaded, max_shard_bytes=100_000
  )
  shards = sorted(n for n in written if n.endswith(".safetensors"))
  assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert not (tmp_path / "out" / "model.safetensors").exists()
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  assert sorted(index["weight_map"]) == sorted(sd)
  assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
  for name in shards:  # each shard under the limit unless it holds one big tensor
    size = os.path.getsize(tmp_path / "out" / name)
    assert size <= 100_000 + 10_000 or len(load_file(tmp_path / "out" / name)) == 1
  assert_bit_identical(sd, read_all_tensors(tmp_path / "out"))
  again, _ = hf_checkpoint.read_hf_neo(str(tmp_path / "out"))
  jax.tree.map(np.testing.assert_array_equal, params, again)
  # rewriting unsharded removes the stale shards and index
  hf_checkpoint.write_hf_neo(str(tmp_path / "out"), params, loaded, overwrite=True)
  assert sorted(p.name for p in (tmp_path / "out").glob("model*")) == ["model.safetensors"]


def test_dtype_override_on_read_and_write(tmp_path):
  config = small_config()
  sd = write_hf_dir(tmp_path / "src", config, torch.bfloat16)
  params, loaded = hf_checkpoint.read_hf_neo(str(tmp_path / "src"), param_dtype="float32")
  assert loaded.param_dtype == "float32"
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype("float32")}
  hf_checkpoint.write_hf_neo(str(tmp_path / "out"), params, loaded, dtype="bfloat16")
  assert_bit_identical(sd, read_all_tensors(tmp_path / "out"))  # bf16 -> f32 -> bf16 is exact


def test_safetensors_writer_is_read_by_reference_library(tmp_path):
  import ml_dtypes

  arrays = {
    "b": np.arange(5, dtype=ml_dtypes.bfloat16),
    "a": np.ones((2, 3), np.float32),
    "i": np.arange(3, dtype=np.int64),
    "e": np.zeros((0, 4), np.float16),
  }
  specs = [TensorSpec(k, v.shape, v.dtype) for k, v in arrays.items()]
  write_safetensors(tmp_path / "x.safetensors", specs, arrays.__getitem__)
  theirs = load_file(tmp_path / "x.safetensors")
  assert theirs["b"].dtype == torch.bfloat16 and theirs["b"].float().tolist() == [0, 1, 2, 3, 4]
  assert theirs["a"].shape == (2, 3) and theirs["i"].tolist() == [0, 1, 2]
  ours = SafetensorsFile(tmp_path / "x.safetensors")
  for key, value in arrays.items():
    assert ours[key].dtype == value.dtype
    np.testing.assert_array_equal(ours[key], value)


def test_load_checkpoint_detects_both_kinds(tmp_path):
  config = small_config()
  write_hf_dir(tmp_path / "hf", config, torch.bfloat16)
  params, loaded = loading.load_checkpoint(str(tmp_path / "hf"), dtype="float32")
  assert loading.detect_kind(str(tmp_path / "hf")).name == "HF NEO"
  assert isinstance(params["norm"]["scale"], jax.Array) and loaded.dtype == "float32"
  jax_checkpoint.save_params(str(tmp_path / "jax"), params, loaded)
  assert loading.detect_kind(str(tmp_path / "jax")).name == "neo-jax params"
  again, config2 = loading.load_checkpoint(str(tmp_path / "jax"), param_dtype="float32")
  assert config2.param_dtype == "float32"
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b), params, again
  )


def test_registry_takes_a_third_kind(tmp_path):
  run_dir = tmp_path / "run"
  (run_dir / "checkpoints").mkdir(parents=True)
  seen = {}
  kinds_before = loading.kinds()

  def load(path, shardings=None, **compute):
    seen.update(path=path, compute=compute)
    return {}, small_config()

  loading.register_kind(
    "training run", lambda p: os.path.isdir(os.path.join(p, "checkpoints")), load, "checkpoints/"
  )
  try:
    loading.load_checkpoint(str(run_dir), dtype="bfloat16")
    assert seen == {"path": str(run_dir), "compute": {"dtype": "bfloat16"}}
    with pytest.raises(UserError, match="training run .checkpoints/."):
      loading.load_checkpoint(str(tmp_path))
  finally:
    loading.unregister_kind("training run")
  assert loading.kinds() == kinds_before


def test_load_params_with_shardings_and_cast(tmp_path):
  config = small_config()
  write_hf_dir(tmp_path / "hf", config, torch.bfloat16)
  params, loaded = hf_checkpoint.read_hf_neo(str(tmp_path / "hf"))
  jax_checkpoint.save_params(str(tmp_path / "jax"), params, loaded)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  spec = jax.sharding.PartitionSpec
  named = lambda leaf: jax.sharding.NamedSharding(
    mesh, spec("data") if leaf.shape[0] % 8 == 0 else spec()
  )
  shardings = jax.tree.map(named, params)
  restored, config2 = jax_checkpoint.load_params(
    str(tmp_path / "jax"), shardings, param_dtype="float32"
  )
  embed = restored["embed_tokens"]["embedding"]
  assert embed.dtype == np.float32 and embed.sharding == shardings["embed_tokens"]["embedding"]
  assert len(embed.sharding.device_set) == 8
  np.testing.assert_array_equal(
    np.asarray(embed), params["embed_tokens"]["embedding"].astype(np.float32)
  )
  assert config2.param_dtype == "float32"


def test_parse_size_and_shard_plan():
  assert files.parse_size("5GB") == 5 * 10**9
  assert files.parse_size("2GiB") == 2 * 2**30
  assert files.parse_size("1.5MB") == 1_500_000
  assert files.parse_size("1000") == 1000
  with pytest.raises(UserError, match="--max-shard-size"):
    files.parse_size("lots")
  specs = [TensorSpec(str(i), (n,), np.uint8) for i, n in enumerate([3, 3, 9, 2, 2])]
  plan = [[s.name for s in shard] for shard in files.plan_shards(specs, 6)]
  assert plan == [["0", "1"], ["2"], ["3", "4"]]
