"""A bad checkpoint gives one line that names the file or key and the shapes involved."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch_neo_reference as ref
from safetensors.torch import save_file

from neo_jax import cli
from neo_jax.config import tiny
from neo_jax.convert import hf_checkpoint, jax_checkpoint, loading
from neo_jax.convert.compare import read_golden
from neo_jax.convert.hf_inputs import hf_inputs_to_batch
from neo_jax.errors import UserError

# k_proj is [128, 128] with 4 KV heads of 32 (the example of the error message below)
CONFIG = tiny(vocab_size=512, num_key_value_heads=4)


def make_hf(path, edit=None, config=CONFIG):
  """HF NEO directory from the reference library; `edit(sd)` corrupts the state dict first."""
  os.makedirs(path, exist_ok=True)
  hf = config.to_hf_dict("float32")
  sd = ref.random_state_dict(hf, seed=0)
  if edit is not None:
    edit(sd)
  save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  return str(path)


BAD_DTYPE = b'{"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}'


def error_of(fn, *args, **kwargs) -> str:
  with pytest.raises(UserError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
  key = "language_model.model.layers.3.self_attn.k_proj.weight"
  path = make_hf(tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(64, 128)))
  assert error_of(hf_checkpoint.read_hf_neo, path) == (
    f"{key}: checkpoint has [64, 128], model expects [128, 128]"
  )


def test_missing_key(tmp_path):
  key = "language_model.model.layers.2.mlp.up_proj.weight"
  path = make_hf(tmp_path, lambda sd: sd.pop(key))
  assert error_of(hf_checkpoint.read_hf_neo, path) == (
    f"checkpoint is missing {key}; model expects [384, 128]"
  )


def test_unexpected_key(tmp_path):
  key = "language_model.model.layers.4.mlp.up_proj.weight"  # a fifth layer in a 4-layer model
  path = make_hf(tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(384, 128)))
  assert error_of(hf_checkpoint.read_hf_neo, path) == (
    f"checkpoint has unexpected tensor {key} [384, 128] (not part of a NEO model with 4 layers)"
  )


def test_truncated_file(tmp_path):
  path = make_hf(tmp_path)
  file = os.path.join(path, "model.safetensors")
  with open(file, "r+b") as f:
    f.truncate(os.path.getsize(file) - 100)
  message = error_of(hf_checkpoint.read_hf_neo, path)
  assert message.startswith(f"{file}: not a valid safetensors file: tensor ")
  assert "file truncated?" in message


@pytest.mark.parametrize(
  "content,why",
  [
    (b"", "too short for a header"),
    (b"\xff" * 64, "does not fit"),
    ((20).to_bytes(8, "little") + b"{not json at all}!!!", "header is not JSON"),
    ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
    (len(BAD_DTYPE).to_bytes(8, "little") + BAD_DTYPE + b"\0" * 4, "bad header entry"),
  ],
  ids=["empty", "huge-header", "bad-json", "not-object", "bad-dtype"],
)
def test_corrupt_file(tmp_path, content, why):
  path = make_hf(tmp_path)
  file = os.path.join(path, "model.safetensors")
  with open(file, "wb") as f:
    f.write(content)
  message = error_of(hf_checkpoint.read_hf_neo, path)
  assert message.startswith(f"{file}: not a valid safetensors file") and why in message


def sharded(tmp_path):
  path = make_hf(tmp_path / "src")
  sd = {k: v for k, v in ref.random_state_dict(CONFIG.to_hf_dict(), seed=0).items()}
  out = tmp_path / "sharded"
  out.mkdir()
  keys = sorted(sd)
  half = len(keys) // 2
  save_file({k: sd[k] for k in keys[:half]}, str(out / "a.safetensors"))
  save_file({k: sd[k] for k in keys[half:]}, str(out / "b.safetensors"))
  shutil.copy(os.path.join(path, "config.json"), out / "config.json")
  weight_map = {k: "a.safetensors" if i < half else "b.safetensors" for i, k in enumerate(keys)}
  return out, weight_map


def write_index(out, payload):
  (out / "model.safetensors.index.json").write_text(
    payload if isinstance(payload, str) else json.dumps(payload)
  )


def test_sharded_checkpoint_loads(tmp_path):
  out, weight_map = sharded(tmp_path)
  write_index(out, {"weight_map": weight_map})
  params, _ = hf_checkpoint.read_hf_neo(str(out))
  assert params["norm"]["scale"].shape == (128,)


def test_missing_shard(tmp_path):
  out, weight_map = sharded(tmp_path)
  write_index(out, {"weight_map": weight_map})
  os.remove(out / "b.safetensors")
  count = sum(v == "b.safetensors" for v in weight_map.values())
  assert error_of(hf_checkpoint.read_hf_neo, str(out)) == (
    f"{out}/model.safetensors.index.json: missing shard b.safetensors (listed for {count} tensors)"
  )


@pytest.mark.parametrize(
  "payload,why",
  [
    ('{"weight_map": {', "not valid JSON"),
    ({"metadata": {}}, "bad index"),
    ({"weight_map": ["a.safetensors"]}, "bad index"),
  ],
  ids=["truncated-json", "no-weight-map", "weight-map-not-object"],
)
def test_bad_index_json(tmp_path, payload, why):
  out, _ = sharded(tmp_path)
  write_index(out, payload)
  message = error_of(hf_checkpoint.read_hf_neo, str(out))
  assert message.startswith(f"{out}/model.safetensors.index.json: {why}")


def test_index_points_to_wrong_shard(tmp_path):
  out, weight_map = sharded(tmp_path)
  key = next(k for k, v in weight_map.items() if v == "a.safetensors")
  weight_map[key] = "b.safetensors"
  write_index(out, {"weight_map": weight_map})
  assert error_of(hf_checkpoint.read_hf_neo, str(out)) == (
    f"{out}/model.safetensors.index.json: lists {key} in b.safetensors, but that shard does "
    f"not hold it"
  )


def test_bad_or_missing_config(tmp_path):
  path = make_hf(tmp_path)
  config_path = os.path.join(path, "config.json")
  with open(config_path, "w") as f:
    f.write("{")
  assert error_of(hf_checkpoint.read_hf_neo, path).startswith(f"{config_path}: not valid JSON")
  with open(config_path, "w") as f:
    json.dump({"model_type": "qwen3"}, f)
  assert "not a NEO config" in error_of(hf_checkpoint.read_hf_neo, path)
  os.remove(config_path)
  assert error_of(loading.load_checkpoint, path).startswith(f"{path}: not a checkpoint directory")


def test_not_a_checkpoint(tmp_path):
  assert error_of(loading.load_checkpoint, str(tmp_path / "nope")) == (
    f"{tmp_path}/nope: no such checkpoint directory"
  )
  (tmp_path / "file").write_text("x")
  assert "not a file" in error_of(loading.load_checkpoint, str(tmp_path / "file"))
  message = error_of(loading.load_checkpoint, str(tmp_path))
  assert "HF NEO (config.json + model.safetensors" in message and "neo-jax params" in message


def test_params_dir_that_disagrees_with_its_config(tmp_path):
  path = make_hf(tmp_path / "hf")
  params, config = hf_checkpoint.read_hf_neo(path)
  jax_checkpoint.save_params(str(tmp_path / "jax"), params, config)
  config_path = tmp_path / "jax" / "config.json"
  hf = json.loads(config_path.read_text())
  hf["llm_config"]["intermediate_size"] = 256
  config_path.write_text(json.dumps(hf))
  assert error_of(jax_checkpoint.load_params, str(tmp_path / "jax")).endswith(
    "params: llm/mlp/down_proj/kernel: checkpoint has [2, 384, 128], model expects [2, 256, 128]"
  )
  hf["llm_config"]["intermediate_size"] = 384
  hf["tie_word_embeddings"] = False
  config_path.write_text(json.dumps(hf))
  assert "missing parameter lm_head/kernel [128, 512]" in error_of(
    jax_checkpoint.load_params, str(tmp_path / "jax")
  )


def test_refuses_to_overwrite(tmp_path):
  path = make_hf(tmp_path / "hf")
  params, config = hf_checkpoint.read_hf_neo(path)
  assert "pass --overwrite" in error_of(hf_checkpoint.write_hf_neo, path, params, config)
  jax_checkpoint.save_params(str(tmp_path / "jax"), params, config)
  assert "pass --overwrite" in error_of(
    jax_checkpoint.save_params, str(tmp_path / "jax"), params, config
  )
  jax_checkpoint.save_params(str(tmp_path / "jax"), params, config, overwrite=True)


def test_cli_prints_one_line(tmp_path, capsys):
  key = "language_model.model.layers.3.self_attn.k_proj.weight"
  path = make_hf(tmp_path / "hf", lambda sd: sd.__setitem__(key, torch.zeros(64, 128)))
  code = cli.main(["convert", "hf-to-jax", "--src", path, "--out", str(tmp_path / "jax")])
  err = capsys.readouterr().err
  assert code == 2
  assert err == (
    f"neo-jax convert: error: {key}: checkpoint has [64, 128], model expects [128, 128]\n"
  )


def test_bad_golden_and_inputs(tmp_path):
  np.savez(tmp_path / "g.npz", input_ids=np.zeros(3, np.int32))
  assert "lacks ['pixel_values', 'grid_hw', 'logits']" in error_of(
    read_golden, str(tmp_path / "g.npz")
  )
  (tmp_path / "bad.npz").write_bytes(b"nonsense")
  assert "not a readable .npz" in error_of(read_golden, str(tmp_path / "bad.npz"))
  ids = np.array(
    [1, CONFIG.img_start_token_id] + [CONFIG.img_context_token_id] * 4 + [CONFIG.img_end_token_id]
  )
  pixels = np.zeros((16, 768), np.float32)
  assert error_of(hf_inputs_to_batch, ids, pixels[:8], np.array([[4, 2]]), CONFIG) == (
    "input_ids hold 4 <IMG_CONTEXT> tokens, the images give 2 visual tokens"
  )
  assert error_of(hf_inputs_to_batch, ids, pixels, np.array([[4, 2]]), CONFIG) == (
    "grid_hw covers 8 patches, pixel_values has 16"
  )
  assert "positive multiple of 2" in error_of(
    hf_inputs_to_batch, ids, pixels[:12], np.array([[3, 4]]), CONFIG
  )
