"""Tests for the model zoo: shapes, parameter counts (Flax and PyTorch), BN modes, names, errors.

The big models are only traced (`jax.eval_shape`, PyTorch's meta device); real forwards run for
small_cnn and once for resnet18, to keep this file well under a minute on 2 CPU cores.
"""

import functools
import math
import re

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gacd_jax import models
from gacd_jax.errors import ConfigError

# Counts of `params` with a 10-way head; all but small_cnn are those of the public PyTorch models
# (RobustBench's classes for the last three; tests/test_robustbench.py checks them there).
PARAM_COUNTS = {
    'resnet18': 11_173_962,
    'preact_resnet18': 11_172_170,
    'wrn': 46_160_474,
    'wrn34_10': 46_160_474,
    'mobilenet_v2': 2_296_922,
    'small_cnn': 24_346,
    'dm_wrn': 36_479_194,
    'dm_preact_resnet': 12_548_426,
    'preact_resnet18_fast': 11_171_146,
}
FEATURE_DIMS = {
    'resnet18': 512,
    'preact_resnet18': 512,
    'wrn': 640,
    'wrn34_10': 640,
    'mobilenet_v2': 1280,
    'small_cnn': 64,
    'dm_wrn': 640,
    'dm_preact_resnet': 512,
    'preact_resnet18_fast': 512,
}
# The architectures experiments/pytorch_baseline has; RobustBench's are checked against its own.
BASELINE = sorted(set(PARAM_COUNTS) - {'dm_wrn', 'dm_preact_resnet', 'preact_resnet18_fast'})
BATCH, IMAGE_SHAPE = 2, (32, 32, 3)


@functools.cache
def _abstract(name: str):
  """(logits, features, variables) of `build(name, 10)` on [2, 32, 32, 3], as shapes only."""
  module = models.build(name, 10)
  x = jax.ShapeDtypeStruct((BATCH, *IMAGE_SHAPE), jnp.float32)
  (logits, features), variables = jax.eval_shape(
      lambda x: module.init_with_output(jax.random.key(0), x), x)
  return logits, features, variables


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def test_names():
  assert models.names() == sorted(PARAM_COUNTS)


@pytest.mark.parametrize('name', sorted(PARAM_COUNTS))
def test_output_shapes_and_dtypes(name):
  logits, features, variables = _abstract(name)
  assert logits.shape == (BATCH, 10)
  assert features.shape == (BATCH, FEATURE_DIMS[name])
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize('name', sorted(PARAM_COUNTS))
def test_param_count(name):
  assert _count(_abstract(name)[2]['params']) == PARAM_COUNTS[name]


@pytest.mark.parametrize('name', BASELINE)
def test_torch_param_count(name):
  torch = pytest.importorskip('torch')
  from experiments.pytorch_baseline import models as torch_models
  with torch.device('meta'):  # shapes only: no memory, no init cost
    model = torch_models.build(name, 10)
  assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


def _torch_to_flax(state_dict) -> dict:
  """A PyTorch state_dict as flat Flax variables ('params/layer1_0/conv1/kernel' -> tensor).

  Spells out the naming convention documented in gacd_jax/models.py independently of it.
  """
  flat = {}
  for key, tensor in state_dict.items():
    key = key.replace('.shortcut.0.', '.shortcut_conv.').replace('.shortcut.1.', '.shortcut_bn.')
    key = re.sub(r'\.layer\.(\d+)\.', r'.layer_\1.', key)
    key = re.sub(r'^(layer\d|layers)\.(\d+)\.', r'\1_\2.', key)
    *path, leaf = key.split('.')
    if leaf == 'num_batches_tracked':
      continue
    if leaf in ('running_mean', 'running_var'):
      flat['/'.join(('batch_stats', *path, leaf[len('running_'):]))] = tensor
    elif leaf == 'weight' and tensor.ndim == 4:  # OIHW -> HWIO
      flat['/'.join(('params', *path, 'kernel'))] = tensor.permute(2, 3, 1, 0)
    elif leaf == 'weight' and tensor.ndim == 2:
      flat['/'.join(('params', *path, 'kernel'))] = tensor.T
    elif leaf == 'weight':
      flat['/'.join(('params', *path, 'scale'))] = tensor
    else:
      flat['/'.join(('params', *path, leaf))] = tensor
  return flat


