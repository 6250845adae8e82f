"""Device mesh and logical-axis sharding rules (DESIGN §6); context-parallel attention lives in
`attention/context.py`."""
from holocine_jax.parallel.mesh import (AXES, batch_shardings, constrain, frozen_rules,
                                        initialize_distributed, logical_spec, make_mesh,
                                        skip_absent_tpu, state_shardings)
