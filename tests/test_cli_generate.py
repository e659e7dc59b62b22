"""`neo-jax generate` on HF NEO and neo-jax checkpoint directories of one tiny random model."""

import json
import os

import jax
import pytest
from PIL import Image
from test_inference_support import image, random_model, tokenizer

from neo_jax import cli
from neo_jax.convert import save_params, write_hf_neo
from neo_jax.data.inputs import prepare_generation_inputs
from neo_jax.inference.generation import decode_text, generate
from neo_jax.inference.loading import load_for_inference

PROMPT = "What shape is in the picture?"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  params, config = random_model()
  root = tmp_path_factory.mktemp("ckpt")
  tok_dir = str(tokenizer().directory)
  jax_dir = save_params(str(root / "jax"), params, config, tokenizer_dir=tok_dir)
  hf_dir = str(root / "hf")
  write_hf_neo(hf_dir, params, config, carry_from=jax_dir, progress=False)
  bare_dir = save_params(str(root / "bare"), params, config)
  img = str(root / "shape.png")
  Image.fromarray(image(70, 90, 1)).save(img)
  img2 = str(root / "wide.png")
  Image.fromarray(image(40, 120, 2)).save(img2)
  return dict(jax=jax_dir, hf=hf_dir, bare=bare_dir, image=img, image2=img2)


def run_json(capsys, *args):
  assert cli.main(["generate", *args, "--json"]) == 0
  captured = capsys.readouterr()
  return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_hf_directory_gives_the_same_ids_as_the_neo_jax_checkpoint(dirs, capsys):
  assert os.path.isfile(os.path.join(dirs["hf"], "model.safetensors"))
  assert os.path.isfile(os.path.join(dirs["hf"], "tokenizer.json"))
  args = ["--image", dirs["image"], "--prompt", PROMPT, "--max-new-tokens", "5"]
  from_jax, _ = run_json(capsys, "--checkpoint", dirs["jax"], *args)
  from_hf, _ = run_json(capsys, "--checkpoint", dirs["hf"], *args)
  assert from_hf == from_jax
  assert len(from_jax["token_ids"]) >= 1

  # and both are what the library call gives for NEO's single-image prompt
  model = load_for_inference(dirs["jax"])
  prompt = prepare_generation_inputs(model.tokenizer, model.config, PROMPT, [dirs["image"]])
  assert prompt["input_ids"][0, :4].tolist() == model.tokenizer.encode("<|im_start|>user\n<img>")
  ids = generate(model.params, model.config, [prompt], 5).token_lists()[0]
  assert from_jax["token_ids"] == ids
  assert from_jax["text"] == decode_text(model.tokenizer, ids, (model.config.eos_token_id,))


def test_missing_tokenizer_falls_back_to_the_builtin_one_with_a_warning(dirs, capsys):
  args = ["--image", dirs["image"], "--prompt", PROMPT, "--max-new-tokens", "5"]
  with_files, err = run_json(capsys, "--checkpoint", dirs["jax"], *args)
  assert "warning" not in err
  fallback, err = run_json(capsys, "--checkpoint", dirs["bare"], *args)
  assert "no tokenizer.json" in err and "built-in" in err
  assert fallback == with_files


def test_sampling_flags_and_several_images(dirs, capsys):
  base = [
    "--checkpoint",
    dirs["jax"],
    "--prompt",
    PROMPT,
    "--max-new-tokens",
    "3",
    "--image",
    dirs["image"],
    "--image",
    dirs["image2"],
  ]
  greedy, _ = run_json(capsys, *base, "--greedy")
  top1, _ = run_json(capsys, *base, "--temperature", "0.9", "--top-k", "1", "--seed", "7")
  assert top1 == greedy
  model = load_for_inference(dirs["jax"])
  prompt = prepare_generation_inputs(
    model.tokenizer, model.config, PROMPT, [dirs["image"], dirs["image2"]]
  )
  text = model.tokenizer.decode(prompt["input_ids"][0])
  assert "Image-1: <img>" in text and "Image-2: <img>" in text
  assert (
    greedy["token_ids"]
    == generate(model.params, model.config, [prompt], 3, rng=jax.random.key(0)).token_lists()[0]
  )


def test_plain_output_is_the_text(dirs, capsys):
  args = [
    "--checkpoint",
    dirs["jax"],
    "--image",
    dirs["image"],
    "--prompt",
    PROMPT,
    "--max-new-tokens",
    "5",
  ]
  as_json, _ = run_json(capsys, *args)
  assert cli.main(["generate", *args]) == 0
  assert capsys.readouterr().out == as_json["text"] + "\n"


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--image", "/nonexistent/cat.png"], "/nonexistent/cat.png"),
    (["--greedy", "--temperature", "0.5"], "--greedy"),
    (["--top-p", "0.5"], "--temperature"),
    (["--temperature", "1.0", "--top-p", "1.5"], "top_p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
  ],
)
def test_bad_flags_give_one_line_errors(dirs, capsys, extra, message):
  rc = cli.main(["generate", "--checkpoint", dirs["jax"], "--prompt", "hi", *extra])
  err = capsys.readouterr().err
  assert rc == 2
  assert message in err and len(err.strip().splitlines()) == 1


def test_not_a_checkpoint(tmp_path, capsys):
  assert cli.main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi"]) == 2
  assert "not a checkpoint directory" in capsys.readouterr().err
