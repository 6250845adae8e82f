"""`holocine-jax sample`: prompts -> text states and layouts -> latents -> decoded films on disk.

    films = [FilmRequest(prompt, cuts=(17,), num_frames=33, seed=0)]   # or read_prompt_file(path)
    run_sample(config, "ckpt_dir", films, "out_dir")

A prompt is the HoloCine format (`prompts.build_prompt`); an untagged prompt is refused (the
official pipeline would sample it without window masks). Requested cuts are applied as the
official scripts do (`shots.snap_cuts`: nearest 4t+1; a warning when that changes them) and must
leave one shot per caption; without cuts, the shots are evenly spaced (the official default).
Films with the same frame count are denoised together, `config.sample.batch_size` at a time. One
film writes film.mp4, contact_sheet.png and film.json (`requested_cuts`, and the applied
`cut_frames` / `latent_cuts`) into out_dir; several write out_dir/film_000/, film_001/, ...
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from holocine_jax import files, prompts
from holocine_jax.data.manifest import cuts_field, shot_fields
from holocine_jax.sample.cache import cache_settings
from holocine_jax.sample.output import to_uint8, write_film
from holocine_jax.sample.sampler import sample_film, scheduler_from_config
from holocine_jax.shots import ShotLayout, even_cuts, snap_cuts

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FilmRequest:
    """One film to sample: a HoloCine prompt, requested pixel cut frames (None: even; applied as
    the official scripts by `film_cuts`), frames, seed."""
    prompt: str
    cuts: tuple[int, ...] | None = None
    num_frames: int | None = None
    seed: int | None = None


PROMPT_FILE_KEYS = ("prompt", "global_caption", "shots", "shot_captions", "cuts", "frames", "seed")


def read_prompt_file(path: str) -> list[FilmRequest]:
    """JSONL, one film per line: {"prompt": HoloCine prompt} or {"global_caption": ..., "shots":
    [...]} with shots as caption strings or {"caption": ..., "start": pixel frame} objects (a
    start for every shot after the first, or for none), or "shot_captions": [...]; optional
    "cuts" (pixel frames, not with starts), "frames", "seed". Errors name the line."""
    films = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    films.append(_prompt_line(line))
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: {e}") from None
    if not films:
        raise ValueError(f"{path}: no films")
    return films


def _prompt_line(line: str) -> FilmRequest:
    """The FilmRequest of one prompt-file line (see `read_prompt_file`)."""
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise ValueError("expected a JSON object")
    unknown = set(d) - set(PROMPT_FILE_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    for key in ("frames", "seed"):
        if d.get(key) is not None and type(d[key]) is not int:
            raise ValueError(f"'{key}' must be an integer, got {d[key]!r}")
    err = lambda reason, detail: ValueError(detail)  # noqa: E731
    if "prompt" in d:
        if set(d) & {"global_caption", "shots", "shot_captions"}:
            raise ValueError("give 'prompt' or 'global_caption' with 'shots', not both")
        if not isinstance(d["prompt"], str):
            raise ValueError("'prompt' must be a string")
        prompt, cuts = d["prompt"], cuts_field(d, err)
    elif isinstance(d.get("global_caption"), str):
        captions, cuts = shot_fields(d, err)
        prompt = prompts.build_prompt(d["global_caption"], captions)
    else:
        raise ValueError("needs 'prompt' (a HoloCine prompt) or 'global_caption' (a string) with "
                         "'shots'")
    film = FilmRequest(prompt, None if cuts is None else tuple(cuts), d.get("frames"),
                       d.get("seed"))
    check_request(film)
    return film


def check_request(film: FilmRequest) -> int:
    """Validate the prompt (tagged) against the requested cuts; returns the number of shots."""
    try:
        _, captions = prompts.parse_prompt(film.prompt)
    except ValueError as e:
        # The official pipeline samples an untagged prompt without window masks; we refuse it.
        raise ValueError(f"{e}; give the global caption and one caption per shot (--global-caption "
                         "and --shot-caption, or 'global_caption' and 'shots' in a prompt file)"
                         ) from None
    if film.cuts is not None and len(film.cuts) + 1 != len(captions):
        raise ValueError(f"the prompt has {len(captions)} shot captions but {len(film.cuts)} "
                         f"cuts give {len(film.cuts) + 1} shots")
    return len(captions)


def film_cuts(film: FilmRequest, num_frames: int) -> list[int]:
    """The applied pixel cuts of a `num_frames` film: its requested cuts through
    `shots.snap_cuts` (the official rule), or even cuts; must still give one shot per caption."""
    shots = check_request(film)
    if film.cuts is None:
        return even_cuts(num_frames, shots)
    applied = snap_cuts(num_frames, film.cuts)
    if len(applied) + 1 != shots:
        raise ValueError(f"cuts {list(film.cuts)} apply as {applied} on the 4t+1 grid of "
                         f"{num_frames} frames (nearest 4t+1, duplicates merged, cuts outside "
                         f"1..{num_frames - 1} dropped, as the official scripts): "
                         f"{len(applied) + 1} shots, but the prompt has {shots} shot captions")
    return applied


def text_stack(config):
    """(tokenizer, encoder) of config.text: UMT5 from `path`, else the tiny world's seeded pair."""
    from holocine_jax.text import load_text_stack

    return load_text_stack(config)


