"""RobustBench teachers: the Flax architectures against robustbench's own PyTorch classes, the
name table against robustbench's model-zoo source, and the import through the command line.

robustbench is installed without its dependencies (README, `.ci/run`): its package `__init__`
imports timm, torchvision and more, so the architecture files, which need only torch, are loaded
by path, and the model-zoo tables are read as source text. Random weights, nothing downloaded.
"""

import ast
import importlib.util
import math
import pathlib
import re

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gacd_jax import checkpoints
from gacd_jax import cli
from gacd_jax import models
from gacd_jax import robustbench_teachers as rb
from gacd_jax import torch_convert
from tests import helpers

torch = pytest.importorskip("torch")
_SPEC = importlib.util.find_spec("robustbench")
if _SPEC is None:
  pytest.skip("robustbench is not installed (pip install --no-deps robustbench==1.1.1)",
              allow_module_level=True)
PACKAGE = pathlib.Path(_SPEC.submodule_search_locations[0])


def _load(name: str):
  """robustbench/model_zoo/architectures/<name>.py, without running the package's __init__."""
  path = PACKAGE / "model_zoo" / "architectures" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"robustbench_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


DM, RESNET, WRN = _load("dm_wide_resnet"), _load("resnet"), _load("wide_resnet")
C10 = (DM.CIFAR10_MEAN, DM.CIFAR10_STD)


def _random_batch_norm(model):
  """`model` in eval mode with random BatchNorm affine parameters and running statistics."""
  torch.manual_seed(0)
  return helpers.randomize_batch_norm(model).eval()


class _Normalised(torch.nn.Module):
  """`(x - mean) / std`, then `model`: how RobustBench's subclasses (Wong2020FastNet, ...) wrap."""

  def __init__(self, model, mean, std):
    super().__init__()
    self.model = model
    self.register_buffer("mu", torch.tensor(mean).view(1, 3, 1, 1))
    self.register_buffer("sigma", torch.tensor(std).view(1, 3, 1, 1))

  def forward(self, x):
    return self.model((x - self.mu) / self.sigma)


# name -> (robustbench model, gacd_jax arch, its options); small depths and widths.
FAMILIES = {
    "dm_wrn_swish_padding": (
        lambda: DM.DMWideResNet(10, depth=16, width=2, activation_fn=DM.Swish, mean=C10[0],
                                std=C10[1], padding=2),
        "dm_wrn", dict(depth=16, width=2, activation="swish", input_mean=C10[0],
                       input_std=C10[1], input_padding=2)),
    "dm_wrn_silu": (
        lambda: DM.DMWideResNet(10, depth=10, width=1, activation_fn=torch.nn.SiLU,
                                mean=C10[0], std=C10[1]),
        "dm_wrn", dict(depth=10, width=1, activation="silu", input_mean=C10[0],
                       input_std=C10[1])),
    "dm_preact_resnet18_swish": (
        lambda: DM.DMPreActResNet(10, 18, 0, activation_fn=DM.Swish, mean=C10[0], std=C10[1]),
        "dm_preact_resnet", dict(depth=18, activation="swish", input_mean=C10[0],
                                 input_std=C10[1])),
    "preact_resnet18_fast_normalised": (  # Wong2020Fast
        lambda: _Normalised(RESNET.PreActResNet(RESNET.PreActBlock, [2, 2, 2, 2]), *C10),
        "preact_resnet18_fast", dict(input_mean=C10[0], input_std=C10[1])),
    "preact_resnet18_bn_before_fc": (  # Addepalli2021Towards_PARN18
        lambda: RESNET.PreActResNet(RESNET.PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True),
        "preact_resnet18", {}),
    "resnet18": (lambda: RESNET.ResNet18(), "resnet18", {}),
    "wrn_sub_block1_half": (  # Hendrycks2019Using-style 2x - 1, and TRADES' unused sub_block1
        lambda: _Normalised(WRN.WideResNet(depth=10, widen_factor=2, sub_block1=True),
                            (0.5,) * 3, (0.5,) * 3),
        "wrn", dict(depth=10, widen_factor=2, input_mean=(0.5,) * 3, input_std=(0.5,) * 3)),
}


