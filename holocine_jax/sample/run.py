"""`holocine-jax sample`: prompts -> text states and layouts -> latents -> decoded films on disk.

    films = [FilmRequest(prompt, cuts=(17,), num_frames=33, seed=0)]   # or read_prompt_file(path)
    run_sample(config, "ckpt_dir", films, "out_dir")

A prompt is the HoloCine format (`prompts.build_prompt`); without cuts, the shots are evenly
spaced (the official default). Films with the same frame count are denoised together,
`config.sample.batch_size` at a time. One film writes film.mp4, contact_sheet.png and film.json
into out_dir; several write out_dir/film_000/, film_001/, ...
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from holocine_jax import prompts
from holocine_jax.sample.output import to_uint8, write_film
from holocine_jax.sample.sampler import sample_film, scheduler_from_config
from holocine_jax.shots import ShotLayout, even_cuts


@dataclasses.dataclass(frozen=True)
class FilmRequest:
    """One film to sample: a HoloCine prompt, pixel cut frames (None: even), frames, seed."""
    prompt: str
    cuts: tuple[int, ...] | None = None
    num_frames: int | None = None
    seed: int | None = None


def read_prompt_file(path: str) -> list[FilmRequest]:
    """JSONL, one film per line: {"prompt": ...} or {"global_caption": ..., "shot_captions":
    [...]}, optional "cuts" (pixel frames), "frames", "seed". Errors name the line."""
    films = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(d, dict):
                raise ValueError(f"{where}: expected a JSON object")
            unknown = set(d) - {"prompt", "global_caption", "shot_captions", "cuts", "frames", "seed"}
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
            try:
                prompt = d["prompt"] if "prompt" in d else prompts.build_prompt(
                    d["global_caption"], d["shot_captions"])
                film = FilmRequest(prompt, None if d.get("cuts") is None else tuple(d["cuts"]),
                                   d.get("frames"), d.get("seed"))
                check_request(film)
            except KeyError as e:
                raise ValueError(f"{where}: needs 'prompt' or 'global_caption' + 'shot_captions' "
                                 f"(missing {e})") from None
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            films.append(film)
    if not films:
        raise ValueError(f"{path}: no films")
    return films


def check_request(film: FilmRequest) -> int:
    """Validate the prompt against the cuts; returns the number of shots."""
    _, captions = prompts.parse_prompt(film.prompt)
    if film.cuts is not None and len(film.cuts) + 1 != len(captions):
        raise ValueError(f"the prompt has {len(captions)} shot captions but {len(film.cuts)} "
                         f"cuts give {len(film.cuts) + 1} shots")
    return len(captions)


def text_stack(config):
    """(tokenizer, encoder) of config.text: UMT5 from `path`, else the tiny world's seeded pair."""
    from holocine_jax.text import load_text_stack

    return load_text_stack(config)


def encode_texts(tokenizer, encoder, texts, text_len: int) -> jax.Array:
    """[B, text_len, D] text states of the prompts (padded, states past the length zeroed)."""
    from holocine_jax.text import encode_text

    return encode_text(encoder, tokenizer, list(texts), text_len)[0]


def film_layout(config, film: FilmRequest, tokenizer) -> ShotLayout:
    """The film's ShotLayout with the prompt's text windows (DESIGN §3)."""
    frames = film.num_frames or config.video.num_frames
    shots = check_request(film)
    cuts = list(film.cuts) if film.cuts is not None else even_cuts(frames, shots)
    windows = prompts.text_windows(film.prompt, tokenizer, num_shots=shots,
                                   text_len=config.model.text_len)
    return ShotLayout.for_config(config, cuts, num_frames=frames, text_windows=windows.windows,
                                 text_pad_start=windows.pad_start)


def load_experts(config, checkpoint):
    """WanDiT per expert: `checkpoint` is one directory, or one per config.experts.names."""
    from holocine_jax.checkpoint import load_params

    paths = [checkpoint] if isinstance(checkpoint, str) else list(checkpoint)
    names = tuple(config.experts.names) or ("model",)
    if len(paths) not in (1, len(names)):
        raise ValueError(f"{len(paths)} checkpoints for experts {names}")
    models = []
    for p in paths:
        if not os.path.isdir(p):
            raise FileNotFoundError(f"checkpoint {p!r} is not a directory")
        try:
            models.append(load_params(p, config))
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"cannot read checkpoint {p!r}: {e}") from e
    return models


def generate(config, models, tokenizer, encoder, vae, films, *, progress=True):
    """Yield (index, film, frames uint8 [T, H, W, 3], layout) for every request; films of equal
    frame count are denoised `config.sample.batch_size` at a time, seeds per film."""
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
            latents = sample_film(models, cfg, states, negative, ShotLayout.stack(layouts), keys,
                                  progress=progress)
            video = to_uint8(vae.decode(denormalize_latents(latents, cfg)))
            for (i, film), clip, layout in zip(chunk, video, layouts):
                yield i, film, clip, layout


def run_sample(config, checkpoint, films, out_dir: str, *, progress: bool = True) -> list[dict]:
    """Sample `films` (FilmRequest list) with the checkpoint's model(s) into out_dir.

    out_dir must not exist or be empty; it is written all or nothing. Returns the paths written.
    """
    from holocine_jax.files import atomic_directory
    from holocine_jax.vae import make_vae

    films = list(films)
    for film in films:
        check_request(film)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"output directory {out_dir!r} exists and is not empty")
    models = load_experts(config, checkpoint)
    tokenizer, encoder = text_stack(config)
    vae = make_vae(config)
    sched = scheduler_from_config(config)
    written = [None] * len(films)
    with atomic_directory(out_dir) as tmp:
        for i, film, clip, layout in generate(config, models, tokenizer, encoder, vae, films,
                                              progress=progress):
            seed = film.seed if film.seed is not None else config.sample.seed + i
            meta = dict(prompt=film.prompt, seed=seed, checkpoint=checkpoint,
                        latent_cuts=layout.latent_cuts(),
                        sampler=dict(scheduler=sched.name, num_steps=sched.num_steps,
                                     shift=config.sample.shift,
                                     guidance_scale=config.sample.guidance_scale,
                                     order=config.sample.order, grid=config.sample.unipc_grid,
                                     experts=list(config.experts.names),
                                     boundary=config.experts.boundary))
            target = tmp if len(films) == 1 else os.path.join(tmp, f"film_{i:03d}")
            paths = write_film(target, clip, fps=config.video.fps, cut_frames=layout.pixel_cuts(),
                               metadata=meta, columns=config.sample.contact_columns)
            written[i] = {k: p.replace(tmp, out_dir, 1) for k, p in paths.items()}
    return written
