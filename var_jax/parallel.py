"""Device mesh and logical-axis sharding.

Every parameter carries logical axis names (`nn.with_logical_partitioning`);
`LOGICAL_RULES` maps them to mesh axes. Data parallel, FSDP or tensor parallel
is a change of mesh shape and rules, not of model code.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis -> mesh axis (or None: replicated). Activations' batch axis is 'batch'.
LOGICAL_RULES: Tuple[Tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('qkv', 'tensor'),
    ('adaln', 'tensor'),
    ('vocab', 'tensor'),
    ('cond', None),
    ('classes', None),
    ('seq', None),
    ('levels', None),
    ('cvae', None),
    ('codebook', None),
    ('conv_h', None),
    ('conv_w', None),
    ('conv_in', None),
    ('conv_out', None),
    ('norm', None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; data=-1 takes every device left over."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if data == -1:
    if n % (fsdp * tensor):
      raise ValueError(f'{n} devices are not divisible by fsdp*tensor={fsdp * tensor}')
    data = n // (fsdp * tensor)
  if data * fsdp * tensor != n:
    raise ValueError(f'mesh data={data} x fsdp={fsdp} x tensor={tensor} != {n} devices')
  return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), MESH_AXES)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings for a (boxed, e.g. from jax.eval_shape(init)) param tree."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading axis split over (data, fsdp); the rest replicated."""
  return NamedSharding(mesh, P(('data', 'fsdp'), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
