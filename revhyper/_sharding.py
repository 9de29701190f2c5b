"""Where the exact state lives on a ``jax.sharding.Mesh``: one bit stack per device.

A ``Shards`` object names the mesh and, per parameter leaf, the ``PartitionSpec`` its weights are
split by. The bit stack follows the weights: the heads of a leaf's lanes are sharded exactly like
the leaf, and every device owns one tail, its pointer, its overflow flag and its bound (leading
axis ``[devices]``, sharded over every mesh axis). ``per_device`` runs the stack's operations
under ``shard_map``, so that each device spills to and refills from its own tail with its own
pointer: the cumulative sum over lanes never crosses a device and no collective touches the
stack.

A leaf replicated over some mesh axes (data parallelism, or a bias next to sharded matrices)
keeps a full copy of its lanes on every device that holds it. The copies see the same values and
do the same integer arithmetic, so they stay identical without communication; the memory they
take is counted per copy (``held_sizes``).

The static parts are hashable (``Mesh`` and ``PartitionSpec`` are), so a ``Shards`` can sit in
the jit-static configuration of a run.
"""

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec


@dataclasses.dataclass(frozen=True)
class Shards:
  """The mesh and one ``PartitionSpec`` per parameter leaf (in ``tree_leaves`` order)."""

  mesh: Any  # jax.sharding.Mesh
  specs: tuple  # PartitionSpec per leaf

  @property
  def num_devices(self):
    return int(self.mesh.size)

  @property
  def device_spec(self):
    """Spec of a per-device array ``[devices, ...]``: its leading axis over every mesh axis."""
    return PartitionSpec(tuple(self.mesh.axis_names))

  def named(self, spec):
    return NamedSharding(self.mesh, spec)

  def lay_out(self, x, spec):
    """``x`` laid out by ``spec``: a constraint on Auto axes, a reshard on Explicit ones."""
    if is_explicit(self.mesh):
      return jax.sharding.reshard(x, self.named(spec))
    return jax.lax.with_sharding_constraint(x, self.named(spec))

  def local_shapes(self, shapes):
    """The block of each leaf that one device holds."""
    out = []
    for shape, spec in zip(shapes, self.specs):
      block = list(shape)
      for dim, entry in enumerate(spec):
        block[dim] //= math.prod(self.mesh.shape[a] for a in _entry_axes(entry))
      out.append(tuple(block))
    return tuple(out)


def _entry_axes(entry):
  if entry is None:
    return ()
  return entry if isinstance(entry, tuple) else (entry,)


def _axes(spec):
  return [a for entry in spec for a in _entry_axes(entry)]


def make(mesh, specs, shapes):
  """Checks a mesh and per-leaf specs against the leaves' shapes; returns ``Shards``.

  Raises:
    ValueError: a spec names an axis the mesh lacks, has more entries than its leaf has
      dimensions, uses an axis twice, or splits a dimension unevenly (each device must hold a
      block of the same shape, so that every device's stack has the same static layout).
  """
  specs = tuple(PartitionSpec() if s is None else s for s in specs)
  for i, (shape, spec) in enumerate(zip(shapes, specs)):
    if not isinstance(spec, PartitionSpec):
      raise ValueError(f"param_specs leaf {i} must be a jax.sharding.PartitionSpec or None, "
                       f"got {spec!r}.")
    if len(spec) > len(shape):
      raise ValueError(f"param_specs leaf {i}: {spec} has more entries than the parameter "
                       f"has dimensions {shape}.")
    axes = _axes(spec)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown or len(set(axes)) != len(axes):
      raise ValueError(f"param_specs leaf {i}: {spec} must use distinct axes of the mesh "
                       f"{tuple(mesh.axis_names)}.")
    for dim, entry in enumerate(spec):
      pieces = math.prod(mesh.shape[a] for a in _entry_axes(entry))
      if shape[dim] % pieces:
        raise ValueError(f"param_specs leaf {i}: dimension {dim} of shape {shape} does not "
                         f"split evenly into {pieces} pieces ({spec}).")
  return Shards(mesh, specs)


def is_explicit(mesh):
  """The mesh's axes are ``Explicit``: the layout is part of the arrays' types."""
  return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def explicit_layout(x):
  """``x``'s sharding where its type carries one (a mesh with ``Explicit`` axes), else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  return sharding if is_explicit(getattr(sharding, "mesh", None)) else None


def like(x, reference):
  """``x`` laid out as ``reference`` where the reference's type carries an Explicit layout.

  Arrays that enter one training scan together (weights and optimizer states) must then have
  equal types; a state made by revhyper, or passed in another layout, is resharded to the
  weights'. Without Explicit axes the layout is XLA's to propagate, and ``x`` is returned.
  """
  sharding = explicit_layout(reference)
  if sharding is None or explicit_layout(x) == sharding:
    return x
  return jax.sharding.reshard(x, sharding)


def from_types(leaves, shapes):
  """The layout that the leaves' types carry (Explicit mesh axes), as ``Shards``; else None.

  Explicitly sharded parameters fix the state's layout: it must follow theirs, since the
  weights' types enter the training scan.

  Raises:
    ValueError: leaves laid out on different meshes.
  """
  layouts = [explicit_layout(x) for x in leaves]
  meshes = {s.mesh for s in layouts if s is not None}
  if not meshes:
    return None
  if len(meshes) > 1:
    raise ValueError(f"params are laid out on different meshes ({meshes}); revhyper lays out "
                     "its state on one mesh: reshard them onto one.")
  specs = [PartitionSpec() if s is None else s.spec for s in layouts]
  return make(meshes.pop(), specs, shapes)


def local_sizes(shapes, shards):
  """Lanes per leaf on one device: the whole leaf without sharding."""
  if shards is not None:
    shapes = shards.local_shapes(shapes)
  return tuple(int(np.prod(s, dtype=np.int64)) for s in shapes)


def held_sizes(shapes, shards):
  """Lanes per leaf summed over the devices that hold them: copies of replicated lanes count."""
  sizes = local_sizes(shapes, shards)
  return sizes if shards is None else tuple(s * shards.num_devices for s in sizes)


def constrain(leaves, shards):
  """Lays each parameter-shaped array out by its leaf's spec (a no-op without sharding)."""
  if shards is None:
    return leaves
  return [shards.lay_out(x, spec) for x, spec in zip(leaves, shards.specs)]


def per_device(fn, shards, in_specs, out_specs):
  """``shard_map`` of ``fn`` over the whole mesh, without replication checks.

  The checks are off because a replicated leaf's heads are refilled from per-device tails:
  their type says "varies by device", while their values agree on every device (each copy
  does the same arithmetic on the same inputs).
  """
  return jax.shard_map(fn, mesh=shards.mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)
