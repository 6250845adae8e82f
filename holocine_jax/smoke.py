"""Fit a WanDiT to one random batch: the end-to-end check that forward, backward and the
optimizer run under jit (the demo's job until the training pipeline exists)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from holocine_jax.model import WanDiT


def random_batch(config, key, batch: int = 2):
    """Latents [B, F, h, w, C], timesteps [B], text states [B, Lt, Dt], target like latents."""
    m, v = config.model, config.video
    f = (v.num_frames - 1) // config.vae.stride[0] + 1
    h, w = v.height // config.vae.stride[1], v.width // config.vae.stride[2]
    k1, k2, k3, k4 = jax.random.split(key, 4)
    latents = jax.random.normal(k1, (batch, f, h, w, m.in_channels))
    timesteps = jax.random.uniform(k2, (batch,), minval=0.0, maxval=1000.0)
    text = jax.random.normal(k3, (batch, m.text_len, m.text_dim))
    return latents, timesteps, text, jax.random.normal(k4, latents.shape)


def fit_random_batch(config, steps: int = 30, learning_rate: float = 1e-3) -> list[dict]:
    """AdamW on the MSE to a fixed random target; returns [{step, loss, grad_norm}] per step."""
    model = WanDiT(config, rngs=nnx.Rngs(config.seed))
    optimizer = nnx.Optimizer(model, optax.adamw(learning_rate), wrt=nnx.Param)
    latents, timesteps, text, target = random_batch(config, jax.random.key(config.seed))

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return jnp.mean((model(latents, timesteps, text).astype(jnp.float32) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, optax.global_norm(grads)

    history = []
    for i in range(steps):
        loss, grad_norm = step(model, optimizer)
        history.append({"step": i, "loss": float(loss), "grad_norm": float(grad_norm)})
    return history
