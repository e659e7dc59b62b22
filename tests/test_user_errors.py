"""User mistakes and damaged files, as a new user meets them: each gives one line and a
documented exit status (2: fix the input, 1: the run failed), and nothing is written or lost.
Damaged checkpoints fall back to the last step that reads back whole."""

import json
import logging
import os
import shutil
import sys
import types

import jax
import numpy as np
import pytest
from PIL import Image
from test_inference_support import image, random_model, tokenizer

from neo_jax import cli, errors, run_dir
from neo_jax.convert import load_checkpoint, save_params
from neo_jax.data.packing import STATS_KEY, PackedBatchIterator, PackingConfig
from neo_jax.data.stats import STAT_INDEX, reset_skip_warnings
from neo_jax.errors import UserError
from neo_jax.inference.loading import load_for_inference
from neo_jax.trainer.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the SFT stage shrunk: 1 + 1 layers, 512-token vocabulary, synthetic rows, one device
LOCAL = os.path.join(REPO, "configs", "sft.py") + ":tiny,local"
TINY = os.path.join(REPO, "configs", "sft.py") + ":tiny"  # the grain pipeline

pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest.py


def train(workdir, *extra):
  """`neo-jax train` of 4 steps of LOCAL, checkpoints at steps 2 and 4."""
  return cli.main(
    [
      "train",
      "--config",
      LOCAL,
      f"--config.workdir={workdir}",
      "--config.total_steps=4",
      "--config.checkpoint.every_steps=2",
      "--log-level=WARNING",
      *extra,
    ]
  )


def error_line(capsys, command):
  """The one line stderr holds, which must be `neo-jax COMMAND: error: ...`."""
  lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"neo-jax {command}: error: "), lines[0]
  return lines[0]


def listing(path):
  """{relative path: size} of every file under `path`."""
  out = {}
  for folder, _, names in os.walk(path):
    for name in names:
      full = os.path.join(folder, name)
      out[os.path.relpath(full, path)] = os.path.getsize(full)
  return out


def losses(workdir):
  records = read_jsonl(os.path.join(workdir, run_dir.METRICS_FILE))
  steps = [r["step"] for r in records if "train/loss" in r]
  assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def largest_file(folder):
  paths = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names]
  return max(paths, key=os.path.getsize)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One uninterrupted 4-step run (checkpoints 2 and 4) that the damaged copies start from."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  assert train(workdir) == 0
  assert run_dir.saved_steps(workdir) == [2, 4]
  return workdir, losses(workdir)


def copy_run(trained, tmp_path):
  target = str(tmp_path / "run")
  shutil.copytree(trained[0], target)
  return target


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory):
  """A neo-jax parameter directory of a tiny random model with the NEO tokenizer files."""
  params, config = random_model()
  root = tmp_path_factory.mktemp("params")
  return save_params(str(root / "model"), params, config, tokenizer_dir=str(tokenizer().directory))


# --- the table: bad input in, one line out, nothing written or lost -----------------------------


def test_wrong_type_in_a_sequence_field_fails_before_any_work(tmp_path, capsys):
  workdir = tmp_path / "never"
  rc = cli.main(
    ["train", "--config", TINY, f"--config.workdir={workdir}", "--config.data.sources=5"]
  )
  line = error_line(capsys, "train")
  assert rc == 2 and "data.sources=(5,)" in line and "--config.data.sources=" in line
  assert not workdir.exists()


@pytest.mark.parametrize("field", ["checkpoint.every_steps", "log.every_steps"])
def test_zero_cadence_fails_before_any_work(tmp_path, capsys, field):
  workdir = tmp_path / "never"
  rc = cli.main(["train", "--config", LOCAL, f"--config.workdir={workdir}", f"--config.{field}=0"])
  line = error_line(capsys, "train")
  assert rc == 2 and f"{field}=0 must be > 0" in line
  assert not workdir.exists()


@pytest.mark.parametrize(
  "damage, message",
  [
    ("truncate_array", "unreadable (Exception: Encountered error while reading array"),
    ("remove_metadata", "lists no parameters"),
  ],
)
def test_generate_on_a_damaged_parameter_directory(params_dir, tmp_path, capsys, damage, message):
  damaged = str(tmp_path / "model")
  shutil.copytree(params_dir, damaged)
  if damage == "truncate_array":
    truncate(largest_file(os.path.join(damaged, "params", "ocdbt.process_0", "d")))
  else:
    os.remove(os.path.join(damaged, "params", "_METADATA"))
  before = listing(damaged)
  rc = cli.main(["generate", "--checkpoint", damaged, "--prompt", "hi"])
  line = error_line(capsys, "generate")
  assert rc == 2 and os.path.join(damaged, "params") in line and message in line
  assert "convert or save it again" in line
  assert listing(damaged) == before


