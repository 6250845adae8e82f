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


def skip_absent_tpu() -> bool:
    """Keep jax from starting libtpu on a host without TPU chips; returns whether it did.

    libtpu (the `tpu` extra, for AOT compiles on a CPU host) prints INVALID_ARGUMENT ...
    TPU_WORKER_HOSTNAMES lines whenever jax starts its backends, though it finds no chip. Call
    before any jax computation; it does nothing when the user chose platforms (JAX_PLATFORMS),
    when a TPU chip is present or the backends already started. Compiling for a TPU topology
    (`holocine-jax compile`) loads libtpu by itself and is unaffected.
    """
    from jax._src import hardware_utils, xla_bridge

    if (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
            or xla_bridge.backends_are_initialized()
            or hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0):
        return False
    return xla_bridge._backend_factories.pop("tpu", None) is not None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """`jax.distributed.initialize` on multi-host runs; returns whether it ran. Call it before any
    other jax use. It runs when any of these is given (arguments win over the environment):
    - explicit peers: `coordinator_address` (HOST:PORT; env JAX_COORDINATOR_ADDRESS),
      `num_processes` (env JAX_NUM_PROCESSES) and `process_id` (env JAX_PROCESS_ID), e.g. several
      CPU processes on one machine (`--coordinator 127.0.0.1:PORT --num-processes 2 --process-id 0`);
    - HOLOCINE_DISTRIBUTED=1 (what launch/tpu_vm.sh sets on every worker) or several
      TPU_WORKER_HOSTNAMES: on TPU VMs the peers come from the metadata server.
    A partial explicit set (a coordinator without the process count, ...) is an error naming what
    is missing, rather than a hang waiting for peers that were never named."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = _int_or_none(num_processes, "JAX_NUM_PROCESSES")
    process_id = _int_or_none(process_id, "JAX_PROCESS_ID")
    explicit = {"coordinator address (JAX_COORDINATOR_ADDRESS, --coordinator)": coordinator_address,
                "process count (JAX_NUM_PROCESSES, --num-processes)": num_processes,
                "process id (JAX_PROCESS_ID, --process-id)": process_id}
    given = [k for k, v in explicit.items() if v is not None]
    on_tpu_pod = env.get("HOLOCINE_DISTRIBUTED") == "1" or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    if given and len(given) < len(explicit) and not on_tpu_pod:
        missing = [k for k in explicit if k not in given]
        raise ValueError(f"multi-process run: {', '.join(given)} given but not the "
                         f"{' nor the '.join(missing)}")
    if not given and not on_tpu_pod:
        return False
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is not in [0, {num_processes}) processes")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True


def _int_or_none(value, env_name: str) -> int | None:
    if value is not None:
        return int(value)
    text = os.environ.get(env_name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{env_name}={text!r} is not an integer") from None