def _images() -> "torch.Tensor":
  """x: [2, 3, 32, 32] in [0, 1]."""
  return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _assert_close(logits, reference):
  """Equal to 1e-4 of the reference's largest logit."""
  scale = np.abs(reference).max()
  assert scale > 0
  np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_equal_robustbench(family):
  make, arch, options = FAMILIES[family]
  reference = _random_batch_norm(make())
  state_dict = {re.sub(r"^model\.", "", k): v.numpy() for k, v in reference.state_dict().items()
                if k not in ("mu", "sigma")}
  variables = torch_convert.torch_to_flax(arch, state_dict, 10, **options)
  module = models.build(arch, 10, **options)
  x = _images()
  with torch.no_grad():
    expected = reference(x).numpy()
  logits, _ = jax.jit(lambda v, x: module.apply(v, x))(variables, torch_convert.nchw_to_nhwc(x))
  _assert_close(np.asarray(logits), expected)


def _flax_key(torch_key: str) -> str:
  """'layer.0.block.1.conv_0.weight' -> 'params/layer_0/block_1/conv_0/kernel', written out here
  independently of torch_convert."""
  key = re.sub(r"\.(\d+)(?=\.)", r"_\1", torch_key)
  *path, leaf = key.split(".")
  if leaf in ("running_mean", "running_var"):
    return "/".join(("batch_stats", *path, leaf[len("running_"):]))
  if leaf == "weight":
    leaf = "kernel" if path[-1] in ("logits", "linear", "fc") or "conv" in path[-1] or \
        path[-1] == "shortcut" else "scale"
  return "/".join(("params", *path, leaf))