def test_run_directory_whose_newest_step_lost_its_params(trained, tmp_path, caplog):
  run = copy_run(trained, tmp_path)
  shutil.rmtree(os.path.join(run, "checkpoints", "4", "params"))
  before = listing(run)
  with caplog.at_level(logging.WARNING, logger="neo_jax.checkpoint"):
    params, _ = load_checkpoint(run)
  warnings = [r.getMessage() for r in caplog.records if r.name == "neo_jax.checkpoint"]
  assert len(warnings) == 1
  assert "checkpoint step 4" in warnings[0] and "params/ is missing" in warnings[0]
  assert "falling back to step 2" in warnings[0]
  expected, _ = run_dir.load_run_params(trained[0], step=2)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert listing(run) == before  # reading moves nothing


@pytest.mark.parametrize("damage", ["remove _METADATA", "truncate a data file"])
def test_resume_falls_back_to_the_last_good_step(trained, tmp_path, capsys, caplog, damage):
  run = copy_run(trained, tmp_path)
  step4 = os.path.join(run, "checkpoints", "4")
  if damage == "remove _METADATA":
    os.remove(os.path.join(step4, "train_state", "_METADATA"))
  else:
    truncate(largest_file(os.path.join(step4, "train_state", "ocdbt.process_0", "d")))
  damaged_files = listing(step4)
  with caplog.at_level(logging.WARNING, logger="neo_jax"):
    assert train(run) == 0
  assert capsys.readouterr().err.count("error") == 0
  warned = [r.getMessage() for r in caplog.records if "checkpoint step 4" in r.getMessage()]
  assert len(warned) == 1 and "falling back to step 2" in warned[0], warned
  # steps 3 and 4 redone: bitwise the uninterrupted run's losses, each step logged once
  assert losses(run) == trained[1]
  assert run_dir.saved_steps(run) == [2, 4]
  # the damaged step is kept, as it was, out of the way
  assert listing(os.path.join(run, run_dir.DAMAGED_DIR, "4")) == damaged_files


def test_resume_with_no_readable_step_says_so(trained, tmp_path, capsys):
  run = copy_run(trained, tmp_path)
  for step in (2, 4):
    os.remove(os.path.join(run, "checkpoints", str(step), "train_state", "_METADATA"))
  before = listing(run)
  assert train(run) == 2
  line = error_line(capsys, "train")
  assert "no readable checkpoint" in line and "step 4: train_state/" in line
  assert "step 2: train_state/" in line and "move them out" in line
  assert listing(run) == before


def test_corrupt_train_config_json(trained, tmp_path, capsys):
  run = copy_run(trained, tmp_path)
  with open(os.path.join(run, run_dir.TRAIN_CONFIG_FILE), "w") as f:
    f.write('{"model": {"hidden_size": 1')
  before = listing(run)
  assert train(run) == 2
  line = error_line(capsys, "train")
  assert os.path.join(run, run_dir.TRAIN_CONFIG_FILE) in line and "not valid JSON" in line
  assert "restore it from a copy" in line
  assert listing(run) == before


def test_eval_skips_and_counts_a_line_that_is_not_utf8(params_dir, tmp_path, capsys):
  Image.fromarray(image(64, 64, 1)).save(tmp_path / "a.png")
  good = json.dumps({"image": "a.png", "question": "What color?", "answer": "red"}).encode()
  (tmp_path / "vqa.jsonl").write_bytes(good + b"\n" + b'{"question": "\xff\xfe"}\n' + good + b"\n")
  out = tmp_path / "pred.jsonl"
  rc = cli.main(
    [
      "eval",
      "--checkpoint",
      params_dir,
      "--task",
      "vqa",
      "--data",
      str(tmp_path / "vqa.jsonl"),
      "--out",
      str(out),
      "--batch-size",
      "2",
      "--max-new-tokens",
      "2",
    ]
  )
  err = capsys.readouterr().err
  assert rc == 0
  assert "skipped 1 samples" in err and "vqa.jsonl:2: not UTF-8 text" in err
  metrics = json.loads((tmp_path / "pred.metrics.json").read_text())
  assert metrics["examples"] == 2 and metrics["skipped"] == {"bad_json": 1}
  assert len(out.read_text().splitlines()) == 2


