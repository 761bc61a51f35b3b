"""Tests for PyTorch <-> Flax conversion: parity with the PyTorch reference models, exact round
trips, refusing unsafe or damaged files, teacher import / export and their command line.

Small widths where the architecture has them; resnet18, preact_resnet18 and mobilenet_v2 run at
full size on two 32x32 images.
"""

import hashlib
import os
import pathlib
import pickle
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from gacd_jax import checkpoints
from gacd_jax import models
from gacd_jax import torch_convert
from gacd_jax.errors import CheckpointError
from tests import helpers

torch = pytest.importorskip("torch")
from experiments.pytorch_baseline import (  # pylint: disable=g-import-not-at-top
    models as torch_models)

REPO = pathlib.Path(__file__).resolve().parents[1]

# name -> (model options, image size).
CASES = {
    "small_cnn": ({"width": 4}, 16),
    "wrn": ({"depth": 10, "widen_factor": 2}, 16),
    "resnet18": ({}, 32),
    "preact_resnet18": ({}, 32),
    "mobilenet_v2": ({}, 32),
}
NUM_CLASSES = 10
BATCH = 2


def _torch_model(name: str, **kw) -> "torch.nn.Module":
  """A reference model in eval mode with random weights and BatchNorm affine params and stats."""
  torch.manual_seed(0)
  model = helpers.randomize_batch_norm(torch_models.build(name, NUM_CLASSES, **kw))
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.Linear):
        m.bias.uniform_(-0.2, 0.2)
  return model.eval()


def _numpy(state_dict) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in state_dict.items()}


def _tensors(state_dict: dict[str, np.ndarray]) -> dict:
  return {k: torch.from_numpy(v) for k, v in state_dict.items()}


def _images(size: int) -> "torch.Tensor":
  """x: [BATCH, 3, size, size] in [0, 1]."""
  return torch.rand(BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_with_pytorch_and_round_trip(name):
  kw, size = CASES[name]
  torch_model = _torch_model(name, **kw)
  state_dict = _numpy(torch_model.state_dict())
  variables = torch_convert.torch_to_flax(name, state_dict, NUM_CLASSES,
                                          image_shape=(size, size, 3), **kw)
  module = models.build(name, NUM_CLASSES, **kw)
  x = _images(size)
  x_nhwc = torch_convert.nchw_to_nhwc(x.numpy())

  # Eval mode: logits and features.
  with torch.no_grad():
    torch_logits, torch_features = torch_model(x)
  # Jitted: eager mode would compile each of mobilenet_v2's many differently shaped ops alone.
  logits, features = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x_nhwc)
  np.testing.assert_allclose(logits, torch_logits.numpy(), rtol=0, atol=1e-4)
  np.testing.assert_allclose(features, torch_features.numpy(), rtol=0, atol=1e-4)

  # Train mode: outputs and the running-statistics update from the same starting statistics.
  torch_model.train()
  with torch.no_grad():
    torch_logits, _ = torch_model(x)
  (logits, _), updates = jax.jit(
      lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x_nhwc)
  np.testing.assert_allclose(logits, torch_logits.numpy(), rtol=0, atol=1e-4)
  torch_stats = _numpy(torch_model.state_dict())
  flax_stats = torch_convert.flax_to_torch(
      name, {"params": variables["params"], "batch_stats": updates["batch_stats"]})
  running = [k for k in torch_stats if k.endswith(("running_mean", "running_var"))]
  assert running
  for key in running:  # PyTorch folds the unbiased batch variance into running_var; so do we
    np.testing.assert_allclose(flax_stats[key], torch_stats[key], rtol=1e-4, atol=1e-5,
                               err_msg=key)

  # Flax -> PyTorch -> Flax is exact, and PyTorch loads the export strictly.
  exported = torch_convert.flax_to_torch(name, variables)
  tracked = [k for k in exported if k.endswith("num_batches_tracked")]
  assert tracked and all(exported[k].dtype == np.int64 and exported[k].shape == () for k in tracked)
  again = torch_convert.torch_to_flax(name, exported, NUM_CLASSES, image_shape=(size, size, 3),
                                      **kw)
  assert jax.tree.structure(again) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  fresh = torch_models.build(name, NUM_CLASSES, **kw)
  fresh.load_state_dict(_tensors(exported), strict=True)
  for key, value in fresh.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(value.numpy(), state_dict[key], err_msg=key)