def test_dm_wrn_70_16_shapes_and_parameter_count_without_a_forward():
  with torch.device("meta"):
    reference = DM.DMWideResNet(100, depth=70, width=16, activation_fn=DM.Swish)
  want = {}
  for key, tensor in reference.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      shape = tuple(tensor.shape)
      want[_flax_key(key)] = (shape[2:] + shape[1::-1] if len(shape) == 4 else shape[::-1])
  module = models.build("dm_wrn", 100, depth=70, width=16, activation="swish")
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  got = {k: v.shape for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
  assert got == want
  count = sum(math.prod(v.shape) for v in jax.tree.leaves(variables["params"]))
  assert count == sum(p.numel() for p in reference.parameters()) == 266_888_756


# --- The table against robustbench's model-zoo source. -------------------------------------------

# Linf entries of a supported class that the table leaves out, and why.
EXCLUDED = {"Ding2020MMA": "normalises each image by its own mean and std"}
_NORMS = {"CIFAR10_MEAN": DM.CIFAR10_MEAN, "CIFAR10_STD": DM.CIFAR10_STD,
          "CIFAR100_MEAN": DM.CIFAR100_MEAN, "CIFAR100_STD": DM.CIFAR100_STD}


def _value(node, defaults):
  if isinstance(node, ast.Name):
    return defaults.get(node.id, _NORMS.get(node.id, node.id))
  if isinstance(node, ast.Attribute):  # nn.SiLU
    return node.attr
  return ast.literal_eval(node)


def _architecture(func: str, args: list, kwargs: dict):
  """(arch, options) of a robustbench constructor call, or None for an unsupported one."""
  if func in ("DMWideResNet", "DMPreActResNet"):
    activation = str(kwargs.get("activation_fn", "ReLU")).lower()
    if func == "DMPreActResNet":
      return "dm_preact_resnet", {"depth": kwargs["depth"], "activation": activation}
    return "dm_wrn", {"depth": kwargs["depth"], "width": kwargs["width"], "activation": activation}
  if func == "WideResNet":
    named = dict(zip(("depth", "num_classes", "widen_factor"), args), **kwargs)
    return "wrn", {"depth": named.get("depth", 28), "widen_factor": named.get("widen_factor", 10)}
  if func == "ResNet18" or (func == "ResNet" and args[:2] == ["BasicBlock", [2, 2, 2, 2]]):
    return "resnet18", {}
  if func == "PreActResNet" and args[1] == [2, 2, 2, 2]:
    reads_activated = args[0] == "PreActBlockV2" or kwargs.get("out_shortcut", False)
    bn_before_fc = kwargs.get("bn_before_fc", False)
    if not reads_activated and not bn_before_fc:
      return "preact_resnet18_fast", {}
    if reads_activated and bn_before_fc:
      return "preact_resnet18", {}
  return None


def _source_entries(dataset: str) -> dict:
  """name -> (arch, options, (mean, std), buffers) or None, from robustbench's <dataset>.py."""
  tree = ast.parse((PACKAGE / "model_zoo" / f"{dataset}.py").read_text())
  classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
  linf = next(node.value for node in tree.body if isinstance(node, ast.Assign)
              and getattr(node.targets[0], "id", None) == "linf")
  entries = {}
  for pair in linf.args[0].elts:
    name = ast.literal_eval(pair.elts[0])
    model = pair.elts[1].values[[ast.literal_eval(k) for k in pair.elts[1].keys].index("model")]
    norm, buffers, defaults = ((), ()), False, {}
    if isinstance(model, ast.Lambda) and isinstance(model.body, ast.Call):
      call = model.body
    elif isinstance(model, ast.Name) and model.id in classes:  # a subclass that normalises
      cls = classes[model.id]
      init = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
      defaults = {a.arg: ast.literal_eval(d) for a, d in
                  zip(init.args.args[::-1], init.args.defaults[::-1])}
      call = next(n for n in ast.walk(init) if isinstance(n, ast.Call)
                  and getattr(n.func, "attr", None) == "__init__")
      call = ast.Call(func=cls.bases[0], args=call.args, keywords=call.keywords)
      buffer = {ast.literal_eval(n.args[0]): ast.literal_eval(n.args[1].func.value.args[0])
                for n in ast.walk(cls) if isinstance(n, ast.Call)
                and getattr(n.func, "attr", None) == "register_buffer"}
      if buffer:
        norm, buffers = (tuple(buffer["mu"]), tuple(buffer["sigma"])), True
      elif "2.0 * x - 1.0" in ast.unparse(cls):
        norm = ((0.5,) * 3, (0.5,) * 3)
    else:
      call = ast.Call(func=model, args=[], keywords=[])
    func = call.func.id if isinstance(call.func, ast.Name) else call.func.attr
    args = [_value(a, defaults) for a in call.args]
    kwargs = {k.arg: _value(k.value, defaults) for k in call.keywords}
    if "mean" in kwargs:
      norm = (tuple(kwargs["mean"]), tuple(kwargs["std"]))
    architecture = _architecture(func, args, kwargs)
    entries[name] = architecture and (*architecture, norm, buffers)
  return entries


@pytest.mark.parametrize("dataset", sorted(rb.TABLE))
def test_table_matches_robustbench_source(dataset):
  source = _source_entries(dataset)
  supported = {name for name, fact in source.items() if fact and name not in EXCLUDED}
  assert set(rb.TABLE[dataset]) == supported
  for name in supported:
    e = rb.TABLE[dataset][name]
    assert (e.arch, e.options, e.norm, e.buffers) == source[name], name
  assert len(supported) >= {"cifar10": 55, "cifar100": 30}[dataset]
  # RobustBench's loader takes the 'last' of two models for this entry alone among these.
  loader = (PACKAGE / "utils.py").read_text()
  assert "model_name == 'Andriushchenko2020Understanding'" in loader
  assert {n for n, e in rb.TABLE[dataset].items() if e.inside} == (
      {"Andriushchenko2020Understanding"} if dataset == "cifar10" else set())


# --- Import through the command line. ------------------------------------------------------------


def _cli(capsys, *args):
  try:
    cli.main(["gacd-jax", "import-teacher", *args])
    code = 0
  except SystemExit as e:
    code = e.code
  return code, *capsys.readouterr()


def test_list_names_every_entry_with_its_architecture(capsys):
  code, out, _ = _cli(capsys, "--robustbench", "list")
  assert code == 0
  for table in rb.TABLE.values():
    for name in table:
      assert f"  {name} " in out
  assert re.search(r"Rebuffi2021Fixing_70_16_cutmix_extra +dm_wrn depth=70 width=16 "
                   r"activation=swish, normalised: mean 0.4914 0.4822 0.4465, std 0.2471", out)


def test_import_unwraps_like_robustbench_and_takes_the_files_mean_and_std(
    tmp_path, monkeypatch, capsys):
  """A checkpoint holding 'last' and 'best', DataParallel's `module.` and a `model.` prefix, and
  `mu` / `sigma` buffers that differ from the class's: the run computes what RobustBench's loaded
  model computes."""
  entry = rb.Entry("dm_wrn", {"depth": 10, "width": 1, "activation": "swish"}, C10,
                   buffers=True, inside="last")
  monkeypatch.setitem(rb.CIFAR100, "Tiny2024Test", entry)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.25)
  reference = _random_batch_norm(DM.DMWideResNet(100, depth=10, width=1, activation_fn=DM.Swish,
                                                 mean=mean, std=std))
  weights = {f"module.model.{k}": v for k, v in reference.state_dict().items()}
  weights["module.model.mu"] = torch.tensor(mean).view(1, 3, 1, 1)
  weights["module.model.sigma"] = torch.tensor(std).view(1, 3, 1, 1)
  path = tmp_path / "Tiny2024Test.pt"
  torch.save({"last": weights, "best": {}}, path)

  out_dir = tmp_path / "teacher"
  code, out, err = _cli(capsys, "--robustbench", "Tiny2024Test", "--dataset", "cifar100",
                        "--torch_checkpoint", str(path), "--out", str(out_dir))
  assert code == 0, err
  assert f"--config.teacher.workdir={out_dir}" in out
  config = checkpoints.read_config(out_dir)
  assert (config.model.name, config.model.dm_wrn.activation) == ("dm_wrn", "swish")
  np.testing.assert_allclose(config.model.input_mean, mean)
  info = checkpoints.read_run_info(out_dir)
  assert info["num_classes"] == 100
  assert info["imported_from"]["robustbench"]["name"] == "Tiny2024Test"

  module, variables = checkpoints.load_model(out_dir)
  x = _images()
  with torch.no_grad():
    expected = reference(x).numpy()
  logits, _ = module.apply(variables, torch_convert.nchw_to_nhwc(x))
  _assert_close(np.asarray(logits), expected)


def test_weights_of_another_depth_are_refused_with_the_list(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(rb.CIFAR10, "Tiny2024Test",
                      rb.Entry("dm_wrn", {"depth": 10, "width": 1, "activation": "swish"}, C10))
  path = tmp_path / "deeper.pt"
  with torch.device("meta"):
    deeper = DM.DMWideResNet(10, depth=16, width=1)
  torch.save({"state_dict": {k: torch.zeros(v.shape) for k, v in deeper.state_dict().items()}},
             path)
  code, _, err = _cli(capsys, "--robustbench", "Tiny2024Test", "--torch_checkpoint", str(path),
                      "--out", str(tmp_path / "teacher"))
  assert code == 2
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert f"{path} is not RobustBench's cifar10 Tiny2024Test (dm_wrn depth=10" in err
  assert "unexpected layer.0.block.1.conv_0.weight [16, 16, 3, 3]" in err
  assert not (tmp_path / "teacher").exists()
