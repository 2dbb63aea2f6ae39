"""The device mesh and the one table of logical-axis rules (parameters and activations).

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters and
optimiser state sharded over it), ``tensor`` (heads, MLP and vocabulary split). Every
parameter and activation of ``model.py`` carries logical axis names; ``RULES`` maps them onto
the mesh, so changing a layout is a one-line change here. Serving uses the same rules
(``param_shardings``, ``DecodeLayout``), fitted to the model and batch (``fitted_rules``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from safety_align.model import ModelConfig, init_params

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


def as_mesh(mesh: Mesh | dict[str, int] | None) -> Mesh | None:
  """A serving mesh: a ``Mesh`` with axes ``MESH_AXES`` as is, axis sizes (missing axes 1,
  one may be -1) through ``make_mesh``, ``None`` as is."""
  if mesh is None or isinstance(mesh, Mesh):
    if mesh is not None and tuple(mesh.axis_names) != MESH_AXES:
      raise ValueError(f"The mesh has axes {tuple(mesh.axis_names)}, expected {MESH_AXES}: "
                       "build it with safety_align.sharding.make_mesh.")
    return mesh
  if not isinstance(mesh, dict) or set(mesh) - set(MESH_AXES):
    raise ValueError(f"mesh must be a jax Mesh or a dict of axis sizes over {MESH_AXES}, got "
                     f"{mesh!r}.")
  return make_mesh({**dict.fromkeys(MESH_AXES, 1), **mesh})


def logical_sharding(tree, mesh: Mesh, rules: tuple = RULES):
  """NamedShardings of a (boxed or ``eval_shape``-d boxed) logically annotated pytree."""
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a [B, ...] input batch: rows split over the data-parallel axes."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fitted_rules(cfg: ModelConfig, mesh: Mesh, batch: int | None = None) -> tuple:
  """``RULES`` for ``cfg`` on ``mesh``: a logical axis whose size a mesh axis does not divide
  drops that axis (trailing ones first), so that dimension is replicated rather than refused,
  e.g. a decode batch of 1 over ``data=2``, or 2 KV heads over ``tensor=4``. ``batch``: the
  rows of ``act_batch`` (``None``: left as in ``RULES``)."""
  sizes = dict(embed=cfg.d_model, act_embed=cfg.d_model, vocab=cfg.vocab_size,
               act_vocab=cfg.vocab_size, mlp=cfg.d_ff, act_mlp=cfg.d_ff, heads=cfg.n_heads,
               act_heads=cfg.n_heads, kv_heads=cfg.n_kv_heads, act_batch=batch)
  rules = []
  for name, axes in RULES:
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    n = sizes.get(name)
    while n is not None and axes and n % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    rules.append((name, axes or None))
  return tuple(rules)


@functools.lru_cache(maxsize=32)
def _param_specs(cfg: ModelConfig, mesh: Mesh, rules: tuple) -> dict[str, NamedSharding]:
  boxed = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
  flat = jax.tree_util.tree_flatten_with_path(logical_sharding(boxed, mesh, rules))[0]
  return {jax.tree_util.keystr(path): s for path, s in flat}


def param_shardings(cfg: ModelConfig, mesh: Mesh, params, rules: tuple | None = None):
  """NamedShardings of (unboxed) ``params`` of ``cfg``, scanned or unrolled, by ``rules``
  (default ``fitted_rules(cfg, mesh)``): each parameter as ``init_params`` annotates it, so an
  unrolled layer gets the stacked layers' sharding less the ``layers`` axis. ``params`` may
  lack some of the model's parameters (e.g. a plain LM's [CLS] ones)."""
  specs = _param_specs(cfg, mesh, fitted_rules(cfg, mesh) if rules is None else rules)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  unknown = [jax.tree_util.keystr(p) for p, _ in flat if jax.tree_util.keystr(p) not in specs]
  if unknown:
    raise ValueError(f"Parameters {unknown[:3]} are not in the model of this config "
                     f"(n_layers={cfg.n_layers}, scan_layers={cfg.scan_layers}): pass the "
                     "parameters of this architecture.")
  return jax.tree.unflatten(treedef, [specs[jax.tree_util.keystr(p)] for p, _ in flat])


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
  """Where a decode batch lives on ``mesh``, by ``rules`` (``fitted_rules`` of the model and
  the batch): parameters as in training, the KV cache [B, Hkv, S, Dh] with rows over the data
  axes and KV heads over ``tensor``, every per-row array [B, ...] with rows over the data axes,
  and the rest (settings, seeds) replicated."""

  mesh: Mesh
  rules: tuple

  @classmethod
  def of(cls, cfg: ModelConfig, mesh: Mesh, batch: int) -> "DecodeLayout":
    return cls(mesh, fitted_rules(cfg, mesh, batch))

  def _axes(self, name: str):
    return dict(self.rules)[name]

  @property
  def rows(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(self._axes("act_batch")))

  @property
  def kv(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(self._axes("act_batch"), self._axes("kv_heads")))

  @property
  def replicated(self) -> NamedSharding:
    return replicated(self.mesh)
