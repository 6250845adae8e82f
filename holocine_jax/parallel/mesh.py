"""Device mesh and logical-axis sharding rules (DESIGN §6).

    mesh = make_mesh(config.mesh)                        # ("data", "fsdp", "context", "tensor")
    state_sh = state_shardings(abstract_state, mesh, config.mesh.rules)
    batch_sh = batch_shardings(batch, mesh, config.mesh.rules)
    with jax.set_mesh(mesh):
        step = jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))

Models name logical axes only (`embed`, `heads`, `mlp`, `layers` on parameters; `batch`,
`sequence` on activations); `config.mesh.rules` maps them to mesh axes. A dimension that a rule
would split unevenly stays replicated (e.g. a 6-row modulation table), so every config shards
whatever divides. Activations are constrained only when a mesh is active (`jax.set_mesh`), so
the same model code runs unsharded on one device.
"""
from __future__ import annotations

import logging
import math
import os

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "context", "tensor")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
    """Sizes of AXES from `config.mesh`; one size may be -1 (the remaining devices)."""
    sizes = [int(mesh_config[a]) for a in AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh {dict(zip(AXES, sizes))}: sizes must be >= 1, with at most "
                         f"one -1 (fill)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"config.mesh {dict(zip(AXES, sizes))}: {num_devices} devices are not "
                             f"divisible by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh {dict(zip(AXES, sizes))} has {math.prod(sizes)} devices but "
                         f"{num_devices} are available; the product must equal the device count")
    return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
    """The 4-axis mesh over `devices` (default: all). Multi-slice: `data` spans the slices
    (DCN), the other axes stay inside a slice (ICI)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if len(slices) > 1:
        if shape[0] % len(slices):
            raise ValueError(f"config.mesh.data={shape[0]} must be a multiple of the {len(slices)} "
                             f"slices (data parallelism runs across slices)")
        ici = (shape[0] // len(slices),) + shape[1:]
        grid = mesh_utils.create_hybrid_device_mesh(ici, (len(slices), 1, 1, 1), devices)
    else:
        try:  # the physical torus order (ICI neighbours on the inner axes)
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (NotImplementedError, AssertionError) as e:
            # mesh_utils asserts on device subsets that are not a cuboid of chips ("hole") or
            # several cores per chip; such a mesh still works, in the given device order.
            logging.getLogger(__name__).warning(
                "mesh %s: no topology-aware layout for these devices (%s); using their order",
                shape, str(e).splitlines()[0])
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def frozen_rules(rules) -> tuple:
    """`config.mesh.rules` as nested tuples (hashable; JSON round trips give lists)."""
    def axes(a):
        return tuple(a) if isinstance(a, (list, tuple)) else a
    return tuple((name, axes(a)) for name, a in rules)


def logical_spec(names, rules, mesh=None, shape=None) -> P:
    """PartitionSpec for logical axis `names` (None = replicated dim) under `rules`
    ((logical name, mesh axis | tuple of mesh axes | None) pairs: `config.mesh.rules`).

    With `mesh` and `shape`, mesh axes of size 1 are dropped and a dimension not divisible by its
    mesh axes' product is left replicated; a mesh axis is used at most once.
    """
    table = dict(rules)
    used, spec = set(), []
    for i, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        if used & set(axes):
            axes = ()
        used |= set(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(abstract_state, mesh: Mesh, rules):
    """NamedShardings for a pytree holding nnx Variables (params, optimizer moments, EMA):
    a Variable with logical axis names (`out_sharding` metadata) is sharded by the rules,
    everything else (step, rng, counters, schedule state) is replicated."""

    def one(x):
        if _is_variable(x):
            names = x.get_metadata().get("out_sharding")
            value = x.get_value()
            spec = P() if names is None else logical_spec(names, rules, mesh, value.shape)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_state, is_leaf=_is_variable)


def batch_shardings(batch, mesh: Mesh, rules):
    """Leading-dim (`batch`) sharding for every array of a batch pytree (incl. a batched
    ShotLayout); raises if a batch size does not divide over the batch mesh axes."""
    spec = logical_spec(("batch",), rules, mesh)
    ways = math.prod(mesh.shape[a] for a in jax.tree.leaves(tuple(spec)))

    def one(x):
        if x.shape[0] % ways:
            raise ValueError(f"batch size {x.shape[0]} (an array of shape {tuple(x.shape)}) is not "
                             f"divisible by the {ways} batch shards of mesh axes {spec[0]}")
        return NamedSharding(mesh, P(*spec, *([None] * (len(x.shape) - 1))))

    return jax.tree.map(one, batch)


def constrain(x, names, rules):
    """`with_sharding_constraint` by logical `names` under the active mesh; identity without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names, rules, mesh, x.shape))


def initialize_distributed() -> bool:
    """`jax.distributed.initialize()` on multi-host runs: HOLOCINE_DISTRIBUTED=1 (what
    launch/tpu_vm.sh sets on every worker; on TPU VMs the peers come from the metadata server),
    several TPU_WORKER_HOSTNAMES, or JAX_COORDINATOR_ADDRESS. Returns whether it ran; call it
    before any other jax use."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if (os.environ.get("HOLOCINE_DISTRIBUTED") == "1" or "," in hosts
            or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        jax.distributed.initialize()
        return True
    return False
