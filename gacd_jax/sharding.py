"""The device mesh: one `data` axis; batches are split along it, everything else is replicated."""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gacd_jax import errors

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices (of all hosts).

  The axis is `Auto`: jax 0.10's `make_mesh` defaults to Explicit axes, under which `jit(grad)` of
  a batch-sharded input fails; with Auto axes XLA inserts the collectives (e.g. BatchNorm's batch
  statistics and an in-batch contrastive matrix span the global batch).
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices, (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, mesh: Mesh, key: str = "train.batch_size") -> None:
  n = mesh.devices.size
  if global_batch_size % n:
    raise errors.ConfigError(
        f"config.{key}={global_batch_size} is not divisible by the {n} devices of the mesh; "
        f"use a multiple of {n}")