def test_a_sample_too_long_for_a_row_is_named(caplog):
  reset_skip_warnings()
  cfg = PackingConfig(
    batch_size=1, seq_len=64, visual_budget=4, img_context_id=9, img_start_id=8, pad_id=0
  )

  def sample(n, record_id):
    return {
      "input_ids": np.arange(1, n + 1, dtype=np.int32),
      "supervised": np.ones(n, bool),
      "pixels": np.zeros((0, 4, 768), np.uint8),
      "pixel_rc": np.zeros((0, 2), np.int32),
      "splittable": np.asarray(False),
      "id": record_id,
    }

  import grain

  parent = grain.MapDataset.source([sample(300, "long.jsonl:7"), sample(10, "ok.jsonl:1")])
  iterator = PackedBatchIterator(parent.to_iter_dataset().__iter__(), cfg)
  with caplog.at_level(logging.WARNING, logger="neo_jax.data"):
    batch = next(iterator)
  assert batch[STATS_KEY][STAT_INDEX["dropped/too_many_tokens"]] == 1
  assert batch[STATS_KEY][STAT_INDEX["samples"]] == 1
  named = [r.getMessage() for r in caplog.records if "too_many_tokens" in r.getMessage()]
  assert named == [
    "dropping a sample (too_many_tokens): long.jsonl:7: 300 tokens > data.seq_len 64"
  ]


def test_skipped_updates_are_counted_across_resume_and_fail_the_run(tmp_path, capsys):
  """lr = 1e30 blows the parameters up after step 2: every later update is non-finite."""
  run = str(tmp_path / "run")
  nan = (
    "--config.nan_policy=skip",
    "--config.optimizer.lr=1e30",
    "--config.total_steps=8",
    "--config.checkpoint.every_steps=4",
  )
  assert train(run, *nan, "--config.max_skipped_share=1.0") == 0  # accepted: 6 of 8 skipped
  shutil.rmtree(os.path.join(run, "checkpoints", "8"))  # as if killed before saving step 8
  capsys.readouterr()
  assert train(run, *nan) == 1  # resumed at step 4 (2 skipped); default max_skipped_share 0.1
  line = error_line(capsys, "train")
  assert "6 of 8 updates were skipped" in line and "max_skipped_share=0.1" in line
  records = read_jsonl(os.path.join(run, "metrics.jsonl"))
  assert [r["train/skipped_steps"] for r in records] == [0, 0, 1, 2, 3, 4, 5, 6]
  assert run_dir.saved_steps(run) == [4, 8]  # the run's end is saved all the same


def test_metrics_after_kill_and_resume_hold_each_step_once(trained, tmp_path):
  run = copy_run(trained, tmp_path)
  shutil.rmtree(os.path.join(run, "checkpoints", "4"))  # killed before step 4 was saved
  with open(os.path.join(run, run_dir.METRICS_FILE), "a") as f:
    f.write('{"step": 5, "train/lo')  # ... while writing a record
  assert train(run) == 0
  assert losses(run) == trained[1]


def test_conversion_names_each_tensor_holding_nan_or_inf(tmp_path, capsys):
  params, config = random_model()
  params = jax.tree.map(np.array, params)
  params["llm"]["mlp"]["down_proj"]["kernel"][0, 3, 5] = np.nan
  params["embed_tokens"]["embedding"][7, :2] = np.inf
  src = save_params(str(tmp_path / "jax"), params, config)
  rc = cli.main(["convert", "jax-to-hf", "--src", src, "--out", str(tmp_path / "hf")])
  warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
  layer = config.num_prebuffer_layers  # llm layer 0 is HF layer E
  assert rc == 0 and warnings == [
    "warning: non-finite values in language_model.model.embed_tokens.weight: 0 NaN, 2 Inf "
    f"of {params['embed_tokens']['embedding'].size} values",
    f"warning: non-finite values in language_model.model.layers.{layer}.mlp.down_proj."
    f"weight: 1 NaN, 0 Inf of {params['llm']['mlp']['down_proj']['kernel'][0].size} values",
  ]
  assert os.path.isfile(tmp_path / "hf" / "model.safetensors")


def test_exported_tokenizer_files_have_neos_eos_and_chat_still_stops_at_im_end(params_dir):
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    with open(os.path.join(params_dir, name)) as f:
      eos = json.load(f)["eos_token"]
    assert (eos if isinstance(eos, str) else eos["content"]) == "<|endoftext|>", name
  model = load_for_inference(params_dir)
  assert model.config.eos_token_id == model.tokenizer.im_end_id == 151645  # generation's stop


# --- the error contract ---------------------------------------------------------------------------


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
  args = ["train", "--config", TINY, f"--config.workdir={tmp_path}", "--config.data.sources=5"]
  for argv in (["--debug", *args], [*args, "--debug"]):
    with pytest.raises(UserError, match="data.sources"):
      cli.main(argv)
  monkeypatch.setenv("NEO_JAX_DEBUG", "1")
  with pytest.raises(UserError, match="data.sources"):
    cli.main(args)
  monkeypatch.setenv("NEO_JAX_DEBUG", "0")
  assert cli.main(args) == 2
  error_line(capsys, "train")


