"""TPU chips and slices for compiling ahead of time on a CPU machine (``tools/aot.py``).

``--target=tpu:<gen>:<chips>`` names a slice by its chips. Google's accelerator types count
differently: v4 and v5p by TensorCores (two per chip: ``v4-32`` and ``v5p-32`` are 16 chips),
v5e by chips (``v5e-64``, accelerator type ``v5litepod-64``, is 64 chips). ``devices`` returns
the slice's compile-only devices from libtpu (``jax.experimental.topologies``): the real TPU
compiler, no TPU attached. v4 and v5p run as one device per chip ("megacore", as JAX does on
those VMs), v5e has one TensorCore per chip.

libtpu must match jaxlib exactly (``pip install -e ".[tpu]"``). It is only loaded here, in
a process whose JAX backend is the CPU (``JAX_PLATFORMS=cpu``): see ``compile_only_env``.
"""

from __future__ import annotations

import dataclasses
import os

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip: peak dense bf16 FLOP/s, HBM capacity (bytes) and bandwidth (bytes/s), and
  the inter-chip interconnect (ICI) bandwidth per chip (bytes/s, bidirectional, all links)."""

  generation: str
  peak_flops: float
  hbm_bytes: float
  hbm_bw: float
  ici_bw: float
  cores_per_chip: int    # TensorCores: Google's slice names count these for v4 / v5p
  slice_prefix: str      # Google's accelerator type prefix
  chip_config: str       # libtpu's chip_config_name: "megacore" = one device per chip
  shapes: dict           # chips -> topology shape (Google's slice shapes)


_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8"}
_SHAPES_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}

CHIPS = {
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, HBM2 32 GiB at 1,200 GB/s.
    # ICI: 6 links per chip (3D torus) x 90 GB/s bidirectional per link (4.5e10 B/s one-way),
    # https://jax-ml.github.io/scaling-book/tpus (Google publishes no per-chip v4 ICI figure).
    "v4": Chip("v4", 275e12, 32 * 2**30, 1200 * GB, 6 * 90 * GB, 2, "v4", "megacore",
               _SHAPES_3D),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, HBM2 16 GB at 819 GB/s,
    # ICI 400 GB/s bidirectional per chip (1,600 Gbps).
    "v5e": Chip("v5e", 197e12, 16 * GB, 819 * GB, 400 * GB, 1, "v5litepod", "default",
                _SHAPES_2D),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, HBM2e 95 GB at 2,765 GB/s,
    # ICI 1,200 GB/s bidirectional per chip (4,800 Gbps).
    "v5p": Chip("v5p", 459e12, 95 * GB, 2765 * GB, 1200 * GB, 2, "v5p", "megacore",
                _SHAPES_3D),
}


@dataclasses.dataclass(frozen=True)
class Target:
  """A slice: ``chips`` chips of ``chip``."""

  chip: Chip
  chips: int

  @property
  def topology(self) -> str:
    """libtpu's topology name, e.g. ``v5p:2x2x4``."""
    return f"{self.chip.generation}:{self.chip.shapes[self.chips]}"

  @property
  def slice_name(self) -> str:
    """Google's name, e.g. ``v5p-32`` (16 chips; TensorCores counted) or ``v5e-64``."""
    n = self.chips * self.chip.cores_per_chip
    if self.chip.generation == "v5e":
      return f"v5e-{n} (accelerator type {self.chip.slice_prefix}-{n})"
    return f"{self.chip.slice_prefix}-{n}"

  def describe(self) -> str:
    c = self.chip
    return (f"tpu:{c.generation}:{self.chips} = {self.slice_name}, {self.chips} chips, topology "
            f"{self.topology}; per chip {c.peak_flops / 1e12:g} TFLOP/s bf16, "
            f"{c.hbm_bytes / 2**30:.1f} GiB HBM at {c.hbm_bw / GB:g} GB/s, ICI "
            f"{c.ici_bw / GB:g} GB/s")


def parse(spec: str) -> Target:
  """``tpu:<gen>:<chips>`` (e.g. ``tpu:v5p:16``) -> ``Target``; a clear error otherwise."""
  parts = spec.split(":")
  if len(parts) != 3 or parts[0] != "tpu" or parts[1] not in CHIPS or not parts[2].isdigit():
    raise ValueError(f"--target={spec!r}: expected tpu:<gen>:<chips> with gen one of "
                     f"{sorted(CHIPS)}, e.g. tpu:v5p:16.")
  chip, chips = CHIPS[parts[1]], int(parts[2])
  if chips not in chip.shapes:
    raise ValueError(f"--target={spec!r}: {parts[1]} slices here have "
                     f"{sorted(chip.shapes)} chips.")
  return Target(chip, chips)


def compile_only_env() -> None:
  """Environment for loading libtpu on a machine with no TPU, set before JAX starts: the CPU
  backend (the TPU is only a compile target), no cloud-metadata queries (libtpu would ask the
  GCE metadata server for the worker list, which can hang off Google Cloud), a local worker,
  and libtpu's one-process lock off (a compile-only client drives no chip, so two may run)."""
  import jax  # pylint: disable=g-import-not-at-top
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax.config.update("jax_platforms", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def devices(target: Target) -> list:
  """The slice's compile-only TPU devices (libtpu must be installed; see the module doc)."""
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise RuntimeError("libtpu is not installed: pip install -e \".[tpu]\" (libtpu matching "
                       "the pinned jaxlib) to compile for a TPU on this machine.") from e
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return topologies.get_topology_desc(
      platform="tpu", topology_name=target.topology,
      chip_config_name=target.chip.chip_config).devices