@pytest.mark.parametrize('name', BASELINE)
def test_naming_convention_matches_torch_state_dict(name):
  torch = pytest.importorskip('torch')
  from experiments.pytorch_baseline import models as torch_models
  with torch.device('meta'):
    state_dict = torch_models.build(name, 10).state_dict()
  flax_shapes = {k: v.shape for k, v in
                 traverse_util.flatten_dict(_abstract(name)[2], sep='/').items()}
  assert flax_shapes == {k: tuple(v.shape) for k, v in _torch_to_flax(state_dict).items()}


def test_small_cnn_matches_torch():
  # Even image size: there 'SAME' pads a stride-2 conv (0, 1), PyTorch (1, 1).
  torch = pytest.importorskip('torch')
  from experiments.pytorch_baseline import models as torch_models
  torch.manual_seed(0)
  torch_model = torch_models.build('small_cnn', 5, width=4).eval()
  for m in torch_model.modules():  # non-trivial statistics so BN is exercised
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.uniform_(-0.5, 0.5)
      m.running_var.uniform_(0.5, 2.0)
  x = torch.rand(2, 3, 10, 10)
  with torch.no_grad():
    torch_logits, torch_features = torch_model(x)
  flat = _torch_to_flax(torch_model.state_dict())
  variables = traverse_util.unflatten_dict(
      {k: jnp.asarray(v.detach().numpy()) for k, v in flat.items()}, sep='/')
  logits, features = models.build('small_cnn', 5, width=4).apply(
      variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(logits, torch_logits.numpy(), atol=1e-5)
  np.testing.assert_allclose(features, torch_features.numpy(), atol=1e-5)


def test_feature_dim():
  assert models.feature_dim(models.build('small_cnn', 10, width=8), (12, 12, 3)) == 32
  assert models.feature_dim(models.build('wrn', 10, depth=16, widen_factor=4), IMAGE_SHAPE) == 256


def test_compute_dtype_keeps_float32_params():
  module = models.build('small_cnn', 10, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((BATCH, 8, 8, 3), jnp.float32)
  (logits, features), variables = jax.eval_shape(
      lambda x: module.init_with_output(jax.random.key(0), x), x)
  assert logits.dtype == features.dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def _images(shape, seed=0):
  return jax.random.uniform(jax.random.key(seed), shape)


def test_small_cnn_forward_and_batch_norm_modes():
  module = models.build('small_cnn', 7, width=4)
  x = _images((3, 10, 10, 3))
  variables = module.init(jax.random.key(1), x)

  logits, features = module.apply(variables, x)
  assert logits.shape == (3, 7) and features.shape == (3, 16)
  assert np.all(np.isfinite(logits))
  # Eval mode reads the running averages only: repeated calls agree exactly.
  np.testing.assert_array_equal(module.apply(variables, x)[0], logits)

  (train_logits, _), updates = module.apply(variables, x, train=True, mutable=['batch_stats'])
  assert train_logits.shape == (3, 7)
  assert jax.tree.structure(updates['batch_stats']) == jax.tree.structure(
      variables['batch_stats'])
  for old, new in zip(jax.tree.leaves(variables['batch_stats']),
                      jax.tree.leaves(updates['batch_stats'])):
    assert not np.allclose(old, new)
  # Training updates only the returned collection, never the variables passed in.
  np.testing.assert_array_equal(module.apply(variables, x)[0], logits)


def test_resnet18_train_forward():
  module = models.build('resnet18', 10)
  x = _images((BATCH, *IMAGE_SHAPE))
  variables = jax.tree.map(  # real values without paying for an eager init of 11M params
      lambda s: jnp.full(s.shape, 0.01, s.dtype), _abstract('resnet18')[2])
  variables['batch_stats'] = jax.tree.map(jnp.ones_like, variables['batch_stats'])
  (logits, features), updates = jax.jit(
      lambda v, x: module.apply(v, x, train=True, mutable=['batch_stats']))(variables, x)
  assert logits.shape == (BATCH, 10) and features.shape == (BATCH, 512)
  assert np.all(np.isfinite(logits)) and np.all(np.asarray(features) >= 0)
  old = variables['batch_stats']['layer1_0']['bn1']['mean']
  assert not np.allclose(updates['batch_stats']['layer1_0']['bn1']['mean'], old)


def test_unknown_name():
  with pytest.raises(ConfigError, match="'resnet50'.*resnet18"):
    models.build('resnet50', 10)


def test_unknown_and_pinned_kwargs():
  with pytest.raises(ConfigError, match="'small_cnn'.*'depth'"):
    models.build('small_cnn', 10, depth=3)
  with pytest.raises(ConfigError, match="'wrn34_10'.*'widen_factor'"):
    models.build('wrn34_10', 10, widen_factor=2)


def test_invalid_values():
  with pytest.raises(ConfigError, match='6n \\+ 4'):
    models.build('wrn', 10, depth=30)
  with pytest.raises(ConfigError, match='num_classes'):
    models.build('resnet18', 0)


def test_torch_build_errors():
  pytest.importorskip('torch')
  from experiments.pytorch_baseline import models as torch_models
  assert torch_models.names() == BASELINE
  with pytest.raises(ConfigError, match="'resnet50'.*resnet18"):
    torch_models.build('resnet50', 10)
  with pytest.raises(ConfigError, match="'resnet18'.*'width'"):
    torch_models.build('resnet18', 10, width=8)


def test_input_preprocessing_is_off_by_default_and_pads_then_normalises():
  x = _images((2, 6, 6, 3))
  plain = models.SmallCNN(num_classes=5, width=4)  # the class without the options
  variables = plain.init(jax.random.key(0), x)
  np.testing.assert_array_equal(models.build('small_cnn', 5, width=4, store_conv_inputs=False)
                                .apply(variables, x)[0], plain.apply(variables, x)[0])

  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  module = models.build('small_cnn', 5, width=4, input_mean=list(mean), input_std=std,
                        input_padding=2)
  assert module.input_mean == mean  # lists (configs read back from JSON) become tuples
  hash(module)
  reference = (np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0))) - mean) / np.array(std)
  np.testing.assert_allclose(module.apply(variables, x)[0],
                             plain.apply(variables, jnp.asarray(reference, jnp.float32))[0],
                             rtol=1e-6, atol=1e-6)
  assert {'input_mean', 'input_std', 'input_padding'} <= set(models.options('resnet18'))