def encode_texts(tokenizer, encoder, texts, text_len: int) -> jax.Array:
    """[B, text_len, D] text states of the prompts (padded, states past the length zeroed)."""
    from holocine_jax.text import encode_text

    return encode_text(encoder, tokenizer, list(texts), text_len)[0]


def film_layout(config, film: FilmRequest, tokenizer) -> ShotLayout:
    """The film's ShotLayout with the applied cuts (`film_cuts`; a warning when they differ from
    the requested ones) and the prompt's text windows (DESIGN §3)."""
    frames = film.num_frames or config.video.num_frames
    cuts = film_cuts(film, frames)
    if film.cuts is not None and cuts != list(film.cuts):
        log.warning("cuts %s of a %d-frame film applied as %s (snapped to the nearest 4t+1, as "
                    "the official scripts)", list(film.cuts), frames, cuts)
    windows = prompts.text_windows(film.prompt, tokenizer, num_shots=len(cuts) + 1,
                                   text_len=config.model.text_len)
    return ShotLayout.for_config(config, cuts, num_frames=frames, text_windows=windows.windows,
                                 text_pad_start=windows.pad_start)


def load_experts(config, checkpoint, *, steps=None, loras=()):
    """WanDiT per expert: `checkpoint` is one directory, one per config.experts.names (high-noise
    first, each holding that expert: `checkpoint.check_experts`), or a run directory holding
    them (`checkpoint.checkpoint_dirs`). steps: one per directory (None: the latest each).
    loras: `convert.lora.LoRAUse`s (`sample --lora`), read against and applied to every expert
    (a LoRA run's own adapters are merged first)."""
    from holocine_jax.checkpoint import check_experts, checkpoint_dirs, load_params
    from holocine_jax.convert.lora import apply_lora_files

    paths = checkpoint_dirs(checkpoint)
    for p in paths:
        if not files.isdir(p):
            raise FileNotFoundError(f"checkpoint {p!r} is not a directory")
    check_experts(config, paths)
    models = []
    for p, step in zip(paths, steps or [None] * len(paths)):
        try:
            model = load_params(p, config, step=step)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"cannot read checkpoint {p!r}: {e}") from e
        try:
            models.append(apply_lora_files(model, loras))
        except ValueError as e:
            raise ValueError(f"--lora on the model of checkpoint {p!r}: {e}") from e
    return models


