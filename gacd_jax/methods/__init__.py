"""The method registry: a method is chosen by `config.method.name`.

To add a method, write a factory `ConfigDict -> Method` (see `base.py`), add it to its module's
`REGISTRY`, and put its switches in that module's `DEFAULTS`: they appear in every config as
`config.method.<name>.<switch>`, settable from the command line.
"""

from ml_collections import ConfigDict

from gacd_jax import errors
from gacd_jax.methods import baselines
from gacd_jax.methods.base import Context, InitInfo, Method, MethodFactory

_MODULES = (baselines,)
REGISTRY: dict[str, MethodFactory] = {k: v for m in _MODULES for k, v in m.REGISTRY.items()}


def defaults() -> ConfigDict:
  """Every method's switches: `{method name: {switch: default}}`."""
  return ConfigDict({k: v for m in _MODULES for k, v in m.DEFAULTS.items()})


def names() -> list[str]:
  return sorted(REGISTRY)


def build(method_config: ConfigDict) -> Method:
  """The method named by `method_config.name`, configured by `method_config`."""
  name = method_config.name
  if name not in REGISTRY:
    raise errors.ConfigError(
        f"unknown method {name!r}; known methods: {', '.join(names())} "
        "(set --config.method.name)")
  return REGISTRY[name](method_config)


__all__ = ["Context", "InitInfo", "Method", "build", "defaults", "names", "REGISTRY"]
