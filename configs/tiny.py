"""The laptop config: a 2-layer DiT on 64x64 films of the synthetic world, CPU, float32."""
from configs import base


def get_config():
    c = base.base_config("tiny", vae="2.1", sampling=dict(
        num_steps=20, shift=5.0, guidance_scale=3.0, num_frames=33, fps=8, height=64, width=64))
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.model.text_len = 64
    c.shots.max_shots = 4
    c.attention.block_q = 32
    c.attention.block_kv = 32
    return c
