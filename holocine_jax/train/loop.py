"""The training loop: resume or initialise, step, log, checkpoint (DESIGN §10).

    summary = run_training(config, workdir, batches=pipeline, vae=vae, text_encoder=encoder,
                           tokenizer=tokenizer)

`batches` is an iterator of batch dicts (contracts: data/pipeline.py); with `get_state()` /
`set_state(dict)` its position is checkpointed and restored, so a resumed run sees exactly the
batches the uninterrupted one would have seen; `skip_counts()` (if present) is logged as
`data/skipped/<reason>`. Workdir layout: `checkpoints/` (train/checkpointing.py), TensorBoard
event files and `metrics.jsonl`. SIGTERM (preemption) saves the current step and returns.
Batches are prepared (video / text encoded on the fly) by one compiled program
(`step.make_batch_encoder`); stderr gets a line every `train.log_every` steps with the loss,
steps/s and ETA (`metrics.ConsoleWriter`). Caption dropout (train.caption_dropout > 0) and
validation films (train.validate_every > 0) need the text stack (`tokenizer`, `text_encoder`);
validation also samples through `vae`, scores with `validation_score` (the CLI and the demo pass
the eval job's `score_films`) and writes under `val/` (train/validation.py).
"""
from __future__ import annotations

import logging
import math
import os
import signal
import threading

import jax
import numpy as np
from flax import nnx

from holocine_jax import files
from holocine_jax.checkpoint import load_config_json, load_params, without_lora
from holocine_jax.model import WanDiT
from holocine_jax.model.lora import LoRASpec
from holocine_jax.model.transformer import with_lora
from holocine_jax.parallel import batch_shardings, make_mesh, state_shardings
from holocine_jax.attention.context import check_halo, sequence_axis
from holocine_jax.train.checkpointing import TrainCheckpointer, _shape_keys
from holocine_jax.train.metrics import MetricsBuffer, console, make_writer, periodic_actions
from holocine_jax.train.state import init_train_state, split_model
from holocine_jax.train.step import make_batch_encoder, make_train_step

log = logging.getLogger(__name__)


def initial_model(config) -> WanDiT:
    """Fresh weights from `config.seed`, or the params checkpoint `config.train.init_from`
    (an imported or trained directory; its model config must match). A LoRA config
    (train.lora.rank > 0) gets those weights as its frozen base plus fresh adapters (A from
    seed + 1, B zero), so its base equals the model the same config without LoRA starts from.

    A14B: an `init_from` holding another expert than `config.expert` is an error naming both,
    not adopted: the expert decides which timesteps train (objective.py), and a run that quietly
    switched would disagree with its command line and with the resume check of its workdir.
    """
    lora = LoRASpec.from_config(config.train.lora)
    if lora.rank:
        return with_lora(initial_model(without_lora(config)), lora, rngs=nnx.Rngs(config.seed + 1))
    path = config.train.init_from
    if not path:
        return WanDiT.from_config(config, rngs=nnx.Rngs(config.seed))
    stored, current = _shape_keys(without_lora(load_config_json(path))), _shape_keys(config)
    if stored["expert"] != current["expert"]:
        raise ValueError(f"config.train.init_from={path!r} holds the {stored['expert']!r} expert "
                         f"but config.expert={current['expert']!r}: training it on that expert's "
                         f"timesteps is a mistake; set --config.expert={stored['expert']} or init "
                         f"from a {current['expert']!r} checkpoint")
    changed = [k for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
    if changed:
        raise ValueError(f"config.train.init_from={path!r} was saved with another model config: "
                         + "; ".join(f"config.{k}: {stored.get(k)!r} there, {current.get(k)!r} here"
                                     for k in changed))
    return load_params(path, config)


def run_training(config, workdir: str, *, batches, vae=None, text_encoder=None, tokenizer=None,
                 validation_score=None, steps: int | None = None) -> dict:
    """Train until step `steps` (default config.train.steps), resuming from `workdir`.

    Returns {"step", "start_step", "skipped", "loss" (last logged), "first_loss" (first logged
    in this call), "checkpoint_dir", "metrics_path", "preempted"}.
    """
    tc = config.train
    total = int(tc.steps if steps is None else steps)
    workdir = files.resolve(workdir)   # local or gs://
    files.makedirs(workdir)
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), config,
                             keep=tc.keep_checkpoints, async_save=tc.async_checkpoints)
    mesh = make_mesh(config.mesh)
    try:
        state, rest, graphdef, sharding = _resume_or_init(config, ckpt, batches, mesh)
        with jax.set_mesh(mesh):  # activation constraints and shard_map attention see the mesh
            return _train(config, workdir, ckpt, mesh, state, sharding, graphdef, rest, total,
                          batches, vae, text_encoder, tokenizer, validation_score)
    finally:
        ckpt.close()