def test_trades_checkpoint_with_sub_block1_nested_and_data_parallel(tmp_path):
  torch_model = _torch_model("wrn", depth=10, widen_factor=1, with_sub_block1=True)
  state_dict = {f"module.{k}": v for k, v in torch_model.state_dict().items()}
  assert any(k.startswith("module.sub_block1.") for k in state_dict)
  path = tmp_path / "model_cifar_wrn.pt"
  torch.save({"state_dict": state_dict, "epoch": 76, "best_acc": 0.57}, path)

  loaded = torch_convert.read_torch_checkpoint(path)
  assert not any(k.startswith("module.") for k in loaded)
  variables = torch_convert.torch_to_flax("wrn", loaded, NUM_CLASSES, image_shape=(16, 16, 3),
                                          depth=10, widen_factor=1)
  x = _images(16)
  with torch.no_grad():
    torch_logits, _ = torch_model(x)
  logits, _ = models.build("wrn", NUM_CLASSES, depth=10, widen_factor=1).apply(
      variables, torch_convert.nchw_to_nhwc(x.numpy()))
  np.testing.assert_allclose(logits, torch_logits.numpy(), rtol=0, atol=1e-4)


class _WritesMarker:
  """Unpickling this calls open(marker, 'w'): code that runs if a loader trusts the pickle."""

  def __init__(self, marker: pathlib.Path):
    self.marker = marker

  def __reduce__(self):
    return open, (str(self.marker), "w")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_with_code_is_refused_and_never_runs(tmp_path, writer):
  marker = tmp_path / "marker"
  path = tmp_path / "evil.pt"
  if writer == "torch.save":
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": _WritesMarker(marker)},
               path)
  else:  # no tensors: pickled tensors alone would already be refused here
    with path.open("wb") as f:
      pickle.dump({"extra": _WritesMarker(marker)}, f, protocol=2)  # torch.load's protocol
  # The reason names `open`: the refusal is due to the payload.
  with pytest.raises(CheckpointError,
                     match=f"refusing to load {re.escape(str(path))}: .*open.*arbitrary code"):
    torch_convert.read_torch_checkpoint(path)
  assert not marker.exists()


def test_wrong_architecture_lists_every_kind_of_problem():
  state_dict = _numpy(torch_models.build("resnet18", NUM_CLASSES).state_dict())
  with pytest.raises(CheckpointError) as info:
    torch_convert.torch_to_flax("mobilenet_v2", state_dict, NUM_CLASSES)
  message = str(info.value)
  assert "do not fit a mobilenet_v2 with 10 classes" in message
  assert "missing layers.0.conv1.weight [32, 32, 1, 1]" in message
  assert "unexpected layer1.0.conv1.weight [64, 64, 3, 3]" in message
  assert "shape of conv1.weight: expected [32, 3, 3, 3], found [64, 3, 3, 3]" in message
  assert "... and " in message  # long listings are cut short


def test_wrong_head_and_depth_are_shape_and_key_errors():
  state_dict = _numpy(_torch_model("wrn", depth=10, widen_factor=1).state_dict())
  with pytest.raises(CheckpointError, match=r"shape of fc.weight: expected \[100, 64\]"):
    torch_convert.torch_to_flax("wrn", state_dict, 100, depth=10, widen_factor=1)
  with pytest.raises(CheckpointError, match=r"missing block1.layer.1.conv1.weight"):
    torch_convert.torch_to_flax("wrn", state_dict, NUM_CLASSES, depth=16, widen_factor=1)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_named(tmp_path, suffix):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  path = tmp_path / f"weights{suffix}"
  tensors = {"linear.weight": torch.ones(64, 64)}
  if suffix == ".pt":
    torch.save(tensors, path)
  else:
    save_file(tensors, path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match=f"cannot read {re.escape(str(path))}: it is truncated"):
    torch_convert.read_torch_checkpoint(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_bfloat16_checkpoint_becomes_float32(tmp_path, suffix):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  torch_model = _torch_model("small_cnn", width=4)
  half = {k: v.bfloat16() if v.is_floating_point() else v
          for k, v in torch_model.state_dict().items()}
  path = tmp_path / f"half{suffix}"
  if suffix == ".pt":
    torch.save(half, path)
  else:
    save_file(half, path)
  variables = torch_convert.torch_to_flax(
      "small_cnn", torch_convert.read_torch_checkpoint(path), NUM_CLASSES, width=4)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {np.dtype(np.float32)}
  np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"],  # OIHW -> HWIO
                                half["conv1.weight"].float().numpy().transpose(2, 3, 1, 0))


