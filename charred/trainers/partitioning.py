"""Device mesh and t5x-style logical axis rules: how parameters, optimizer state and
batches are laid out over devices and hosts.

The mesh has three axes: 'data' (pure data parallelism: parameters replicated), 'fsdp'
(data parallelism with parameters, EMA and optimizer state sharded, ZeRO-3 style: XLA
gathers each weight where it is used) and 'tensor' (attention heads and MLP hidden units
split across devices, Megatron style). Every parameter carries logical axis names
('embed', 'heads', 'mlp', 'conv_in', ...; see charred/models/unet.py and t5_encoder.py);
`rules` map them to mesh axes. A dimension that does not divide its mesh axis stays
replicated, so any rules work on any model, however small.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec
import numpy as np

MESH_AXES = ('data', 'fsdp', 'tensor')

# (logical name, mesh axes), in order of preference: a dimension takes the first rule whose
# mesh axes are larger than 1, not yet used by another dimension of the same array, and
# divide it; otherwise it is replicated. `None` documents a name that is never sharded.
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
DEFAULT_RULES: Rules = (
    # Activations.
    ('batch', ('data', 'fsdp')),
    # Parameters: widths of the residual stream and of what feeds it shard over 'fsdp';
    # heads and MLP hidden units over 'tensor' (over 'fsdp' when 'tensor' is 1 and the
    # other dimension of the kernel could not take 'fsdp').
    ('embed', 'fsdp'),
    ('cross_embed', 'fsdp'),
    ('time_embed', 'fsdp'),
    ('heads', 'tensor'),
    ('heads', 'fsdp'),
    ('mlp', 'tensor'),
    ('mlp', 'fsdp'),
    ('vocab', 'tensor'),
    ('vocab', 'fsdp'),
    # Convolutions are only FSDP-sharded: splitting their channels over 'tensor' would
    # need a collective per convolution for little memory.
    ('conv_in', 'fsdp'),
    ('conv_out', 'fsdp'),
    ('kv', None),
    ('norm', None),
    ('conv_height', None),
    ('conv_width', None),
    ('height', None),
    ('width', None),
    ('text_length', None),
    ('relpos_buckets', None),
)


@dataclasses.dataclass(frozen=True)
class PartitioningConfig:
  """Mesh axis sizes (one of them may be -1: all the remaining devices) and rules.

  The product of the sizes must divide the device count. A product smaller than the
  device count uses the first devices (single-process jobs only).
  """
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  # Overrides DEFAULT_RULES, e.g. (('batch', 'data'), ('embed', 'fsdp'), ...).
  logical_axis_rules: Rules | None = None
  # Host-side collectives (the resume consistency check across processes): 'xla' (JAX's
  # own, over jax.distributed) or 'mpi' (mpi4jax, for jobs launched with mpirun; needs
  # `pip install charred[mpi]`). The train step's collectives are always XLA's.
  collectives: str = 'xla'

  def __post_init__(self):
    if self.collectives not in ('xla', 'mpi'):
      raise ValueError(f"PartitioningConfig.collectives must be 'xla' or 'mpi', got "
                       f'{self.collectives!r}.')
    for rule in self.rules:
      if len(rule) != 2 or not set(_as_tuple(rule[1])) <= set(MESH_AXES):
        raise ValueError(f'logical_axis_rules entry {rule!r}: expected (logical name, mesh '
                         f'axis, tuple of mesh axes or None) with mesh axes from {MESH_AXES}.')

  @property
  def rules(self) -> Rules:
    return DEFAULT_RULES if self.logical_axis_rules is None else self.logical_axis_rules


def mesh_shape(config: PartitioningConfig, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with -1 resolved; a clear error when they cannot fit."""
  sizes = (config.data, config.fsdp, config.tensor)
  named = ', '.join(f'{a}={s}' for a, s in zip(MESH_AXES, sizes))
  if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
    raise ValueError(f'PartitioningConfig({named}): sizes must be positive, and at most '
                     'one of them -1 (all the remaining devices).')
  fixed = math.prod(s for s in sizes if s != -1)
  if num_devices % fixed:
    raise ValueError(f'PartitioningConfig({named}): the product {fixed} does not divide '
                     f'the {num_devices} devices.')
  return tuple(num_devices // fixed if s == -1 else s for s in sizes)


def make_mesh(config: PartitioningConfig, devices: Sequence[Any] | None = None
              ) -> jax.sharding.Mesh:
  """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all, every process).

  Devices are ordered by process, so that 'data' (the outer axis) spans hosts and 'fsdp'
  and 'tensor', which communicate more, stay within a host where they fit.
  """
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  shape = mesh_shape(config, len(devices))
  n = math.prod(shape)
  if n < len(devices) and jax.process_count() > 1:
    raise ValueError(f'PartitioningConfig mesh {shape} covers {n} of the {len(devices)} '
                     'devices; a multi-process job must use them all (set an axis to -1).')
  # Auto axes: GSPMD propagates shardings from the parameters and the batch (t5x style),
  # rather than jax.make_mesh's default explicit sharding-in-types.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=list(devices)[:n])


def _as_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_mesh_spec(logical: Sequence[str | None], shape: Sequence[int], rules: Rules,
                         axis_sizes: Mapping[str, int]) -> PartitionSpec:
  """PartitionSpec of an array of `shape` whose dimensions have `logical` names."""
  if len(logical) != len(shape):
    raise ValueError(f'{len(logical)} logical axis names {tuple(logical)} for an array of '
                     f'shape {tuple(shape)}.')
  used: set[str] = set()
  spec = []
  for name, size in zip(logical, shape):
    choice = None
    for rule_name, axes in rules:
      if rule_name != name or name is None:
        continue
      axes = tuple(a for a in _as_tuple(axes) if axis_sizes[a] > 1)
      if (axes and not used.intersection(axes) and
          size % math.prod(axis_sizes[a] for a in axes) == 0):
        choice = axes
        break
    if choice:
      used.update(choice)
    spec.append(None if not choice else choice[0] if len(choice) == 1 else choice)
  while spec and spec[-1] is None:
    spec.pop()
  return PartitionSpec(*spec)


def param_shardings(mesh, rules: Rules, abstract_params, param_axes):
  """NamedShardings of a parameter tree, from its logical PartitionSpecs (what
  `nn.get_partition_spec` returns on the boxed init)."""
  axis_sizes = dict(mesh.shape)

  leaves, treedef = jax.tree_util.tree_flatten(abstract_params)
  axes = jax.tree_util.tree_leaves(
      param_axes, is_leaf=lambda x: x is None or isinstance(x, PartitionSpec))
  if len(axes) != len(leaves):
    raise ValueError(f'{len(axes)} logical specs for {len(leaves)} parameters.')
  return treedef.unflatten([
      NamedSharding(mesh, logical_to_mesh_spec(
          (None,) * x.ndim if a is None else tuple(a), x.shape, rules, axis_sizes))
      for x, a in zip(leaves, axes)])


def _dict_keys(path) -> tuple:
  """The trailing run of dict keys of a key path (a parameter's name inside a subtree)."""
  keys = []
  for k in reversed(path):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    keys.append(k.key)
  return tuple(reversed(keys))


def state_shardings(mesh, rules: Rules, abstract_state, param_axes):
  """NamedShardings for any pytree holding parameter-shaped subtrees (a TrainState:
  params, EMA, and optimizer moments).

  `param_axes` is the logical PartitionSpec tree of the parameters. A leaf whose path ends
  with a parameter's full name and whose shape equals that parameter's (params, EMA,
  Adam's mu and nu, ...) is sharded like it; everything else (step counts, scalars) is
  replicated. Matching by name and shape is what t5x does for optimizer state.
  """
  params = abstract_state.params
  by_name = {}
  shardings = param_shardings(mesh, rules, params, param_axes)
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree_util.tree_leaves(shardings)):
    by_name[_dict_keys(path)] = (tuple(x.shape), s)
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(path, x):
    keys = _dict_keys(path)
    for start in range(len(keys)):
      shape, sharding = by_name.get(keys[start:], (None, None))
      if shape == tuple(x.shape):
        return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_sharding(mesh, rules: Rules) -> NamedSharding:
  """Sharding of every batch array: rows over the 'batch' rule's mesh axes."""
  axes = ()
  for name, mesh_axes in rules:
    if name == 'batch':
      axes = tuple(a for a in _as_tuple(mesh_axes) if mesh.shape[a] > 1)
      break
  return NamedSharding(mesh, PartitionSpec(axes or None))