def generate(config, models, tokenizer, encoder, vae, films, *, progress=True, latents=None):
    """Yield (index, film, frames uint8 [T, H, W, 3], layout) for every request; films of equal
    frame count are denoised `config.sample.batch_size` at a time, seeds per film. `latents`: a
    dict that receives {index: the sampler's final normalised latents float32 [F, h, w, z]}."""
    from holocine_jax.vae import denormalize_latents

    lt = config.model.text_len
    negative = encode_texts(tokenizer, encoder, [config.sample.negative_prompt], lt)
    size = max(1, int(config.sample.batch_size))
    for frames in sorted({f.num_frames or config.video.num_frames for f in films}):
        group = [(i, f) for i, f in enumerate(films) if (f.num_frames or config.video.num_frames) == frames]
        cfg = config.copy_and_resolve_references()
        cfg.video.num_frames = frames
        for start in range(0, len(group), size):
            chunk = group[start:start + size]
            layouts = [film_layout(cfg, f, tokenizer) for _, f in chunk]
            states = encode_texts(tokenizer, encoder, [f.prompt for _, f in chunk], lt)
            keys = jnp.stack([jax.random.key(f.seed if f.seed is not None else
                                             config.sample.seed + i) for i, f in chunk])
            final = sample_film(models, cfg, states, negative, ShotLayout.stack(layouts), keys,
                                progress=progress)
            if latents is not None:
                latents.update({i: np.asarray(x, np.float32) for (i, _), x in zip(chunk, final)})
            video = to_uint8(vae.decode(denormalize_latents(final, cfg)))
            for (i, film), clip, layout in zip(chunk, video, layouts):
                yield i, film, clip, layout


def run_sample(config, checkpoint, films, out_dir: str, *, progress: bool = True,
               save_latents: bool = False, loras=()) -> list[dict]:
    """Sample `films` (FilmRequest list) with the checkpoint's model(s) into out_dir.

    out_dir must not exist or be empty; it is written all or nothing. Returns the paths written.
    save_latents: also write latents.npy per film (the sampler's final normalised latents,
    float32 [F, h, w, z], before decoding; its path under "latents"). loras: LoRAUse list
    (`sample --lora`, see `load_experts`), recorded in film.json.
    """
    from holocine_jax.convert.lora import lora_file
    from holocine_jax.files import atomic_directory
    from holocine_jax.vae import make_vae

    films, loras = list(films), list(loras)
    for use in loras:   # a missing file fails before the models load
        lora_file(use.path)
    cache = cache_settings(config)  # a bad config.sample.cache fails before anything loads
    for i, film in enumerate(films):  # every film's prompt and cuts, before anything is loaded
        try:
            film_cuts(film, film.num_frames or config.video.num_frames)
        except ValueError as e:
            raise ValueError(f"film {i}: {e}" if len(films) > 1 else str(e)) from None
    if files.exists(out_dir) and (not files.isdir(out_dir) or files.listdir(out_dir)):
        raise FileExistsError(f"output directory {out_dir!r} exists and is not empty")
    models = load_experts(config, checkpoint, loras=loras)
    tokenizer, encoder = text_stack(config)
    vae = make_vae(config)
    sched = scheduler_from_config(config)
    written = [None] * len(films)
    finals = {} if save_latents else None
    with atomic_directory(out_dir) as tmp:
        for i, film, clip, layout in generate(config, models, tokenizer, encoder, vae, films,
                                              progress=progress, latents=finals):
            seed = film.seed if film.seed is not None else config.sample.seed + i
            meta = dict(prompt=film.prompt, seed=seed, checkpoint=checkpoint,
                        requested_cuts=None if film.cuts is None else list(film.cuts),
                        latent_cuts=layout.latent_cuts(),
                        sampler=dict(scheduler=sched.name, num_steps=sched.num_steps,
                                     shift=config.sample.shift,
                                     guidance_scale=config.sample.guidance_scale,
                                     order=config.sample.order, grid=config.sample.unipc_grid,
                                     experts=list(config.experts.names),
                                     boundary=config.experts.boundary,
                                     cache=cache))
            if loras:
                meta["loras"] = [use.describe() for use in loras]
            target = tmp if len(films) == 1 else os.path.join(tmp, f"film_{i:03d}")
            paths = write_film(target, clip, fps=config.video.fps, cut_frames=layout.pixel_cuts(),
                               metadata=meta, columns=config.sample.contact_columns)
            if save_latents:
                paths["latents"] = os.path.join(target, "latents.npy")
                np.save(paths["latents"], finals.pop(i))
            written[i] = {k: p.replace(tmp, out_dir, 1) for k, p in paths.items()}
    return written
