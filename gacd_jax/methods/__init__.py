"""The method registry: a method is chosen by `config.method.name`.

To add a method, write a factory `ConfigDict -> Method` (see `base.py`) and add one line to
`REGISTRY`; put its switches under `config.method.<name>` in `gacd_jax/config.py`.
"""

from ml_collections import ConfigDict

from gacd_jax import errors
from gacd_jax.methods import baselines
from gacd_jax.methods.base import Context, InitInfo, Method, MethodFactory

REGISTRY: dict[str, MethodFactory] = {
    "natural": baselines.natural,
    "pgd_at": baselines.pgd_at,
    "ard": baselines.ard,
}


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


__all__ = ["Context", "InitInfo", "Method", "build", "names", "REGISTRY"]
