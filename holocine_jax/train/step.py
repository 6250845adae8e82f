"""The pure train step: `train_step(state, batch) -> (state, metrics)` (DESIGN §10, §16).

    train_step = jax.jit(make_train_step(config, graphdef, rest), donate_argnums=0)

`batch`: "latents" [B, F, H, W, C] (normalised), "text_states" [B, Lt, Dt], optional "layout"
(batched ShotLayout); `prepare_batch` makes it from the pipeline's dict (`make_batch_encoder`:
the same, compiled, with on-the-fly video / text encoding). The rng is folded with
the step, so a resumed run draws the same timesteps, noise and caption dropout. With
`config.train.caption_dropout` > 0 the batch also carries "empty_text_states" [Lt, Dt] (the empty
prompt's encoding, `empty_prompt_states`; the loop adds it) and each film trains on it, without
text windows, with that probability (objective.caption_dropout). The global batch is split into
`config.train.grad_accum` micro-batches whose gradients are summed in a scan. A non-finite loss
or gradient leaves params, optimizer and EMA untouched and counts the step in `skipped`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from holocine_jax.train import objective
from holocine_jax.train.optim import learning_rate_schedule, make_optimizer
from holocine_jax.train.state import TrainState


# Caption dropout draws from its own stream of the run's key (fold_in(key, DROPOUT_STREAM), then
# the step): the timestep and noise keys stay those of a run without dropout.
DROPOUT_STREAM = 0x64726F70


def make_gradient_fn(config, graphdef, rest=None):
    """`gradients(state, batch) -> (grads, aux)`: the batch-mean gradient of the weighted loss at
    `state.params` (accumulated over `config.train.grad_accum` micro-batches); aux holds the
    per-sample `sample_loss` [B] (unweighted), `weights` [B] and `timesteps` [B], and with
    caption dropout `caption_dropped` [B] (1.0: the film trained on the empty prompt)."""
    sampler = objective.make_timestep_sampler(config)
    p_drop = objective.check_caption_dropout(config.train.get("caption_dropout", 0.0))
    accum = int(config.train.grad_accum)
    if accum < 1:
        raise ValueError(f"config.train.grad_accum={config.train.grad_accum} must be >= 1")
    rest = rest if rest is not None else nnx.State({})

    def loss_sum(params, frozen, mb):
        """Sum over the micro-batch of weighted per-sample losses, and the unweighted ones."""
        frozen = jax.tree.map(jnp.asarray, frozen)   # Variables of this trace level (nnx.scan)
        model = nnx.merge(graphdef, params, frozen, rest)
        x0 = mb["latents"]
        pred = model(objective.noised(x0, mb["noise"], mb["sigmas"]), mb["timesteps"],
                     mb["text_states"], mb.get("layout"))
        mask = objective.frame_mask(mb.get("layout"), x0.shape[0], x0.shape[1])
        loss = objective.per_sample_loss(pred, x0, mb["noise"], mask)
        return jnp.sum(loss * mb["weights"]), loss

    def gradients(state: TrainState, batch):
        x0 = batch["latents"]
        b = x0.shape[0]
        if b % accum:
            raise ValueError(f"batch size {b} is not divisible by config.train.grad_accum={accum}")
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_time, k_noise = jax.random.split(key)
        sigmas, timesteps, weights = sampler(k_time, b)
        inputs = dict(latents=x0, text_states=batch["text_states"], sigmas=sigmas,
                      timesteps=timesteps, weights=weights,
                      noise=jax.random.normal(k_noise, x0.shape, jnp.float32).astype(x0.dtype))
        if batch.get("layout") is not None:
            inputs["layout"] = batch["layout"].broadcast_to_batch(b)
        extra = {}
        if p_drop > 0:
            if "empty_text_states" not in batch:
                raise KeyError(f"config.train.caption_dropout={p_drop} needs the batch's "
                               "'empty_text_states' [Lt, Dt] (train.step.empty_prompt_states)")
            k_drop = jax.random.fold_in(jax.random.fold_in(
                jax.random.wrap_key_data(state.rng), DROPOUT_STREAM), state.step)
            inputs["text_states"], layout, dropped = objective.caption_dropout(
                k_drop, p_drop, inputs["text_states"], inputs.get("layout"),
                batch["empty_text_states"])
            if layout is not None:
                inputs["layout"] = layout
            extra["caption_dropped"] = dropped.astype(jnp.float32)
        grad_fn = jax.grad(loss_sum, has_aux=True)
        if accum == 1:
            grads, sample_loss = grad_fn(state.params, state.frozen, inputs)
        else:
            micro = jax.tree.map(lambda x: x.reshape((accum, b // accum) + x.shape[1:]), inputs)

            def accumulate(grads, mb):
                g, loss = grad_fn(state.params, state.frozen, mb)
                return jax.tree.map(jnp.add, grads, g), loss

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, sample_loss = jax.lax.scan(accumulate, zeros, micro)
            sample_loss = sample_loss.reshape(b)
        grads = jax.tree.map(lambda g: g / b, grads)
        return grads, dict(sample_loss=sample_loss, weights=weights, timesteps=timesteps, **extra)

    return gradients


def make_train_step(config, graphdef, rest=None):
    """A pure, jittable `train_step(state: TrainState, batch) -> (TrainState, metrics)`.

    metrics: loss, grad_norm (before clipping), update_norm, param_norm, learning_rate,
    skipped (1.0 if this step's update was dropped), and per sample: sample_loss [B]
    (unweighted), timesteps [B], caption_dropped [B] (with caption dropout only).
    """
    tc = config.train
    tx, schedule = make_optimizer(tc), learning_rate_schedule(tc)
    gradients = make_gradient_fn(config, graphdef, rest)

    def train_step(state: TrainState, batch):
        grads, aux = gradients(state, batch)
        loss = jnp.mean(aux["sample_loss"] * aux["weights"])
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            ema = optax.incremental_update(params, ema, 1.0 - tc.ema_decay)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = state.replace(
            params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
            ema=keep(ema, state.ema), step=state.step + 1,
            skipped=state.skipped + (~ok).astype(jnp.int32))
        metrics = dict(loss=loss, grad_norm=grad_norm, update_norm=optax.global_norm(updates),
                       param_norm=optax.global_norm(new_state.params),
                       learning_rate=schedule(state.step - state.skipped),
                       skipped=(~ok).astype(jnp.float32), sample_loss=aux["sample_loss"],
                       timesteps=aux["timesteps"])
        if "caption_dropped" in aux:
            metrics["caption_dropped"] = aux["caption_dropped"]
        return new_state, metrics

    return train_step


def empty_prompt_states(config, tokenizer, text_encoder) -> jax.Array:
    """float32 [text_len, Dt]: the empty prompt "" tokenised and encoded exactly as sampling
    encodes prompts (`text.encode_text`: padded to config.model.text_len, states past its one
    token, `</s>`, zeroed). Caption dropout trains dropped films on it. Computed with the run's
    text encoder, whichever way the batches bring their text: on-the-fly ids are encoded by the
    same encoder, and a `data encode` cache was written by the config's (its fingerprint)."""
    from holocine_jax.text import encode_text, tokenize

    if isinstance(text_encoder, nnx.Module):
        states = encode_text(text_encoder, tokenizer, [""], config.model.text_len)[0]
    else:  # a plain callable (input_ids, attention_mask) -> states
        ids, mask = tokenize(tokenizer, [""], config.model.text_len)
        states = text_encoder(jnp.asarray(ids), jnp.asarray(mask))
    return jnp.asarray(states, jnp.float32)[0]


ENCODER_INPUTS = ("latents", "video", "text_states", "input_ids", "attention_mask")


def make_batch_encoder(config, *, vae=None, text_encoder=None):
    """`encode(batch) -> {"latents", "text_states", "layout"}`: `prepare_batch` as one jitted
    program, so on-the-fly video and text encoding runs compiled, not op by op (DESIGN §10).

    Flax NNX encoders enter the program as arguments (their state), any other encoder (the DCT
    autoencoder, a test double) as constants. The layout passes through untouched; other keys
    (e.g. "index") are dropped. One trace per batch structure and shapes.
    """
    (vae_state, vae_of), (text_state, text_of) = (_pure(e) for e in (vae, text_encoder))

    @jax.jit
    def program(vae_state, text_state, arrays):
        return prepare_batch(arrays, config, vae=vae_of(vae_state), text_encoder=text_of(text_state))

    def encode(batch: dict) -> dict:
        out = program(vae_state, text_state, {k: batch[k] for k in ENCODER_INPUTS if k in batch})
        return dict(out, layout=batch.get("layout"))

    return encode


def _pure(encoder):
    """(state, rebuild): an NNX module as its state (a jit argument) and `rebuild(state)` merging
    it back; anything else as (None, a function returning it), i.e. a constant of the program."""
    if isinstance(encoder, nnx.Module):
        graphdef, state = nnx.split(encoder)
        return state, lambda s: nnx.merge(graphdef, s)
    return None, lambda _: encoder


def prepare_batch(batch: dict, config, *, vae=None, text_encoder=None) -> dict:
    """The pipeline's batch (contracts: "latents" | "video", "text_states" | "input_ids" +
    "attention_mask", optional "layout") -> the step's {"latents", "text_states", "layout"},
    op by op; the training loop runs it compiled through `make_batch_encoder`.

    video [B, T, H, W, 3]: uint8 pixels (the pipeline's; -> x / 127.5 - 1 here, on device, by
    `data.video.to_unit_range`) or float in [-1, 1], encoded with `vae.encode` and normalised;
    input_ids / attention_mask [B, Lt] go through `text_encoder(input_ids, attention_mask)`.
    """
    from holocine_jax.data.video import to_unit_range  # only needed for video batches
    from holocine_jax.vae import normalize_latents

    if "latents" in batch:
        latents = jnp.asarray(batch["latents"], jnp.float32)
    elif "video" in batch:
        if vae is None:
            raise ValueError("the batch holds 'video' but no vae was given to encode it")
        latents = normalize_latents(jnp.asarray(vae.encode(to_unit_range(batch["video"]))), config)
    else:
        raise KeyError(f"the batch needs 'latents' or 'video'; it has {sorted(batch)}")
    if "text_states" in batch:
        text = jnp.asarray(batch["text_states"], jnp.float32)
    elif "input_ids" in batch:
        if text_encoder is None:
            raise ValueError("the batch holds 'input_ids' but no text_encoder was given")
        if "attention_mask" not in batch:
            raise KeyError("the batch holds 'input_ids' without 'attention_mask'")
        text = jnp.asarray(text_encoder(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])),
                           jnp.float32)
    else:
        raise KeyError(f"the batch needs 'text_states' or 'input_ids'; it has {sorted(batch)}")
    if latents.ndim != 5 or text.ndim != 3 or latents.shape[0] != text.shape[0]:
        raise ValueError(f"latents {latents.shape} must be [B, F, H, W, C] and text states "
                         f"{text.shape} [B, Lt, Dt] with the same B")
    return dict(latents=latents, text_states=text, layout=batch.get("layout"))
