"""Train state and its sharded creation.

Reuse: `init, shardings = make_sharded_init(init_params_fn, tx, mesh, rules)` then
`state = init(rng)` for any model: `init_params_fn(rng) -> boxed params` (from
`module.init(...)['params']`, with `nn.with_logical_partitioning` metadata). The state
is born sharded (eval_shape -> logical shardings -> jit(init, out_shardings)), params
in param_dtype (f32 master weights), optimizer moments sharded like their params.
`state_shardings` gives the abstract state and its shardings without allocating
(the restore target). `TrainState` is a plain pytree (step, params, opt_state, rng,
skipped) that orbax saves as is.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from var_jax import parallel


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar: optimizer updates done
  params: Any                # unboxed float32 master weights
  opt_state: Any
  rng: jax.Array             # uint32[2] raw key; per-step keys are fold_in(rng, step)
  skipped: jax.Array         # int32 scalar: non-finite steps skipped (nan_policy='skip')

  def step_rng(self) -> jax.Array:
    return jax.random.fold_in(self.rng, self.step)


def _boxed_state(init_params_fn: Callable, tx: optax.GradientTransformation, rng) -> TrainState:
  params_rng, state_rng = jax.random.split(rng)
  boxed = init_params_fn(params_rng)
  return TrainState(step=jnp.zeros([], jnp.int32), params=boxed, opt_state=tx.init(boxed),
                    rng=state_rng, skipped=jnp.zeros([], jnp.int32))


def state_shardings(init_params_fn: Callable, tx: optax.GradientTransformation, mesh: Mesh,
                    rules=parallel.LOGICAL_RULES, rng=None) -> Tuple[TrainState, TrainState]:
  """(abstract unboxed state, NamedSharding tree) without allocating anything."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  abstract = jax.eval_shape(lambda r: _boxed_state(init_params_fn, tx, r), rng)
  specs = nn.get_partition_spec(abstract)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  return nn.meta.unbox(abstract), shardings


def make_sharded_init(init_params_fn: Callable, tx: optax.GradientTransformation, mesh: Mesh,
                      rules=parallel.LOGICAL_RULES) -> Tuple[Callable, TrainState]:
  """(init(rng) -> TrainState born in its shardings, shardings); compiles on first call."""
  _, shardings = state_shardings(init_params_fn, tx, mesh, rules)
  jitted = jax.jit(lambda r: nn.meta.unbox(_boxed_state(init_params_fn, tx, r)),
                   out_shardings=shardings)

  def call(rng):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(rng)
  return call, shardings


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings (the restore target for orbax)."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def replicate_tree(tree: Any, mesh: Mesh) -> Any:
  sh = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(lambda x: jax.device_put(x, sh), tree)


def count_params(params: Any) -> int:
  return int(sum(int(x.size) for x in jax.tree_util.tree_leaves(params)))


def to_host(tree: Any) -> Any:
  """Numpy copies of (possibly sharded) arrays, on every process.

  With several processes an array sharded across hosts is not fully addressable, so
  `jax.device_get` cannot read it; `process_allgather` assembles the global value.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
