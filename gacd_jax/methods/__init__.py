"""The method registry: a method is chosen by `config.method.name`.

A method is a factory `ConfigDict -> Method` (see `base.py`) plus its switches. The built-in ones
sit in their modules' `REGISTRY` and `DEFAULTS`; your own take one call to `register`. Switches
appear in every config built afterwards as `config.method.<name>.<switch>`, settable from the
command line.
"""

from typing import Any, Mapping, Optional

from ml_collections import ConfigDict

from gacd_jax import errors
from gacd_jax.methods import baselines
from gacd_jax.methods import gacd
from gacd_jax.methods.base import Context, InitInfo, Method, MethodFactory

_MODULES = (baselines, gacd)
REGISTRY: dict[str, MethodFactory] = {k: v for m in _MODULES for k, v in m.REGISTRY.items()}
_DEFAULTS: dict[str, dict[str, Any]] = {k: v for m in _MODULES for k, v in m.DEFAULTS.items()}


def register(name: str, factory: MethodFactory,
             switches: Optional[Mapping[str, Any]] = None) -> None:
  """Add a method: `config.method.name = name` then builds it with `factory(config.method)`, and
  `switches` become `config.method.<name>.*` in configs made from `gacd_jax.config.default()`."""
  if name in REGISTRY or name in ("name", "kl_reduction", "clean_bn_update"):
    raise errors.ConfigError(f"a method named {name!r} exists already; choose another name")
  REGISTRY[name] = factory
  if switches:
    _DEFAULTS[name] = dict(switches)


def defaults() -> ConfigDict:
  """Every method's switches: `{method name: {switch: default}}`."""
  return ConfigDict(_DEFAULTS)


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


__all__ = ["Context", "InitInfo", "Method", "build", "defaults", "names", "register", "REGISTRY"]
