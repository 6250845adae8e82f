"""AttentionSpec: how video self-attention runs, one frozen value built once (DESIGN §5).

    spec = AttentionSpec.from_config(config.attention)
    out = attend(q, k, v, layout, spec, rules=config.mesh.rules)       # attention/dispatch.py

The defaults below are the library's one copy (the public `shot_attention` keywords and
`configs/base.py`'s `attention` section are built from them). Cross-attention takes no spec.
"""
from __future__ import annotations

import dataclasses

from holocine_jax.shots import SELF_ATTENTION_MODES

IMPLS = ("auto", "reference", "xla", "pallas")
CONTEXT_STRATEGIES = ("ulysses", "shot_aware", "auto")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Self-attention options (hashable: a static attribute of the model).

    mode: sparse (HoloCine) | full (HoloCine-Full) | independent (shots do not see each other).
    impl: auto | reference | xla | pallas (dispatch.py says which runs where).
    summary_self_weight: log(w) bias on own-shot summary keys in sparse mode (2.0 reproduces the
      released checkpoints, 1.0 the clean mask).
    block_q, block_kv: block plan tile sizes (clipped to the power of two >= L for short films).
    context_strategy: a mesh splitting the sequence: ulysses (all-to-all heads) | shot_aware
      (halos + summaries) | auto (whichever moves fewer bytes for the halo below).
    context_halo_frames: shot_aware's static halo per side in latent frames, the data's largest
      overhang of a device slice (checked per batch); -1: the whole film.
    interpret: run the Pallas kernels in the Pallas interpreter (tests; not a config key).
    """

    mode: str = "sparse"
    impl: str = "auto"
    summary_self_weight: float = 2.0
    block_q: int = 128
    block_kv: int = 128
    context_strategy: str = "ulysses"
    context_halo_frames: int = -1
    interpret: bool = False

    def __post_init__(self):
        for name, value, allowed in (("mode", self.mode, SELF_ATTENTION_MODES),
                                     ("impl", self.impl, IMPLS),
                                     ("context_strategy", self.context_strategy, CONTEXT_STRATEGIES)):
            if value not in allowed:
                raise ValueError(f"attention {name} {value!r} is not one of {allowed}")
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"attention {name}={value!r} must be a positive integer")
        if self.summary_self_weight <= 0:
            raise ValueError(f"attention summary_self_weight={self.summary_self_weight} must be > 0")

    @classmethod
    def config_fields(cls) -> dict:
        """The defaults of every config key (`configs/base.py`'s `attention` section)."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.name != "interpret"}

    @classmethod
    def from_config(cls, attention) -> AttentionSpec:
        """From `config.attention` (a ConfigDict or dict); every key must be a spec field."""
        values = dict(attention)
        unknown = sorted(set(values) - set(cls.config_fields()))
        if unknown:
            raise ValueError(f"config.attention has unknown keys {unknown}; known: "
                             f"{sorted(cls.config_fields())}")
        return cls(**values)