def test_input_preprocessing_errors():
  with pytest.raises(ConfigError, match='given together'):
    models.build('small_cnn', 10, input_mean=(0.5, 0.5, 0.5))
  with pytest.raises(ConfigError, match='must be positive'):
    models.build('small_cnn', 10, input_mean=(0.5,), input_std=(0.0,))
  with pytest.raises(ConfigError, match='non-negative integer'):
    models.build('small_cnn', 10, input_padding=-1)
  module = models.build('small_cnn', 10, input_mean=(0.5, 0.5), input_std=(1.0, 1.0))
  with pytest.raises(ConfigError, match='2 values but the images have 3 channels'):
    jax.eval_shape(lambda x: module.init(jax.random.key(0), x),
                   jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))


def test_robustbench_architecture_errors():
  with pytest.raises(ConfigError, match='dm_wrn depth must be 6n'):
    models.build('dm_wrn', 10, depth=30)
  with pytest.raises(ConfigError, match="activation must be one of relu, swish, silu, got 'gelu'"):
    models.build('dm_wrn', 10, activation='gelu')
  with pytest.raises(ConfigError, match='dm_preact_resnet depth must be 18 or 34'):
    models.build('dm_preact_resnet', 10, depth=50)


@pytest.mark.parametrize("shape", [(3, 3, 1, 8), (3, 3, 16, 32), (1, 1, 8, 16), (5, 5, 3, 4)])
def test_conv_init_is_he_normal_over_fan_out_drawn_flat(shape):
  """The kernel initialiser draws flat (faster to compile on XLA:CPU) and gives exactly the numbers
  of flax's `variance_scaling(2, 'fan_out', 'normal')` drawn in the kernel's shape."""
  key = jax.random.key(7)
  reference = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")(key, shape)
  np.testing.assert_array_equal(models._conv_init(key, shape), reference)
  # and its spread is He's over fan-out (kernel area x output channels), independently of flax
  fan_out = shape[-1] * shape[0] * shape[1]
  big = models._conv_init(key, shape[:2] + (512, shape[-1]))
  np.testing.assert_allclose(float(jnp.std(big)), math.sqrt(2.0 / fan_out), rtol=0.05)
