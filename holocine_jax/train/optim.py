"""Optimizer from `config.train`: AdamW after global-norm clipping, warmup + constant/cosine lr."""
from __future__ import annotations

import optax

SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(tc) -> optax.Schedule:
    """Linear warmup 0 -> learning_rate over warmup_steps, then constant or cosine decay to
    min_lr_ratio·learning_rate at `steps`."""
    if tc.schedule not in SCHEDULES:
        raise ValueError(f"config.train.schedule={tc.schedule!r}; expected one of {SCHEDULES}")
    warmup = int(tc.warmup_steps)
    if tc.schedule == "constant":
        after = optax.constant_schedule(tc.learning_rate)
    else:
        after = optax.cosine_decay_schedule(tc.learning_rate, max(int(tc.steps) - warmup, 1),
                                            alpha=tc.min_lr_ratio)
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, tc.learning_rate, warmup), after], [warmup])


def make_optimizer(tc) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) (skipped when <= 0) then AdamW with the lr schedule."""
    adamw = optax.adamw(learning_rate_schedule(tc), b1=tc.adam_b1, b2=tc.adam_b2, eps=tc.adam_eps,
                        weight_decay=tc.weight_decay)
    if tc.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw)
    return adamw
