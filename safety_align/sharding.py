"""The device mesh and the one table of logical-axis rules (parameters and activations).

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters and
optimiser state sharded over it), ``tensor`` (heads, MLP and vocabulary split). Every
parameter and activation of ``model.py`` carries logical axis names; ``RULES`` maps them onto
the mesh, so changing a layout is a one-line change here.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("classes", None),
    ("layers", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def mesh_shape(sizes: dict[str, int], n_devices: int) -> tuple[int, ...]:
  """Resolve mesh sizes (one may be -1 = the remaining devices) against ``n_devices``."""
  shape = [int(sizes[a]) for a in MESH_AXES]
  free = [i for i, s in enumerate(shape) if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}.")
  known = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape) or n_devices % known:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} does not divide {n_devices} devices.")
  if free:
    shape[free[0]] = n_devices // known
  if math.prod(shape) != n_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} devices, "
                     f"but {n_devices} are available; set one axis to -1.")
  return tuple(shape)


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
  """A ``Mesh`` over ``devices`` (default: all) with axes ``MESH_AXES``."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(sizes, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_sharding(tree, mesh: Mesh):
  """NamedShardings of a (boxed or ``eval_shape``-d boxed) logically annotated pytree."""
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a [B, ...] input batch: rows split over the data-parallel axes."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