def num_batch_shards(sharding: NamedSharding) -> int:
  """How many distinct row blocks a batch is cut into (the batch must divide it)."""
  axes = _as_tuple(sharding.spec[0]) if len(sharding.spec) else ()
  return math.prod(sharding.mesh.shape[a] for a in axes)


def process_batch_shard(sharding: NamedSharding) -> tuple[int, int]:
  """(index, count): this process feeds rows [index * B/count, (index+1) * B/count) of
  every global batch of B rows. (process_index, process_count) when the batch axes span
  the processes; processes that share rows (a 'tensor' axis across hosts) share an index.
  """
  n = num_batch_shards(sharding)
  starts = sorted({idx[0].indices(n)[0]
                   for idx in sharding.addressable_devices_indices_map((n,)).values()})
  lo, hi = starts[0], starts[-1] + 1
  if starts != list(range(lo, hi)) or n % (hi - lo) or lo % (hi - lo):
    raise ValueError(f'The devices of process {jax.process_index()} hold batch rows '
                     f'{starts} of {n}, not one aligned block: keep hosts on the outer '
                     "'data' axis.")
  return lo // (hi - lo), n // (hi - lo)


def global_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding,
                 shard_count: int) -> dict[str, jax.Array]:
  """Global arrays from this process's rows (`process_batch_shard`) of each array."""
  return {k: jax.make_array_from_process_local_data(
      sharding, v, (v.shape[0] * shard_count,) + v.shape[1:]) for k, v in batch.items()}


def place(tree, shardings):
  """Puts host (or single-device) arrays onto `shardings`; each process supplies the same
  full values and keeps only its shards. Arrays already so sharded are kept."""

  def one(x, s):
    if isinstance(x, jax.Array) and x.sharding == s:
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

  return jax.tree_util.tree_map(one, tree, shardings)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