def abstract_train_state(config, mesh):
    """(graphdef, rest, abstract TrainState, its shardings) of `config` on `mesh`: the shapes of
    every leaf, each laid out by the config's rule table on this mesh. It is the restore target
    of a checkpoint written on any mesh (orbax reshards: fsdp 8 -> fsdp 4 x context 2, ... or one
    device) and the layout a fresh state is created in."""
    abstract_model = nnx.eval_shape(lambda: WanDiT.from_config(config, rngs=nnx.Rngs(config.seed)))
    graphdef, abstract_params, abstract_frozen, rest = split_model(abstract_model)
    abstract = jax.eval_shape(lambda p, f: init_train_state(config, p, f), abstract_params,
                              abstract_frozen)
    sharding = state_shardings(abstract, mesh, config.mesh.rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, sharding)
    return graphdef, rest, abstract, sharding


def _resume_or_init(config, ckpt: TrainCheckpointer, batches, mesh):
    """(state, rest, graphdef, state shardings): fresh or restored, laid out on `mesh` by the
    rule table (fresh and restored states share one sharding, hence one compiled program)."""
    graphdef, rest, abstract, sharding = abstract_train_state(config, mesh)

    def fresh():
        return init_train_state(config, *split_model(initial_model(config))[1:3])

    if ckpt.latest_step() is None and not config.train.init_from:
        state = jax.jit(fresh, out_shardings=sharding)()   # created sharded: no device holds it all
        return state, rest, graphdef, sharding
    if ckpt.latest_step() is None:
        return jax.device_put(fresh(), sharding), rest, graphdef, sharding
    frozen = None
    if len(jax.tree.leaves(abstract.frozen)):   # a LoRA run: its base is not in the checkpoint
        frozen = jax.device_put(split_model(initial_model(config))[2], sharding.frozen)
    state, data_state = ckpt.restore(abstract, frozen=frozen)
    if data_state:
        if not hasattr(batches, "set_state"):
            raise ValueError("the checkpoint holds a data iterator state but `batches` has no "
                             "set_state(): resuming would repeat or skip data")
        batches.set_state(data_state)
    log.info("resumed from %s at step %d", ckpt.directory, int(state.step))
    return state, rest, graphdef, sharding


def _train(config, workdir, ckpt, mesh, state, sharding, graphdef, rest, total, batches, vae,
           text_encoder, tokenizer, validation_score):
    tc = config.train
    start = int(state.step)
    # metrics replicated: every host reads them whole (per-sample losses span all hosts' rows)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    train_step = jax.jit(make_train_step(config, graphdef, rest),
                         out_shardings=(sharding, replicated), donate_argnums=0)
    encode = make_batch_encoder(config, vae=vae, text_encoder=text_encoder)  # compiled
    empty_text = _empty_text_states(config, mesh, tokenizer, text_encoder)
    writer = make_writer(workdir, total_steps=total)
    validate = _validation(config, graphdef, rest, writer, tokenizer, text_encoder, vae,
                           validation_score)
    periodic = periodic_actions()
    hooks = [periodic.ReportProgress(num_train_steps=total, writer=writer, every_steps=tc.log_every,
                                     every_secs=None)]
    if tc.profile_steps > 0:
        hooks.append(periodic.Profile(logdir=workdir, num_profile_steps=tc.profile_steps,
                                      first_profile=start + 5, every_secs=None))
    if start == 0:
        writer.write_hparams(config.to_dict())
    buffer = MetricsBuffer(tc.loss_buckets)
    preempted = threading.Event()
    restore_sigterm = _catch_sigterm(preempted)
    logged: list[float] = []
    step = start
    if step < total:
        console(f"train: steps {step} -> {total} in {workdir} (the first step compiles; a line "
                f"every {tc.log_every} steps)")
    try:
        while step < total and not preempted.is_set():
            try:
                raw = next(batches)
            except StopIteration:
                log.warning("the data ran out at step %d of %d", step, total)
                break
            batch = encode(raw)
            if batch.get("layout") is not None and config.attention.context_strategy == "shot_aware":
                check_halo(batch["layout"], mesh.shape[sequence_axis(config.mesh.rules)],
                           config.attention.context_halo_frames)
            batch = _global_batch(batch, mesh, config.mesh.rules)
            if empty_text is not None:
                batch["empty_text_states"] = empty_text
            state, metrics = train_step(state, batch)
            step += 1
            buffer.add(metrics, _tokens(batch["latents"].shape, config.model.patch_size))
            if step % tc.log_every == 0 or step == total:
                scalars = buffer.summary()
                scalars["train/skipped_steps"] = float(state.skipped)
                for reason, n in (batches.skip_counts() if hasattr(batches, "skip_counts") else {}).items():
                    scalars[f"data/skipped/{reason}"] = float(n)
                writer.write_scalars(step, scalars)
                logged.append(scalars["train/loss"])
            for hook in hooks:
                hook(step)
            if step % tc.checkpoint_every == 0 or step == total or preempted.is_set():
                ckpt.save(state, _data_state(batches), force=True)
            if validate is not None and step % tc.validate_every == 0 and not preempted.is_set():
                validate(step, state)
        if step != ckpt.latest_step() and step > start:
            ckpt.save(state, _data_state(batches), force=True)
        ckpt.wait_until_finished()
    finally:
        restore_sigterm()
        writer.flush()
        writer.close()
    return dict(step=step, start_step=start, skipped=int(state.skipped),
                loss=logged[-1] if logged else math.nan, first_loss=logged[0] if logged else math.nan,
                checkpoint_dir=ckpt.directory, metrics_path=os.path.join(workdir, "metrics.jsonl"),
                preempted=preempted.is_set())