def test_file_without_state_dict_and_missing_file(tmp_path):
  path = tmp_path / "meta.pt"
  torch.save({"epoch": 3, "args": {"lr": 0.1}}, path)
  with pytest.raises(CheckpointError, match="holds no state_dict.*'args', 'epoch'"):
    torch_convert.read_torch_checkpoint(path)
  with pytest.raises(CheckpointError, match="does not exist"):
    torch_convert.read_torch_checkpoint(tmp_path / "nope.pt")


def test_import_teacher_load_model_and_export(tmp_path):
  torch_model = _torch_model("wrn", depth=10, widen_factor=1)
  source = tmp_path / "teacher.pth"
  torch.save(torch_model.state_dict(), source)
  out = tmp_path / "teacher"
  torch_convert.import_teacher("wrn", source, out, num_classes=NUM_CLASSES,
                               image_shape=(16, 16, 3), depth=10, widen_factor=1)

  config = checkpoints.read_config(out)
  assert config.model.name == "wrn"
  assert (config.model.wrn.depth, config.model.wrn.widen_factor) == (10, 1)
  info = checkpoints.read_run_info(out)
  assert info["image_shape"] == [16, 16, 3] and info["num_classes"] == NUM_CLASSES
  assert info["teacher"] is None
  assert info["imported_from"] == {"path": str(source.absolute()),
                                   "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}

  module, variables = checkpoints.load_model(out)
  x = _images(16)
  with torch.no_grad():
    torch_logits, _ = torch_model(x)
  logits, _ = module.apply(variables, torch_convert.nchw_to_nhwc(x.numpy()), train=False)
  np.testing.assert_allclose(logits, torch_logits.numpy(), rtol=0, atol=1e-4)

  original = _numpy(torch_model.state_dict())
  for suffix in (".pt", ".safetensors"):
    exported = tmp_path / f"student{suffix}"
    torch_convert.export_torch(out, exported)
    state_dict = torch_convert.read_torch_checkpoint(exported)
    fresh = torch_models.build("wrn", NUM_CLASSES, depth=10, widen_factor=1)
    fresh.load_state_dict(_tensors(state_dict), strict=True)
    for key, value in original.items():
      if not key.endswith("num_batches_tracked"):
        np.testing.assert_array_equal(state_dict[key], value, err_msg=key)

  with pytest.raises(CheckpointError, match="not empty"):
    torch_convert.import_teacher("wrn", source, out, depth=10, widen_factor=1)


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
  return subprocess.run([sys.executable, "-m", "gacd_jax.cli", *args], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=120)


def test_cli_import_teacher_and_export_torch(tmp_path):
  torch_model = _torch_model("small_cnn", width=4)
  source = tmp_path / "teacher.pt"
  torch.save({"model": torch_model.state_dict()}, source)
  out = tmp_path / "teacher"
  result = _cli("import-teacher", "--arch", "small_cnn", "--torch_checkpoint", str(source),
                "--out", str(out), "--num_classes", "10", "--image_size", "16",
                "--model_option", "width=4")
  assert result.returncode == 0, result.stderr
  assert f"--config.teacher.workdir={out}" in result.stdout
  assert checkpoints.read_run_info(out)["image_shape"] == [16, 16, 3]

  exported = tmp_path / "student.pt"
  result = _cli("export-torch", "--workdir", str(out), "--out", str(exported))
  assert result.returncode == 0, result.stderr
  state_dict = torch.load(exported, weights_only=True)
  torch_models.build("small_cnn", NUM_CLASSES, width=4).load_state_dict(state_dict, strict=True)
  for key, value in torch_model.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      assert torch.equal(state_dict[key], value), key

  damaged = tmp_path / "damaged.pt"
  damaged.write_bytes(source.read_bytes()[:100])
  result = _cli("import-teacher", "--arch", "small_cnn", "--torch_checkpoint", str(damaged),
                "--out", str(tmp_path / "other"))
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  assert f"gacd-jax: error: cannot read {damaged}" in result.stderr
  assert not (tmp_path / "other").exists()


def test_import_needs_no_torch():
  result = subprocess.run(
      [sys.executable, "-c", "import sys, gacd_jax.torch_convert; "
       "print('torch' in sys.modules, 'safetensors' in sys.modules)"],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.stdout.split() == ["False", "False"], result.stderr
