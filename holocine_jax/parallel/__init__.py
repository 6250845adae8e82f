"""Mesh, logical-axis sharding rules and context-parallel attention (DESIGN §6)."""
from holocine_jax.parallel.mesh import (AXES, batch_shardings, constrain, initialize_distributed,
                                        logical_spec, make_mesh, state_shardings)