def _empty_text_states(config, mesh, tokenizer, text_encoder):
    """The empty prompt's states [Lt, Dt], replicated on `mesh`, for caption dropout; None
    without it."""
    from holocine_jax.train.objective import check_caption_dropout
    from holocine_jax.train.step import empty_prompt_states

    p = check_caption_dropout(config.train.caption_dropout)
    if p == 0:
        return None
    if tokenizer is None or text_encoder is None:
        raise ValueError(f"config.train.caption_dropout={p} needs the text stack (tokenizer and "
                         "text encoder) to encode the empty prompt; pass them to run_training")
    states = empty_prompt_states(config, tokenizer, text_encoder)
    return jax.device_put(states, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _validation(config, graphdef, rest, writer, tokenizer, text_encoder, vae, score):
    """The run's `ValidationFilms` (train.validate_every > 0), else None; `score` (clips, films,
    truths) -> {metric: value} (e.g. eval.job.score_films, passed in by the caller)."""
    every = int(config.train.validate_every)
    if every < 0:
        raise ValueError(f"config.train.validate_every={every} must be >= 0 (0: no validation)")
    if every == 0:
        return None
    from holocine_jax.train.validation import ValidationFilms, prompt_file_hint

    missing = prompt_file_hint(config.train.validation_prompts)
    if missing:
        raise FileNotFoundError(missing)
    if tokenizer is None or text_encoder is None or vae is None:
        raise ValueError(f"config.train.validate_every={every} samples films: it needs the "
                         "tokenizer, text encoder and VAE; pass them to run_training")
    return ValidationFilms(config, graphdef, rest, writer, tokenizer=tokenizer,
                           text_encoder=text_encoder, vae=vae, score=score)


def _global_batch(batch: dict, mesh, rules) -> dict:
    """This host's batch -> global arrays sharded over the mesh's batch axes (one host: a
    device_put; several hosts: each contributes its slice of the global batch)."""
    batch = {k: v for k, v in batch.items() if v is not None}
    local = jax.tree.map(np.asarray, batch)
    shardings = batch_shardings(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((x.shape[0] * jax.process_count(),) + x.shape[1:], x.dtype),
        local), mesh, rules)
    return jax.tree.map(jax.make_array_from_process_local_data, shardings, local)


def _tokens(latent_shape, patch_size) -> int:
    """Video tokens in a batch of latents [B, F, H, W, C]."""
    b, f, h, w, _ = latent_shape
    pt, ph, pw = patch_size
    return b * (f // pt) * (h // ph) * (w // pw)


def _data_state(batches) -> dict:
    return batches.get_state() if hasattr(batches, "get_state") else {}


def _catch_sigterm(event: threading.Event):
    """Set `event` on SIGTERM (main thread only); returns a function restoring the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