# --- damaged checkpoint directories ---------------------------------------------------------------


def test_leftovers_of_a_failed_read_are_dropped_and_nothing_else(monkeypatch):
  """After a damaged file fails a restore (reported once, as a warning naming the step), orbax's
  other shard reads of it are collected later and report the read error again; those reports,
  and only they, are dropped whenever they come."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
  # a plain thread hook, so that the lasting filter is installed (again) over `seen`
  monkeypatch.setattr(errors.threading, "excepthook", lambda args: None)
  with errors.quiet_failures():
    pass

  def report(exc):
    sys.unraisablehook(types.SimpleNamespace(exc_value=exc, object=None))

  abandoned = Exception(f"{errors.ABANDONED_READ} index: (slice(0, 128, 1),).")
  abandoned.__cause__ = GeneratorExit()
  report(abandoned)
  report(RuntimeError("Event loop is closed"))
  other_cause = Exception(f"{errors.ABANDONED_READ} index: (slice(0, 128, 1),).")
  other_cause.__cause__ = OSError("disk")
  report(other_cause)
  report(ValueError("unrelated"))
  assert [type(e) for e in seen] == [Exception, ValueError] and seen[0] is other_cause


def test_every_file_of_the_newest_step_truncated_or_removed(trained, tmp_path, caplog):
  """Each file of step 4 truncated to half, then removed, in turn. Every case restores either
  step 4 (the damage did not touch what the step holds) or, with one warning naming step 4,
  step 2; the restored state and data position are bitwise those saved at that step (so the
  run continues with the uninterrupted run's losses, as the resume tests above show end to
  end), and the damaged step is moved aside whole, never deleted."""
  from neo_jax.model import abstract_params
  from neo_jax.parallel import make_mesh
  from neo_jax.trainer import config as config_lib
  from neo_jax.trainer import optimizer as opt_lib
  from neo_jax.trainer.batches import make_iterator
  from neo_jax.trainer.checkpoint import RunCheckpointer
  from neo_jax.trainer.state import abstract_state, state_shardings

  config = config_lib.load_config(LOCAL, ["--config.total_steps=4"])
  model = config_lib.model_config(config)
  trainable = opt_lib.trainable_paths(abstract_params(model), opt_lib.stage_patterns("sft"))
  tx, _ = opt_lib.from_config(config.optimizer, config.total_steps)
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
  target = abstract_state(model, tx, trainable, state_shardings(model, tx, trainable, mesh))

  def restore(workdir, step=None):
    data = make_iterator(config, model)
    checkpointer = RunCheckpointer(workdir)
    try:
      state, meta = checkpointer.restore(target, step=step, data_iterator=data)
    finally:
      checkpointer.close()
    return meta["step"], jax.tree.leaves(jax.device_get(state)), data.get_state()

  saved = {step: restore(trained[0], step)[1:] for step in (2, 4)}
  step4 = os.path.join(trained[0], "checkpoints", "4")
  files = sorted(listing(step4))
  outcomes = {}
  for i, name in enumerate(files):
    for how in ("truncate", "remove"):
      run = str(tmp_path / f"{i}_{how}")  # a fresh path: no reader cache can help
      shutil.copytree(trained[0], run, copy_function=os.link)  # links: restoring only reads
      target_file = os.path.join(run, "checkpoints", "4", name)
      os.remove(target_file)  # the link: the trained run's file stays whole
      if how == "truncate":
        with open(os.path.join(step4, name), "rb") as f:
          content = f.read()
        with open(target_file, "wb") as f:
          f.write(content[: len(content) // 2])
      damaged = listing(os.path.join(run, "checkpoints", "4"))
      caplog.clear()
      with caplog.at_level(logging.WARNING, logger="neo_jax"):
        step, leaves, data_state = restore(run)
      case = f"{how} {name}: step {step}"
      want_leaves, want_data = saved[step]
      assert len(leaves) == len(want_leaves), case
      for a, b in zip(leaves, want_leaves):
        np.testing.assert_array_equal(a, b, err_msg=case)
      assert data_state == want_data, case
      warned = [r.getMessage() for r in caplog.records if "checkpoint step 4" in r.getMessage()]
      if step == 2:
        assert len(warned) == 1 and "falling back to step 2" in warned[0], case
        assert listing(os.path.join(run, run_dir.DAMAGED_DIR, "4")) == damaged, case
      else:
        assert step == 4 and not warned, case
      outcomes[case] = step
      shutil.rmtree(run)
  assert len(outcomes) == 2 * len(files)
  # both outcomes occur: the arrays' data and metadata are read, spare files are not needed
  assert set(outcomes.values()) == {2, 4}, outcomes
